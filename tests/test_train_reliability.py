"""Reproducible, crash-safe training (issue 31): the same command twice gives identical weights; a run
killed with SIGKILL after a checkpoint resumes to the weights of an uninterrupted run; a crash between
the checkpoint's two renames leaves `last.old`, which resume reads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from labkit.__main__ import main
from labkit.drafters.checkpoint import previous, recover

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    out = root / "data"
    assert main(["prepare-data", "--target", str(tiny_model_dir), "--out", str(out), "--n-prompts", "8",
                 "--max-new-tokens", "12", "--shard-size", "4", "--benchmarks", "lab"]) == 0
    return out


def train_argv(model, data, out, steps: int, save_every: int, seed: int = 3) -> list[str]:
    return ["train", "--target", str(model), "--data", str(data), "--out", str(out), "--steps", str(steps),
            "--save-every", str(save_every), "--batch-seqs", "2", "--anchors", "4", "--gamma", "3",
            "--target-layers", "2,5", "--draft-vocab", "64", "--no-init-from-target", "--seed", str(seed)]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last" / "model.safetensors"))


def step_of(run: Path) -> int:
    return json.loads((run / "last" / "config.json").read_text())["extra"]["step"]


def test_the_same_command_twice_gives_identical_weights(tiny_model_dir, data, tmp_path):
    """Random initialisation included (--no-init-from-target): bit-identical on the CPU; another seed
    gives other weights (so the check can fail)."""
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert main(train_argv(tiny_model_dir, data, tmp_path / name, 4, 2, seed)) == 0
    a, b, c = (weights(tmp_path / n) for n in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_resume_reads_last_old_when_a_crash_left_only_it(tiny_model_dir, data, tmp_path, monkeypatch):
    """A crash between `os.replace(last, last.old)` and `os.replace(tmp, last)` leaves last.old: resume
    continues from its step, and ends with the uninterrupted run's weights."""
    import functools

    import labkit.pipeline.train as train_module
    run, ref = tmp_path / "run", tmp_path / "ref"
    assert main(train_argv(tiny_model_dir, data, ref, 6, 2)) == 0
    with monkeypatch.context() as m:  # the same 6-step command, stopped after step 4's checkpoint
        m.setattr(train_module, "train", functools.partial(train_module.train, stop_at=4))
        assert main(train_argv(tiny_model_dir, data, run, 6, 2)) == 0
    os.replace(run / "last", previous(run / "last"))  # the moment between the two renames
    assert not (run / "last").exists() and recover(run / "last").exists() and step_of(run) == 4
    os.replace(run / "last", previous(run / "last"))
    assert main(train_argv(tiny_model_dir, data, run, 6, 2)) == 0
    assert step_of(run) == 6 and not previous(run / "last").exists()
    w, r = weights(run), weights(ref)
    assert all(torch.equal(w[k], r[k]) for k in r)


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(tiny_model_dir, data, tmp_path):
    """SIGKILL (no clean-up of any kind) once the first checkpoint is on disk; the same command then
    resumes from it and ends with exactly the weights of a run that was never interrupted."""
    steps, every = 400, 10
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(train_argv(tiny_model_dir, data, ref, steps, every)) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "labkit", *train_argv(tiny_model_dir, data, run, steps, every)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run / "last" / "trainer.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before its first checkpoint"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = step_of(recover(run / "last").parent)
    assert every <= killed_at < steps, "the kill came too late to test a resume"
    assert main(train_argv(tiny_model_dir, data, run, steps, every)) == 0
    assert step_of(run) == steps
    w, r = weights(run), weights(ref)
    assert all(torch.equal(w[k], r[k]) for k in r)
