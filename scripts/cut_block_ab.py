"""Acceptance of a DSpark block cut to its cap against the whole block: what `fit_block` costs in tau.

DFlash and DSpark blocks attend both ways, so a block drafted with only its first k slots (`fit_block`,
the engine's default when a policy caps a request at k drafts) can propose other tokens than the whole
block's first k. Verification stays lossless either way (every proposal carries the probabilities it was
drawn from); what may change is how often the drafts are accepted. This decodes the same prompts with the
shipped DSpark at caps 1..K, cut and whole, and prints the acceptance by position with its standard error:

    python scripts/cut_block_ab.py --prompts 40 --caps 1 2 3 --temperature 0 --json build/cut_block_ab.json

Measured on session 9's CPU (greedy, 40 prompts, 48 tokens): cap 1 0.461 cut against 0.468 whole, cap 2
0.440 + 0.228 against 0.440 + 0.231, within one standard error (data/serving/cpu-measurements-2026-12-06.md).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from labkit.core.sampling import SamplingParams
from labkit.decode.loop import generate
from labkit.drafters import shipped_checkpoint
from labkit.drafters.checkpoint import load_backbone
from labkit.drafters.dspark import DSparkDrafter
from labkit.model.target import load_target
from labkit.pipeline.prompt_sets import prompt_set


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=40, help="benchmark prompts decoded per arm")
    ap.add_argument("--caps", nargs="+", type=int, default=[1, 2, 3], help="drafts per block")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--benchmarks", default=None, help="evaluation prompt folder, or 'lab' (default: as bench)")
    ap.add_argument("--json", dest="json_out", default=None, help="write the table as JSON here")
    args = ap.parse_args()

    target = load_target()
    model = load_backbone(shipped_checkpoint("dspark", target.name), target)
    prompts = prompt_set(args.benchmarks).load(args.prompts)[:args.prompts]
    rows = []
    print(f"{'cap':>3} {'block':>5} {'rounds':>6}  acceptance by position (+- standard error)")
    for cap in args.caps:
        for cut in (True, False):
            drafter = DSparkDrafter(model, cap, fit_block=cut)
            reached = [0] * cap
            rounds = 0
            for i, p in enumerate(prompts):
                out = generate(target, target.encode_prompt(p.text), drafter, args.max_new_tokens,
                               SamplingParams(args.temperature), seed=i)
                for rnd in out.rounds:
                    rounds += 1
                    for j in range(rnd.accepted):
                        reached[j] += 1
            rates = [n / rounds for n in reached]
            errors = [math.sqrt(r * (1 - r) / rounds) for r in rates]
            rows.append({"cap": cap, "cut": cut, "rounds": rounds, "acceptance": rates, "standard_error": errors})
            print(f"{cap:>3} {'cut' if cut else 'whole':>5} {rounds:>6}  "
                  + ", ".join(f"{r:.3f} +- {e:.3f}" for r, e in zip(rates, errors)), flush=True)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({"temperature": args.temperature, "prompts": len(prompts),
                                                   "max_new_tokens": args.max_new_tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
