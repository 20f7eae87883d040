"""Grouped-query attention over several new tokens without copying the KV cache (issue 11, part 1).

Models with grouped-query attention (SmolLM2: 9 query heads share 3 key/value heads; Gemma 3: 4 share
1) keep one K and V per group. transformers' SDPA path repeats them to one copy per query head before
the product whenever a mask is given and more than one token is new, so every verify forward copies
the whole cache of every layer once more (`repeat_kv`), a cost that grows with the context. For a
single new token transformers already avoids it by folding the group's heads into the query rows;
`grouped_sdpa` does the same for k new tokens: the n_rep heads x k tokens of a group become n_rep * k
query rows against that group's own K and V, with the mask repeated per head. Each row's product,
softmax and weighted sum are the ones the repeated form computes, so only summation order could
differ (tests/test_attention.py compares logits and greedy output with the stock path).

`use_grouped_sdpa(model)` switches a model that runs "sdpa" to it, registered under the name
"labkit_sdpa" with transformers' own SDPA mask builder; anything it does not cover (training, one new
token, no mask, per-head masks, soft-capping) goes through transformers' function unchanged.
"""

from __future__ import annotations

import os

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "labkit_sdpa"


def grouped_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query (B, H, k, D), key/value (B, H_kv, L, D), mask (B, 1, k, L) -> ((B, k, H, D), None)."""
    n_rep = getattr(module, "num_key_value_groups", 1)
    b, h, k, d = query.shape
    if (n_rep == 1 or k == 1 or attention_mask is None or attention_mask.shape[1] != 1 or module.training
            or kwargs.get("softcap") is not None or kwargs.get("cache") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    rows = query.reshape(b, h // n_rep, n_rep * k, d)  # head j*n_rep + r, token i -> group j, row r*k + i
    mask = attention_mask.expand(b, 1, k, attention_mask.shape[-1]).repeat(1, 1, n_rep, 1)
    out = torch.nn.functional.scaled_dot_product_attention(rows, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, h, k, d).transpose(1, 2).contiguous(), None


def grouped_wanted(device: torch.device) -> bool:
    """The default: on the CPU, where it was measured (`round-cost`), unless LABKIT_GROUPED=0."""
    return device.type == "cpu" and os.environ.get("LABKIT_GROUPED", "1") != "0"


def use_grouped_sdpa(model: PreTrainedModel) -> bool:
    """Run `model`'s attention through `grouped_sdpa` if it uses SDPA with grouped K/V heads; returns
    whether it switched (eager, flash or flex attention, and models without groups, are left alone)."""
    cfg = model.config
    heads, kv_heads = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
    if cfg._attn_implementation != "sdpa" or not heads or not kv_heads or heads == kv_heads:
        return False
    AttentionInterface.register(NAME, grouped_sdpa)  # idempotent: the same function under the same name
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True


__all__ = ["NAME", "grouped_sdpa", "grouped_wanted", "use_grouped_sdpa"]
