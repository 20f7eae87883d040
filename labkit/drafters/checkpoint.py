"""Drafter checkpoints: a folder holding config.json and model.safetensors, for DFlash, DSpark and Eagle3 alike.

The config records the drafter's shape, its kind (`dflash`, `dspark` or `eagle3`, which picks the classes that
rebuild it), the target it was trained for (refused on any other target, naming both) and, for DSpark,
its STS calibration. The target's embedding and LM head are never saved: they are the target's own,
frozen, and come back from the target at load time. Writes are atomic (a temporary folder, then a
rename), so an interrupted save never leaves half a checkpoint where a good one was.

This module imports every drafter module with weights (dspark and eagle3 import dflash, never the
reverse), so none of them needs to know about files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from labkit.drafters.dflash import DFlashBackbone, DFlashConfig
from labkit.drafters.dspark import DSparkConfig, DSparkModel
from labkit.drafters.eagle3 import Eagle3Config, Eagle3Model
from labkit.core.errors import LabkitError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def target_signature(target) -> dict:
    """The target's shape a checkpoint records and must match: vocabulary, hidden size, depth."""
    return {"vocab_size": target.vocab_size, "hidden_size": target.hidden_size, "num_layers": target.num_layers}


def check_compatible(cfg: DFlashConfig, target, where: str = "") -> None:
    """Refuse a drafter made for another target, naming both models."""
    mine = {"vocab_size": cfg.target_vocab_size, "hidden_size": cfg.target_hidden_size,
            "num_layers": cfg.target_num_layers}
    theirs = target_signature(target)
    if mine != theirs:
        diff = ", ".join(f"{k} {mine[k]} vs {theirs[k]}" for k in mine if mine[k] != theirs[k])
        raise LabkitError(
            f"The drafter{(' at ' + where) if where else ''} was trained for {cfg.target_name or 'another model'} "
            f"but the target is {target.name} ({diff}): train a drafter for {target.name} with "
            f"`python -m labkit train --target {target.name} ...`.")


def write_folder(out_dir: str | Path, fill: Callable[[Path], None]) -> Path:
    """Make out_dir atomically: `fill` writes into a temporary sibling folder, which then replaces out_dir
    (an interrupted write leaves the old folder, or nothing, never half of one)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = previous(out)
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)  # a leftover of an earlier crash: out is the newer one
        os.replace(out, old)
    os.replace(tmp, out)  # a crash just before this line leaves only `old`: see `recover`
    shutil.rmtree(old, ignore_errors=True)
    return out


def previous(out_dir: str | Path) -> Path:
    """Where `write_folder` keeps the last complete folder while it swaps in a new one."""
    out = Path(out_dir)
    return out.with_name(out.name + ".old")


def recover(out_dir: str | Path) -> Path:
    """out_dir, put back from its `.old` copy if a crash between `write_folder`'s two renames left only
    that: there is no moment at which no complete checkpoint exists on disk."""
    out, old = Path(out_dir), previous(out_dir)
    if not out.exists() and old.exists():
        os.replace(old, out)
    return out


def save_drafter(backbone: DFlashBackbone, out_dir: str | Path, dtype: torch.dtype | None = None,
                 extra: dict | None = None, also: Callable[[Path], None] | None = None) -> Path:
    """Write config.json + model.safetensors into out_dir atomically (a temp folder, then a rename);
    `also` writes more files into the same temporary folder first (a trainer state), so they land with it."""
    def fill(tmp: Path) -> None:
        if also is not None:
            also(tmp)
        state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
                 for k, v in backbone.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        cfg = json.loads(backbone.cfg.to_json())
        if extra:
            cfg["extra"] = {**cfg.get("extra", {}), **extra}
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    return write_folder(out_dir, fill)


def read_config(path: str | Path) -> dict:
    """A checkpoint folder's config.json as a dict, refused with a sentence if the folder is no checkpoint."""
    path = Path(path)
    if not (path / CONFIG_FILE).exists() or not (path / WEIGHTS_FILE).exists():
        raise LabkitError(f"{path} is not a drafter checkpoint (it needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
                          "train one with `python -m labkit train --drafter dflash --out PATH`.")
    return json.loads((path / CONFIG_FILE).read_text())


def model_classes(kind: str) -> tuple[type, type]:
    """(model class, config class) for a checkpoint's `kind`: dflash, dspark (the backbone + heads) or eagle3."""
    if kind == "dflash":
        return DFlashBackbone, DFlashConfig
    if kind == "dspark":
        return DSparkModel, DSparkConfig
    if kind == "eagle3":
        return Eagle3Model, Eagle3Config
    raise LabkitError(f"Unknown drafter kind {kind!r} in the checkpoint's config.json: expected dflash, dspark or "
                      "eagle3.")


def load_backbone(path: str | Path, target, dtype: torch.dtype = torch.float32,
                  packed: bool | None = None) -> DFlashBackbone:
    """Rebuild a backbone from a checkpoint folder on the target's device, refusing a mismatched target.

    For inference: its products run with pre-packed weights when the target's do (`packed=None`;
    True or False forces it); train a loaded model further only with packed=False."""
    raw = read_config(path)
    model_cls, config_cls = model_classes(raw.get("kind", "dflash"))
    cfg = config_cls.from_dict(raw)
    check_compatible(cfg, target, str(path))
    state = load_file(str(Path(path) / WEIGHTS_FILE))
    emb = target.embedding_rows()
    head = target.model.get_output_embeddings().weight
    model = model_cls(cfg, emb, head, state["vocab_ids"])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    model = model.to(device=target.device, dtype=dtype).eval()
    if getattr(target, "packed", 0) > 0 if packed is None else packed:  # by default, as its target runs
        model.pack_for_inference()
    return model


def param_count(model: nn.Module) -> int:
    """Trainable parameters (the frozen embedding and LM head are buffers, so they do not count)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "target_signature", "check_compatible", "write_folder", "previous", "recover",
           "save_drafter",
           "read_config", "model_classes", "load_backbone", "param_count"]
