"""Drafters behind one interface (`base.Drafter`), built from a short spec by `make_drafter`."""

from __future__ import annotations

from labkit.drafters.base import Drafter, Proposal
from labkit.drafters.layer_skip import LayerSkipConfig, LayerSkipDrafter
from labkit.drafters.prompt_lookup import PromptLookupConfig, PromptLookupDrafter
from labkit.errors import LabkitError
from labkit.target import Target

BUILTIN = ("none", "prompt-lookup", "layer-skip")


def check_spec(spec: str | None) -> None:
    """Refuse a malformed drafter spec before anything slow (loading a model) happens."""
    if spec is None or spec == "none":
        return
    name, _, arg = spec.partition(":")
    if name not in BUILTIN:
        raise LabkitError(f"Unknown drafter {spec!r}: use one of {', '.join(BUILTIN)} (layer-skip:N picks N layers).")
    if name == "layer-skip" and arg and not arg.isdigit():
        raise LabkitError(f"layer-skip takes a layer count, e.g. layer-skip:8, got {spec!r}.")
    if name == "prompt-lookup" and arg:
        raise LabkitError(f"prompt-lookup takes no argument, got {spec!r}.")


def make_drafter(spec: str | None, target: Target, gamma: int | None = None) -> Drafter | None:
    """'none' -> None (plain decoding), 'prompt-lookup', 'layer-skip' or 'layer-skip:N' (N layers)."""
    check_spec(spec)
    if spec is None or spec == "none":
        return None
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


__all__ = ["Drafter", "Proposal", "make_drafter", "PromptLookupDrafter", "PromptLookupConfig",
           "LayerSkipDrafter", "LayerSkipConfig", "BUILTIN"]
