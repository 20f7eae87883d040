"""Pre-packed weights for the CPU's small matmuls: what makes a verify forward cheap (issue 11, part 1).

On a CPU a cached forward over one new token is a chain of matrix-vector products read straight off
the weights, but over 2-16 tokens (a verify) each nn.Linear becomes a small GEMM, and MKL's GEMM
first copies the weight into its blocked layout on every call: for a 576 x 1536 matrix that copy
costs more than the product (measured: 1 row 78 us, 2 rows 136 us, 9 rows 304 us). oneDNN can keep the
weight in that layout, reordered once at load, so 2-16 rows cost about what one does (2 rows 69 us,
9 rows 163 us). `pack_linears` swaps every nn.Linear of a model for a `PackedLinear` over the same
weights; the model code (transformers) is untouched, so any architecture gains. Products agree with
F.linear to fp32 rounding (another summation order), so greedy equality with HF `generate` is
tested, not assumed (tests/test_packed.py). Left out: training (the packed copy has no gradient) and
GPUs, whose kernels need no such help.
"""

from __future__ import annotations

import os

import torch
from torch import nn

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN packing applies on the CPU, fp32 or bf16, where torch was built with it; bf16 only where
    the CPU has bf16 instructions (AVX-512 or AVX-NE-CONVERT): on an AVX2-only CPU oneDNN refuses it."""
    if device.type != "cpu" or dtype not in PACKABLE_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    return dtype != torch.bfloat16 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def packing_wanted(device: torch.device, dtype: torch.dtype) -> bool:
    """The default: pack where it applies, unless LABKIT_PACKED=0 asks for the stock kernels."""
    return os.environ.get("LABKIT_PACKED", "1") != "0" and can_pack(device, dtype)


class PackedLinear(nn.Module):
    """y = x W^T + b with W held pre-packed by oneDNN. Keeps the original `weight` (and `bias`)
    parameters, so tied embeddings, state dicts and code that reads `.weight` see no change."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, rows_hint: int = 8):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight  # an nn.Parameter stays one (registered); a buffer stays a plain tensor
        self.bias = bias
        # an opaque oneDNN tensor, not a buffer: .to() and state dicts must not touch it (pack last).
        # rows_hint only tunes the layout; any number of rows works with it.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):  # no backward in oneDNN's op
            return nn.functional.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, self.in_features)
        bias = None if self.bias is None else self.bias.detach()
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


@torch.no_grad()
def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear inside `model` by a PackedLinear over the same weights; returns how many.

    Call it on a model in eval mode whose weights no longer change (a frozen target)."""
    params = next(model.parameters(), None)
    if params is None or not can_pack(params.device, params.dtype):
        return 0
    n = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.weight.dtype in PACKABLE_DTYPES:
                setattr(module, name, PackedLinear(child.weight, child.bias))
                n += 1
    return n
