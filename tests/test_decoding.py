"""labkit.decode.loop and the drafters on tiny random models: greedy speculative output is the target's
greedy output, whatever the drafter; caches stay exact across rounds; traces add up; the round's
phases composed by hand (as the batched engine composes them) are the round itself.

All exact (no statistics). The toy target is a random 3-layer Llama over 16 tokens whose weights are
large enough (std 0.5) that its argmaxes are far from ties, so fp32 round-off between a batched
verify forward and a one-token forward cannot flip them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from labkit.decode.loop import (DecodeState, GenerationResult, commit, draft, generate, hidden_layers, judge, new_state,
                             positions_to_drop, prefill, select_hidden, speculative_round, start, start_state,
                             verify_inputs)
from labkit.drafters import LayerSkipConfig, LayerSkipDrafter, PromptLookupConfig, PromptLookupDrafter, make_drafter
from labkit.drafters.base import Drafter, DraftRequest, Proposal, check_batchable, needs_target_cache, one_hot_proposal
from labkit.core.errors import LabkitError
from labkit.drafters.layer_skip import shallow_view
from labkit.drafters.prompt_lookup import find_continuation
from labkit.core.sampling import SamplingParams, logits_to_probs, sample
from labkit.core.trace import Round, mean_tau, position_acceptance

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 16
GREEDY = SamplingParams(0.0)
PROMPTS = [[3], [1, 2, 3, 4, 5, 6], [7, 7, 2, 9, 7, 7, 2], [0, 15, 4, 8, 15, 4, 11, 2, 6, 1, 13]]
NEW_TOKENS = 20


# ----------------------------------------------------------------------------------------------------
# test-only drafters


class SameDrafter(Drafter):
    """The "same" assistant: drafts from the target itself (run without a cache), i.e. p_d = p_t.

    Greedy, it proposes the target's argmax continuation; sampled, it samples the target's own
    distribution (with its own generator) and reports it as p_d.
    """

    hidden_layers = ()

    def __init__(self, target, gamma: int, seed: int = 0):
        self.target, self.gamma, self.vocab_size, self.name = target, gamma, target.vocab_size, "same"
        self.generator = torch.Generator().manual_seed(seed)

    def start(self, state, hidden):
        pass

    @torch.inference_mode()
    def propose(self, state, max_tokens):
        ids, tokens, rows = list(state.ids), [], []
        for _ in range(min(self.gamma, max_tokens)):
            logits = self.target.model(input_ids=torch.tensor([ids])).logits[0, -1]
            p = logits_to_probs(logits, state.params)
            tokens.append(int(logits.argmax()) if state.params.greedy else int(sample(p, self.generator)))
            rows.append(p)
            ids.append(tokens[-1])
        if state.params.greedy:
            return one_hot_proposal(tokens, self.vocab_size)
        return Proposal(torch.tensor(tokens, dtype=torch.long), torch.stack(rows) if rows else torch.empty(0, self.vocab_size))

    def observe(self, state, n_accepted, hidden):
        pass


class RandomDrafter(Drafter):
    """Proposes uniformly random tokens with their true probabilities (uniform rows, not one-hot)."""

    hidden_layers = ()

    def __init__(self, vocab_size: int, gamma: int, seed: int = 0):
        self.vocab_size, self.gamma, self.name = vocab_size, gamma, "random"
        self.generator = torch.Generator().manual_seed(seed)

    def start(self, state, hidden):
        pass

    def propose(self, state, max_tokens):
        k = min(self.gamma, max_tokens)
        tokens = torch.randint(self.vocab_size, (k,), generator=self.generator)
        return Proposal(tokens, torch.full((k, self.vocab_size), 1.0 / self.vocab_size))

    def observe(self, state, n_accepted, hidden):
        pass


class Recording(Drafter):
    """Wraps a drafter and keeps (context ids, proposal) for every propose call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.name, self.vocab_size, self.hidden_layers = inner.name, inner.vocab_size, inner.hidden_layers
        self.gamma, self.needs_target_cache = inner.gamma, inner.needs_target_cache

    def start(self, state, hidden):
        self.inner.start(state, hidden)

    def propose(self, state, max_tokens):
        proposal = self.inner.propose(state, max_tokens)
        self.calls.append((list(state.ids), proposal))
        return proposal

    def observe(self, state, n_accepted, hidden):
        self.inner.observe(state, n_accepted, hidden)


DRAFTERS = {
    "prompt-lookup": lambda t: PromptLookupDrafter(t.vocab_size),
    "prompt-lookup-1gram-gamma2": lambda t: PromptLookupDrafter(t.vocab_size, PromptLookupConfig(2, 3, 1)),
    "layer-skip-1": lambda t: LayerSkipDrafter(t, LayerSkipConfig(n_layers=1, gamma=3, stop_below=0.0)),
    "layer-skip-2-stop": lambda t: LayerSkipDrafter(t, LayerSkipConfig(n_layers=2, gamma=5, stop_below=0.5)),
    "random": lambda t: RandomDrafter(t.vocab_size, gamma=4),
    "same": lambda t: SameDrafter(t, gamma=4),
}


@pytest.fixture(scope="module")
def toy_target(make_tiny_target):
    return make_tiny_target(VOCAB, n_layers=3)


@pytest.fixture(scope="module")
def ar_greedy(toy_target):
    return {tuple(p): generate(toy_target, p, None, NEW_TOKENS, GREEDY).token_ids for p in PROMPTS}


# ----------------------------------------------------------------------------------------------------
# greedy speculative == greedy


def test_lab_ar_greedy_equals_hf_generate_greedy(toy_target, ar_greedy):
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        out = toy_target.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                        do_sample=False, pad_token_id=0, eos_token_id=None)
        assert out[0, len(prompt):].tolist() == ar_greedy[tuple(prompt)]


@pytest.mark.parametrize("drafter_name", list(DRAFTERS))
def test_greedy_speculative_equals_greedy(toy_target, ar_greedy, drafter_name):
    drafter = DRAFTERS[drafter_name](toy_target)
    accepted = rejected = 0
    for prompt in PROMPTS:
        result = generate(toy_target, prompt, drafter, NEW_TOKENS, GREEDY)
        assert result.token_ids == ar_greedy[tuple(prompt)], f"prompt {prompt}"
        accepted += sum(r.accepted for r in result.rounds)
        rejected += sum(r.proposed - r.accepted for r in result.rounds)
    if drafter_name != "random":
        assert accepted > 0, "the drafter never got a token accepted: the test exercises nothing"
    if drafter_name != "same":
        assert rejected > 0, "the drafter was never wrong: the rejection path went untested"


def test_same_drafter_accepts_everything(toy_target):
    """A drafter that proposes the target's own greedy tokens: every round emits gamma + 1 tokens,
    except the last, which is cut short by max_new_tokens."""
    gamma = 4
    for prompt in PROMPTS:
        result = generate(toy_target, prompt, SameDrafter(toy_target, gamma), NEW_TOKENS, GREEDY)
        assert all(r.accepted == r.proposed for r in result.rounds)
        assert [r.emitted for r in result.rounds[:-1]] == [gamma + 1] * (len(result.rounds) - 1)
        assert result.rounds[-1].emitted <= gamma + 1
        assert 1 + sum(r.emitted for r in result.rounds) == NEW_TOKENS  # + the token from prefill


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_same_drafter_accepts_everything_when_sampling(toy_target, temperature, top_p):
    """p_d = p_t at every drafted position: min(1, p_t/p_d) = 1, so every draft is accepted (up to
    fp32 round-off between the cached and the uncached forward, about 1e-7 per draft). A verify that
    compared a draft against the wrong row of p_t would reject drafts here."""
    gamma = 3
    params = SamplingParams(temperature, top_p)
    for seed, prompt in enumerate(PROMPTS):
        result = generate(toy_target, prompt, SameDrafter(toy_target, gamma, seed), NEW_TOKENS, params, seed=seed)
        assert all(r.accepted == r.proposed for r in result.rounds)
        assert [r.emitted for r in result.rounds[:-1]] == [gamma + 1] * (len(result.rounds) - 1)


def test_random_drafter_is_mostly_rejected_yet_output_unchanged(toy_target, ar_greedy):
    prompt = PROMPTS[1]
    result = generate(toy_target, prompt, RandomDrafter(VOCAB, gamma=4, seed=1), NEW_TOKENS, GREEDY)
    assert result.token_ids == ar_greedy[tuple(prompt)]
    assert result.tau < 1.5


@pytest.mark.parametrize("max_new", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("drafter_name", ["same", "layer-skip-1", "prompt-lookup"])
def test_max_new_tokens_is_exact(toy_target, ar_greedy, drafter_name, max_new):
    """However many tokens a round could accept, exactly max_new_tokens come out, and they are the
    greedy prefix."""
    prompt = PROMPTS[2]
    result = generate(toy_target, prompt, DRAFTERS[drafter_name](toy_target), max_new, GREEDY)
    assert result.token_ids == ar_greedy[tuple(prompt)][:max_new]


@pytest.mark.parametrize("drafter_name", ["prompt-lookup", "layer-skip-1", "same"])
def test_stops_at_eos_mid_round(make_tiny_target, drafter_name):
    """With a stop token, speculative greedy output ends at its first occurrence, like AR, even when
    the stop token is accepted in the middle of a drafted block."""
    plain = make_tiny_target(VOCAB, n_layers=3)
    prompt = PROMPTS[3]
    free = generate(plain, prompt, None, NEW_TOKENS, GREEDY).token_ids
    firsts = [j for j in range(3, len(free)) if free[j] not in free[:j]]
    assert firsts, f"no token appears for the first time after position 3 in {free}"
    stop = free[firsts[0]]
    target = make_tiny_target(VOCAB, n_layers=3, eos={stop})  # same seed: same weights
    ar = generate(target, prompt, None, NEW_TOKENS, GREEDY).token_ids
    assert ar == free[:firsts[0] + 1]
    spec = generate(target, prompt, DRAFTERS[drafter_name](target), NEW_TOKENS, GREEDY).token_ids
    assert spec == ar


# ----------------------------------------------------------------------------------------------------
# caches: incremental equals recomputed


@pytest.mark.parametrize("drafter_name", ["layer-skip-1", "layer-skip-2-stop", "prompt-lookup", "random"])
def test_target_cache_holds_every_emitted_token_but_the_last(toy_target, drafter_name):
    """After every round (sampled at temperature 1, so drafts are often rejected and cropped) every
    layer of the target's cache holds exactly len(ids) - 1 positions, and a forward of the last token
    over it gives the logits of an uncached forward of the whole sequence."""
    drafter = DRAFTERS[drafter_name](toy_target)
    state = prefill(toy_target, PROMPTS[1], 24, SamplingParams(1.0), seed=3, drafter=drafter)
    crops = 0
    while not state.finished:
        rnd = speculative_round(toy_target, state, drafter)
        crops += rnd.accepted < rnd.proposed
        assert state.cache.get_seq_length() == len(state.ids) - 1
        assert [layer.get_seq_length() for layer in state.cache.layers] == [len(state.ids) - 1] * 3
    assert crops > 0
    cached, _ = toy_target.forward([state.ids[-1]], state.cache)
    with torch.inference_mode():
        full = toy_target.model(input_ids=torch.tensor([state.ids])).logits[0, -1]
    torch.testing.assert_close(cached[-1], full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_layers", [1, 2])
def test_layer_skip_incremental_draft_equals_recomputed(toy_target, n_layers):
    """The drafter's p_d, computed over the shared (cropped) cache, equals a from-scratch forward of
    the shallow model over the context plus the tokens drafted so far, at every position of every
    round."""
    params = SamplingParams(1.0)
    drafter = Recording(LayerSkipDrafter(toy_target, LayerSkipConfig(n_layers=n_layers, gamma=3, stop_below=0.0)))
    generate(toy_target, PROMPTS[3], drafter, 16, params, seed=0)
    shallow = shallow_view(toy_target.model, n_layers)
    assert len(drafter.calls) > 3
    for ids, proposal in drafter.calls:
        full = ids + proposal.tokens.tolist()[:-1]
        with torch.inference_mode():
            logits = shallow(input_ids=torch.tensor([full])).logits[0, len(ids) - 1:]
        torch.testing.assert_close(proposal.probs, logits_to_probs(logits, params), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_shallow_view_shares_weights_and_is_first_layers_then_head(make_tiny_target, tied):
    target = make_tiny_target(VOCAB, n_layers=3, tied=tied)
    view = shallow_view(target.model, 2)
    own = {p.data_ptr() for p in target.model.parameters()}
    assert {p.data_ptr() for p in view.parameters()} <= own  # no copies
    assert len(view.model.layers) == 2
    ids = torch.tensor([PROMPTS[3]])
    with torch.inference_mode():
        hidden = target.model(input_ids=ids, output_hidden_states=True).hidden_states[2]
        expected = target.model.lm_head(target.model.model.norm(hidden))
        torch.testing.assert_close(view(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# traces and results


def test_position_acceptance_is_conditional_on_reaching_the_position():
    rounds = [Round(3, 3, 0.0, 0.0), Round(3, 1, 0.0, 0.0), Round(2, 0, 0.0, 0.0), Round(0, 0, 0.0, 0.0)]
    # position 1: 3 rounds drafted >= 1, 2 accepted it; position 2: rounds 1-2 reached it, 1 accepted;
    # position 3: only round 1 reached it, and accepted it
    assert position_acceptance(rounds) == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert position_acceptance([]) == []
    result = GenerationResult(token_ids=[1] * 9, text="", rounds=rounds, prefill_s=0.1, decode_s=0.2)
    assert result.tau == pytest.approx((4 + 2 + 1 + 1) / 4)
    assert result.tokens_per_s == pytest.approx(9 / 0.3)


def test_generation_result_is_json_ready_and_consistent(toy_target):
    result = generate(toy_target, PROMPTS[2], DRAFTERS["layer-skip-1"](toy_target), 12, SamplingParams(1.0), seed=1)
    out = json.loads(json.dumps(result.to_dict()))
    assert out["token_ids"] == result.token_ids and len(result.token_ids) == 12
    assert out["rounds"] == len(out["trace"]) == len(result.rounds)
    assert 1 + sum(r["accepted"] + 1 for r in out["trace"]) == 12
    assert 1.0 <= out["tau"] <= 4.0


def test_sampling_is_reproducible_by_seed(toy_target):
    drafter = DRAFTERS["layer-skip-1"](toy_target)
    runs = [generate(toy_target, PROMPTS[0], drafter, 12, SamplingParams(1.0), seed=s).token_ids for s in (5, 5, 6)]
    assert runs[0] == runs[1]
    assert len({tuple(r) for r in runs}) == 2


# ----------------------------------------------------------------------------------------------------
# prompt lookup and make_drafter


@pytest.mark.parametrize("ids,cfg,expected", [
    ([1, 2, 3, 4, 1, 2], PromptLookupConfig(), [3, 4, 1, 2]),
    ([1, 2, 5, 1, 2, 6, 1, 2], PromptLookupConfig(), [6, 1, 2]),  # the most recent match wins
    ([9, 1, 2, 3, 8, 1, 2, 3, 5, 2, 3], PromptLookupConfig(gamma=2), [5, 2]),  # recent 2-gram "2 3"
    ([7, 1, 2, 3, 4, 0, 2, 3, 6, 1, 2, 3], PromptLookupConfig(gamma=2), [4, 0]),  # longest suffix "1 2 3" first
    ([1, 2, 3, 4, 5, 3], PromptLookupConfig(), []),  # only a 1-gram matches: below min_ngram
    ([1, 2, 3, 4, 5, 3], PromptLookupConfig(min_ngram=1), [4, 5, 3]),
    ([4, 4, 4, 4], PromptLookupConfig(gamma=8), [4]),  # overlapping match: continuation stops at the end
    ([5], PromptLookupConfig(), []),
])
def test_find_continuation_hand_cases(ids, cfg, expected):
    assert find_continuation(np.array(ids), cfg) == expected


def test_make_drafter_builds_each_builtin(toy_target):
    assert make_drafter(None, toy_target) is None and make_drafter("none", toy_target) is None
    lookup = make_drafter("prompt-lookup", toy_target, gamma=3)
    assert isinstance(lookup, PromptLookupDrafter) and lookup.cfg.gamma == 3 and lookup.vocab_size == VOCAB
    skip = make_drafter("layer-skip:2", toy_target, gamma=5)
    assert isinstance(skip, LayerSkipDrafter) and (skip.cfg.n_layers, skip.cfg.gamma) == (2, 5)
    assert skip.vocab_size == VOCAB


# ----------------------------------------------------------------------------------------------------
# the phases a batched engine composes: new_state / start, draft / verify_inputs / judge / commit


def _dflash(target):
    from labkit.drafters.dflash import DFlashDrafter
    from test_dflash import make_backbone  # the shared tiny DFlash backbone (target layers 1, 2)
    return DFlashDrafter(make_backbone(target, gamma=4))


def _dspark(target):
    from labkit.drafters.dspark import DSparkDrafter
    from test_dspark import make_dspark  # a tiny DSpark with a non-zero Markov head and a confidence head
    return DSparkDrafter(make_dspark(target, gamma=4))


PHASE_DRAFTERS = {**{k: DRAFTERS[k] for k in ("prompt-lookup", "layer-skip-2-stop", "random", "same")},
                  "dflash": _dflash, "dspark": _dspark}


def _by_hand(target, prompt, drafter, max_new, params, seed, own_cache: bool) -> DecodeState:
    """`generate` spelled out with the phases and target.forward. own_cache=False is a serving engine's
    way: the caller keeps the KV cache, runs the prompt forward itself and starts with `start_state`."""
    wants = bool(hidden_layers(drafter))
    if own_cache:
        state = new_state(target, prompt, max_new, params, seed, drafter)
        cache = state.cache
        logits, hidden = target.forward(prompt, cache, logits_to_keep=1, hidden_states=wants)
        start(state, drafter, logits[-1], select_hidden(hidden, drafter))
    else:
        cache = target.new_cache()
        logits, hidden = target.forward(prompt, cache, logits_to_keep=1, hidden_states=wants)
        state = start_state(target, prompt, max_new, params, seed, drafter, logits[-1], select_hidden(hidden, drafter))
        assert state.cache is None and state.request.target_cache is None
    while not state.finished:
        proposal = draft(state, drafter)
        inputs = verify_inputs(state, proposal)
        assert inputs == [state.ids[-1]] + proposal.tokens.tolist()
        logits, hidden = target.forward(inputs, cache, logits_to_keep=len(inputs), hidden_states=wants)
        verdict = judge(state, proposal, logits)
        drop = positions_to_drop(proposal, verdict)
        assert drop == len(proposal) - verdict.n_accepted >= 0
        if drop:
            cache.crop(-drop)
        rnd = commit(state, proposal, verdict, select_hidden(hidden, drafter), drafter, draft_s=0.0, verify_s=0.0)
        assert rnd is state.rounds[-1] and (rnd.proposed, rnd.accepted) == (len(proposal), verdict.n_accepted)
    return state


@pytest.mark.parametrize("drafter_name,own_cache", [(name, True) for name in PHASE_DRAFTERS] +
                         [(name, False) for name in PHASE_DRAFTERS if not name.startswith("layer-skip")])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_phases_composed_by_hand_equal_generate(toy_target, drafter_name, own_cache, temperature):
    """The same seed gives the same tokens and the same trace (drafted, accepted, DSpark's confidence
    logits) whether the round runs as speculative_round or as its phases around the caller's own
    forward: the same random draws in the same order."""
    params = SamplingParams(temperature)
    for seed, prompt in enumerate(PROMPTS[1:]):
        ref = generate(toy_target, prompt, PHASE_DRAFTERS[drafter_name](toy_target), 16, params, seed=seed)
        mine = _by_hand(toy_target, prompt, PHASE_DRAFTERS[drafter_name](toy_target), 16, params, seed, own_cache)
        assert mine.new_ids == ref.token_ids
        trace = lambda rounds: [(r.proposed, r.accepted, r.conf_logits) for r in rounds]  # noqa: E731
        assert trace(mine.rounds) == trace(ref.rounds)


def test_interleaved_requests_share_a_drafter_and_match_separate_runs(toy_target):
    """Two requests advanced round by round in turn through one DFlash drafter give what each gives
    alone: its per-request state lives in request.memo and its draws in the request's generator."""
    drafter, params = _dflash(toy_target), SamplingParams(1.0)
    alone = [generate(toy_target, p, drafter, 16, params, seed=s).token_ids for s, p in enumerate(PROMPTS[1:3])]
    states = [prefill(toy_target, p, 16, params, seed=s, drafter=drafter) for s, p in enumerate(PROMPTS[1:3])]
    while not all(s.finished for s in states):
        for s in states:
            if not s.finished:
                speculative_round(toy_target, s, drafter)
    assert [s.new_ids for s in states] == alone


def test_drafters_see_a_request_view_sharing_the_token_list(toy_target):
    """start / propose / observe get the DraftRequest, not the DecodeState; its ids are the state's list."""
    seen = []

    class Spy(PromptLookupDrafter):
        def propose(self, request, max_tokens):
            seen.append((type(request), request.ids is state.ids, request.target_cache is state.cache))
            return super().propose(request, max_tokens)

    state = prefill(toy_target, PROMPTS[2], 8, GREEDY, drafter=(spy := Spy(VOCAB)))
    while not state.finished:
        speculative_round(toy_target, state, spy)
    assert seen and set(seen) == {(DraftRequest, True, True)}


def test_check_batchable_refuses_layer_skip_with_the_fix(toy_target):
    skip = DRAFTERS["layer-skip-1"](toy_target)
    assert needs_target_cache(skip) and not needs_target_cache(PromptLookupDrafter(VOCAB))
    for call in (lambda: check_batchable(skip),
                 lambda: new_state(toy_target, PROMPTS[1], 8, GREEDY, drafter=skip, own_cache=False)):
        with pytest.raises(LabkitError, match=r"layer-skip-1 drafter drafts from the target's own cache and runs "
                                              r"single-request only; use --drafter dspark\|dflash\|prompt-lookup with serve"):
            call()
    for ok in (None, PromptLookupDrafter(VOCAB), _dflash(toy_target), RandomDrafter(VOCAB, 4)):
        check_batchable(ok)
    engine_state = new_state(toy_target, PROMPTS[1], 8, GREEDY, drafter=PromptLookupDrafter(VOCAB), own_cache=False)
    assert engine_state.cache is None and engine_state.request.target_cache is None
    with pytest.raises(LabkitError, match="own KV cache"):
        speculative_round(toy_target, engine_state, None)


def test_layer_skip_without_the_target_cache_says_so(toy_target):
    request = DraftRequest(ids=[1, 2, 3], params=GREEDY, generator=None)
    with pytest.raises(LabkitError, match="single-request"):
        DRAFTERS["layer-skip-1"](toy_target).propose(request, 3)


def test_judge_refuses_logits_of_the_wrong_length(toy_target):
    state = prefill(toy_target, PROMPTS[1], 8, GREEDY)
    proposal = one_hot_proposal([1, 2], VOCAB)
    with pytest.raises(LabkitError, match="3 verified positions"):
        judge(state, proposal, torch.zeros(2, VOCAB))


def test_tau_has_one_definition():
    rounds = [Round(3, 3, 0.0, 0.0), Round(3, 0, 0.0, 0.0)]
    assert mean_tau(rounds) == 2.5 and mean_tau([]) is None
    assert GenerationResult([1] * 5, "", rounds, 0.0, 0.0).tau == mean_tau(rounds)
