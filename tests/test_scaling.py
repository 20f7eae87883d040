"""tau against training data: the log2 line, its gain per doubling and its inverse, on hand-made curves."""

import json
import math

import pytest

from labkit.lab import plots
from labkit.core.scaling import fit_data_curve, gains_per_doubling, read_curve


def test_fit_recovers_an_exact_log2_line():
    tokens = [1e5, 2e5, 8e5, 3.2e6]
    taus = [1.1 + 0.2 * math.log2(t / 1e5) for t in tokens]
    fit = fit_data_curve(tokens, taus)
    assert fit.per_doubling == pytest.approx(0.2)
    assert fit.tau_at(1e5) == pytest.approx(1.1)
    assert fit.tau_at(6.4e6) == pytest.approx(1.1 + 0.2 * 6)
    assert (fit.min_tokens, fit.max_tokens) == (1e5, 3.2e6)


def test_tokens_for_inverts_tau_at():
    fit = fit_data_curve([1e5, 4e5, 1e6], [1.2, 1.5, 1.65])
    for tau in (1.3, 2.0, 2.5):
        assert fit.tau_at(fit.tokens_for(tau)) == pytest.approx(tau)


def test_a_flat_or_falling_curve_never_reaches_a_higher_tau():
    assert fit_data_curve([1e5, 2e5], [1.5, 1.5]).tokens_for(1.6) == math.inf
    assert fit_data_curve([1e5, 2e5], [1.5, 1.4]).tokens_for(1.6) == math.inf


def test_gains_per_doubling_between_consecutive_sizes_in_any_order():
    gains = gains_per_doubling([4e5, 1e5, 2e5], [1.6, 1.2, 1.3])
    assert gains == pytest.approx([0.1, 0.3])


@pytest.mark.parametrize("tokens, taus, match", [
    ([1e5], [1.2], "two different"),
    ([1e5, 1e5], [1.2, 1.3], "two different"),
    ([0, 1e5], [1.2, 1.3], "positive"),
    ([1e5, 2e5], [1.2], "one tau per"),
])
def test_bad_curves_are_refused_with_the_fix(tokens, taus, match):
    with pytest.raises(ValueError, match=match):
        fit_data_curve(tokens, taus)


def test_gains_refuse_repeated_sizes():
    with pytest.raises(ValueError, match="average repeated runs"):
        gains_per_doubling([1e5, 1e5, 2e5], [1.2, 1.3, 1.4])


def test_figure_draws_every_curve_key_and_labels_an_extrapolated_fit():
    rows = [{"train_response_tokens": t, "tf_tau_greedy": g, "tf_tau_t1": s}
            for t, g, s in [(2e5, 1.3, 1.25), (1e5, 1.2, 1.15), (4e5, 1.45, 1.4)]]
    fit = fit_data_curve([r["train_response_tokens"] for r in rows], [r["tf_tau_greedy"] for r in rows])
    fig = plots.data_curve_figure({"curve": rows}, fit=fit, upto=3.2e6)
    greedy = fig.data[0]
    assert list(greedy.x) == [1e5, 2e5, 4e5] and list(greedy.y) == [1.2, 1.3, 1.45]  # sorted by tokens
    assert len(fig.data) == 3 and "extrapolated" in fig.data[-1].name
    assert fig.data[-1].x[-1] == pytest.approx(3.2e6)
    assert fig.layout.xaxis.type == "log"


def test_read_curve_merges_the_parts_of_one_curve_by_tokens(tmp_path):
    (tmp_path / "curve-a.json").write_text(json.dumps([{"train_response_tokens": 4e5, "tf_tau_greedy": 1.5},
                                                       {"train_response_tokens": 1e5, "tf_tau_greedy": 1.2}]))
    (tmp_path / "curve-b.json").write_text(json.dumps([{"train_response_tokens": 2e5, "tf_tau_greedy": 1.3}]))
    (tmp_path / "other.json").write_text(json.dumps([{"train_response_tokens": 9e9, "tf_tau_greedy": 9.0}]))
    rows = read_curve(tmp_path, "curve-*.json")
    assert [r["train_response_tokens"] for r in rows] == [1e5, 2e5, 4e5]
    assert read_curve(tmp_path, "missing-*.json") == []
