"""One batched KV cache for many requests with ragged lengths: per-row rollback, admission, retirement.

The batched serving engine verifies every active request in ONE target forward per step, each with
its own number of new tokens, then rolls back each request's rejected drafts on its own. This module
is the cache underneath, over `labkit.model.slab` (row slots written in place) and
`labkit.model.ragged` (the forward whose attention reads each row's own slot):

- request r owns a row slot; its live tokens are that row's first length_r columns, a prefix, so its
  next token's position id is its column;
- a step writes each row's new tokens after its own prefix (a row that sends one token grows by one
  column, whatever its neighbours send), attention reads the R x T block, T the longest row, masked
  per row;
- a rollback lowers length_r, and the next step writes over the rejected tokens: rejected KV is never
  read again and leaves no hole, so there is nothing to compact;
- admission prefills the new prompts together, straight into free slots; retirement moves the last
  row into the freed slot. Neither copies the other rows (docs/facts.md, "The batched KV cache").

Facts it relies on (checked in transformers 5.23): a decoder called with a custom attention function,
a 4D mask and explicit `position_ids` passes the mask and any extra keyword through to every layer,
and positions only feed RoPE. Tokens leaking between requests when draft lengths differ (vLLM
#14645) and wrong positions in a ragged batch are the bugs tests/test_batch_kv.py checks for; fp32
batched and solo forwards agree to ~1e-6 on the CPU.

The decoder layers run over the real tokens only when `packed` (the default), over R x max(w) cells
when not (`padded_tokens` counts that cost); the LM head runs over real tokens only in both (HF's
`logits_to_keep` cannot differ per row, so the step calls the decoder and the head itself).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from labkit.core.errors import LabkitError
from labkit.model import ragged
from labkit.model.slab import Slab
from labkit.model.target import Target

Hidden = tuple[torch.Tensor, ...] | None


@dataclass
class KVStats:
    """A snapshot of the cache for the engine's metrics."""

    rows: int
    columns: int  # T, the longest row: attention reads R x T cells a step
    valid: int  # live tokens over all rows (sum of lengths)
    holes: int  # cells attention reads that hold no live token: rows shorter than the longest
    steps: int
    computed_tokens: int  # what the token-wise layers paid for, summed over steps (sum w packed, R * max w padded)
    real_tokens: int  # sum of w_r over steps: what the requests asked for

    @property
    def waste_fraction(self) -> float:
        """Share of the cells attention reads that hold no live token."""
        cells = self.rows * self.columns
        return self.holes / cells if cells else 0.0

    @property
    def padding_fraction(self) -> float:
        """Share of the tokens computed in steps that were padding."""
        return 1.0 - self.real_tokens / self.computed_tokens if self.computed_tokens else 0.0


@dataclass
class _Row:
    key: Hashable
    length: int  # live tokens = the row's next position id = its next column
    last_added: int  # tokens of the last step that may still be rolled back


class BatchKV:
    """A batched KV cache over `target` with ragged rows; see the module docstring for the layout.

    `hidden_layers` selects hidden states to return: index i is the output of layer i (0 = embeddings),
    as in HF's hidden_states tuple and `labkit.decode.loop.select_hidden`. Rows are kept in slot order:
    a retirement moves the last row into the freed slot, so `keys` is not admission order.
    """

    def __init__(self, target: Target, hidden_layers: tuple[int, ...] = (), packed: bool = True):
        n_layers = target.num_layers
        if any(not isinstance(i, int) or not 0 <= i <= n_layers for i in hidden_layers):
            raise LabkitError(f"hidden_layers {hidden_layers!r} must be layer indices from 0 (embeddings) to "
                              f"{n_layers}: pass indices of the target's hidden_states tuple.")
        _check_cache_type(target.new_cache(), target.name)
        self.target = target
        self.hidden_layers = tuple(hidden_layers)
        #: steps run packed (token-wise layers over the real tokens only) or padded (over R x max w)
        self.packed = packed
        self.slab = Slab(n_layers, target.device)
        self._rows: list[_Row] = []
        self._steps = self._computed = self._real = 0

    # ----------------------------------------------------------------------------------------------
    # Reading

    @property
    def keys(self) -> list[Hashable]:
        """Active request keys, in slot order."""
        return [row.key for row in self._rows]

    @property
    def columns(self) -> int:
        """Columns attention reads a step: the longest row."""
        return max((row.length for row in self._rows), default=0)

    def length(self, key: Hashable) -> int:
        """Live cached tokens of that request (= the position id of its next token)."""
        return self._rows[self._index(key)].length

    @staticmethod
    def padded_tokens(widths: list[int]) -> int:
        """Tokens a padded step with these per-row widths computes: R * max(w), pads included."""
        return len(widths) * max(widths) if widths else 0

    def computed_tokens(self, widths: list[int]) -> int:
        """Tokens the token-wise layers of a step compute: sum(w) packed, R * max(w) padded."""
        return sum(widths) if self.packed else self.padded_tokens(widths)

    @property
    def stats(self) -> KVStats:
        rows, cols = len(self._rows), self.columns
        live = sum(r.length for r in self._rows)
        return KVStats(rows=rows, columns=cols, valid=live, holes=rows * cols - live, steps=self._steps,
                       computed_tokens=self._computed, real_tokens=self._real)

    # ----------------------------------------------------------------------------------------------
    # Admission and retirement

    def add(self, key: Hashable, prompt_ids: Sequence[int]) -> tuple[torch.Tensor, Hidden]:
        """Prefill one request and give it a slot. Returns its last-position logits (V,) float32 and, if
        hidden_layers were asked for, the selected hidden states, each (P, H) over the P prompt positions."""
        if any(row.key == key for row in self._rows):
            raise LabkitError(f"Request {key!r} is already active: remove it first or use a new key.")
        return self.add_many({key: prompt_ids})[key]

    @torch.inference_mode()
    def add_many(self, prompts: dict[Hashable, Sequence[int]]) -> dict[Hashable, tuple[torch.Tensor, Hidden]]:
        """Prefill several requests together in one packed forward, written straight into free slots;
        returns key -> what `add` returns. The new rows attend only to their own prompts, and the active
        rows are neither computed nor moved, so an admission never changes another request's numbers.
        """
        keys = list(prompts)
        taken = [k for k in keys if any(row.key == k for row in self._rows)]
        if taken or len(set(keys)) != len(keys):
            raise LabkitError(f"Requests {taken or keys!r} are already active or repeated: give each new request "
                              "its own key.")
        if not keys:
            return {}
        tokens = [self._token_tensor(prompts[k], f"the prompt of request {k!r}") for k in keys]
        first = len(self._rows)
        self.slab.reserve(first + len(keys), max(self.columns, max(len(t) for t in tokens)))
        out, plan = ragged.forward(self.target.model, tokens, [0] * len(keys), self.slab, first,
                                   output_hidden_states=bool(self.hidden_layers))
        ends = torch.cumsum(torch.tensor([len(t) for t in tokens]), 0)
        logits = self._logits(out.last_hidden_state[0, ends - 1])
        result = {}
        for r, (key, t) in enumerate(zip(keys, tokens)):
            self._rows.append(_Row(key=key, length=len(t), last_added=0))
            result[key] = (logits[r], self._row_hidden(out.hidden_states, plan, r, int(ends[r]) - len(t), len(t)))
        self._sync_slab()
        return result

    @torch.inference_mode()
    def remove(self, key: Hashable) -> None:
        """Retire a request: the last row moves into its slot (one row copied, not the cache)."""
        index, last = self._index(key), len(self._rows) - 1
        if index != last:
            self.slab.move_row(last, index)
            self._rows[index] = self._rows[last]
        del self._rows[last]
        self._sync_slab()

    def _sync_slab(self) -> None:
        self.slab.rows, self.slab.columns = len(self._rows), self.columns

    # ----------------------------------------------------------------------------------------------
    # Stepping and rollback

    @torch.inference_mode()
    def step(self, inputs: dict[Hashable, Sequence[int]]) -> dict[Hashable, tuple[torch.Tensor, Hidden]]:
        """One batched forward over every active request's new tokens (>= 1 each, ragged).

        Returns key -> (logits (w_r, V) float32 for that row's new tokens, tuple of (w_r, H) hidden
        states for the selected layers, or None).
        """
        tokens = self._check_step_inputs(inputs)
        widths = [len(t) for t in tokens]
        starts = [row.length for row in self._rows]
        self.slab.reserve(len(self._rows), max(s + w for s, w in zip(starts, widths)))
        out, plan = ragged.forward(self.target.model, tokens, starts, self.slab, 0, self.packed,
                                   bool(self.hidden_layers))
        logits = self._logits(ragged.real_hidden(out.last_hidden_state, plan))  # (sum of widths, V)
        for row, w in zip(self._rows, widths):
            row.length += w
            row.last_added = w
        self._sync_slab()
        self._steps += 1
        self._computed += self.computed_tokens(widths)
        self._real += sum(widths)
        offsets = [0]
        for w in widths:
            offsets.append(offsets[-1] + w)
        return {row.key: (logits[offsets[r]:offsets[r + 1]], self._row_hidden(out.hidden_states, plan, r, offsets[r], w))
                for r, (row, w) in enumerate(zip(self._rows, widths))}

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head over real positions only: with ragged widths most of a padded step's positions
        are pads, and the head (V x H) is the largest matrix of a small model. Applies the final logit
        soft-cap of models that have one (Gemma 2/3), as their own forward does."""
        logits = self.target.model.get_output_embeddings()(h).float()
        cap = getattr(self.target.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _row_hidden(self, hidden_states, plan: ragged.RaggedLayout, r: int, start: int, w: int) -> Hidden:
        if not self.hidden_layers:
            return None
        return tuple(ragged.row_hidden(hidden_states[i], plan, r, start, w) for i in self.hidden_layers)

    def rollback(self, key: Hashable, n_drop: int) -> None:
        """The last n_drop tokens this row added in the last step stop counting; the next step writes
        over them."""
        row = self._rows[self._index(key)]
        if not isinstance(n_drop, int) or not 0 <= n_drop <= row.last_added:
            raise LabkitError(
                f"Cannot roll back {n_drop!r} tokens of request {key!r}: only the {row.last_added} token(s) "
                "it added in the last step (and not yet rolled back) can be dropped; pass 0 to that many.")
        row.length -= n_drop
        row.last_added -= n_drop

    # ----------------------------------------------------------------------------------------------
    # The profiler's batches

    @torch.inference_mode()
    def replicate(self, rows: int) -> None:
        """Copy the one active row into `rows` rows keyed 0..rows-1 (the profiler's batches: content
        does not change the cost of a forward)."""
        if len(self._rows) != 1 or rows < 1:
            raise LabkitError(f"replicate needs exactly one active row and rows >= 1, got {len(self._rows)} "
                              f"row(s) and rows={rows}.")
        self.slab.reserve(rows, self.columns)
        self.slab.copy_row(0, range(1, rows))
        self._rows += [_Row(key=i, length=self._rows[0].length, last_added=0) for i in range(1, rows)]
        self._sync_slab()

    def undo_step(self) -> None:
        """Every row drops what the last step added (the profiler's replays of one shape)."""
        for row in self._rows:
            row.length -= row.last_added
            row.last_added = 0
        self._sync_slab()

    # ----------------------------------------------------------------------------------------------
    # Input checks

    def _index(self, key: Hashable) -> int:
        for i, row in enumerate(self._rows):
            if row.key == key:
                return i
        raise LabkitError(f"Request {key!r} is not active: add it with BatchKV.add first "
                          f"(active: {self.keys!r}).")

    def _token_tensor(self, ids: Sequence[int], what: str) -> torch.Tensor:
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if not values:
            raise LabkitError(f"No tokens were given for {what}: pass at least one token id.")
        vocab = self.target.vocab_size
        if any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab for v in values):
            raise LabkitError(f"Tokens for {what} must be integer ids in [0, {vocab}): got {values[:8]!r}...; "
                              "encode text with the target's tokenizer first.")
        return torch.tensor(values, dtype=torch.long, device=self.slab.device)

    def _check_step_inputs(self, inputs: dict[Hashable, Sequence[int]]) -> list[torch.Tensor]:
        if not self._rows:
            raise LabkitError("No request is active: add one with BatchKV.add before calling step.")
        missing = [k for k in self.keys if k not in inputs]
        extra = [k for k in inputs if all(k != row.key for row in self._rows)]
        if missing or extra:
            raise LabkitError(
                f"step needs new tokens for exactly the active requests: missing {missing!r}, not active "
                f"{extra!r}; pass every active key (>= 1 token each) and add new requests with BatchKV.add.")
        return [self._token_tensor(inputs[row.key], f"request {row.key!r} in this step") for row in self._rows]


# --------------------------------------------------------------------------------------------------
# Tensor helpers


def _check_cache_type(cache: DynamicCache, name: str) -> None:
    """The slab stands in for the target's own cache, which is only right where that cache would be
    plain full-attention (B, H, T, D) layers; sliding windows, linear attention, indexers, quantisation
    or offloading keep more state."""
    layers = getattr(cache, "layers", None)
    odd = [type(layer).__name__ for layer in layers or [] if type(layer) is not DynamicLayer]
    if type(cache) is not DynamicCache or layers is None or odd or getattr(cache, "offloading", False):
        raise LabkitError(
            f"BatchKV handles a plain DynamicCache of full-attention layers; the target {name} uses "
            f"{type(cache).__name__} with {sorted(set(odd)) or 'offloading'}: serve it one request at a "
            "time (labkit.decode.loop) or pick a full-attention target such as the default.")
    if any(layer.is_initialized and layer.keys.dim() != 4 for layer in layers):
        raise LabkitError(f"The cache of {name} does not hold (B, H, T, D) tensors: serve it one request at a time.")
