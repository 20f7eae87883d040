"""The hardware-aware prefix scheduler (labkit.core.scheduler) on hand-made confidences and cost tables.

Paper: Sec. 3.2.2 / Algorithm 1 (greedy admission with the early break), Sec. 5.2 (the production
variant), Appendix A (the counterexample). No model is loaded here; no assertion reads a clock.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labkit.core.errors import LabkitError
from labkit.core.scheduler import (
    POLICIES,
    Algorithm1,
    AsyncTopK,
    CostTable,
    Retrospective,
    ScheduleInput,
    admission_path,
    appendix_a_arithmetic,
    appendix_a_simulation,
    appendix_a_table,
    capacity_from_old,
    expected_throughput,
    load_cost_tables,
    make_policy,
)
from labkit.model.timing import profile_sps

COST_AWARE = ("fixed", "algorithm1", "algorithm1-layout", "algorithm1-column", "retrospective", "async-topk")  # verify-all under a flat table
SORT_BASED = ("algorithm1", "retrospective", "async-topk")  # admit a leading run of the global sort


def f64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def brute_theta(conf: list[list[float]], lengths: tuple[int, ...], sps) -> float:
    """theta = (R + sum of admitted survivals) * SPS(R + sum l), computed by hand, not by the module."""
    tau = float(len(conf))
    for row, l in zip(conf, lengths):
        a = 1.0
        for c in row[:l]:
            a *= c
            tau += a
    return tau * sps(len(conf) + sum(lengths))


class StepTime:
    """SPS(B) = 1 / T(B) with T(B) = t0 + t1 * max(0, B - b0) + t2 * max(0, B - b0)^2.

    T is convex and non-decreasing in B: flat while the device is not saturated (B <= b0), then
    growing at a non-decreasing rate. Records every B it is asked about.
    """

    def __init__(self, t0: float, t1: float, t2: float, b0: float):
        self.t0, self.t1, self.t2, self.b0 = t0, t1, t2, b0
        self.asked: list[float] = []

    def time(self, b: float) -> float:
        x = max(0.0, b - self.b0)
        return self.t0 + self.t1 * x + self.t2 * x * x

    def sps(self, b: float) -> float:
        self.asked.append(b)
        return 1.0 / self.time(b)


class Recording:
    """Any table, recording the batch sizes a policy asks SPS for."""

    def __init__(self, table):
        self.table, self.asked = table, []

    def sps(self, b):
        self.asked.append(b)
        return self.table.sps(b)


probability = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))


@st.composite
def small_problems(draw):
    n_req = draw(st.integers(1, 3))
    gamma = draw(st.integers(1, 3))
    conf = [[draw(probability) for _ in range(gamma)] for _ in range(n_req)]
    max_lengths = [draw(st.integers(0, gamma)) for _ in range(n_req)]
    curve = StepTime(draw(st.floats(0.2, 2.0)), draw(st.floats(0.0, 1.0)), draw(st.floats(0.0, 0.3)),
                     draw(st.floats(0.0, 12.0)))
    return conf, max_lengths, curve, draw(st.booleans())


# ---------------------------------------------------------------------------------------------------
# Algorithm 1


@settings(max_examples=150, deadline=None)
@given(small_problems())
def test_algorithm1_equals_the_exhaustive_optimum_on_convex_step_time_curves(problem):
    """Algorithm 1's theta equals the maximum over ALL prefix-length vectors (R <= 3, gamma <= 3).

    Family tested: SPS(B) = 1 / T(B), T(B) = t0 + t1 * max(0, B - b0) + t2 * max(0, B - b0)^2, with
    t0 > 0, t1, t2 >= 0 (step time flat until the device saturates at b0, then convex), either as an
    exact function or as a CostTable profiled at every B in 1..12. For any convex non-decreasing T and
    the packed count, theta along the sorted path is unimodal: the gain test a_{k+1} * T(B_k) >
    tau_k * (T(B_{k+1}) - T(B_k)) has a left side minus right side that never increases along the
    path. The path's best point is also the exhaustive optimum (for each number of admitted slots it
    holds the largest survivals), so stopping at the first drop is optimal: the paper's claim for
    smooth, decaying SPS. Compared by value (ties may pick different, equally good lengths).
    """
    conf, max_lengths, curve, as_table = problem
    table = CostTable("test", "curve", "fp64", list(range(1, 13)), [curve.sps(b) for b in range(1, 13)]) \
        if as_table else curve
    inp = ScheduleInput(f64(conf), table, max_lengths)
    best = max(brute_theta(conf, lengths, table.sps)
               for lengths in itertools.product(*(range(m + 1) for m in max_lengths)))
    for policy in (Algorithm1(), Retrospective()):
        lengths = policy(inp)
        assert all(0 <= l <= m for l, m in zip(lengths, max_lengths))
        assert brute_theta(conf, tuple(lengths), table.sps) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_algorithm1_stops_at_the_first_drop_and_the_retrospective_search_goes_on():
    """Appendix A's curve: theta 1.0 -> 0.9 (a drop) -> 1.134. Algorithm 1 stops at the drop and never
    asks SPS about B = 3; the retrospective search goes on and takes the later, higher maximum."""
    conf = f64([[0.8, 0.9]])
    algo = Recording(appendix_a_table())
    assert Algorithm1()(ScheduleInput(conf, algo)) == [0]
    assert algo.asked == [1, 2]
    retro = Recording(appendix_a_table())
    assert Retrospective()(ScheduleInput(conf, retro)) == [2]
    assert retro.asked == [1, 2, 3]
    # Non-anticipating: no confidence past the drop changes Algorithm 1's answer.
    for c2 in (0.0, 0.3, 0.9, 1.0):
        assert Algorithm1()(ScheduleInput(f64([[0.8, c2]]), appendix_a_table())) == [0]


def test_algorithm1_never_asks_past_the_first_drop_in_a_batch():
    """Three requests, a cliff at B = 6 and flat after it: the break comes at the cliff and no B beyond
    it is queried, although verifying everything would give a higher theta (8.92 * 0.7 > 4.71)."""
    table = CostTable("jagged", "m", "fp32", [3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
                      [1.0, 1.0, 1.0, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7])
    conf = f64([[0.9, 0.9, 0.9], [0.8, 0.8, 0.8], [0.7, 0.7, 0.7]])
    rec = Recording(table)
    lengths = Algorithm1()(ScheduleInput(conf, rec))
    assert lengths == [2, 0, 0] and rec.asked == [3, 4, 5, 6]  # theta 3, 3.9, 4.71, then 5.51 * 0.7
    retro = Retrospective()(ScheduleInput(conf, table))
    assert sum(retro) == 9  # past the cliff SPS is flat again, so the global search verifies all
    assert expected_throughput(ScheduleInput(conf, table), retro) > \
        expected_throughput(ScheduleInput(conf, table), lengths)


def test_all_zeros_when_verification_does_not_pay():
    """SPS halving with every extra token: verifying anything lowers theta, so nothing is verified."""
    sizes = list(range(1, 40))
    steep = CostTable("steep", "m", "fp32", sizes, [0.5 ** (b - 1) for b in sizes])
    conf = torch.full((4, 5), 0.99, dtype=torch.float64)
    for name in ("algorithm1", "retrospective", "async-topk"):
        assert make_policy(name)(ScheduleInput(conf, steep, old_conf=conf)) == [0, 0, 0, 0]
    assert Algorithm1()(ScheduleInput(f64([[1.0, 1.0]]), steep)) == [0]


def test_ties_are_broken_by_position_then_request():
    path = admission_path(ScheduleInput(torch.full((2, 2), 0.5, dtype=torch.float64), CostTable.flat()))
    assert list(zip(path.requests, path.positions)) == [(0, 1), (1, 1), (0, 2), (1, 2)]
    assert path.survival == [0.5, 0.5, 0.25, 0.25]


def test_a_padding_engine_passes_its_own_token_count():
    """With B = R * (1 + max l) a request's second slot costs a whole column of the batch."""
    counted = []

    def padded(lengths):
        counted.append(list(lengths))
        return len(lengths) * (1 + max(lengths))

    table = CostTable("pad", "m", "fp32", [2, 4, 6], [1.0, 1.0, 0.4])
    conf = f64([[0.9, 0.9], [0.5, 0.1]])  # path: (0, 1) 0.9, (0, 2) 0.81, (1, 1) 0.5, (1, 2) 0.05
    # packed: B 2, 3, 4 at SPS 1 (theta 2, 2.9, 3.71), then B 5 at SPS 0.7: 4.21 * 0.7 < 3.71
    assert Algorithm1()(ScheduleInput(conf, table)) == [2, 0]
    # padded: B 2, 4 (theta 2, 2.9), then (0, 2) makes B = 6 at SPS 0.4: 3.71 * 0.4 < 2.9
    assert Algorithm1()(ScheduleInput(conf, table, batch_tokens=padded)) == [1, 0]
    assert counted == [[0, 0], [1, 0], [2, 0]]


# ---------------------------------------------------------------------------------------------------
# Every policy


@st.composite
def any_problems(draw):
    n_req = draw(st.integers(0, 6))
    gamma = draw(st.integers(1, 5))
    max_lengths = [draw(st.integers(0, gamma)) for _ in range(n_req)]
    conf = torch.full((n_req, gamma), math.nan, dtype=torch.float64)  # padding past max_lengths: ignored
    for r, m in enumerate(max_lengths):
        for j in range(m):
            conf[r, j] = draw(probability)
    sizes = sorted(draw(st.sets(st.integers(1, 40), min_size=1, max_size=6)))
    table = CostTable("random", "m", "fp32", sizes, [draw(st.floats(0.01, 10.0)) for _ in sizes])
    old_conf = torch.tensor([[draw(probability) for _ in range(gamma)] for _ in range(n_req)],
                            dtype=torch.float64).view(n_req, gamma)
    old_lengths = [draw(st.one_of(st.none(), st.integers(0, gamma))) for _ in range(n_req)]
    return ScheduleInput(conf, table, max_lengths, old_conf=old_conf, old_max_lengths=old_lengths)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_problems())
def test_every_policy_admits_a_prefix_of_each_request(inp):
    a = [[math.prod(inp.conf[r, :j + 1].tolist()) for j in range(m)] for r, m in enumerate(inp.max_lengths)]
    path = admission_path(inp)
    for r in range(inp.n_requests):  # the global sort lists each request's slots in order 1, 2, ...
        assert [j for rr, j in zip(path.requests, path.positions) if rr == r] == \
            list(range(1, len([x for x in a[r] if x > 0]) + 1))
    for name in POLICIES:
        lengths = make_policy(name)(inp)
        assert len(lengths) == inp.n_requests
        assert all(isinstance(l, int) and 0 <= l <= m for l, m in zip(lengths, inp.max_lengths)), name
        if name in SORT_BASED:
            admitted = {(r, j) for r, l in enumerate(lengths) for j in range(1, l + 1)}
            assert all(a[r][j - 1] > 0 for r, j in admitted), name
            assert admitted == set(list(zip(path.requests, path.positions))[:len(admitted)]), name
    # The search without the break runs vectorised on a CostTable; the plain loop gives the same lengths.
    looped = ScheduleInput(inp.conf, Recording(inp.table), inp.max_lengths)
    assert Retrospective()(looped) == Retrospective()(inp)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.data())
def test_a_flat_cost_table_verifies_everything(n_req, gamma, data):
    """SGLang's unprofiled table: SPS the same at every B, so every slot with survival > 0 pays.
    (mtp1 and threshold ignore the table.)"""
    conf = f64([[data.draw(st.floats(0.05, 1.0)) for _ in range(gamma)] for _ in range(n_req)])
    max_lengths = [data.draw(st.integers(0, gamma)) for _ in range(n_req)]
    old = f64([[data.draw(st.floats(0.05, 1.0)) for _ in range(gamma)] for _ in range(n_req)])
    padded = lambda l: len(l) * (1 + max(l))  # noqa: E731
    for kwargs in ({}, {"old_conf": old, "old_max_lengths": max_lengths}, {"batch_tokens": padded}):
        inp = ScheduleInput(conf, CostTable.flat(2.5), max_lengths, **kwargs)
        for name in COST_AWARE:
            assert make_policy(name)(inp) == max_lengths, (name, kwargs)


def test_fixed_mtp1_threshold():
    conf = f64([[0.9, 0.8, 0.5, 0.9], [0.3, 0.9, 0.9, 0.9], [0.9, 0.9, 0.9, 0.9]])
    inp = ScheduleInput(conf, CostTable.flat(), [4, 4, 0])
    assert make_policy("fixed")(inp) == [4, 4, 0]
    assert make_policy("fixed", cap=2)(inp) == [2, 2, 0]
    assert make_policy("mtp1")(inp) == [1, 1, 0]
    # survivals row 0: 0.9, 0.72, 0.36, 0.324; row 1: 0.3, ...
    assert make_policy("threshold", t=0.5)(inp) == [2, 0, 0]
    assert make_policy("threshold", t=0.3)(inp) == [4, 1, 0]
    assert set(POLICIES) == {"fixed", "mtp1", "threshold", "algorithm1", "algorithm1-layout", "algorithm1-column",
                             "retrospective", "async-topk"}
    assert all(make_policy(name).name == name for name in POLICIES)


# ---------------------------------------------------------------------------------------------------
# The production variant (Sec. 5.2)


def knee_table() -> CostTable:
    sizes = list(range(1, 41))
    return CostTable("knee", "m", "fp32", sizes, [1.0 / (1.0 + 0.15 * max(0, b - 6)) for b in sizes])


def test_the_production_variant_takes_its_capacity_from_two_steps_before():
    """K comes from the old confidences only; the current ones only decide which K slots."""
    gen = torch.Generator().manual_seed(0)
    conf = 0.2 + 0.8 * torch.rand(4, 4, generator=gen, dtype=torch.float64)
    low, high = torch.full((4, 4), 0.3, dtype=torch.float64), torch.full((4, 4), 0.95, dtype=torch.float64)
    policy = AsyncTopK()

    def run(current, old):
        inp = ScheduleInput(current, knee_table(), old_conf=old)
        return policy(inp), capacity_from_old(inp)

    lengths_low, k_low = run(conf, low)
    lengths_high, k_high = run(conf, high)
    assert 0 < k_low < k_high < 16
    assert sum(lengths_low) == k_low and sum(lengths_high) == k_high
    # K is exactly what the retrospective search picks on the old confidences alone.
    assert k_high == sum(Retrospective()(ScheduleInput(high, knee_table())))
    # Change the current confidences only: the same number of slots, other slots.
    flipped = conf.flip(0)  # the requests' confidences swapped around
    lengths_flipped, k_flipped = run(flipped, high)
    assert k_flipped == k_high and lengths_flipped == lengths_high[::-1] != lengths_high
    other = 0.2 + 0.8 * torch.rand(4, 4, generator=gen, dtype=torch.float64)
    lengths_other, k_other = run(other, high)
    assert k_other == k_high and sum(lengths_other) == k_high and lengths_other != lengths_high
    # And the K slots are the top K by current survival.
    path = admission_path(ScheduleInput(flipped, knee_table()))
    top = list(zip(path.requests, path.positions))[:k_high]
    assert {(r, j) for r, l in enumerate(lengths_flipped) for j in range(1, l + 1)} == set(top)


def test_a_request_new_since_two_steps_before_counts_as_certain():
    conf = torch.full((3, 4), 0.5, dtype=torch.float64)
    old = torch.full((3, 4), 0.3, dtype=torch.float64)
    with_new = ScheduleInput(conf, knee_table(), old_conf=old, old_max_lengths=[4, None, 4])
    as_ones = old.clone()
    as_ones[1] = 1.0
    assert capacity_from_old(with_new) == sum(Retrospective()(ScheduleInput(as_ones, knee_table())))
    assert capacity_from_old(with_new) > capacity_from_old(ScheduleInput(conf, knee_table(), old_conf=old))
    # No history at all: every request is new.
    assert capacity_from_old(ScheduleInput(conf, knee_table())) == \
        sum(Retrospective()(ScheduleInput(torch.ones(3, 4, dtype=torch.float64), knee_table())))


# ---------------------------------------------------------------------------------------------------
# Appendix A


def test_appendix_a_arithmetic():
    out = appendix_a_arithmetic()
    assert out.a1 == pytest.approx(0.8)
    assert (out.theta_0, out.theta_1) == (pytest.approx(1.0), pytest.approx(0.9))
    assert out.theta_2 == {"A": pytest.approx(1.134), "B": pytest.approx(0.81)}
    assert out.lengths == {"algorithm1": {"A": 0, "B": 0}, "retrospective": {"A": 2, "B": 0}}
    assert out.first_token_probs["algorithm1"] == pytest.approx((0.7, 0.3))
    assert out.first_token_probs["retrospective"] == pytest.approx((0.85, 0.15))


def test_appendix_a_retrospective_search_is_biased_and_algorithm1_is_not(chi2_gof):
    """20,000 rounds per policy, seed 0, alpha = 0.01, verified with labkit.core.sampling.verify_chain.

    Algorithm 1's first tokens pass against the target (0.7, 0.3); the retrospective search's fail
    against it and pass against the biased (0.85, 0.15) that Appendix A derives.
    """
    alpha = 0.01
    algo = appendix_a_simulation("algorithm1", draws=20_000, seed=0)
    retro = appendix_a_simulation("retrospective", draws=20_000, seed=0)
    assert sum(algo) == sum(retro) == 20_000
    assert not chi2_gof(algo, [0.7, 0.3]).rejects(alpha)
    assert chi2_gof(retro, [0.7, 0.3]).rejects(alpha)
    assert not chi2_gof(retro, [0.85, 0.15]).rejects(alpha)


# ---------------------------------------------------------------------------------------------------
# Cost tables


def test_the_fit_keeps_the_raw_curve_and_pools_a_dip():
    """The default fit is the isotonic regression of the medians (tests/test_cost_fit.py tests it);
    the raw medians are kept beside it."""
    raw = [10.0, 9.0, 2.0, 8.0, 7.0]  # one bad sample at B = 3
    table = CostTable("d", "m", "fp32", [1, 2, 3, 4, 5], raw)
    assert table.raw_sps == raw
    assert table.smoothed_sps == pytest.approx([10.0, 9.0, 17 / 3, 17 / 3, 17 / 3])  # pooled, not lifted
    assert table.pooled == [[3, 4, 5]]
    assert CostTable("d", "m", "fp32", [1, 2, 3], [5.0, 4.0, 3.0]).smoothed_sps == [5.0, 4.0, 3.0]  # unchanged


def test_one_slow_sample_at_small_b_does_not_flatten_the_curve():
    """A slowed B = 1 is pooled with the faster measurements after it (to their weighted mean), instead
    of capping every larger B (which would make verification look free)."""
    raw = [0.35, 6.0, 5.5, 4.0, 2.0, 1.0]
    table = CostTable("d", "m", "fp32", [1, 2, 3, 4, 5, 6], raw, counts=[1, 4, 1, 1, 1, 1])
    assert table.smoothed_sps[:3] == pytest.approx([(0.35 + 4 * 6.0 + 5.5) / 6] * 3)  # B = 3 joins the pool
    assert table.smoothed_sps[3:] == raw[3:] and table.pooled == [[1, 2, 3]]
    assert table.smoothed_sps[-1] < table.smoothed_sps[1] / 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.01, 100.0), min_size=1, max_size=8), st.booleans())
def test_sps_never_increases_with_b(raw, weighted):
    sizes = [2 ** i for i in range(len(raw))]
    table = CostTable("d", "m", "fp32", sizes, raw, counts=list(range(1, len(raw) + 1)) if weighted else None)
    grid = [0.5 + 0.25 * i for i in range(4 * 3 * sizes[-1])]
    values = [table.sps(b) for b in grid]
    assert all(v1 <= v0 for v0, v1 in zip(values, values[1:]))
    assert all(table.sps(b) == s for b, s in zip(sizes, table.smoothed_sps))
    assert max(table.smoothed_sps) <= max(raw) and min(table.smoothed_sps) >= min(raw)


def test_sps_interpolates_clamps_and_extrapolates_proportionally():
    table = CostTable("d", "m", "fp32", [4, 8, 16], [100.0, 80.0, 40.0])
    assert table.sps(6) == pytest.approx(90.0)
    assert table.sps(12) == pytest.approx(60.0)
    assert table.sps(1) == 100.0  # clamped below the first size
    assert table.sps(32) == pytest.approx(20.0)  # time per token constant past the profile
    flat = CostTable.flat(3.0)
    assert {flat.sps(b) for b in (1, 7, 10_000)} == {3.0}


def test_cost_tables_round_trip_through_one_json_file_keyed_by_device_model_dtype(tmp_path):
    path = tmp_path / "costs" / "sps.json"
    assert CostTable.load(path, "cpu", "m", "fp32") is None  # no file yet
    a = CostTable("cpu", "m", "fp32", [1, 2, 4], [50.0, 49.0, 30.0])
    b = CostTable.from_samples("cuda:H200", "m", "bf16", {1: [900.0, 910.0, 880.0], 64: [850.0], 256: [700.0, 690.0]})
    c = CostTable("cpu", "m", "bf16", [1, 2], [20.0, 21.0])  # raw rises: the fit does not
    for t in (a, b, c):
        t.save(path)
    a2 = CostTable("cpu", "m", "fp32", [1, 2, 4, 8], [51.0, 48.0, 31.0, 15.0])
    a2.save(path)  # replaces a, keeps b and c
    assert len(json.loads(path.read_text())["tables"]) == 3
    for t in (a2, b, c):
        loaded = CostTable.load(path, *t.key)
        assert loaded.to_dict() == t.to_dict()
        assert loaded.raw_sps == t.raw_sps and loaded.smoothed_sps == t.smoothed_sps
    assert loaded.counts == t.counts and loaded.raw_low == t.raw_low and loaded.raw_high == t.raw_high
    assert c.smoothed_sps == [20.5, 20.5] and CostTable.load(path, *c.key).raw_sps == [20.0, 21.0]
    assert CostTable.load(path, *b.key).counts == [3, 1, 2] and CostTable.load(path, *b.key).raw_low[0] == 880.0
    assert CostTable.load(path, "cpu", "other", "fp32") is None
    assert set(load_cost_tables(path)) == {a.key, b.key, c.key}
    assert sorted(p.name for p in path.parent.iterdir()) == ["sps.json"]  # no temp file left behind
    path.write_text("{not json")
    with pytest.raises(LabkitError, match="re-profile"):
        CostTable.load(path, *a.key)


def test_profile_sps_interleaves_the_sizes_and_takes_medians():
    """A fake step advances a fake clock (B centiseconds; the third timed call 10x slower): no real
    timing. Warm-up first, then rounds that each time every B once, in a seeded order."""
    now = [0.0]
    calls, syncs = [], []

    def step(b):
        calls.append(b)
        now[0] += 0.01 * b * (10.0 if len(calls) == 9 else 1.0)

    table = profile_sps(step, [1, 2, 4], repeats=3, warmup=2, sync=lambda: syncs.append(len(calls)),
                        progress=True, clock=lambda: now[0], device="fake", model="m", dtype="fp32")
    assert calls[:6] == [1, 1, 2, 2, 4, 4]  # the warm-up, untimed
    rounds = [calls[6 + 3 * i:9 + 3 * i] for i in range(3)]
    assert all(sorted(r) == [1, 2, 4] for r in rounds)  # every round visits every size once
    assert syncs == [6] + list(range(7, 16))  # after the warm-up and after each timed call
    assert table.raw_sps == pytest.approx([100.0, 50.0, 25.0])  # the median drops the slowed call
    assert table.counts == [3, 3, 3] and table.raw_low is not None
    assert table.key == ("fake", "m", "fp32") and table.batch_sizes == [1, 2, 4]
    with pytest.raises(LabkitError, match="unknown settings"):
        profile_sps(step, [1], colour="red")


# ---------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("bad", [1.5, -0.1, math.nan])
def test_confidences_outside_0_1_are_refused(bad):
    with pytest.raises(LabkitError, match=r"\[0, 1\].*not logits"):
        ScheduleInput(f64([[0.5, bad]]), CostTable.flat())
    ScheduleInput(f64([[0.5, bad]]), CostTable.flat(), [1])  # past max_lengths: padding, ignored
    with pytest.raises(LabkitError, match="old_conf"):
        ScheduleInput(f64([[0.5, 0.5]]), CostTable.flat(), old_conf=f64([[0.5, bad]]))


def test_bad_shapes_lengths_names_and_tables_are_refused():
    table = CostTable.flat()
    conf = f64([[0.5, 0.5], [0.5, 0.5]])
    with pytest.raises(LabkitError, match="one entry per row"):
        ScheduleInput(conf, table, [2])
    with pytest.raises(LabkitError, match=r"0\.\.2"):
        ScheduleInput(conf, table, [2, 3])
    with pytest.raises(LabkitError, match="whole number"):
        ScheduleInput(conf, table, [1.5, 1])
    with pytest.raises(LabkitError, match="2-D tensor"):
        ScheduleInput(f64([0.5, 0.5]), table)
    with pytest.raises(LabkitError, match="2-D tensor"):
        ScheduleInput([[0.5]], table)
    with pytest.raises(LabkitError, match="one row per current request"):
        ScheduleInput(conf, table, old_conf=f64([[0.5, 0.5]]))
    with pytest.raises(LabkitError, match="sps"):
        ScheduleInput(conf, object())
    with pytest.raises(LabkitError, match="fixed, mtp1, threshold, algorithm1, algorithm1-layout, algorithm1-column, retrospective, async-topk"):
        make_policy("greedy")
    with pytest.raises(LabkitError, match="threshold takes t"):
        make_policy("algorithm1", t=0.5)
    with pytest.raises(LabkitError, match=r"\(0, 1\]"):
        make_policy("threshold", t=0.0)
    with pytest.raises(LabkitError, match=">= 0"):
        make_policy("fixed", cap=-1)
    with pytest.raises(LabkitError, match="one SPS per batch size"):
        CostTable("d", "m", "fp32", [1, 2], [1.0])
    with pytest.raises(LabkitError, match="strictly increasing"):
        CostTable("d", "m", "fp32", [2, 2], [1.0, 1.0])
    with pytest.raises(LabkitError, match="positive and finite"):
        CostTable("d", "m", "fp32", [1, 2], [1.0, 0.0])
    with pytest.raises(LabkitError, match="non-increasing"):
        CostTable("d", "m", "fp32", [1, 2], [1.0, 2.0], smoothed_sps=[1.0, 2.0])
    with pytest.raises(LabkitError, match="lacks"):
        CostTable.from_dict({"device": "d"})


def test_empty_batch():
    inp = ScheduleInput(torch.zeros(0, 4, dtype=torch.float64), CostTable.flat())
    assert all(make_policy(name)(inp) == [] for name in POLICIES)


def test_policy_specs_name_a_static_mtp_k_and_a_threshold():
    """"fixed:K" is the fixed policy capped at K (a static MTP-K: it drafts and verifies at most K),
    "threshold:T" a survival threshold of T; anything else after a colon is refused with the fix."""
    from labkit.lab.plots import POLICY_COLORS, POLICY_LABELS
    p = make_policy("fixed:3")
    assert isinstance(p, POLICIES["fixed"]) and p.draft_cap == 3
    inp = ScheduleInput(conf=torch.full((2, 5), 0.9), table=CostTable.flat())
    assert p(inp) == [3, 3]
    assert make_policy("threshold:0.25").t == 0.25
    assert POLICY_LABELS.get("fixed:3") == "fixed K=3" and POLICY_COLORS.get("fixed:3").startswith("#")
    for bad, words in [("fixed:x", "whole number"), ("mtp1:2", "only fixed:K"), ("nope:1", "unknown scheduler policy")]:
        with pytest.raises(LabkitError, match=words):
            make_policy(bad)


# ---------------------------------------------------------------------------------------------------
# Algorithm 1 over whole columns


def test_the_column_policy_verifies_one_width_for_every_request_and_stops_at_the_first_drop():
    """Every request verifies min(W, its drafts); W grows while theta rises and stops at the first column
    that does not raise it, even where a later column would (the break: no look past the drop)."""
    policy = make_policy("algorithm1-column")
    conf = f64([[0.9, 0.9, 0.9], [0.8, 0.2, 0.9], [0.5, 0.5, 0.5]])
    flat = CostTable.flat()
    assert policy(ScheduleInput(conf, flat, max_lengths=[3, 3, 1])) == [3, 3, 1]
    # survivals: column 1 sums 2.2, column 2 0.81 + 0.16 + 0.25 = 1.22, column 3 0.729 + 0.144 = 0.873;
    # B = 3, 6, 9, 11; the second column costs more than it earns, the third would have paid
    sps = {3: 1 / 1.0, 6: 1 / 1.7, 9: 1 / 2.2, 11: 1 / 2.3}
    table = type("T", (), {"sps": lambda self, b: sps[b]})()
    inp = ScheduleInput(conf, table, max_lengths=[3, 3, 2])
    theta = [expected_throughput(inp, l) for l in ([0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 2])]
    assert theta[1] > theta[0] and theta[2] <= theta[1] and theta[3] > theta[1]  # a later column would pay
    assert policy(inp) == [1, 1, 1]
    # nothing pays: nothing verified
    steep = type("T", (), {"sps": lambda self, b: 1.0 / b ** 2})()
    assert policy(ScheduleInput(conf, steep)) == [0, 0, 0]


def test_the_column_policy_maximises_theta_over_widths_when_theta_is_unimodal():
    """On random confidences and tables whose SPS falls smoothly, the width it picks is the best uniform
    width (theta over uniform widths rises then falls there)."""
    gen = torch.Generator().manual_seed(0)
    policy = make_policy("algorithm1-column")
    for _ in range(50):
        r, g = int(torch.randint(1, 9, (1,), generator=gen)), int(torch.randint(1, 7, (1,), generator=gen))
        conf = torch.rand(r, g, generator=gen, dtype=torch.float64) * 0.5 + 0.5
        slope = float(torch.rand(1, generator=gen)) * 0.2
        table = type("T", (), {"sps": lambda self, b, s=slope: 1.0 / (1.0 + s * b)})()
        inp = ScheduleInput(conf, table)
        thetas = [expected_throughput(inp, [w] * r) for w in range(g + 1)]
        got = policy(inp)
        assert len(set(got)) == 1
        assert thetas[got[0]] == pytest.approx(max(thetas))


def test_the_next_draft_cap_grows_while_wanted_and_probes_every_few_steps_once_held():
    from labkit.core.scheduler import held_after, next_draft_cap
    assert next_draft_cap(None, False, 3, step=5) == 3  # new since the last step: the newcomer's cap
    assert next_draft_cap(None, False, None, step=0) is None
    assert next_draft_cap(2, True, None, step=7) == 3  # no probe period: one past the length, every step
    assert next_draft_cap(2, False, None, step=7, probe_every=4) == 3  # growing
    assert next_draft_cap(2, True, None, step=7, probe_every=4) == 2  # held, off a probe step
    assert next_draft_cap(2, True, None, step=8, probe_every=4) == 3  # a probe step
    assert next_draft_cap(0, True, None, step=5, probe_every=4) == 1  # never below one draft
    assert not held_after(1, 2, True, step=5)  # no probe period: never held
    assert held_after(1, 2, False, step=5, probe_every=4)  # stopped short of its cap
    assert held_after(1, 1, True, step=5, probe_every=4)  # all of a held cap verified: still held
    assert not held_after(2, 2, True, step=8, probe_every=4)  # the probe paid: growing again
    assert not held_after(3, 3, False, step=5, probe_every=4)  # growing and paying
    assert not held_after(2, None, False, step=0, probe_every=4)  # uncapped: nothing stopped it
    assert next_draft_cap(2, True, None, step=8, probe_every=4, may_pay=False) == 2  # a probe step skipped
    assert next_draft_cap(2, False, None, step=7, probe_every=4, may_pay=False) == 3  # growing needs no probe
    assert held_after(2, 2, True, step=8, probe_every=4, may_pay=False)  # the skipped probe verified nothing new


def seconds_table(seconds: list[float]) -> CostTable:
    """A table whose step at B = 1, 2, ... tokens takes `seconds[B - 1]`."""
    return CostTable("test", "hand", "exact", list(range(1, len(seconds) + 1)), [1.0 / s for s in seconds])


def test_a_newcomer_drafts_the_last_steps_longest_length_and_one_draft_at_first():
    from labkit.core.scheduler import newcomer_cap
    assert newcomer_cap(None) == 1  # the first step: nothing verified yet, one draft (never a whole block)
    assert newcomer_cap([]) == 1
    assert newcomer_cap([0, 0]) == 1  # the last step verified nothing: one draft still reads a confidence
    assert newcomer_cap([1, 3, 2]) == 3  # the widest verified, not one past it


def test_a_next_column_may_pay_where_its_expected_confidences_would_raise_theta():
    """`next_column_may_pay` expects each next draft to survive with its predecessor's survival times its
    own confidence where it was drafted, else the last drafted one repeated: two requests at width 1 with
    confidences 0.5 emit 3 tokens in 1.5 s (theta 2); a second column is expected to add 2 x 0.5 x 0.5 =
    0.5, so it may pay in 1.7 s (3.5 / 1.7 = 2.06) and not in 1.8 s (1.94)."""
    from labkit.core.scheduler import next_column_may_pay
    conf = torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)
    dear = seconds_table([1.0, 1.0, 1.25, 1.5, 1.75, 1.8])
    cheap = seconds_table([1.0, 1.0, 1.25, 1.5, 1.75, 1.7])
    assert expected_throughput(ScheduleInput(conf, dear), [1, 1]) == pytest.approx(2.0)
    assert not next_column_may_pay(ScheduleInput(conf, dear), [1, 1])
    assert next_column_may_pay(ScheduleInput(conf, cheap), [1, 1])
    # held at width 1 (nothing drafted past it): the last confidence, 0.5, repeated: the same answers
    held = torch.tensor([[0.5], [0.5]], dtype=torch.float64)
    assert not next_column_may_pay(ScheduleInput(held, dear), [1, 1])
    assert next_column_may_pay(ScheduleInput(held, cheap), [1, 1])
    # drafted past the width: its own confidence counts (0.9 each: 3.9 tokens in 1.8 s, 2.17 > 2)
    known = torch.tensor([[0.5, 0.9], [0.5, 0.9]], dtype=torch.float64)
    assert next_column_may_pay(ScheduleInput(known, dear), [1, 1])
    # nothing verified yet: the first drafts' own confidences (2 + 2 x 0.4 tokens in 1.5 s against 2 in 1 s: no;
    # 2 + 2 x 0.9 in 1.5 s: yes)
    assert not next_column_may_pay(ScheduleInput(conf * 0.8, dear), [0, 0])
    assert next_column_may_pay(ScheduleInput(known.flip(1), dear), [0, 0])
    dead = ScheduleInput(torch.tensor([[0.0, 0.9]], dtype=torch.float64), CostTable.flat())
    assert not next_column_may_pay(dead, [1])  # nothing past a dead draft survives, even at no cost
    assert make_policy("algorithm1-column").probe_may_pay(ScheduleInput(conf, cheap), [1, 1])
