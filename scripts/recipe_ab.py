"""Recipe A/Bs and the tau-against-data curve: train named variants ("arms") of one drafter recipe on
the same data for the same number of steps, then measure every arm on the same held-out sequences
(teacher-forced tau, greedy and T=1) and in real greedy decoding of held-out prompts (tau, and tokens/s
against the lab's AR loop, timed interleaved); prints a table and writes JSON.

Each arm's run folder resumes, so an interrupted comparison continues where it stopped; an arm whose
run already reached --steps is only evaluated. Held-out sequences are the tail of the first --data
folder, after the --max-shards shards every arm trains on (refused if they overlap).

    python scripts/recipe_ab.py --arms base random-init layers-1 layers-3 hard-labels anchors-128 \\
        --steps 600 --max-shards 80 --json build/ab/recipe.json
    python scripts/recipe_ab.py --arms shards-8 shards-16 shards-32 shards-80 --steps 600 \\
        --max-shards 80 --json build/ab/data-curve.json          # tau against training tokens
    python scripts/recipe_ab.py --arms ckpt:data/drafters/dspark --data data/train-v2   # measure a checkpoint

A `ckpt:PATH` arm is a drafter trained elsewhere, measured the same way; the held-out sequences must
lie beyond what its recorded train command (and the run it was warm-started from) read of that folder.

`--epochs E` replaces the fixed step count by E passes over each arm's own training sequences, so that
a data curve gives every arm the steps its data calls for (at fixed steps, small data wins by seeing
each sequence more often). `--extra` adds train options to every arm (`--device cuda --batch-seqs 32`
on a GPU: scripts/gpu/job.sh), over the arm's own.

Each arm is a `labkit.pipeline.train.TrainJob` (the shipped recipe, the data, the arm's lever, --extra)
run by `run_training`; it prints and records the equivalent `python -m labkit train` line.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import time
from dataclasses import replace
from pathlib import Path

import torch

from labkit.__main__ import build_parser, train_overrides
from labkit.core.errors import LabkitError
from labkit.pipeline.data import same_folder, sequences_trained_on, shard_sequence_count
from labkit.decode.loop import generate
from labkit.measure.diagnostics import heldout_batch, heldout_items, offline_acceptance
from labkit.drafters.checkpoint import load_backbone, read_config
from labkit.drafters.dflash import DFlashDrafter
from labkit.drafters.dspark import DSparkDrafter, DSparkModel
from labkit.model.target import load_target
from labkit.core.trace import mean_tau
from labkit.pipeline.train import SHIPPED_RECIPE, TrainJob, run_training, train_options

#: every arm changes one thing of the shipped DSpark recipe (labkit.pipeline.train.SHIPPED_RECIPE): TrainJob fields
ARMS = {
    "base": {},
    "random-init": {"init_from_target": False},
    "layers-1": {"layers": 1},
    "layers-3": {"layers": 3},
    "hard-labels": {"ce_weight": 1.0, "l1_weight": 0.0},
    "anchors-128": {"anchors": 128},
    "vocab-4096": {"draft_vocab": 4096},
    "vocab-16384": {"draft_vocab": 16384},
    "gamma-4": {"gamma": 4},
    "gamma-16": {"gamma": 16},
    "dflash": {"drafter": "dflash"},
    "seed-1": {"seed": 1},  # the base recipe again with another seed: how far apart two runs of one arm land
}


def checkpoint_arm(name: str) -> Path | None:
    """The checkpoint a ckpt:PATH arm names (a drafter trained elsewhere, only measured), else None."""
    return Path(name.removeprefix("ckpt:")) if name.startswith("ckpt:") else None


def arm_overrides(name: str) -> dict:
    """An arm's change to the recipe (TrainJob fields): a named lever, or shards-N (the first N shards: the
    data curve)."""
    if name.startswith("shards-"):
        return {"max_shards": int(name.split("-", 1)[1])}
    if name not in ARMS:
        raise SystemExit(f"unknown arm {name!r}: use one of {', '.join(ARMS)} or shards-N")
    return ARMS[name]


def arm_flags(name: str) -> str:
    """An arm's change as train options (for the table), or where a ckpt:PATH arm was trained."""
    if checkpoint_arm(name):
        return f"(trained elsewhere: {checkpoint_arm(name)})"
    return shlex.join(train_options(arm_overrides(name)))


def extra_overrides(args) -> dict:
    """--extra's train options as TrainJob fields (only those it names)."""
    try:
        return train_overrides(shlex.split(args.extra))
    except LabkitError as exc:
        raise SystemExit(f"--extra: {exc}") from None


def recipe_job(name: str, args, out: str) -> TrainJob:
    """The arm's recipe: the shipped one on --data (the first --max-shards shards of each), then the arm's
    lever, then --extra (which wins), run in `out`."""
    job = TrainJob(**SHIPPED_RECIPE, data=args.data, max_shards=args.max_shards, out=out)
    return replace(job, **{**arm_overrides(name), **extra_overrides(args), "out": out})


def epoch_steps(sequences: int, batch_seqs: int, epochs: float) -> int:
    """Optimizer steps for `epochs` passes over `sequences` at `batch_seqs` a step (at least one)."""
    return max(1, math.ceil(epochs * sequences / batch_seqs))


def arm_steps(name: str, args) -> int:
    """--steps, or with --epochs the steps that make that many passes over this arm's own data."""
    if not args.epochs:
        return args.steps
    job = recipe_job(name, args, out="-")
    sequences = sum(shard_sequence_count(folder, job.max_shards) for folder in job.data)
    return epoch_steps(sequences, job.batch_seqs, args.epochs)


def arm_job(name: str, args) -> TrainJob:
    """The arm's training job: its recipe for its steps (arm_steps) in its run folder under --runs, capped
    at --max-minutes when given."""
    job = recipe_job(name, args, out=str(Path(args.runs) / name))
    return replace(job, steps=arm_steps(name, args), **({"max_minutes": args.max_minutes} if args.max_minutes else {}))


def train_arm(name: str, args) -> Path:
    """Train (or resume) one arm; returns its final checkpoint folder (a ckpt:PATH arm is only measured)."""
    if checkpoint_arm(name):
        return checkpoint_arm(name)
    job = arm_job(name, args)
    last = Path(job.out) / "last"
    if (last / "config.json").exists() and read_config(last).get("extra", {}).get("step") == job.steps:
        return last
    print(f"[{name}] {job.command_line()}")
    return run_training(job, log=lambda msg: print(f"[{name}] {msg}"))


def ckpt_trained_sequences(ckpt: Path, folder: str) -> int:
    """How many leading sequences of `folder` a checkpoint trained on (its per-folder record, or for older
    checkpoints its recorded train command), and the one it was warm-started from, so that its held-out
    sequences stay unseen."""
    extra = read_config(ckpt).get("extra", {})
    seen = 0
    words = shlex.split(extra.get("train_command", ""))
    if "data_folders" in extra:  # recorded per folder since 2026-12-05
        seen = sequences_trained_on(extra, folder)
    elif "train" in words:  # older: parse `python -m labkit train ...` from the subcommand on
        parsed, _ = build_parser().parse_known_args(words[words.index("train"):])
        if any(same_folder(d, folder) for d in parsed.data):
            seen = shard_sequence_count(folder, parsed.max_shards)
    parent = extra.get("init_from")
    if parent and Path(parent).resolve() != Path(ckpt).resolve() and (Path(parent) / "config.json").exists():
        seen = max(seen, ckpt_trained_sequences(Path(parent), folder))
    return seen


@torch.inference_mode()
def decode_heldout(target, drafter, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy decoding of held-out prompts with the drafter and without, interleaved per prompt."""
    rounds, spec_s, ar_s, n_tok, same = [], 0.0, 0.0, 0, 0
    generate(target, prompts[0], None, 4), generate(target, prompts[0], drafter, 4)  # untimed warm-up
    for ids in prompts:
        t0 = time.perf_counter()
        ar = generate(target, ids, None, new_tokens)
        t1 = time.perf_counter()
        sp = generate(target, ids, drafter, new_tokens)
        t2 = time.perf_counter()
        # counted, not asserted: on a GPU, fp32 kernels chosen by shape can flip a near-tie (lossless
        # decoding itself is tested in tests/), and one flip must not lose the arms measured so far
        same += sp.token_ids == ar.token_ids
        rounds += sp.rounds
        ar_s, spec_s, n_tok = ar_s + t1 - t0, spec_s + t2 - t1, n_tok + len(ar.token_ids)
    return {"decode_tau": mean_tau(rounds), "speedup_vs_ar": ar_s / spec_s, "ar_tok_s": n_tok / ar_s,
            "identical": f"{same}/{len(prompts)}"}


def evaluate(name: str, ckpt: Path, target, args) -> dict:
    model = load_backbone(ckpt, target)
    folder = args.data[0]
    done = shard_sequence_count(folder, args.max_shards)
    if checkpoint_arm(name):
        done = max(done, ckpt_trained_sequences(ckpt, folder))
    layers = tuple(model.cfg.target_layers)
    items = heldout_items(target, folder, layers, args.n_heldout,
                          Path(args.runs) / f"heldout-{args.n_heldout}-{'-'.join(map(str, layers))}.safetensors", done)
    acc = offline_acceptance(model, heldout_batch(items, model.cfg.gamma, anchors=32))
    drafter = (DSparkDrafter if isinstance(model, DSparkModel) else DFlashDrafter)(model)
    prompts = [it.seq.ids[: it.seq.prompt_len] for it in items[: args.n_decode]]
    extra = read_config(ckpt).get("extra", {})
    # the checkpoint's own train command, so a row says which folders it trained on (arm names do not)
    return {"arm": name, "flags": arm_flags(name), "train_command": extra.get("train_command"),
            "steps": extra.get("step"),
            "train_response_tokens": extra.get("data_response_tokens"),
            "tf_tau_greedy": acc.tau_greedy, "tf_tau_t1": acc.tau_t1, "accept_greedy": acc.accept_greedy,
            **decode_heldout(target, drafter, prompts, args.new_tokens)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", nargs="+", default=["base"], help=f"{', '.join(ARMS)}, shards-N or ckpt:PATH")
    p.add_argument("--data", nargs="+", default=["data/train"], help="prepare-data folders (held out: the first's tail)")
    p.add_argument("--max-shards", type=int, default=80, help="shards of each folder every arm trains on")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--epochs", type=float, default=None,
                   help="instead of --steps: this many passes over each arm's own training sequences")
    p.add_argument("--extra", default="", help="flags appended to every arm's train command")
    p.add_argument("--max-minutes", type=float, default=None, help="cap on each arm's training time")
    p.add_argument("--n-heldout", type=int, default=64, help="held-out sequences (teacher-forced tau)")
    p.add_argument("--n-decode", type=int, default=8, help="held-out prompts decoded for real")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--runs", default="build/ab", help="run folders, one per arm")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    target = load_target(None)
    rows = []
    for name in args.arms:
        rows.append(evaluate(name, train_arm(name, args), target, args))
        if args.json:  # after every arm, so a stopped comparison keeps what it measured
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(rows, indent=2))
    print(f"{'arm':<14}{'tokens':>9}{'steps':>7}{'TF tau greedy':>15}{'TF tau T=1':>12}{'decode tau':>12}"
          f"{'x AR':>7}{'identical':>11}")
    for r in rows:
        print(f"{r['arm']:<14}{r['train_response_tokens'] or 0:>9}{r['steps'] or 0:>7}{r['tf_tau_greedy']:>15.3f}"
              f"{r['tf_tau_t1']:>12.3f}{r['decode_tau']:>12.3f}{r['speedup_vs_ar']:>7.2f}{r['identical']:>11}")


if __name__ == "__main__":
    main()
