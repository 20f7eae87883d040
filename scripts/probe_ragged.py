"""A ragged verify batch against a uniform one: BatchKV.step over 32 rows of a 300-token cache, shapes
interleaved, median seconds (issue 32, session 6). Prints one line a shape.

    python scripts/probe_ragged.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from labkit.model.batch_kv import BatchKV
from labkit.model.target import load_target
from labkit.model.timing import interleaved_runs

SHAPES = {  # name: per-row widths (anchor + verified drafts), 32 rows
    "uniform width 2 (MTP-1's shape)": [2] * 32,
    "ragged 12x1, 10x2, 6x3, 4x4": [1] * 12 + [2] * 10 + [3] * 6 + [4] * 4,
    "ragged 16x1, 8x2, 8x3": [1] * 16 + [2] * 8 + [3] * 8,
    "uniform width 1": [1] * 32,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--kv-len", type=int, default=300)
    args = ap.parse_args()
    target = load_target(None)
    gen = torch.Generator().manual_seed(0)
    kv = BatchKV(target)
    kv.add(0, torch.randint(target.vocab_size, (args.kv_len,), generator=gen).tolist())
    kv.replicate(32)

    def stepper(widths):
        tokens = {i: torch.randint(target.vocab_size, (w,), generator=gen).tolist() for i, w in enumerate(widths)}

        def run():
            kv.step(tokens)
            kv.undo_step()
        return run

    with torch.inference_mode():
        seconds = interleaved_runs({k: stepper(w) for k, w in SHAPES.items()}, args.repeats, warmup=1, seed=0)
    for name, widths in SHAPES.items():
        print(f"{name:<34} B {sum(widths):3d}  {1e3 * statistics.median(seconds[name]):7.1f} ms")


if __name__ == "__main__":
    main()
