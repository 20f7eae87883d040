"""Newcomer fixes (issue 10): dashboards shown once (live widget, or a static figure when headless),
round counts behind per-position acceptance, STS's grid-edge flag and prose written from the numbers,
and the drafted-block showcase of notebook 02 chosen by code on a tiny model."""

from __future__ import annotations

import pytest
import torch

from labkit.core.calibration import (ECEChange, STSResult, apply_temperatures, cut_value, cut_value_change,
                                    describe_cut_values, describe_ece_change, ece_change, fit_sts)
from labkit.core.evidence import Interval
from labkit.decode.loop import generate
from labkit.measure.diagnostics import DraftedBlock, block_showcase, pick_block
from labkit.drafters.dflash import DFlashConfig, DFlashDrafter
from labkit.core.errors import LabkitError
from labkit.lab import plots
from labkit.core.trace import (MIN_ROUNDS, Round, format_acceptance, format_position_acceptance, position_acceptance,
                          position_counts)
from labkit.pipeline.train import new_backbone

PLOTLY = "application/vnd.plotly.v1+json"
WIDGET = "application/vnd.jupyter.widget-view+json"


# ---- 4: one display per dashboard ----------------------------------------------------------------

def _tiny_dashboard():
    from labkit.model.timing import ForwardCost
    from labkit.lab.widgets import latency_explorer
    cost = ForwardCost(context_len=8, ks=[1, 2, 4, 8], samples_s=[[0.06], [0.1], [0.11], [0.12]])
    return latency_explorer(cost, gamma=3, tau=2.0)


def _show_captured(monkeypatch, headless_value):
    """Run dash.show() inside an IPython shell with capture_output; return (display outputs, stdout)."""
    import plotly.io as pio
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output
    if headless_value is None:
        monkeypatch.delenv("LABKIT_HEADLESS", raising=False)
    else:
        monkeypatch.setenv("LABKIT_HEADLESS", headless_value)
    monkeypatch.setattr(pio.renderers, "default", "plotly_mimetype+notebook")  # what plotly picks in a kernel
    InteractiveShell.instance()  # display() only publishes (and capture_output only catches) inside a shell
    dash = _tiny_dashboard()
    with capture_output() as cap:
        dash.show()
    return dash, [o.data for o in cap.outputs], cap.stdout


def test_dashboard_show_in_a_live_kernel_displays_the_widget_once(monkeypatch):
    dash, outputs, stdout = _show_captured(monkeypatch, None)
    assert len(outputs) == 1 and WIDGET in outputs[0]
    assert outputs[0][WIDGET]["model_id"] == dash.widget.model_id
    assert not any(PLOTLY in o for o in outputs) and stdout == ""


def test_dashboard_show_headless_displays_a_static_figure_and_the_readout(monkeypatch):
    dash, outputs, stdout = _show_captured(monkeypatch, "1")
    figures = [o[PLOTLY] for o in outputs if PLOTLY in o]
    assert len(figures) == 1 and not any(WIDGET in o for o in outputs)
    assert figures[0]["data"][2]["x"] == [2.0]  # the last update's marker (tau = 2)
    assert stdout.strip() == dash.readout_text and "<b>" not in stdout and "ms a token" in stdout


def test_headless_reads_the_environment(monkeypatch):
    from labkit.lab.widgets import headless
    for value, expected in ((None, False), ("", False), ("0", False), ("1", True), ("true", True)):
        if value is None:
            monkeypatch.delenv("LABKIT_HEADLESS", raising=False)
        else:
            monkeypatch.setenv("LABKIT_HEADLESS", value)
        assert headless() is expected


# ---- 6: round counts behind per-position acceptance ---------------------------------------------

def _rounds():
    # 12 rounds of 3 drafts: 6 accept 0, 4 accept 1, 1 accepts 2, 1 accepts 3
    return [Round(3, 0, 0, 0)] * 6 + [Round(3, 1, 0, 0)] * 4 + [Round(3, 2, 0, 0), Round(3, 3, 0, 0)]


def test_position_counts_are_the_rounds_that_reached_each_position():
    rounds = _rounds()
    assert position_counts(rounds) == [12, 6, 2]
    assert position_acceptance(rounds) == pytest.approx([6 / 12, 2 / 6, 1 / 2])
    assert position_counts([]) == [] and position_counts([Round(0, 0, 0, 0)]) == []
    # a short proposal does not reach deeper positions
    assert position_counts([Round(1, 1, 0, 0), Round(3, 2, 0, 0)]) == [2, 1, 1]


def test_format_acceptance_marks_positions_with_few_rounds():
    text = format_position_acceptance(_rounds(), min_rounds=5)
    assert text == "0.50 0.33 (0.50) | rounds 12 6 2; (..) = fewer than 5"
    assert format_acceptance([0.5, 0.25], [40, 12], min_rounds=10) == "0.50 0.25 | rounds 40 12"
    assert format_acceptance([0.5, 1.0], [40, 1], with_counts=False) == f"0.50 (1.00) ((..): fewer than {MIN_ROUNDS} rounds)"
    assert "none" in format_acceptance([], [])
    assert format_acceptance([0.5, None], [12, 0]) == "0.50 - | rounds 12 0; (..) = fewer than 10"
    with pytest.raises(LabkitError, match="round counts"):
        format_acceptance([0.5], [1, 2])


def test_acceptance_figures_fade_and_label_thin_positions():
    fig = plots.position_acceptance_figure({"d": [0.5, 0.3, 1.0]}, counts={"d": [40, 12, 2]})
    assert list(fig.data[0].marker.opacity) == [1.0, 1.0, 0.35] and list(fig.data[0].text) == ["n=40", "n=12", "n=2"]
    assert "fewer than 10" in fig.layout.title.text
    plain = plots.position_acceptance_figure({"d": [0.5]})
    assert plain.data[0].marker.opacity is None
    dash = plots.dashboard_figure({"ar": 1.0, "spec": 2.0}, [0.5, 1.0], "t", counts=[20, 1])
    assert list(dash.data[1].marker.opacity) == [1.0, 0.35] and "n=1" in dash.data[1].text[1]


def test_generation_result_reports_position_rounds(make_tiny_target, one_thread):
    from labkit.drafters import make_drafter
    target = make_tiny_target(vocab_size=8)
    res = generate(target, [1, 2, 3, 1, 2, 3, 1, 2], make_drafter("prompt-lookup", target, 3), 16)
    d = res.to_dict()
    assert d["position_rounds"] == position_counts(res.rounds)
    assert len(d["position_rounds"]) == len(d["position_acceptance"])


# ---- 7: STS grid edge and prose from the numbers -------------------------------------------------

def test_fit_sts_flags_a_temperature_on_the_grid_edge():
    """A head that is sure of every answer (|logit| = 8) but right half the time: its ECE falls as T
    grows, so the best T on a grid up to 2 is 2, the edge; position 2 has too few rounds to fit."""
    gen = torch.Generator().manual_seed(0)
    n = 400
    z = torch.stack([8 * (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).double(),
                     torch.full((n,), 3.0, dtype=torch.float64)], 1)
    accepted = torch.randint(0, 2, (n,), generator=gen)  # position 2 never accepted: unfittable
    r = fit_sts(z, accepted, grid=[0.5, 1.0, 2.0], min_each=32)
    assert r.temperatures == [2.0, 1.0] and r.fitted == [True, False] and r.at_edge == [True, False]
    assert "position 1 (T = 2.00)" in r.edge_report()
    wide = fit_sts(z, accepted, grid=[0.5, 1.0, 2.0, 400.0, 1e4], min_each=32)
    assert wide.temperatures[0] > 2.0
    calm = fit_sts(z, accepted, grid=[0.5, 1.0, 2.0], min_each=10_000)  # nothing fitted: nothing at the edge
    assert calm.at_edge == [False, False] and "No fitted temperature" in calm.edge_report()


def test_sts_result_with_at_edge_round_trips_and_old_records_still_load():
    r = STSResult([2.0, 1.0], [True, False], [0.2, 0.1], [0.1, 0.1], at_edge=[True, False])
    assert STSResult.from_dict(r.to_dict()) == r
    old = {"temperatures": [1.0], "fitted": [False], "ece_before": [0.1], "ece_after": [0.1]}
    assert STSResult.from_dict(old).at_edge is None and "does not say" in STSResult.from_dict(old).edge_report()
    with pytest.raises(LabkitError, match="at_edge"):
        STSResult.from_dict({**old, "at_edge": [True, False]})


def _change(before, after, mean, per=None, fitted=None, rounds=100):
    iv = lambda t: None if t is None else Interval(t[0], t[1], t[2], rounds)  # noqa: E731
    per = per or [None] * len(before)
    return ECEChange(before, after, [iv(c) for c in per], iv(mean), rounds, fitted or [True] * len(before))


def test_describe_ece_change_follows_the_measured_numbers_and_their_interval():
    lowered = describe_ece_change(_change([0.10, 0.06], [0.04, 0.02], (-0.05, -0.07, -0.03)))
    assert lowered.startswith("STS lowered the mean ECE 0.080 -> 0.030, a change of -0.050 [-0.070, -0.030] over 100 rounds")
    raised = describe_ece_change(_change([0.066], [0.090], (0.024, 0.010, 0.040)))
    assert raised.startswith("STS raised the mean ECE 0.066 -> 0.090") and "did not carry over" in raised
    noise = describe_ece_change(_change([0.066], [0.067], (0.001, -0.02, 0.02)), where="on x")
    assert "mean ECE on x 0.066 -> 0.067" in noise and "within noise" in noise and "lowered" not in noise
    tied = describe_ece_change(_change([0.066], [0.067], (0.001, -0.001, 0.0015)))
    assert "unchanged within 0.002" in tied


def test_describe_ece_change_names_a_position_that_moved_against_the_mean():
    # the notebook-04 case: the mean fell, position 2's ECE rose beyond its interval
    mixed = _change([0.10, 0.032], [0.04, 0.052], (-0.02, -0.03, -0.01), per=[(-0.06, -0.08, -0.04), (0.02, 0.005, 0.035)])
    text = describe_ece_change(mixed)
    assert text.startswith("STS lowered") and "but it raised position 2's (0.032 -> 0.052, +0.020 [+0.005, +0.035])" in text
    quiet = _change([0.10, 0.032], [0.04, 0.052], (0.0, -0.03, 0.03), per=[(-0.06, -0.08, -0.04), (0.02, 0.005, 0.035)])
    assert "position 1 fell beyond its interval" in describe_ece_change(quiet)
    assert "position 2 rose beyond its interval" in describe_ece_change(quiet)


def test_describe_ece_change_with_nothing_fitted_concludes_nothing():
    text = describe_ece_change(_change([0.05, 0.06], [0.05, 0.06], (0.0, 0.0, 0.0), fitted=[False, False]))
    assert "fitted none of the 2 positions" in text and "says nothing" in text
    assert "no interval over rounds" in describe_ece_change(_change([0.05], [0.04], None))
    assert "no ECE" in describe_ece_change(_change([], [], None, fitted=[True]))


def _miscalibrated_rounds(n, scale, seed=0):
    """Rounds of gamma 2 whose true acceptance is p = sigmoid(u); the head reports scale * u."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, 2, generator=g, dtype=torch.float64)
    ok = torch.rand(n, 2, generator=g, dtype=torch.float64) < torch.sigmoid(u)
    accepted = torch.where(~ok[:, 0], 0, torch.where(~ok[:, 1], 1, 2))
    return scale * u, accepted


def test_ece_change_on_rounds_with_a_known_miscalibration():
    z, accepted = _miscalibrated_rounds(3000, scale=3.0)  # three times over-confident: T = 3 undoes it
    fixed = ece_change(z, accepted, [3.0, 3.0])
    assert fixed.mean.high < 0 and all(c.high < 0 for c in fixed.change)
    assert describe_ece_change(fixed).startswith("STS lowered")
    worse = ece_change(z / 3.0, accepted, [0.3, 0.3])  # a calibrated head made over-confident
    assert worse.mean.low > 0 and describe_ece_change(worse).startswith("STS raised")
    few_z, few_acc = _miscalibrated_rounds(30, scale=1.0, seed=1)  # calibrated head, a small nudge, 30 rounds
    few = ece_change(few_z, few_acc, [1.2, 1.0], [True, False])
    assert few.mean.low < 0 < few.mean.high and "within noise" in describe_ece_change(few)
    assert ece_change(z, accepted, [3.0, 3.0], seed=5).mean == ece_change(z, accepted, [3.0, 3.0], seed=5).mean
    assert ece_change(z, accepted, [1.0, 3.0], [False, True]).change[0] is None  # a_1 cannot move


def test_describe_cut_values_judges_each_cost_by_its_interval():
    def row(change, cal_cut=0.6, all_=0.0):
        return {"change": Interval(change[0], change[1], change[2], 50), "calibrated": {"cut": cal_cut, "verify_all": all_}}
    better = describe_cut_values([row((0.1, 0.05, 0.15)), row((0.2, 0.1, 0.3)), row((0.003, -0.01, 0.02))])
    assert "beyond its interval at 2 of 3 costs, lost at 0, and was tied or within noise at 1" in better
    assert "nearer its break-even" in better and "verifying everything at 3" in better and "Over 50 rounds" in better
    worse = describe_cut_values([row((-0.1, -0.15, -0.05))])
    assert "lost at 1" in worse and "did not pay" in worse
    # the notebook-04 case: a 0.003-token difference whose interval holds 0 supports no conclusion
    assert "cannot tell the two cuts apart" in describe_cut_values([row((0.003, -0.004, 0.011))])


def test_cut_value_change_is_the_mean_of_per_round_differences():
    z, accepted = _miscalibrated_rounds(400, scale=3.0)
    raw, cal = torch.sigmoid(z), apply_temperatures(z, [3.0, 3.0])
    change = cut_value_change(raw, cal, accepted, 0.5)
    assert change.value == pytest.approx(cut_value(cal, accepted, 0.5)["cut"] - cut_value(raw, accepted, 0.5)["cut"])
    assert change.low <= change.value <= change.high and change.n == 400
    assert cut_value_change(raw, raw, accepted, 0.5).text() == "0.000 [0.000, 0.000]"


# ---- 5: the drafted-block showcase ----------------------------------------------------------------

def _block(drafted, target):
    return DraftedBlock(0, 0, [1], drafted, target, [1.0] * len(drafted), [0.5] * len(drafted))


def test_pick_block_takes_the_block_that_keeps_most_and_counts_what_it_looked_at():
    blocks = [_block([1, 2, 3], [4, 2, 3]), _block([1, 2, 3], [1, 5, 3]), _block([1, 2, 3], [1, 2, 6]),
              _block([7, 2, 3], [7, 2, 9])]
    assert [b.kept for b in blocks] == [0, 1, 2, 2]
    show = pick_block(blocks)
    assert show.block is blocks[2] and show.examined == 4 and show.with_match == 3
    assert "Looked at 4 contexts" in show.summary() and "kept most: 2 of 3" in show.summary()
    rows = show.block.rows(lambda ids: str(ids[0]))
    assert [r[-1] for r in rows] == ["kept", "kept", "rejected"]


def test_pick_block_says_plainly_when_nothing_matched():
    blocks = [_block([1, 2], [3, 2]), _block([1, 2], [2, 1])]
    show = pick_block(blocks)
    assert show.block is blocks[0] and show.with_match == 0 and "in none of them" in show.summary()
    assert pick_block([]).block is None and "No context" in pick_block([]).summary()


def test_block_showcase_on_a_tiny_dflash_compares_with_the_target_greedy_continuation(make_tiny_target, one_thread):
    target = make_tiny_target(vocab_size=16, n_layers=3, hidden=32, init=0.5)
    torch.manual_seed(0)
    cfg = DFlashConfig.for_target(target, gamma=4, n_layers=1, target_layers=(1, 2))
    drafter = DFlashDrafter(new_backbone(target, cfg, init_from_target=False))
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    show = block_showcase(target, drafter, prompts, max_new_tokens=20)
    b = show.block
    assert show.examined > 0 and b is not None and len(b.drafted) == len(b.target) == 4
    plain = generate(target, prompts[b.prompt], None, 20).token_ids
    assert b.target == plain[b.anchor + 1: b.anchor + 5]  # the target's own greedy tokens after the anchor
    assert b.context == prompts[b.prompt] + plain[:b.anchor + 1]
    # the drafter's temperature-1 probabilities, not a greedy one-hot: p_d(drafted) is its largest, below 1
    assert all(0 < p < 1 for p in b.p_drafted) and all(pt <= pd + 1e-9 for pd, pt in zip(b.p_drafted, b.p_target))
    assert b.kept == max(0, next((j for j, (d, t) in enumerate(zip(b.drafted, b.target)) if d != t), 4))
    with pytest.raises(LabkitError, match="parallel drafter"):
        block_showcase(target, object(), prompts)


def test_ece_interval_matches_the_per_position_ece_and_narrows_with_rounds():
    from labkit.core.calibration import ece, ece_interval, survival
    z, accepted = _miscalibrated_rounds(2000, scale=3.0)
    y = torch.stack([accepted >= 1, accepted >= 2], 1).double()
    a = survival(torch.sigmoid(z))
    iv = ece_interval(z, accepted, positions=[1])
    assert iv.value == pytest.approx(ece(a[:, 1], y[:, 1])) and iv.low <= iv.value <= iv.high
    assert ece_interval(z, accepted, [3.0, 3.0]).value < iv.value  # the right temperatures calibrate
    few = _miscalibrated_rounds(100, scale=3.0)
    assert (ece_interval(*few).high - ece_interval(*few).low) > (ece_interval(z, accepted).high - ece_interval(z, accepted).low)
    with pytest.raises(LabkitError, match="positions must lie"):
        ece_interval(z, accepted, positions=[2])
