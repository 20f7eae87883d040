"""labkit.lab.byom, behind notebook 07: what the adapter derived from a model, command lines, accelerate configs.

Tiny random models only (a Llama from conftest, a Gemma 3 with sliding-window layers built here), no
forward runs; the accelerate files are read back by accelerate's own config loader.
"""

from __future__ import annotations

import json
import math
import shlex

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from conftest import ToyTokenizer
from labkit.__main__ import build_parser, data_config, train_job
from labkit.lab.byom import (accelerate_config, calibration_paper_rows, command_line, data_argv, describe_calibration,
                             describe_target, labkit_argv, serving_commands)
from labkit.core.calibration import ece_change, fit_sts
from labkit.drafters.dflash import default_layers
from labkit.core.errors import LabkitError
from labkit.model.target import PLAIN_PROMPT, Target
from labkit.pipeline.data import DataConfig
from labkit.pipeline.train import TrainJob


def parse_command(argv: list[str]):
    """What `python -m labkit` builds of `argv` (the tests read the command line; labkit.lab does not)."""
    return build_parser().parse_args(argv)


def test_describe_target_reads_back_shape_prompt_format_cache_and_drafter_layers(make_tiny_target):
    target = make_tiny_target(vocab_size=8, n_layers=3, hidden=32, eos={5})
    s = describe_target(target, example="hi")
    assert (s.num_layers, s.hidden_size, s.vocab_size, s.num_heads, s.head_dim) == (3, 32, 8, 2, 16)
    assert s.parameters == sum(p.numel() for p in target.model.parameters())  # tied: the embedding once
    assert s.prompt_format.startswith("plain") and repr(PLAIN_PROMPT) in s.prompt_format
    assert s.example_prompt == target.tokenizer.decode(target.encode_prompt("hi"))
    assert s.eos_tokens == [(5, target.tokenizer.decode([5]))]
    assert s.attention_layers == {"full_attention": 3}
    assert s.cache_layers == {"DynamicLayer": 3}
    assert s.drafter_layers == default_layers(3)
    assert s.embedding_scale == 1.0 and s.export_problems == []
    rows = dict(s.rows())
    assert rows["DeepSpec export (vLLM / SGLang)"].startswith("possible")
    assert rows["decoder layers, hidden size, vocabulary"] == "3, 32, 8"


def tiny_gemma3(n_layers: int = 3, window: int = 4) -> Target:
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                           sliding_window=window, layer_types=["sliding_attention"] * (n_layers - 1) + ["full_attention"],
                           query_pre_attn_scalar=16, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return Target(model=Gemma3ForCausalLM(cfg).eval(), tokenizer=ToyTokenizer(16), name="tiny-gemma3")


def test_describe_target_names_sliding_layers_kept_full_and_why_a_gemma_export_is_refused():
    s = describe_target(tiny_gemma3())
    assert s.attention_layers == {"sliding_attention": 2, "full_attention": 1} and s.sliding_window == 4
    assert s.cache_layers == {"DynamicLayer": 3}  # the lab keeps every position so rollback stays exact
    assert s.num_kv_heads == 1
    assert math.isclose(s.embedding_scale, 32 ** 0.5, rel_tol=1e-6)
    assert any("scales its embedding" in p for p in s.export_problems)
    rows = dict(s.rows())
    assert "(window 4)" in rows["attention layers (config)"]
    assert rows["DeepSpec export (vLLM / SGLang)"].startswith("refused")


def test_the_command_shown_is_the_command_the_cli_parses():
    argv = labkit_argv("train", target="gemma3-270m", drafter="dspark", qk_norm=True, frozen_mask=True,
                       draft_vocab=0, layers=1, out="runs/my model", no_init_from_target=False, target_layers=None)
    assert argv[:3] == ["train", "--target", "gemma3-270m"] and "--no-init-from-target" not in argv
    line = command_line(argv)
    assert line.startswith("python -m labkit train ") and "'runs/my model'" in line
    args = parse_command(argv)
    assert (args.command, args.drafter, args.qk_norm, args.frozen_mask, args.draft_vocab, args.layers) == \
        ("train", "dspark", True, True, 0, 1)
    assert args.out == "runs/my model" and args.target == "gemma3-270m"
    many = parse_command(labkit_argv("calibrate", drafter="runs/x/last", temperatures=(0, 1), dry_run=True))
    assert many.temperatures == [0.0, 1.0] and many.dry_run
    assert parse_command(labkit_argv("export", _=["build/out"], drafter="runs/x/last")).out == "build/out"
    with pytest.raises(SystemExit):
        parse_command(labkit_argv("train", out="x", no_such_flag=3))


def test_the_training_command_shown_is_the_job_the_notebook_runs():
    """Notebook 07 runs a TrainJob and prints `command_line(job.argv())`: that line, through the CLI's
    parser, is the same job (paths with spaces quoted, several data folders, flags both ways)."""
    job = TrainJob(target="gemma3-270m", drafter="dspark", qk_norm=True, frozen_mask=True, draft_vocab=0, layers=1,
                   gamma=4, data=["build/my data", "build/more"], max_shards=3, out="runs/my model", steps=60,
                   target_layers=(1, 3), init_from_target=False, max_minutes=1.5, lr=3e-4, seed=2)
    line = command_line(job.argv())
    assert line.startswith("python -m labkit train ") and "'runs/my model'" in line and "'build/my data'" in line
    words = shlex.split(line)
    assert train_job(parse_command(words[3:])) == job
    assert "--qk-norm" in words and "--no-init-from-target" in words and "--target-layers" in words


def test_data_argv_is_the_command_that_makes_the_data_config():
    """Notebook 07 builds a DataConfig and prints `data_argv(...)`: the CLI maps that line back to the same
    config, folder, target and evaluation set; settings the command cannot express are refused."""
    cfg = DataConfig(n_prompts=16, max_new_tokens=64, shard_size=4, seed=3, prompts="mixed", greedy_share=0.25,
                     template_share=0.5, batch_size=8)
    argv = data_argv(cfg, "build/my data", target="gemma3-270m", benchmarks="lab")
    assert "'build/my data'" in command_line(argv)
    args = parse_command(argv)
    assert data_config(args) == cfg
    assert (args.command, args.out, args.target, args.benchmarks) == ("prepare-data", "build/my data", "gemma3-270m",
                                                                      "lab")
    assert data_argv(DataConfig(), "d") == ["prepare-data", "--out", "d"]
    assert data_config(parse_command(data_argv(DataConfig(), "d"))) == DataConfig()
    with pytest.raises(LabkitError, match="no option for temperature"):
        data_argv(DataConfig(temperature=1.0), "d")


@pytest.mark.parametrize("machines", [1, 2])
def test_accelerate_config_is_read_back_by_accelerate(tmp_path, machines):
    from accelerate.commands.config.config_args import ClusterConfig

    path = tmp_path / "accelerate.yaml"
    path.write_text(accelerate_config(8 * machines, machines, machine_rank=machines - 1,
                                      main_process_ip="10.0.0.1" if machines > 1 else None))
    cfg = ClusterConfig.from_yaml_file(str(path))
    assert cfg.distributed_type == "MULTI_GPU" and cfg.num_processes == 8 * machines
    assert cfg.num_machines == machines and cfg.machine_rank == machines - 1 and cfg.mixed_precision == "bf16"
    if machines > 1:
        assert (cfg.main_process_ip, cfg.main_process_port) == ("10.0.0.1", 29500)


def test_accelerate_config_refuses_what_launch_could_not_run():
    with pytest.raises(LabkitError, match="main_process_ip"):
        accelerate_config(16, 2)
    with pytest.raises(LabkitError, match="evenly"):
        accelerate_config(9, 2, main_process_ip="10.0.0.1")
    with pytest.raises(LabkitError, match="machine_rank"):
        accelerate_config(8, 1, machine_rank=1)


def test_describe_calibration_says_which_positions_had_too_few_examples():
    # 40 rounds of gamma 2: 20 accepted both drafts, 20 none. Position 1 has 20 positives (< 32): kept at 1.
    z = torch.randn(40, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    accepted = torch.tensor([2] * 20 + [0] * 20)
    sts = fit_sts(z, accepted)
    assert sts.fitted == [False, False]
    report = {"greedy": {**sts.to_dict(), "rounds": 40, "prompts": 3}}
    (line,) = describe_calibration(report)
    assert line.startswith("greedy: 40 full-block rounds from 3 held-out prompts; too few examples at every position")
    assert "at least 32 accepted and 32 rejected" in line and "nothing was calibrated" in line
    assert "ECE" not in line.split("rejected rounds there")[1]  # no sentence about an ECE change nothing caused
    half = {"T=1": {**sts.to_dict(), "fitted": [True, False], "rounds": 40, "prompts": 3}}
    (line,) = describe_calibration(half)
    assert "position(s) 2 had too few examples" in line
    assert "no interval over rounds was recorded" in line  # a record without one: numbers, no verdict
    change = ece_change(z, accepted, [0.5, 1.0], [True, False])
    judged = {"T=1": {**half["T=1"], "ece_change": {"rounds": 40, "mean": change.to_dict()["mean"],
                                                    "change": change.to_dict()["change"]}}}
    (line,) = describe_calibration(judged)
    assert "over 40 rounds" in line and "no interval" not in line


def test_calibration_rows_set_an_unfitted_ece_beside_the_papers_raw_one():
    report = {"greedy": {"fitted": [False, False], "ece_before": [0.02, 0.04], "ece_after": [0.02, 0.04], "rounds": 40},
              "T=1": {"fitted": [True, False], "ece_before": [0.06, 0.04], "ece_after": [0.01, 0.04], "rounds": 90}}
    raw, sts = calibration_paper_rows(report, "here")
    assert raw[0] == "mean ECE, greedy (no position fitted: raw)" and raw[1].startswith("0.033-0.082")
    assert raw[2] == "0.030" and raw[3] == "below the paper's range (no spread)" and "0 of 2 positions fitted" in raw[4]
    assert sts[0] == "mean ECE after STS, T=1" and sts[1].startswith("0.004-0.02") and sts[2] == "0.025"
    assert sts[3] == "above the paper's range (no spread)" and "1 of 2 positions fitted" in sts[4]


def test_serving_commands_quote_the_speculative_config_as_one_json_argument():
    cmds = serving_commands("HuggingFaceTB/SmolLM2-135M-Instruct", "build/my drafter", 4)
    vllm = shlex.split(cmds["vLLM"])
    assert vllm[:3] == ["vllm", "serve", "HuggingFaceTB/SmolLM2-135M-Instruct"] and vllm[3] == "--speculative-config"
    assert json.loads(vllm[4]) == {"method": "dspark", "model": "build/my drafter", "num_speculative_tokens": 4}
    sglang = shlex.split(cmds["SGLang"])
    assert sglang[sglang.index("--speculative-algorithm") + 1] == "DSPARK"
    assert sglang[sglang.index("--speculative-draft-model-path") + 1] == "build/my drafter"
