"""Packed against padded verify: one batched target forward over ragged rows, both layouts, interleaved.

    python scripts/bench_verify.py --rows 1 4 16 --repeats 15 --json build/verify.json

For each R, three shapes of new tokens per row: uniform 1 (plain batched decoding), uniform 1 + gamma
(verify everything), and "one deep row" (one row verifies 1 + gamma, the others 1: the shape where
padding doubles the work). Every row sits on a KV cache of --kv tokens. Each repeat visits every
(shape, layout) in turn, so both layouts see the same machine; the table gives medians and the
interquartile range in ms, the real tokens of the step (the scheduler's packed B) and the tokens the
padded layout computes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labkit.model.batch_kv import BatchKV  # noqa: E402
from labkit.model.target import load_target  # noqa: E402
from labkit.model.timing import sync_device, timed_call  # noqa: E402


def shapes(rows: int, gamma: int) -> dict[str, list[int]]:
    return {"all 1": [1] * rows, f"all {1 + gamma}": [1 + gamma] * rows,
            "one deep row": [1 + gamma] + [1] * (rows - 1)}


def make_cache(target, rows: int, kv: int, packed: bool) -> BatchKV:
    gen = torch.Generator().manual_seed(0)
    cache = BatchKV(target, packed=packed)
    cache.add(0, torch.randint(target.vocab_size, (kv,), generator=gen).tolist())
    cache.replicate(rows)
    return cache


def one_step(target, cache: BatchKV, widths: list[int]) -> float:
    step = {key: [7] * w for key, w in zip(cache.keys, widths)}
    seconds, _ = timed_call(lambda: cache.step(step), target.device)
    sync_device(target.device)
    cache.undo_step()
    return seconds


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--gamma", type=int, default=8)
    ap.add_argument("--kv", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args(argv)
    target = load_target()
    results = []
    for rows in args.rows:
        caches = {packed: make_cache(target, rows, args.kv, packed) for packed in (True, False)}
        times: dict[tuple[str, bool], list[float]] = {}
        for rep in range(args.repeats + 1):  # the first pass warms up
            for name, widths in shapes(rows, args.gamma).items():
                for packed, cache in caches.items():
                    s = one_step(target, cache, widths)
                    if rep:
                        times.setdefault((name, packed), []).append(s)
        for name, widths in shapes(rows, args.gamma).items():
            row = {"rows": rows, "shape": name, "real_tokens": sum(widths), "padded_tokens": rows * max(widths)}
            for packed in (True, False):
                q = statistics.quantiles(times[(name, packed)], n=4)
                key = "packed" if packed else "padded"
                row[f"{key}_ms"] = 1e3 * statistics.median(times[(name, packed)])
                row[f"{key}_iqr_ms"] = [1e3 * q[0], 1e3 * q[2]]
            results.append(row)
    print(f"{'R':>3} {'shape':<14} {'real B':>6} {'padded B':>8} {'packed ms':>16} {'padded ms':>16} {'padded/packed':>13}")
    for r in results:
        print(f"{r['rows']:>3} {r['shape']:<14} {r['real_tokens']:>6} {r['padded_tokens']:>8} "
              f"{r['packed_ms']:>7.1f} [{r['packed_iqr_ms'][0]:.0f}-{r['packed_iqr_ms'][1]:.0f}] "
              f"{r['padded_ms']:>7.1f} [{r['padded_iqr_ms'][0]:.0f}-{r['padded_iqr_ms'][1]:.0f}] "
              f"{r['padded_ms'] / r['packed_ms']:>12.2f}x")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({"device": str(target.device), "model": target.name,
                                                   "kv": args.kv, "gamma": args.gamma, "repeats": args.repeats,
                                                   "results": results}, indent=1))


if __name__ == "__main__":
    main()
