"""Hybrid drafting: copy the n-gram continuation where the context repeats itself, let DSpark or DFlash
draft the rest of the block (issue 11 part 4; the idea of SuffixDecoding and vLLM's ngram-then-EAGLE).

Each round, prompt lookup (`find_continuation`) runs over request.ids, the prompt plus everything
emitted so far. If it finds a continuation of L tokens (and L >= `min_copy`), those tokens are drafts
1..L; the model drafter fills positions L+1..gamma:

- DSpark: the sequential head is *conditioned on the copied tokens* (its step k reads x_{k-1}, and the
  RNN head carries its state through them), via `DSparkDrafter.sample_sequential(..., forced=copied)`.
  So position L+1 is drawn from softmax(U_{L+1} + B(x_L, ...)), exactly the distribution the head was
  trained to give after that prefix (teacher forcing).
- DFlash: its block positions never read earlier draft tokens, so position j is drawn from the same
  p_j whatever the prefix; positions L+1.. are simply the block's slots L+1.. . Sound (the row is the
  distribution the token was drawn from), cheap to verify on a CPU where 2-16 tokens cost about the
  same forward, though the slots were trained for the model's own prefix, not the copied one.

No match: the model's block alone, exactly as the model drafter would propose it (confidences too).

Why it is lossless: chain verification (`sampling.verify_chain`) is exact whenever p_d row k is the
distribution draft k was drawn from given the context and drafts 1..k-1, and gives the drafted token
positive mass. The copied tokens are a deterministic function of request.ids, so their rows are one-hot;
whether to copy, and how many, is decided from request.ids alone, never from a random draw; each model
position's row is the exact softmax it was sampled from given the drafted prefix.

Confidences (DSpark): the head gives c_k = sigmoid(w . [h_k ; W1[x_{k-1}]]), trained against
1 - 0.5 ||p_model - p_t||_1, the survival chance of a *model draw*. A copied token is no model draw
(its survival is p_t(x_k), which the head cannot see since it never reads x_k), and calibration and
the bench fit on whole blocks, so a proposal with a copied part carries no confidences; rounds without
a match carry the model's own. The per-round split is counted in `HybridDrafter.counts`.

Defaults: prompt lookup's own (suffix of 2 to 4 tokens, most recent match), min_copy = 1, and the
n-gram always wins where it matches (prompt lookup alone reaches tau 1.5-1.7 on math and code, against
a position-1 acceptance of 0.31-0.35 for the shipped model drafters). Agreement with the model is not
asked for: under greedy decoding "the model agrees" makes the copied token the model's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from labkit.drafters.base import Drafter, DraftRequest, Proposal, one_hot_proposal
from labkit.drafters.dflash import DFlashDrafter
from labkit.drafters.prompt_lookup import PromptLookupConfig, find_continuation
from labkit.core.errors import LabkitError
from labkit.core.sampling import SamplingParams


@dataclass
class HybridConfig:
    """Prompt lookup's settings (its gamma caps the copied part) and the shortest continuation used."""

    lookup: PromptLookupConfig
    #: a continuation shorter than this is ignored and the model drafts the whole block
    min_copy: int = 1


class HybridDrafter(Drafter):
    """Drafter protocol over a DFlash or DSpark drafter plus prompt lookup over the context and output.

    start/observe always go to the model drafter, so its context cache stays in step with the target
    whichever part drafted. `counts` tallies rounds, rounds that copied, and tokens from each part.
    """

    def __init__(self, model: DFlashDrafter, config: HybridConfig | None = None):
        if not isinstance(model, DFlashDrafter):
            raise LabkitError(f"The hybrid drafter wraps a DFlash or DSpark drafter, got {type(model).__name__}: "
                              "use --drafter hybrid:dspark, hybrid:dflash or hybrid:PATH.")
        self.model = model
        self.cfg = config or HybridConfig(PromptLookupConfig(gamma=model.gamma))
        lk = self.cfg.lookup
        if not (1 <= lk.min_ngram <= lk.max_ngram) or lk.gamma < 1 or self.cfg.min_copy < 1:
            raise LabkitError(f"The hybrid drafter needs 1 <= min_ngram <= max_ngram, gamma >= 1 and min_copy >= 1, "
                              f"got {self.cfg}.")
        self.name = f"hybrid:{model.name}"
        self.vocab_size = model.vocab_size
        self.hidden_layers = model.hidden_layers
        self.has_confidences = model.has_confidences
        self.counts = {"rounds": 0, "copy_rounds": 0, "copied": 0, "drafted": 0}

    @property
    def gamma(self) -> int:
        """The longest block: the n-gram part may run past the model's block, never the other way."""
        return max(self.cfg.lookup.gamma, self.model.gamma)

    def temperatures(self, params: SamplingParams) -> list[float] | None:
        """The model drafter's STS temperatures (what rounds without a copied part were scored with)."""
        return self.model.temperatures(params)

    def draft_vocab(self) -> torch.Tensor | None:
        """The model part's vocabulary (the n-gram part copies any token of the context)."""
        return self.model.draft_vocab()

    def start(self, request: DraftRequest, hidden) -> None:
        self.model.start(request, hidden)

    def observe(self, request: DraftRequest, n_accepted: int, hidden) -> None:
        self.model.observe(request, n_accepted, hidden)

    def observe_many(self, requests: list[DraftRequest], n_accepted: list[int], hidden) -> None:
        self.model.observe_many(requests, n_accepted, hidden)

    def continuation(self, request: DraftRequest, max_tokens: int) -> list[int]:
        """The n-gram part of this round's block: prompt lookup over request.ids, or [] if too short."""
        copied = find_continuation(np.asarray(request.ids, dtype=np.int64), self.cfg.lookup)[:max_tokens]
        return copied if len(copied) >= self.cfg.min_copy else []

    @torch.no_grad()
    def propose(self, request: DraftRequest, max_tokens: int) -> Proposal:
        copied = self.continuation(request, max_tokens)
        n_model = min(self.model.gamma, max_tokens)  # the model's positions run 1..n_model
        self.counts["rounds"] += 1
        if not copied:
            prop = self.model.propose(request, max_tokens)
            self.counts["drafted"] += len(prop)
            return prop
        self.counts["copy_rounds"] += 1
        self.counts["copied"] += len(copied)
        # a copy that fills the block leaves nothing for the model: its forward is skipped
        tail = None if len(copied) >= n_model else self.model_tail(request, copied, n_model)
        self.counts["drafted"] += 0 if tail is None else len(tail)
        return self._with_copy(request, copied, tail)

    def model_tail(self, request: DraftRequest, copied: list[int], n_model: int,
                   h: torch.Tensor | None = None) -> Proposal:
        """The model's drafts for positions len(copied)+1..n_model, given the copied prefix (`h`: the
        block's slot states when already computed)."""
        h = self.model.draft_hidden(request) if h is None else h
        return self.model.block_after(h[:n_model], request, copied)

    @torch.no_grad()
    def propose_many(self, requests: list[DraftRequest], max_tokens: list[int]) -> list[Proposal]:
        """`propose` for all requests in batched model calls: rounds without a copied part are the model's
        own `propose_many` (its blocks cut to their caps where it cuts them); rounds whose copy leaves
        positions to the model get the whole block's slot states from one `draft_hidden_many` and finish
        request by request."""
        if len(requests) == 1:  # nothing to batch: the solo path (see DFlashDrafter.propose_many)
            return [self.propose(requests[0], max_tokens[0])]
        copies = [self.continuation(r, k) for r, k in zip(requests, max_tokens)]
        n_models = [min(self.model.gamma, k) for k in max_tokens]
        out: list[Proposal | None] = [None] * len(requests)
        plain = [i for i, (c, n) in enumerate(zip(copies, n_models)) if not c and n > 0]
        if plain:
            for i, prop in zip(plain, self.model.propose_many([requests[i] for i in plain], [n_models[i] for i in plain])):
                out[i] = prop
        tails = [i for i, (c, n) in enumerate(zip(copies, n_models)) if c and len(c) < n]
        h = self.model.draft_hidden_many([requests[i] for i in tails]) if len(tails) > 1 else None
        for j, i in enumerate(tails):
            out[i] = self._with_copy(requests[i], copies[i],
                                     self.model_tail(requests[i], copies[i], n_models[i], None if h is None else h[j]))
        for i, prop in enumerate(out):
            if prop is None:  # nothing for the model: a copy that fills the block, or no room at all
                out[i] = self._with_copy(requests[i], copies[i], None) if copies[i] else \
                    Proposal.empty(self.vocab_size, self.model.device)
        for c, prop in zip(copies, out):
            self.counts["rounds"] += 1
            self.counts["copy_rounds"] += bool(c)
            self.counts["copied"] += len(c)
            self.counts["drafted"] += len(prop) - len(c)
        return out

    def _with_copy(self, request: DraftRequest, copied: list[int], tail: Proposal | None) -> Proposal:
        head = one_hot_proposal(copied, self.vocab_size, self.model.device)
        if tail is None:
            return head
        return Proposal(torch.cat([head.tokens, tail.tokens]), torch.cat([head.probs, tail.probs.to(head.probs)]))


def make_hybrid(model: DFlashDrafter, gamma: int | None = None) -> HybridDrafter:
    """The hybrid over `model` with prompt lookup's defaults; `gamma` caps both parts (None: the model's)."""
    return HybridDrafter(model, HybridConfig(PromptLookupConfig(gamma=gamma or model.gamma)))


__all__ = ["HybridConfig", "HybridDrafter", "make_hybrid"]
