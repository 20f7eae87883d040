"""How sure a measurement is, and which sentence it supports.

A notebook that prints "A beat B" from one short run teaches the wrong habit. Every sentence that
interprets a measured difference is chosen here, from the number and its spread: an `Interval` (a
point estimate with a percentile bootstrap interval over the units that were measured, e.g. the
decoding rounds or the repeats of a timing) and `verdict`, which reads the interval against the value
that means "no difference". "Within noise" is a verdict like any other: the run did not settle it.

The bootstrap resamples whole units with replacement (rounds, prompts, repeats), the same draw for
every quantity computed from one resample, so paired quantities (a metric before and after a change,
on the same rounds) keep their pairing. It is seeded: the same data give the same interval.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from labkit.core.errors import LabkitError

#: resamples a bootstrap draws by default: enough for a stable 95% percentile interval
RESAMPLES = 1000
#: the interval's coverage
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A measured value, its bootstrap interval [low, high] at `level`, and how many units it rests on."""

    value: float
    low: float
    high: float
    n: int
    level: float = LEVEL

    def __post_init__(self):
        if not self.low <= self.high:
            raise LabkitError(f"an interval needs low <= high, got [{self.low}, {self.high}].")

    def text(self, fmt: str = ".3f", signed: bool = False) -> str:
        """"0.123 [0.100, 0.150]" (with a sign on each number when `signed`)."""
        f = ("+" if signed else "") + fmt
        return f"{self.value:{f}} [{self.low:{f}}, {self.high:{f}}]"

    def excludes(self, null: float) -> bool:
        return self.high < null or self.low > null


def bootstrap_many(statistic: Callable[[torch.Tensor], torch.Tensor], n: int, resamples: int = RESAMPLES,
                   level: float = LEVEL, seed: int = 0) -> list[Interval]:
    """Percentile bootstrap of a vector of statistics over `n` units: `statistic(index)` returns a 1-D
    tensor, `index` a LongTensor of unit indices (all of them, in order, for the point estimate; drawn
    with replacement for each resample), so every entry is computed from the same draw (paired)."""
    if n < 1:
        raise LabkitError("a bootstrap needs at least one measured unit (a round, a prompt, a repeat).")
    if resamples < 1 or not 0.0 < level < 1.0:
        raise LabkitError(f"a bootstrap needs resamples >= 1 and 0 < level < 1, got {resamples} and {level}.")
    values = torch.as_tensor(statistic(torch.arange(n)), dtype=torch.float64).flatten()
    gen = torch.Generator().manual_seed(seed)
    draws = torch.stack([torch.as_tensor(statistic(torch.randint(n, (n,), generator=gen)), dtype=torch.float64).flatten()
                         for _ in range(resamples)])  # (resamples, K)
    return _percentile(values, draws, n, level)


def _percentile(values: torch.Tensor, draws: torch.Tensor, n: int, level: float) -> list[Interval]:
    """Percentile intervals of K statistics from their point values (K,) and resampled draws (resamples, K)."""
    tail = (1.0 - level) / 2
    bounds = torch.quantile(draws, torch.tensor([tail, 1.0 - tail], dtype=torch.float64), dim=0)  # (2, K)
    return [Interval(v, min(lo, v), max(hi, v), n, level)
            for v, lo, hi in zip(values.tolist(), bounds[0].tolist(), bounds[1].tolist())]


def bootstrap(statistic: Callable[[torch.Tensor], float], n: int, resamples: int = RESAMPLES,
              level: float = LEVEL, seed: int = 0) -> Interval:
    """Percentile bootstrap of one statistic (`bootstrap_many` with a single entry)."""
    return bootstrap_many(lambda i: torch.as_tensor(statistic(i), dtype=torch.float64).reshape(1), n, resamples,
                          level, seed)[0]


def mean_interval(samples, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Interval:
    """The mean of `samples` with its bootstrap interval."""
    x = torch.as_tensor(samples, dtype=torch.float64).flatten()
    return bootstrap(lambda i: x[i].mean(), x.numel(), resamples, level, seed)


def ratio_interval(a, b, paired: bool = False, resamples: int = RESAMPLES, level: float = LEVEL,
                   seed: int = 0) -> Interval:
    """mean(a) / mean(b) with its bootstrap interval; `paired` resamples the pairs (a_i, b_i) together
    (two methods timed on the same prompts), else each sample on its own."""
    x = torch.as_tensor(a, dtype=torch.float64).flatten()
    y = torch.as_tensor(b, dtype=torch.float64).flatten()
    if x.numel() == 0 or y.numel() == 0:
        raise LabkitError("a ratio needs samples on both sides.")
    if paired:
        if x.numel() != y.numel():
            raise LabkitError(f"paired samples need the same count, got {x.numel()} and {y.numel()}.")
        return bootstrap(lambda i: x[i].mean() / y[i].mean(), x.numel(), resamples, level, seed)
    if resamples < 1 or not 0.0 < level < 1.0:
        raise LabkitError(f"a bootstrap needs resamples >= 1 and 0 < level < 1, got {resamples} and {level}.")
    gen = torch.Generator().manual_seed(seed)
    draws = torch.stack([x[torch.randint(x.numel(), (x.numel(),), generator=gen)].mean()
                         / y[torch.randint(y.numel(), (y.numel(),), generator=gen)].mean() for _ in range(resamples)])
    return _percentile((x.mean() / y.mean()).view(1), draws.view(-1, 1), min(x.numel(), y.numel()), level)[0]


def pooled_rate_interval(a, b=None, seed: int = 0) -> Interval:
    """The pooled rate sum(numerator) / sum(denominator) of per-unit (numerator, denominator) rows `a`
    (tokens over seconds, tokens emitted over rounds), or with `b`, a's pooled rate over b's measured on
    the same units; the interval is a paired bootstrap over units. Callers check that every denominator is
    positive and that a and b cover the same units, with their own sentence."""
    x = torch.as_tensor(a, dtype=torch.float64).reshape(-1, 2)
    y = None if b is None else torch.as_tensor(b, dtype=torch.float64).reshape(-1, 2)

    def rate(i):
        r = x[i, 0].sum() / x[i, 1].sum()
        return r if y is None else r / (y[i, 0].sum() / y[i, 1].sum())

    return bootstrap(rate, x.shape[0], seed=seed)


def verdict(value: float, low: float | None, high: float | None, tie: float = 0.01, null: float = 1.0) -> str:
    """A measured value against `null` (1 for a ratio, 0 for a difference), judged by its interval:
    "tied (within tie)" where the whole interval lies within `tie` of null (relative to null for a ratio,
    absolute for null 0), "above" / "below" where it excludes null, "within noise" where it holds null;
    "spread unknown" without an interval."""
    if low is None or high is None:
        return "spread unknown"
    band = tie * abs(null) if null else tie
    if null - band <= low and high <= null + band:
        return f"tied (within {tie:.0%})" if null else f"tied (within {tie:g})"
    if low > null:
        return "above"
    if high < null:
        return "below"
    return "within noise"


def judge(interval: Interval, tie: float = 0.01, null: float = 1.0) -> str:
    """`verdict` of an Interval."""
    return verdict(interval.value, interval.low, interval.high, tie, null)


def describe_ratio(quantity: str, name: str, other: str, interval: Interval, units: str, tie: float = 0.01) -> str:
    """One sentence for a measured ratio of `name`'s `quantity` over `other`'s, chosen by its verdict:
    e.g. "DSpark's tau is 1.08x DFlash's [0.98-1.19, 95% interval over 6 prompts]: within noise, so this
    run cannot tell them apart." `units` names what the interval resampled ("prompts", "repeats")."""
    call = judge(interval, tie)
    head = (f"{name}'s {quantity} is {interval.value:.2f}x {other}'s [{interval.low:.2f}-{interval.high:.2f}, "
            f"{interval.level:.0%} interval over {interval.n} {units}]")
    if call == "above":
        return f"{head}: higher, beyond the noise of this run."
    if call == "below":
        return f"{head}: lower, beyond the noise of this run."
    if call.startswith("tied"):
        return f"{head}: the same within {tie:.0%}."
    return f"{head}: within noise, so this run cannot tell them apart (the full run measures more {units})."
