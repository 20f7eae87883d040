"""labkit.core.sampling's top-k and the batched sampler `sample_logits` (exact, plus one chi-square test)."""

from __future__ import annotations

import pytest
import torch

from labkit.core.errors import LabkitError
from labkit.core.sampling import SamplingParams, logits_to_probs, sample_logits, top_k_filter


@pytest.mark.parametrize("top_k", [-1, 1.5, True, "3"])
def test_top_k_must_be_a_whole_number_at_least_zero(top_k):
    with pytest.raises(LabkitError, match="top-k"):
        SamplingParams(1.0, 1.0, top_k)


def test_top_k_keeps_the_k_most_likely_and_renormalises():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.7, 0.05, 0.15, 0.1]])
    out = top_k_filter(probs, 2)
    torch.testing.assert_close(out, torch.tensor([[0.0, 4 / 7, 0.0, 3 / 7], [0.7 / 0.85, 0.0, 0.15 / 0.85, 0.0]]))


def test_logits_to_probs_applies_temperature_then_top_k_then_top_p():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.1]])
    # top-k 3 -> 0.5/0.9, 0.25/0.9, 0.15/0.9 = 0.556, 0.278, 0.167; top-p 0.8 keeps the first two
    out = logits_to_probs(probs.log(), SamplingParams(1.0, 0.8, 3))
    torch.testing.assert_close(out, torch.tensor([[2 / 3, 1 / 3, 0.0, 0.0]]))
    assert torch.equal(logits_to_probs(probs.log(), SamplingParams(1.0, 1.0, 0)), logits_to_probs(
        probs.log(), SamplingParams(1.0, 1.0, 4)))  # 0 = off, and k >= V changes nothing


def test_sample_logits_greedy_is_the_argmax_row_by_row():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    assert sample_logits(logits, SamplingParams()).tolist() == [1, 0]


def test_sample_logits_never_draws_outside_top_k_or_the_nucleus():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 3
    params = SamplingParams(0.8, 0.7, 5)
    allowed = logits_to_probs(logits, params) > 0
    for seed in range(20):
        draws = sample_logits(logits, params, torch.Generator().manual_seed(seed))
        assert allowed.gather(1, draws.view(-1, 1)).all()


def test_sample_logits_matches_logits_to_probs_in_distribution(chi2_gof):
    """alpha 0.001, 20000 draws over one row, seed 0: the top-k fast path draws from logits_to_probs."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.7, 0.3, 0.0, -1.0, -2.0]])
    params = SamplingParams(0.9, 0.95, 5)
    rows = logits.expand(20000, -1)
    draws = sample_logits(rows, params, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=8).tolist()
    assert not chi2_gof(counts, logits_to_probs(logits, params)[0].tolist()).rejects(0.001)
