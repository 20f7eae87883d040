"""Drafting time of one engine step: R requests drafted one after the other against one batched call.

The serving engine drafts a block for every active request each step. This times both ways on the same
prefilled requests (prompts from the evaluation set `labkit.pipeline.prompt_sets` resolves, each advanced
a few real rounds so that their contexts differ), interleaved and repeated, and prints the medians:

    python scripts/bench_drafting.py --drafters dspark hybrid:dspark --users 1 4 16 --json build/drafting.json

Greedy, so that proposing leaves every request's state as it found it (no generator draws).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from labkit.core.sampling import SamplingParams
from labkit.decode.loop import prefill, speculative_round
from labkit.drafters import make_drafter
from labkit.model.target import load_target
from labkit.model.timing import timed_call
from labkit.pipeline.prompt_sets import prompt_set


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drafters", nargs="+", default=["dspark", "hybrid:dspark"], help="drafter specs to time")
    ap.add_argument("--users", nargs="+", type=int, default=[1, 4, 16], help="requests drafted in one step")
    ap.add_argument("--repeats", type=int, default=15, help="interleaved repeats (medians kept)")
    ap.add_argument("--rounds", type=int, default=3, help="real rounds each request runs before timing")
    ap.add_argument("--benchmarks", default=None, help="evaluation prompt folder, or 'lab' (default: as bench)")
    ap.add_argument("--json", dest="json_out", default=None, help="write the table as JSON here")
    args = ap.parse_args()

    target = load_target()
    chosen = prompt_set(args.benchmarks)
    prompts = chosen.load(max(args.users))
    params = SamplingParams()
    rows = []
    for spec in args.drafters:
        drafter = make_drafter(spec, target)
        for users in args.users:
            states = []
            for i in range(users):
                state = prefill(target, target.encode_prompt(prompts[i % len(prompts)].text), 256, params,
                                seed=i, drafter=drafter)
                for _ in range(args.rounds):
                    speculative_round(target, state, drafter)
                states.append(state)
            requests, caps = [s.request for s in states], [drafter.gamma] * users
            loop = lambda: [drafter.propose(r, k) for r, k in zip(requests, caps)]  # noqa: E731
            batch = lambda: drafter.propose_many(requests, caps)  # noqa: E731
            loop(), batch()  # warm-up
            times = {"loop": [], "batch": []}
            for _ in range(args.repeats):
                for name, fn in (("loop", loop), ("batch", batch)):
                    times[name].append(timed_call(fn, target.device)[0])
            med = {k: statistics.median(v) for k, v in times.items()}
            iqr = {k: (lambda q: q[2] - q[0])(statistics.quantiles(v, n=4)) for k, v in times.items()}
            row = {"drafter": spec, "users": users, "loop_ms": 1e3 * med["loop"], "batch_ms": 1e3 * med["batch"],
                   "speedup": med["loop"] / med["batch"], "loop_iqr_ms": 1e3 * iqr["loop"],
                   "batch_iqr_ms": 1e3 * iqr["batch"]}
            rows.append(row)
            print(f"{spec:<16} users {users:>3}: one by one {row['loop_ms']:7.1f} ms, batched {row['batch_ms']:7.1f} ms "
                  f"({row['speedup']:.2f}x; IQR {row['loop_iqr_ms']:.1f} / {row['batch_iqr_ms']:.1f} ms)", flush=True)
    out = {"model": target.name, "device": str(target.device), "torch_threads": torch.get_num_threads(),
           "repeats": args.repeats, "prompt_set": chosen.label, "rows": rows}
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
