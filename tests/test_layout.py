"""The layout term of a step's price (labkit.core.layout) and the policy that reads it, on hand-made
widths and confidences: no model."""

from __future__ import annotations

import pytest
import torch

from labkit.core.layout import attention_columns, attention_weight, layout_tokens, split_width
from labkit.core.scheduler import (Algorithm1, CostTable, LayoutAlgorithm1, ScheduleInput, first_drafts,
                                   packed_tokens, survival, walk)


def f64(rows):
    return torch.tensor(rows, dtype=torch.float64)


class Linear:
    """A step costing `fixed` + `per` seconds a token of B (SPS = 1 / that)."""

    def __init__(self, fixed: float, per: float):
        self.fixed, self.per = fixed, per

    def sps(self, b: float) -> float:
        return 1.0 / (self.fixed + self.per * b)


def test_uniform_steps_cost_their_tokens_and_ragged_steps_their_rectangle():
    """Equal widths: the rectangle is the tokens (B_eff = B, the table's own shapes). One row wider than
    31 others at width 1: a second pass (32 + 16 + 1 + 8 = 57 columns, not the 64 of one pass over 2
    columns). Half the rows at width 2: one pass over 2 columns, 64 against 48 tokens."""
    assert attention_columns([2] * 32) == 64 and attention_columns([1] * 5) == 5
    assert split_width([2] + [1] * 31) == 1 and attention_columns([2] + [1] * 31) == 57
    assert split_width([2] * 16 + [1] * 16) == 2 and attention_columns([2] * 16 + [1] * 16) == 64
    assert layout_tokens([1] * 32, 0.25) == 64 == packed_tokens([1] * 32)
    assert layout_tokens([1] * 16 + [0] * 16, 0.25) == pytest.approx(48 + 0.25 * 16)
    assert layout_tokens([1] * 16 + [0] * 16, 0.0) == 48
    assert attention_columns([]) == 0 and layout_tokens([], 1.0) == 0


def test_the_attention_weight_grows_with_the_cache():
    assert attention_weight(0) == 0.0 and attention_weight(300) == pytest.approx(0.2)
    assert attention_weight(600) == pytest.approx(2 * attention_weight(300))


def test_adding_a_token_never_lowers_the_layout_price():
    """B_eff is non-decreasing as any row's length grows (the walk's prices stay monotone)."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        lengths = torch.randint(0, 5, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen).tolist()
        r = int(torch.randint(0, len(lengths), (1,), generator=gen))
        longer = list(lengths)
        longer[r] += 1
        assert layout_tokens(longer, 0.3) >= layout_tokens(lengths, 0.3)


def test_the_first_draft_search_passes_the_jump_the_break_stops_at():
    """32 requests, first-draft confidences 0.5, a price where the first draft verified costs a jump
    (weight 1: a second attention pass) and the rest of the rectangle is then paid: Algorithm 1's break
    stops at the jump and verifies nothing; the search verifies every first draft, and the theta it
    reaches is above both ends of the walk the break saw."""
    conf = f64([[0.5, 0.1]] * 32)
    inp = ScheduleInput(conf, Linear(1.0, 0.01), attention_weight=1.0)
    assert Algorithm1()(ScheduleInput(conf, inp.table, batch_tokens=lambda l: layout_tokens(l, 1.0))) == [0] * 32
    assert LayoutAlgorithm1()(inp)[:32] == [1] * 32
    a = survival(conf, [2] * 32)
    chosen, tau = first_drafts(a, inp.table, lambda l: layout_tokens(l, 1.0))
    assert chosen == [1] * 32 and tau == pytest.approx(16.0)


def test_the_search_keeps_the_best_count_and_the_walk_goes_deeper_from_there():
    """Confidences fall from request to request: the search admits the leading first drafts while they
    pay (here 2 of 3), and the deeper walk then admits request 0's second slot (survival 0.81) and stops
    at its third (0.081), as the break would."""
    conf = f64([[0.9, 0.9, 0.1], [0.8, 0.5, 0.5], [0.05, 0.9, 0.9]])
    table = Linear(1.0, 0.2)
    inp = ScheduleInput(conf, table)
    lengths = LayoutAlgorithm1()(inp)
    assert lengths[2] == 0 and lengths[0] == 2 and lengths[1] >= 1
    a = survival(conf, [3, 3, 3])
    chosen, _ = first_drafts(a, table, packed_tokens)
    assert chosen == [1, 1, 0]


def test_with_no_layout_term_and_one_request_it_is_algorithm1():
    for row in ([0.9, 0.8, 0.3, 0.9], [0.2, 0.9, 0.9, 0.9], [0.99, 0.99, 0.99, 0.99]):
        for per in (0.05, 0.3, 1.0):
            inp = ScheduleInput(f64([row]), Linear(1.0, per))
            assert LayoutAlgorithm1()(inp) == Algorithm1()(inp), (row, per)


def test_a_walk_from_a_start_adds_only_deeper_slots_and_counts_the_start():
    a = survival(f64([[0.9, 0.8], [0.5, 0.5]]), [2, 2])
    rest = a.clone()
    rest[:, 0] = 0.0
    w = walk(rest, CostTable.flat(), packed_tokens, start=[1, 1], start_tau=1.4)
    assert w.tau[0] == pytest.approx(3.4) and w.batch_tokens[0] == 4
    assert w.lengths(len(w.path)) == [2, 2]
    with pytest.raises(Exception, match="admitted slots"):
        walk(a, CostTable.flat(), packed_tokens, start=[1, 0])
