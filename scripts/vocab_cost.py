"""The large-vocabulary cost of drafting: T_draft of a DSpark block against the draft vocabulary's size
and the Markov rank, beside the target's own one-token step, for one or more targets; prints a table
and writes JSON. Fresh (untrained) drafters: the time does not depend on the weights' values.

    python scripts/vocab_cost.py --targets default gemma3-270m --json build/vocab-cost.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from labkit.measure.costs import vocab_costs
from labkit.model.timing import forward_cost
from labkit.model.target import load_target

PROMPT = "Write a Python function that returns the n-th Fibonacci number, with a docstring."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", nargs="+", default=["default", "gemma3-270m"])
    p.add_argument("--vocab", nargs="+", type=int, default=[4096, 8192, 16384, 32768, 65536, 262144],
                   help="draft vocabulary sizes (capped at each target's vocabulary)")
    p.add_argument("--ranks", nargs="+", type=int, default=[0, 64, 256], help="Markov ranks (0 = DFlash)")
    p.add_argument("--gamma", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args()
    rows = []
    for name in args.targets:
        target = load_target(name)
        step_ms = 1e3 * forward_cost(target, 200, [1], repeats=args.repeats, progress=False).median_s[0]
        ids = target.encode_prompt(PROMPT)
        for c in vocab_costs(target, args.vocab, args.ranks, ids, args.gamma, repeats=args.repeats):
            rows.append({"target": target.name, "vocab_size": target.vocab_size, "step_ms": step_ms, **c.to_dict()})
    print(f"{'target':<24}{'V':>8}{'V_draft':>9}{'rank':>6}{'T_draft ms':>12}{'/T_step':>9}{'head MB':>9}")
    for r in rows:
        print(f"{r['target']:<24}{r['vocab_size']:>8}{r['v_draft']:>9}{r['rank']:>6}{r['draft_ms']:>12.1f}"
              f"{r['draft_ms'] / r['step_ms']:>9.2f}{r['head_mb']:>9.1f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
