"""Training as a function: `labkit.pipeline.train.TrainJob` holds every option of `python -m labkit train`
(each default written once, there), the command line only maps its arguments to a job, a job gives back
the command line that runs it, and the named presets are the shipped drafters' recorded commands.

No training here (tests/test_train_cli.py trains through both doors)."""

from __future__ import annotations

import argparse
import inspect
import json
import shlex
from dataclasses import MISSING, fields, replace
from pathlib import Path

import pytest

from labkit.__main__ import build_parser, main, train_job, train_overrides
from labkit.core.errors import LabkitError
from labkit.pipeline.data import shard_sequence_count
from labkit.pipeline.train import (SHIPPED_RECIPE, TRAIN_PRESETS, LossWeights, TrainConfig, TrainJob, run_training,
                                   train_options, train_preset)

ROOT = Path(__file__).resolve().parents[1]


def parse(argv: list[str]) -> TrainJob:
    """The job `python -m labkit ARGV` runs."""
    return train_job(build_parser().parse_args(argv))


def train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def every_option_set() -> TrainJob:
    """A job in which every field differs from its default."""
    job = TrainJob(target="my/model", drafter="dspark", head="rnn", rank=0, layers=2, gamma=4, draft_vocab=10,
                   target_layers=(1, 2), anchor_mode="anchor-masks", init_from_target=False, qk_norm=True,
                   frozen_mask=True, init_from="runs/old/last", data=("a b", "c"), max_shards=3,
                   feature_dtype="bfloat16", batch_seqs=3, anchors=5, lr=1e-4, ce_weight=1.0, l1_weight=0.0,
                   mixed_precision="fp16", steps=7, save_every=2, max_minutes=0.5, seed=3, device="cpu",
                   out="runs/new one", export="build/export")
    same = [f.name for f in fields(job) if f.default is not MISSING and getattr(job, f.name) == f.default]
    assert not same, same
    return job


# ----------------------------------------------------------------------------- the presets


@pytest.mark.parametrize("name", ["dspark", "dflash"])
def test_a_shipped_preset_is_the_command_its_checkpoint_records(name, monkeypatch):
    """train_preset("dspark") / ("dflash") is the job of the train command in data/drafters/<name>/config.json
    (parsed by the CLI's own parser), and agrees with what that checkpoint records of its data, steps and
    shape."""
    cfg = json.loads((ROOT / "data" / "drafters" / name / "config.json").read_text())
    extra = cfg["extra"]
    words = shlex.split(extra["train_command"])
    assert words[:4] == ["python", "-m", "labkit", "train"]
    job = train_preset(name)
    assert parse(words[3:]) == job
    assert job.export == f"data/drafters/{name}" and job.drafter == cfg["kind"] == name
    assert (job.steps, job.feature_dtype) == (extra["step"], extra["feature_dtype"])
    assert (job.layers, job.gamma, job.draft_vocab) == (cfg["n_layers"], cfg["gamma"], cfg["draft_vocab"])
    assert extra["anchors"] == job.steps * job.batch_seqs * job.anchors
    if name == "dspark":
        assert (job.head, job.rank) == (cfg["head"], cfg["rank"])
    monkeypatch.chdir(ROOT)  # the recorded folders are relative to the repository root
    assert {d: shard_sequence_count(d, job.max_shards) for d in job.data} == extra["data_folders"]


def test_the_shipped_presets_share_the_recipe_that_recipe_ab_varies():
    dspark, dflash = train_preset("dspark"), train_preset("dflash")
    assert replace(dflash, drafter="dspark", out=dspark.out, export=dspark.export) == dspark
    for key, value in SHIPPED_RECIPE.items():
        assert getattr(dspark, key) == value, key


def test_every_preset_round_trips_through_the_command_line():
    jobs = [train_preset(n) for n in TRAIN_PRESETS if n != "tiny"]
    jobs += [train_preset("tiny", target="tiny/model", data=["d1", "d2"], out="run"), every_option_set()]
    for job in jobs:
        argv = job.argv()
        assert argv[0] == "train" and "--out" in argv
        assert parse(argv) == job, argv
        assert shlex.split(job.command_line()) == ["python", "-m", "labkit", *argv]


def test_a_job_writes_only_the_options_that_differ_from_the_defaults():
    assert TrainJob(out="x").argv() == ["train", "--out", "x"]
    assert TrainJob(out="x", init_from_target=False, qk_norm=True).argv() == \
        ["train", "--no-init-from-target", "--qk-norm", "--out", "x"]
    assert train_options({"layers": 2, "init_from_target": False, "data": "d", "target_layers": (2, 5),
                          "max_shards": None, "qk_norm": False}) == \
        ["--layers", "2", "--no-init-from-target", "--data", "d", "--target-layers", "2,5"]


def test_train_preset_refuses_unknown_names_fields_and_a_missing_run_folder():
    assert train_preset("tiny", out="r").steps == TRAIN_PRESETS["tiny"]["steps"]
    assert train_preset("dspark", steps=10, export=None).steps == 10
    with pytest.raises(LabkitError, match="No training preset 'huge'.*tiny"):
        train_preset("huge", out="r")
    with pytest.raises(LabkitError, match="no field stepz"):
        train_preset("tiny", out="r", stepz=3)
    with pytest.raises(LabkitError, match="names no run folder: pass out="):
        train_preset("tiny")


# ----------------------------------------------------------------------------- one default, one place


def test_the_train_options_are_the_jobs_fields_with_the_jobs_defaults():
    """Every `train` option stores into the TrainJob field of its name, and its default is the field's."""
    actions = {a.dest: a for a in train_parser()._actions if a.dest != "help"}
    assert set(actions) == {f.name for f in fields(TrainJob)}
    for f in fields(TrainJob):
        if f.default is MISSING:
            assert actions[f.name].required, f.name
            continue
        default = actions[f.name].default
        assert (tuple(default) if f.name == "data" else default) == f.default, f.name
    assert parse(["train", "--out", "x"]) == TrainJob(out="x")


def test_the_loss_and_loop_defaults_live_in_one_place():
    job = TrainJob(out="x")
    assert (job.ce_weight, job.l1_weight) == (LossWeights.ce, LossWeights.l1)
    cfg = job.train_config()
    assert cfg.loss == LossWeights() and cfg.eval_every == cfg.save_every
    for name in ("steps", "batch_seqs", "lr", "save_every", "seed", "mixed_precision"):
        assert getattr(cfg, name) == getattr(TrainConfig(), name), name
    assert cfg.anchors_per_seq == TrainConfig().anchors_per_seq


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad, message", [
    (dict(lr=float("nan")), "--lr must be a positive number, got nan."),
    (dict(lr=0.0), "--lr must be a positive number"),
    (dict(ce_weight=0, l1_weight=0), "(hard labels only: --ce-weight 1 --l1-weight 0)."),
    (dict(ce_weight=-0.1), "--ce-weight and --l1-weight must be non-negative"),
    (dict(rank=-1), "--rank must be 0 (no sequential head) or more, got -1."),
    (dict(target_layers="1,a"), "--target-layers takes comma-separated integers, got '1,a'."),
    (dict(drafter="eagle"), "--drafter must be one of dflash, dspark, eagle3, got 'eagle'."),
    (dict(mixed_precision="fp8"), "--mixed-precision must be one of no, bf16, fp16"),
    (dict(steps=0), "--steps must be a positive integer, got 0."),
    (dict(max_shards=-2), "--max-shards must be a positive integer"),
    (dict(data=[]), "No training data folder given"),
])
def test_a_bad_job_is_refused_at_once_in_the_command_lines_words(bad, message):
    with pytest.raises(LabkitError) as err:
        TrainJob(out="x", **bad)
    assert message in str(err.value)
    with pytest.raises(LabkitError):
        replace(TrainJob(out="x"), **bad)


def test_a_job_keeps_paths_as_text_and_layers_as_a_tuple():
    job = TrainJob(out=Path("runs/a"), data=Path("data/x"), target_layers="2,5", export=Path("e"))
    assert (job.out, job.data, job.target_layers, job.export) == ("runs/a", ("data/x",), (2, 5), "e")
    assert TrainJob(out="x", target_layers=[2, 5]) == job.__class__(out="x", target_layers="2,5")
    with pytest.raises(AttributeError):
        job.steps = 3  # frozen: a preset cannot be changed by accident


# ----------------------------------------------------------------------------- no namespace outside the CLI


def test_run_training_takes_a_job_not_a_namespace():
    params = list(inspect.signature(run_training).parameters)
    assert params[0] == "job" and "args" not in params
    with pytest.raises(LabkitError, match="run_training takes a TrainJob"):
        run_training(argparse.Namespace(out="x", lr=1e-3))


def test_train_overrides_give_only_the_options_named():
    assert train_overrides(["--layers", "1", "--mixed-precision", "no", "--no-init-from-target"]) == \
        {"layers": 1, "mixed_precision": "no", "init_from_target": False}
    assert train_overrides([]) == {}
    over = train_overrides(["--target-layers", "2,5", "--data", "a", "b"])
    assert replace(TrainJob(out="x"), **over) == TrainJob(out="x", target_layers=(2, 5), data=("a", "b"))
    with pytest.raises(LabkitError, match="Not options of `python -m labkit train`: --no-such 1"):
        train_overrides(["--no-such", "1"])


def test_the_command_line_still_refuses_bad_jobs_in_one_line(capsys):
    assert main(["train", "--out", "x", "--rank", "-1", "--lr", "nan"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("labkit: --rank must be 0") and "\n" not in err
