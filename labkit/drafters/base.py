"""The one interface every drafter offers, so the loop never asks which drafter it holds.

A drafter proposes a block of tokens together with the exact probabilities it sampled them from
(`Proposal`), then observes how verification went. Deterministic drafters (prompt lookup) put a
one-hot row there: verification is still exact, since min(1, p_t/p_d) and norm(max(0, p_t - p_d))
are defined for any p_d that gives its own token positive mass.

A drafter sees one request through a `DraftRequest`: its tokens, its sampling settings, its random
stream and a slot for the drafter's own per-request state. It never sees the decode loop (the target's
KV cache, the trace, the stopping rule), so the single-request loop and the batched engine can drive
the same drafters. The one exception is explicit: a drafter with `needs_target_cache = True`
(layer-skip) drafts over the target's own KV cache, which only single-request decoding hands it.
`Drafter` declares everything a caller reads, each with its default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from labkit.core.errors import LabkitError
from labkit.core.sampling import SamplingParams

if TYPE_CHECKING:
    from transformers import DynamicCache


@dataclass
class DraftRequest:
    """What a drafter sees of one request.

    `ids` is the request's own token list (prompt + emitted so far; the last id is not yet in the
    target's cache), shared with the decoding state and never copied: the drafter reads it, only the
    loop extends it. `memo` is the drafter's own per-request state (DFlash: its context cache), set in
    `start` and never read by the loop. `target_cache` is the target's KV cache, filled only by
    single-request decoding and read only by drafters with `needs_target_cache`; an engine leaves it None.
    """

    ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    memo: Any = None
    target_cache: DynamicCache | None = None


@dataclass
class Proposal:
    """A drafted block: tokens (k,) and the probabilities (k, V) they were drawn from.

    Drafters with a confidence head (DSpark) also give, per token, the head's raw logit and the
    calibrated confidence c_k (the probability that the token survives given that those before it did).
    """

    tokens: torch.Tensor
    probs: torch.Tensor
    conf_logits: torch.Tensor | None = None
    confidences: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @staticmethod
    def empty(vocab_size: int, device: torch.device | str = "cpu") -> "Proposal":
        return Proposal(torch.empty(0, dtype=torch.long, device=device),
                        torch.empty(0, vocab_size, device=device))

    def truncate(self, k: int) -> "Proposal":
        cut = (lambda t: None if t is None else t[:k])
        return Proposal(self.tokens[:k], self.probs[:k], cut(self.conf_logits), cut(self.confidences))


class Drafter:
    """The whole drafter protocol: everything a caller (the decode loop, the engine, the bench, a
    dashboard) may read of a drafter, each with its default here, so no caller ever probes for an
    attribute. A drafter subclasses this, sets `name`, `vocab_size` and `gamma`, and implements
    `propose` (and `start` / `observe` where it keeps per-request state).
    """

    #: shown in tables and errors, e.g. "dspark" or "hybrid:dspark"
    name: str = "drafter"
    #: size of the vocabulary its tokens and probability rows index; must equal the target's
    vocab_size: int
    #: the block length: the most tokens one proposal drafts
    gamma: int
    #: target layers whose hidden states this drafter reads (empty: none, so none are computed)
    hidden_layers: tuple[int, ...] = ()
    #: True: drafts over the target's KV cache (request.target_cache), so single-request decoding only
    needs_target_cache: bool = False
    #: False: it schedules its own blocks (sched:), so the batched engine, which schedules all requests
    #: together, refuses it
    batchable: bool = True
    #: True: every non-empty proposal carries the confidence head's logits and calibrated confidences
    has_confidences: bool = False

    def draft_vocab(self) -> torch.Tensor | None:
        """The token ids its model part can propose (a cut draft vocabulary), or None for all."""
        return None

    def temperatures(self, params: SamplingParams) -> list[float] | None:
        """The STS temperatures of its confidence head for these sampling settings (None: none fitted)."""
        return None

    def start(self, request: DraftRequest, hidden: tuple[torch.Tensor, ...] | None) -> None:
        """Called once after prefill; `hidden` holds the prompt's hidden states when asked for: one
        (P, H) tensor per entry of hidden_layers, over the request's P prompt positions (no batch dim)."""

    def propose(self, request: DraftRequest, max_tokens: int) -> Proposal:
        """Draft at most `max_tokens` tokens after request.ids (whose last token is not yet cached)."""
        raise NotImplementedError(f"{type(self).__name__} must implement propose")

    def propose_many(self, requests: list[DraftRequest], max_tokens: list[int]) -> list[Proposal]:
        """`propose` for several requests at once (the batched engine's step). The default drafts one
        request after the other; a drafter that can batch (DFlash, DSpark) runs one forward for all.
        Either way each request's tokens, probabilities and confidences are those `propose` gives it,
        drawn from its own generator in the same order."""
        return [self.propose(r, k) for r, k in zip(requests, max_tokens)]

    def observe(self, request: DraftRequest, n_accepted: int,
                hidden: tuple[torch.Tensor, ...] | None) -> None:
        """Called after verification: n_accepted drafts survived; request.ids already extended; `hidden`
        as in `start`, (k + 1, H) per layer over the verified positions (the last emitted token + k drafts)."""

    def observe_many(self, requests: list[DraftRequest], n_accepted: list[int],
                     hidden: list[tuple[torch.Tensor, ...] | None]) -> None:
        """`observe` for several requests at once (the batched engine's step). The default observes one
        request after the other; DFlash and DSpark project every request's new context in one call.
        Either way each request's state ends as `observe` leaves it."""
        for request, n, h in zip(requests, n_accepted, hidden):
            self.observe(request, n, h)


def needs_target_cache(drafter: Drafter | None) -> bool:
    """Whether `drafter` drafts over the target's own KV cache (and so runs single-request only)."""
    return drafter is not None and drafter.needs_target_cache


def check_batchable(drafter: Drafter | None) -> None:
    """Refuse a drafter that cannot serve a request in a batch, with a sentence naming the fix.

    A batched engine keeps one KV cache for all its requests and masks it per row; a drafter that
    appends to and crops the target's cache itself (layer-skip) would corrupt the other rows.
    """
    if drafter is None:
        return
    if drafter.needs_target_cache:
        raise LabkitError(f"The {drafter.name} drafter drafts from the target's own cache and runs single-request "
                          "only; use --drafter dspark|dflash|prompt-lookup with serve.")
    if not drafter.batchable:
        raise LabkitError(f"The {drafter.name} drafter schedules one request's blocks by itself; the engine "
                          "schedules all requests together: drop the sched: prefix (e.g. --drafter dspark).")


def vocab_proposal(vocab_ids: torch.Tensor, vocab_size: int, local: torch.Tensor, p_small: torch.Tensor,
                   full_vocab: bool, **extra) -> Proposal:
    """A drafter's draws over its draft vocabulary -> a Proposal in target ids: `local` (k,) columns of
    `vocab_ids` and their probability rows p_small (k, V_draft), spread into (k, vocab_size) rows unless the
    draft vocabulary is the whole vocabulary in order (`full_vocab`)."""
    ids = vocab_ids.to(p_small.device)
    if full_vocab:
        return Proposal(ids[local], p_small, **extra)
    probs = torch.zeros(p_small.shape[0], vocab_size, device=p_small.device)
    probs[:, ids] = p_small
    return Proposal(ids[local], probs, **extra)


def one_hot_proposal(tokens: list[int], vocab_size: int, device: torch.device | str = "cpu") -> Proposal:
    """A deterministic drafter's block: probability 1 on each proposed token."""
    t = torch.tensor(tokens, dtype=torch.long, device=device)
    return Proposal(t, torch.nn.functional.one_hot(t, vocab_size).float())
