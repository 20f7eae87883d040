"""Soak the serving engine: N users in closed loop for a while, then drain; memory and step-time drift.

    python scripts/soak.py --minutes 10 --users 16 --json build/soak.json      # the full soak
    python scripts/soak.py --minutes 1 --users 16 --max-new-tokens 32            # CI's short one

Requests cycle over the evaluation prompts (a fresh seed each time round) until the time is up; then
no request is admitted and the running ones finish. Reported: requests served, whether every one
finished (or which failed, with their errors), resident memory (RSS, /proc/self/statm) at the start
of serving, at its peak and at the end, and the median step time in the first and the last fifth of
the steps against the number of active requests (drift that a leak or a growing cache would show).
Not a test: the numbers go to the table and the JSON; the exit status is 1 only if a request did not
finish.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labkit.core.sampling import SamplingParams  # noqa: E402
from labkit.decode.engine import Engine, closed_loop, cost_table_for, make_requests  # noqa: E402
from labkit.drafters import make_drafter  # noqa: E402
from labkit.model.target import load_target  # noqa: E402
from labkit.pipeline.prompt_sets import eval_prompts  # noqa: E402


def rss_mb() -> float:
    """Resident memory of this process now, in MiB (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def fifth_medians(steps, key) -> tuple[float | None, float | None]:
    n = max(1, len(steps) // 5)
    first, last = steps[:n], steps[-n:]
    return (statistics.median(key(s) for s in first) if first else None,
            statistics.median(key(s) for s in last) if last else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--policy", default="algorithm1")
    ap.add_argument("--drafter", default="dspark")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--benchmarks", default=None, help="evaluation prompt folder or 'lab' (default: as serve)")
    ap.add_argument("--target", default=None, help="HF causal LM id or path (default: the lab's target)")
    ap.add_argument("--table", default=None, help="cost-table JSON (default: the lab cache's cost_tables.json)")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args(argv)
    target = load_target(args.target)
    drafter = make_drafter(args.drafter, target)
    prompts, about = eval_prompts(args.benchmarks, 4)
    print(about)
    requests = make_requests(target, prompts, args.max_new_tokens, SamplingParams(args.temperature))
    engine = Engine(target, drafter, args.policy, cost_table_for(target, args.table, progress=True))
    memory = [(0.0, rss_mb())]
    start = time.perf_counter()
    for rec in closed_loop(requests, args.users, engine, requests=100_000, duration_s=60 * args.minutes):
        if len(engine.steps) % 20 == 0:
            memory.append((rec.t_s, rss_mb()))
    while engine.active:  # drain: nobody new, everybody finishes
        engine.step()
    memory.append((engine.now(), rss_mb()))
    wall = time.perf_counter() - start
    failed = [r for r in engine.done if not r.finished]
    per_request = lambda s: s.verify_s / s.active  # noqa: E731  (a step's cost per active request)
    first_ms, last_ms = fifth_medians(engine.steps, lambda s: 1e3 * (s.draft_s + s.verify_s))
    first_pr, last_pr = fifth_medians(engine.steps, lambda s: 1e3 * per_request(s))
    out = {
        "users": args.users, "policy": args.policy, "drafter": args.drafter, "minutes": args.minutes,
        "wall_s": wall, "prompt_set": about, "requests_served": len(engine.done),
        "all_finished": not failed, "failed": [{"id": r.id, "error": r.error} for r in failed],
        "steps": len(engine.steps), "rss_start_mb": memory[0][1], "rss_peak_mb": max(m for _, m in memory),
        "rss_end_mb": memory[-1][1], "rss_growth_mb": memory[-1][1] - memory[0][1],
        "memory_trace": memory, "step_ms_first_fifth": first_ms, "step_ms_last_fifth": last_ms,
        "verify_ms_per_request_first_fifth": first_pr, "verify_ms_per_request_last_fifth": last_pr,
    }
    print(f"{out['requests_served']} requests in {wall:.0f} s ({out['steps']} steps), all finished: "
          f"{out['all_finished']}; RSS {out['rss_start_mb']:.0f} -> {out['rss_end_mb']:.0f} MiB (peak "
          f"{out['rss_peak_mb']:.0f}); step {first_ms:.0f} -> {last_ms:.0f} ms median (first vs last fifth), "
          f"verify per request {first_pr:.1f} -> {last_pr:.1f} ms")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=1))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
