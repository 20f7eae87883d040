"""Training in several processes (issue 31): two CPU processes under `accelerate launch` for a few
steps. Parameters end identical on both ranks, only rank 0 writes checkpoints and metrics, and the loss
tracks a one-process run with the same global batch (2 processes x 2 sequences against 1 x 4)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from labkit.__main__ import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
#: the two runs draw different sequences (each rank its own), so their losses agree only on average:
#: the mean training loss over the last half of the steps within this relative tolerance
LOSS_TOLERANCE = 0.25


def job(model, data, out, batch_seqs: int) -> list[str]:
    return ["train", "--target", str(model), "--data", str(data), "--out", str(out), "--steps", str(STEPS),
            "--save-every", "4", "--batch-seqs", str(batch_seqs), "--anchors", "4", "--gamma", "3",
            "--target-layers", "2,5", "--draft-vocab", "64", "--seed", "5", "--mixed-precision", "no"]


def test_two_processes_keep_identical_parameters_write_once_and_track_one_process(tiny_model_dir, tmp_path):
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert launcher, "accelerate's launcher is installed with the lab (pyproject); reinstall it"
    data = tmp_path / "data"
    assert main(["prepare-data", "--target", str(tiny_model_dir), "--out", str(data), "--n-prompts", "16",
                 "--max-new-tokens", "12", "--shard-size", "8", "--benchmarks", "lab"]) == 0
    two, one = tmp_path / "two", tmp_path / "one"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + str(REPO / "tests"), "OMP_NUM_THREADS": "1"}
    # `--cpu` alone runs one process (several CPU processes go through MPI there); `--multi_gpu` starts two
    # through torchrun, and on a machine without a GPU the trainer joins them over gloo
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(REPO / "tests" / "helpers" / "ddp_train.py"), *job(tiny_model_dir, data, two, 2)]
    env.pop("CUDA_VISIBLE_DEVICES", None)
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [load_file(str(two / f"rank{i}.safetensors")) for i in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0]), "the ranks' parameters diverged"
    writes = [json.loads((two / f"rank{i}.writes.json").read_text()) for i in (0, 1)]
    assert writes[0]["rc"] == writes[1]["rc"] == 0
    assert "save_training_state" in writes[0]["writes"] and "_append_jsonl" in writes[0]["writes"]
    assert writes[1]["writes"] == [], "only rank 0 may write checkpoints and metrics"
    saved = load_file(str(two / "last" / "model.safetensors"))
    assert all(torch.equal(saved[k], ranks[0][k].to(saved[k].dtype)) for k in saved if k in ranks[0])
    assert main(job(tiny_model_dir, data, one, 4)) == 0
    rows = {name: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for name, d in
            (("two", two), ("one", one))}
    assert [r["step"] for r in rows["two"]] == [r["step"] for r in rows["one"]] == [4, 8]
    assert rows["two"][-1]["anchors"] == rows["one"][-1]["anchors"] == STEPS * 4 * 4  # the same global batch
    a, b = rows["two"][-1]["loss"], rows["one"][-1]["loss"]
    print(f"mean loss over steps 5-8: two processes {a:.4f}, one process {b:.4f} ({abs(a - b) / b:.1%} apart)")
    assert abs(a - b) <= LOSS_TOLERANCE * b, f"two processes {a:.3f} against one {b:.3f}"
