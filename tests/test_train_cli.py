"""The train and eval commands end to end on a tiny model with the real vocabulary: prepare-data ->
train (features cached, draft vocabulary, checkpoint, export) -> eval and generate with the
checkpoint; and the one-line errors of bad input."""

from __future__ import annotations

import json
import shlex

import pytest
import torch

from labkit.__main__ import main
from labkit.drafters import check_spec
from labkit.core.errors import LabkitError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data, run, export = root / "data", root / "run", root / "export"
    assert main(["prepare-data", "--target", str(tiny_model_dir), "--out", str(data), "--n-prompts", "8",
                 "--max-new-tokens", "12", "--shard-size", "4", "--benchmarks", "lab"]) == 0
    train = ["train", "--target", str(tiny_model_dir), "--data", str(data), "--out", str(run),
             "--steps", "6", "--save-every", "3", "--batch-seqs", "2", "--anchors", "4", "--gamma", "3",
             "--target-layers", "2,5", "--draft-vocab", "64", "--export", str(export)]
    assert main(train) == 0
    return {"data": data, "run": run, "export": export, "model": tiny_model_dir, "root": root, "argv": train}


def test_train_writes_checkpoint_metrics_and_export(trained):
    cfg = json.loads((trained["run"] / "last" / "config.json").read_text())
    assert cfg["gamma"] == 3 and cfg["target_layers"] == [2, 5] and 0 < cfg["draft_vocab"] <= 64
    assert cfg["extra"]["step"] == 6
    rows = [json.loads(x) for x in (trained["run"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]
    exported = json.loads((trained["export"] / "config.json").read_text())
    assert exported["extra"]["data_sequences"] == 8
    assert exported["extra"]["data_folders"] == {str(trained["data"]): 8}
    # the command that made it, as given (not the argv of whatever process called in)
    assert shlex.split(exported["extra"]["train_command"]) == ["python", "-m", "labkit", *trained["argv"]]
    assert (trained["export"] / "metrics.jsonl").exists()
    assert list((trained["data"] / "features").iterdir()), "the feature cache was written"


def test_eval_reports_the_documented_keys(trained, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"turns": [t], "domain": d}) for t, d in
                                 [("What is 2 + 3?", "math"), ("Say hi.", "chat")]))
    out = tmp_path / "e.json"
    assert main(["eval", "--target", str(trained["model"]), "--drafter", str(trained["export"]), "--prompts",
                 str(prompts), "--max-new-tokens", "8", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("drafter", "target", "temperature", "tau", "tau_by_domain", "position_acceptance", "tokens_per_s",
                "n_prompts", "rounds"):
        assert key in res, key
    assert set(res["tau_by_domain"]) == {"math", "chat"} and res["n_prompts"] == 2
    assert 1.0 <= res["tau"] <= 4.0
    assert "tau" in capsys.readouterr().out


def test_generate_with_checkpoint_equals_plain_greedy(trained, capsys):
    outs = []
    for drafter in ("none", str(trained["export"])):
        assert main(["generate", "--target", str(trained["model"]), "--prompt", "Count to five.", "--drafter",
                     drafter, "--max-new-tokens", "10", "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out)["token_ids"])
    assert outs[0] == outs[1]


def test_training_resumes_where_it_stopped(trained, capsys):
    """A second run of the same command with more steps continues from step 6, not from scratch."""
    assert main(["train", "--target", str(trained["model"]), "--data", str(trained["data"]), "--out",
                 str(trained["run"]), "--steps", "8", "--save-every", "3", "--batch-seqs", "2", "--anchors", "4"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert json.loads((trained["run"] / "last" / "config.json").read_text())["extra"]["step"] == 8


@pytest.mark.parametrize("argv, message", [
    (["eval", "--drafter", "dflash:3", "--prompts", "x.jsonl"], "dflash takes no argument"),
    (["eval", "--drafter", "none", "--prompts", "x.jsonl"], "eval measures a drafter"),
    (["eval", "--drafter", "./no/such/run", "--prompts", "x.jsonl"], "not a drafter checkpoint"),
    (["eval", "--drafter", "prompt-lookup", "--prompts", "x.jsonl"], "does not exist"),
    (["generate", "--prompt", "hi", "--drafter", "./no/such/run"], "not a drafter checkpoint"),
    (["train", "--out", "x", "--lr", "nan"], "--lr must be a positive number"),
    (["train", "--out", "x", "--ce-weight", "0", "--l1-weight", "0"], "--ce-weight 1 --l1-weight 0"),
    (["train", "--out", "x", "--drafter", "eagle"], "invalid choice: 'eagle'"),
    (["train", "--out", "x", "--drafter", "dspark", "--rank", "-1"], "--rank must be 0"),
    (["calibrate", "--drafter", "dspark", "--temperature", "1"], "--temperature is not used here"),
    (["calibrate", "--drafter", "dspark", "--temperatures", "-1"], "--temperatures must be 0"),
    (["calibrate", "--drafter", "./no/such/run"], "not a drafter checkpoint"),
    (["train", "--out", "x", "--target-layers", "1,a"], "comma-separated integers"),
])
def test_bad_input_gives_one_line(argv, message, capsys):
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_check_spec_accepts_shipped_and_paths(trained):
    check_spec(str(trained["export"]))
    check_spec("dflash")


def test_dspark_train_calibrate_eval_end_to_end(trained, tmp_path, capsys):
    """train --drafter dspark -> calibrate on held-out sequences (writes temperatures) -> eval reports the
    calibration keys, after STS and raw; calibrate refuses prompts the drafter was trained on."""
    run, model = tmp_path / "dspark", str(trained["model"])
    assert main(["train", "--drafter", "dspark", "--rank", "8", "--target", model, "--data", str(trained["data"]),
                 "--out", str(run), "--steps", "4", "--save-every", "4", "--batch-seqs", "2", "--anchors", "4",
                 "--gamma", "3", "--target-layers", "2,5", "--draft-vocab", "64", "--max-shards", "1"]) == 0
    ck = run / "last"
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["kind"] == "dspark" and cfg["rank"] == 8 and cfg["calibration"] == {}
    assert cfg["extra"]["step"] == 4
    capsys.readouterr()
    # 8 sequences in 2 shards, trained on the first shard (4): 4 are held out
    assert main(["calibrate", "--target", model, "--drafter", str(ck), "--data", str(trained["data"]),
                 "--n-prompts", "5", "--max-new-tokens", "12"]) == 2
    assert "only 4 are held out" in capsys.readouterr().err
    report = tmp_path / "cal.json"
    assert main(["calibrate", "--target", model, "--drafter", str(ck), "--data", str(trained["data"]),
                 "--n-prompts", "4", "--max-new-tokens", "24", "--temperatures", "1", "--json", str(report)]) == 0
    fitted = json.loads((ck / "config.json").read_text())["calibration"]
    assert set(fitted) == {"T=1"} and len(fitted["T=1"]["temperatures"]) == 3
    assert fitted["T=1"]["sequences"] == [4, 8]  # the last 4 of 8, recorded
    assert fitted == json.loads(report.read_text())
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"turns": [t]}) for t in ["What is 2 + 3?", "Name three colours."]))
    out = tmp_path / "e.json"
    assert main(["eval", "--target", model, "--drafter", str(ck), "--prompts", str(prompts), "--temperature", "1",
                 "--max-new-tokens", "24", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("ece_by_position", "auc_by_position", "brier_by_position", "ece_by_position_raw"):
        assert len(res[key]) == 3, key
    assert res["calibrated"] is True and res["calibration_rounds"] > 0
    assert all(0 <= e <= 1 for e in res["ece_by_position"] + res["ece_by_position_raw"])


def test_training_items_join_folders_and_refuse_another_targets_data(make_tiny_target, tmp_path):
    """--data takes several prepare-data folders (their sequences are joined, features cached in each),
    and a folder whose manifest names another target is refused with the command that makes the right one."""
    import json as _json

    from safetensors.torch import save_file as _save
    from labkit.pipeline.features import training_items
    target = make_tiny_target(vocab_size=16, n_layers=3, hidden=32, name="tiny-a")
    for i, d in enumerate(("one", "two")):
        folder = tmp_path / d
        folder.mkdir()
        ids = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 10][: 6 + i], dtype=torch.int32)
        _save({"tokens": ids, "offsets": torch.tensor([0, len(ids)]), "prompt_lens": torch.tensor([2]),
               "prompt_index": torch.tensor([0]), "greedy": torch.tensor([0])}, str(folder / "shard-00000.safetensors"),
              metadata={"domains": _json.dumps(["math"])})
        (folder / "manifest.json").write_text(_json.dumps({"settings": {"target": "tiny-a"}}))
    items = training_items(target, [tmp_path / "one", tmp_path / "two"], (1, 2), progress=False)
    assert [len(it.seq.ids) for it in items] == [6, 7]
    assert all((tmp_path / d / "features").is_dir() for d in ("one", "two"))
    (tmp_path / "two" / "manifest.json").write_text(_json.dumps({"settings": {"target": "tiny-b"}}))
    with pytest.raises(LabkitError, match="prepare-data --target tiny-a"):
        training_items(target, [tmp_path / "one", tmp_path / "two"], (1, 2), progress=False)


def test_bf16_features_get_their_own_cache_and_a_consistent_log_sum_exp(make_tiny_target, tmp_path):
    """Features made by a bf16 target land beside the fp32 cache, never in it, and each row's stored
    log-sum-exp normalises exp(final . W) over the whole vocabulary as training computes it (fp32 over
    the stored fp16 state), so the target's probabilities sum to 1; the bf16 states stay close to fp32's."""
    import json as _json

    from safetensors.torch import load_file as _load, save_file as _save
    from labkit.pipeline.features import cache_dir, training_items
    folder = tmp_path / "data"
    folder.mkdir()
    ids = torch.tensor([1, 5, 2, 7, 3, 9, 4, 11, 6, 13, 8, 15], dtype=torch.int32)
    _save({"tokens": ids, "offsets": torch.tensor([0, 5, len(ids)]), "prompt_lens": torch.tensor([2, 2]),
           "prompt_index": torch.tensor([0, 1]), "greedy": torch.tensor([0, 0])}, str(folder / "shard-00000.safetensors"),
          metadata={"domains": _json.dumps(["math", "chat"])})
    caches = {}
    for dtype in (torch.float32, torch.bfloat16):
        target = make_tiny_target(vocab_size=16, n_layers=3, hidden=32)
        target.model.to(dtype)
        items = training_items(target, [folder], (1, 2), progress=False)
        assert len(items) == 2 and all(it.path.parent == cache_dir(folder, (1, 2), dtype) for it in items)
        caches[dtype] = _load(str(cache_dir(folder, (1, 2), dtype) / "shard-00000.safetensors"))
        head = target.model.get_output_embeddings().weight.float()
        p = torch.exp(caches[dtype]["final"].float() @ head.T - caches[dtype]["lse"][:, None])
        assert torch.allclose(p.sum(-1), torch.ones(len(ids)), atol=1e-5)
    assert cache_dir(folder, (1, 2), torch.bfloat16) != cache_dir(folder, (1, 2))
    assert (cache_dir(folder, (1, 2), torch.bfloat16) / "info.json").read_text().count("bfloat16") == 1
    fp32, bf16 = caches[torch.float32], caches[torch.bfloat16]
    rel = (bf16["ctx"].float() - fp32["ctx"].float()).norm() / fp32["ctx"].float().norm()
    assert 0 < rel < 0.05, "bf16 features differ from fp32's, but only by rounding"


def test_train_feature_dtype_bfloat16_caches_apart_and_records_it(trained):
    run = trained["root"] / "run-bf16"
    assert main(["train", "--target", str(trained["model"]), "--data", str(trained["data"]), "--out", str(run),
                 "--steps", "2", "--save-every", "2", "--batch-seqs", "2", "--anchors", "4", "--gamma", "3",
                 "--target-layers", "2,5", "--draft-vocab", "64", "--feature-dtype", "bfloat16"]) == 0
    assert (trained["data"] / "features" / "layers-2-5-bfloat16").is_dir()
    assert json.loads((run / "last" / "config.json").read_text())["extra"]["feature_dtype"] == "bfloat16"


def test_init_from_goes_on_training_a_trained_drafter(trained, capsys):
    """`train --init-from` starts from the drafter's weights, shape and draft vocabulary (its --gamma and
    --draft-vocab win over the command's), and refuses a drafter of another kind in one line."""
    from safetensors.torch import load_file
    run = trained["root"] / "run-warm"
    assert main(["train", "--target", str(trained["model"]), "--data", str(trained["data"]), "--out", str(run),
                 "--init-from", str(trained["export"]), "--steps", "1", "--save-every", "1", "--batch-seqs", "2",
                 "--anchors", "4", "--lr", "1e-12", "--gamma", "5", "--draft-vocab", "32"]) == 0
    assert "warm start from" in capsys.readouterr().out
    start, cfg = load_file(str(trained["export"] / "model.safetensors")), json.loads(
        (run / "last" / "config.json").read_text())
    assert cfg["gamma"] == 3 and cfg["target_layers"] == [2, 5] and cfg["extra"]["init_from"] == str(trained["export"])
    after = load_file(str(run / "last" / "model.safetensors"))
    assert torch.equal(after["vocab_ids"], start["vocab_ids"])
    moved = [k for k, v in start.items() if v.is_floating_point() and not torch.allclose(after[k].float(), v.float(),
                                                                                         atol=1e-6)]
    assert not moved, f"a step at lr 1e-12 moved {moved}: the weights did not come from --init-from"
    assert sum(float(v.float().abs().sum()) for v in start.values() if v.is_floating_point()) > 0
    assert main(["train", "--target", str(trained["model"]), "--data", str(trained["data"]), "--drafter", "dspark",
                 "--out", str(trained["root"] / "run-warm-2"), "--init-from", str(trained["export"])]) != 0
    err = capsys.readouterr().err.strip()
    assert "is a dflash drafter, not dspark" in err and "\n" not in err


def test_the_function_and_the_command_line_train_the_same_drafter(trained, tmp_path, capsys):
    """`run_training(job)` is what `python -m labkit train` runs: the tiny preset is this file's settings,
    and from the same seed the command line and the function give the same weights, metrics and
    config; each records the command that reproduces its run."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from labkit.__main__ import build_parser, train_job
    from labkit.pipeline.train import read_metrics, run_training, train_preset
    job = train_preset("tiny", target=str(trained["model"]), data=[str(trained["data"])], out=str(tmp_path / "fn"))
    assert train_job(build_parser().parse_args(trained["argv"])) == \
        replace(job, out=str(trained["run"]), export=str(trained["export"]))
    cli = replace(job, out=str(tmp_path / "cli"))
    torch.manual_seed(0)
    assert main(cli.argv()) == 0
    torch.manual_seed(0)
    assert run_training(job, log=lambda *_: None) == tmp_path / "fn" / "last"
    a, b = (load_file(str(tmp_path / d / "last" / "model.safetensors")) for d in ("cli", "fn"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    configs = [json.loads((tmp_path / d / "last" / "config.json").read_text()) for d in ("cli", "fn")]
    commands = [c["extra"].pop("train_command") for c in configs]
    assert configs[0] == configs[1]
    assert shlex.split(commands[0]) == ["python", "-m", "labkit", *cli.argv()]
    assert commands[1] == job.command_line()
    assert train_job(build_parser().parse_args(shlex.split(commands[1])[3:])) == job
    rows = [[{k: v for k, v in row.items() if k != "seconds"} for row in read_metrics(tmp_path / d)] for d in ("cli", "fn")]
    assert rows[0] == rows[1] and [r["step"] for r in rows[0]] == [3, 6]


def test_a_block_one_dflash_is_an_mtp1_drafter_that_serves_losslessly(trained, tmp_path):
    """`train --drafter dflash --gamma 1` (the `mtp1` preset's shape) trains a one-token drafter; the
    batched engine serves it and every greedy output equals plain greedy decoding."""
    from labkit.core.sampling import SamplingParams
    from labkit.decode.engine import Engine, ServeRequest, closed_loop
    from labkit.decode.loop import generate
    from labkit.drafters import make_drafter
    from labkit.model.target import load_target
    from labkit.pipeline.train import TRAIN_PRESETS
    assert TRAIN_PRESETS["mtp1"]["gamma"] == 1 and TRAIN_PRESETS["mtp1"]["drafter"] == "dflash"
    model, run = str(trained["model"]), tmp_path / "mtp1"
    assert main(["train", "--drafter", "dflash", "--gamma", "1", "--target", model, "--data", str(trained["data"]),
                 "--out", str(run), "--steps", "3", "--save-every", "3", "--batch-seqs", "2", "--anchors", "4",
                 "--target-layers", "2,5", "--draft-vocab", "64"]) == 0
    target = load_target(model)
    drafter = make_drafter(str(run / "last"), target)
    assert drafter.gamma == 1
    requests = [ServeRequest(i, f"r{i}", [5 + i, 9, 11 + i], 8, SamplingParams(0.0), i) for i in range(3)]
    engine = Engine(target, drafter, "fixed")
    for _ in closed_loop(requests, 2, engine):
        pass
    assert {r.id for r in engine.done if r.finished} == {0, 1, 2}
    for r in engine.done:
        assert max(engine.steps[0].drafted) <= 1
        assert r.token_ids == generate(target, requests[r.id].prompt_ids, None, 8, SamplingParams(0.0)).token_ids
