"""Autoregressive and speculative decoding, one round at a time (paper Sec. 2.1, Eq. 1).

One request's decoding state (token ids, the target's KV cache, the drafter's own state, the trace of
rounds) is a small `DecodeState` object that `speculative_round` advances by one draft-and-verify
round. Plain autoregressive decoding is the same round with no drafter: one forward, one token. This
module knows rounds, not training; the batched multi-request engine drives many states the same way.

Per-token latency L = (T_draft + T_verify) / tau, where tau = tokens emitted per round, i.e. accepted
drafts plus the one token the target adds (the residual resample or the bonus token).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from labkit.drafters.base import Drafter, Proposal
from labkit.errors import LabkitError
from labkit.sampling import SamplingParams, logits_to_probs, sample, verify_chain
from labkit.target import Target
from labkit.trace import Round, mean_tau, position_acceptance, position_counts


@dataclass
class DecodeState:
    """One request being decoded. `ids` = prompt + generated; the last id is not yet in `cache`."""

    ids: list[int]
    n_prompt: int
    cache: DynamicCache
    max_new_tokens: int
    params: SamplingParams
    generator: torch.Generator
    stop_ids: set[int] = field(default_factory=set)
    drafter_state: Any = None
    rounds: list[Round] = field(default_factory=list)
    finished: bool = False
    prefill_s: float = 0.0

    @property
    def new_ids(self) -> list[int]:
        return self.ids[self.n_prompt:]

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.new_ids)

    def append(self, tokens: list[int]) -> None:
        """Extend by emitted tokens, stopping after a stop token or at max_new_tokens."""
        for tok in tokens:
            if self.remaining <= 0:
                self.finished = True
                return
            self.ids.append(tok)
            if tok in self.stop_ids:
                self.finished = True
                return
        if self.remaining <= 0:
            self.finished = True


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _select_hidden(hidden, layers: tuple[int, ...]):
    """hidden_states from HF are (embeddings, layer 1, ..., layer L): index i is layer i's output."""
    return tuple(hidden[i] for i in layers) if hidden is not None and layers else None


def check_inputs(prompt_ids: list[int], max_new_tokens: int) -> None:
    if len(prompt_ids) == 0:
        raise LabkitError("The prompt is empty: pass at least one token of prompt text.")
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise LabkitError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")


def check_drafter(target: Target, drafter: Drafter | None) -> None:
    """A drafter must speak the target's vocabulary: token ids and probability rows index the same V."""
    if drafter is None:
        return
    v_d = getattr(drafter, "vocab_size", None)
    if v_d is not None and v_d != target.vocab_size:
        raise LabkitError(
            f"Drafter {drafter.name!r} was made for a vocabulary of {v_d} tokens but the target "
            f"{target.name} has {target.vocab_size}: build or train the drafter for this target.")


def prefill(target: Target, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
            seed: int | None = 0, drafter: Drafter | None = None) -> DecodeState:
    """Run the prompt through the target, sample the first new token, and hand the drafter its context."""
    check_inputs(prompt_ids, max_new_tokens)
    check_drafter(target, drafter)
    generator = torch.Generator(device=target.device)
    generator.manual_seed(0 if seed is None else seed)
    state = DecodeState(ids=list(prompt_ids), n_prompt=len(prompt_ids), cache=target.new_cache(),
                        max_new_tokens=max_new_tokens, params=params, generator=generator,
                        stop_ids=set(target.eos_token_ids))
    layers = drafter.hidden_layers if drafter is not None else ()
    sync_device(target.device)
    start = time.perf_counter()
    logits, hidden = target.forward(prompt_ids, state.cache, logits_to_keep=1, hidden_states=bool(layers))
    first = int(sample(logits_to_probs(logits[-1], params), generator))
    state.append([first])
    if drafter is not None:
        drafter.start(state, _select_hidden(hidden, layers))
    sync_device(target.device)
    state.prefill_s = time.perf_counter() - start
    return state


def speculative_round(target: Target, state: DecodeState, drafter: Drafter | None = None) -> Round:
    """Draft (if a drafter is given), verify in one target forward, keep the accepted prefix.

    The target cache ends holding every emitted token but the last; rejected drafts are cropped off.
    """
    device = target.device
    sync_device(device)
    start = time.perf_counter()
    max_draft = state.remaining - 1  # n accepted + 1 emitted never exceeds what is left
    if drafter is not None and max_draft > 0:
        proposal = drafter.propose(state, max_draft).truncate(max_draft)
    else:
        proposal = Proposal.empty(target.vocab_size, device)
    sync_device(device)
    drafted = time.perf_counter()
    k = len(proposal)
    layers = drafter.hidden_layers if drafter is not None else ()
    inputs = [state.ids[-1]] + proposal.tokens.tolist()
    logits, hidden = target.forward(inputs, state.cache, logits_to_keep=k + 1, hidden_states=bool(layers))
    p_t = logits_to_probs(logits, state.params)  # (k + 1, V)
    verdict = verify_chain(proposal.tokens, proposal.probs.to(p_t.device), p_t, state.generator)
    n = verdict.n_accepted
    if k - n:
        state.cache.crop(-(k - n))
    state.append(proposal.tokens[:n].tolist() + [verdict.next_token])
    if drafter is not None:
        drafter.observe(state, n, _select_hidden(hidden, layers))
    sync_device(device)
    conf = None if proposal.conf_logits is None else proposal.conf_logits.float().tolist()
    rnd = Round(proposed=k, accepted=n, draft_s=drafted - start, verify_s=time.perf_counter() - drafted,
                conf_logits=conf)
    state.rounds.append(rnd)
    return rnd


@dataclass
class GenerationResult:
    """What a generation returns: the new tokens, their text, and the per-round trace."""

    token_ids: list[int]
    text: str
    rounds: list[Round]
    prefill_s: float
    decode_s: float

    @property
    def tau(self) -> float | None:
        """Mean tokens emitted per round (accepted drafts + 1); None when no round ran."""
        return mean_tau(self.rounds)

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / max(self.prefill_s + self.decode_s, 1e-9)

    def position_acceptance(self) -> list[float]:
        return position_acceptance(self.rounds)

    def position_counts(self) -> list[int]:
        return position_counts(self.rounds)

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "rounds": len(self.rounds),
                "tau": self.tau, "tokens_per_s": self.tokens_per_s,
                "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "position_acceptance": self.position_acceptance(),
                "position_rounds": self.position_counts(),
                "trace": [vars(r) for r in self.rounds]}


def generate(target: Target, prompt_ids: list[int], drafter: Drafter | None = None,
             max_new_tokens: int = 128, params: SamplingParams | None = None,
             seed: int | None = 0) -> GenerationResult:
    """Decode one prompt: the lab's AR loop when `drafter` is None, speculative decoding otherwise."""
    params = params or SamplingParams()
    state = prefill(target, prompt_ids, max_new_tokens, params, seed, drafter)
    start = time.perf_counter()
    while not state.finished:
        speculative_round(target, state, drafter)
    decode_s = time.perf_counter() - start
    return GenerationResult(token_ids=state.new_ids, text=target.decode(state.new_ids),
                            rounds=state.rounds, prefill_s=state.prefill_s, decode_s=decode_s)
