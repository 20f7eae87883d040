"""Every profiler of the lab in one place: how long a target forward takes on this device.

One timing rule for all of them and for every benchmark that times a decode (`timed_call`,
`timed_runs`): untimed warm-up calls first, the device synced before each clock read, the samples kept so that callers take medians (noise on a shared machine only ever
adds time). On it: `forward_cost` (one cached forward over k new tokens, the T_verify of Eq. 1),
`memory_bandwidth_gbs` (the floor a memory-bound forward cannot beat), `time_step` and
`profile_cost_table` (SPS(B) on the batched engine's own shapes, Sec. 3.2.2), `profile_fastest`
(the fastest of several passes per shape), `profile_sps` (SPS(B) of any step function) and
`verify_table` (one request's T_verify as a cost table, for confidence-scheduled decoding).

The SPS(B) profilers time their shapes interleaved (`interleaved_runs`): one untimed warm-up of each
shape, then rounds that each visit every shape once, in a fresh seeded order. A slow spell on a
shared machine (another job, a frequency change) then lands on a few samples of many shapes instead of
on every sample of the one shape timed during it, and the medians it leaves are comparable across B.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from labkit.core.errors import LabkitError
from labkit.core.row_price import Shape
from labkit.core.scheduler import CostTable, whole_number
from labkit.model.batch_kv import BatchKV
from labkit.model.target import Target


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it counts finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed_call(fn: Callable[[], object], device: torch.device | None = None,
               clock: Callable[[], float] = time.perf_counter) -> tuple[float, object]:
    """(seconds, result) of one call of fn, the device synced before each clock read."""
    if device is not None:
        sync_device(device)
    start = clock()
    result = fn()
    if device is not None:
        sync_device(device)
    return clock() - start, result


def timed_runs(fn: Callable[[], object], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None,
               clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds of `repeats` calls of fn after `warmup` untimed ones, each followed by `sync` before the
    clock is read (`sync` also runs once after the warm-up)."""
    if repeats < 1 or warmup < 0:
        raise LabkitError(f"timing needs repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    seconds = []
    for _ in range(repeats):
        start = clock()
        fn()
        sync()
        seconds.append(clock() - start)
    return seconds


#: timed visits of every shape when profiling SPS(B), after one untimed warm-up of each. Algorithm 1
#: reads differences of neighbouring fitted values and its early break moves with them, so the medians
#: must be tight: on the engine's shapes, 30 samples a shape keep every choice it makes on the fitted
#: table within a 1% tie of the true table's while a step's own jitter is about 1% and interference
#: slows up to 15% of the steps (tests/test_cost_fit.py); 1.5% jitter needs about 60, 3% about 120.
#: A round of the 25 default shapes takes about 3 s on this CPU (docs/facts.md), so a profile takes
#: about 1.5 minutes; on a GPU a round takes milliseconds, and more repeats cost little.
PROFILE_REPEATS = 30


def interleaved_runs(steps: dict, repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None,
                     clock: Callable[[], float] = time.perf_counter, seed: int = 0,
                     progress: bool = False, desc: str = "profiling") -> dict:
    """Seconds of `repeats` timed calls of every step in `steps` ({key: fn}), interleaved: `warmup`
    untimed calls of each first, then `repeats` rounds, each calling every step once in a fresh order
    (seeded, so a run can be replayed). `sync` runs after the warm-up and after each timed call, before
    the clock is read. Returns {key: [seconds, ...]} in round order."""
    repeats, warmup = whole_number(repeats, "repeats"), whole_number(warmup, "warmup")
    if repeats < 1 or warmup < 0 or not steps:
        raise LabkitError(f"timing needs repeats >= 1, warmup >= 0 and at least one step, got repeats={repeats}, "
                          f"warmup={warmup} and {len(steps)} steps.")
    sync = sync or (lambda: None)
    keys = list(steps)
    for key in keys:
        for _ in range(warmup):
            steps[key]()
    sync()
    order = random.Random(seed)
    seconds: dict = {key: [] for key in keys}
    for _ in tqdm(range(repeats), desc=desc, disable=not progress, unit="round"):
        visit = list(keys)
        order.shuffle(visit)
        for key in visit:
            start = clock()
            steps[key]()
            sync()
            seconds[key].append(clock() - start)
    return seconds


# ---- one forward over k new tokens ----------------------------------------------------------------


@dataclass
class ForwardCost:
    """Seconds of one cached forward over k new tokens on a `context_len`-token context, per k."""

    context_len: int
    ks: list[int]
    samples_s: list[list[float]] = field(default_factory=list)  # one list of repeats per k

    @property
    def median_s(self) -> list[float]:
        return [statistics.median(s) for s in self.samples_s]

    def at(self, k: int) -> float:
        """Median seconds at k new tokens (k must have been measured)."""
        if k not in self.ks:
            raise LabkitError(f"k={k} was not measured: measured ks are {self.ks}.")
        return self.median_s[self.ks.index(k)]

    def interp(self, k: float) -> float:
        """Median seconds at any k in the measured range, linear between measured ks."""
        if not self.ks[0] <= k <= self.ks[-1]:
            raise LabkitError(f"k={k} lies outside the measured range {self.ks[0]}..{self.ks[-1]}: "
                              "measure forward_cost over a wider range of ks.")
        return float(np.interp(k, self.ks, self.median_s))

    def relative(self) -> list[float]:
        """Cost at each k in units of the smallest k's cost (a one-token forward when k=1 was measured)."""
        med = self.median_s
        return [m / med[0] for m in med]


@torch.inference_mode()
def forward_cost(target: Target, context_len: int = 200, ks: Iterable[int] = range(1, 33), repeats: int = 5,
                 seed: int = 0, progress: bool = True) -> ForwardCost:
    """Median time of one cached forward over k new tokens, for each k (the T_verify of Eq. 1).

    The context is `context_len` random token ids (cost does not depend on which); after each timed
    forward the cache is cropped back by k (`cache.crop(-k)`, transformers 5), so every repeat sees
    the same context. Logits are kept at all k positions, as a verify forward needs them.
    """
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise LabkitError(f"ks must be positive token counts, e.g. range(1, 33), got {ks}.")
    if context_len < 1 or repeats < 1:
        raise LabkitError(f"context_len and repeats must be >= 1, got {context_len} and {repeats}.")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, target.vocab_size, (context_len + max(ks),), generator=gen).tolist()
    context, fresh = ids[:context_len], ids[context_len:]
    cache = target.new_cache()
    target.forward(context, cache)
    target.forward(fresh[:1], cache)  # untimed warm-up of the cached path
    cache.crop(-1)
    out = ForwardCost(context_len=context_len, ks=ks)
    for k in tqdm(ks, desc="forward cost", disable=not progress):
        def forward(k=k):
            target.forward(fresh[:k], cache, logits_to_keep=k)
            cache.crop(-k)  # after the clock read: the next repeat sees the same context
        out.samples_s.append(timed_runs(forward, repeats, warmup=0, sync=lambda: sync_device(target.device)))
    return out


@torch.inference_mode()
def memory_bandwidth_gbs(size_mb: int = 1024, repeats: int = 5, device: str | torch.device = "cpu") -> float:
    """Read bandwidth in GB/s: bytes of a large fp32 tensor over the fastest time to sum it.

    The tensor is much larger than any cache, so the sum streams it from memory, as a decode step
    streams the weights. The fastest of `repeats` runs is kept: noise only ever slows a read down.
    """
    if size_mb < 1 or repeats < 1:
        raise LabkitError(f"size_mb and repeats must be >= 1, got {size_mb} and {repeats}.")
    device = torch.device(device)
    x = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32, device=device)
    best = min(timed_runs(x.sum, repeats, warmup=1, sync=lambda: sync_device(device)))  # warm-up pages it in
    return x.numel() * x.element_size() / best / 1e9


def verify_table(target: Target, max_tokens: int, context_len: int = 256, repeats: int = 5,
                 progress: bool = False) -> CostTable:
    """T_verify(k) for k = 1..max_tokens on this device, as a CostTable of forwards per second (one
    request's verify cost, what confidence-scheduled decoding plans on)."""
    if max_tokens < 1:
        raise LabkitError(f"the verify table needs max_tokens >= 1 (1 + the longest block), got {max_tokens}.")
    cost = forward_cost(target, context_len, ks=range(1, max_tokens + 1), repeats=repeats, progress=progress)
    dtype = str(target.dtype).removeprefix("torch.")
    return CostTable.from_samples(str(target.device), target.name, dtype,
                                  {k: [1.0 / max(t, 1e-12) for t in s] for k, s in zip(cost.ks, cost.samples_s)})


# ---- SPS(B): the batched engine's steps ----------------------------------------------------------


class _Rows:
    """`rows` copies of one random kv_len-token prompt in a BatchKV, stepped by any width and cropped
    back after each step, so every replay sees the same shapes (content does not change the cost)."""

    def __init__(self, target: Target, rows: int, kv_len: int, gen: torch.Generator):
        prompt = torch.randint(target.vocab_size, (kv_len,), generator=gen).tolist()
        self.target, self.kv = target, BatchKV(target)
        self.kv.add(0, prompt)
        self.kv.replicate(rows)
        self.rows, self.gen = rows, gen

    def stepper(self, width: int) -> Callable[[], None]:
        tokens = {i: torch.randint(self.target.vocab_size, (width,), generator=self.gen).tolist()
                  for i in range(self.rows)}

        def one_step():
            self.kv.step(tokens)
            sync_device(self.target.device)
            self.kv.undo_step()

        return one_step


def _check_shape_args(rows, widths, kv_len, repeats) -> None:
    if not rows or not widths or min(rows) < 1 or min(widths) < 1 or kv_len < 1 or repeats < 1:
        raise LabkitError("SPS profiling needs rows, widths, kv_len and repeats >= 1: e.g. rows=(1, 4), "
                          "widths=(1, 4), kv_len=256, repeats=30.")


@torch.inference_mode()
def step_samples(target: Target, shapes: Iterable[tuple[int, int]], kv_len: int = 256, repeats: int = PROFILE_REPEATS,
                 seed: int = 0, progress: bool = False) -> dict[tuple[int, int], list[float]]:
    """Seconds of one BatchKV.step for every (rows, width) shape over a KV of `kv_len`, `repeats`
    samples each, the shapes interleaved (`interleaved_runs`; one untimed warm-up of each). One
    cache per row count serves all its widths."""
    shapes = sorted({(whole_number(r, "rows"), whole_number(w, "width")) for r, w in shapes})
    _check_shape_args([r for r, _ in shapes], [w for _, w in shapes], kv_len, repeats)
    gen = torch.Generator().manual_seed(seed)
    caches = {r: _Rows(target, r, kv_len, gen) for r in sorted({r for r, _ in shapes})}
    steps = {(r, w): caches[r].stepper(w) for r, w in shapes}
    return interleaved_runs(steps, repeats, warmup=1, seed=seed, progress=progress, desc="profiling SPS(B)")


def time_step(target: Target, rows: int, width: int, kv_len: int, repeats: int = 5, seed: int = 0) -> float:
    """Median seconds of one BatchKV.step of `rows` rows x `width` new tokens over a KV of `kv_len`.

    For the scheduler's SPS(B) table on the shapes the engine runs (`step_samples` for one shape):
    one random prompt of kv_len tokens is prefilled and its row replicated; after each timed step its
    columns are cropped off, so every replay sees the same shapes. One untimed warm-up.
    """
    if rows < 1 or width < 1 or kv_len < 1 or repeats < 1:
        raise LabkitError("time_step needs rows, width, kv_len and repeats >= 1: e.g. rows=4, width=4, "
                          "kv_len=256, repeats=5.")
    return statistics.median(step_samples(target, [(rows, width)], kv_len, repeats, seed)[(rows, width)])


def table_from_points(points: list[dict], device: str, model: str, dtype: str, **meta) -> CostTable:
    """SPS(B) from per-shape measurements ({"rows", "width", "batch_tokens", "seconds" (median), "sps",
    and "samples_s", the seconds of every timed step, where kept): the samples of every shape with that
    B pooled, their upper median as raw SPS, their quartiles as its spread, their number as the fit's
    weight (`CostTable.from_samples`); the shapes themselves kept for the price by rows (`at_rows`). A
    point without samples counts as one sample, its "sps"."""
    by_b: dict[int, list[float]] = {}
    for pt in points:
        samples = [1.0 / max(s, 1e-12) for s in pt["samples_s"]] if pt.get("samples_s") else [pt["sps"]]
        by_b.setdefault(pt["batch_tokens"], []).extend(samples)
    shapes = [Shape(pt["rows"], pt["width"], pt["seconds"]) for pt in points]
    return CostTable.from_samples(device, model, dtype, by_b, shapes=shapes, **meta)


def profile_cost_table(target: Target, rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32), widths: tuple[int, ...] = (1, 2, 4, 6, 9),
                       kv_len: int = 256, repeats: int = PROFILE_REPEATS, progress: bool = False,
                       seed: int = 0) -> tuple[CostTable, list[dict]]:
    """SPS(B) on the shapes the engine runs: R rows x W tokens over a KV of `kv_len`, B = R * W.

    The engine pads every row to the widest one, so B counts what the forward really computes. The
    shapes are timed interleaved, `repeats` samples each (`step_samples`; PROFILE_REPEATS says why
    30). Several (R, W) shapes can give the same B: their samples are pooled, and the table keeps
    the median, the quartiles and the count per B, and fits SPS non-increasing by weighted isotonic
    regression (`CostTable`). The points come back too, one per shape ({"rows", "width",
    "batch_tokens", "seconds" (median), "sps" (1 / median), "samples_s"}), for a plot.
    """
    _check_shape_args(rows, widths, kv_len, repeats)
    shapes = sorted({(r, w) for r in rows for w in widths}, key=lambda rw: (rw[0] * rw[1], rw))
    samples = step_samples(target, shapes, kv_len, repeats, seed, progress)
    points = []
    for r, w in shapes:
        seconds = statistics.median(samples[(r, w)])
        points.append({"rows": r, "width": w, "batch_tokens": r * w, "seconds": seconds, "sps": 1.0 / seconds,
                       "samples_s": samples[(r, w)]})
    table = table_from_points(points, str(target.device), target.name, str(target.dtype).removeprefix("torch."))
    return table, points


def profile_fastest(profile: Callable[[], tuple[CostTable, list[dict]]], passes: int = 2,
                    progress: bool = False) -> tuple[CostTable, list[dict]]:
    """Run `profile` (e.g. `lambda: profile_cost_table(target, ...)`) `passes` times and keep, for every
    (rows, width) shape, its fastest pass (by median, with that pass's samples); the table is then
    rebuilt the way the profiler builds it (`table_from_points`).

    Another job on a shared machine can only add time to a forward, never remove it, so the fastest of
    several passes is the better estimate of what the device itself costs; on a quiet device the
    passes agree and this changes nothing. With interleaved repeats (`profile_cost_table`) one pass of
    enough repeats already spreads a slow spell over every shape. Each kept point says which pass it
    came from ("pass", from 0).
    """
    if passes < 1:
        raise LabkitError(f"profile_fastest needs passes >= 1, got {passes}.")
    best: dict[tuple[int, int], dict] = {}
    first = None
    for i in tqdm(range(passes), desc="profiling passes", disable=not progress):
        table, points = profile()
        first = first or table
        for pt in points:
            key = (pt["rows"], pt["width"])
            if key not in best or pt["sps"] > best[key]["sps"]:
                best[key] = {**pt, "pass": i}
    kept = sorted(best.values(), key=lambda pt: (pt["batch_tokens"], pt["rows"]))
    table = table_from_points(kept, first.device, first.model, first.dtype, tail=first.tail)
    return table, kept


def profile_sps(step: Callable[[int], None], batch_sizes: list[int], repeats: int = 5, warmup: int = 1,
                sync: Callable[[], None] | None = None, progress: bool = False,
                clock: Callable[[], float] = time.perf_counter, seed: int = 0, **meta) -> CostTable:
    """Profile SPS(B) of any step function: `warmup` untimed calls of step(B) for each B, then `repeats`
    rounds that each time step(B) once for every B, in a fresh seeded order (`interleaved_runs`).

    `step(B)` is the engine's real batched target forward over B tokens; `sync` waits for the device
    (e.g. torch.cuda.synchronize) so that the clock reads finished work. The table keeps, per B, the
    median SPS (1 / seconds of each sample), the quartiles and the count (`CostTable.from_samples`).
    `meta` goes to the CostTable: device, model, dtype (default "unknown") and tail. `clock` is there
    so that a test can drive the timing with a fake clock.
    """
    sizes = [whole_number(b, "every batch size") for b in batch_sizes]
    unknown = set(meta) - {"device", "model", "dtype", "tail"}
    if unknown:
        raise LabkitError(f"profile_sps got unknown settings {sorted(unknown)}: "
                          "it takes device, model, dtype and tail.")
    seconds = interleaved_runs({b: (lambda b=b: step(b)) for b in sizes}, repeats, warmup, sync, clock, seed,
                               progress, desc="SPS(B)")
    meta = {"device": "unknown", "model": "unknown", "dtype": "unknown", **meta}
    samples = {b: [1.0 / max(s, 1e-12) for s in seconds[b]] for b in sizes}  # a step can't take 0 s; guards 1/0
    return CostTable.from_samples(meta.pop("device"), meta.pop("model"), meta.pop("dtype"), samples, **meta)
