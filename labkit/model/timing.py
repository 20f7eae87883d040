"""Every profiler of the lab in one place: how long a target forward takes on this device.

One timing rule for all of them and for every benchmark that times a decode (`timed_call`,
`timed_runs`): untimed warm-up calls first, the device synced before each clock read, the samples kept so that callers take medians (noise on a shared machine only ever
adds time). On it: `forward_cost` (one cached forward over k new tokens, the T_verify of Eq. 1),
`memory_bandwidth_gbs` (the floor a memory-bound forward cannot beat), `time_step` and
`profile_cost_table` (SPS(B) on the batched engine's own shapes, Sec. 3.2.2), `profile_fastest`
(the fastest of several passes per shape), `profile_sps` (SPS(B) of any step function) and
`verify_table` (one request's T_verify as a cost table, for confidence-scheduled decoding).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from labkit.core.errors import LabkitError
from labkit.core.scheduler import CostTable, monotone_sps, whole_number
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
    return CostTable(str(target.device), target.name, dtype, cost.ks, [1.0 / s for s in cost.median_s])


# ---- SPS(B): the batched engine's steps ----------------------------------------------------------


@torch.inference_mode()
def time_step(target: Target, rows: int, width: int, kv_len: int, repeats: int = 5, seed: int = 0) -> float:
    """Median seconds of one BatchKV.step of `rows` rows x `width` new tokens over a KV of `kv_len`.

    For the scheduler's SPS(B) table on the shapes the engine runs. One random prompt of kv_len
    tokens is prefilled and its row replicated (content does not change the cost); after each timed
    step its columns are cropped off, so every replay sees the same shapes. One untimed warm-up.
    """
    if rows < 1 or width < 1 or kv_len < 1 or repeats < 1:
        raise LabkitError("time_step needs rows, width, kv_len and repeats >= 1: e.g. rows=4, width=4, "
                          "kv_len=256, repeats=5.")
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(target.vocab_size, (kv_len,), generator=gen).tolist()
    kv = BatchKV(target, compact_at=1.0)
    kv.add(0, prompt)
    kv.replicate(rows)
    step = {i: torch.randint(target.vocab_size, (width,), generator=gen).tolist() for i in range(rows)}

    def one_step():
        kv.step(step)
        sync_device(target.device)
        kv.drop_last_columns(width)

    return statistics.median(timed_runs(one_step, repeats, warmup=1))


def table_from_points(points: list[dict], device: str, model: str, dtype: str, **meta) -> CostTable:
    """SPS(B) from per-shape measurements ({"batch_tokens", "sps"}): the upper median over the shapes
    of one B, raw, and made monotone (`monotone_sps`)."""
    by_b: dict[int, list[float]] = {}
    for pt in points:
        by_b.setdefault(pt["batch_tokens"], []).append(pt["sps"])
    sizes = sorted(by_b)
    raw = [sorted(by_b[b])[len(by_b[b]) // 2] for b in sizes]
    return CostTable(device=device, model=model, dtype=dtype, batch_sizes=sizes, raw_sps=raw,
                     smoothed_sps=monotone_sps(raw), **meta)


def profile_cost_table(target: Target, rows: tuple[int, ...] = (1, 2, 4, 8, 16), widths: tuple[int, ...] = (1, 2, 4, 6, 9),
                       kv_len: int = 256, repeats: int = 3, progress: bool = False) -> tuple[CostTable, list[dict]]:
    """SPS(B) on the shapes the engine runs: R rows x W tokens over a KV of `kv_len`, B = R * W.

    The engine pads every row to the widest one, so B counts what the forward really computes.
    Several (R, W) shapes can give the same B: the table keeps the median of their SPS (the
    measurements per shape come back too, for a plot). Smoothed and made monotone by
    `scheduler.monotone_sps`; raw and smoothed are both kept.
    """
    shapes = sorted({(r, w) for r in rows for w in widths}, key=lambda rw: (rw[0] * rw[1], rw))
    points = []
    for r, w in tqdm(shapes, desc="profiling SPS(B)", disable=not progress, unit="shape"):
        seconds = time_step(target, r, w, kv_len, repeats)
        points.append({"rows": r, "width": w, "batch_tokens": r * w, "seconds": seconds, "sps": 1.0 / seconds})
    table = table_from_points(points, str(target.device), target.name, str(target.dtype).removeprefix("torch."))
    return table, points


def profile_fastest(profile: Callable[[], tuple[CostTable, list[dict]]], passes: int = 2,
                    progress: bool = False) -> tuple[CostTable, list[dict]]:
    """Run `profile` (e.g. `lambda: profile_cost_table(target, ...)`) `passes` times and keep, for every
    (rows, width) shape, its fastest pass; the table is then rebuilt the way the profiler builds it
    (`table_from_points`).

    Another job on a shared machine can only add time to a forward, never remove it, so the fastest of
    several passes is the better estimate of what the device itself costs; on a quiet device the
    passes agree and this changes nothing. Each kept point says which pass it came from ("pass", from 0).
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
    table = table_from_points(kept, first.device, first.model, first.dtype, window=first.window, tail=first.tail)
    return table, kept


def profile_sps(step: Callable[[int], None], batch_sizes: list[int], repeats: int = 5, warmup: int = 1,
                sync: Callable[[], None] | None = None, progress: bool = False,
                clock: Callable[[], float] = time.perf_counter, **meta) -> CostTable:
    """Profile SPS(B): for each B, `warmup` untimed calls of step(B), then `repeats` timed ones.

    `step(B)` is the engine's real batched target forward over B tokens; `sync` waits for the device
    (e.g. torch.cuda.synchronize) so that the clock reads finished work. SPS = 1 / median seconds.
    `meta` goes to the CostTable: device, model, dtype (default "unknown"), window, tail. `clock` is
    there so that a test can drive the timing with a fake clock.
    """
    sizes = [whole_number(b, "every batch size") for b in batch_sizes]
    repeats, warmup = whole_number(repeats, "repeats"), whole_number(warmup, "warmup")
    unknown = set(meta) - {"device", "model", "dtype", "window", "tail"}
    if unknown:
        raise LabkitError(f"profile_sps got unknown settings {sorted(unknown)}: "
                          "it takes device, model, dtype, window and tail.")
    medians = []
    for b in tqdm(sizes, desc="SPS(B)", disable=not progress):
        seconds = timed_runs(lambda b=b: step(b), repeats, warmup, sync, clock)
        medians.append(max(statistics.median(seconds), 1e-12))  # a step can't take 0 s; guards 1/0
    meta = {"device": "unknown", "model": "unknown", "dtype": "unknown", **meta}
    return CostTable(batch_sizes=sizes, raw_sps=[1.0 / m for m in medians], **meta)
