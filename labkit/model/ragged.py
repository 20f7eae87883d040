"""A packed (flattened) forward over ragged rows: B counts real tokens, as in the paper (Sec. 3.2.2, 5.3).

The batched engine verifies R requests in one target forward, request r with w_r new tokens. Padded to
R x max(w) (the layout of `labkit.model.batch_kv`), every linear layer, the MLP and the norms pay for
the pads: one deep draft admitted beside fifteen one-token rows doubles the work, and the scheduler's
cost model SPS(B) sees a cliff where the paper's flattened batch has none. Packed, the N = sum w_r
real tokens run as ONE sequence of batch 1 through every token-wise layer, and only attention, the one
place where rows must not mix, regroups them:

    tokens (1, N) -> embeddings, q/k/v projections, RoPE (per-token positions) over N tokens
    attention: gather q, k, v into (R, W) by row, append k, v to each row's cache, SDPA with the row's
               own mask (its valid cache columns + causal over its new tokens), scatter back to N
    o-projection, MLP, norms, LM head over N tokens

Attention still runs R x W queries (pads included, masked), but over a 135M-parameter model with a
few hundred cached tokens it is a few percent of a verify forward; the token-wise layers are the rest
(measured in docs/facts.md, "Packed verify"). No custom kernel: the model's own modules run, and only
its attention function is swapped for `ragged_attention` (transformers' `AttentionInterface`) while a
packed forward runs. A query never sees another row's keys: the gather puts each row's queries beside
its own cache only, which is the whole isolation argument (tests/test_ragged.py checks that a packed
forward gives each request's solo logits).

The KV layout of the cache is unchanged (R rows x T columns with a validity mask), so rollback,
compaction and admission in `BatchKV` work as before. A cache with no columns yet is a batched
prefill: new requests are prefilled together in one packed forward and spliced in.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache

#: the name under which `ragged_attention` is registered with transformers
RAGGED = "labkit_ragged"


@dataclass
class RaggedLayout:
    """Where each of the N packed tokens sits in the (R, W) padded grid, and back.

    gather (R, W): for row r and new column j, the packed index of that token (pads point at the row's
    first token; their queries are dropped and their keys masked). rows / cols (N,): the grid cell of
    packed token n. mask (R, 1, W, T + W): what each query may attend to.
    """

    gather: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    mask: torch.Tensor
    cache: DynamicCache

    @property
    def new_valid(self) -> torch.Tensor:
        """(R, W): which cells of the new columns hold a real token."""
        return self.mask[:, 0, -1, -self.gather.shape[1]:]


def layout(widths: list[int], valid: torch.Tensor, cache: DynamicCache) -> RaggedLayout:
    """The layout of one packed forward: rows of `widths` new tokens over a cache whose live columns
    are `valid` (R, T) (T may be 0: a batched prefill)."""
    device = valid.device
    r, width = len(widths), max(widths)
    w = torch.tensor(widths, device=device)
    starts = torch.cumsum(w, 0) - w
    cols = torch.arange(width, device=device)
    new_valid = cols[None, :] < w[:, None]
    gather = starts[:, None] + torch.where(new_valid, cols[None, :], 0)
    rows = torch.repeat_interleave(torch.arange(r, device=device), w)
    packed_cols = torch.arange(int(w.sum()), device=device) - starts[rows]
    causal = cols[None, :] <= cols[:, None]  # (W, W): query j sees new keys 0..j
    mask = torch.cat([valid[:, None, :].expand(r, width, -1),
                      causal[None] & new_valid[:, None, :]], dim=2)[:, None]
    return RaggedLayout(gather=gather, rows=rows, cols=packed_cols, mask=mask, cache=cache)


def _grid(x: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
    """(1, H, N, D) packed -> (R, H, W, D) by row."""
    return x[0][:, gather].permute(1, 0, 2, 3)


#: spare columns a cache layer's buffer gets when it must grow (a few steps' worth of new tokens)
HEADROOM = 64


def _append(layer, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append W columns to a cache layer without copying the cache: its keys and values are views of
    buffers with spare columns, written in place (a plain `torch.cat` copies all R x T cached columns
    of every layer at every step, which at 16 rows of a few hundred tokens costs more than the step's
    attention). A layer whose tensors were replaced since (admission, compaction, removal) or whose
    buffer is full gets a new buffer; the columns of a view nobody holds past T are never written."""
    if not layer.is_initialized:
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys[:, :, :0], values[:, :, :0]
    t, w = layer.keys.shape[2], keys.shape[2]
    buffers = getattr(layer, "_labkit_buffers", None)
    if (buffers is None or buffers[0].shape[2] < t + w or buffers[0].shape[:2] != layer.keys.shape[:2]
            or buffers[0].data_ptr() != layer.keys.data_ptr() or buffers[1].data_ptr() != layer.values.data_ptr()):
        grown = []
        for cached, new in ((layer.keys, keys), (layer.values, values)):
            buf = new.new_empty((new.shape[0], new.shape[1], t + w + HEADROOM, new.shape[3]))
            buf[:, :, :t] = cached
            grown.append(buf)
        buffers = layer._labkit_buffers = tuple(grown)
    buffers[0][:, :, t:t + w] = keys
    buffers[1][:, :, t:t + w] = values
    layer.keys, layer.values = buffers[0][:, :, :t + w], buffers[1][:, :, :t + w]
    return layer.keys, layer.values


def ragged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     ragged: RaggedLayout | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention of a packed forward: each row's queries over its own cache and its own new keys.

    query/key/value come in packed, (1, heads, N, head_dim), after RoPE; the new keys and values are
    appended to each row's cache layer here (the model is called without a cache of its own).
    Returns (1, N, heads, head_dim), the layout transformers' attention functions return."""
    if ragged is None:
        raise RuntimeError("ragged_attention runs only inside labkit.model.ragged.forward (it needs the layout).")
    layer = ragged.cache.layers[module.layer_idx]
    keys, values = _append(layer, _grid(key, ragged.gather), _grid(value, ragged.gather))
    q = _grid(query, ragged.gather)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=ragged.mask, scale=scaling,
                                         enable_gqa=q.shape[1] != keys.shape[1])
    return out.permute(0, 2, 1, 3)[ragged.rows, ragged.cols].unsqueeze(0), None


AttentionInterface.register(RAGGED, ragged_attention)


@contextmanager
def _attention(config, name: str) -> Iterator[None]:
    """The model's attention function swapped for `name` while the block runs (single-threaded)."""
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


@torch.inference_mode()
def forward(model, tokens: list[torch.Tensor], positions: list[torch.Tensor], valid: torch.Tensor,
            cache: DynamicCache, output_hidden_states: bool = False):
    """One packed forward of the decoder (no LM head) over rows of new `tokens` at `positions`.

    `cache` holds R rows x T columns (`valid` (R, T) says which are live); each row's new keys and
    values are appended as W = max(w_r) new columns (the pads invalid). Returns (the decoder's output,
    whose last_hidden_state is (1, N, H) over the real tokens in row order, and the layout)."""
    plan = layout([len(t) for t in tokens], valid, cache)
    decoder = model.get_decoder()
    with _attention(decoder.config, RAGGED):
        out = decoder(input_ids=torch.cat(tokens)[None], position_ids=torch.cat(positions)[None],
                      attention_mask=plan.mask, use_cache=False, output_hidden_states=output_hidden_states,
                      ragged=plan)
    return out, plan
