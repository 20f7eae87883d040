"""Export a drafter in DeepSpec's layout, the one vLLM and SGLang load (docs/facts.md, "Export layout for vLLM and SGLang").

DeepSpec (deepseek-ai/DeepSpec) saves a drafter as a Hugging Face folder: config.json (the target's own
config plus the drafter's fields, architectures ["Qwen3DSparkModel"]) and model.safetensors in bf16.
Its network is the paper's (Sec. 2.2 and 3): context features hidden_norm(fc([H(l_1); ...; H(l_m)])),
Qwen3-shaped draft layers (per-head q/k RMSNorm before RoPE) whose keys/values are [context ; block],
the block = the anchor then block_size - 1 frozen mask-token embeddings, the final norm and the target's
LM head, then the Markov or RNN head's bias and the confidence head on [h_k ; W1[x_{k-1}]].

The lab's drafter is the same network where it was trained for it (`train --qk-norm --frozen-mask
--draft-vocab 0`, anchor-first blocks): then the export renames tensors, drops the Markov head's row for
tokens outside the draft vocabulary (unused with the whole vocabulary), shifts layer ids by one
(lab: Hugging Face hidden_states[i]; DeepSpec: output of decoder layer i = hidden_states[i + 1]), and
is exact up to the bf16 cast. Everything else is refused with a sentence naming the fix, and nothing is
written: a cut vocabulary, a trained mask embedding, layers without q/k norm, the anchor + gamma masks
block, the target's final (normed) layer as a feature, or a target whose embedding or logits are not
plain lookups and products (Gemma's embed_scale and logit soft-capping), which a Qwen3-style class
given the target's embedding and LM head by the engines would not reproduce.

An Eagle3 drafter (`labkit.drafters.eagle3`) is written in DeepSpec's Eagle3 layout ("Qwen3Eagle3Model":
fc over the sorted target layers, Qwen3-shaped layers whose q/k/v read [input_layernorm(embedding) ;
hidden_norm(state)], the final norm, the target's LM head; `ttt_length` = the drafting horizon), exact
up to the bf16 cast where it scores the whole vocabulary and has q/k norms, else refused the same way.
No serving command is printed for it: the engines' Eagle3 loaders were not read against this layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from labkit.drafters.checkpoint import CONFIG_FILE, WEIGHTS_FILE, check_compatible, write_folder
from labkit.drafters.dflash import DFlashBackbone, DFlashConfig
from labkit.drafters.eagle3 import Eagle3Config, Eagle3Model
from labkit.core.errors import LabkitError
from labkit.drafters.heads import MarkovHead, RNNHead
from labkit.drafters.checkpoint import load_backbone, model_classes, read_config
from labkit.model.target import load_target

FORMATS = ("deepspec",)
ARCHITECTURE = "Qwen3DSparkModel"
#: a training-only field DeepSpec's class requires (anchors per sequence, its default); engines ignore it
NUM_ANCHORS = 512
EXPORTABLE_TRAIN = "python -m labkit train --qk-norm --frozen-mask --draft-vocab 0"
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
_MLP = ("gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------- what can be exported


def config_problems(cfg: DFlashConfig) -> list[str]:
    """What in a drafter's shape DeepSpec's class cannot express, each with its fix (empty: none)."""
    problems = []
    if cfg.draft_vocab not in (0, cfg.target_vocab_size):
        problems.append(f"it scores a cut vocabulary of {cfg.draft_vocab} of {cfg.target_vocab_size} tokens, and "
                        "DeepSpec's drafter scores every token (no exact conversion): retrain with --draft-vocab 0")
    if not cfg.qk_norm:
        problems.append("its layers have no per-head q/k RMSNorm, which DeepSpec's Qwen3-shaped layers always "
                        "apply: retrain with --qk-norm")
    if not cfg.anchor_predicts:
        problems.append("it drafts with the anchor + gamma masks block (--anchor-mode anchor-masks), and DeepSpec's "
                        "block is the anchor then gamma - 1 masks: retrain with --anchor-mode anchor-first "
                        "(the default)")
    last = cfg.target_num_layers
    if last in cfg.target_layers:
        problems.append(f"it reads target layer {last}, the last, which Hugging Face's hidden_states gives after the "
                        "final norm and DeepSpec's target_layer_ids cannot name: retrain with --target-layers "
                        f"below {last} (the default spread ends at {max(1, last - 2)})")
    if cfg.hidden_size != cfg.target_hidden_size:
        problems.append(f"its width {cfg.hidden_size} differs from the target's {cfg.target_hidden_size}, and "
                        "DeepSpec's drafter has the target's width: retrain at the target's hidden size")
    return problems


def mask_problem(cfg: DFlashConfig) -> str:
    return (f"it has a trained mask embedding, and DeepSpec's mask slots use the target's frozen embedding row "
            f"{cfg.mask_init_token}: retrain with --frozen-mask")


def model_problems(model: DFlashBackbone, target) -> list[str]:
    """What in a drafter's weights or its target DeepSpec's class, served by an engine, would not reproduce."""
    cfg, problems = model.cfg, []
    row = target.embedding_rows()[cfg.mask_init_token].detach().to(torch.bfloat16).cpu()  # as the model applies it
    if not torch.equal(model.mask_embedding.detach().to(torch.bfloat16).cpu(), row):
        problems.append(mask_problem(cfg))
    n = cfg.target_vocab_size
    if not torch.equal(model.vocab_ids.cpu(), torch.arange(n)):
        problems.append("its draft vocabulary is not the target's vocabulary in order: retrain with --draft-vocab 0")
    head = getattr(model, "seq_head", None)
    if head is not None and type(head) not in (MarkovHead, RNNHead):
        problems.append(f"its sequential head is a {type(head).__name__} (e.g. a rank-truncated copy), not a trained "
                        "Markov or RNN head: export the checkpoint folder itself")
    return problems + target_problems(target)


def target_problems(target) -> list[str]:
    """Targets whose embedding or logits a Qwen3-style drafter, given them by the engines, would not reproduce."""
    cfg, problems = target.config, []
    fix = "export supports targets whose embedding is a plain lookup and whose logits a plain product " \
          "(Llama, Qwen, Mistral shapes)"
    scale = embedding_scale(target)
    if scale != 1.0:
        problems.append(f"the target {target.name} scales its embedding rows (x{scale:g}, as Gemma does), which "
                        f"DeepSpec's Qwen3-style drafter does not: {fix}")
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        problems.append(f"the target {target.name} soft-caps or scales its logits, which DeepSpec's drafter does "
                        f"not: {fix}")
    out = target.model.get_output_embeddings()
    if getattr(out, "bias", None) is not None:
        problems.append(f"the target {target.name}'s LM head has a bias, which DeepSpec's lm_head has not: {fix}")
    if target.model.get_input_embeddings().weight.shape != out.weight.shape:
        problems.append(f"the target {target.name}'s embedding and LM head have different shapes, and DeepSpec's "
                        f"class gives both vocab_size rows: {fix}")
    return problems


def embedding_scale(target) -> float:
    """The factor the target multiplies its embedding rows by (Gemma: sqrt(hidden)); 1 for a plain lookup."""
    scale = getattr(target.model.get_input_embeddings(), "embed_scale", None)
    if scale is not None:
        return float(scale)
    if str(getattr(target.config, "model_type", "")).startswith("gemma"):  # Gemma 1/2 scale in the model's forward
        return float(target.hidden_size) ** 0.5
    return 1.0


def refuse(problems: list[str], where: str) -> LabkitError:
    return LabkitError(f"The {where} cannot be exported in DeepSpec's layout exactly, so nothing was written: "
                       + "; ".join(problems) + f". An exportable drafter is trained with `{EXPORTABLE_TRAIN} ...`.")


def check_exportable(model: DFlashBackbone, target, where: str = "drafter") -> None:
    """Raise a LabkitError naming every problem and its fix, unless the export will be exact."""
    check_compatible(model.cfg, target, where)
    problems = config_problems(model.cfg) + model_problems(model, target)
    if problems:
        raise refuse(problems, where)


# ----------------------------------------------------------------------------- the layout


def target_layer_ids(cfg: DFlashConfig) -> list[int]:
    """DeepSpec's strictly increasing target_layer_ids: lab layer l (hidden_states[l]) is decoder layer l - 1."""
    return [layer - 1 for layer in sorted(set(cfg.target_layers))]


def fc_weight(model: DFlashBackbone) -> torch.Tensor:
    """fc with its input blocks in DeepSpec's order (sorted layers; a layer read twice gets its blocks summed)."""
    cfg, w = model.cfg, model.fc.weight.detach().float().cpu()
    h, order = cfg.target_hidden_size, sorted(set(cfg.target_layers))
    out = torch.zeros(w.shape[0], len(order) * h)
    for j, layer in enumerate(cfg.target_layers):
        k = order.index(layer)
        out[:, k * h:(k + 1) * h] += w[:, j * h:(j + 1) * h]
    return out


def layer_tensor_name(i: int, name: str) -> str:
    """A DraftLayer parameter's name in DeepSpec's layer (self_attn.* and mlp.* sub-modules)."""
    module = name.split(".")[0]
    prefix = "self_attn." if module in _ATTENTION else "mlp." if module in _MLP else ""
    return f"layers.{i}.{prefix}{name}"


def head_tensors(model: DFlashBackbone) -> dict[str, torch.Tensor]:
    """markov_head.* (W1 without the lab's out-of-vocabulary row) and confidence_head.proj.*."""
    out = {}
    head = getattr(model, "seq_head", None)
    if head is not None:
        out["markov_head.markov_w1.weight"] = head.w1.weight[: model.cfg.target_vocab_size]
        out["markov_head.markov_w2.weight"] = head.w2.weight  # (V, r), an nn.Linear(r, V) as in DeepSpec
        if isinstance(head, RNNHead):  # z = [s; W1[x]; h] -> (gate, candidate, output): DeepSpec's order
            out["markov_head.joint_proj.weight"] = head.joint.weight
            out["markov_head.joint_proj.bias"] = head.joint.bias
    conf = getattr(model, "confidence", None)
    if conf is not None:
        out["confidence_head.proj.weight"] = conf.proj.weight
        out["confidence_head.proj.bias"] = conf.proj.bias
    return out


def deepspec_tensors(model: DFlashBackbone, target) -> dict[str, torch.Tensor]:
    """Every tensor of the exported model.safetensors, bf16, under DeepSpec's names (no "model." prefix)."""
    out = {"embed_tokens.weight": target.model.get_input_embeddings().weight,
           "lm_head.weight": target.model.get_output_embeddings().weight,
           "fc.weight": fc_weight(model), "hidden_norm.weight": model.ctx_norm.weight, "norm.weight": model.norm.weight}
    for i, layer in enumerate(model.layers):
        out.update({layer_tensor_name(i, name): p for name, p in layer.named_parameters()})
    out.update(head_tensors(model))
    return {k: v.detach().to(device="cpu", dtype=torch.bfloat16).clone().contiguous() for k, v in out.items()}


def deepspec_config(model: DFlashBackbone, target, source: str = "") -> dict:
    """The target's config dict (model_type kept) with the drafter's shape and DeepSpec's drafter fields."""
    cfg = model.cfg
    d = target.config.to_dict()
    head = getattr(model, "seq_head", None)
    conf = getattr(model, "confidence", None) is not None
    rank = head.rank if head is not None else 0
    d.update(architectures=[ARCHITECTURE], num_target_layers=cfg.target_num_layers, num_hidden_layers=cfg.n_layers,
             block_size=cfg.gamma, mask_token_id=cfg.mask_init_token, target_layer_ids=target_layer_ids(cfg),
             num_anchors=NUM_ANCHORS, markov_rank=rank, enable_confidence_head=conf,
             confidence_head_with_markov=conf and head is not None, tie_word_embeddings=False,
             vocab_size=cfg.target_vocab_size, dtype="bfloat16")
    if rank:
        d["markov_head_type"] = "rnn" if isinstance(head, RNNHead) else "vanilla"
    d.update(draft_shape(cfg, d))
    d["labkit"] = {"kind": cfg.kind, "source": source, "target": cfg.target_name, "gamma": cfg.gamma,
                   "target_layers_hf": list(cfg.target_layers),
                   "sts_calibration": dict(getattr(cfg, "calibration", {}) or {})}
    return d


def draft_shape(cfg: DFlashConfig, target_dict: dict) -> dict:
    """The draft layers' own shape keys, over the target's: silu MLP, no biases, plain RoPE, full attention."""
    shape = dict(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                 head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size, rms_norm_eps=cfg.rms_eps,
                 hidden_act="silu", attention_bias=False, attention_dropout=0.0, mlp_bias=False,
                 layer_types=["full_attention"] * cfg.n_layers, use_sliding_window=False, sliding_window=None)
    if "rope_parameters" in target_dict or "rope_theta" not in target_dict:
        shape["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if "rope_theta" in target_dict:
        shape["rope_theta"] = cfg.rope_theta
    if "rope_scaling" in target_dict:
        shape["rope_scaling"] = None
    if "partial_rotary_factor" in target_dict:
        shape["partial_rotary_factor"] = 1.0
    if "torch_dtype" in target_dict:
        shape["torch_dtype"] = "bfloat16"
    return shape


def engine_support(config: dict) -> dict[str, str | None]:
    """Which engine loads an export (docs/facts.md, "The engines' loaders", read from their source):
    engine -> None where it loads, else the reason it cannot. vLLM's DSpark model builds only the vanilla
    Markov head (an RNN head's weights fail at loading); SGLang's DSPARK refuses `markov_rank` 0, so a
    DFlash export and a DSpark without a Markov head are not for it."""
    rank, kind = config["markov_rank"], config.get("markov_head_type")
    vllm = (None if not rank or kind == "vanilla" else
            f"vLLM's DSpark model builds only the vanilla Markov head, and this one is {kind!r}: its weights fail "
            "at loading there (train with --head markov to serve it on vLLM)")
    sglang = (None if rank else
              f"SGLang's DSPARK refuses markov_rank 0, and this {config['labkit']['kind']} drafter has no Markov head "
              "(serve it on vLLM, or train a DSpark with a Markov head)")
    return {"vllm": vllm, "sglang": sglang}


def serving_commands(config: dict, out: Path) -> dict[str, str]:
    """The serving command of each engine that loads the export (`engine_support`)."""
    spec = json.dumps({"method": "dspark", "model": str(out), "num_speculative_tokens": config["block_size"]})
    commands = {"vllm": f"vllm serve <target> --speculative-config '{spec}'",
                "sglang": ("python -m sglang.launch_server --model-path <target> --speculative-algorithm DSPARK \\\n"
                           f"    --speculative-draft-model-path {out}")}
    return {engine: cmd for engine, cmd in commands.items() if engine_support(config)[engine] is None}


ENGINE_NAMES = {"vllm": "vLLM", "sglang": "SGLang"}


def engine_lines(out: str | Path) -> list[str]:
    """Per engine, one line on an export folder: loads it, or why not (`engine_support`); an Eagle3
    export gets one line saying the engines' Eagle3 loaders were not checked against it."""
    config = json.loads((Path(out) / CONFIG_FILE).read_text())
    if config.get("architectures") != [ARCHITECTURE]:
        return ["vLLM, SGLang: their Eagle3 loaders were not checked against this layout; no command is given"]
    return [f"{ENGINE_NAMES[e]}: " + ("loads it (command in README.md)" if why is None else f"not loadable: {why}")
            for e, why in engine_support(config).items()]


def readme(config: dict, target_name: str, out: Path) -> str:
    """The exported folder's README: what it holds, the serving commands of the engines that load it and
    why the others do not."""
    g = config["block_size"]
    heads = (f"{config['markov_head_type']} Markov head at rank {config['markov_rank']}" if config["markov_rank"]
             else "no Markov head") + (", confidence head" if config["enable_confidence_head"] else "")
    commands = "\n".join(serving_commands(config, out).values())
    refused = "".join(f"\nNot for {ENGINE_NAMES[e]}: {why}.\n" for e, why in engine_support(config).items() if why)
    return f"""# A {config['labkit']['kind']} drafter in DeepSpec's layout

Exported by the Speculative Decoding Lab (`python -m labkit export --format deepspec`) from
`{config['labkit']['source'] or 'a lab drafter'}`, trained for the target `{target_name}`.
{ARCHITECTURE}: {config['num_hidden_layers']} draft layer(s), block size {g} (slot 0 is the anchor), target
layers {config['target_layer_ids']} (DeepSpec numbering: the output of decoder layer i), {heads}; bf16.

Serve it beside its target (`<target>` = `{target_name}`, as a hub id or local path):

```bash
{commands}
```
{refused}
`embed_tokens` and `lm_head` are the target's own, stored as DeepSpec stores them; the engines use the
target's. The `labkit` key of config.json (ignored by the engines) records the source and the lab's
Sequential Temperature Scaling fits per sampling temperature, if any.
"""


def export_deepspec(model: DFlashBackbone, target, out_dir: str | Path, source: str = "") -> Path:
    """Check that the export is exact, then write config.json, model.safetensors and README.md atomically."""
    check_exportable(model, target, f"drafter{(' at ' + source) if source else ''}")
    out = Path(out_dir)
    config = deepspec_config(model, target, source)
    tensors = deepspec_tensors(model, target)

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        (tmp / "README.md").write_text(readme(config, target.name, out.resolve()))
    return write_folder(out, fill)


def export_checkpoint(path: str | Path, target_name: str | None, out_dir: str | Path, fmt: str = "deepspec",
                      device: str | None = "cpu") -> Path:
    """`python -m labkit export`: refuse what the drafter's config cannot express before loading anything,
    then load the target and the drafter and export."""
    if fmt not in FORMATS:
        raise LabkitError(f"Unknown export format {fmt!r}: use {', '.join(FORMATS)}.")
    raw = read_config(path)
    cfg = model_classes(raw.get("kind", "dflash"))[1].from_dict(raw)
    if isinstance(cfg, Eagle3Config):
        return _export_eagle3_checkpoint(path, cfg, target_name, out_dir, device)
    problems = config_problems(cfg)
    if problems:
        raise refuse(problems + ([mask_problem(cfg)] if cfg.train_mask else []), f"drafter at {path}")
    target = load_target(target_name, device, packed=False)
    model = load_backbone(path, target, packed=False)  # refuses a drafter made for another target
    return export_deepspec(model, target, out_dir, str(path))


# ----------------------------------------------------------------------------- Eagle3

EAGLE3_ARCHITECTURE = "Qwen3Eagle3Model"
#: DeepSpec's per-step loss decay (a training-only field its config requires; engines ignore it). The lab
#: trains with its own position weights (labkit.pipeline.train.LossWeights); the value is DeepSpec's default.
EAGLE3_STEP_LOSS_DECAY = 0.8
EXPORTABLE_EAGLE3_TRAIN = "python -m labkit train --drafter eagle3 --qk-norm --draft-vocab 0"


def eagle3_config_problems(cfg: Eagle3Config) -> list[str]:
    """What in an Eagle3 drafter's shape DeepSpec's Qwen3Eagle3Model cannot express, each with its fix."""
    problems = []
    if cfg.draft_vocab not in (0, cfg.target_vocab_size):
        problems.append(f"it scores a cut vocabulary of {cfg.draft_vocab} of {cfg.target_vocab_size} tokens, and "
                        "DeepSpec's Eagle3 scores every token with the target's LM head: retrain with --draft-vocab 0")
    if not cfg.qk_norm:
        problems.append("its layers have no per-head q/k RMSNorm, which DeepSpec's Qwen3-shaped Eagle3 layers always "
                        "apply: retrain with --qk-norm")
    last = cfg.target_num_layers
    if last in cfg.target_layers:
        problems.append(f"it reads target layer {last}, the last, which Hugging Face's hidden_states gives after the "
                        "final norm and DeepSpec's target_layer_ids cannot name: retrain with --target-layers "
                        f"below {last}")
    return problems


def eagle3_model_problems(model: Eagle3Model, target) -> list[str]:
    problems = []
    if not torch.equal(model.vocab_ids.cpu(), torch.arange(model.cfg.target_vocab_size)):
        problems.append("its draft vocabulary is not the target's vocabulary in order: retrain with --draft-vocab 0")
    return problems + target_problems(target)


def eagle3_tensors(model: Eagle3Model, target) -> dict[str, torch.Tensor]:
    """Every tensor of an Eagle3 export, bf16, under DeepSpec's names (no "model." prefix)."""
    out = {"embed_tokens.weight": target.model.get_input_embeddings().weight,
           "lm_head.weight": target.model.get_output_embeddings().weight,
           "fc.weight": fc_weight(model), "norm.weight": model.norm.weight}
    for i, layer in enumerate(model.layers):  # hidden_norm and the two layernorms sit on the layer itself
        out.update({layer_tensor_name(i, name): p for name, p in layer.named_parameters()})
    return {k: v.detach().to(device="cpu", dtype=torch.bfloat16).clone().contiguous() for k, v in out.items()}


def eagle3_config(model: Eagle3Model, target, source: str = "") -> dict:
    """The target's config dict with the drafter's shape and DeepSpec's Eagle3 fields."""
    cfg = model.cfg
    d = target.config.to_dict()
    d.update(architectures=[EAGLE3_ARCHITECTURE], num_target_layers=cfg.target_num_layers,
             num_hidden_layers=cfg.n_layers, draft_num_hidden_layers=cfg.n_layers,
             target_layer_ids=target_layer_ids(cfg), ttt_length=cfg.gamma, step_loss_decay=EAGLE3_STEP_LOSS_DECAY,
             tie_word_embeddings=False, vocab_size=cfg.target_vocab_size, dtype="bfloat16")
    d.update(draft_shape(cfg, d))
    d["labkit"] = {"kind": cfg.kind, "source": source, "target": cfg.target_name, "gamma": cfg.gamma,
                   "target_layers_hf": list(cfg.target_layers)}
    return d


def eagle3_readme(config: dict, target_name: str) -> str:
    return f"""# An Eagle3 drafter in DeepSpec's layout

Exported by the Speculative Decoding Lab (`python -m labkit export --format deepspec`) from
`{config['labkit']['source'] or 'a lab drafter'}`, trained for the target `{target_name}`.
{EAGLE3_ARCHITECTURE}: {config['num_hidden_layers']} draft layer(s), drafting {config['ttt_length']} tokens a
round (`ttt_length`), target layers {config['target_layer_ids']} (DeepSpec numbering: the output of decoder
layer i); bf16. DeepSpec's Eagle3 evaluator loads this class. No serving command is given here: whether
vLLM's or SGLang's Eagle3 loaders read this layout was not checked by the lab.

`embed_tokens` and `lm_head` are the target's own, stored as DeepSpec stores them. The `labkit` key of
config.json records the source.
"""


def export_eagle3(model: Eagle3Model, target, out_dir: str | Path, source: str = "") -> Path:
    """Check that the export is exact, then write config.json, model.safetensors and README.md atomically."""
    where = f"drafter{(' at ' + source) if source else ''}"
    check_compatible(model.cfg, target, where)
    problems = eagle3_config_problems(model.cfg) + eagle3_model_problems(model, target)
    if problems:
        raise refuse_eagle3(problems, where)
    config, tensors = eagle3_config(model, target, source), eagle3_tensors(model, target)

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        (tmp / "README.md").write_text(eagle3_readme(config, target.name))
    return write_folder(Path(out_dir), fill)


def refuse_eagle3(problems: list[str], where: str) -> LabkitError:
    return LabkitError(f"The {where} cannot be exported in DeepSpec's Eagle3 layout exactly, so nothing was written: "
                       + "; ".join(problems) + f". An exportable Eagle3 drafter is trained with "
                       f"`{EXPORTABLE_EAGLE3_TRAIN} ...`.")


def _export_eagle3_checkpoint(path, cfg: Eagle3Config, target_name, out_dir, device) -> Path:
    problems = eagle3_config_problems(cfg)
    if problems:
        raise refuse_eagle3(problems, f"drafter at {path}")
    target = load_target(target_name, device, packed=False)
    model = load_backbone(path, target, packed=False)
    return export_eagle3(model, target, out_dir, str(path))


__all__ = ["FORMATS", "config_problems", "model_problems", "target_problems", "check_exportable",
           "deepspec_config", "deepspec_tensors", "export_deepspec", "export_checkpoint",
           "eagle3_config_problems", "eagle3_config", "eagle3_tensors", "export_eagle3"]
