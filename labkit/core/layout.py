"""What a ragged verify step's attention costs, in query columns: the layout term of a step's price.

The batched engine's verify forward is packed (`labkit.model.ragged`): the token-wise layers run over
the N = sum_r w_r real tokens, so they cost by N, the paper's B. Attention cannot be packed on this
CPU: SDPA runs a rectangle of queries, R rows x the widest row's W query columns, each over its row's
cache; rows wider than a split s run their extra columns in a second call over a copy of their own
keys and values (`split_width`). So a step where one request verifies three drafts and the others one
makes every row pay three query columns, and a step where half the requests verify their first draft
costs as much attention as one where all do. A cost table profiled on uniform shapes (R rows of W
tokens, where the rectangle is exactly the N tokens) cannot see this.

`layout_tokens` prices it in the table's own unit: B_eff = N + weight x (attention columns - N), where
`weight` is what one attention query column costs against one token of the forward (its token-wise
layers and its own column together). Uniform shapes get B_eff = N, the table's B, so the table's
price is unchanged there. All costs are in units of one query column over one row; the constants were
measured on the 2-core CPU (SmolLM2-135M, 32 rows of 300 tokens, per layer: a query column over a row
about 9 us, copying a row's keys and values about 75 us, an SDPA call about 140 us; docs/facts.md,
"The batched KV cache").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

#: copying one row's keys and values for the second pass, and a second attention call at all, in
#: query columns over one row
GATHER_COST, PASS_COST = 8, 16

#: cache tokens at which one attention query column costs as much as one token of the verify forward:
#: on the 2-core CPU a column over a 300-token row cost about 0.27 ms (30 layers) against about 1.37 ms
#: a verified token at 32 requests (data/serving/cpu-measurements-2026-12-06.md, sweep14), so the
#: weight is about 0.2 at 300 cached tokens and grows with the cache
ATTENTION_PARITY_TOKENS = 1500


def _cost(widths: Sequence[int], s: int) -> int:
    rows, width = len(widths), max(widths)
    if s >= width:
        return rows * width
    return rows * s + PASS_COST + sum(width - s + GATHER_COST for w in widths if w > s)


def split_width(widths: Sequence[int]) -> int:
    """Query columns every row runs in the main attention pass; the rows wider than that run the rest
    in a second pass over a copy of their own keys and values.

    Attention runs a rectangle of queries, so one row verifying 8 tokens beside 31 rows verifying 1
    would make all 32 rows run 8 query columns. Two passes cost R s + PASS_COST + the sum over wide
    rows of (W - s + GATHER_COST); this is the s that minimises it (s = W: one pass)."""
    width = max(widths)
    # ties: one pass first, then the narrowest main pass (the rule the forward always used)
    return min(range(1, width + 1), key=lambda s: (_cost(widths, s), s != width, s))


def attention_columns(widths: Sequence[int]) -> int:
    """The attention cost of a step whose rows verify `widths` tokens, in query columns over one row,
    at the split `split_width` chooses; equal to sum(widths) where all widths are equal."""
    if not widths:
        return 0
    return _cost(widths, split_width(widths))


def attention_weight(cache_tokens: float) -> float:
    """One query column's cost in tokens of the forward, over rows of `cache_tokens` cached tokens."""
    return max(0.0, float(cache_tokens)) / ATTENTION_PARITY_TOKENS


def layout_tokens(lengths: Sequence[int], weight: float,
                  count: Callable[[list[int]], float] | None = None) -> float:
    """B_eff = B + weight x (attention columns - B) for verification lengths `lengths` (row widths
    1 + l_r); B = `count(lengths)` (default the packed count sum_r (1 + l_r)). Never below B."""
    widths = [1 + int(l) for l in lengths]
    n = sum(widths)
    b = n if count is None else count(list(lengths))
    return b + weight * max(0, attention_columns(widths) - n)
