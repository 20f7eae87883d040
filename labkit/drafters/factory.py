"""Drafters built from the short spec a user passes (`--drafter dspark`, `hybrid:PATH`, `sched:dspark`,
...): `check_spec` refuses a malformed one before anything slow happens, `make_drafter` builds it, and
`shipped_checkpoint` finds the lab's shipped checkpoints for a target."""

from __future__ import annotations

from pathlib import Path

from labkit.core.errors import LabkitError
from labkit.drafters.base import Drafter
from labkit.drafters.checkpoint import load_backbone, read_config
from labkit.drafters.dflash import DFlashDrafter
from labkit.drafters.dspark import DSparkDrafter, DSparkModel
from labkit.drafters.eagle3 import Eagle3Drafter, Eagle3Model
from labkit.drafters.hybrid import make_hybrid
from labkit.drafters.layer_skip import LayerSkipConfig, LayerSkipDrafter
from labkit.drafters.prompt_lookup import PromptLookupConfig, PromptLookupDrafter
from labkit.drafters.scheduled import ScheduledDrafter
from labkit.model.target import DEFAULT_TARGET, Target
from labkit.model.timing import verify_table

BUILTIN = ("none", "prompt-lookup", "layer-skip", "dflash", "dspark", "eagle3", "mtp1", "hybrid", "sched")
#: the trained drafters `--drafter NAME` names (eagle3: once one is trained into data/drafters/eagle3; mtp1:
#: a one-token DFlash, the serving baseline's MTP module)
SHIPPED = ("dflash", "dspark", "eagle3", "mtp1")
#: trained checkpoints shipped with the lab, by the name that `--drafter` takes: the default target's in
#: this folder, another packaged target's in a subfolder named after it (data/drafters/gemma-3-270m/dflash)
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "data" / "drafters"


def shipped_checkpoint(name: str, target_name: str | None = None) -> Path:
    """The shipped `name` drafter (dflash, dspark, eagle3 or mtp1) for a target (default: the default target)."""
    target_name = target_name or DEFAULT_TARGET
    path = SHIPPED_DIR / name if target_name == DEFAULT_TARGET else SHIPPED_DIR / target_name / name
    if not (path / "config.json").exists():
        flag = "" if target_name == DEFAULT_TARGET else f" --target {target_name}"
        raise LabkitError(f"No shipped {name} drafter for {target_name} at {path}: restore data/drafters from the "
                          f"repository, or train one with `python -m labkit train --drafter {name}{flag} --out PATH` "
                          "and pass --drafter PATH.")
    return path


def checkpoint_path(spec: str, command: str = "this command", target_name: str | None = None) -> Path:
    """The checkpoint folder a --drafter spec names: dflash, dspark, eagle3 or mtp1 (shipped for `target_name`) or
    a path; else a sentence."""
    if spec in SHIPPED:
        return shipped_checkpoint(spec, target_name)
    if not _is_checkpoint_path(spec):
        raise LabkitError(f"{command} takes a trained drafter: --drafter dflash, dspark, eagle3, mtp1 or the path of a "
                          f"checkpoint folder, got {spec!r}.")
    read_config(spec)  # a clear error if it is no checkpoint
    return Path(spec)


def _is_checkpoint_path(spec: str) -> bool:
    return "/" in spec or spec.startswith(".") or Path(spec).is_dir()


def check_spec(spec: str | None) -> None:
    """Refuse a malformed drafter spec before anything slow (loading a model) happens."""
    if spec is None or spec == "none":
        return
    if spec.partition(":")[0] == "sched":  # before the path test: sched:PATH holds a slash
        _check_sched(spec)
        return
    if spec.partition(":")[0] == "hybrid":  # before the path test: hybrid:PATH holds a slash
        _check_hybrid(spec)
        return
    if _is_checkpoint_path(spec):
        read_config(spec)  # a clear error if it is no checkpoint
        return
    name, _, arg = spec.partition(":")
    if name not in BUILTIN:
        raise LabkitError(f"Unknown drafter {spec!r}: use one of {', '.join(BUILTIN)} (layer-skip:N picks N "
                          "layers, hybrid:dspark adds prompt lookup) or the path of a trained checkpoint folder.")
    if name == "layer-skip" and arg and not arg.isdigit():
        raise LabkitError(f"layer-skip takes a layer count, e.g. layer-skip:8, got {spec!r}.")
    if name in ("prompt-lookup", *SHIPPED) and arg:
        raise LabkitError(f"{name} takes no argument, got {spec!r}.")


def _check_hybrid(spec: str) -> None:
    """hybrid:dspark, hybrid:dflash or hybrid:PATH (a DFlash or DSpark checkpoint folder)."""
    arg = spec.partition(":")[2]
    if not arg:
        raise LabkitError(f"hybrid needs the model drafter it combines with prompt lookup, e.g. hybrid:dspark, "
                          f"hybrid:dflash or hybrid:PATH, got {spec!r}.")
    if arg == "eagle3":
        raise LabkitError(f"hybrid conditions a block drafter (DFlash or DSpark) on the copied tokens; Eagle3 drafts "
                          f"one token at a time: use --drafter eagle3, hybrid:dspark or hybrid:dflash, got {spec!r}.")
    if not (arg in SHIPPED or _is_checkpoint_path(arg)):
        raise LabkitError(f"hybrid combines prompt lookup with a model drafter: use hybrid:dspark, hybrid:dflash "
                          f"or hybrid:PATH of a trained checkpoint folder, got {spec!r}.")
    check_spec(arg)


def _check_sched(spec: str) -> None:
    """sched:<any other drafter spec> (e.g. sched:dspark, sched:hybrid:dspark)."""
    arg = spec.partition(":")[2]
    if not arg or arg == "none" or arg.partition(":")[0] == "sched":
        raise LabkitError(f"sched schedules another drafter's blocks by their confidences: use sched:dspark or "
                          f"sched:hybrid:dspark (sched once, around a real drafter), got {spec!r}.")
    check_spec(arg)


def make_drafter(spec: str | None, target: Target, gamma: int | None = None) -> Drafter | None:
    """'none' -> None (plain decoding), 'prompt-lookup', 'layer-skip[:N]', 'dflash', 'dspark', 'eagle3' or 'mtp1'
    (the shipped checkpoints; dspark calibrated; mtp1 a one-token DFlash), the path of a trained checkpoint folder (any kind), or
    'hybrid:<dspark|dflash|PATH>' (prompt lookup, then that model for the rest; `gamma` caps both), or
    'sched:<spec>' (that drafter's confident prefixes only, Algorithm 1 on this device's measured costs)."""
    check_spec(spec)
    if spec is None or spec == "none":
        return None
    if spec.partition(":")[0] == "sched":
        inner = make_drafter(spec.partition(":")[2], target, gamma)
        return ScheduledDrafter(inner, verify_table(target, 1 + inner.gamma))
    if spec.partition(":")[0] == "hybrid":
        return make_hybrid(make_drafter(spec.partition(":")[2], target, gamma), gamma)
    if _is_checkpoint_path(spec) or spec in SHIPPED:
        model = load_backbone(shipped_checkpoint(spec, target.name) if spec in SHIPPED else Path(spec), target)
        if isinstance(model, Eagle3Model):
            return Eagle3Drafter(model, gamma)
        return (DSparkDrafter if isinstance(model, DSparkModel) else DFlashDrafter)(model, gamma)
    name, _, arg = spec.partition(":")
    if name == "prompt-lookup":
        cfg = PromptLookupConfig() if gamma is None else PromptLookupConfig(gamma=gamma)
        return PromptLookupDrafter(target.vocab_size, cfg)
    if name == "layer-skip":
        cfg = LayerSkipConfig()
        if arg:
            cfg.n_layers = int(arg)
        if gamma is not None:
            cfg.gamma = gamma
        return LayerSkipDrafter(target, cfg)
    raise AssertionError("unreachable: check_spec accepted an unknown drafter")

