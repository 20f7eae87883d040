"""Row slots of keys and values, written in place: the storage under the batched KV cache.

Every layer keeps one (rows, kv_heads, columns, head_dim) buffer for its keys and one for its values,
with spare rows and columns. Request r owns row slot r, and its live tokens are that row's first
`length_r` columns, always a prefix:

- a step writes row r's new tokens at columns length_r .. length_r + w_r - 1, so rows of different
  lengths and widths never make each other wider (no column is appended to a row that sent nothing);
- a rollback only lowers length_r: the next step writes over the rejected tokens, so no hole remains;
- admission writes the new rows' prompts into free slots, and retirement moves the last occupied row
  into the freed slot: neither copies the other rows.

The buffers grow (one copy) only when a forward needs more rows or columns than they hold, and then
with headroom, so copies are rare. Why it matters, measured on the 2-core CPU (SmolLM2-135M, 32 rows
of about 300 tokens): a layout that concatenated a new row onto the cache copied the whole cache on
each admission and each retirement, about 100 ms each plus a regrown buffer on the next step, which at
32 users was a third of a step; and a cache that appended the widest row's width to every row made a
ragged step (one deep row among shallow ones) read more columns than a uniform one with the same tokens.

Cells past a row's length hold stale or zero values, never NaN (buffers start zeroed): attention masks
them, and a masked value only has to be finite for the masked product to be zero.
"""

from __future__ import annotations

import torch

#: spare columns a buffer gets when it must grow (a few steps' worth of new tokens), at least
HEADROOM = 64
#: spare rows a buffer gets when it must grow, at least
ROW_HEADROOM = 4


class Slab:
    """Keys and values of `n_layers` layers in row slots; `rows` of them are occupied (slots 0..rows-1)."""

    def __init__(self, n_layers: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.rows = 0  # occupied slots
        self.columns = 0  # columns in use: the longest occupied row
        self._want = (0, 0)  # capacity the next write must have (rows, columns)

    def reserve(self, rows: int, columns: int) -> None:
        """Make room for `rows` slots of `columns` before a forward writes there: allocated layers grow
        now (copying the occupied cells once), the others are allocated at that size on first write."""
        cap_rows, cap_cols = self.capacity
        if rows > cap_rows or columns > cap_cols:
            self._want = (max(rows + max(ROW_HEADROOM, rows // 4), cap_rows) if rows > cap_rows else cap_rows,
                          max(columns + max(HEADROOM, columns // 4), cap_cols) if columns > cap_cols else cap_cols)
            for i in range(len(self.keys)):
                if self.keys[i] is not None:
                    self.keys[i], self.values[i] = self._grown(self.keys[i]), self._grown(self.values[i])
        else:
            self._want = (cap_rows, cap_cols)

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, columns) every allocated buffer holds."""
        k = next((k for k in self.keys if k is not None), None)
        return (k.shape[0], k.shape[2]) if k is not None else self._want

    def _grown(self, buf: torch.Tensor) -> torch.Tensor:
        rows, cols = self._want
        new = buf.new_zeros((rows, buf.shape[1], cols, buf.shape[3]))
        new[: self.rows, :, : self.columns] = buf[: self.rows, :, : self.columns]
        return new

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor,
              column: torch.Tensor) -> None:
        """Write N tokens' keys and values, each (N, kv_heads, head_dim), at (slot[n], column[n])."""
        if self.keys[layer] is None:
            rows, cols = self._want
            shape = (rows, keys.shape[1], cols, keys.shape[2])
            self.keys[layer], self.values[layer] = keys.new_zeros(shape), values.new_zeros(shape)
        self.keys[layer][slot, :, column] = keys
        self.values[layer][slot, :, column] = values

    def read(self, layer: int, first: int, last: int, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of slots first..last-1, columns 0..columns-1: (rows, kv_heads, columns, head_dim) each."""
        return self.keys[layer][first:last, :, :columns], self.values[layer][first:last, :, :columns]

    def move_row(self, source: int, target: int) -> None:
        """Copy slot `source` into slot `target` in every layer (retirement fills the hole it leaves)."""
        for bufs in (self.keys, self.values):
            for buf in bufs:
                if buf is not None:
                    buf[target, :, : self.columns] = buf[source, :, : self.columns]

    def copy_row(self, source: int, targets: range) -> None:
        """Copy slot `source` into every slot of `targets` (the profiler's replicated batches)."""
        for bufs in (self.keys, self.values):
            for buf in bufs:
                if buf is not None:
                    buf[targets.start:targets.stop, :, : self.columns] = buf[source:source + 1, :, : self.columns]
