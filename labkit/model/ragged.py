"""One batched forward over ragged rows, each row attending only to its own cache (Sec. 3.2.2, 5.3).

The batched engine verifies R requests in one target forward, request r with w_r new tokens. Packed
(the default), the N = sum w_r real tokens run as ONE sequence of batch 1 through every token-wise
layer, so B counts real tokens as in the paper's flattened batch; padded (for comparison), the rows
run as an (R, max w) batch and the token-wise layers pay for the pads too. Only attention, the one
place where rows must not mix, sees rows in both layouts:

    tokens (1, N) -> embeddings, q/k/v projections, RoPE (per-token positions) over N tokens
    attention: write each row's new keys and values into its slot of the cache (`labkit.model.slab`)
               at columns length_r .. length_r + w_r - 1, gather the queries into (R, W) by row, SDPA
               over the row's own columns (its prefix + causal over its new tokens), scatter back to N
    o-projection, MLP, norms over N tokens (the LM head is the caller's, over real tokens only)

Attention still runs a rectangle of queries (pads included, masked) over R x T columns, T the longest
row; where a few rows verify far deeper than the rest, those rows' extra queries run in a second call
over a copy of their own keys (`split_width`), so one deep row does not make every row as wide
(docs/facts.md, "The batched KV cache"). The token-wise layers are most of a verify forward. No custom kernel: the
model's own modules run, and only its attention function is swapped for `ragged_attention`
(transformers' `AttentionInterface`) while the forward runs. A query never sees another row's keys:
each row's queries meet their own slot only, which is the whole isolation argument
(tests/test_batch_kv.py checks that every row equals its request run alone). A forward whose rows
start at length 0 is a batched prefill: new requests are prefilled together straight into free slots.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from labkit.core.layout import split_width
from labkit.model.slab import Slab

#: the name under which `ragged_attention` is registered with transformers
RAGGED = "labkit_ragged"


@dataclass
class RaggedLayout:
    """Where each of the N real tokens sits, in the (R, W) grid and in the cache.

    Rows are the slab's slots first..first+R-1. new_valid (R, W): which grid cells hold a real token;
    packed: gather (R, W) is the packed index of each cell (pads point at the row's first token: their
    queries are dropped), rows / cols (N,) the grid cell of packed token n. slot / column (N,): where
    token n's key and value are written. mask (R, 1, W, T): what each query may attend to, T the
    columns every row is read over after the writes. split: the query columns every row runs in the
    main pass; wide (rows with more tokens) run theirs past `split` in a second pass (`split_width`):
    main / rest (packed indices of the tokens of each pass), wide_of (R,): a row's index among wide."""

    slab: Slab
    first: int
    packed: bool
    new_valid: torch.Tensor
    gather: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    slot: torch.Tensor
    column: torch.Tensor
    mask: torch.Tensor
    split: int
    wide: torch.Tensor
    wide_of: torch.Tensor
    main: torch.Tensor
    rest: torch.Tensor

    @property
    def columns(self) -> int:
        return self.mask.shape[-1]


def layout(widths: list[int], starts: list[int], slab: Slab, first: int, packed: bool = True) -> RaggedLayout:
    """The layout of one forward: row r (slot first + r) holds `starts[r]` tokens and gets `widths[r]`."""
    device = slab.device
    r, width = len(widths), max(widths)
    w = torch.tensor(widths, device=device)
    s = torch.tensor(starts, device=device)
    offsets = torch.cumsum(w, 0) - w
    cols = torch.arange(width, device=device)
    new_valid = cols[None, :] < w[:, None]
    gather = offsets[:, None] + torch.where(new_valid, cols[None, :], 0)
    rows = torch.repeat_interleave(torch.arange(r, device=device), w)
    packed_cols = torch.arange(int(w.sum()), device=device) - offsets[rows]
    columns = int((s + w).max())
    # query j of row r sees the row's columns up to its own (a pad query sees the row's last real one)
    last_seen = s[:, None] + torch.minimum(cols[None, :], w[:, None] - 1)
    mask = torch.arange(columns, device=device)[None, None, :] <= last_seen[:, :, None]
    split = split_width(widths)
    wide = (w > split).nonzero().squeeze(1)
    wide_of = torch.zeros(r, dtype=torch.long, device=device)
    wide_of[wide] = torch.arange(len(wide), device=device)
    return RaggedLayout(slab=slab, first=first, packed=packed, new_valid=new_valid, gather=gather, rows=rows,
                        cols=packed_cols, slot=first + rows, column=s[rows] + packed_cols, mask=mask[:, None],
                        split=split, wide=wide, wide_of=wide_of, main=(packed_cols < split).nonzero().squeeze(1),
                        rest=(packed_cols >= split).nonzero().squeeze(1))


def _grid(x: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
    """(1, H, N, D) packed -> (R, H, W, D) by row."""
    return x[0][:, gather].permute(1, 0, 2, 3)


def ragged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     ragged: RaggedLayout | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention of a ragged forward: each row's queries over its own slot of the cache.

    query/key/value come after RoPE, (1, heads, N, head_dim) packed or (R, heads, W, head_dim) padded;
    the new keys and values are written into the slab here (the model is called without a cache of
    its own). Returns (batch, tokens, heads, head_dim), the layout transformers' attention functions return."""
    if ragged is None:
        raise RuntimeError("ragged_attention runs only inside labkit.model.ragged.forward (it needs the layout).")
    if ragged.packed:
        new_k, new_v, q = key[0].transpose(0, 1), value[0].transpose(0, 1), _grid(query, ragged.gather)
    else:
        new_k, new_v, q = key.transpose(1, 2)[ragged.new_valid], value.transpose(1, 2)[ragged.new_valid], query
    ragged.slab.write(module.layer_idx, new_k, new_v, ragged.slot, ragged.column)
    keys, values = ragged.slab.read(module.layer_idx, ragged.first, ragged.first + q.shape[0], ragged.columns)
    def attend(rows, columns: slice, k, v) -> torch.Tensor:  # (rows, query columns, heads, head_dim)
        return F.scaled_dot_product_attention(q[rows, :, columns], k, v, attn_mask=ragged.mask[rows, :, columns],
                                              scale=scaling, enable_gqa=q.shape[1] != k.shape[1]).transpose(1, 2)

    s, rows, cols = ragged.split, ragged.rows, ragged.cols
    if s == q.shape[2]:  # one pass
        tokens = attend(slice(None), slice(None), keys, values)[rows, cols]
    else:
        main, rest, w = ragged.main, ragged.rest, ragged.wide
        tokens = q.new_empty((len(rows), q.shape[1], q.shape[3]))
        tokens[main] = attend(slice(None), slice(0, s), keys, values)[rows[main], cols[main]]
        tokens[rest] = attend(w, slice(s, None), keys[w], values[w])[ragged.wide_of[rows[rest]], cols[rest] - s]
    if ragged.packed:
        return tokens.unsqueeze(0), None
    grid = q.new_zeros((q.shape[0], q.shape[2], q.shape[1], q.shape[3]))
    grid[ragged.new_valid] = tokens
    return grid, None


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
def forward(model, tokens: list[torch.Tensor], starts: list[int], slab: Slab, first: int, packed: bool = True,
            output_hidden_states: bool = False):
    """One forward of the decoder (no LM head): row r, in slot first + r, holds starts[r] tokens and
    gets tokens[r], at positions starts[r], starts[r] + 1, ... The caller has reserved the slab's room.

    Returns (the decoder's output, the layout); its last_hidden_state is (1, N, H) packed, (R, W, H)
    padded (`real_hidden` takes the real tokens of either, in row order)."""
    plan = layout([len(t) for t in tokens], starts, slab, first, packed)
    positions = plan.column  # a token's position is its column: rows are prefixes from column 0
    if packed:
        ids, pos = torch.cat(tokens)[None], positions[None]
    else:
        ids = torch.zeros(plan.new_valid.shape, dtype=torch.long, device=positions.device)
        ids[plan.new_valid] = torch.cat(tokens)
        pos = torch.tensor(starts, device=positions.device)[:, None] + torch.arange(ids.shape[1], device=positions.device)
    decoder = model.get_decoder()
    with _attention(decoder.config, RAGGED):
        out = decoder(input_ids=ids, position_ids=pos, attention_mask=plan.mask, use_cache=False,
                      output_hidden_states=output_hidden_states, ragged=plan)
    return out, plan


def real_hidden(h: torch.Tensor, plan: RaggedLayout) -> torch.Tensor:
    """(N, H): the real tokens' states, in row order, from a packed (1, N, H) or padded (R, W, H) output."""
    return h[0] if plan.packed else h[plan.new_valid]


def row_hidden(h: torch.Tensor, plan: RaggedLayout, r: int, start: int, width: int) -> torch.Tensor:
    """(width, H): row r's states, tokens start..start+width of the packed sequence."""
    return h[0, start:start + width] if plan.packed else h[r, :width]
