"""What more training data buys: tau against training tokens as a line in log2(tokens).

A data curve (scripts/recipe_ab.py arms shards-N, each trained one epoch over its own data) gives tau
at a few data sizes. Over the range measured here tau rises by a roughly constant amount per doubling
of data, so the curve is summarised by that gain per doubling: the slope of a least-squares line in
log2(tokens). Reading the line beyond the largest point measured is an extrapolation (data curves
bend, and tau is capped by gamma + 1 and by the draft vocabulary's coverage); `tokens_for` says what
the line would ask for, not what a run would reach.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataFit:
    """tau ~ intercept + per_doubling * log2(tokens), fitted over [min_tokens, max_tokens]."""

    intercept: float
    per_doubling: float
    min_tokens: float
    max_tokens: float

    def tau_at(self, tokens: float) -> float:
        return self.intercept + self.per_doubling * math.log2(tokens)

    def tokens_for(self, tau: float) -> float:
        """Training tokens at which the line reaches `tau` (inf where it never rises)."""
        if self.per_doubling <= 0:
            return math.inf
        return 2.0 ** ((tau - self.intercept) / self.per_doubling)


def _checked(tokens: Sequence[float], taus: Sequence[float]) -> list[tuple[float, float]]:
    if len(tokens) != len(taus):
        raise ValueError(f"{len(tokens)} token counts but {len(taus)} tau values: give one tau per data size")
    pts = sorted(zip(map(float, tokens), map(float, taus)))
    if any(t <= 0 for t, _ in pts):
        raise ValueError("training token counts must be positive (tau is fitted against log2 of them)")
    if len({t for t, _ in pts}) < 2:
        raise ValueError("a data curve needs at least two different data sizes")
    return pts


def fit_data_curve(tokens: Sequence[float], taus: Sequence[float]) -> DataFit:
    """Least-squares line of tau against log2(tokens)."""
    pts = _checked(tokens, taus)
    xs = [math.log2(t) for t, _ in pts]
    ys = [y for _, y in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return DataFit(my - slope * mx, slope, pts[0][0], pts[-1][0])


def gains_per_doubling(tokens: Sequence[float], taus: Sequence[float]) -> list[float]:
    """Between consecutive data sizes: the tau gained per doubling of data, (tau_b - tau_a) / log2(b / a)."""
    pts = _checked(tokens, taus)
    if len({t for t, _ in pts}) < len(pts):
        raise ValueError("gains per doubling need one tau per data size: average repeated runs first")
    return [(yb - ya) / math.log2(tb / ta) for (ta, ya), (tb, yb) in zip(pts, pts[1:])]


def read_curve(folder: str | Path, pattern: str) -> list[dict]:
    """The rows of every recipe_ab JSON file matching `pattern` in `folder` (one curve measured in parts),
    sorted by training tokens; empty when none is there."""
    rows = [r for f in sorted(Path(folder).glob(pattern)) for r in json.loads(f.read_text())]
    return sorted(rows, key=lambda r: r["train_response_tokens"])
