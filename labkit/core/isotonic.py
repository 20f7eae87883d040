"""The monotone fit of a cost curve: weighted isotonic regression (pool adjacent violators).

One home for the fit the cost table (`labkit.core.scheduler.CostTable`) and the price by rows
(`labkit.core.row_price`) both read."""

from __future__ import annotations

import math
from collections.abc import Sequence

from labkit.core.errors import LabkitError


def isotonic_decreasing(values: Sequence[float], weights: Sequence[float] | None = None
                        ) -> tuple[list[float], list[tuple[int, int]]]:
    """The weighted least-squares non-increasing fit of `values` (pool adjacent violators), and its blocks.

    Walking left to right, a value larger than the block before it violates the order, so the two
    are pooled into one block at their weighted mean, and pooling repeats while the new block is
    larger than the one before it. Returns the fitted value at every index and the blocks as
    (first, last) index pairs, singletons included. A pooled value is a weighted mean of the values it
    pools, so the fit never exceeds the largest value it pools (nor the largest value overall) and
    never falls below the smallest; an already non-increasing sequence passes unchanged.
    """
    values = [float(v) for v in values]
    weights = [1.0] * len(values) if weights is None else [float(w) for w in weights]
    if len(weights) != len(values) or not all(0.0 < w < math.inf for w in weights):
        raise LabkitError(f"the isotonic fit needs one positive, finite weight per value, got {len(weights)} "
                          f"weights for {len(values)} values.")
    blocks: list[list[float]] = []  # [weighted sum, weight, first, last]
    for i, (v, w) in enumerate(zip(values, weights)):
        blocks.append([v * w, w, i, i])
        while len(blocks) > 1 and blocks[-1][0] / blocks[-1][1] > blocks[-2][0] / blocks[-2][1]:
            s, w2, _, last = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += w2
            blocks[-1][3] = last
    fitted: list[float] = []
    for s, w, first, last in blocks:
        mean = s / w
        pooled = values[first:last + 1]
        # A weighted mean lies within its values; the clamp keeps that true through float rounding.
        fitted += [min(max(pooled), max(min(pooled), mean))] * (last - first + 1)
    return fitted, [(int(first), int(last)) for _, _, first, last in blocks]
