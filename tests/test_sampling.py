"""labkit.core.sampling: probabilities, top-p, the residual and chain verification, on hand-built cases.

Everything here is exact (no statistics) except where a docstring says otherwise; the distribution
tests of verification live in test_lossless_toy.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit.core.errors import LabkitError
from labkit.core.stats import chi_square_test
from labkit.core.sampling import SamplingParams, logits_to_probs, residual, sample, top_p_filter, verify_chain, verify_greedy


def rows(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# SamplingParams


@pytest.mark.parametrize("temperature", [-1e-6, -1.0, float("nan"), float("-inf")])
def test_sampling_params_rejects_negative_or_nan_temperature(temperature):
    with pytest.raises(LabkitError, match="temperature"):
        SamplingParams(temperature=temperature)


@pytest.mark.parametrize("top_p", [0.0, -0.1, 1.0000001, 2.0, float("nan")])
def test_sampling_params_rejects_top_p_outside_zero_one(top_p):
    with pytest.raises(LabkitError, match="top-p"):
        SamplingParams(temperature=1.0, top_p=top_p)


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.7, 0.9), (1.0, 1.0), (1.5, 1e-6)])
def test_sampling_params_accepts_valid_values(temperature, top_p):
    params = SamplingParams(temperature, top_p)
    assert params.greedy == (temperature == 0.0)


# --------------------------------------------------------------------------------------------------
# logits_to_probs and top-p


def test_logits_to_probs_greedy_is_one_hot_of_argmax():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    probs = logits_to_probs(logits, SamplingParams(0.0))
    assert torch.equal(probs.sum(-1), torch.ones(5))
    assert torch.equal(probs.argmax(-1), logits.argmax(-1))
    assert set(probs.unique().tolist()) == {0.0, 1.0}


def test_logits_to_probs_greedy_ignores_top_p():
    logits = rows([0.0, 3.0, 1.0])
    assert torch.equal(logits_to_probs(logits, SamplingParams(0.0, 0.1)), rows([0.0, 1.0, 0.0]))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_logits_to_probs_divides_logits_by_temperature(temperature):
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))
    expected = torch.softmax(logits / temperature, -1)
    torch.testing.assert_close(logits_to_probs(logits, SamplingParams(temperature)), expected)


@pytest.mark.parametrize("top_p,expected", [
    # sorted: 0.5, 0.25, 0.1875, 0.0625; mass strictly before each: 0, 0.5, 0.75, 0.9375
    (0.3, [0.0, 1.0, 0.0, 0.0]),  # {0.5} already reaches 0.3
    (0.5, [0.0, 1.0, 0.0, 0.0]),  # {0.5} reaches exactly 0.5: the next token is not needed
    (0.6, [0.0, 2 / 3, 1 / 3, 0.0]),  # {0.5, 0.25}, renormalised by 0.75
    (0.75, [0.0, 2 / 3, 1 / 3, 0.0]),
    (0.8, [0.0, 0.5 / 0.9375, 0.25 / 0.9375, 0.1875 / 0.9375]),
    (1.0, [0.0625, 0.5, 0.25, 0.1875]),  # off: everything kept
])
def test_top_p_keeps_smallest_nucleus_and_renormalises(top_p, expected):
    probs = rows([0.0625, 0.5, 0.25, 0.1875])  # dyadic: the cumulative sums are exact in fp32
    torch.testing.assert_close(top_p_filter(probs, top_p), rows(expected))


def test_logits_to_probs_applies_top_p_after_temperature():
    probs = rows([0.0625, 0.5, 0.25, 0.1875])
    out = logits_to_probs(probs.log(), SamplingParams(1.0, 0.6))
    torch.testing.assert_close(out, rows([0.0, 2 / 3, 1 / 3, 0.0]))


def test_top_p_filters_each_row_on_its_own():
    probs = rows([0.5, 0.25, 0.25], [0.125, 0.125, 0.75])
    torch.testing.assert_close(top_p_filter(probs, 0.5), rows([1.0, 0.0, 0.0], [0.0, 0.0, 1.0]))


@settings(max_examples=200, deadline=None)
@given(weights=st.lists(st.floats(0.0, 1.0, allow_subnormal=False), min_size=1, max_size=24)
       .filter(lambda w: sum(w) > 1e-3),
       top_p=st.floats(1e-4, 1.0))
def test_top_p_property_sums_to_one_and_keeps_a_top_token(weights, top_p):
    """For any distribution and any top_p: a distribution comes out, a most likely token keeps mass,
    the kept set's original mass reaches top_p, and dropping its least likely member would not."""
    probs = torch.tensor(weights, dtype=torch.float32)
    probs = probs / probs.sum()
    out = top_p_filter(probs, top_p)
    assert torch.isfinite(out).all() and (out >= 0).all()
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert out[probs == probs.max()].sum() > 0  # the top token (one of them, if tied) survives
    kept = (out > 0) & (probs > 0)
    kept_mass = probs[kept].sum().item()
    assert kept_mass >= top_p - 1e-5
    assert kept_mass - probs[kept].min().item() < top_p + 1e-5  # smallest such set
    torch.testing.assert_close(out[kept], probs[kept] / kept_mass, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# residual


def test_residual_is_normalised_positive_part_of_difference():
    p_t = rows([0.5, 0.3, 0.2, 0.0])
    p_d = rows([0.2, 0.5, 0.1, 0.2])
    # max(0, p_t - p_d) = [0.3, 0, 0.1, 0] -> / 0.4
    torch.testing.assert_close(residual(p_t, p_d), rows([0.75, 0.0, 0.25, 0.0]))


def test_residual_works_row_by_row():
    p_t = rows([0.5, 0.5, 0.0], [0.0, 0.0, 1.0])
    p_d = rows([1.0, 0.0, 0.0], [0.5, 0.5, 0.0])
    torch.testing.assert_close(residual(p_t, p_d), rows([0.0, 1.0, 0.0], [0.0, 0.0, 1.0]))


def test_residual_of_equal_distributions_falls_back_to_target():
    p = rows([0.25, 0.75])
    torch.testing.assert_close(residual(p, p.clone()), p)


# --------------------------------------------------------------------------------------------------
# verify_chain on hand-built cases whose outcome does not depend on the random draws


SEEDS = range(20)


@pytest.mark.parametrize("seed", SEEDS)
def test_verify_chain_all_accepted_then_bonus_from_last_target_row(seed):
    """p_t(x_i) >= p_d(x_i) at every position: every draft is accepted and the bonus comes from p_t[k]."""
    draft = torch.tensor([1, 3, 0])
    p_d = rows([0.1, 0.5, 0.4, 0.0], [0.3, 0.3, 0.0, 0.4], [0.6, 0.2, 0.1, 0.1])
    p_t = rows([0.0, 0.5, 0.5, 0.0],  # 0.5 / 0.5 = 1
               [0.0, 0.0, 0.1, 0.9],  # 0.9 / 0.4 > 1
               [1.0, 0.0, 0.0, 0.0],
               [0.0, 0.0, 1.0, 0.0])  # bonus row: token 2 for sure
    verdict = verify_chain(draft, p_d, p_t, torch.Generator().manual_seed(seed))
    assert (verdict.n_accepted, verdict.next_token) == (3, 2)


@pytest.mark.parametrize("seed", SEEDS)
def test_verify_chain_rejects_at_once_where_target_gives_zero_and_resamples_residual(seed):
    """p_t(x_1) = 0: the first draft is rejected whatever u is, and the next token comes from
    norm(max(0, p_t - p_d)) at position 0, which here is one-hot on token 2 (not from p_t, where
    token 1 would also be possible)."""
    draft = torch.tensor([0, 1])
    p_d = rows([0.5, 0.5, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0])
    p_t = rows([0.0, 0.5, 0.5, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0])
    verdict = verify_chain(draft, p_d, p_t, torch.Generator().manual_seed(seed))
    assert (verdict.n_accepted, verdict.next_token) == (0, 2)


@pytest.mark.parametrize("seed", SEEDS)
def test_verify_chain_keeps_prefix_before_first_rejection(seed):
    """A 10-token vocabulary, 4 drafts: accepted, accepted, impossible under p_t, (never looked at).
    Exactly 2 are accepted and the token after them is the residual's only token, 7."""
    v = 10
    draft = torch.tensor([4, 9, 2, 5])
    p_d = torch.full((4, v), 0.1)
    p_t = torch.zeros(5, v)
    p_t[0, 4] = 1.0  # ratio 10
    p_t[1, [9, 3]] = 0.5  # ratio 5
    p_t[2, 7] = 1.0  # p_t(2) = 0 -> rejected; residual = one-hot 7
    p_t[3, 5] = 1.0
    p_t[4, 0] = 1.0
    verdict = verify_chain(draft, p_d, p_t, torch.Generator().manual_seed(seed))
    assert (verdict.n_accepted, verdict.next_token) == (2, 7)


def test_verify_chain_with_no_draft_samples_the_target():
    p_t = rows([0.0, 0.0, 1.0])
    verdict = verify_chain(torch.empty(0, dtype=torch.long), torch.empty(0, 3), p_t, torch.Generator())
    assert (verdict.n_accepted, verdict.next_token) == (0, 2)


@pytest.mark.parametrize("seed", range(10))
def test_verify_chain_greedy_reduces_to_argmax_matching(seed):
    """Temperature 0: p_t and p_d are one-hot, so verification accepts exactly the drafts that equal
    the target's argmax, up to the first mismatch, then emits the target's argmax there."""
    gen = torch.Generator().manual_seed(seed)
    k, v = 5, 13
    greedy = SamplingParams(0.0)
    p_t = logits_to_probs(torch.randn(k + 1, v, generator=gen), greedy)
    target_tokens = p_t.argmax(-1)
    mismatch_at = seed % (k + 1)  # k + 1 means: no mismatch
    draft = target_tokens[:k].clone()
    if mismatch_at < k:
        draft[mismatch_at] = (draft[mismatch_at] + 1 + seed) % v
    p_d = logits_to_probs(torch.nn.functional.one_hot(draft, v).float(), greedy)
    verdict = verify_chain(draft, p_d, p_t, gen)
    n = mismatch_at if mismatch_at < k else k
    assert verdict.n_accepted == n
    assert verdict.next_token == int(target_tokens[n])


# --------------------------------------------------------------------------------------------------
# sample


def test_sample_never_draws_zero_probability_tokens():
    probs = rows([0.0, 0.5, 0.0, 0.5]).expand(2000, 4)
    draws = sample(probs, torch.Generator().manual_seed(0))
    assert draws.shape == (2000,)
    assert set(draws.unique().tolist()) == {1, 3}


def test_sample_draws_each_row_from_its_own_distribution_and_a_wrong_one_is_rejected():
    """Inverse-CDF draws pass Pearson's test (at least 7 degrees of freedom) against their own rows, a
    49,152-token row included, and the same draws fail against a shifted distribution."""
    gen = torch.Generator().manual_seed(3)
    small = torch.softmax(torch.randn(8, generator=gen), -1)
    big = torch.softmax(3 * torch.randn(49_152, generator=gen), -1)
    for probs in (small, big):
        draws = sample(probs.expand(6000, -1), torch.Generator().manual_seed(1))
        fit = chi_square_test(torch.bincount(draws, minlength=probs.numel()), probs)
        assert fit.dof >= 7 and fit.p_value > 1e-3
    wrong = torch.roll(small, 1)
    draws = sample(small.expand(6000, -1), torch.Generator().manual_seed(1))
    assert chi_square_test(torch.bincount(draws, minlength=8), wrong).p_value < 1e-6


def test_sample_reads_unnormalised_rows_and_is_reproducible_from_its_generator():
    probs = torch.tensor([[2.0, 0.0, 6.0], [0.0, 0.0, 1.0]])
    first = sample(probs.repeat(500, 1), torch.Generator().manual_seed(7))
    again = sample(probs.repeat(500, 1), torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    assert set(first[1::2].tolist()) == {2} and 1 not in first[0::2].tolist()
    share = float((first[0::2] == 2).float().mean())
    assert abs(share - 0.75) < 0.06  # 500 draws: 4 standard deviations of 0.019


@pytest.mark.parametrize("row", [[0.5, -0.1, 0.6], [0.5, float("nan"), 0.5], [0.0, 0.0, 0.0],
                                 [float("inf"), 0.0, 1.0]])
def test_sample_refuses_a_row_it_cannot_draw_from(row):
    with pytest.raises(LabkitError, match="cannot sample"):
        sample(torch.tensor(row), torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------------------------------
# the test suite's own chi-square survival function (tests/conftest.py)


@pytest.mark.parametrize("x,df,expected", [
    (3.841458820694124, 1, 0.05),
    (6.634896601021214, 1, 0.01),
    (11.070497693516351, 5, 0.05),
    (18.307038053275146, 10, 0.05),
    (20.515005652432873, 5, 0.001),
    (149.4492507, 100, 0.001),
    (0.5, 7, 0.9994464810),
])
def test_chi2_survival_matches_known_quantiles(chi2_survival, x, df, expected):
    assert chi2_survival(x, df) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("x", [0.0, 0.3, 2.0, 9.0, 40.0])
def test_chi2_survival_with_two_degrees_is_exp(chi2_survival, x):
    assert chi2_survival(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-10, abs=1e-300)


def test_chi2_gof_pools_small_cells_and_flags_impossible_draws(chi2_gof):
    fit = chi2_gof([50, 30, 15, 3, 2], [0.5, 0.3, 0.15, 0.03, 0.02])
    assert fit.statistic == pytest.approx(0.0) and fit.p_value == pytest.approx(1.0)
    assert fit.n_cells == 4  # the 3.0 and 2.0 expected cells pool into one of 5.0
    assert chi2_gof([99, 1], [1.0, 0.0]).p_value == 0.0


def test_the_chi_square_helper_refuses_a_test_that_can_reject_nothing(chi2_gof):
    """Four draws over two cells pool into one (expected counts 3 and 1 < 5): no degrees of freedom
    are left, so the helper refuses instead of passing with p = 1; with enough draws it tests."""
    with pytest.raises(ValueError, match="0 degrees of freedom"):
        chi2_gof([3, 1], [0.75, 0.25])
    result = chi2_gof([60, 40], [0.5, 0.5])
    assert result.df == 1 and result.p_value < 0.05


@settings(max_examples=60, deadline=None)
@given(k=st.integers(0, 6), vocab=st.integers(2, 9), seed=st.integers(0, 10_000))
def test_verify_greedy_is_verify_chain_at_temperature_zero(k, vocab, seed):
    """The greedy shortcut gives the verdict of the full rule on one-hot target rows, whatever the
    drafter's probabilities were (drafts chosen to match the argmax often, so both branches occur)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(k + 1, vocab, generator=g)
    argmax = logits.argmax(-1)
    p_d = torch.softmax(torch.randn(k, vocab, generator=g), -1)
    draft = torch.where(torch.rand(k, generator=g) < 0.7, argmax[:k], torch.randint(0, vocab, (k,), generator=g))
    p_d = p_d.scatter(1, draft.view(-1, 1), 0.5)  # a drafted token always has mass under its drafter
    p_d = p_d / p_d.sum(-1, keepdim=True)
    full = verify_chain(draft, p_d, logits_to_probs(logits, SamplingParams()), torch.Generator().manual_seed(seed))
    assert verify_greedy(draft, argmax) == full


def test_verify_greedy_refuses_the_wrong_number_of_target_ids():
    with pytest.raises(LabkitError, match="3 verified positions"):
        verify_greedy(torch.tensor([1, 2]), torch.tensor([1, 2]))
