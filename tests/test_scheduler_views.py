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
