"""Autoregressive and speculative decoding, one round at a time (paper Sec. 2.1, Eq. 1).

One request's decoding state (its tokens, the target's KV cache, the trace of rounds) is a small
`DecodeState`; its drafter sees only `state.request` (`labkit.drafters.base.DraftRequest`). A round is
four phases, each a function of one request, around one target forward that the caller runs:

    proposal = draft(state, drafter)                    # k <= remaining - 1 drafts with their p_d
    inputs = verify_inputs(state, proposal)             # the last emitted id + the k drafts
    logits, hidden = <target forward over inputs>       # the caller's: this request alone, or a batch
    verdict = judge(state, proposal, logits)            # chain verification with the request's generator
    <drop positions_to_drop(proposal, verdict) positions from the caller's KV cache>
    round = commit(state, proposal, verdict, select_hidden(hidden, drafter), drafter, draft_s, verify_s)

`speculative_round` is that composition for one request with `target.forward` and the request's own
cache; the batched engine calls the same phases for each request around one batched forward and masks
its cache per row. A request begins the same way: `new_state`, the prompt forward, then `start` (the
first token, and drafter.start); `prefill` composes them, `start_state` is the engine's version. The
phases take a request's hidden states as its drafter reads them: one (T, H) tensor per drafter layer
over that request's T positions, no batch dimension (`select_hidden` cuts them from a one-sequence HF
forward). Plain autoregressive decoding is a round with no drafter: one forward, one token. This module
knows rounds, not training.

Per-token latency L = (T_draft + T_verify) / tau, where tau = tokens emitted per round, i.e. accepted
drafts plus the one token the target adds (the residual resample or the bonus token); `labkit.core.trace`
holds tau and the acceptance statistics.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from labkit.drafters.base import DraftRequest, Drafter, Proposal, check_batchable
from labkit.core.errors import LabkitError
from labkit.core.sampling import SamplingParams, Verdict, logits_to_probs, sample, verify_chain, verify_greedy
from labkit.model.target import Target
from labkit.model.timing import sync_device
from labkit.core.trace import Round, mean_tau, position_acceptance, position_counts


@dataclass
class DecodeState:
    """One request being decoded. `ids` = prompt + generated; the last id is not yet in the target's cache.

    The tokens, sampling settings and generator live in `request`, the view its drafter gets (shared,
    not copied); the properties below read them from there.
    """

    request: DraftRequest
    n_prompt: int
    max_new_tokens: int
    #: the target's vocabulary size: the width of an empty proposal's probability rows
    vocab_size: int
    #: the target's KV cache over ids[:-1]; None when the caller keeps one for many requests (the engine)
    cache: DynamicCache | None = None
    stop_ids: set[int] = field(default_factory=set)
    rounds: list[Round] = field(default_factory=list)
    finished: bool = False
    prefill_s: float = 0.0

    @property
    def ids(self) -> list[int]:
        return self.request.ids

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def generator(self) -> torch.Generator:
        return self.request.generator

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


def hidden_layers(drafter: Drafter | None) -> tuple[int, ...]:
    """Target layers whose hidden states the drafter reads; when empty, the forward computes none."""
    return drafter.hidden_layers if drafter is not None else ()


def select_hidden(hidden: tuple[torch.Tensor, ...] | None, drafter: Drafter | None) -> tuple[torch.Tensor, ...] | None:
    """A one-sequence forward's HF hidden states -> what the drafter reads: one (T, H) tensor per layer
    of drafter.hidden_layers, or None when it reads none.

    HF's hidden_states are (embeddings, layer 1, ..., layer L): index i is layer i's output, (1, T, H).
    The phases (`start`, `commit`) take the selected form, which a batched engine cuts from its rows.
    """
    layers = hidden_layers(drafter)
    return tuple(hidden[i][0] for i in layers) if hidden is not None and layers else None


def check_inputs(prompt_ids: list[int], max_new_tokens: int) -> None:
    if len(prompt_ids) == 0:
        raise LabkitError("The prompt is empty: pass at least one token of prompt text.")
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise LabkitError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")


def check_drafter(target: Target, drafter: Drafter | None) -> None:
    """A drafter must speak the target's vocabulary: token ids and probability rows index the same V."""
    if drafter is None:
        return
    v_d = drafter.vocab_size
    if v_d is not None and v_d != target.vocab_size:
        raise LabkitError(
            f"Drafter {drafter.name!r} was made for a vocabulary of {v_d} tokens but the target "
            f"{target.name} has {target.vocab_size}: build or train the drafter for this target.")


# ---------------------------------------------------------------------------------------------------
# a request's start: new_state, the caller's prompt forward, start


def new_state(target: Target, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
              seed: int | None = 0, drafter: Drafter | None = None, own_cache: bool = True) -> DecodeState:
    """A request before its prompt forward: inputs checked, its generator seeded (seed None: 0).

    own_cache=True (single-request decoding): a fresh target KV cache, also put on the drafter's view as
    `request.target_cache` for a drafter that drafts over it (layer-skip; a wrapper of one need not
    repeat its `needs_target_cache`). The batched engine keeps one cache for all its requests and passes
    False; a drafter that needs the target's cache is then refused with the fix (`check_batchable`).
    """
    check_inputs(prompt_ids, max_new_tokens)
    check_drafter(target, drafter)
    if not own_cache:
        check_batchable(drafter)
    generator = torch.Generator(device=target.device)
    generator.manual_seed(0 if seed is None else seed)
    cache = target.new_cache() if own_cache else None
    request = DraftRequest(ids=list(prompt_ids), params=params, generator=generator, target_cache=cache)
    return DecodeState(request=request, n_prompt=len(prompt_ids), max_new_tokens=max_new_tokens,
                       vocab_size=target.vocab_size, cache=cache, stop_ids=set(target.eos_token_ids))


def start(state: DecodeState, drafter: Drafter | None, logits: torch.Tensor,
          hidden: tuple[torch.Tensor, ...] | None) -> None:
    """After the prompt forward: the first new token, drawn with the request's sampling settings and
    generator, then drafter.start with the prompt's hidden states.

    `logits` (V,): the target's logits at the last prompt position. `hidden`: the drafter's layers over
    the P prompt positions, one (P, H) tensor per entry of drafter.hidden_layers (`select_hidden`), or
    None when it reads none.
    """
    first = int(sample(logits_to_probs(logits, state.params), state.generator))
    state.append([first])
    if drafter is not None:
        drafter.start(state.request, hidden)


def start_state(target: Target, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
                seed: int | None, drafter: Drafter | None, logits: torch.Tensor,
                hidden: tuple[torch.Tensor, ...] | None) -> DecodeState:
    """A request whose prompt the caller ran over its own KV cache (the batched engine): a state
    without a cache (`new_state(own_cache=False)`, which refuses a drafter that needs the target's
    cache), then `start` with that forward's last logits (V,) and the drafter's hidden states."""
    state = new_state(target, prompt_ids, max_new_tokens, params, seed, drafter, own_cache=False)
    start(state, drafter, logits, hidden)
    return state


def prefill(target: Target, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
            seed: int | None = 0, drafter: Drafter | None = None) -> DecodeState:
    """Run the prompt through the target, sample the first new token, and hand the drafter its context."""
    state = new_state(target, prompt_ids, max_new_tokens, params, seed, drafter)
    sync_device(target.device)
    begin = time.perf_counter()
    logits, hidden = target.forward(prompt_ids, state.cache, logits_to_keep=1,
                                    hidden_states=bool(hidden_layers(drafter)))
    start(state, drafter, logits[-1], select_hidden(hidden, drafter))
    sync_device(target.device)
    state.prefill_s = time.perf_counter() - begin
    return state


# ---------------------------------------------------------------------------------------------------
# a round (Sec. 2.1): draft, verify_inputs, the caller's forward, judge, the caller's rollback, commit


def draft(state: DecodeState, drafter: Drafter | None) -> Proposal:
    """This round's drafts: at most state.remaining - 1 tokens, so that n accepted plus the target's one
    never exceed what is left; an empty proposal without a drafter or with one token left to emit.

    Untimed: the caller times it (it is a round's T_draft in Eq. 1).
    """
    max_draft = state.remaining - 1
    if drafter is not None and max_draft > 0:
        return drafter.propose(state.request, max_draft).truncate(max_draft)
    return Proposal.empty(state.vocab_size, state.generator.device)  # the generator lives on the target's device


def draft_many(states: list[DecodeState], drafter: Drafter | None,
               max_draft: int | None | Sequence[int | None] = None) -> list[Proposal]:
    """`draft` for several requests in one call of the drafter (`Drafter.propose_many`), each capped
    as `draft` caps it and at `max_draft` (a proposal length the caller can use at most: one for all,
    or one per request)."""
    limits = list(max_draft) if isinstance(max_draft, Sequence) else [max_draft] * len(states)
    caps = [s.remaining - 1 if m is None else min(s.remaining - 1, m) for s, m in zip(states, limits)]
    out = [Proposal.empty(s.vocab_size, s.generator.device) for s in states]
    live = [i for i, k in enumerate(caps) if k > 0] if drafter is not None else []
    if not live:
        return out
    for i, prop in zip(live, drafter.propose_many([states[i].request for i in live], [caps[i] for i in live])):
        out[i] = prop.truncate(caps[i])
    return out


def verify_inputs(state: DecodeState, proposal: Proposal) -> list[int]:
    """The verify forward's new tokens: the last emitted id (not yet cached), then the k drafts.

    Their k + 1 logits are the target's at every draft position plus the one after (the bonus token's).
    """
    return [state.ids[-1]] + proposal.tokens.tolist()


def judge(state: DecodeState, proposal: Proposal, logits: torch.Tensor) -> Verdict:
    """Chain verification (Sec. 2.1) of `proposal` against the target's logits (k + 1, V) for
    `verify_inputs`: p_t with the request's sampling settings, accept / resample / bonus drawn with the
    request's generator, so a request's draws do not depend on what else shares its batch."""
    if logits.shape[0] != len(proposal) + 1:
        raise LabkitError(f"judge needs the target's logits at the {len(proposal) + 1} verified positions "
                          f"(the last emitted token + {len(proposal)} drafts), got {logits.shape[0]} rows.")
    if state.params.greedy:
        return verify_greedy(proposal.tokens, logits.argmax(-1))
    p_t = logits_to_probs(logits, state.params)  # (k + 1, V)
    return verify_chain(proposal.tokens, proposal.probs.to(p_t.device), p_t, state.generator)


def positions_to_drop(proposal: Proposal, verdict: Verdict) -> int:
    """KV positions of the verify forward the caller must drop from its cache: the k - n rejected drafts.

    The forward cached the last emitted token and all k drafts; keeping the first n drafts leaves the
    cache holding every emitted token but the last (the target's new token, which the next round feeds).
    """
    return len(proposal) - verdict.n_accepted


def advance(state: DecodeState, proposal: Proposal, verdict: Verdict, hidden: tuple[torch.Tensor, ...] | None,
            drafter: Drafter | None) -> None:
    """Append the n accepted drafts and the target's token, then drafter.observe with the hidden states
    of the k + 1 verified positions: one (k + 1, H) tensor per entry of drafter.hidden_layers
    (`select_hidden`), or None when it reads none."""
    advance_many([state], [proposal], [verdict], [hidden], drafter)


def advance_many(states: list[DecodeState], proposals: list[Proposal], verdicts: list[Verdict],
                 hidden: list[tuple[torch.Tensor, ...] | None], drafter: Drafter | None) -> None:
    """`advance` for several requests with one `drafter.observe_many` call (the batched engine's step):
    each request's ids and drafter state end as its own `advance` leaves them."""
    for state, proposal, verdict in zip(states, proposals, verdicts):
        state.append(proposal.tokens[:verdict.n_accepted].tolist() + [verdict.next_token])
    if drafter is not None and states:
        drafter.observe_many([s.request for s in states], [v.n_accepted for v in verdicts], hidden)


def record_round(state: DecodeState, proposal: Proposal, verdict: Verdict, draft_s: float, verify_s: float) -> Round:
    """Add the round to the request's trace: k drafted, n accepted, its two costs (Eq. 1's T_draft, T_verify)."""
    conf = None if proposal.conf_logits is None else proposal.conf_logits.float().tolist()
    rnd = Round(proposed=len(proposal), accepted=verdict.n_accepted, draft_s=draft_s, verify_s=verify_s,
                conf_logits=conf)
    state.rounds.append(rnd)
    return rnd


def commit(state: DecodeState, proposal: Proposal, verdict: Verdict, hidden: tuple[torch.Tensor, ...] | None,
           drafter: Drafter | None, draft_s: float, verify_s: float) -> Round:
    """`advance` then `record_round`: the end of a round whose costs the caller already measured.

    `hidden`: the drafter's layers over the k + 1 verified positions, (k + 1, H) each (`select_hidden`).
    The caller rolls back its own KV cache by `positions_to_drop(proposal, verdict)` positions, before
    or after (single request: cache.crop(-drop); the batched engine masks those positions in its row).
    """
    advance(state, proposal, verdict, hidden, drafter)
    return record_round(state, proposal, verdict, draft_s, verify_s)


def speculative_round(target: Target, state: DecodeState, drafter: Drafter | None = None) -> Round:
    """One round for one request (Sec. 2.1): draft, verify in one target forward, keep the accepted prefix.

    The phases above with `target.forward` over the request's own cache, which ends holding every
    emitted token but the last (rejected drafts cropped off). draft_s times `draft`; verify_s the rest:
    the forward, the verdict, the crop and the drafter's observe (so `advance` and `record_round` are
    called apart, with the clock read between them).
    """
    if state.cache is None:
        raise LabkitError("speculative_round runs a request over its own KV cache and this one has none "
                          "(new_state(own_cache=False)): call draft / judge / commit around your own forward.")
    device = target.device
    sync_device(device)
    begin = time.perf_counter()
    proposal = draft(state, drafter)
    sync_device(device)
    drafted = time.perf_counter()
    inputs = verify_inputs(state, proposal)
    logits, hidden = target.forward(inputs, state.cache, logits_to_keep=len(inputs),
                                    hidden_states=bool(hidden_layers(drafter)))
    verdict = judge(state, proposal, logits)
    drop = positions_to_drop(proposal, verdict)
    if drop:
        state.cache.crop(-drop)
    advance(state, proposal, verdict, select_hidden(hidden, drafter), drafter)
    sync_device(device)
    return record_round(state, proposal, verdict, drafted - begin, time.perf_counter() - drafted)


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
    begin = time.perf_counter()
    while not state.finished:
        speculative_round(target, state, drafter)
    decode_s = time.perf_counter() - begin
    return GenerationResult(token_ids=state.new_ids, text=target.decode(state.new_ids),
                            rounds=state.rounds, prefill_s=state.prefill_s, decode_s=decode_s)
