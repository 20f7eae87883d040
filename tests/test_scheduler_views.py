"""labkit.lab.scheduler_views on hand-made confidences and cost tables: no model, no clock.

The walk must agree with the policies it explains (Algorithm 1 stops where the walk breaks; the
retrospective search keeps the walk's global maximum), the load sweep must reach its limits (a flat
table verifies everything, a steep one nothing), and every figure must carry the traces it names.
"""

from __future__ import annotations

import pytest
import torch

from labkit.core.errors import LabkitError
from labkit.core.scheduler import (
    Algorithm1,
    CostTable,
    Retrospective,
    ScheduleInput,
    appendix_a_arithmetic,
    appendix_a_table,
    expected_throughput,
)
from labkit.lab.scheduler_views import (
    ADMISSION_HEADER,
    SWEEP_POLICIES,
    admission_path_figure,
    admission_walk,
    appendix_a_figure,
    appendix_a_rows,
    budget_figure,
    budget_header,
    budget_rows,
    best_policy_by_load,
    budget_sweep,
    describe_budget_sweep,
    describe_sps,
    prefix_grid_figure,
    sps_figure,
)
from labkit.model.timing import profile_fastest

# SPS flat up to 4 tokens, then falling: on 3 requests the first admission is free and later ones must pay.
KNEE = CostTable("test", "toy", "fp32", [1, 4, 8, 16], [10.0, 10.0, 7.0, 4.0])
STEEP = CostTable("test", "toy", "fp32", [1], [1.0], tail="proportional")  # SPS(B) = 1 / B
CONF = torch.tensor([[0.9, 0.8, 0.5, 0.2],
                     [0.6, 0.3, 0.9, 0.9],
                     [0.95, 0.9, 0.9, 0.1]], dtype=torch.float64)


def names(fig) -> set[str]:
    return {t.name for t in fig.data}


def test_walk_agrees_with_algorithm1_and_the_retrospective_search():
    gen = torch.Generator().manual_seed(0)
    tables = [KNEE, STEEP, CostTable.flat(), appendix_a_table(),
              CostTable("t", "m", "d", [1, 2, 3, 5, 9], [5.0, 4.9, 4.0, 4.1, 2.0])]  # jagged raw
    for trial in range(60):
        conf = torch.rand(1 + trial % 5, 1 + trial % 6, generator=gen, dtype=torch.float64)
        for table in tables:
            inp = ScheduleInput(conf, table)
            walk = admission_walk(inp)
            assert walk.algorithm1_lengths == Algorithm1()(inp)
            assert walk.retrospective_lengths == Retrospective()(inp)
            assert len(walk.steps) == 1 + int((conf > 0).sum())  # every candidate, past the break too
            for s in walk.steps:
                assert s.theta == pytest.approx(expected_throughput(inp, walk.lengths(s.k)))


def test_walk_breaks_at_the_first_admission_that_does_not_pay():
    inp = ScheduleInput(CONF, KNEE)
    walk = admission_walk(inp)
    assert walk.break_at is not None and walk.algorithm1_k == walk.break_at - 1
    thetas = [s.theta for s in walk.steps]
    assert all(t1 > t0 for t0, t1 in zip(thetas[:walk.break_at], thetas[1:walk.break_at]))
    assert thetas[walk.break_at] <= thetas[walk.break_at - 1]
    brk = walk.steps[walk.break_at]
    assert brk.survival <= brk.needed + 1e-12  # it added less than it needed to keep theta level
    assert all(s.survival > s.needed for s in walk.steps[1:walk.break_at])
    assert walk.steps[0].batch_tokens == 3 and walk.steps[0].tau == 3.0
    rows = walk.rows()
    assert len(rows) == len(walk.steps) and all(len(r) == len(ADMISSION_HEADER) for r in rows)
    assert rows[walk.break_at][-1].startswith("BREAK")


def test_walk_without_break_under_a_flat_table():
    walk = admission_walk(ScheduleInput(CONF, CostTable.flat()))
    assert walk.break_at is None
    assert walk.algorithm1_lengths == [4, 4, 4]
    fig = admission_path_figure(walk)
    brk = next(t for t in fig.data if t.name == "break: first drop")
    assert len(brk.x) == 0


def test_admission_path_figure_marks_the_break_where_algorithm1_stops():
    inp = ScheduleInput(CONF, KNEE)
    walk = admission_walk(inp)
    fig = admission_path_figure(walk)
    assert {"theta along the sorted path", "admitted by Algorithm 1", "Algorithm 1's peak", "break: first drop",
            "global maximum (no break)", "a_{r,j}: tokens it adds", "gain needed to pay"} <= names(fig)
    by = {t.name: t for t in fig.data}
    stopped = sum(Algorithm1()(inp))  # packed batch: one admission per verified draft
    assert list(by["break: first drop"].x) == [stopped + 1] == [walk.break_at]
    assert list(by["Algorithm 1's peak"].x) == [stopped]
    assert list(by["admitted by Algorithm 1"].x) == list(range(stopped + 1))
    assert len(by["theta along the sorted path"].x) == len(walk.steps)
    assert list(by["global maximum (no break)"].x) == [walk.peak_k]


def test_prefix_grid_outlines_exactly_the_admitted_cells():
    inp = ScheduleInput(CONF, KNEE, max_lengths=[4, 2, 3])
    lengths = Algorithm1()(inp)
    fig = prefix_grid_figure(inp, lengths)
    assert names(fig) == {"survival a_{r,j}", "admitted (verified)"}
    marks = next(t for t in fig.data if t.name == "admitted (verified)")
    assert len(marks.x) == sum(lengths)
    heat = next(t for t in fig.data if t.name == "survival a_{r,j}")
    assert heat.z[1][2] is None and heat.z[1][3] is None  # past request 2's two real drafts
    assert heat.z[0][1] == pytest.approx(0.9 * 0.8)


def test_budget_sweep_flat_table_verifies_everything():
    conf = torch.rand(20, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.9 + 0.05
    points = budget_sweep(conf, CostTable.flat(), loads=[1, 3, 8], batches=8)
    assert {(p.policy, p.requests) for p in points} == {(n, r) for n in SWEEP_POLICIES for r in (1, 3, 8)}
    for p in points:
        assert p.budget == pytest.approx(2.0 if p.policy == "mtp1" else 1 + 5)


def test_budget_sweep_steep_table_verifies_nothing_but_the_anchor():
    conf = torch.rand(20, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.98
    points = budget_sweep(conf, STEEP, loads=[1, 4], batches=8)
    for p in points:
        expected = {"fixed": 6.0, "mtp1": 2.0}.get(p.policy, 1.0)
        assert p.budget == pytest.approx(expected), p
        assert p.tau_per_request >= 1.0


def test_budget_sweep_budget_falls_with_load_and_algorithm1_never_loses_on_theta():
    conf = torch.rand(50, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.5 + 0.5
    points = budget_sweep(conf, KNEE, loads=[1, 2, 4, 8], batches=16, seed=4)
    a1 = sorted((p for p in points if p.policy == "algorithm1"), key=lambda p: p.requests)
    assert a1[0].budget > a1[-1].budget
    by = {(p.policy, p.requests): p for p in points}
    for r in (1, 2, 4, 8):  # on these confidences and this table, greedy admission beats one draft each
        assert by[("algorithm1", r)].theta >= by[("mtp1", r)].theta - 1e-9
    assert by[("fixed", 8)].budget == pytest.approx(7.0)
    assert by[("algorithm1", 4)].per_request_tokens_per_s == pytest.approx(by[("algorithm1", 4)].theta / 4)
    sentence = describe_budget_sweep(points)
    assert f"{a1[0].budget:.2f}" in sentence and "R = 8" in sentence
    steady = all(b1.budget <= b0.budget for b0, b1 in zip(a1, a1[1:]))
    assert ("budget falls at every step of load" in sentence) == steady
    assert ("does not fall steadily" in sentence) == (not steady)
    best = best_policy_by_load(points)
    assert sorted(best) == [1, 2, 4, 8]
    for r, name in best.items():
        assert by[(name, r)].theta == max(by[(n, r)].theta for n in SWEEP_POLICIES)
    rows = budget_rows(points)
    assert len(rows) == 4 and all(len(r) == len(budget_header(points)) for r in rows)


def test_budget_sweep_is_seeded_and_respects_short_blocks():
    conf = torch.full((4, 3), 0.9, dtype=torch.float64)
    conf[1, 1:] = float("nan")  # padding past a short block is never read
    a = budget_sweep(conf, CostTable.flat(), [2, 5], batches=6, seed=7, max_lengths=[3, 1, 3, 3])
    b = budget_sweep(conf, CostTable.flat(), [2, 5], batches=6, seed=7, max_lengths=[3, 1, 3, 3])
    assert a == b
    assert all(1.0 < p.budget <= 4.0 for p in a)


def test_budget_sweep_refuses_bad_input():
    with pytest.raises(LabkitError):
        budget_sweep(torch.empty(0, 4), CostTable.flat(), [1])
    with pytest.raises(LabkitError):
        budget_sweep(torch.rand(3, 4), CostTable.flat(), [0])
    with pytest.raises(LabkitError):
        budget_sweep(torch.rand(3, 4), CostTable.flat(), [1], max_lengths=[4])


def test_budget_figure_has_one_trace_per_policy_per_panel():
    conf = torch.rand(10, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    points = budget_sweep(conf, KNEE, loads=[1, 2, 4], batches=4)
    fig = budget_figure(points)
    assert names(fig) == set(SWEEP_POLICIES)
    assert len(fig.data) == 2 * len(SWEEP_POLICIES)
    assert sum(t.showlegend is not False for t in fig.data) == len(SWEEP_POLICIES)
    for t in fig.data:
        assert list(t.x) == [1, 2, 4]


def test_sps_figure_shows_raw_with_spread_fitted_and_shapes():
    table = CostTable.from_samples("cpu", "toy", "fp32", {1: [9.0, 10.0, 11.0], 2: [8.0], 4: [8.5, 9.0, 9.5], 8: [3.0]})
    points = [{"rows": 1, "width": b, "batch_tokens": b, "seconds": 1 / s, "sps": s}
              for b, s in zip(table.batch_sizes, table.raw_sps)]
    fig = sps_figure(table, points)
    assert names(fig) == {"per shape (R x W)", "raw (median per B)", "fitted (isotonic)"}
    fitted = [t for t in fig.data if t.name == "fitted (isotonic)"]
    assert list(fitted[0].y) == table.smoothed_sps
    assert list(fitted[1].y) == [b * s for b, s in zip(table.batch_sizes, table.smoothed_sps)]
    raw = [t for t in fig.data if t.name == "raw (median per B)"]
    assert list(raw[0].y) == table.raw_sps and list(raw[0].error_y.array)[0] == 1.0  # upper quartile - median
    assert list(raw[1].error_y.arrayminus)[0] == 1.0 and list(raw[1].error_y.array)[2] == pytest.approx(4 * 0.5)
    assert names(sps_figure(table)) == {"raw (median per B)", "fitted (isotonic)"}
    assert sps_figure(CostTable("cpu", "toy", "fp32", [1, 2], [2.0, 1.0])).data[0].error_y.array is None  # no spread kept
    sentence = describe_sps(table)
    assert "B = 8" in sentence and "cpu" in sentence and "pooled B = 2, 4" in sentence
    assert "pooled no sizes" in describe_sps(KNEE)


def test_appendix_a_rows_and_figure():
    arith = appendix_a_arithmetic()
    rows = dict(appendix_a_rows(arith))
    assert rows["theta_0 = 1 x SPS(1)"] == "1.000" and rows["theta_1 = (1 + a_1) x SPS(2)"] == "0.900"
    assert rows["theta_2 if x_1 = A (c_2 = 0.9)"] == "1.134"
    fig = appendix_a_figure({"algorithm1": [700, 300], "retrospective": [850, 150]})
    assert names(fig) == {"algorithm1", "retrospective", "target p_t"}
    assert list(fig.data[0].y) == pytest.approx([0.7, 0.3])
    assert list(fig.data[-1].y) == [0.7, 0.3]


def _pass(sps_by_shape: dict[tuple[int, int], float]):
    points = [{"rows": r, "width": w, "batch_tokens": r * w, "seconds": 1 / s, "sps": s}
              for (r, w), s in sps_by_shape.items()]
    by_b = {}
    for p in points:
        by_b.setdefault(p["batch_tokens"], []).append(p["sps"])
    sizes = sorted(by_b)
    return CostTable("cpu", "toy", "fp32", sizes, [sorted(by_b[b])[len(by_b[b]) // 2] for b in sizes]), points


def test_profile_fastest_keeps_each_shapes_fastest_pass():
    quiet = {(1, 1): 10.0, (1, 2): 9.0, (2, 1): 8.0, (2, 2): 5.0}
    slowed = {(1, 1): 2.0, (1, 2): 9.5, (2, 1): 8.0, (2, 2): 1.0}  # another job hit two shapes
    runs = iter([_pass(slowed), _pass(quiet)])
    table, points = profile_fastest(lambda: next(runs), passes=2)
    assert table.batch_sizes == [1, 2, 4]
    assert table.raw_sps == [10.0, 9.5, 5.0]  # B = 2: the upper median of 9.5 and 8.0
    assert {(p["rows"], p["width"]): p["pass"] for p in points} == {(1, 1): 1, (1, 2): 0, (2, 1): 0, (2, 2): 1}
    assert "lowered" not in describe_sps(table)
    one = iter([_pass(quiet)])
    assert profile_fastest(lambda: next(one), passes=1)[0].raw_sps == _pass(quiet)[0].raw_sps
    with pytest.raises(LabkitError):
        profile_fastest(lambda: _pass(quiet), passes=0)


def test_describe_sps_flags_a_slow_first_size():
    table = CostTable("cpu", "toy", "fp32", [1, 4, 8, 16], [1.0, 6.0, 5.0, 4.0])  # B = 1 slowed by noise
    assert table.smoothed_sps == [4.0, 4.0, 4.0, 4.0]  # pooled with the faster measurements after it
    assert "raised SPS by more than 20% at B = 1" in describe_sps(table)
    assert "lowered SPS by more than 20% at B = 4" in describe_sps(table)


# ---------------------------------------------------------------------------------------------------
# The knee, the replay of recorded blocks (static K against Algorithm 1) and the closing table


def _blocks(n: int = 40, gamma: int = 4, seed: int = 0, perfect: bool = False):
    from labkit.lab.scheduler_views import Blocks
    gen = torch.Generator().manual_seed(seed)
    conf = torch.rand(n, gamma, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    accepted = torch.full((n,), gamma) if perfect else torch.randint(0, gamma + 1, (n,), generator=gen)
    return Blocks(conf, accepted, [i // 4 for i in range(n)], ["math"] * n, "test")


def test_knee_is_where_the_fitted_sps_halves_and_the_quartiles_bracket_it():
    from labkit.lab.scheduler_views import describe_knee, sps_knee
    knee = sps_knee(KNEE)  # 10, 10, 7, 4: half of 10 first reached at B = 16
    assert (knee.b_half, knee.b_low, knee.b_high, knee.largest) == (16, None, None, 16)
    assert knee.tokens_gain == pytest.approx(16 * 4 / 10)
    table = CostTable.from_samples("cpu", "toy", "fp32", {1: [9.0, 10.0, 11.0], 4: [4.0, 6.0, 7.0], 8: [3.0, 4.0, 6.0]})
    k = sps_knee(table)
    assert k.b_half == 8 and k.b_low == 4 and k.b_high is None  # the lower quartiles halve sooner, the upper never
    text = describe_knee(k)
    assert "at B = 8" in text and "between B = 4 on the lower quartiles and beyond B = 8" in text
    assert "never halves" in describe_knee(sps_knee(CostTable.flat()))


def test_sps_rows_show_samples_median_quartiles_and_fit():
    from labkit.lab.scheduler_views import SPS_HEADER, sps_rows
    table = CostTable.from_samples("cpu", "toy", "fp32", {1: [9.0, 10.0, 11.0], 2: [12.0]})
    rows = sps_rows(table)
    assert all(len(r) == len(SPS_HEADER) for r in rows)
    assert rows[0][:3] == (1, 3, "10 [9-11]") and rows[1][1] == 1
    assert rows[0][3] == rows[1][3]  # pooled: B = 2 measured faster than B = 1


def test_replay_on_a_flat_table_verifies_everything_and_static_budgets_are_1_plus_k():
    from labkit.core.evidence import verdict
    from labkit.lab.scheduler_views import replay_sweep
    blocks = _blocks()
    cells = replay_sweep(blocks, CostTable.flat(), [1, 3], ["mtp1", "fixed:2", "fixed"], draws=24, resamples=3)
    by = {(c.policy, c.requests): c for c in cells}
    for r in (1, 3):
        assert by[("mtp1", r)].budget == 2.0 and by[("fixed:2", r)].budget == 3.0 and by[("fixed", r)].budget == 5.0
        assert by[("algorithm1", r)].budget == 5.0  # any draft pays when SPS never falls
        c = by[("fixed", r)]
        assert (c.ratio, c.ratio_low, c.ratio_high) == (1.0, 1.0, 1.0)  # the same lengths on the same batches
        assert verdict(c.ratio, c.ratio_low, c.ratio_high) == "tied (within 1%)"
        assert by[("mtp1", r)].ratio < 1  # fewer accepted tokens at the same cost per step
        assert c.batches == -(-24 // r) and c.blocks == 40 and c.groups == 10 and c.resamples == 3
    perfect = replay_sweep(_blocks(perfect=True), CostTable.flat(sps=2.0), [2], ["fixed"], draws=8)
    top = next(c for c in perfect if c.policy == "fixed")
    assert top.realized == pytest.approx(2 * (1 + 4) * 2.0) and top.tau == pytest.approx(5.0)


def test_replay_is_seeded_and_refuses_bad_input():
    from labkit.lab.scheduler_views import replay_sweep
    a = replay_sweep(_blocks(), KNEE, [1, 2], ["mtp1", "fixed"], draws=16, resamples=2, seed=3)
    b = replay_sweep(_blocks(), KNEE, [1, 2], ["mtp1", "fixed"], draws=16, resamples=2, seed=3)
    assert a == b
    with pytest.raises(LabkitError, match="draws >= 1"):
        replay_sweep(_blocks(), KNEE, [1], ["mtp1"], draws=0)
    with pytest.raises(LabkitError, match="unknown scheduler policy"):
        replay_sweep(_blocks(), KNEE, [1], ["mtp9"])


def test_verdict_reads_the_interval():
    from labkit.core.evidence import verdict
    assert verdict(1.2, 1.1, 1.3) == "above" and verdict(0.8, 0.7, 0.9) == "below"
    assert verdict(1.05, 0.95, 1.2) == "within noise" and verdict(1.0, 0.995, 1.004) == "tied (within 1%)"
    assert verdict(1.5, None, None) == "spread unknown"


def test_static_k_loses_under_load_on_a_steep_curve_and_the_sentences_say_so():
    from labkit.lab.scheduler_views import (REPLAY_HEADER, describe_policy_vs, describe_replay_budget,
                                            describe_static_k, replay_figure, replay_rows, replay_sweep)
    # flat to 8 tokens, then time grows in proportion to B: deep blocks pay for one request, not for eight
    table = CostTable("t", "m", "d", [1, 8], [10.0, 10.0], tail="proportional")
    blocks = _blocks(80, seed=1)
    blocks.accepted = torch.tensor([4 if i % 4 == 0 else 0 for i in range(80)])  # a quarter of the blocks all right
    cells = replay_sweep(blocks, table, [1, 8], ["mtp1", "fixed"], draws=256, resamples=4)
    by = {(c.policy, c.requests): c for c in cells}
    assert by[("fixed", 8)].ratio < by[("fixed", 1)].ratio and by[("fixed", 8)].ratio_high < 1
    assert by[("algorithm1", 8)].budget < by[("algorithm1", 1)].budget
    text = describe_static_k(cells)
    assert text[0].startswith("Sample: 80 recorded blocks from 20 requests") and "4 bootstrap resamples" in text[0]
    assert "R=1: fixed (verify all), R=8: MTP-1" in text[1] and "no single K is best at every load" in text[1]
    assert any(s.startswith("fixed (verify all): below Algorithm 1 at R = ") and "8" in s for s in text[2:])
    assert "falls" in describe_replay_budget(cells) or "at R = 8" in describe_replay_budget(cells)
    assert describe_policy_vs(cells, "fixed").startswith("fixed (verify all) against Algorithm 1")
    rows = replay_rows(cells)
    assert len(rows) == len(cells) and all(len(r) == len(REPLAY_HEADER) for r in rows)
    assert {r[-1] for r in rows if r[1] == "Algorithm 1"} == {"-"}
    fig = replay_figure(cells)
    assert names(fig) == {"MTP-1 (DSpark's 1st draft)", "fixed (verify all)", "Algorithm 1"}
    assert len(fig.data) == 6


def test_blocks_come_from_full_rounds_of_traces_and_the_pool_is_chosen_by_what_recorded_it(tmp_path):
    from labkit.core.simulate import RequestTrace, TraceRound
    from labkit.lab.scheduler_views import blocks_from_rounds, blocks_from_traces, choose_blocks
    from labkit.measure.traces import TraceFile, TraceSet, save_traces
    reqs = [RequestTrace("math", [TraceRound((0.9, 0.8, 0.5), 2), TraceRound((0.7,), 1)]),
            RequestTrace("chat", [TraceRound((0.6, 0.6, 0.6), 0), TraceRound((0.9, 0.9, 0.9), 3)])]
    blocks = blocks_from_traces(TraceSet("block", 1.0, None, reqs), gamma=3)
    assert len(blocks) == 3 and blocks.groups == [0, 1, 1] and blocks.accepted.tolist() == [2, 0, 3]
    assert blocks.n_groups == 2 and blocks.domains == ["math", "chat", "chat"]
    with pytest.raises(LabkitError, match="no full block of 4"):
        blocks_from_traces(TraceSet("block", 1.0, None, reqs), gamma=4)
    live = blocks_from_rounds(torch.full((5, 3), 0.5), torch.zeros(5), ["code"] * 5)
    path = tmp_path / "traces.json"
    save_traces(TraceFile([TraceSet("block", 1.0, None, reqs)], {"target": "tiny", "drafter": "dspark"}), path)
    pool, about = choose_blocks("tiny", "dspark", 1.0, 3, live, path)
    assert pool is not live and len(pool) == 3 and "full blocks of 3 from 2 requests" in about
    pool, about = choose_blocks("other", "dspark", 1.0, 3, live, path)
    assert pool is live and "recorded with tiny and dspark" in about
    pool, about = choose_blocks("tiny", "dspark", 0.0, 3, live, path)
    assert pool is live and "no blocks at temperature 0" in about
    assert choose_blocks("tiny", "dspark", 1.0, 3, live, tmp_path / "missing.json")[0] is live


def test_scheduler_claims_put_the_papers_numbers_beside_the_run():
    from labkit.lab.scheduler_views import CLAIMS_HEADER, replay_sweep, scheduler_claims, sps_knee
    from labkit.core.stats import chi_square_test
    cells = replay_sweep(_blocks(), KNEE, [1, 4], ["mtp1", "fixed", "async-topk"], draws=16, resamples=2)
    counts = {"algorithm1": [700, 300], "retrospective": [850, 150]}
    tests = {k: chi_square_test(c, [0.7, 0.3]) for k, c in counts.items()}
    rows = scheduler_claims(KNEE, sps_knee(KNEE), cells, counts, 1000, tests, smoke=True)
    assert all(len(r) == len(CLAIMS_HEADER) for r in rows)
    claims = [r[0] for r in rows]
    assert any("Appendix A" in c for c in claims) and any("MTP-1" in c for c in claims)
    assert any("production variant" in c for c in claims) and any("one request" in c for c in claims)
    assert all(r[2].startswith("SMOKE RUN") for r in rows if "budget" in r[0] or "static" in r[0])
    assert "(0.850, 0.150) over 1,000 draws" in dict((r[0], r[2]) for r in rows)["Appendix A, retrospective (biased)"]
    assert not any(r[2].startswith("SMOKE") for r in scheduler_claims(KNEE, sps_knee(KNEE), cells, counts, 1000, tests))
