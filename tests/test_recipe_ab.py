"""scripts/recipe_ab.py's step arithmetic: with --epochs each arm gets the steps that make that many
passes over its own training sequences (the data curve at scale), and --extra reaches every arm."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

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
