"""Confidence-scheduled single-request decoding (sched:<drafter>): Algorithm 1 at R = 1 on round rates.

The math on hand-made tables; greedy equality and the sampled distribution on tiny random targets,
with a cost table chosen so that some blocks are cut to nothing, some cut short and some verified
whole (each test asserts that the mix really occurred); the spec grammar; one real-target check.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from labkit.decode.loop import generate
from labkit.drafters import BUILTIN, check_spec, make_drafter
from labkit.drafters.base import check_batchable
from labkit.drafters.dspark import DSparkDrafter
from labkit.core.scheduler import RoundRate
from labkit.drafters.scheduled import ScheduledDrafter
from labkit.model.timing import verify_table
from labkit.core.errors import LabkitError
from labkit.core.sampling import SamplingParams
from labkit.core.scheduler import CostTable
from test_dspark import make_dspark

pytestmark = pytest.mark.usefixtures("one_thread")

ALPHA = 0.001


def step_table(jump: float) -> CostTable:
    """T_verify = 1 s for one token and 1 + jump for 2..9: the CPU's GEMV-to-GEMM step, made explicit."""
    sizes = list(range(1, 10))
    return CostTable("test", "tiny", "float32", sizes, [1.0] + [1.0 / (1.0 + jump)] * 8)


def test_round_rate_adds_the_drafting_time_to_every_forward():
    table = step_table(0.5)
    rate = RoundRate(table, draft_s=0.25)
    assert rate.sps(1) == pytest.approx(1 / 1.25)
    assert rate.sps(5) == pytest.approx(1 / 1.75)
    assert RoundRate(table, 0.0).sps(3) == pytest.approx(table.sps(3))
    with pytest.raises(LabkitError, match=">= 0 seconds"):
        RoundRate(table, -1.0)


@pytest.mark.parametrize("conf, draft_s, expected", [
    # slot 1 pays iff (1 + c1) / (d + 1.5) > 1 / (d + 1): c1 > 0.5 / (1 + d)
    ([0.4, 0.9, 0.9, 0.9], 0.0, 0),      # 0.4 < 0.5: a plain step is faster
    ([0.6, 0.9, 0.9, 0.9], 0.0, 4),      # past the jump every further survival is free
    ([0.4, 0.9, 0.9, 0.9], 0.5, 4),      # with d = 0.5 the bar drops to 1/3: drafting time is sunk
    ([0.6, 0.0, 0.9, 0.9], 0.0, 1),      # a_2 = 0 adds nothing: the early break stops at slot 1
])
def test_length_is_algorithm_1_on_round_rates(conf, draft_s, expected):
    drafter = ScheduledDrafter(make_drafter("prompt-lookup", _FakeTarget()), step_table(0.5))
    drafter.draft_s = draft_s
    assert drafter.length(torch.tensor(conf)) == expected


class _FakeTarget:
    vocab_size = 16


@pytest.fixture(scope="module")
def tiny(make_tiny_target):
    return make_tiny_target(vocab_size=16, n_layers=3, hidden=32, init=0.5)


def sched_dspark(target, jump: float, gamma: int = 4, **kw) -> ScheduledDrafter:
    return ScheduledDrafter(DSparkDrafter(make_dspark(target, gamma=gamma, scale=1.0, **kw)), step_table(jump))


def _assert_mixed(counts: dict) -> None:
    """Some blocks cut to nothing, some cut short or skipped, and some verified whole."""
    assert counts["skipped"] > 0, counts
    assert counts["scheduled"] > counts["cut"], counts


@pytest.mark.parametrize("head", ["markov", "rnn"])
def test_greedy_scheduled_equals_target_greedy(tiny, head):
    """fp32 greedy output with every block cut by Algorithm 1 is the target's own greedy output."""
    seen = Counter()
    for jump in (0.2, 0.5, 0.8):
        drafter = sched_dspark(tiny, jump, head=head)
        for prompt in ([3, 9, 4, 1, 3, 9], [5, 5, 9, 0, 11, 4]):
            assert generate(tiny, prompt, drafter, 40).token_ids == generate(tiny, prompt, None, 40).token_ids
        seen.update(drafter.counts)
    _assert_mixed(seen)


def test_proposals_are_prefixes_with_their_own_rows(tiny):
    """What the wrapper returns is the wrapped drafter's block cut to a prefix, rows untouched."""
    from labkit.decode.loop import prefill
    inner = DSparkDrafter(make_dspark(tiny, gamma=4, scale=1.0))
    wrapped = ScheduledDrafter(inner, step_table(0.5))
    for seed in range(20):
        a = prefill(tiny, [1, 2, 3, 4], 12, SamplingParams(1.0), seed=seed, drafter=inner).request
        b = prefill(tiny, [1, 2, 3, 4], 12, SamplingParams(1.0), seed=seed, drafter=inner).request
        full, cut = inner.propose(a, 8), wrapped.propose(b, 8)
        k = len(cut)
        assert k == wrapped.length(full.confidences)
        assert torch.equal(cut.tokens, full.tokens[:k]) and torch.equal(cut.probs, full.probs[:k])
        assert torch.equal(cut.confidences, full.confidences[:k])


def test_proposals_without_confidences_pass_unchanged(tiny):
    drafter = ScheduledDrafter(make_drafter("prompt-lookup", tiny), step_table(10.0))
    prompt = [3, 9, 4, 1, 3, 9, 4, 1, 3, 9]
    result = generate(tiny, prompt, drafter, 20)
    assert result.token_ids == generate(tiny, prompt, None, 20).token_ids
    assert drafter.counts["scheduled"] == 0 and sum(r.proposed for r in result.rounds) > 0


#: the sampled test: sequences drawn, and the fewest degrees of freedom left after pooling cells of
#: expected count < 5 (fewer and the test could hardly reject anything); the significance level is ALPHA
SAMPLED_N, SAMPLED_MIN_DF = 1500, 10


@pytest.mark.parametrize("verifier", ["exact", "wrong"])
def test_sampled_scheduled_sequences_follow_target(make_tiny_target, chi2_gof, verifier, monkeypatch):
    """SAMPLED_N sequences of 3 new tokens at temperature 1 (seeds 0..SAMPLED_N - 1) on the 8-token tiny
    target, DSpark gamma 3 behind the scheduler; chi-square against the exact target distribution over
    the 512 sequences, alpha ALPHA, at least SAMPLED_MIN_DF degrees of freedom. Blocks must be cut to
    nothing, cut short and verified whole, and the verified drafts both accepted and rejected. The same
    test rejects a deliberately wrong verifier (`wrong_judge`: every draft accepted)."""
    from test_lossless_tiny_model import exact_sequence_probs
    target = make_tiny_target(vocab_size=8, n_layers=2, tied=True, init=0.5)
    prompt = [1, 5, 2, 1, 5, 2, 1, 5]
    drafter = ScheduledDrafter(DSparkDrafter(_dspark8(target)), step_table(0.5))
    exact = exact_sequence_probs(target, prompt, 3, SamplingParams(1.0))
    if verifier == "wrong":
        import labkit.decode.loop as loop
        from test_serving import wrong_judge
        monkeypatch.setattr(loop, "judge", wrong_judge)
    counts, accepted, proposed = Counter(), 0, 0
    for seed in range(SAMPLED_N):
        result = generate(target, prompt, drafter, max_new_tokens=3, params=SamplingParams(1.0), seed=seed)
        counts[tuple(result.token_ids)] += 1
        accepted += sum(r.accepted for r in result.rounds)
        proposed += sum(r.proposed for r in result.rounds)
    seqs = list(exact)
    fit = chi2_gof([counts[s] for s in seqs], [exact[s] for s in seqs], min_df=SAMPLED_MIN_DF)
    if verifier == "wrong":
        assert fit.rejects(ALPHA), f"the wrong verifier passed: p = {fit.p_value:.2e} on {fit.df} df"
        return
    assert 0.05 < accepted / proposed < 0.95, accepted / proposed
    _assert_mixed(drafter.counts)
    assert fit.impossible == 0 and fit.df >= SAMPLED_MIN_DF
    assert not fit.rejects(ALPHA), f"chi-square {fit.statistic:.1f} on {fit.df} df, p = {fit.p_value:.2e}"


def _dspark8(target):
    """DSpark gamma 3 reading the 2-layer target's layer 1, random non-zero heads."""
    from labkit.drafters.dspark import DSparkConfig
    from labkit.pipeline.train import new_backbone
    torch.manual_seed(0)
    cfg = DSparkConfig.for_target(target, gamma=3, target_layers=(1,), rank=4, head="markov")
    model = new_backbone(target, cfg, init_from_target=True)
    with torch.no_grad():
        model.seq_head.w2.weight.normal_(0, 1.0)
    return model.eval()


def test_spec_grammar_and_the_engine_refusal(tiny, tmp_path):
    from labkit.drafters.checkpoint import save_drafter
    assert "sched" in BUILTIN
    save_drafter(make_dspark(tiny, gamma=4), tmp_path / "ck")
    for ok in ("sched:dspark", "sched:hybrid:dspark", "sched:prompt-lookup", f"sched:{tmp_path / 'ck'}"):
        check_spec(ok)
    refused = {"sched": "sched:dspark", "sched:": "sched:dspark", "sched:none": "around a real drafter",
               "sched:sched:dspark": "sched once", "sched:nothing": "Unknown drafter"}
    for spec, message in refused.items():
        with pytest.raises(LabkitError, match=message) as err:
            check_spec(spec)
        assert "\n" not in str(err.value)
    drafter = make_drafter(f"sched:hybrid:{tmp_path / 'ck'}", tiny)
    assert isinstance(drafter, ScheduledDrafter) and drafter.name == "sched:hybrid:dspark"
    assert drafter.gamma == 4 and drafter.table.batch_sizes == [1, 2, 3, 4, 5]
    assert drafter.hidden_layers == drafter.inner.hidden_layers
    with pytest.raises(LabkitError, match="drop the sched: prefix"):
        check_batchable(drafter)
    with pytest.raises(LabkitError, match="already scheduled"):
        ScheduledDrafter(drafter, drafter.table)


def test_verify_table_measures_every_width(tiny):
    table = verify_table(tiny, 5, context_len=16, repeats=2)
    assert table.batch_sizes == [1, 2, 3, 4, 5] and all(s > 0 for s in table.raw_sps)
    with pytest.raises(LabkitError, match="max_tokens >= 1"):
        verify_table(tiny, 0)


@pytest.mark.slow
def test_real_sched_hybrid_dspark_greedy_equals_plain(real_target):
    """The shipped DSpark behind the hybrid and the scheduler, fp32 greedy, 2 real prompts x 48 tokens."""
    drafter = make_drafter("sched:hybrid:dspark", real_target)
    prompts = ["Explain in two sentences why the sky is blue.",
               "Write a Python function that returns the sum of a list of numbers, then call it on [1, 2, 3]."]
    for text in prompts:
        ids = real_target.encode_prompt(text)
        assert generate(real_target, ids, drafter, 48).token_ids == generate(real_target, ids, None, 48).token_ids
    assert drafter.counts["scheduled"] > 0, drafter.counts
