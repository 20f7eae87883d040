"""Intervals and verdicts (labkit/core/evidence.py) on hand-made samples: what a sentence may conclude."""

from __future__ import annotations

import pytest
import torch

from labkit.core.errors import LabkitError
from labkit.core.evidence import Interval, bootstrap, judge, mean_interval, ratio_interval, verdict
from labkit.core.trace import Round, position_acceptance, position_interval, tau_interval, tau_ratio_interval


def test_the_mean_interval_covers_the_true_mean_about_as_often_as_it_says():
    gen = torch.Generator().manual_seed(0)
    hits = 0
    for trial in range(200):
        x = torch.randn(40, generator=gen, dtype=torch.float64) + 3.0
        iv = mean_interval(x, resamples=300, seed=trial)
        hits += iv.low <= 3.0 <= iv.high
    assert 0.88 <= hits / 200 <= 0.99  # nominal 0.95; the percentile bootstrap runs a little narrow at n = 40


def test_more_samples_narrow_the_interval_and_a_seed_fixes_it():
    gen = torch.Generator().manual_seed(1)
    few, many = torch.randn(10, generator=gen), torch.randn(1000, generator=gen)
    w = lambda iv: iv.high - iv.low  # noqa: E731
    assert w(mean_interval(many)) < w(mean_interval(few)) / 4
    assert mean_interval(few, seed=3) == mean_interval(few, seed=3)
    assert mean_interval([2.0]) == Interval(2.0, 2.0, 2.0, 1)


def test_a_paired_ratio_removes_what_both_sides_share():
    # two methods timed on the same 20 prompts: prompt length moves both, the method adds 10% to one
    gen = torch.Generator().manual_seed(2)
    base = torch.rand(20, generator=gen, dtype=torch.float64) * 10 + 1
    a, b = base * 1.1, base
    paired, unpaired = ratio_interval(a, b, paired=True), ratio_interval(a, b, paired=False)
    assert paired.value == pytest.approx(1.1) and paired.low == pytest.approx(1.1) and paired.high == pytest.approx(1.1)
    assert judge(paired) == "above" and judge(unpaired) == "within noise"
    with pytest.raises(LabkitError, match="same count"):
        ratio_interval([1.0, 2.0], [1.0], paired=True)


def test_verdicts_for_ratios_and_differences():
    assert verdict(1.2, 1.1, 1.3) == "above" and verdict(0.8, 0.7, 0.9) == "below"
    assert verdict(1.05, 0.95, 1.2) == "within noise" and verdict(1.0, 0.995, 1.004) == "tied (within 1%)"
    assert verdict(1.5, None, None) == "spread unknown"
    assert verdict(0.01, 0.005, 0.02, tie=0.002, null=0.0) == "above"
    assert verdict(0.0005, -0.001, 0.0015, tie=0.002, null=0.0) == "tied (within 0.002)"
    assert verdict(-0.001, -0.02, 0.01, tie=0.002, null=0.0) == "within noise"


def test_bootstrap_refuses_what_it_cannot_measure():
    with pytest.raises(LabkitError, match="at least one measured unit"):
        bootstrap(lambda i: 0.0, 0)
    with pytest.raises(LabkitError, match="0 < level < 1"):
        mean_interval([1.0, 2.0], level=1.5)
    with pytest.raises(LabkitError, match="low <= high"):
        Interval(1.0, 2.0, 1.5, 3)
    assert Interval(0.5, 0.25, 0.75, 4).text(".2f") == "0.50 [0.25, 0.75]"
    assert Interval(0.5, 0.25, 0.75, 4).text(".2f", signed=True) == "+0.50 [+0.25, +0.75]"


def test_tau_ratio_interval_pools_rounds_by_prompt_and_pairs_prompts():
    # drafter a emits 3 tokens a round on every prompt, b 2: ratio 1.5 whatever the prompts' round counts
    a, b = [(30, 10), (6, 2), (90, 30)], [(20, 10), (4, 2), (60, 30)]
    iv = tau_ratio_interval(a, b)
    assert (iv.value, iv.low, iv.high, iv.n) == (pytest.approx(1.5), pytest.approx(1.5), pytest.approx(1.5), 3)
    mixed = tau_ratio_interval([(30, 10), (4, 2), (90, 30)], [(20, 10), (6, 2), (60, 30)])
    assert mixed.low < mixed.value < mixed.high
    assert mixed.value == pytest.approx((124 / 42) / (86 / 42))  # pooled: sum emitted / sum rounds, as mean_tau
    with pytest.raises(LabkitError, match="at least one round"):
        tau_ratio_interval([(3, 1), (0, 0)], [(2, 1), (2, 1)])


def test_describe_ratio_says_what_the_interval_supports():
    from labkit.core.evidence import describe_ratio
    up = describe_ratio("tau", "DSpark", "DFlash", Interval(1.2, 1.1, 1.3, 24), "prompts")
    assert up == "DSpark's tau is 1.20x DFlash's [1.10-1.30, 95% interval over 24 prompts]: higher, beyond the noise of this run."
    assert "lower, beyond" in describe_ratio("tau", "a", "b", Interval(0.8, 0.7, 0.9, 5), "prompts")
    noise = describe_ratio("tau", "a", "b", Interval(1.08, 0.98, 1.19, 3), "prompts")
    assert "within noise" in noise and "higher" not in noise
    assert "the same within 1%" in describe_ratio("speed", "a", "b", Interval(1.0, 0.995, 1.004, 9), "repeats")


def test_tau_interval_pools_like_mean_tau():
    iv = tau_interval([(30, 10), (4, 2), (90, 30)])
    assert iv.value == pytest.approx(124 / 42) and iv.low <= iv.value <= iv.high and iv.n == 3
    assert tau_interval([(6, 3)]) == Interval(2.0, 2.0, 2.0, 1)
    with pytest.raises(LabkitError, match="rounds on every prompt"):
        tau_interval([(3, 0)])


def _rounds(pairs):
    return [Round(proposed=p, accepted=a, draft_s=0.0, verify_s=None) for p, a in pairs]


def test_position_interval_pools_prompts_like_position_acceptance_and_skips_prompts_that_never_reached():
    a = _rounds([(4, 0), (4, 2), (4, 4), (0, 0)])  # position 1 reached 3 times, accepted twice
    b = _rounds([(2, 1), (2, 0)])  # reached twice, accepted once
    never = _rounds([(0, 0), (0, 0)])  # proposed nothing (a copy drafter with no match)
    iv = position_interval([a, b, never], min_rounds=1)
    assert iv.value == pytest.approx(position_acceptance(a + b + never)[0]) == pytest.approx(3 / 5)
    assert iv.n == 2 and iv.low <= iv.value <= iv.high
    # position 2: a reached it in (4, 2) and (4, 4), both accepted; b in (2, 1), rejected
    second = position_interval([a, b, never], j=2, min_rounds=1)
    assert second.value == pytest.approx(2 / 3) and second.n == 2
    assert position_interval([never], min_rounds=1) is None
    assert position_interval([a], j=5, min_rounds=1) is None
    assert position_interval([a, b]) is None  # 5 rounds reached position 1: fewer than MIN_ROUNDS, no rate
    assert position_interval([a, b] * 2).value == pytest.approx(3 / 5)  # 10 rounds: enough
    with pytest.raises(LabkitError, match="count from 1"):
        position_interval([a], j=0)
