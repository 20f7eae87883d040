"""Batched drafting (`Drafter.propose_many`, the engine's step) equals drafting one request at a time.

For DFlash, DSpark with a Markov head and with an RNN head, the hybrid (which falls back to one
request at a time), prompt lookup and Eagle3 (its chains stepped together over padded caches): requests of different prompt lengths, after rounds that
accepted different numbers of drafts, so that their context caches differ in length. Batched and
per-request drafting from identical states give the same tokens, the same probability rows and
confidences (fp32, to 1e-5), and leave each request's generator at the same point of its stream.
"""

from __future__ import annotations

import pytest
import torch

from labkit.core.sampling import SamplingParams
from labkit.decode.loop import draft_many, prefill, speculative_round
from labkit.drafters.dflash import DFlashDrafter
from labkit.drafters.dspark import DSparkDrafter
from labkit.drafters.eagle3 import Eagle3Drafter
from labkit.drafters.hybrid import make_hybrid
from labkit.drafters.prompt_lookup import PromptLookupDrafter
from test_dflash import make_backbone
from test_dspark import make_dspark
from test_eagle3 import make_model as make_eagle3

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 1, 2], [7], [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]]


@pytest.fixture(scope="module")
def tiny(make_tiny_target):
    return make_tiny_target(vocab_size=16, n_layers=3, hidden=32, init=0.5)


def drafters(target):
    torch.manual_seed(0)
    return {"dflash": DFlashDrafter(make_backbone(target, gamma=4)),
            "dspark-markov": DSparkDrafter(make_dspark(target, gamma=4, head="markov")),
            "dspark-rnn": DSparkDrafter(make_dspark(target, gamma=4, head="rnn")),
            "dflash-fit": DFlashDrafter(make_backbone(target, gamma=4, anchor_predicts=False), fit_block=True),
            "dspark-fit": DSparkDrafter(make_dspark(target, gamma=4, head="markov"), fit_block=True),
            "hybrid": make_hybrid(DSparkDrafter(make_dspark(target, gamma=4))),
            "prompt-lookup": PromptLookupDrafter(target.vocab_size),
            "eagle3": Eagle3Drafter(make_eagle3(target, gamma=4, n_layers=2, layers=(1, 3)))}


def states(target, drafter, params: SamplingParams, rounds: int):
    """One state per prompt, prefilled and advanced `rounds` speculative rounds (request i: seed i)."""
    out = []
    for i, prompt in enumerate(PROMPTS):
        state = prefill(target, prompt, 40, params, seed=i, drafter=drafter)
        for _ in range(rounds + i % 2):  # uneven histories: caches of different lengths
            speculative_round(target, state, drafter)
        out.append(state)
    return out


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("name", ["dflash", "dspark-markov", "dspark-rnn", "hybrid", "prompt-lookup", "eagle3",
                                  "dflash-fit", "dspark-fit"])
def test_batched_drafting_equals_drafting_one_request_at_a_time(tiny, name, temperature):
    """(The -fit drafters cut each block after its cap: the caps below make a group of two rows at one
    block length and single rows at others.)"""
    params = SamplingParams(temperature)
    one, batch = drafters(tiny)[name], drafters(tiny)[name]  # the same weights, counted apart
    caps = [4, 2, 3, 4] if not name.endswith("-fit") else [1, 2, 1, 4]
    solo_states, batch_states = states(tiny, one, params, 2), states(tiny, batch, params, 2)
    solo = [one.propose(s.request, k) for s, k in zip(solo_states, caps)]
    many = batch.propose_many([s.request for s in batch_states], caps)
    if name == "hybrid":
        assert one.counts == batch.counts
        # greedy, the repeating prompt makes a copied part: both paths of the hybrid are used
        assert one.counts["copy_rounds"] > 0 or temperature > 0
    assert len(many) == len(PROMPTS)
    for a, b, sa, sb in zip(solo, many, solo_states, batch_states):
        assert a.tokens.tolist() == b.tokens.tolist()
        assert torch.allclose(a.probs, b.probs, atol=1e-5)
        assert (a.confidences is None) == (b.confidences is None)
        if a.confidences is not None:
            assert torch.allclose(a.conf_logits, b.conf_logits, atol=1e-5)
            assert torch.allclose(a.confidences, b.confidences, atol=1e-5)
        # the same number of draws from each request's own stream
        assert torch.equal(torch.rand(3, generator=sa.generator), torch.rand(3, generator=sb.generator))


def test_draft_many_caps_each_request_as_draft_does(tiny):
    """At most `remaining - 1` drafts (so n accepted + the target's one never overshoot) and at most
    `max_draft`; a request with one token left gets an empty proposal and costs the drafter nothing."""
    drafter = drafters(tiny)["dspark-markov"]
    batch = [prefill(tiny, prompt, n, SamplingParams(), seed=0, drafter=drafter)
             for prompt, n in zip(PROMPTS, [40, 40, 2, 4])]
    assert [s.remaining for s in batch] == [39, 39, 1, 3]
    props = draft_many(batch, drafter, max_draft=3)
    assert [len(p) for p in props] == [3, 3, 0, 2]
    assert draft_many(batch, None) and all(len(p) == 0 for p in draft_many(batch, None))


@pytest.mark.parametrize("name", ["dflash", "dspark-markov", "dspark-rnn", "hybrid", "eagle3"])
def test_batched_observe_leaves_every_context_cache_as_observing_alone_does(tiny, name):
    """After a verification that kept different numbers of drafts per request (0..3), `observe_many`
    leaves each request's projected context keys and values as its own `observe` does (fp32, 1e-5),
    cache lengths included, and the next batched proposals agree token for token."""
    one, batch = drafters(tiny)[name], drafters(tiny)[name]
    solo_states, batch_states = states(tiny, one, SamplingParams(), 1), states(tiny, batch, SamplingParams(), 1)
    g = torch.Generator().manual_seed(0)
    kept = [0, 3, 1, 2]
    hidden = [tuple(torch.randn(4, tiny.hidden_size, generator=g) for _ in one.hidden_layers) for _ in PROMPTS]
    for s, n, h in zip(solo_states, kept, hidden):
        one.observe(s.request, n, h)
    batch.observe_many([s.request for s in batch_states], kept, hidden)
    for a, b in zip(solo_states, batch_states):
        assert a.request.memo.length == b.request.memo.length
        for (ka, va), (kb, vb) in zip(a.request.memo.kv, b.request.memo.kv):
            assert ka.shape == kb.shape and torch.allclose(ka, kb, atol=1e-5) and torch.allclose(va, vb, atol=1e-5)
    solo = one.propose_many([s.request for s in solo_states], [4] * 4)
    many = batch.propose_many([s.request for s in batch_states], [4] * 4)
    assert [p.tokens.tolist() for p in solo] == [p.tokens.tolist() for p in many]


@pytest.mark.parametrize("name", ["dflash-fit", "dspark-fit"])
def test_a_cut_block_runs_only_the_slots_up_to_its_cap(tiny, name):
    """With `fit_block`, a proposal capped at k runs the draft layers over the slots up to the k-th
    draft's (one per block length in a batch), and an uncapped one over the whole block, drafting what
    the drafter without `fit_block` drafts."""
    drafter = drafters(tiny)[name]
    first = drafter.cfg.n_slots - drafter.cfg.gamma
    widths: list[int] = []
    hook = drafter.backbone.layers[0].register_forward_pre_hook(lambda mod, args: widths.append(args[0].shape[1]))
    try:
        batch = states(tiny, drafter, SamplingParams(), 1)
        widths.clear()
        props = drafter.propose_many([s.request for s in batch], [1, 2, 1, 4])
        assert [len(p) for p in props] == [1, 2, 1, 4]
        assert sorted(widths) == [first + 1, first + 2, first + 4]  # the two k=1 rows share one forward
    finally:
        hook.remove()
    whole = type(drafter)(drafter.backbone)  # the same weights, the whole block always
    same = states(tiny, whole, SamplingParams(), 1)
    for a, b in zip(drafter.propose_many([s.request for s in batch], [4] * 4),
                    whole.propose_many([s.request for s in same], [4] * 4)):
        assert a.tokens.tolist() == b.tokens.tolist() and torch.allclose(a.probs, b.probs, atol=1e-6)
