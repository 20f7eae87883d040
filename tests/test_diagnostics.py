"""Notebook measurements on a tiny target: offline acceptance, the rank curve, collisions, costs."""

from __future__ import annotations

import pytest
import torch

from labkit.decode.loop import prefill
from labkit.measure.diagnostics import (collisions, drafting_costs, head_round_share, heldout_batch, offline_acceptance,
                                       rank_curve)
from labkit.drafters.dspark import DSparkDrafter
from labkit.core.errors import LabkitError
from labkit.core.sampling import SamplingParams
from test_dflash import tiny_data  # noqa: F401  (12 sequences with cached features)
from test_dspark import VOCAB, make_dspark  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(make_tiny_target):
    return make_tiny_target(vocab_size=VOCAB, n_layers=3, hidden=32, init=0.5)


def test_offline_acceptance_is_consistent_and_truncates(tiny, tiny_data):
    model = make_dspark(tiny, gamma=4)
    batch = heldout_batch(tiny_data, 4, anchors=8)
    full = offline_acceptance(model, batch)
    assert len(full.accept_t1) == 4 and all(0 <= a <= 1 for a in full.accept_t1 + full.accept_greedy)
    assert 1 <= full.tau_t1 <= 5 and 1 <= full.tau_greedy <= 5
    short = offline_acceptance(model, batch, gamma=2)
    assert short.accept_t1 == full.accept_t1[:2] and short.tau_t1 <= full.tau_t1 + 1e-9
    with pytest.raises(LabkitError, match="gamma must lie"):
        offline_acceptance(model, batch, gamma=5)


def test_rank_curve_ends_at_the_full_model_and_starts_at_the_backbone(tiny, tiny_data):
    model = make_dspark(tiny, gamma=4, rank=4, scale=1.0)
    batch = heldout_batch(tiny_data, 4, anchors=8)
    rows = rank_curve(model, batch, [0, 2, 4])
    assert [r["rank"] for r in rows] == [0, 2, 4]
    assert rows[-1]["tau_t1"] == pytest.approx(offline_acceptance(model, batch).tau_t1, abs=1e-5)
    zero = make_dspark(tiny, gamma=4, rank=4, scale=0.0)  # same backbone, no bias
    assert rows[0]["tau_t1"] == pytest.approx(offline_acceptance(zero, batch).tau_t1, abs=1e-5)


def test_collisions_count_repairs_and_breaks_consistently(tiny, tiny_data):
    model = make_dspark(tiny, gamma=4, rank=4, scale=50.0)  # the tiny target's logits are sharp: a big bias
    batch = heldout_batch(tiny_data, 4, anchors=16)
    res = collisions(model, tiny_data, batch)
    assert res["repaired"] + res["broken"] <= res["differ"] <= res["positions"]
    assert res["differ"] > 0, "the fixture should produce disagreements to classify"
    for ex in res["examples"]:
        assert ex.sequential == ex.target != ex.parallel and ex.position >= 2
    none = collisions(make_dspark(tiny, gamma=4, rank=4, scale=0.0), tiny_data, batch)
    assert none["differ"] == 0  # a zero head never changes the top-1


def test_drafting_costs_are_positive(tiny):
    drafter = DSparkDrafter(make_dspark(tiny))
    state = prefill(tiny, [1, 2, 3], 12, SamplingParams(1.0), drafter=drafter)
    costs = drafting_costs(drafter, state.request, reps=3)
    assert all(v > 0 for v in costs.values())


def test_head_round_share_is_the_loop_over_the_whole_round():
    costs = {"backbone_s": 0.004, "sequential_head_s": 0.006, "parallel_sampling_s": 0.001}
    assert head_round_share(costs, 0.090) == pytest.approx(0.06)
    with pytest.raises(LabkitError, match="positive verify time"):
        head_round_share(costs, 0.0)
