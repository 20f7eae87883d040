"""Drafting time of one engine step: R requests drafted one after the other against one batched call.

The serving engine drafts a block for every active request each step. This times both ways on the same
prefilled requests (prompts from the evaluation set `labkit.pipeline.prompt_sets` resolves, each advanced
a few real rounds so that their contexts differ), interleaved and repeated, and prints the medians
beside the batched call's compute floor (`compute_floor`: one dense batch of the same arithmetic):

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
            fns = {"loop": loop, "batch": batch}
            floor = compute_floor(drafter, requests)
            if floor is not None:
                fns["floor"] = floor
            for fn in fns.values():
                fn()  # warm-up
            times = {name: [] for name in fns}
            for _ in range(args.repeats):
                for name, fn in fns.items():
                    times[name].append(timed_call(fn, target.device)[0])
            med = {k: statistics.median(v) for k, v in times.items()}
            iqr = {k: (lambda q: q[2] - q[0])(statistics.quantiles(v, n=4)) for k, v in times.items()}
            row = {"drafter": spec, "users": users, "loop_ms": 1e3 * med["loop"], "batch_ms": 1e3 * med["batch"],
                   "speedup": med["loop"] / med["batch"], "loop_iqr_ms": 1e3 * iqr["loop"],
                   "batch_iqr_ms": 1e3 * iqr["batch"],
                   "floor_ms": 1e3 * med["floor"] if "floor" in med else None}
            rows.append(row)
            over = f", {row['batch_ms'] / row['floor_ms']:.2f}x its floor {row['floor_ms']:.1f} ms" if floor else ""
            print(f"{spec:<16} users {users:>3}: one by one {row['loop_ms']:7.1f} ms, batched {row['batch_ms']:7.1f} ms "
                  f"({row['speedup']:.2f}x; IQR {row['loop_iqr_ms']:.1f} / {row['batch_iqr_ms']:.1f} ms){over}", flush=True)
    out = {"model": target.name, "device": str(target.device), "torch_threads": torch.get_num_threads(),
           "repeats": args.repeats, "prompt_set": chosen.label, "rows": rows}
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json_out}")


def compute_floor(drafter, requests):
    """The batched call's compute floor, as a callable: the same arithmetic as one dense batch with no
    per-request work. Every row gets the mean context length (so no padding and no mask), the backbone
    runs once over R blocks and the LM head scores R x gamma rows; no sampling, no head loop bookkeeping,
    no probability rows written out. None for drafters without a feature-reading backbone."""
    model = getattr(drafter, "model", drafter)  # the hybrid's model part
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "block_hidden"):
        return None
    cfg, n = backbone.cfg, len(requests)
    length = round(sum(r.memo.length for r in requests) / n)
    dev, dtype = backbone.fc.weight.device, backbone.fc.weight.dtype
    kv = [(torch.randn(n, cfg.num_kv_heads, length, cfg.head_dim, device=dev, dtype=dtype),) * 2
          for _ in backbone.layers]
    x = backbone.block_inputs(torch.tensor([r.ids[-1] for r in requests], device=dev))
    pos = length + torch.arange(cfg.n_slots, device=dev)[None].expand(n, -1)
    gamma = model.gamma

    @torch.no_grad()
    def floor():
        h = backbone.block_hidden(x, pos, kv, None)
        return backbone.logits(h[:, -gamma:])
    return floor


if __name__ == "__main__":
    main()
