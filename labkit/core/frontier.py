"""Per-user speed at matched aggregate throughput: the serving frontier's arithmetic (DSpark Sec. 5.3, Fig. 7).

The paper compares a policy with the MTP-1 baseline at *matched aggregate throughput*: on each policy's
frontier of (aggregate throughput, per-user speed) points, read the per-user speed at the same
throughput and take the ratio ("57% to 85% faster per-user generation at matched capacities"). Here:

- `frontier`: one policy's measured points sorted by throughput (ties by speed); points without a
  number are dropped. The frontier is the polyline through them, in that order.
- `speed_at`: per-user speed at a throughput, linear between the two neighbouring points; None
  outside the measured range (never extrapolated). Where the polyline meets the throughput more than
  once (a vertical step, or a frontier that is not monotone) the highest speed there is taken: the best
  the policy was seen to serve at that throughput.
- `overlap`: the throughput range both frontiers cover, or None.
- `matched_gains`: the gain speed / baseline speed - 1 at every measured throughput (either
  frontier's) inside the overlap; `best_gain` the largest of them; `gain_at` one throughput.
- `eq1_speed`: Eq. 1 read as a per-user speed: L = (T_draft + T_verify) / tau per token, so a
  request served one round every `round_s` seconds emits tau / round_s tokens per second (tau as the
  lab counts it: tokens emitted per round, accepted drafts plus the bonus token).

Plain floats only; no model, no tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from labkit.core.errors import LabkitError

#: (aggregate throughput, per-user speed), both in tokens per second
Point = tuple[float, float]


def _number(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def frontier(points: Iterable[tuple[float | None, float | None]]) -> list[Point]:
    """The measured points with both numbers, sorted by throughput (then speed)."""
    return sorted((float(t), float(s)) for t, s in points if _number(t) and _number(s))


def frontiers(points_by_policy: Mapping[str, Iterable[tuple[float | None, float | None]]]) -> dict[str, list[Point]]:
    """`frontier` of each policy's points, in the mapping's order."""
    return {policy: frontier(points) for policy, points in points_by_policy.items()}


def speed_at(front: list[Point], throughput: float) -> float | None:
    """Per-user speed on `front` at `throughput` (linear between measured points); None outside
    [lowest, highest] measured throughput or on an empty frontier."""
    if not front or not _number(throughput) or throughput < front[0][0] or throughput > front[-1][0]:
        return None
    found = [s for t, s in front if t == throughput]
    for (t0, s0), (t1, s1) in zip(front, front[1:]):
        if t0 < throughput < t1:
            found.append(s0 + (s1 - s0) * (throughput - t0) / (t1 - t0))
    return max(found)


def overlap(a: list[Point], b: list[Point]) -> tuple[float, float] | None:
    """The throughput range [lo, hi] both frontiers cover; None when they do not meet."""
    if not a or not b:
        return None
    lo, hi = max(a[0][0], b[0][0]), min(a[-1][0], b[-1][0])
    return (lo, hi) if lo <= hi else None


@dataclass(frozen=True)
class MatchedGain:
    """Both policies' per-user speed at one aggregate throughput, and the gain of the first."""

    throughput: float
    speed: float
    baseline_speed: float

    @property
    def gain(self) -> float | None:
        """speed / baseline_speed - 1 (0.57 is 57% faster); None where the baseline served nothing."""
        return self.speed / self.baseline_speed - 1.0 if self.baseline_speed > 0 else None


def gain_at(front: list[Point], baseline: list[Point], throughput: float) -> float | None:
    """The gain of `front` over `baseline` at one throughput; None where either does not cover it."""
    s, b = speed_at(front, throughput), speed_at(baseline, throughput)
    if s is None or b is None:
        return None
    return MatchedGain(throughput, s, b).gain


def matched_gains(front: list[Point], baseline: list[Point]) -> list[MatchedGain]:
    """The gain at every measured throughput of either frontier inside their overlap, by throughput;
    empty when the frontiers share no throughput."""
    span = overlap(front, baseline)
    if span is None:
        return []
    lo, hi = span
    out = []
    for t in sorted({t for t, _ in front + baseline if lo <= t <= hi}):
        s, b = speed_at(front, t), speed_at(baseline, t)
        out.append(MatchedGain(t, s, b))
    return out


def best_gain(gains: Iterable[MatchedGain]) -> MatchedGain | None:
    """The matched throughput where the gain is largest (the first of equals); None without any."""
    scored = [g for g in gains if g.gain is not None]
    return max(scored, key=lambda g: g.gain) if scored else None


def eq1_speed(tau: float, round_s: float) -> float:
    """Eq. 1 as per-user speed: tau tokens per round, one round every `round_s` seconds
    (T_draft + T_verify, and whatever else the request waits between rounds)."""
    if not _number(round_s) or round_s <= 0:
        raise LabkitError(f"A round takes a positive number of seconds, got {round_s}.")
    return tau / round_s


__all__ = ["MatchedGain", "Point", "best_gain", "eq1_speed", "frontier", "frontiers", "gain_at", "matched_gains",
           "overlap", "speed_at"]
