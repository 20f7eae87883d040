"""The hardware-aware prefix scheduler as pure math: confidences and a cost table in, lengths out.

Paper references (DSpark): Sec. 3.2.2 and Algorithm 1 (the causal greedy scheduler with its early
break), Sec. 5.2 (the production variant: capacity from confidences two steps old, a dynamic top-K,
no break) and Appendix A (why a search past the first drop is biased, with a worked counterexample).

This module knows no model. A batched engine calls a policy once per step with a `ScheduleInput`:
per-request calibrated confidences c_{r,j} (the probability that draft j survives given that all
before it did) and a `CostTable` of target forward steps per second, SPS(B), at B tokens. The policy
returns l_r, the number of request r's drafts to verify; the admitted slots are always a prefix.

Notation: survival a_{r,j} = prod_{i<=j} c_{r,i}; expected accepted tokens tau = sum_r (1 + sum_{j<=l_r}
a_{r,j}) (the 1 is the token the target always emits); expected throughput theta = tau * SPS(B).
"""

from __future__ import annotations

import bisect
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from labkit.core.calibration import survival
from labkit.core.errors import LabkitError
from labkit.core.isotonic import isotonic_decreasing
from labkit.core.layout import layout_tokens
from labkit.core.row_price import RowPrice, Shape, check_shapes
from labkit.core.sampling import verify_chain

# ---------------------------------------------------------------------------------------------------
# Cost table: SPS(B), profiled once per (device, model, dtype)

TAILS = ("proportional", "constant")

#: the name of the table's fit, stored with it: a table stored without it (the old running median and
#: envelope) is refitted from its raw medians when its cost-table file loads (`load_cost_tables`)
FIT = "isotonic"


def _quartile_samples(xs: Sequence[float]) -> tuple[float, float, float]:
    """(lower quartile, upper median, upper quartile) of xs, each one of the samples (order statistics)."""
    xs = sorted(float(x) for x in xs)
    n = len(xs)
    return xs[(n - 1) // 4], xs[n // 2], xs[math.ceil(3 * (n - 1) / 4)]


@dataclass
class CostTable:
    """Target forward steps per second at each profiled batch size B (tokens in the forward).

    `raw_sps` is the measured median per B (the upper median: a measured value); `counts` the number of
    samples behind it (None: one each, e.g. a table stored before counts were kept); `raw_low` /
    `raw_high` the lower and upper quartile samples, the spread of the measurements (None: not kept).
    `smoothed_sps` is the fit that `sps(B)` reads: the weighted isotonic (non-increasing) regression of
    the medians (`isotonic_decreasing`, weights = counts), unless given. Past the last profiled size
    the tail is "proportional" (time per token constant, so SPS falls as 1/B: a guess that never makes
    a bigger batch look cheaper) or "constant" (only for a flat, unprofiled table).

    Why this fit (docs/method.md, "The hardware-aware prefix scheduler"): Algorithm 1's early break
    needs SPS non-increasing in B, and a fit that pools the measurements that disagree with that order
    into their weighted mean adds no speed that no measurement supports. The earlier fit, an upper
    envelope from the right, copied the fastest value measured at any larger B over every smaller one,
    so one lucky median made a flat run of free admissions that ended in a cliff exactly there.
    """

    device: str
    model: str
    dtype: str
    batch_sizes: list[int]
    raw_sps: list[float]
    smoothed_sps: list[float] | None = None
    counts: list[int] | None = None
    raw_low: list[float] | None = None
    raw_high: list[float] | None = None
    tail: str = "proportional"
    #: the profiled R x W shapes behind the medians, where kept: what `at_rows` prices a step by
    shapes: list[Shape] | None = None

    def __post_init__(self):
        self.batch_sizes = [whole_number(b, "every batch size") for b in self.batch_sizes]
        self.raw_sps = [float(s) for s in self.raw_sps]
        n = len(self.raw_sps)
        if not self.batch_sizes or len(self.batch_sizes) != n:
            raise LabkitError(f"a cost table needs one SPS per batch size and at least one of each, got "
                              f"{len(self.batch_sizes)} batch sizes and {n} SPS values.")
        if any(b < 1 for b in self.batch_sizes) or any(
                b1 <= b0 for b0, b1 in zip(self.batch_sizes, self.batch_sizes[1:])):
            raise LabkitError(f"batch sizes must be positive and strictly increasing, got {self.batch_sizes}: "
                              "sort them and drop duplicates.")
        if not all(0.0 < s < math.inf for s in self.raw_sps):
            raise LabkitError(f"every SPS must be positive and finite, got {self.raw_sps}: re-profile the device.")
        if self.tail not in TAILS:
            raise LabkitError(f"tail must be one of {', '.join(TAILS)}, got {self.tail!r}.")
        if self.counts is not None:
            self.counts = [whole_number(c, "every sample count") for c in self.counts]
            if len(self.counts) != n or any(c < 1 for c in self.counts):
                raise LabkitError(f"counts must hold one sample count >= 1 per batch size, got {self.counts}.")
        if (self.raw_low is None) != (self.raw_high is None):
            raise LabkitError("raw_low and raw_high (the spread of the samples) go together: give both or neither.")
        if self.raw_low is not None:
            self.raw_low = [float(v) for v in self.raw_low]
            self.raw_high = [float(v) for v in self.raw_high]
            if len(self.raw_low) != n or len(self.raw_high) != n or not all(
                    0.0 < lo <= r <= hi < math.inf for lo, r, hi in zip(self.raw_low, self.raw_sps, self.raw_high)):
                raise LabkitError("raw_low and raw_high must hold one positive value per batch size with "
                                  "raw_low <= raw_sps <= raw_high (the quartiles around the median).")
        if self.shapes is not None:
            self.shapes = [s if isinstance(s, Shape) else Shape(int(s[0]), int(s[1]), float(s[2])) for s in self.shapes]
            check_shapes(self.shapes)
        if self.smoothed_sps is None:
            self.smoothed_sps = isotonic_decreasing(self.raw_sps, self.counts)[0]
        self.smoothed_sps = [float(s) for s in self.smoothed_sps]
        s = self.smoothed_sps
        if len(s) != n or not all(0.0 < v < math.inf for v in s) or any(
                v1 > v0 for v0, v1 in zip(s, s[1:])):
            raise LabkitError("smoothed_sps must hold one positive value per batch size, non-increasing in B: "
                              "leave it out and the table fits it to raw_sps.")

    @classmethod
    def from_samples(cls, device: str, model: str, dtype: str, samples: dict[int, Sequence[float]],
                     tail: str = "proportional", shapes: list[Shape] | None = None) -> CostTable:
        """The table of SPS samples per B ({B: [steps per second, ...]}): per B the upper median, the
        quartile samples as its spread, the number of samples as the fit's weight; `shapes`, the
        profiled R x W grid behind them, if kept."""
        sizes = sorted(samples)
        if not sizes or any(len(samples[b]) == 0 for b in sizes):
            raise LabkitError("a cost table needs at least one SPS sample at every batch size it lists.")
        low, mid, high = (list(q) for q in zip(*(_quartile_samples(samples[b]) for b in sizes)))
        return cls(device, model, dtype, sizes, mid, counts=[len(samples[b]) for b in sizes],
                   raw_low=low, raw_high=high, tail=tail, shapes=shapes)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.device, self.model, self.dtype)

    @property
    def pooled(self) -> list[list[int]]:
        """The batch sizes that the fit pooled into one value, one list per pool of two or more sizes."""
        blocks = isotonic_decreasing(self.raw_sps, self.counts)[1]
        return [self.batch_sizes[first:last + 1] for first, last in blocks if last > first]

    def sps(self, batch_tokens: float) -> float:
        """SPS at B tokens: linear between profiled sizes on the fitted curve, clamped below the first."""
        xs, ys = self.batch_sizes, self.smoothed_sps
        if batch_tokens <= xs[0]:
            return ys[0]
        if batch_tokens >= xs[-1]:
            if self.tail == "constant" or batch_tokens == xs[-1]:
                return ys[-1]
            # Beyond the profile, a forward of B tokens is assumed to cost B times the last per-token time.
            return ys[-1] * (xs[-1] / batch_tokens)
        i = bisect.bisect_right(xs, batch_tokens)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        # Clamped to the segment so that rounding can never make SPS rise where segments meet.
        return min(y0, max(y1, y0 + (y1 - y0) * (batch_tokens - x0) / (x1 - x0)))

    def at_rows(self, rows: int) -> RowPrice:
        """SPS(B) for a step of `rows` requests, read off the profiled shapes (`labkit.core.row_price`)."""
        if not self.shapes:
            raise LabkitError("this cost table keeps no profiled shapes, so it cannot price by rows: re-profile "
                              "it (`serve-sweep --reprofile`) or use the cost model 'table'.")
        return RowPrice(self.shapes, rows)

    @classmethod
    def flat(cls, sps: float = 1.0, device: str = "unprofiled", model: str = "any",
             dtype: str = "any") -> CostTable:
        """The same SPS at every B (SGLang's unprofiled table): every cost-aware policy verifies all."""
        return cls(device, model, dtype, [1], [sps], tail="constant")

    def to_dict(self) -> dict:
        d = {"device": self.device, "model": self.model, "dtype": self.dtype,
             "batch_sizes": list(self.batch_sizes), "raw_sps": list(self.raw_sps),
             "smoothed_sps": list(self.smoothed_sps), "fit": FIT, "tail": self.tail}
        for name in ("counts", "raw_low", "raw_high"):
            if getattr(self, name) is not None:
                d[name] = list(getattr(self, name))
        if self.shapes is not None:
            d["shapes"] = [[s.rows, s.width, s.seconds] for s in self.shapes]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CostTable:
        """The table as stored, its fitted curve included (a serve report's table replays exactly as the
        policy saw it); only a cost-table file refits an old fit (`load_cost_tables`)."""
        missing = [k for k in ("device", "model", "dtype", "batch_sizes", "raw_sps") if k not in d]
        if missing:
            raise LabkitError(f"a stored cost table lacks {', '.join(missing)}: re-profile and save it again.")
        known = {"device", "model", "dtype", "batch_sizes", "raw_sps", "smoothed_sps", "counts", "raw_low",
                 "raw_high", "tail", "shapes"}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: str | Path) -> None:
        """Store this table in the JSON file at `path`, replacing one with the same key, atomically."""
        tables = load_cost_tables(path)
        tables[self.key] = self
        payload = {"version": 1, "tables": [t.to_dict() for t in tables.values()]}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target, then rename: a reader never sees half a file, a crash leaves the old one.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(payload, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path, device: str, model: str, dtype: str) -> CostTable | None:
        """The table stored for (device, model, dtype) in the file at `path`; None if there is none."""
        return load_cost_tables(path).get((device, model, dtype))


def load_cost_tables(path: str | Path) -> dict[tuple[str, str, str], CostTable]:
    """Every table in a cost-table JSON file, keyed by (device, model, dtype); {} if the file is absent.

    The file is a cache of profiles, so a table stored with another fit than `FIT` (the old running
    median and envelope, stored without a fit name) is refitted from its raw medians as it loads."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        payload = json.loads(path.read_text())
        tables = [CostTable.from_dict(d if d.get("fit") == FIT else {k: v for k, v in d.items() if k != "smoothed_sps"})
                  for d in payload["tables"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise LabkitError(f"{path} is not a cost-table file ({exc}): delete it or re-profile to rewrite it."
                          ) from exc
    return {t.key: t for t in tables}


# ---------------------------------------------------------------------------------------------------
# What a policy sees


class HasSPS(Protocol):
    def sps(self, batch_tokens: float) -> float: ...


#: weight of the newest measurement in the running mean of drafting time (the engine's and sched:'s)
DRAFT_EMA = 0.2


def running_mean(mean: float | None, new: float, weight: float = DRAFT_EMA) -> float:
    """An exponential moving average: `new` itself when there is no mean yet."""
    return new if mean is None else (1 - weight) * mean + weight * new


class RoundRate:
    """A verify-cost table seen as whole rounds (or engine steps): sps(B) = 1 / (T_draft + 1 / verify.sps(B)).

    The table times the target forward alone, but a round also drafts, and on a CPU that is a large,
    fixed share of it: Algorithm 1 must weigh a verified token against the whole round, or it stops
    verifying as soon as the forward slows. T_draft is a running mean of past rounds (`running_mean`),
    never this round's, so the schedule depends on nothing drawn in it. Non-increasing in B whenever
    `verify` is, which is the shape Algorithm 1's early break assumes.
    """

    def __init__(self, verify: HasSPS, draft_s: float):
        if not draft_s >= 0.0:
            raise LabkitError(f"the drafting time must be >= 0 seconds, got {draft_s}.")
        self.verify, self.draft_s = verify, float(draft_s)

    def sps(self, batch_tokens: float) -> float:
        return 1.0 / (self.draft_s + 1.0 / self.verify.sps(batch_tokens))


def packed_tokens(lengths: list[int]) -> int:
    """B = sum_r (1 + l_r): tokens of a flattened batch (paper Sec. 3.2.2, 5.3); the default count."""
    return len(lengths) + sum(lengths)


@dataclass
class ScheduleInput:
    """One step's scheduling problem.

    conf: (R, gamma) calibrated confidences c_{r,j} in [0, 1]; request r has `max_lengths[r]` real
      drafts (default gamma), entries past that are ignored (they may be padding, even NaN).
    table: a CostTable or anything with `.sps(B)`.
    batch_tokens: lengths -> B, the tokens the target forward computes; the default is the packed
      count; an engine that pads passes its own (e.g. lambda l: len(l) * (1 + max(l))).
    old_conf / old_max_lengths: confidences of two steps before, row r for the same request r, for the
      production variant. An old_max_lengths entry of None marks a request that did not exist then
      (survival 1 at each of its current slots); old_conf None means every request is new.
    attention_weight: what one attention query column costs in tokens of the forward
      (`labkit.core.layout`); read only by the layout-aware policy, 0 prices by B alone.
    """

    conf: torch.Tensor
    table: HasSPS
    max_lengths: list[int] | None = None
    batch_tokens: Callable[[list[int]], int] = packed_tokens
    old_conf: torch.Tensor | None = None
    old_max_lengths: list[int | None] | None = None
    attention_weight: float = 0.0

    def __post_init__(self):
        if not callable(getattr(self.table, "sps", None)):
            raise LabkitError("the cost table must have an sps(B) method: pass a CostTable (CostTable.flat() "
                              "if the device is not profiled).")
        self.conf, self.max_lengths = _checked_conf(self.conf, self.max_lengths, "conf", "max_lengths")
        self.old_conf, self.old_max_lengths = _checked_old(self.old_conf, self.old_max_lengths, self.conf.shape[0])

    @property
    def n_requests(self) -> int:
        return self.conf.shape[0]


def _checked_old(old_conf, old_lengths, n_req: int) -> tuple[torch.Tensor | None, list[int | None] | None]:
    """The production variant's history; rows of requests that are new since are not looked at."""
    if old_conf is None:
        if old_lengths is not None and any(m is not None for m in old_lengths):
            raise LabkitError("old_max_lengths was given without old_conf: pass both, or neither "
                              "(every request then counts as new).")
        return None, None
    if not isinstance(old_conf, torch.Tensor) or old_conf.dim() != 2 or old_conf.shape[0] != n_req:
        raise LabkitError(f"old_conf must have one row per current request ({n_req}), got shape "
                          f"{tuple(getattr(old_conf, 'shape', ()))}: row r holds request r's confidences of "
                          "two steps before; mark a request that did not exist then with None in old_max_lengths.")
    if old_lengths is None:
        old_lengths = [old_conf.shape[1]] * n_req
    if len(old_lengths) != n_req:
        raise LabkitError(f"old_max_lengths must have one entry per request ({n_req}), got {len(old_lengths)}.")
    old_conf, known = _checked_conf(old_conf, [0 if m is None else m for m in old_lengths],
                                    "old_conf", "old_max_lengths")
    return old_conf, [None if m is None else k for m, k in zip(old_lengths, known)]


def whole_number(x, what: str) -> int:
    """x as an int where it is a whole number (2.0 too), else an error naming `what`."""
    try:
        whole = not isinstance(x, bool) and float(x).is_integer()
    except (TypeError, ValueError):
        whole = False
    if not whole:
        raise LabkitError(f"{what} must be a whole number, got {x!r}.")
    return int(x)


def _checked_conf(conf, max_lengths, name: str, lengths_name: str) -> tuple[torch.Tensor, list[int]]:
    """conf as float64 on the CPU (the scheduler's arithmetic is a few hundred floats) and its lengths."""
    if not isinstance(conf, torch.Tensor) or conf.dim() != 2:
        shape = tuple(conf.shape) if isinstance(conf, torch.Tensor) else type(conf).__name__
        raise LabkitError(f"{name} must be a 2-D tensor (requests, gamma), got {shape}: stack each request's "
                          "confidences into one row, padding short rows and giving their max_lengths.")
    conf = conf.detach().to("cpu", torch.float64)
    n_req, gamma = conf.shape
    if max_lengths is None:
        max_lengths = [gamma] * n_req
    max_lengths = [whole_number(m, f"every entry of {lengths_name}") for m in max_lengths]
    if len(max_lengths) != n_req:
        raise LabkitError(f"{lengths_name} must have one entry per row of {name} ({n_req}), "
                          f"got {len(max_lengths)}.")
    bad = [m for m in max_lengths if not 0 <= m <= gamma]
    if bad:
        raise LabkitError(f"{lengths_name} entries must lie in 0..{gamma} (the width of {name}), got {bad}.")
    real = torch.arange(gamma) < torch.tensor(max_lengths, dtype=torch.long).view(-1, 1)
    values = conf[real]
    if values.numel() and not bool(((values >= 0) & (values <= 1)).all()):  # NaN fails both comparisons
        worst = values[~((values >= 0) & (values <= 1))][0].item()
        raise LabkitError(f"{name} must hold probabilities in [0, 1], found {worst}: pass calibrated "
                          "confidences (sigmoid outputs), not logits, and check the drafter for NaN.")
    return conf, max_lengths


# ---------------------------------------------------------------------------------------------------
# Survival, the global sort, the throughput objective


@dataclass
class AdmissionPath:
    """Algorithm 1, line 4: every candidate (r, j) with a_{r,j} > 0 (j counted from 1), in ONE global sort.

    Descending by a; ties by position j, then request r. Because a is non-increasing along a row, a
    slot never precedes the slot before it, so any leading run of the path is a set of prefixes. Kept
    as three plain lists because the search walks it with float math, one candidate at a time.
    """

    requests: list[int]
    positions: list[int]
    survival: list[float]

    def __len__(self) -> int:
        return len(self.requests)

    def candidates(self) -> list[tuple[int, int, float]]:
        return list(zip(self.requests, self.positions, self.survival))


def admission_path(inp: ScheduleInput) -> AdmissionPath:
    """The sorted candidates of `inp` (see AdmissionPath)."""
    return _path(survival(inp.conf, inp.max_lengths))


def _path(a: torch.Tensor) -> AdmissionPath:
    n_req = a.shape[0]
    values, order = _sorted(a)
    if n_req == 0:
        return AdmissionPath([], [], [])
    return AdmissionPath((order % n_req).tolist(), (order // n_req + 1).tolist(), values.tolist())


def _sorted(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Survivals > 0 best first, and their flat indices j * R + r (0-based j)."""
    flat = a.t().reshape(-1)  # column-major: index j * R + r, so a stable sort breaks ties by (j, r)
    values, order = torch.sort(flat, descending=True, stable=True)
    n = int((values > 0).sum())
    return values[:n], order[:n]


def expected_tokens(inp: ScheduleInput, lengths: list[int]) -> float:
    """tau* = R + sum_r sum_{j<=l_r} a_{r,j}: the tokens a step verifying `lengths` is expected to emit."""
    a = survival(inp.conf, inp.max_lengths)
    admitted = torch.arange(a.shape[1]) < torch.tensor(lengths, dtype=torch.long).view(-1, 1)
    return inp.n_requests + float(a[admitted].sum())


def expected_throughput(inp: ScheduleInput, lengths: list[int]) -> float:
    """theta = tau* x SPS(batch_tokens(lengths)) (`expected_tokens`): what the scheduler maximises."""
    return expected_tokens(inp, lengths) * inp.table.sps(inp.batch_tokens(list(lengths)))


@dataclass
class Walk:
    """Algorithm 1's admission path walked (to its end, or to the break): after k admissions the batch size
    B_k, tau*_k = R + sum of the first k survivals, and SPS(B_k); theta_k = tau*_k x SPS(B_k).

    The one home of the walk's arithmetic: `Algorithm1` keeps `algorithm1_k` admissions (it stops at
    the first admission that does not raise theta above the best so far, `break_at`), the biased
    retrospective search keeps `peak_k` (the first global maximum), and notebook 05 draws the walk.
    """

    path: AdmissionPath
    batch_tokens: list[int]
    tau: list[float]
    sps: list[float]
    n_requests: int
    start: list[int] | None = None  # the lengths the walk started from (None: all zero)

    @property
    def theta(self) -> list[float]:
        return [t * s for t, s in zip(self.tau, self.sps)]

    @property
    def break_at(self) -> int | None:
        theta = self.theta
        best = theta[0]
        for k in range(1, len(theta)):
            if not theta[k] > best:
                return k
            best = theta[k]
        return None

    @property
    def algorithm1_k(self) -> int:
        return len(self.theta) - 1 if self.break_at is None else self.break_at - 1

    @property
    def peak_k(self) -> int:
        theta = self.theta
        return max(range(len(theta)), key=lambda k: (theta[k], -k))  # the first maximum

    def lengths(self, k: int) -> list[int]:
        """l_r after the first k admissions (each extends one request's prefix by one)."""
        return _lengths_of(self.path, k, self.n_requests, self.start)


def walk(a: torch.Tensor, table: HasSPS, count: Callable[[list[int]], int], until_break: bool = False,
         start: list[int] | None = None, start_tau: float = 0.0) -> Walk:
    """Admit the candidates of the global sort of survivals `a` in turn (Algorithm 1, lines 4-10),
    recording B, tau* and SPS after each: `count(lengths)` is the batch size the verify forward
    computes for those lengths (`packed_tokens`: the paper's B = sum_r (1 + l_r)).

    `until_break`: stop at the first admission that does not raise theta (Algorithm 1's break), so
    that neither SPS nor `count` is asked about anything past it; else walk the whole path.
    `start`: lengths already admitted (their slots must be absent from `a`'s candidates, i.e. zero
    there, and every candidate must extend a prefix), `start_tau` the sum of their survivals: tau*
    starts at R + start_tau."""
    n_req = a.shape[0]
    path = _path(a)
    lengths = [0] * n_req if start is None else list(start)
    if start is not None:
        admitted = torch.arange(a.shape[1]) < torch.tensor(start, dtype=torch.long).view(-1, 1)
        if bool((a[admitted] > 0).any()):
            raise LabkitError("walk(start=...): the admitted slots must be zero in the survivals walked.")
    out = Walk(path, [count(lengths)], [float(n_req) + start_tau], [], n_req, None if start is None else list(start))
    out.sps.append(table.sps(out.batch_tokens[0]))
    best = out.tau[0] * out.sps[0]
    for r, j, gain in path.candidates():
        lengths[r] = j
        out.batch_tokens.append(count(lengths))
        out.tau.append(out.tau[-1] + gain)  # the marginal expected accept of slot j is exactly a_{r,j}
        out.sps.append(table.sps(out.batch_tokens[-1]))
        theta = out.tau[-1] * out.sps[-1]
        if not theta > best and until_break:
            break
        best = max(best, theta)
    return out


def admission_walk(inp: ScheduleInput, until_break: bool = False) -> Walk:
    """The walk of `inp`'s candidates (see `walk`)."""
    return walk(survival(inp.conf, inp.max_lengths), inp.table, inp.batch_tokens, until_break)


def _lengths_of(path: AdmissionPath, k: int, n_req: int, start: list[int] | None = None) -> list[int]:
    """Lengths after admitting the first k candidates of the path (each extends a prefix by one)."""
    lengths = [0] * n_req if start is None else list(start)
    for r, j in zip(path.requests[:k], path.positions[:k]):
        lengths[r] = j
    return lengths


def newcomer_cap(last_lengths: list[int] | None) -> int:
    """The draft cap of a request new since the last step under a policy that chooses lengths from
    confidences (`next_draft_cap`'s `newcomer`): the longest length the last step verified, at least one
    draft (one at the first step). Not one past it: a newcomer that verifies all of its cap is not held and
    grows by one a step from there, while under load, where every request verifies one draft, a newcomer
    drafting two made its step run the drafter's head twice (at 8 users on this CPU 26 of 108 steps drafted
    past what they verified, a second head step costing about 7 ms of a 112 ms step, data/serving/,
    session 12), and an uncapped first step drafted whole blocks nobody could verify."""
    return max(1, max(last_lengths or [0]))


def next_draft_cap(last_length: int | None, held: bool, newcomer: int | None, step: int,
                   probe_every: int | None = None, may_pay: bool = True) -> int | None:
    """How many tokens a request drafts next under a policy that chooses lengths from confidences: one
    past the length the policy chose for it at its last step (`last_length`; a request new since then:
    `newcomer`, `newcomer_cap`), so its cap grows while the policy wants more of it.

    With `probe_every` P, a request `held` at its length (`held_after`: the policy stopped it short of a
    draft it paid for) drafts only that length (at least one) except at every P-th engine `step`, where
    it drafts one past it again to see whether a deeper draft now pays: under load a policy that keeps
    verifying W drafts then pays for W + 1 one step in P, while at light load a request whose drafts keep
    paying grows every step. `may_pay` False (the last step's `next_column_may_pay`: one more draft is not
    expected to pay at that load) skips the probe too. The cap reads past steps only, so the
    policy's decisions stay non-anticipating."""
    if last_length is None:
        return newcomer
    if held and probe_every is not None and (step % probe_every != 0 or not may_pay):
        return max(last_length, 1)
    return last_length + 1


def held_after(length: int, cap: int | None, held: bool, step: int, probe_every: int | None = None,
               may_pay: bool = True) -> bool:
    """Whether a request is held at its length (`next_draft_cap`) after engine `step` drafted it to `cap`
    and the policy chose `length`: it stopped short of its cap, or it was held and this step probed
    nothing (no probe step, or `may_pay` False): verifying all of a held cap says nothing about the draft
    past it. Never without `probe_every`."""
    if probe_every is None:
        return False
    if cap is not None and length < cap:
        return True
    return held and (step % probe_every != 0 or not may_pay)


def next_column_may_pay(inp: ScheduleInput, lengths: list[int]) -> bool:
    """Whether verifying one more draft per request is expected to raise theta over `lengths` at this
    step's price: request r's next draft would survive with a_{r,l_r} c_{r,l_r+1} (a_{r,0} = 1), where
    c_{r,l_r+1} is its confidence where that draft was made (the column stopped short of it) and
    otherwise its last drafted confidence repeated, the best guess before drafting it (a request that
    drafted nothing adds nothing). When (R + sum_r sum_{j<=l_r} a_{r,j} + sum_r a_{r,l_r} c_{r,l_r+1})
    x SPS(B(lengths + 1)) does not exceed theta at `lengths`, a probe's extra draft is not worth drafting
    (at 8 users on this CPU a second column costs 21% more a step, and a probe drafted at every fourth
    step was verified at 1-17% of them, data/serving/). Reads the confidences of drafts already made."""
    conf, drafted = inp.conf, inp.max_lengths
    a = survival(conf, drafted)
    gain = 0.0
    for r, l in enumerate(lengths):
        if drafted[r] == 0:
            continue
        next_conf = conf[r, l] if l < drafted[r] else conf[r, drafted[r] - 1]
        gain += float((a[r, l - 1] if l > 0 else 1.0) * next_conf)
    wider = inp.table.sps(inp.batch_tokens([l + 1 for l in lengths]))
    return (expected_tokens(inp, lengths) + gain) * wider > expected_throughput(inp, lengths)


# ---------------------------------------------------------------------------------------------------
# Policies: policy(inp) -> lengths, each with a `name` and a `draft_cap`: the most drafts a request can
# have verified under the policy whatever the confidences (None: no cap), so that an engine never pays
# for drafts the policy will drop. The cap is fixed before anything is drafted, so it stays lossless.


@dataclass
class Fixed:
    """Verify every drafted token (at most `cap` per request, if given): the no-scheduler baseline."""

    cap: int | None = None
    name = "fixed"
    #: lengths chosen per step from confidences (an engine may then draft one past its last step's longest)
    chooses_lengths = False

    @property
    def draft_cap(self) -> int | None:
        return None if self.cap is None else int(self.cap)

    def __post_init__(self):
        if self.cap is not None and (whole_number(self.cap, "the fixed length cap") < 0):
            raise LabkitError(f"the fixed length cap must be >= 0 (or None for no cap), got {self.cap}.")

    def __call__(self, inp: ScheduleInput) -> list[int]:
        return [m if self.cap is None else min(m, int(self.cap)) for m in inp.max_lengths]


@dataclass
class MTP1:
    """One drafted token per request, two verified: the paper's production baseline (Sec. 5.3, Fig. 7)."""

    name = "mtp1"
    #: lengths chosen per step from confidences (an engine may then draft one past its last step's longest)
    chooses_lengths = False
    draft_cap = 1

    def __call__(self, inp: ScheduleInput) -> list[int]:
        return [min(1, m) for m in inp.max_lengths]


@dataclass
class Threshold:
    """Static threshold on prefix survival: l_r = the largest j with a_{r,j} >= t (0 if none).

    The threshold is on the survival a_{r,j}, not on each c_{r,j}: a_{r,j} is the probability that slot
    j's token is actually accepted, i.e. its expected gain, and thresholding it keeps prefixes by
    construction (a is non-increasing in j). It ignores the cost table: the static heuristic the
    paper contrasts with Algorithm 1 (Sec. 3.2.2).
    """

    t: float = 0.5
    name = "threshold"
    #: lengths chosen per step from confidences (an engine may then draft one past its last step's longest)
    chooses_lengths = True
    draft_cap = None

    def __post_init__(self):
        if not 0.0 < self.t <= 1.0:  # also rejects NaN
            raise LabkitError(f"the survival threshold t must lie in (0, 1], got {self.t}.")

    def __call__(self, inp: ScheduleInput) -> list[int]:
        a = survival(inp.conf, inp.max_lengths)
        return (a >= self.t).sum(1).tolist()


@dataclass
class Algorithm1:
    """Algorithm 1 (Sec. 3.2.2): greedy admission by survival with the early break; lossless.

    Starts at B = batch_tokens(zeros), tau* = R; admits candidates in sorted order while theta improves
    and stops at the first non-improvement, so no decision depends on a confidence past the drop
    (which, with a Markov confidence head, depends on the draft token under decision: Appendix A).
    Returns all zeros when verifying anything would lower the expected throughput.
    """

    name = "algorithm1"
    #: lengths chosen per step from confidences (an engine may then draft one past its last step's longest)
    chooses_lengths = True
    draft_cap = None

    def __call__(self, inp: ScheduleInput) -> list[int]:
        w = admission_walk(inp, until_break=True)
        return w.lengths(w.algorithm1_k)


def first_drafts(a: torch.Tensor, table: HasSPS, count: Callable[[list[int]], float]) -> tuple[list[int], float]:
    """Which requests verify their first draft: the m requests of highest first-draft survival a_{r,1},
    m searched over 0..R for the highest theta (the walk over first slots alone, to its end, and its
    first maximum), not stopped at the first drop. Returns (lengths in {0, 1}, the sum of the admitted
    a_{r,1}).

    Lossless without a break: a_{r,1} = c_{r,1} is computed before any draft is drawn (c_k reads
    x_{k-1}), so no draft can influence whether it is verified here."""
    first = torch.zeros_like(a)
    first[:, :1] = a[:, :1]
    w = walk(first, table, count)
    k = w.peak_k
    return w.lengths(k), w.tau[k] - a.shape[0]


@dataclass
class LayoutAlgorithm1:
    """Algorithm 1 priced by the step's layout: B_eff = B + w (attention columns - B) (`labkit.core.layout`,
    w = `ScheduleInput.attention_weight`), for a forward whose attention runs a rectangle of queries.

    Under that price the first draft verified in a batch costs a jump (every row's attention grows a
    column, or a second pass starts), and the next first drafts cost less than a token each (the
    rectangle is already paid), so Algorithm 1's break would stop at the jump and verify nothing. So the
    first drafts are chosen by a search over how many to verify (`first_drafts`: lossless, as c_{r,1}
    reads no draft), and the deeper slots of those requests by Algorithm 1's walk with its break,
    started from there (`walk(start=...)`): the decision on x_{r,k}, k >= 2, reads c_{r,1..k} only, as
    in the paper. With w = 0 and a price that falls smoothly with B it verifies what Algorithm 1 does
    up to the order in which first and deeper slots are admitted.
    """

    name = "algorithm1-layout"
    #: lengths chosen per step from confidences (an engine may then draft one past its last step's longest)
    chooses_lengths = True
    draft_cap = None

    def __call__(self, inp: ScheduleInput) -> list[int]:
        a = survival(inp.conf, inp.max_lengths)
        if a.shape[1] == 0:
            return [0] * inp.n_requests
        def count(lengths: list[int]) -> float:
            return layout_tokens(lengths, inp.attention_weight, inp.batch_tokens)
        start, start_tau = first_drafts(a, inp.table, count)
        rest = a.clone()
        rest[:, 0] = 0.0
        rest[torch.tensor(start) == 0] = 0.0  # no deeper slot without its first
        w = walk(rest, inp.table, count, until_break=True, start=start, start_tau=start_tau)
        return w.lengths(w.algorithm1_k)


@dataclass
class ColumnAlgorithm1:
    """Algorithm 1 admitting whole columns: every request verifies the same number W of drafts (fewer
    where it drafted fewer), W grown one column at a time while theta rises and stopped at the first
    column that does not raise it. The padding-aware admission of a forward whose ragged batches cost
    more than uniform ones with as many tokens (this CPU's engine: data/serving/, session 9), priced by
    a table profiled on uniform shapes, which is what such a step runs.

    Lossless by Algorithm 1's argument, column by column: admitting column W reads the survivals
    a_{r,j<=W}, i.e. confidences c_{r,j<=W}, each of which reads drafts before slot j only; the break
    means no draft's verification depends on a confidence that reads that draft.
    """

    name = "algorithm1-column"
    #: lengths chosen per step from confidences (an engine may then draft one past its last step's longest)
    chooses_lengths = True
    draft_cap = None
    #: a request held at its width (it stopped short of its cap) drafts one past it only every 4th step
    #: (`next_draft_cap`): at 4 users a step drafting 3 to verify 2 took 90-94 ms where MTP-1's drafting 1
    #: to verify 1 took 76 (data/serving/, session 10), so the probe is paid one step in four
    probe_every: int | None = 4

    def probe_may_pay(self, inp: ScheduleInput, lengths: list[int]) -> bool:
        """Whether the next probe step drafts past held widths (`next_column_may_pay` on this step)."""
        return next_column_may_pay(inp, lengths)

    def __call__(self, inp: ScheduleInput) -> list[int]:
        widest = max(inp.max_lengths, default=0)
        lengths = [0] * inp.n_requests
        best = expected_throughput(inp, lengths)
        for w in range(1, widest + 1):
            wider = [min(w, m) for m in inp.max_lengths]
            theta = expected_throughput(inp, wider)
            if not theta > best:
                break
            lengths, best = wider, theta
        return lengths


@dataclass
class Retrospective:
    """BIASED: the admission path's global maximum, searched past the first drop (Appendix A).

    Kept only to demonstrate the paper's counterexample; never use it to serve. Looking past the drop
    lets c_{r,k+1} (a function of the drafted x_{r,k}) decide whether x_{r,k} is verified, which skews
    the output distribution away from the target's (e.g. (0.7, 0.3) becomes (0.85, 0.15)).
    """

    name = "retrospective"
    #: lengths chosen per step from confidences (an engine may then draft one past its last step's longest)
    chooses_lengths = True
    draft_cap = None

    def __call__(self, inp: ScheduleInput) -> list[int]:
        w = admission_walk(inp)
        return w.lengths(w.peak_k)


@dataclass
class AsyncTopK:
    """The production variant (Sec. 5.2): capacity from two steps before, top-K by current survival.

    K = the number of draft slots the retrospective search (no break) picks on the OLD confidences,
    where a request that did not exist then has survival 1 at each of its current slots. Then the K
    current candidates of highest current survival are admitted (ties by position, then request).
    Lossless although there is no break: K is fixed before the current drafts exist, so no current
    token can influence whether it is verified; only the ranking uses current confidences.
    """

    name = "async-topk"
    #: lengths chosen per step from confidences (an engine may then draft one past its last step's longest)
    chooses_lengths = True
    draft_cap = None

    def __call__(self, inp: ScheduleInput) -> list[int]:
        return _lengths_of(admission_path(inp), capacity_from_old(inp), inp.n_requests)


def capacity_from_old(inp: ScheduleInput) -> int:
    """K of the production variant: slots the retrospective search admits on the old confidences."""
    return walk(old_survival(inp), inp.table, inp.batch_tokens).peak_k


def old_survival(inp: ScheduleInput) -> torch.Tensor:
    """Survivals of two steps before, row r for request r; 1 at each current slot of a request new since."""
    n_req, gamma = inp.conf.shape
    if inp.old_conf is None:
        return survival(torch.ones(n_req, gamma, dtype=torch.float64), inp.max_lengths)
    new = torch.tensor([m is None for m in inp.old_max_lengths], dtype=torch.bool).view(-1, 1)
    width = max(gamma, inp.old_conf.shape[1])
    old = survival(inp.old_conf, [0 if m is None else m for m in inp.old_max_lengths])
    fresh = survival(torch.ones(n_req, gamma, dtype=torch.float64), inp.max_lengths)
    pad = torch.nn.functional.pad
    return torch.where(new, pad(fresh, (0, width - gamma)), pad(old, (0, width - old.shape[1])))


POLICIES: dict[str, type] = {p.name: p for p in (Fixed, MTP1, Threshold, Algorithm1, LayoutAlgorithm1,
                                                  ColumnAlgorithm1, Retrospective, AsyncTopK)}


def make_policy(name: str, **kw):
    """A policy by name (fixed, mtp1, threshold, algorithm1, algorithm1-layout, algorithm1-column, retrospective,
    async-topk) and its settings;
    "fixed:K" is the fixed policy capped at K drafts (a static MTP-K), "threshold:T" a threshold of T."""
    base, _, arg = name.partition(":")
    if base not in POLICIES:
        raise LabkitError(f"unknown scheduler policy {name!r}: choose one of {', '.join(POLICIES)} "
                          "(or fixed:K, threshold:T).")
    if arg:
        if base not in ("fixed", "threshold") or kw:
            raise LabkitError(f"policy {name!r}: only fixed:K (a cap) and threshold:T take a value after the colon.")
        try:
            kw = {"cap": int(arg)} if base == "fixed" else {"t": float(arg)}
        except ValueError:
            raise LabkitError(f"policy {name!r}: fixed:K takes a whole number K >= 0 (e.g. fixed:4), "
                              "threshold:T a survival in (0, 1] (e.g. threshold:0.5).") from None
    try:
        return POLICIES[base](**kw)
    except TypeError as exc:
        raise LabkitError(f"policy {name!r} does not take {sorted(kw)} ({exc}): "
                          "fixed takes cap, threshold takes t, the others take nothing.") from exc


# ---------------------------------------------------------------------------------------------------
# Appendix A: the counterexample, as arithmetic and as a simulation with the lab's real verification

APPENDIX_A_P_T = (0.7, 0.3)  # target over {A, B}
APPENDIX_A_P_D = (0.5, 0.5)  # drafter over {A, B}


def appendix_a_table() -> CostTable:
    """SPS(1) = 1.0, SPS(2) = 0.5, SPS(3) = 0.45: the paper's capacity curve (already monotone)."""
    return CostTable("appendix-a", "counterexample", "exact", [1, 2, 3], [1.0, 0.5, 0.45])


def appendix_a_c2(x1: int) -> float:
    """The Markov confidence of position 2 given the drafted x1: 0.9 after A (id 0), 0.0 after B."""
    return 0.9 if x1 == 0 else 0.0


def appendix_a_a1() -> float:
    """a_1 = sum_x min(p_t(x), p_d(x)) = 0.8: the first draft's acceptance probability."""
    return sum(min(t, d) for t, d in zip(APPENDIX_A_P_T, APPENDIX_A_P_D))


def appendix_a_input(x1: int) -> ScheduleInput:
    """What the scheduler sees once x1 is drafted: conf [[a_1, c2(x1)]] and the paper's curve."""
    return ScheduleInput(torch.tensor([[appendix_a_a1(), appendix_a_c2(x1)]], dtype=torch.float64),
                         appendix_a_table())


@dataclass
class AppendixAArithmetic:
    """The paper's numbers, computed by this module's objective and policies."""

    a1: float
    theta_0: float
    theta_1: float
    theta_2: dict[str, float]  # "A" (c2 = 0.9) and "B" (c2 = 0)
    lengths: dict[str, dict[str, int]] = field(default_factory=dict)  # policy -> x1 -> l
    first_token_probs: dict[str, tuple[float, float]] = field(default_factory=dict)  # policy -> P(Y=A), P(Y=B)


def appendix_a_arithmetic() -> AppendixAArithmetic:
    """theta_0 = 1.0, theta_1 = 0.9, theta_2 = 1.134 (x1 = A) or 0.81 (x1 = B), and what follows."""
    inputs = {x: appendix_a_input(i) for i, x in enumerate("AB")}
    theta = expected_throughput
    out = AppendixAArithmetic(appendix_a_a1(), theta(inputs["A"], [0]), theta(inputs["A"], [1]),
                              {x: theta(inputs[x], [2]) for x in "AB"})
    pt_a = APPENDIX_A_P_T[0]
    for name in ("algorithm1", "retrospective"):
        policy = make_policy(name)
        out.lengths[name] = {x: policy(inputs[x])[0] for x in "AB"}
        # Verified x1: speculative sampling's P(Y = A | x1); nothing verified: Y is drawn from p_t.
        p_a = 0.0
        for i, x in enumerate("AB"):
            admitted = out.lengths[name][x] >= 1
            p_y_a = _first_token_a_given(i) if admitted else pt_a
            p_a += APPENDIX_A_P_D[i] * p_y_a
        out.first_token_probs[name] = (p_a, 1.0 - p_a)
    return out


def _first_token_a_given(x1: int) -> float:
    """P(Y = A | x1 drafted and verified) under speculative sampling over {A, B}."""
    pt, pd = APPENDIX_A_P_T, APPENDIX_A_P_D
    accept = min(1.0, pt[x1] / pd[x1])
    resid = [max(0.0, t - d) for t, d in zip(pt, pd)]
    resid_a = resid[0] / sum(resid) if sum(resid) > 0 else pt[0]
    return accept * (x1 == 0) + (1.0 - accept) * resid_a


def appendix_a_simulation(policy, draws: int = 20_000, seed: int = 0) -> list[int]:
    """Counts [#A, #B] of the first output token over `draws` rounds of the counterexample.

    Each round: draft x1, x2 ~ p_d; the policy (a name or a policy) picks l given conf [[0.8, c2(x1)]];
    the admitted prefix is verified with `labkit.core.sampling.verify_chain`; the first output token is
    counted. Algorithm 1 gives the target's (0.7, 0.3); the retrospective search about (0.85, 0.15).
    A policy is a pure function of its input and only two inputs can occur (x1 = A or B), so it is
    asked once for each; every round still runs its own verification.
    """
    policy = make_policy(policy) if isinstance(policy, str) else policy
    gen = torch.Generator().manual_seed(seed)
    p_d = torch.tensor([APPENDIX_A_P_D] * 2, dtype=torch.float64)  # rows for positions 1, 2
    p_t = torch.tensor([APPENDIX_A_P_T] * 3, dtype=torch.float64)  # positions 1, 2 and the bonus one
    decision = [policy(appendix_a_input(x))[0] for x in (0, 1)]
    drafts = torch.multinomial(p_d[0], 2 * draws, replacement=True, generator=gen).view(draws, 2)
    counts = [0, 0]
    for x in drafts:
        l = decision[int(x[0])]
        verdict = verify_chain(x[:l], p_d[:l], p_t[:l + 1], gen)
        first = int(x[0]) if verdict.n_accepted >= 1 else verdict.next_token
        counts[first] += 1
    return counts
