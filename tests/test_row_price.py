"""The price by rows (labkit.core.row_price): a profiled R x W grid read at a step's own R, on hand-made grids."""

from __future__ import annotations

import random

import pytest
import torch

from labkit.core.errors import LabkitError
from labkit.core.row_price import RowPrice, Shape
from labkit.core.scheduler import Algorithm1, CostTable, ScheduleInput, make_policy
from labkit.core.simulate import replay_steps

ROWS, WIDTHS = (1, 2, 4, 8, 16), (1, 2, 4, 6, 9)


def grid(seconds) -> list[Shape]:
    return [Shape(r, w, seconds(r, w)) for r in ROWS for w in WIDTHS]


def linear(r: int, w: int) -> float:
    """A forward that costs 10 ms, 0.5 ms a row and 1 ms a token: monotone in both."""
    return 0.010 + 0.0005 * r + 0.001 * r * w


def test_a_profiled_shape_is_priced_at_its_own_median():
    shapes = grid(linear)
    for r in ROWS:
        for w in WIDTHS:
            assert RowPrice(shapes, r).sps(r * w) == pytest.approx(1.0 / linear(r, w), rel=1e-12)


def test_between_row_counts_the_seconds_interpolate_linearly_at_equal_width():
    shapes = grid(linear)
    # linear() is linear in r at fixed w, so interpolating in R reproduces it exactly
    for r in (3, 5, 6, 7, 12):
        for w in WIDTHS:
            assert RowPrice(shapes, r).seconds(w) == pytest.approx(linear(r, w), rel=1e-12)


def test_past_the_largest_row_count_a_row_more_never_makes_a_step_cheaper():
    """Extrapolated along the last two counts; a grid whose cost falls from 8 to 16 rows is held at 16's."""
    falling = grid(lambda r, w: 0.05 - 0.001 * r + 0.001 * w)
    for r in (17, 24, 32, 64):
        price = RowPrice(falling, r)
        for w in WIDTHS:
            assert price.seconds(w) >= RowPrice(falling, 16).seconds(w) - 1e-15
    rising = grid(linear)
    assert RowPrice(rising, 32).seconds(1) == pytest.approx(linear(32, 1), rel=1e-12)


def test_sps_never_rises_with_batch_tokens_on_noisy_grids():
    rng = random.Random(7)
    for _ in range(100):
        shapes = grid(lambda r, w: linear(r, w) * rng.uniform(0.7, 1.3))
        for r in (1, 2, 3, 7, 8, 13, 16, 27, 40):
            price = RowPrice(shapes, r)
            sps = [price.sps(b) for b in [r * x / 4 for x in range(1, 60)]]
            assert all(b <= a * (1 + 1e-12) for a, b in zip(sps, sps[1:])), (r, sps)


def test_past_the_widest_profiled_width_time_per_token_stays_constant():
    price = RowPrice(grid(linear), 4)
    assert price.seconds(18) == pytest.approx(2 * linear(4, 9), rel=1e-12)


def test_bad_grids_are_refused_with_the_fix():
    with pytest.raises(LabkitError, match="re-profile"):
        RowPrice([Shape(1, 1, 0.0)], 1)
    with pytest.raises(LabkitError, match="twice"):
        RowPrice([Shape(1, 1, 0.1), Shape(1, 1, 0.2)], 1)
    with pytest.raises(LabkitError, match="same widths"):
        RowPrice([Shape(1, 1, 0.1), Shape(2, 2, 0.2)], 1)
    with pytest.raises(LabkitError, match="at least one row"):
        RowPrice(grid(linear), 0)
    with pytest.raises(LabkitError, match="cost model 'table'"):
        CostTable("cpu", "m", "float32", [1], [10.0]).at_rows(4)


def _table(seconds) -> CostTable:
    """The pooled table of a grid, as the profiler builds it (every shape of one B pooled), shapes kept."""
    by_b: dict[int, list[float]] = {}
    shapes = grid(seconds)
    for s in shapes:
        by_b.setdefault(s.rows * s.width, []).append(1.0 / s.seconds)
    return CostTable.from_samples("cpu", "m", "float32", by_b, shapes=shapes)


def per_row_heavy(r: int, w: int) -> float:
    """Rows cost far more than tokens (each row's attention over its cache): 16 rows of 1 token cost
    more than 2 rows of 6, so the pooled table is steep between B = 12 and 16 where a step of 8 rows
    verifying a first draft each (8 -> 16 tokens) costs little."""
    return 0.020 + 0.004 * r + 0.0002 * r * w


def test_the_price_by_rows_verifies_the_first_drafts_the_pooled_table_overprices():
    table = _table(per_row_heavy)
    conf = torch.full((8, 4), 0.02)
    conf[:, 0] = 0.6
    pooled = Algorithm1()(ScheduleInput(conf=conf, table=table))
    rows = Algorithm1()(ScheduleInput(conf=conf, table=table.at_rows(8)))
    # the real cost of 8 rows x 2 tokens against 8 x 1: +1.6 ms on 54 ms, a 3% price for +16% tokens
    assert rows == [1] * 8
    assert sum(pooled) < 8


def test_the_stored_table_keeps_its_shapes_and_prices_the_same():
    table = _table(per_row_heavy)
    back = CostTable.from_dict(table.to_dict())
    assert back.shapes == table.shapes
    for r in (1, 5, 8, 30):
        assert back.at_rows(r).sps(3 * r) == table.at_rows(r).sps(3 * r)


def test_a_step_priced_by_rows_replays_as_the_engine_decided():
    """replay_steps reads `price_rows` and asks the table at that row count, as the engine did."""
    table = _table(per_row_heavy)
    conf = [[0.6, 0.2, 0.2]] * 8
    step = {"ids": list(range(8)), "conf": conf, "draft_cost_s": 0.0, "price_rows": 8}
    pooled_step = dict(step, price_rows=None)
    by_rows = replay_steps([step], table.to_dict(), "algorithm1")[0]
    by_table = replay_steps([pooled_step], table.to_dict(), "algorithm1")[0]
    assert by_rows == make_policy("algorithm1")(ScheduleInput(conf=torch.tensor(conf), table=table.at_rows(8)))
    assert by_rows != by_table
