"""The engine's own step-cost fit (labkit.core.step_fit): t = a + b R + c X from past steps.

Hand-made steps for the fit's arithmetic, hand-made confidences for what it changes in Algorithm 1, and a
tiny engine under a deterministic clock for the wiring (recorded, replayed exactly)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from labkit.core.errors import LabkitError
from labkit.core.scheduler import Algorithm1, CostTable, RoundRate, ScheduleInput
from labkit.core.simulate import replay_steps
from labkit.core.step_fit import MIN_STEPS, StepFit, StepRate
from labkit.decode.engine import Engine, closed_loop, report
from test_serving import dspark, mixed_requests, steep_table, ticking_clock, tiny  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def fed(steps, a=0.05, b=0.012, c=0.0004, noise=0.0, seed=0) -> StepFit:
    rng = random.Random(seed)
    fit = StepFit()
    for r, x in steps:
        fit.update(r, x, a + b * r + c * x + noise * rng.gauss(0, 1))
    return fit


def mixed_steps(n=200, seed=0):
    rng = random.Random(seed)
    return [(r, rng.randint(0, 3 * r)) for r in (rng.randint(1, 16) for _ in range(n))]


def test_the_fit_recovers_the_per_request_and_per_draft_costs():
    a, b, c = fed(mixed_steps()).coefficients()
    assert (a, b, c) == pytest.approx((0.05, 0.012, 0.0004), rel=1e-6)
    a, b, c = fed(mixed_steps(seed=1), noise=0.002, seed=1).coefficients()
    assert b == pytest.approx(0.012, abs=0.001) and c == pytest.approx(0.0004, abs=0.0003)


def test_no_fit_before_enough_steps_or_while_the_drafts_never_varied_at_a_load():
    assert fed(mixed_steps(MIN_STEPS - 1)).coefficients() is None
    assert fed(mixed_steps(MIN_STEPS)).coefficients() is not None
    fixed_k = [(r, 2 * r) for r in (1, 4, 8, 16) * 20]  # a static policy: X follows R exactly
    assert fed(fixed_k).coefficients() is None and fed(fixed_k).rate(4) is None


def test_one_load_throughout_folds_the_request_cost_into_the_intercept():
    steps = [(8, x) for x in range(0, 24)] * 3
    a, b, c = fed(steps).coefficients()
    assert b == 0.0 and a == pytest.approx(0.05 + 0.012 * 8) and c == pytest.approx(0.0004)


def test_negative_slopes_are_fixed_at_zero_and_the_rest_refitted():
    a, b, c = fed(mixed_steps(), c=-0.001).coefficients()
    assert c == 0.0 and b > 0.0
    rng = random.Random(2)
    independent = [(rng.randint(1, 16), rng.randint(0, 20)) for _ in range(200)]  # X not tied to R
    a, b, c = fed(independent, b=-0.002).coefficients()
    assert b == 0.0 and 0.0 < c < 0.001  # the finite window correlates X with R a little


def test_step_rate_is_non_increasing_and_refuses_bad_costs():
    rate = StepRate(0.2, 0.001, requests=4)
    values = [rate.sps(b) for b in range(1, 40)]
    assert all(x >= y for x, y in zip(values, values[1:])) and rate.sps(4) == pytest.approx(5.0)
    for bad in ((0.0, 0.001), (0.1, -0.001)):
        with pytest.raises(LabkitError, match="fixed seconds > 0"):
            StepRate(*bad, requests=1)
    with pytest.raises(LabkitError, match=">= 1 request"):
        StepFit().update(0, 1, 0.1)
    with pytest.raises(LabkitError, match="weight"):
        StepFit(weight=0.0)


def test_a_per_request_cost_read_as_per_token_makes_algorithm1_verify_too_little():
    """16 requests whose step costs 0.25 s by its requests and 0.3 ms a verified draft. A table pooled over
    R x W shapes charges ~1.7 ms a token past B = 16; Algorithm 1 reading it verifies fewer drafts than
    with the step's true cost, and the true cost's choice has the higher true throughput."""
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(16, 6, generator=g) * 0.5 + 0.45
    pooled = CostTable("cpu", "m", "fp32", list(range(1, 200)), [1.0 / (0.09 + 0.0017 * (b - 16)) if b > 16
                                                                  else 1.0 / 0.09 for b in range(1, 200)])
    true = StepRate(0.25, 0.0003, requests=16)
    inp = lambda table: ScheduleInput(conf=conf, table=table, max_lengths=[6] * 16)  # noqa: E731
    by_table = Algorithm1()(inp(RoundRate(pooled, 0.03)))
    by_fit = Algorithm1()(inp(true))
    assert sum(by_fit) > sum(by_table)
    from labkit.core.scheduler import expected_throughput
    assert expected_throughput(inp(true), by_fit) > expected_throughput(inp(true), by_table)


def test_the_engine_prices_steps_by_its_fit_records_it_and_replays_exactly(tiny, dspark):
    """A deterministic clock (a tick a reading): the first MIN_STEPS steps read the table (which truncates
    blocks), later ones the fit, recorded in each step; replaying the recorded trace (through JSON) with
    the same policy gives every step's lengths, fitted steps included."""
    engine = Engine(tiny, dspark, "algorithm1", steep_table(0.05), clock=ticking_clock(), cost_model="fit")
    for _ in closed_loop(mixed_requests(10), 4, engine):
        pass
    fitted = [s for s in engine.steps if s.step_cost is not None]
    early = [s for s in engine.steps if s.step_cost is None]
    assert fitted and early and len(early) >= MIN_STEPS
    assert all(s.step_cost[0] > 0.0 and s.step_cost[1] >= 0.0 for s in fitted)
    assert any(sum(s.lengths) < sum(s.drafted) for s in early), "the steep table truncated nothing"
    rep = json.loads(json.dumps(report(engine, 4, "test")))
    assert replay_steps(rep["step_trace"], rep["table"], "algorithm1", batch_tokens=engine.batch_tokens) == \
        [s["lengths"] for s in rep["step_trace"]]


def test_without_the_fit_the_engine_keeps_the_profiled_table(tiny, dspark):
    engine = Engine(tiny, dspark, "algorithm1", steep_table(), clock=ticking_clock(), cost_model="table")
    for _ in closed_loop(mixed_requests(10), 4, engine):
        pass
    assert engine.step_fit is None and all(s.step_cost is None for s in engine.steps)



def test_the_engine_adds_the_mean_admission_time_per_step_to_the_fitted_step(tiny, dspark):
    """Admissions (prefills between steps) are part of every serving cycle but come in bursts unrelated
    to a step's verified drafts: the engine prices a step at the fit plus their running mean, and the
    first step's admissions (the engine filling once) are left out of that mean."""
    engine = Engine(tiny, dspark, "algorithm1", steep_table(0.05), clock=ticking_clock(), cost_model="fit")
    for _ in closed_loop(mixed_requests(10), 4, engine):
        pass
    assert engine.steps[0].admit_s > 0.0  # the first fill was timed...
    later = [s.admit_s for s in engine.steps[1:]]
    assert engine._admit_mean is not None and 0.0 < engine._admit_mean <= max(later)  # ...but not averaged in
    engine.step_fit = fed(mixed_steps())
    rate = engine.step_fit.rate(4)
    priced, recorded, offset, rows = engine._price(4, None)
    assert priced.fixed_s == pytest.approx(rate.fixed_s + engine._admit_mean)
    assert priced.per_token_s == rate.per_token_s
    assert recorded == (priced.fixed_s, priced.per_token_s) and offset is None and rows is None


def test_the_offset_model_prices_the_table_plus_the_measured_excess_and_replays_exactly(tiny, dspark):
    """cost_model="offset": once a step was measured, Algorithm 1 reads RoundRate(table, mean excess of the
    measured steps over the table's forward), recorded as offset_s; the replay gives every step's lengths.
    An unknown model is refused with the list."""
    engine = Engine(tiny, dspark, "algorithm1", steep_table(0.05), clock=ticking_clock(),
                    cost_model="offset")
    for _ in closed_loop(mixed_requests(10), 4, engine):
        pass
    assert engine.steps[0].offset_s is None and all(s.offset_s is not None and s.offset_s >= 0.0
                                                    for s in engine.steps[1:])
    assert all(s.step_cost is None for s in engine.steps)
    rep = json.loads(json.dumps(report(engine, 4, "test")))
    assert replay_steps(rep["step_trace"], rep["table"], "algorithm1", batch_tokens=engine.batch_tokens) == \
        [s["lengths"] for s in rep["step_trace"]]
    with pytest.raises(LabkitError, match="table, fit, offset, rows"):
        Engine(tiny, dspark, "algorithm1", cost_model="guess")


def shaped_table() -> CostTable:
    """A profiled grid where a row costs as much as 4 tokens (1 token = 1 unit): priced by rows, a step of
    R requests reads its own row count's curve; pooled, the shapes of one B are averaged."""
    from labkit.core.row_price import Shape
    shapes = [Shape(r, w, 1.0 + 4 * r + r * w) for r in (1, 2, 4, 8) for w in (1, 2, 4, 8)]
    by_b: dict[int, list[float]] = {}
    for s in shapes:
        by_b.setdefault(s.rows * s.width, []).append(1.0 / s.seconds)
    return CostTable.from_samples("test", "tiny", "float32", by_b, shapes=shapes)


def test_the_rows_model_prices_each_step_at_its_own_requests_and_replays_exactly(tiny, dspark):
    """cost_model="rows": each step reads the table at its number of requests (`CostTable.at_rows`),
    recorded as price_rows; the replay through JSON gives every step's lengths. A table without shapes is
    refused when the engine is built, with the fix."""
    engine = Engine(tiny, dspark, "algorithm1", shaped_table(), clock=ticking_clock(), cost_model="rows")
    for _ in closed_loop(mixed_requests(10), 4, engine):
        pass
    assert [s.price_rows for s in engine.steps] == [s.active for s in engine.steps]
    assert len({s.active for s in engine.steps}) > 1, "the run never changed its number of requests"
    rep = json.loads(json.dumps(report(engine, 4, "test")))
    assert replay_steps(rep["step_trace"], rep["table"], "algorithm1", batch_tokens=engine.batch_tokens) == \
        [s["lengths"] for s in rep["step_trace"]]
    with pytest.raises(LabkitError, match="reprofile"):
        Engine(tiny, dspark, "algorithm1", steep_table(), cost_model="rows")
