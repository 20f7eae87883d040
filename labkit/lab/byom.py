"""Bring your own model: what the lab derives from a Hugging Face causal LM, and the commands to run on it.

Notebook 07 walks a researcher's own model through the whole pipeline (data, training, calibration,
evaluation, serving, export). This module holds the little that needs code of its own and is not one
of those steps: `describe_target` reads back what the target adapter (`labkit.model.target.Target`) derived
from a model, and `labkit_argv` / `command_line` write a subcommand's line, so the notebook prints the
command that does what it runs through the library (`data_argv` the line of a prepare-data
`DataConfig`, `TrainJob.argv()` that of a training job; the tests parse both back with the CLI's parser).
`describe_calibration` reads a calibration report aloud (where too few rounds kept a temperature at
1), `serving_commands` gives the vLLM and SGLang lines for an exported drafter, and `accelerate_config`
writes the YAML that `accelerate launch --config_file` reads for one node of several GPUs, or for
several nodes. Left out: launching anything on GPUs; this module only writes text.
"""

from __future__ import annotations

import inspect
import json
import shlex
from collections import Counter
from dataclasses import dataclass, field

from labkit.core.errors import LabkitError
from labkit.core.calibration import ECEChange, describe_ece_change, fit_sts
from labkit.drafters.dflash import default_layers
from labkit.drafters.export import embedding_scale, target_problems
from labkit.lab.paper import paper_row
from labkit.model.target import PLAIN_PROMPT

#: how the notebook shows a subcommand; `accelerate launch -m labkit` runs the same module
LAUNCHER = "python -m labkit"


# ----------------------------------------------------------------------------- what the adapter derived


@dataclass
class TargetSummary:
    """What `labkit.model.target.Target` derived from a model: its shape, prompt format, stop tokens, cache
    layers, the target layers a DFlash / DSpark drafter reads by default, and what would stop an export
    to DeepSpec's layout (`labkit.drafters.export.target_problems`; empty when a trained drafter can be exported)."""

    name: str
    model_type: str
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    parameters: int
    dtype: str
    device: str
    prompt_format: str  # "chat template" or "plain"
    example_prompt: str  # an example user prompt as the model sees it, special tokens kept
    special_tokens: dict[str, str]
    eos_tokens: list[tuple[int, str]]
    attention_layers: dict[str, int]  # the config's layer types (full / sliding attention) and their counts
    sliding_window: int | None
    cache_layers: dict[str, int]  # the classes of `target.new_cache()`'s layers and their counts
    drafter_layers: tuple[int, ...]
    embedding_scale: float
    export_problems: list[str] = field(default_factory=list)

    def rows(self) -> list[tuple[str, str]]:
        """(what, value) rows for `labkit.lab.plots.markdown_table`."""
        counts = lambda d: ", ".join(f"{n} x {k}" for k, n in d.items())  # noqa: E731
        window = f" (window {self.sliding_window})" if self.sliding_window and "sliding_attention" in \
            self.attention_layers else ""
        return [
            ("model", f"{self.name}: {self.architecture} ({self.model_type}), {self.parameters / 1e6:.1f} M "
                      f"parameters, {self.dtype} on {self.device}"),
            ("decoder layers, hidden size, vocabulary", f"{self.num_layers}, {self.hidden_size}, {self.vocab_size}"),
            ("attention heads (key/value heads), head size", f"{self.num_heads} ({self.num_kv_heads}), {self.head_dim}"),
            ("prompt format", self.prompt_format),
            ("special tokens", ", ".join(f"{k} {v!r}" for k, v in self.special_tokens.items()) or "none"),
            ("stop (eos) tokens", ", ".join(f"{i} {t!r}" for i, t in self.eos_tokens) or "none: stops at the length"),
            ("attention layers (config)", counts(self.attention_layers) + window),
            ("KV cache layers (target.new_cache())", counts(self.cache_layers)),
            ("target layers a drafter reads (default_layers)", str(list(self.drafter_layers))),
            ("embedding scale", f"{self.embedding_scale:g}"),
            ("DeepSpec export (vLLM / SGLang)", "possible (after training with --qk-norm --frozen-mask "
                                                "--draft-vocab 0)" if not self.export_problems
             else "refused: " + "; ".join(self.export_problems)),
        ]


def describe_target(target, example: str = "What is 7 * 8?") -> TargetSummary:
    """Read back what the target adapter derived from `target`'s model and tokenizer (no forward runs)."""

    cfg, tok = target.config, target.tokenizer
    heads = getattr(cfg, "num_attention_heads", 0) or 0
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or (target.hidden_size // heads if heads else 0)
    types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * target.num_layers)
    seen, params = set(), 0
    for p in target.model.parameters():  # tied embeddings counted once
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            params += p.numel()
    special = {k: str(v) for k, v in (getattr(tok, "special_tokens_map", None) or {}).items() if isinstance(v, str)}
    if target.has_chat_template:
        fmt = "chat template (the tokenizer's own)"
    else:
        fmt = f"plain: no chat template, so a prompt reads {PLAIN_PROMPT!r} (labkit.model.target.PLAIN_PROMPT)"
    return TargetSummary(
        name=target.name, model_type=getattr(cfg, "model_type", "?"),
        architecture=(getattr(cfg, "architectures", None) or [type(target.model).__name__])[0],
        num_layers=target.num_layers, hidden_size=target.hidden_size, vocab_size=target.vocab_size,
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim, parameters=params,
        dtype=str(target.dtype).removeprefix("torch."), device=str(target.device), prompt_format=fmt,
        example_prompt=_decode_kept(tok, target.encode_prompt(example)), special_tokens=special,
        eos_tokens=[(i, _decode_kept(tok, [i])) for i in sorted(target.eos_token_ids)],
        attention_layers=dict(Counter(types)), sliding_window=getattr(cfg, "sliding_window", None),
        cache_layers=dict(Counter(type(layer).__name__ for layer in target.new_cache().layers)),
        drafter_layers=default_layers(target.num_layers), embedding_scale=embedding_scale(target),
        export_problems=target_problems(target))


def _decode_kept(tokenizer, ids: list[int]) -> str:
    """Token ids as text with the special tokens kept (the chat template's markers included)."""
    try:
        return tokenizer.decode(ids, skip_special_tokens=False)
    except TypeError:  # a tokenizer whose decode takes no such flag
        return tokenizer.decode(ids)


# ----------------------------------------------------------------------------- command lines


def labkit_argv(command: str, target: str | None = None, **options) -> list[str]:
    """The argument list of `python -m labkit COMMAND`: `--target` when given, then each option as
    `--name value` (underscores become dashes; True is a bare flag; None and False are left out; a list
    or tuple gives several values; `_` holds positional arguments)."""
    argv = [command] + [str(a) for a in options.pop("_", ())]
    if target is not None:
        argv += ["--target", str(target)]
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def command_line(argv: list[str], launcher: str = LAUNCHER) -> str:
    """The shell command of an argument list (`labkit_argv`, `data_argv`, `TrainJob.argv()`), quoted where needed."""
    return f"{launcher} {shlex.join(argv)}"


#: the DataConfig fields that `prepare-data` has an option for, by the same name
DATA_OPTIONS = {"n_prompts", "max_new_tokens", "shard_size", "seed", "prompts", "greedy_share", "template_share",
                "batch_size"}


def data_argv(cfg, out, target: str | None = None, benchmarks: str | None = None) -> list[str]:
    """The argument list of `python -m labkit prepare-data` that makes `cfg` (a
    `labkit.pipeline.data.DataConfig`) in `out`: the options that differ from DataConfig's defaults.
    Settings the command has no option for (sampling, magpie) must keep their defaults."""
    from dataclasses import fields

    default = type(cfg)()
    given = {f.name: getattr(cfg, f.name) for f in fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)}
    fixed = sorted(set(given) - DATA_OPTIONS)
    if fixed:
        raise LabkitError(f"prepare-data has no option for {', '.join(fixed)}: this DataConfig has no command line.")
    return labkit_argv("prepare-data", target=target, out=out, **given, benchmarks=benchmarks)


# ----------------------------------------------------------------------------- calibration and serving


def describe_calibration(report: dict) -> list[str]:
    """One sentence per sampling temperature of a `labkit.pipeline.calibrate.calibrate_checkpoint` report: the
    full-block rounds it had, the positions that kept T = 1 because `fit_sts` saw fewer than `min_each`
    accepted or rejected rounds there (too few examples to move a temperature), and the ECE change."""

    min_each = inspect.signature(fit_sts).parameters["min_each"].default  # what calibrate_checkpoint fits with
    out = []
    for key, r in report.items():
        kept = [k + 1 for k, fitted in enumerate(r["fitted"]) if not fitted]
        head = f"{key}: {r['rounds']} full-block rounds from {r['prompts']} held-out prompts; "
        if not kept:
            head += "every position fitted. "
        elif len(kept) == len(r["fitted"]):
            out.append(head + f"too few examples at every position (fit_sts moves T_k only with at least {min_each} "
                       f"accepted and {min_each} rejected rounds there), so all kept T = 1: nothing was calibrated, "
                       "and this run says nothing about what STS does.")
            continue
        else:
            head += (f"position(s) {', '.join(map(str, kept))} had too few examples (fewer than {min_each} "
                     f"accepted or {min_each} rejected rounds) and kept T = 1. ")
        out.append(head + describe_ece_change(ECEChange.from_record(r), where="on the rounds it was fitted on"))
    return out


def calibration_paper_rows(report: dict, setting: str) -> list[tuple[str, str, str, str, str]]:
    """Closing-table rows (`labkit.lab.paper.paper_row`) for a `calibrate_checkpoint` report, one per sampling
    temperature: its mean ECE after STS beside the paper's after-STS ECE, or, where STS fitted no position (so
    changed nothing), named as the raw head's and set beside the paper's raw ECE."""
    rows = []
    for key, r in report.items():
        fitted = sum(r["fitted"])
        why = (f"{setting}; STS on {r['rounds']} held-out rounds, {fitted} of {len(r['fitted'])} positions fitted "
               "(a position left unfitted keeps its raw ECE)")
        mean = sum(r["ece_after"]) / len(r["ece_after"])
        rows.append(paper_row("sts_ece", mean, why, claim=f"mean ECE after STS, {key}") if fitted else
                    paper_row("raw_ece", mean, why, claim=f"mean ECE, {key} (no position fitted: raw)"))
    return rows


def serving_commands(target_model: str, drafter_dir, block_size: int) -> dict[str, str]:
    """The vLLM and SGLang command lines that serve `target_model` (hub id or local folder) with an
    exported drafter folder (DeepSpec's layout) proposing `block_size` tokens per step."""
    spec = json.dumps({"method": "dspark", "model": str(drafter_dir), "num_speculative_tokens": int(block_size)})
    return {"vLLM": f"vllm serve {shlex.quote(str(target_model))} --speculative-config {shlex.quote(spec)}",
            "SGLang": f"python -m sglang.launch_server --model-path {shlex.quote(str(target_model))} "
                      f"--speculative-algorithm DSPARK --speculative-draft-model-path {shlex.quote(str(drafter_dir))}"}


# ----------------------------------------------------------------------------- accelerate


def accelerate_config(num_processes: int, num_machines: int = 1, machine_rank: int = 0,
                      main_process_ip: str | None = None, main_process_port: int = 29500,
                      mixed_precision: str = "bf16") -> str:
    """An accelerate config file (YAML) for `accelerate launch --config_file FILE -m labkit train ...`.

    `num_processes` counts every GPU of the run, over all machines (accelerate starts
    num_processes / num_machines per machine); with several machines each gets the same file but its
    own `machine_rank` (0 on the one at `main_process_ip`). `mixed_precision` should match the train
    command's `--mixed-precision`, which labkit passes to its Accelerator and so decides.
    """
    if num_processes < 1 or num_machines < 1:
        raise LabkitError(f"accelerate needs at least one process and one machine, got {num_processes} and {num_machines}.")
    if num_processes % num_machines:
        raise LabkitError(f"{num_processes} processes do not split evenly over {num_machines} machines: "
                          "give every machine the same number of GPUs.")
    if not 0 <= machine_rank < num_machines:
        raise LabkitError(f"machine_rank must be in 0..{num_machines - 1}, got {machine_rank}.")
    if num_machines > 1 and not main_process_ip:
        raise LabkitError("Several machines need main_process_ip: the address of the machine with machine_rank 0.")
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise LabkitError(f"mixed_precision is no, bf16 or fp16, got {mixed_precision!r}.")
    lines = ["compute_environment: LOCAL_MACHINE",
             f"distributed_type: {'MULTI_GPU' if num_processes > 1 else 'NO'}",
             "downcast_bf16: 'no'", "gpu_ids: all", f"machine_rank: {machine_rank}",
             "main_training_function: main", f"mixed_precision: '{mixed_precision}'", f"num_machines: {num_machines}",
             f"num_processes: {num_processes}"]
    if num_machines > 1:
        lines += [f"main_process_ip: {main_process_ip}", f"main_process_port: {main_process_port}"]
    lines += ["rdzv_backend: static", "same_network: true"]
    lines += ["tpu_env: []", "tpu_use_cluster: false", "tpu_use_sudo: false", "use_cpu: false"]
    return "\n".join(lines) + "\n"


__all__ = ["TargetSummary", "describe_target", "labkit_argv", "command_line", "data_argv", "describe_calibration",
           "serving_commands", "accelerate_config", "LAUNCHER"]
