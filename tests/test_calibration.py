"""Fast tests of labkit.core.calibration: ECE, AUC, Brier, survival, prefix labels and STS (paper Sec. 3.2.1).

Every random fixture uses a fixed seed, so each run is deterministic; the thresholds leave room for a
fresh seed (the noise each statistic has at that sample size is given next to it).
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit.core.calibration import (STSResult, apply_temperatures, brier, ece, fit_sts, per_position_metrics,
                                prefix_labels, reliability_bins, roc_auc, survival)
from labkit.core.errors import LabkitError


def _overconfident_rounds(n_rounds: int = 6000, gamma: int = 4, seed: int = 0):
    """Synthetic verification rounds and a head whose logits are the true logits times 3 (over-confident).

    Each round r has its own true conditional acceptance probability sigmoid(true[r, k]) per position;
    a round accepts draft k only if drafts 1..k-1 were accepted (it stops at the first rejection). The
    ideal temperature is therefore 3 at every position.
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([1.5, 1.0, 0.5, 0.0])[:gamma]
    true = base + 1.5 * torch.randn(n_rounds, gamma, generator=g, dtype=torch.float64)
    ok = torch.rand(n_rounds, gamma, generator=g, dtype=torch.float64) < torch.sigmoid(true)
    accepted = torch.cumprod(ok.long(), dim=1).sum(dim=1)  # leading accepted drafts per round
    return 3.0 * true, accepted


# ---- hand-computed values ---------------------------------------------------------------------------

def test_ece_matches_hand_computation_with_three_bins():
    # n_bins=3: bins [0, 1/3), [1/3, 2/3), [2/3, 1] (1.0 joins the last bin).
    #   bin 0: p = 0.1, 0.2 -> mean 0.15, labels 0, 1 -> 0.5; |0.5 - 0.15| = 0.35, weight 2/5 -> 0.14
    #   bin 1: p = 0.5      -> mean 0.50, label 0      -> 0.0; |0.0 - 0.50| = 0.50, weight 1/5 -> 0.10
    #   bin 2: p = 0.9, 1.0 -> mean 0.95, labels 1, 1 -> 1.0; |1.0 - 0.95| = 0.05, weight 2/5 -> 0.02
    #   ECE = 0.14 + 0.10 + 0.02 = 0.26
    assert ece([0.1, 0.2, 0.5, 0.9, 1.0], [0, 1, 0, 1, 1], n_bins=3) == pytest.approx(0.26, abs=1e-12)


def test_auc_matches_hand_computation():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: pairs (0.35>0.1) 1, (0.35<0.4) 0, (0.8>0.1) 1, (0.8>0.4) 1
    #   -> 3 of 4 pairs ranked right: AUC = 0.75
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # a tie counts 1/2: positives 0.5, 0.7 vs negatives 0.5, 0.2: (0.5=0.5) 1/2, (0.5>0.2) 1, (0.7>0.5) 1,
    #   (0.7>0.2) 1 -> 3.5 / 4 = 0.875
    assert roc_auc([0.5, 0.5, 0.7, 0.2], [0, 1, 1, 0]) == pytest.approx(0.875)


def test_brier_matches_hand_computation():
    # (0.1-0)^2 + (0.4-0)^2 + (0.35-1)^2 + (0.8-1)^2 = 0.01 + 0.16 + 0.4225 + 0.04 = 0.6325; / 4 = 0.158125
    assert brier([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.158125, abs=1e-12)


# ---- AUC and ECE properties ---------------------------------------------------------------------------

def test_auc_of_all_equal_scores_is_one_half():
    assert roc_auc([0.3] * 6, [0, 1, 0, 1, 1, 0]) == pytest.approx(0.5)


def test_auc_is_none_when_only_one_class_is_present():
    assert roc_auc([0.2, 0.9, 0.5], [1, 1, 1]) is None
    assert roc_auc([0.2, 0.9, 0.5], [0, 0, 0]) is None


def test_ece_is_small_when_calibrated_and_larger_when_over_confident():
    """20,000 labels drawn as Bernoulli(p): the ECE of p is sampling noise, about 0.008 here."""
    g = torch.Generator().manual_seed(0)
    p = torch.rand(20_000, generator=g, dtype=torch.float64)
    y = (torch.rand(20_000, generator=g, dtype=torch.float64) < p).double()
    calibrated = ece(p, y)
    over = ece(torch.sigmoid(3 * torch.logit(p)), y)  # the same ranking pushed towards 0 and 1
    assert calibrated < 0.02
    assert over > calibrated + 0.05


def test_reliability_bins_count_everything_and_mean_conf_lies_in_its_bin():
    g = torch.Generator().manual_seed(1)
    p = torch.rand(500, generator=g, dtype=torch.float64)
    p[:3] = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)  # both ends and an edge
    y = (torch.rand(500, generator=g, dtype=torch.float64) < p).double()
    bins = reliability_bins(p, y, n_bins=10)
    assert sum(b["count"] for b in bins) == 500
    for b in bins:
        assert b["lo"] <= b["mean_conf"] <= b["hi"]
        assert 0.0 <= b["frac_pos"] <= 1.0
    # 1.0 goes into the last bin, not an eleventh one.
    top = reliability_bins([0.9, 1.0], [1, 1], n_bins=10)
    assert len(top) == 1 and top[0]["lo"] == pytest.approx(0.9) and top[0]["count"] == 2


# ---- survival and prefix labels -------------------------------------------------------------------

def test_survival_is_the_cumulative_product_along_positions():
    conf = torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.8, 0.5]], dtype=torch.float64)
    a = survival(conf)
    assert a.shape == (2, 3)
    assert torch.allclose(a, torch.tensor([[0.5, 0.25, 0.125], [1.0, 0.8, 0.4]], dtype=torch.float64))


def test_prefix_labels_mark_accepted_prefixes():
    y = prefix_labels([0, 2, 3], gamma=3)
    assert y.shape == (3, 3)
    assert y.tolist() == [[0, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert prefix_labels(torch.tensor([1]), gamma=2).tolist() == [[1, 0]]


def test_per_position_metrics_score_survival_against_prefix_labels():
    conf = torch.tensor([[0.9, 0.5], [0.6, 0.9], [0.3, 0.2], [0.8, 0.7]], dtype=torch.float64)
    accepted = [2, 1, 0, 2]
    m = per_position_metrics(conf, accepted, n_bins=5)
    a, y = survival(conf), prefix_labels(accepted, 2)
    for k in range(2):
        assert m["ece_by_position"][k] == pytest.approx(ece(a[:, k], y[:, k], 5))
        assert m["auc_by_position"][k] == roc_auc(a[:, k], y[:, k])
        assert m["brier_by_position"][k] == pytest.approx(brier(a[:, k], y[:, k]))
        assert m["reliability_by_position"][k] == reliability_bins(a[:, k], y[:, k], 5)
    # position 2: survivals 0.45, 0.54, 0.06, 0.56 against labels 1, 0, 0, 1 -> pairs 1, 1, 0, 1 -> 0.75
    assert m["auc_by_position"][1] == pytest.approx(0.75)


# ---- Sequential Temperature Scaling ---------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(logits=st.lists(st.floats(-8, 8), min_size=2, max_size=20),
       temperature=st.floats(0.1, 10.0))
def test_temperature_never_changes_the_ranking_within_a_position(logits, temperature):
    z = torch.tensor(logits, dtype=torch.float64)[:, None]
    c = apply_temperatures(z, [temperature])[:, 0]
    for i in range(len(logits)):
        for j in range(len(logits)):
            if logits[i] < logits[j]:
                assert c[i] <= c[j]  # <=: sigmoid may round two far-out logits to the same float


def test_sts_keeps_rankings_lowers_ece_and_raises_temperatures_of_an_over_confident_head():
    """Over-confident head (logits x 3): STS must find T > 1 everywhere and bring the mean ECE of a_k
    below 0.03 (the in-sample noise floor at 6,000 rounds is about 0.01)."""
    logits, accepted = _overconfident_rounds()
    result = fit_sts(logits, accepted)
    assert all(result.fitted)
    assert all(t > 1.0 for t in result.temperatures)
    mean_before = sum(result.ece_before) / len(result.ece_before)
    mean_after = sum(result.ece_after) / len(result.ece_after)
    assert mean_after < mean_before
    assert mean_after < 0.03
    # the reported ECEs are those of the survival products of the (un)scaled confidences
    before = per_position_metrics(torch.sigmoid(logits), accepted)["ece_by_position"]
    after = per_position_metrics(apply_temperatures(logits, result.temperatures), accepted)["ece_by_position"]
    assert result.ece_before == pytest.approx(before)
    assert result.ece_after == pytest.approx(after)
    # ranking within each position is untouched by the fitted temperatures
    scaled = apply_temperatures(logits, result.temperatures)
    for k in range(logits.shape[1]):
        assert torch.equal(torch.argsort(logits[:, k], stable=True), torch.argsort(scaled[:, k], stable=True))


def test_sts_fitted_on_some_rounds_lowers_ece_on_other_rounds():
    """Out of sample: temperatures fitted on 6,000 rounds (seed 0) of an over-confident head (logits x 3)
    lower the ECE of every position on 6,000 other rounds (seed 1) from the same source, each by at least
    half; the fitted temperatures are near the true 3. On a head that is already calibrated (logits x 1)
    the fit changes held-out ECE by no more than the noise floor (0.01): where the survival is small
    (position 4, about 0.1) the ECE is flat in T and the fitted T may be anything (9.4 here)."""
    train_logits, train_accepted = _overconfident_rounds(seed=0)
    test_logits, test_accepted = _overconfident_rounds(seed=1)
    result = fit_sts(train_logits, train_accepted)
    assert all(result.fitted) and all(2.0 < t < 4.5 for t in result.temperatures)
    before = per_position_metrics(torch.sigmoid(test_logits), test_accepted)["ece_by_position"]
    after = per_position_metrics(apply_temperatures(test_logits, result.temperatures), test_accepted)["ece_by_position"]
    assert all(a <= 0.5 * b for a, b in zip(after, before)), (before, after)
    calibrated = fit_sts(train_logits / 3.0, train_accepted)
    assert all(0.7 < t < 1.4 for t in calibrated.temperatures[:3])
    raw = per_position_metrics(torch.sigmoid(test_logits / 3.0), test_accepted)["ece_by_position"]
    fitted = per_position_metrics(apply_temperatures(test_logits / 3.0, calibrated.temperatures),
                                  test_accepted)["ece_by_position"]
    assert all(abs(f - r) <= 0.01 for f, r in zip(fitted, raw)), (raw, fitted)


def test_sts_leaves_positions_with_too_few_examples_of_a_class_unfitted():
    # gamma = 3: position 1 has 40 positives / 60 negatives; positions 2 and 3 only 10 positives each.
    g = torch.Generator().manual_seed(2)
    logits = 2.0 * torch.randn(100, 3, generator=g, dtype=torch.float64)
    accepted = [0] * 60 + [1] * 30 + [3] * 10
    result = fit_sts(logits, accepted, min_each=32)
    assert result.fitted == [True, False, False]
    assert result.temperatures[1:] == [1.0, 1.0]
    # with nothing fitted at all, every temperature stays exactly 1.0 and ECE does not move
    none = fit_sts(logits, accepted, min_each=1000)
    assert none.fitted == [False] * 3 and none.temperatures == [1.0] * 3
    assert none.ece_after == none.ece_before


def test_sts_prefers_temperature_one_on_ties():
    # All confidences sit in one ECE bin for every candidate near 1: ties go to exactly 1.0.
    logits = torch.zeros(64, 1, dtype=torch.float64)  # sigmoid(0 / T) = 0.5 for every T
    accepted = [1] * 32 + [0] * 32
    assert fit_sts(logits, accepted).temperatures == [1.0]


def test_sts_result_round_trips_through_json():
    r = STSResult(temperatures=[2.5, 1.0], fitted=[True, False], ece_before=[0.2, 0.1], ece_after=[0.01, 0.1])
    assert STSResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    with pytest.raises(LabkitError, match="lacks"):
        STSResult.from_dict({"temperatures": [1.0]})


# ---- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda: ece([], []),
    lambda: reliability_bins([], []),
    lambda: roc_auc([], []),
    lambda: brier([], []),
    lambda: survival(torch.empty(0, 3)),
    lambda: prefix_labels([], 3),
    lambda: per_position_metrics(torch.empty(0, 3), []),
    lambda: fit_sts(torch.empty(0, 3), []),
])
def test_empty_input_raises_labkit_error(call):
    with pytest.raises(LabkitError):
        call()


def test_mismatched_or_out_of_range_input_raises_labkit_error():
    with pytest.raises(LabkitError, match="one label per probability"):
        ece([0.1, 0.2], [1])
    with pytest.raises(LabkitError, match="logits"):
        brier([1.5], [1])
    with pytest.raises(LabkitError, match="0..2"):
        prefix_labels([3], gamma=2)
    with pytest.raises(LabkitError, match="one count per round"):
        per_position_metrics(torch.full((3, 2), 0.5), [1, 1])
    with pytest.raises(LabkitError, match="one per position"):
        apply_temperatures(torch.zeros(2, 3), [1.0, 2.0])


def test_threshold_sweep_matches_hand_computation():
    """Two rounds, gamma 3. Survival: round 0 (0.9, 0.45, 0.09), round 1 (0.6, 0.36, 0.288); accepted 2 and 0.
    t = 0: verify 3 + 3, accept 2 + 0. t = 0.4: verify 2 (0.9, 0.45) + 1 (0.6), accept 2 + 0.
    t = 0.95: nothing verified."""
    from labkit.core.calibration import threshold_sweep
    conf = [[0.9, 0.5, 0.2], [0.6, 0.6, 0.8]]
    rows = threshold_sweep(conf, [2, 0], [0.0, 0.4, 0.95])
    assert rows[0] == {"threshold": 0.0, "accepted_per_step": 1.0, "rejected_per_step": 2.0,
                       "verified_per_step": 3.0, "acceptance_rate": 2 / 6}
    assert rows[1]["verified_per_step"] == 1.5 and rows[1]["accepted_per_step"] == 1.0
    assert rows[1]["rejected_per_step"] == 0.5 and rows[1]["acceptance_rate"] == 2 / 3
    assert rows[2]["verified_per_step"] == 0.0 and rows[2]["acceptance_rate"] is None
    with pytest.raises(LabkitError):
        threshold_sweep(conf, [2, 0], [1.5])


def test_confidence_vs_acceptance_and_domain_split_by_hand():
    """Rounds (accepted 2, 0, 1) with conf logits 0 (c = 0.5) everywhere, gamma 2: position 1 reached by all
    three, accepted by two; position 2 reached by the two, accepted by one."""
    from labkit.pipeline.calibrate import ConfidenceRounds, by_domain, confidence_vs_acceptance
    r = ConfidenceRounds(torch.zeros(3, 2, dtype=torch.float64), torch.tensor([2, 0, 1]), ["math", "chat", "math"])
    out = confidence_vs_acceptance(r)
    assert out["reached"] == [3, 2] and out["predicted"] == [0.5, 0.5]
    assert out["observed"] == [2 / 3, 0.5]
    scaled = confidence_vs_acceptance(ConfidenceRounds(torch.ones(3, 2, dtype=torch.float64), r.accepted, r.domains),
                                      temperatures=[2.0, 0.5])
    assert scaled["predicted"] == pytest.approx([float(torch.sigmoid(torch.tensor(0.5))), float(torch.sigmoid(torch.tensor(2.0)))])
    split = by_domain(r)
    assert set(split) == {"chat", "math"} and split["math"].accepted.tolist() == [2, 1]


def test_cut_value_by_hand():
    """The fixture of the threshold-sweep test at cost 0.4: cut verifies 1.5 and accepts 1.0 a step
    (value 1.0 - 0.6 = 0.4); verifying all accepts 1.0 of 3.0 (1.0 - 1.2 = -0.2)."""
    from labkit.core.calibration import cut_value
    v = cut_value([[0.9, 0.5, 0.2], [0.6, 0.6, 0.8]], [2, 0], 0.4)
    assert v["cut"] == pytest.approx(0.4) and v["verify_all"] == pytest.approx(-0.2)


# ---- AcceptanceRatio: the engine's online correction -------------------------------------------------

def test_acceptance_ratio_counts_only_verified_and_reached_drafts():
    """Row 1 verified 3 drafts and accepted 1: draft 1 reached and accepted, draft 2 reached and
    rejected, draft 3 never reached. Row 2 verified 1 of 3 and accepted it: only draft 1 counts."""
    from labkit.core.calibration import AcceptanceRatio
    r = AcceptanceRatio(3, prior=1.0)
    r.update(torch.tensor([[0.8, 0.5, 0.5], [0.6, 0.9, 0.9]]), [3, 1], [1, 1])
    assert r.predicted == pytest.approx([1.4, 0.5, 0.0])
    assert r.accepted == [2.0, 0.0, 0.0]
    # each position's prior is the ratio before it: 1.25, then (0 + 1.25) / 1.5, then unobserved: the same
    assert r.ratios == pytest.approx([3.0 / 2.4, 1.25 / 1.5, 1.25 / 1.5])


def test_a_deep_position_without_verdicts_inherits_the_correction_learnt_before_it():
    """Only position 1 is ever verified, accepted half as often as predicted: position 1 moves to about
    0.5 and the never-verified positions 2-3 read the same ratio; a position with verdicts of its own
    (accepted as predicted) moves back toward 1 from there."""
    from labkit.core.calibration import AcceptanceRatio
    r = AcceptanceRatio(3, prior=4.0)
    for i in range(400):
        r.update(torch.tensor([[0.8, 0.8, 0.8]]), [1], [int(i % 8 < 2)])  # accepted 2 of 8: 0.25 / 0.8 = 0.31
    first = r.ratios[0]
    assert first == pytest.approx((100 + 4.0) / (320 + 4.0)) and r.ratios[1:] == pytest.approx([first, first])
    for _ in range(400):
        r.update(torch.tensor([[0.5, 0.5, 0.5]]), [2], [2])  # position 2 reached and accepted every time
    assert r.ratios[1] > 1.0 > r.ratios[0] and r.ratios[2] == pytest.approx(r.ratios[1])


def test_acceptance_ratio_recovers_a_known_miscalibration_and_starts_at_one():
    """Synthetic rounds where a draft at confidence c is accepted with probability 0.7 c: the ratios
    start at exactly 1 (no verdicts yet), move toward 0.7 with rounds (within 0.05 after 4000 rounds of
    4 drafts, seed 0), and scaled confidences stay in [0, 1]."""
    from labkit.core.calibration import AcceptanceRatio
    r, gen = AcceptanceRatio(4), torch.Generator().manual_seed(0)
    assert r.ratios == [1.0] * 4
    for _ in range(4000):
        conf = 0.3 + 0.7 * torch.rand(1, 4, generator=gen)
        accepted = 0
        while accepted < 4 and torch.rand(1, generator=gen).item() < 0.7 * conf[0, accepted].item():
            accepted += 1
        r.update(conf, [4], [accepted])
    assert all(abs(x - 0.7) < 0.05 for x in r.ratios[:2])  # later positions are reached less often
    assert all(0.5 < x < 0.9 for x in r.ratios)
    scaled = r.scale(torch.tensor([[1.0, 0.5, 0.2, 0.9, 0.9]]))
    assert scaled[0, 4] == 0.9 and ((scaled >= 0) & (scaled <= 1)).all()
    assert scaled[0, 0] == pytest.approx(r.ratios[0])


def test_acceptance_ratio_refuses_bad_settings():
    from labkit.core.calibration import AcceptanceRatio
    with pytest.raises(LabkitError, match="gamma >= 1"):
        AcceptanceRatio(0)
    with pytest.raises(LabkitError, match="prior > 0"):
        AcceptanceRatio(2, prior=0.0)
