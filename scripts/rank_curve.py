"""tau against the Markov head's rank for a DSpark checkpoint (SVD cuts of its trained transition),
measured teacher-forced on held-out target sequences; prints a table and writes JSON.

    python scripts/rank_curve.py --drafter dspark --n-seqs 64 --json build/rank-curve.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from labkit.measure.diagnostics import heldout_batch, heldout_items, rank_curve
from labkit.drafters import SHIPPED, shipped_checkpoint
from labkit.drafters.checkpoint import load_backbone, read_config
from labkit.model.target import load_target


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--drafter", default="dspark", help="dspark or a DSpark checkpoint path")
    p.add_argument("--data", default="data/train", help="data folder; its last sequences are held out")
    p.add_argument("--n-seqs", type=int, default=64, help="held-out sequences")
    p.add_argument("--anchors", type=int, default=32, help="random blocks per sequence")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args()
    path = shipped_checkpoint(args.drafter) if args.drafter in SHIPPED else Path(args.drafter)
    target = load_target(None)
    model = load_backbone(path, target)
    trained = int(read_config(path).get("extra", {}).get("data_sequences", 0))
    cache = Path(tempfile.mkdtemp(prefix="labkit-rank-")) / "heldout.safetensors"
    items = heldout_items(target, args.data, model.cfg.target_layers, args.n_seqs, cache, trained)
    batch = heldout_batch(items, model.cfg.gamma, args.anchors)
    ranks = sorted({0, model.cfg.rank} | {2 ** i for i in range(model.cfg.rank.bit_length())})
    rows = rank_curve(model, batch, ranks)
    print(f"{args.drafter}: {len(items)} held-out sequences, {int(batch['valid'][..., 0].sum())} blocks")
    print(f"{'rank':>6}{'tau greedy':>12}{'tau T=1':>10}")
    for r in rows:
        print(f"{r['rank']:>6}{r['tau_greedy']:>12.3f}{r['tau_t1']:>10.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"drafter": str(path), "n_seqs": len(items), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
