"""One batched KV cache for many requests with ragged lengths: per-row rollback, admission, retirement.

The batched serving engine verifies every active request in ONE target forward per step, each with
its own number of new tokens, then rolls back each request's rejected drafts on its own. This module
is the cache underneath. Facts it relies on (docs/facts.md, "The batched KV cache (transformers 5.x)", checked in transformers 5.23):

- `DynamicCache` layers hold (B, H, T, D) tensors in `.keys` / `.values`; `crop(-n)` cuts every row
  by the same n, `batch_select_indices` keeps rows, and there is no batch concatenation. So a per-row
  rollback is a validity mask with holes (like vLLM, rejected KV is not freed, only stops counting),
  admission concatenates layer tensors here, and `compact` squeezes the holes out now and then.
- A 2D attention mask (B, past + q) with explicit per-row `position_ids` handles left padding and
  holes: `create_causal_mask` ANDs the column-index causal mask with the 2D mask, and positions only
  feed RoPE. Llama in 5.23 takes no `cache_position` at all (the query offset is the cache's column
  count), and with a 2D mask and a cache it never tries to infer packed sequences from positions.
- A fully masked query gives an arbitrary output (torch 2.13's CPU SDPA returns zeros, eager a uniform
  average; older kernels NaN). It cannot happen here: every row sends >= 1 real token per step, its
  first new column is valid, and every later (padded) query of the row sees it causally.
- Tokens leaking between requests when draft lengths differ (vLLM #14645) and wrong positions in a
  padded batch are the bugs tests/test_batch_kv.py checks for; fp32 batched and solo forwards agree
  to ~1e-6 on the CPU.

Layout. All R rows share T columns; `valid` (R, T) says which hold a live token of that row, and a
row's live tokens are always its valid columns in order (never reordered), so "the last n tokens a
row added" are simply its last n valid columns, whatever compactions ran in between. A step right-
pads each row to W = max(w_r) with the pad id, appends W columns to every row (the pads invalid),
with positions length_r + i. Compaction gathers each row's valid columns, right-aligned (left
padding), into max(length_r) columns. Why this and not alternatives: a flattened ragged batch
(vLLM's layout) needs a paged-attention kernel HF models do not have; per-row caches would cost one
forward per request. Admission pads on the left (the new row, or the batch if the prompt is
longer): any placement is correct under the mask, but this one keeps every row's newest tokens in the
last columns, the layout compaction produces. The decoder layers run over every padded position
(`padded_tokens` counts that cost), but the LM head only over real ones (HF's `logits_to_keep`
cannot differ per row, so the step calls the decoder and the head itself).

Compaction runs automatically when the columns it would reclaim exceed `compact_at` of all columns
(checked before each step, so a step never pays for dead columns it could have dropped, and after
each removal, where a retired long row may leave columns no other row uses). It gathers every layer's
keys and values once (a copy of the whole cache), which is why it is not run after every rollback.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from labkit.core.errors import LabkitError
from labkit.model import ragged
from labkit.model.target import Target

Hidden = tuple[torch.Tensor, ...] | None


@dataclass
class KVStats:
    """A snapshot of the cache for the engine's metrics."""

    rows: int
    columns: int  # T, shared by all rows
    valid: int  # live tokens over all rows (sum of lengths)
    holes: int  # cells that hold no live token: rolled-back tokens, step padding, left padding
    reclaimable: int  # columns a compaction would drop now (T - max length)
    compactions: int  # compactions run so far
    steps: int
    computed_tokens: int  # R * W summed over steps: what the forwards paid for
    real_tokens: int  # sum of w_r over steps: what the requests asked for

    @property
    def waste_fraction(self) -> float:
        """Share of cache cells that hold no live token (attention reads them anyway)."""
        cells = self.rows * self.columns
        return self.holes / cells if cells else 0.0

    @property
    def padding_fraction(self) -> float:
        """Share of the tokens computed in steps that were padding."""
        return 1.0 - self.real_tokens / self.computed_tokens if self.computed_tokens else 0.0


@dataclass
class _Row:
    key: Hashable
    length: int  # live tokens = the row's next position id
    last_added: int  # tokens of the last step that may still be rolled back


class BatchKV:
    """A batched KV cache over `target` with ragged rows; see the module docstring for the layout.

    `hidden_layers` selects hidden states to return: index i is the output of layer i (0 = embeddings),
    as in HF's hidden_states tuple and `labkit.decode.loop.select_hidden`.
    """

    def __init__(self, target: Target, hidden_layers: tuple[int, ...] = (), compact_at: float = 0.5,
                 packed: bool = True):
        n_layers = target.num_layers
        if any(not isinstance(i, int) or not 0 <= i <= n_layers for i in hidden_layers):
            raise LabkitError(f"hidden_layers {hidden_layers!r} must be layer indices from 0 (embeddings) to "
                              f"{n_layers}: pass indices of the target's hidden_states tuple.")
        if not 0.0 < compact_at <= 1.0:
            raise LabkitError(f"compact_at must be a fraction in (0, 1], got {compact_at!r}: e.g. 0.5.")
        _check_cache_type(target.new_cache(), target.name)
        self.target = target
        self.hidden_layers = tuple(hidden_layers)
        self.compact_at = compact_at
        #: steps run packed (`labkit.model.ragged`: token-wise layers over the real tokens only) or padded
        self.packed = packed
        self.cache: DynamicCache | None = None  # None while no row is active
        self.valid = torch.zeros((0, 0), dtype=torch.bool, device=target.device)
        self._rows: list[_Row] = []
        self._compactions = self._steps = self._computed = self._real = 0

    # ----------------------------------------------------------------------------------------------
    # Reading

    @property
    def keys(self) -> list[Hashable]:
        """Active request keys, in row order."""
        return [row.key for row in self._rows]

    @property
    def columns(self) -> int:
        return self.valid.shape[1]

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
        rows, cols = self.valid.shape
        live = sum(r.length for r in self._rows)
        longest = max((r.length for r in self._rows), default=0)
        return KVStats(rows=rows, columns=cols, valid=live, holes=rows * cols - live,
                       reclaimable=cols - longest, compactions=self._compactions, steps=self._steps,
                       computed_tokens=self._computed, real_tokens=self._real)

    # ----------------------------------------------------------------------------------------------
    # Admission and retirement

    @torch.inference_mode()
    def add(self, key: Hashable, prompt_ids: Sequence[int]) -> tuple[torch.Tensor, Hidden]:
        """Prefill one request alone (B=1, so other rows' numbers never change) and splice it in.

        Returns its last-position logits (V,) float32 and, if hidden_layers were asked for, the
        selected hidden states, each (P, H) over the P prompt positions.
        """
        if any(row.key == key for row in self._rows):
            raise LabkitError(f"Request {key!r} is already active: remove it first or use a new key.")
        ids = self._token_tensor(prompt_ids, f"the prompt of request {key!r}")
        cache = self.target.new_cache()
        out = self.target.model(input_ids=ids.view(1, -1), past_key_values=cache, use_cache=True,
                                logits_to_keep=1, output_hidden_states=bool(self.hidden_layers))
        _check_cache_type(cache, self.target.name)
        self._splice(cache, len(ids))
        self._rows.append(_Row(key=key, length=len(ids), last_added=0))
        hidden = tuple(out.hidden_states[i][0] for i in self.hidden_layers) if self.hidden_layers else None
        return out.logits[0, -1].float(), hidden

    @torch.inference_mode()
    def add_many(self, prompts: dict[Hashable, Sequence[int]]) -> dict[Hashable, tuple[torch.Tensor, Hidden]]:
        """Prefill several requests together in one packed forward (`labkit.model.ragged`) and splice
        them in; returns key -> what `add` returns. The new rows attend only to their own prompts, and
        the active rows are not computed at all, so an admission never changes another request's numbers.
        """
        keys = list(prompts)
        taken = [k for k in keys if any(row.key == k for row in self._rows)]
        if taken or len(set(keys)) != len(keys):
            raise LabkitError(f"Requests {taken or keys!r} are already active or repeated: give each new request "
                              "its own key.")
        if not keys:
            return {}
        tokens = [self._token_tensor(prompts[k], f"the prompt of request {k!r}") for k in keys]
        cache = self.target.new_cache()
        empty = torch.zeros((len(keys), 0), dtype=torch.bool, device=self.valid.device)
        positions = [torch.arange(len(t), device=self.valid.device) for t in tokens]
        out, plan = ragged.forward(self.target.model, tokens, positions, empty, cache, bool(self.hidden_layers))
        _check_cache_type(cache, self.target.name)
        ends = torch.cumsum(torch.tensor([len(t) for t in tokens]), 0)
        logits = self._logits(out.last_hidden_state[0, ends - 1])
        self._splice(cache, plan.new_valid)
        result = {}
        for r, (key, t) in enumerate(zip(keys, tokens)):
            self._rows.append(_Row(key=key, length=len(t), last_added=0))
            start = int(ends[r]) - len(t)
            hidden = (tuple(out.hidden_states[i][0, start:int(ends[r])] for i in self.hidden_layers)
                      if self.hidden_layers else None)
            result[key] = (logits[r], hidden)
        return result

    def _splice(self, cache: DynamicCache, row_valid: torch.Tensor | int) -> None:
        """Left-pad the new rows or the batch to a common T, then concatenate along the batch.

        `row_valid` is the new rows' (n, T') validity, or a prompt length for one fully valid row."""
        if isinstance(row_valid, int):
            row_valid = torch.ones((1, row_valid), dtype=torch.bool, device=self.valid.device)
        prompt_len = row_valid.shape[1]
        if self.cache is None:
            self.cache, self.valid = cache, row_valid
            return
        width = max(self.columns, prompt_len)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        self.valid = torch.cat([_left_pad(self.valid, width), _left_pad(row_valid, width)])

    @torch.inference_mode()
    def remove(self, key: Hashable) -> None:
        """Retire a request: drop its row; compact only if that leaves more than `compact_at` of the
        columns reclaimable (it may have held the only long row). Dropping a row copies the cache once;
        compacting too after every retirement copied it twice (at 32 rows about a tenth of a step)."""
        index = self._index(key)
        del self._rows[index]
        if not self._rows:
            self.cache, self.valid = None, self.valid[:0, :0]
            return
        keep = torch.tensor([i for i in range(self.valid.shape[0]) if i != index], device=self.valid.device)
        self.cache.batch_select_indices(keep)
        self.valid = self.valid[keep]
        if self.stats.reclaimable > self.compact_at * self.columns:
            self.compact()

    # ----------------------------------------------------------------------------------------------
    # Stepping and rollback

    @torch.inference_mode()
    def step(self, inputs: dict[Hashable, Sequence[int]]) -> dict[Hashable, tuple[torch.Tensor, Hidden]]:
        """One batched forward over every active request's new tokens (>= 1 each, ragged).

        Returns key -> (logits (w_r, V) float32 for that row's new tokens, tuple of (w_r, H) hidden
        states for the selected layers, or None).
        """
        tokens = self._check_step_inputs(inputs)
        if self.stats.reclaimable > self.compact_at * self.columns:
            self.compact()
        widths = [len(t) for t in tokens]
        if self.packed:
            positions = [row.length + torch.arange(w, device=self.valid.device) for row, w in zip(self._rows, widths)]
            out, plan = ragged.forward(self.target.model, tokens, positions, self.valid, self.cache,
                                       bool(self.hidden_layers))
            hidden_states, new_valid = out.last_hidden_state[0], plan.new_valid
        else:
            ids, new_valid, positions = self._pad_step(tokens)
            out = self.target.model.get_decoder()(input_ids=ids, attention_mask=torch.cat([self.valid, new_valid], 1),
                                                  position_ids=positions, past_key_values=self.cache, use_cache=True,
                                                  output_hidden_states=bool(self.hidden_layers))
            hidden_states = out.last_hidden_state[new_valid]
        logits = self._logits(hidden_states)  # (sum of widths, V): no pad position
        self.valid = torch.cat([self.valid, new_valid], dim=1)
        for row, w in zip(self._rows, widths):
            row.length += w
            row.last_added = w
        self._steps += 1
        self._computed += self.computed_tokens(widths)
        self._real += sum(widths)
        starts = [0]
        for w in widths:
            starts.append(starts[-1] + w)
        return {row.key: (logits[starts[r]:starts[r + 1]], self._row_hidden(out.hidden_states, r, starts[r], w))
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

    def _pad_step(self, tokens: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, validity, positions), each (R, W): right-padded with the pad id; pads masked out.

        A pad's position continues its row's count: it only feeds RoPE of a query nobody reads and of
        a key nobody attends to, and staying in range keeps it a valid index."""
        width = max(len(t) for t in tokens)
        device = self.valid.device
        ids = torch.full((len(tokens), width), self.target.pad_token_id, dtype=torch.long, device=device)
        for r, t in enumerate(tokens):
            ids[r, : len(t)] = t
        steps = torch.arange(width, device=device)
        widths = torch.tensor([len(t) for t in tokens], device=device)
        lengths = torch.tensor([row.length for row in self._rows], device=device)
        return ids, steps[None, :] < widths[:, None], lengths[:, None] + steps[None, :]

    def _row_hidden(self, hidden_states, r: int, start: int, w: int) -> Hidden:
        """Row r's hidden states: its first w cells padded, tokens start..start+w of the packed sequence."""
        if not self.hidden_layers:
            return None
        if self.packed:
            return tuple(hidden_states[i][0, start:start + w] for i in self.hidden_layers)
        return tuple(hidden_states[i][r, :w] for i in self.hidden_layers)

    @torch.inference_mode()
    def rollback(self, key: Hashable, n_drop: int) -> None:
        """The last n_drop tokens this row added in the last step stop counting (they become holes)."""
        r = self._index(key)
        row = self._rows[r]
        if not isinstance(n_drop, int) or not 0 <= n_drop <= row.last_added:
            raise LabkitError(
                f"Cannot roll back {n_drop!r} tokens of request {key!r}: only the {row.last_added} token(s) "
                "it added in the last step (and not yet rolled back) can be dropped; pass 0 to that many.")
        if n_drop == 0:
            return
        live = self.valid[r].nonzero().squeeze(1)
        self.valid[r, live[-n_drop:]] = False
        row.length -= n_drop
        row.last_added -= n_drop

    # ----------------------------------------------------------------------------------------------
    # Compaction

    @torch.inference_mode()
    def compact(self) -> None:
        """Gather each row's live columns, in order, right-aligned into max(length) columns.

        Attention sums over live columns only, so later logits are unchanged (to fp32 rounding)."""
        if self.cache is None:
            return
        width = max(row.length for row in self._rows)
        counts = self.valid.sum(dim=1)
        new_valid = torch.arange(width, device=self.valid.device)[None, :] >= (width - counts)[:, None]
        if width == self.columns and torch.equal(new_valid, self.valid):
            return  # already compact
        # a stable sort puts each row's dead columns first and its live ones after, in their order;
        # the last `width` of them are the row's live columns behind some dead ones (masked).
        order = torch.argsort(self.valid.to(torch.int8), dim=1, stable=True)[:, self.columns - width:]
        for layer in self.cache.layers:
            layer.keys = _gather_columns(layer.keys, order)
            layer.values = _gather_columns(layer.values, order)
        self.valid = new_valid
        self._compactions += 1

    def replicate(self, rows: int) -> None:
        """Copy the one active row into `rows` rows keyed 0..rows-1 (the profiler's batches: content
        does not change the cost of a forward)."""
        if len(self._rows) != 1 or rows < 1:
            raise LabkitError(f"replicate needs exactly one active row and rows >= 1, got {len(self._rows)} "
                              f"row(s) and rows={rows}.")
        if rows > 1:
            self.cache.batch_repeat_interleave(rows)
            self.valid = self.valid.repeat(rows, 1)
            self._rows += [_Row(key=i, length=self._rows[0].length, last_added=0) for i in range(1, rows)]

    def drop_last_columns(self, n: int) -> None:
        """Undo the last step's columns for every row alike (the profiler's replays; no rollback)."""
        self.cache.crop(-n)
        for row in self._rows:
            row.length -= int(self.valid[self._index(row.key), -n:].sum())
            row.last_added = 0
        self.valid = self.valid[:, :-n]

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
        return torch.tensor(values, dtype=torch.long, device=self.valid.device)

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
    """Only plain full-attention DynamicLayers are (B, H, T, D) tensors that can be padded and gathered
    freely; sliding windows, linear attention, indexers, quantisation or offloading keep more state."""
    layers = getattr(cache, "layers", None)
    odd = [type(layer).__name__ for layer in layers or [] if type(layer) is not DynamicLayer]
    if type(cache) is not DynamicCache or layers is None or odd or getattr(cache, "offloading", False):
        raise LabkitError(
            f"BatchKV handles a plain DynamicCache of full-attention layers; the target {name} uses "
            f"{type(cache).__name__} with {sorted(set(odd)) or 'offloading'}: serve it one request at a "
            "time (labkit.decode.loop) or pick a full-attention target such as the default.")
    if any(layer.is_initialized and layer.keys.dim() != 4 for layer in layers):
        raise LabkitError(f"The cache of {name} does not hold (B, H, T, D) tensors: serve it one request at a time.")


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """Pad dimension 2 of a (B, H, T, D) cache tensor, or dimension 1 of a (B, T) mask, on the left
    with zeros (masked everywhere, so the value only has to be finite)."""
    dim = 2 if x.dim() == 4 else 1
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _gather_columns(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x (R, H, T, D) -> (R, H, T', D): row r takes columns order[r] (R, T')."""
    r, h, _, d = x.shape
    return x.gather(2, order[:, None, :, None].expand(r, h, order.shape[1], d))


# --------------------------------------------------------------------------------------------------
# Profiling


