"""SPS(B) at the step's own number of rows: the price a CPU's verify forward needs besides B.

The paper's table is SPS(B), one curve over the tokens of a flattened batch (Sec. 3.2.2, 5.3): on an
accelerator a forward of B tokens costs by B. On this CPU a forward of R rows x W tokens also pays per
row (each row's attention over its own cache, per-row bookkeeping), so shapes with the same B cost
differently: 2 rows of 6 tokens less than 16 rows of 1. A table that pools every shape with one B
into one median then prices a step by shapes it is not: measured on session 7's 2-core CPU, the pooled
table rose from 61 to 73 ms between B = 12 (2 x 6) and B = 16 (16 x 1 among others), while the engine's
step at 8 requests verifying one draft more each did not rise at all, and Algorithm 1 left first drafts
unverified that would have paid (data/serving/cpu-measurements-2026-12-06.md, sweep15). On session 8's
AVX2-only CPU the price by rows did not serve better than the pooled table (sweep17), so the engine's
default stays the pooled table and this is the cost model `rows`.

`RowPrice` reads the profiled shapes (rows, width, median seconds) at the step's R instead: along each
profiled row count the seconds are fitted non-decreasing in W (the table's isotonic fit); at an R between
two profiled counts they are interpolated linearly in R at equal width, past the largest count
extrapolated along the last two counts' slope (never below the largest count's time), below the fewest
read as that count's; between profiled widths they are interpolated linearly in W, and past the widest
the time per token stays constant. SPS at B is then 1 / seconds(B / R): non-increasing in B at every R,
the shape Algorithm 1's break assumes. Building one costs about 0.14 ms (once a step).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from labkit.core.errors import LabkitError
from labkit.core.isotonic import isotonic_decreasing


@dataclass(frozen=True)
class Shape:
    """One profiled verify forward: `rows` rows of `width` new tokens took `seconds` (a median)."""

    rows: int
    width: int
    seconds: float


def _non_decreasing(seconds: Sequence[float]) -> list[float]:
    """The least-squares non-decreasing fit (pool adjacent violators), equal weights: the table's fit,
    read as time instead of speed."""
    return [-v for v in isotonic_decreasing([-s for s in seconds])[0]]


def check_shapes(shapes: Sequence[Shape]) -> dict[int, dict[int, float]]:
    """{rows: {width: seconds}} of valid shapes, or a LabkitError naming what is wrong."""
    grid: dict[int, dict[int, float]] = {}
    for s in shapes:
        if s.rows < 1 or s.width < 1 or not 0.0 < s.seconds < float("inf"):
            raise LabkitError(f"a profiled shape needs rows >= 1, width >= 1 and positive finite seconds, got {s}: "
                              "re-profile the device (`serve-sweep --reprofile`).")
        if s.width in grid.setdefault(s.rows, {}):
            raise LabkitError(f"the shape {s.rows} x {s.width} is listed twice: keep one median per shape.")
        grid[s.rows][s.width] = s.seconds
    if not grid:
        raise LabkitError("a price by rows needs at least one profiled shape.")
    widths = {tuple(sorted(ws)) for ws in grid.values()}
    if len(widths) != 1:
        raise LabkitError("every profiled row count needs the same widths (the profile's R x W grid), got "
                          f"{ {r: sorted(ws) for r, ws in grid.items()} }.")
    return grid


class RowPrice:
    """SPS(B) for a step of `rows` requests, from the profiled R x W shapes (see the module docstring)."""

    def __init__(self, shapes: Sequence[Shape], rows: int):
        if rows < 1:
            raise LabkitError(f"a step's price needs at least one row, got {rows}.")
        grid = check_shapes(shapes)
        counts = sorted(grid)
        self.rows = int(rows)
        self.widths = sorted(grid[counts[0]])
        fitted = {r: _non_decreasing([grid[r][w] for w in self.widths]) for r in counts}
        self.seconds_at = _at_rows(fitted, counts, self.rows)

    def seconds(self, width: float) -> float:
        """Seconds of a forward of this many rows, `width` tokens each (fractional widths interpolate)."""
        xs, ys = self.widths, self.seconds_at
        if width <= xs[0]:
            return ys[0]
        if width >= xs[-1]:
            return ys[-1] * width / xs[-1]
        i = bisect.bisect_right(xs, width)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return max(y0, min(y1, y0 + (y1 - y0) * (width - x0) / (x1 - x0)))

    def sps(self, batch_tokens: float) -> float:
        return 1.0 / self.seconds(batch_tokens / self.rows)


def _at_rows(fitted: dict[int, list[float]], counts: list[int], rows: int) -> list[float]:
    """Seconds at each profiled width for `rows` rows: linear in R between the two nearest profiled
    counts; past the largest along the last two counts' slope, never below the largest count's time;
    below the fewest profiled, that count's own (no profile says how much cheaper fewer rows are)."""
    if rows in fitted or len(counts) == 1 or rows < counts[0]:
        return list(fitted.get(rows, fitted[counts[0]]))
    i = min(bisect.bisect_left(counts, rows), len(counts) - 1)
    lo, hi = counts[i - 1], counts[i]  # the bracketing counts, or the last two past them
    t = (rows - lo) / (hi - lo)
    out = [a + t * (b - a) for a, b in zip(fitted[lo], fitted[hi])]
    if rows > hi:  # extrapolated: a row more never makes a step cheaper
        out = [max(v, b) for v, b in zip(out, fitted[hi])]
    return _non_decreasing(out)
