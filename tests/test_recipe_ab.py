"""scripts/recipe_ab.py's step arithmetic: with --epochs each arm gets the steps that make that many
passes over its own training sequences (the data curve at scale), and --extra reaches every arm."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shlex
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("recipe_ab", ROOT / "scripts" / "recipe_ab.py")
recipe_ab = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe_ab)


def shard_sequences(folder: Path, n: int) -> int:
    total = 0
    for shard in sorted(folder.glob("shard-*.safetensors"))[:n]:
        with safe_open(str(shard), "pt") as f:
            total += len(json.loads(f.metadata()["domains"]))
    return total


def args(**kw) -> argparse.Namespace:
    base = dict(data=[str(ROOT / "data" / "train")], max_shards=4, steps=600, epochs=None, extra="")
    return argparse.Namespace(**{**base, **kw})


def test_epoch_steps_rounds_up_and_never_returns_zero():
    assert recipe_ab.epoch_steps(100, 32, 1) == 4
    assert recipe_ab.epoch_steps(128, 32, 2) == 8
    assert recipe_ab.epoch_steps(3, 32, 0.1) == 1


def test_fixed_steps_without_epochs():
    assert recipe_ab.arm_steps("shards-2", args()) == 600


def test_epochs_scale_steps_with_each_arms_data():
    folder = ROOT / "data" / "train"
    a = args(epochs=2, extra="--batch-seqs 8")
    for n in (1, 3):
        assert recipe_ab.arm_steps(f"shards-{n}", a) == math.ceil(2 * shard_sequences(folder, n) / 8)
    # a lever arm trains on every --max-shards shard
    assert recipe_ab.arm_steps("layers-1", a) == math.ceil(2 * shard_sequences(folder, 4) / 8)


def test_epochs_count_every_data_folder():
    v1, v2 = ROOT / "data" / "train", ROOT / "data" / "train-v2"
    a = args(data=[str(v2), str(v1)], epochs=1, extra="--batch-seqs 4")
    expected = math.ceil((shard_sequences(v2, 2) + shard_sequences(v1, 2)) / 4)
    assert recipe_ab.arm_steps("shards-2", a) == expected


def test_a_checkpoint_arm_is_measured_not_trained():
    assert recipe_ab.train_arm("ckpt:data/drafters/dspark", args()) == Path("data/drafters/dspark")
    assert "trained elsewhere" in recipe_ab.arm_flags("ckpt:data/drafters/dspark")


def test_a_checkpoints_own_training_data_is_never_held_out(monkeypatch):
    ckpt = ROOT / "data" / "drafters" / "dspark"
    cfg = json.loads((ckpt / "config.json").read_text())
    command = cfg["extra"]["train_command"]
    shards = int(command.split("--max-shards ")[1].split()[0])
    v2 = ROOT / "data" / "train-v2"
    assert "--data data/train-v2" in command
    monkeypatch.chdir(ROOT)  # the recorded command names its folders relative to the repository root
    assert recipe_ab.ckpt_trained_sequences(ckpt, str(v2)) == shard_sequences(v2, shards)
    assert recipe_ab.ckpt_trained_sequences(ckpt, str(ROOT / "data" / "train-gemma3")) == 0


def test_an_arm_is_a_job_the_shipped_recipe_with_one_lever():
    """Every arm is a TrainJob: the base arm is the shipped DSpark preset on this comparison's data, steps
    and run folder; each other arm changes exactly the fields its flags name."""
    from dataclasses import fields, replace

    from labkit.__main__ import train_overrides
    from labkit.pipeline.train import TrainJob, train_preset
    a = args(runs="build/ab", max_minutes=None)
    base = recipe_ab.arm_job("base", a)
    assert base == replace(train_preset("dspark"), data=tuple(a.data), max_shards=4,
                           feature_dtype=TrainJob.feature_dtype, steps=600, out="build/ab/base", export=None)
    for name in [*recipe_ab.ARMS, "shards-2"]:
        job = recipe_ab.arm_job(name, a)
        changed = {f.name for f in fields(job) if getattr(job, f.name) != getattr(base, f.name)} - {"out"}
        lever = train_overrides(shlex.split(recipe_ab.arm_flags(name)))
        assert changed == set(lever) == set(recipe_ab.arm_overrides(name)), name
        assert replace(base, **lever, out=job.out) == job
    assert recipe_ab.arm_flags("random-init") == "--no-init-from-target"
    assert recipe_ab.arm_flags("dflash") == "--drafter dflash" and recipe_ab.arm_flags("shards-8") == "--max-shards 8"


def test_extra_wins_over_the_arm_and_the_scripts_own_options_win_over_extra():
    a = args(runs="build/ab", max_minutes=5.0,
             extra="--layers 3 --steps 9 --out elsewhere --max-minutes 2 --device cuda --batch-seqs 32")
    job = recipe_ab.arm_job("layers-1", a)
    assert (job.layers, job.device, job.batch_seqs) == (3, "cuda", 32)
    assert (job.steps, job.out, job.max_minutes) == (600, "build/ab/layers-1", 5.0)
    assert recipe_ab.arm_job("layers-1", args(runs="r", max_minutes=None, extra="--max-minutes 2")).max_minutes == 2.0
    with pytest.raises(SystemExit, match="--extra: Not options"):
        recipe_ab.arm_job("base", args(runs="r", max_minutes=None, extra="--no-such-flag"))


def test_the_base_and_dflash_arms_of_the_full_set_run_are_the_shipped_presets(monkeypatch):
    """data/README.md: the shipped drafters are what `recipe_ab.py --data data/train-v2 data/train --max-shards
    156 --arms base dflash --epochs 1 --extra "--feature-dtype bfloat16" --runs build/ab-fullset` trained (then
    exported): its arms are the presets "dspark" and "dflash" but for the export."""
    from dataclasses import replace

    from labkit.pipeline.train import train_preset
    monkeypatch.chdir(ROOT)  # the folders are named relative to the repository root, as in the recorded commands
    a = args(data=["data/train-v2", "data/train"], max_shards=156, epochs=1, extra="--feature-dtype bfloat16",
             runs="build/ab-fullset", max_minutes=None)
    assert recipe_ab.arm_job("base", a) == replace(train_preset("dspark"), export=None)
    assert recipe_ab.arm_job("dflash", a) == replace(train_preset("dflash"), export=None)
