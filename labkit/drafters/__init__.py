"""Drafters behind one interface (`base.Drafter`): prompt lookup, layer skip, DFlash, DSpark (with its
heads), Eagle3 (the autoregressive baseline), the hybrid and the confidence-scheduled wrapper; their
checkpoints and export; and the factory that builds one from a spec (`factory.make_drafter`),
re-exported here."""

from labkit.drafters.base import Drafter, Proposal
from labkit.drafters.factory import (BUILTIN, SHIPPED, SHIPPED_DIR, check_spec, checkpoint_path, make_drafter,
                                     shipped_checkpoint)
from labkit.drafters.layer_skip import LayerSkipConfig, LayerSkipDrafter
from labkit.drafters.prompt_lookup import PromptLookupConfig, PromptLookupDrafter

__all__ = ["BUILTIN", "SHIPPED", "SHIPPED_DIR", "Drafter", "LayerSkipConfig", "LayerSkipDrafter", "Proposal",
           "PromptLookupConfig", "PromptLookupDrafter", "check_spec", "checkpoint_path", "make_drafter",
           "shipped_checkpoint"]
