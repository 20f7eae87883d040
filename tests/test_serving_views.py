"""labkit.lab.serving_views: the Fig. 7 / Fig. 8 figures from report dicts, the windowed numbers, and the
live serving dashboard over a real engine (a tiny random target and a tiny DSpark drafter), headless
and in its background thread."""

from __future__ import annotations

import threading
import time

import pytest

from labkit.lab.plots import POLICY_LABELS

from labkit.drafters.dspark import DSparkDrafter
from labkit.core.errors import LabkitError
from labkit.core.sampling import SamplingParams
from labkit.core.scheduler import CostTable
from labkit.decode.engine import ServeRequest, StepRecord
from labkit.lab.serving_views import (LIVE_TRACES, SWEEP_HEADER, SWEEP_POLICIES, PausableClock, ServingDashboard,
                                  describe_dashboard, describe_sweep, live_figure, load_figure, rolling, run_sweeps,
                                  sweep_rows, throughput_speed_figure, window_stats)
from test_serving import dspark, steep_table, tiny  # noqa: F401  (shared fixtures: a tiny target and DSpark drafter)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------
# Hand-made reports


def _report(policy: str, users: int, agg: float | None, per_user: float | None, budget: float | None) -> dict:
    return {"policy": policy, "users": users, "aggregate_tokens_per_s": agg, "per_user_tokens_per_s": per_user,
            "mean_verify_budget": budget, "wasted_verification": 0.25, "tau": 1.5, "steps": 10}


REPORTS = [_report(p, n, agg=10.0 * n + i, per_user=10.0 + i - n, budget=2.0 if p == "mtp1" else 6.0 - n)
           for n in (4, 1, 2) for i, p in enumerate(SWEEP_POLICIES)]


def _trace(fig, name: str):
    found = [t for t in fig.data if t.name == name]
    assert len(found) == 1, f"{len(found)} traces named {name!r} in {[t.name for t in fig.data]}"
    return found[0]


def test_fig7_builder_plots_one_trace_per_policy_sorted_by_users():
    fig = throughput_speed_figure(REPORTS)
    assert [t.name for t in fig.data] == [POLICY_LABELS["mtp1"], "fixed (verify all)", "Algorithm 1", "async top-K (Sec. 5.2)"]
    a1 = _trace(fig, "Algorithm 1")
    assert list(a1.text) == ["x1", "x2", "x4"]
    assert list(a1.y) == [12.0, 22.0, 42.0] and list(a1.x) == [11.0, 10.0, 8.0]


def test_fig7_builder_skips_reports_without_numbers_and_keeps_the_order_asked_for():
    reps = REPORTS + [_report("algorithm1", 8, None, None, None)]
    fig = throughput_speed_figure(reps, policies=("algorithm1", "mtp1"))
    assert [t.name for t in fig.data] == ["Algorithm 1", POLICY_LABELS["mtp1"]]
    assert len(fig.data[0].x) == 3
    with pytest.raises(LabkitError, match="sweep"):
        throughput_speed_figure([])


def test_fig8_builder_plots_throughput_and_budget_per_policy_against_users():
    fig = load_figure(REPORTS)
    assert len(fig.data) == 2 * len(SWEEP_POLICIES)
    for policy_label in (POLICY_LABELS["mtp1"], "Algorithm 1"):
        top, bottom = [t for t in fig.data if t.name == policy_label]
        assert top.showlegend and not bottom.showlegend
        assert list(top.x) == [1, 2, 4] and list(bottom.x) == [1, 2, 4]
    mtp1_budget = [t for t in fig.data if t.name == POLICY_LABELS["mtp1"]][1]
    a1_budget = [t for t in fig.data if t.name == "Algorithm 1"][1]
    assert list(mtp1_budget.y) == [2.0, 2.0, 2.0] and list(a1_budget.y) == [5.0, 4.0, 2.0]
    assert fig.layout.xaxis2.title.text.startswith("concurrent users")


def test_sweep_table_and_sentence_come_from_the_numbers():
    rows = sweep_rows(REPORTS)
    assert len(rows) == len(REPORTS) and all(len(r) == len(SWEEP_HEADER) for r in rows)
    assert [r[1] for r in rows] == sorted(r[1] for r in rows)  # by users
    assert rows[0][:6] == (POLICY_LABELS["mtp1"], 1, "10.00", "9.00", "-", "2.00")
    text = describe_sweep(REPORTS)
    assert "1.20x" in text  # Algorithm 1 at 1 user: 12 / 10
    assert "5.00 tokens per request at 1 user(s) to 2.00 at 4" in text
    assert "x4: async top-K" in text
    # MTP-1 spans 10-40 tokens/s at 9, 8, 6 per user, Algorithm 1 12-42 at 11, 10, 8; on the overlap 12-40 the
    # gain is 11 / 8.8 at 12 ... 8.2 / 6 at 40, the best, said as a number chosen by code; one repeat, no spread
    assert text.startswith(f"At matched aggregate throughput, Algorithm 1's per-user speed is +37% against {POLICY_LABELS['mtp1']}")
    assert "8.20 against 6.00 tokens/s per user at 40.00 tokens/s; one repeat, spread unknown" in text
    assert "+25% to +37% over the overlapping throughputs 12.00-40.00 tokens/s" in text
    with pytest.raises(LabkitError, match="needs reports"):
        describe_sweep(REPORTS, policy="threshold")


def test_sweep_views_show_the_spread_across_repeats():
    runs = [dict(r, repeat=k, aggregate_tokens_per_s=r["aggregate_tokens_per_s"] + d,
                 per_user_tokens_per_s=r["per_user_tokens_per_s"] + (d if r["policy"] == "algorithm1" else 0))
            for k, d in enumerate((-1.0, 0.0, 1.0)) for r in REPORTS]
    fig = throughput_speed_figure(runs)
    a1 = _trace(fig, "Algorithm 1")
    assert list(a1.y) == [12.0, 22.0, 42.0] and list(a1.error_y.array) == [1.0] * 3 and list(a1.error_y.arrayminus) == [1.0] * 3
    assert a1.error_x.visible and not _trace(fig, POLICY_LABELS["mtp1"]).error_x.visible
    top = [t for t in load_figure(runs).data if t.name == "Algorithm 1"][0]
    assert list(top.error_y.array) == [1.0] * 3
    rows = sweep_rows(runs)
    assert len(rows) == len(REPORTS) and rows[0][2] == "10.00 [9.00-11.00]" and rows[0][-1] == 3
    text = describe_sweep(runs)
    assert "across 2 repeats" in text  # at the best throughput, 40 tokens/s, repeat 0's MTP-1 (9-39) falls short


def test_describe_sweep_says_when_the_frontiers_never_meet_and_when_the_gain_is_noise():
    apart = [_report("mtp1", n, 10.0 * n, 10.0 - n, 2.0) for n in (1, 2)] + \
            [_report("algorithm1", n, 100.0 * n, 20.0 - n, 4.0) for n in (1, 2)]
    assert "no overlapping throughput range" in describe_sweep(apart)
    noisy = [dict(_report(p, n, 10.0 * n, (10.0 - n) * (f if p == "algorithm1" else 1.0), 2.0), repeat=k)
             for k, f in enumerate((0.9, 1.1, 1.3)) for n in (1, 2, 4) for p in ("mtp1", "algorithm1")]
    text = describe_sweep(noisy)
    assert "+10%" in text and "-10% to +30% across 3 repeats, within noise" in text


# ---------------------------------------------------------------------------------------------------
# Windowed numbers from StepRecords


def _step(t: float, active: int, accepted: list[int], lengths: list[int], dur: float = 0.5) -> StepRecord:
    return StepRecord(t_s=t, active=active, lengths=lengths, drafted=[4] * active, accepted=accepted,
                      batch_tokens=active * (1 + max(lengths)), draft_s=dur / 2, schedule_s=0.0, verify_s=dur / 2)


def test_window_stats_counts_tokens_per_second_in_all_and_per_request():
    steps = [_step(1.0, 2, [1, 3], [2, 4]), _step(2.0, 1, [0], [0])]
    w = window_stats(steps, start_s=0.0)
    assert w.seconds == 2.0 and w.tokens == (4 + 2) + (0 + 1)
    assert w.aggregate == pytest.approx(7 / 2)
    assert w.per_user == pytest.approx((6 / 2 + 1 / 1) / 2)
    assert w.budget == pytest.approx((6 + 2 + 1) / 3)
    assert window_stats([], 0.0).aggregate is None
    assert window_stats(steps).seconds == pytest.approx(1.5)  # from the first step's own start


def test_rolling_window_forgets_old_steps():
    steps = [_step(float(t), 1, [3 if t < 5 else 0], [3]) for t in range(1, 11)]  # 4 tokens/s, then 1
    roll = rolling(steps, window_s=2.0)
    assert roll["t"] == [float(t) for t in range(1, 11)]
    assert roll["aggregate"][0] == pytest.approx(4.0) and roll["aggregate"][3] == pytest.approx(4.0)
    assert roll["aggregate"][-1] == pytest.approx(1.0)
    assert roll["budget"][-1] == pytest.approx(4.0)


def test_pausable_clock_stands_still_while_paused():
    now = [100.0]
    clock = PausableClock(lambda: now[0])
    start = clock()
    now[0] += 5
    assert clock() == start and clock.paused
    clock.resume()
    now[0] += 2
    assert clock() == start + 2
    clock.pause()
    now[0] += 10
    clock.resume()
    now[0] += 1
    assert clock() == start + 3


def test_live_figure_has_every_named_trace_even_before_the_first_step():
    fig = live_figure([], [], [], [], [], [], gamma=4)
    assert [t.name for t in fig.data] == list(LIVE_TRACES)
    steps = [_step(float(t), 2, [1, 1], [2, 2]) for t in range(1, 4)]
    fig = live_figure(steps, [2, 2, 2], [0.5, 0.25], [6, 3], [(2.0, 3.5)], [], gamma=4)
    assert [t.name for t in fig.data] == list(LIVE_TRACES)
    assert list(_trace(fig, "active requests").y) == [2, 2, 2]
    assert list(_trace(fig, "acceptance by position").y) == [0.5, 0.25]


# ---------------------------------------------------------------------------------------------------
# The dashboard over a real engine


def requests(n: int = 5, new_tokens: int = 12) -> list[ServeRequest]:
    return [ServeRequest(i, f"prompt {i}", [(2 * i + j) % 16 for j in range(2 + i)], new_tokens,
                         SamplingParams(0.0), seed=i) for i in range(n)]


def test_headless_dashboard_runs_its_steps_and_the_users_change_shows_in_the_active_trace(tiny, dspark):
    dash = ServingDashboard(tiny, dspark, requests(), steep_table(), users=1, steps=10, then_users=3)
    dash.run_steps(10, then_users=3, at=4)
    fig = dash.figure
    assert [t.name for t in fig.data] == list(LIVE_TRACES)
    assert list(_trace(fig, "active requests").y) == [1] * 4 + [3] * 6
    assert list(_trace(fig, "users setting").y) == [1] * 4 + [3] * 6
    assert len(_trace(fig, "aggregate tokens/s").y) == 10
    assert all(y > 0 for y in _trace(fig, "aggregate tokens/s").y)
    assert 1 <= len(_trace(fig, "acceptance by position").y) <= 4
    assert [s.label for s in dash.segments] == ["x1 algorithm1 <=4", "x3 algorithm1 <=4"]
    assert len(_trace(fig, "settings so far").x) == 2
    assert "users 3" in dash.readout_text and "10 steps" in dash.readout_text
    assert "10 engine steps" in describe_dashboard(dash.stats())


def test_requests_are_replaced_as_they_finish_with_fresh_ids(tiny, dspark):
    dash = ServingDashboard(tiny, dspark, requests(2, new_tokens=3), steep_table(), users=2)
    dash.run_steps(12)
    assert dash.finished, "3-token requests finish within 12 steps"
    assert all(s.active == 2 for s in dash.engine.steps)
    ids = [r.id for r in dash.engine.done] + list(dash.engine.active)
    assert len(ids) == len(set(ids)) > 2


def test_policy_and_proposal_length_apply_at_the_next_step(tiny, dspark):
    dash = ServingDashboard(tiny, dspark, requests(), steep_table(), users=2, policy="fixed")
    dash.run_steps(3)
    dash.set(policy="mtp1")
    dash.run_steps(3)
    dash.set(policy="fixed", max_draft=2)
    dash.run_steps(3)
    steps = dash.engine.steps
    assert all(l == d for s in steps[:3] for l, d in zip(s.lengths, s.drafted))  # fixed: verify all drafted
    assert all(l <= 1 for s in steps[3:6] for l in s.lengths)  # MTP-1: one draft
    assert all(d <= 2 for s in steps[6:] for d in s.drafted)  # proposal cut to 2
    assert [s.label for s in dash.segments] == ["x2 fixed <=4", "x2 mtp1 <=4", "x2 fixed <=2"]
    assert dash.controls["policy"].value == "fixed" and dash.controls["max_draft"].value == 2


def test_moving_a_control_sets_what_the_loop_reads(tiny, dspark):
    dash = ServingDashboard(tiny, dspark, requests(), steep_table(), users=1)
    dash.controls["users"].value = 4  # what the slider does in the browser
    dash.run_steps(1)
    assert dash.engine.steps[-1].active == 4 and dash.users == 4


def test_impossible_values_are_refused_with_the_range(tiny, dspark):
    with pytest.raises(LabkitError, match="from 1 to 16"):
        ServingDashboard(tiny, dspark, requests(), users=17)
    with pytest.raises(LabkitError, match="Unknown policy"):
        ServingDashboard(tiny, dspark, requests(), policy="fastest")
    dash = ServingDashboard(tiny, dspark, requests())
    with pytest.raises(LabkitError, match="max_draft must be a whole number from 1 to 4"):
        dash.set(max_draft=5)
    with pytest.raises(LabkitError, match="at least one request"):
        ServingDashboard(tiny, dspark, [])


def test_show_headless_runs_synchronously_and_leaves_a_static_figure(tiny, dspark, monkeypatch, capsys):
    import plotly.graph_objects as go

    import labkit.lab.serving_views as sv

    shown = []
    monkeypatch.setenv("LABKIT_HEADLESS", "1")
    monkeypatch.setattr(sv, "display", shown.append)
    dash = ServingDashboard(tiny, dspark, requests(), steep_table(), users=1, steps=6, then_users=2)
    dash.show()
    assert not dash.running and len(dash.engine.steps) == 6
    assert len(shown) == 1 and isinstance(shown[0], go.Figure) and not isinstance(shown[0], go.FigureWidget)
    assert list(_trace(shown[0], "active requests").y) == [1, 1, 1, 2, 2, 2]
    assert "ran 6 steps" in capsys.readouterr().out


def test_background_loop_keeps_every_engine_call_on_its_thread_and_follows_the_users_control(tiny, dspark):
    dash = ServingDashboard(tiny, dspark, requests(), steep_table(), users=1, redraw_s=0.05)
    threads = set()
    real_step, real_add = dash.engine.step, dash.engine.add
    dash.engine.step = lambda: (threads.add(threading.current_thread()), real_step())[1]
    dash.engine.add = lambda req: (threads.add(threading.current_thread()), real_add(req))[1]

    def wait(cond, what):
        deadline = time.monotonic() + 60
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.01)

    dash.start()
    try:
        assert dash.running and dash.button.description == "Stop"
        wait(lambda: len(dash.engine.steps) >= 3, "3 steps")
        dash.controls["users"].value = 3  # a slider event on this (the kernel's) thread
        wait(lambda: list(_trace(dash.figure, "active requests").y)[-1:] == [3], "the chart to show 3 active")
        with dash.paused():
            assert not dash.running
            n, t = len(dash.engine.steps), dash.engine.now()
            time.sleep(0.2)
            assert len(dash.engine.steps) == n and dash.engine.now() == t  # the clock stood still
        assert dash.running
    finally:
        dash.stop()
    assert not dash.running and dash.button.description == "Start" and dash.error is None
    assert len(threads) == 2  # the two loops: the first run and the one after the pause...
    assert threading.current_thread() not in threads  # ...and never this thread
    assert {t.name for t in threads} == {"labkit-serving-dashboard"}
    assert "stopped" in dash.readout_text and "users 3" in dash.readout_text


def test_an_error_in_the_loop_is_said_in_the_readout(tiny, dspark):
    dash = ServingDashboard(tiny, dspark, requests(), steep_table(), users=1)

    def boom():
        raise RuntimeError("the target fell over")

    dash.engine.step = boom
    dash.start()
    dash._thread.join(30)
    assert "the target fell over" in dash.readout_text and "error" in dash.readout_text


def test_run_sweeps_feeds_both_figures_one_trace_per_policy(tiny, dspark, monkeypatch):
    import labkit.lab.serving_views as sv

    monkeypatch.setattr(tiny, "encode_prompt", lambda text, chat=True: [ord(c) % 16 for c in text])
    out = run_sweeps(tiny, dspark, ["ab", "cde", "fg"], users=[1, 2], policies=SWEEP_POLICIES, table=steep_table(),
                     temperatures=[0.0], max_new_tokens=6, requests_per_user=3, drafter_spec="tiny", repeats=2)
    reps = out[0.0]
    assert len(reps) == 2 * 2 * len(SWEEP_POLICIES) and all(r["temperature"] == 0.0 for r in reps)
    assert len(throughput_speed_figure(reps).data) == len(SWEEP_POLICIES)
    assert len(load_figure(reps).data) == 2 * len(SWEEP_POLICIES)
    assert len(sweep_rows(reps)) == 2 * len(SWEEP_POLICIES) and all(r[-1] == 2 for r in sweep_rows(reps))
    assert all(r["mean_verify_budget"] <= 2.0 + 1e-9 for r in reps if r["policy"] == "mtp1")
    budget = {c["policy"]: c["mean_verify_budget"] for cs in sv.by_policy(reps).values() for c in cs if c["users"] == 1}
    assert budget["fixed"] > budget["mtp1"]  # verify-all spends more per request than one draft
    text = sv.describe_sweep(reps)
    assert "Algorithm 1 served" in text and "MTP-1" in text
    assert "at matched aggregate throughput" in text.lower() or "no overlapping throughput range" in text


# ---------------------------------------------------------------------------------------------------
# Paired ratios against a baseline, Eq. 1 beside the measurement, the closing table of claims


def _runs() -> list[dict]:
    """Three repeats of REPORTS: Algorithm 1's throughput 1.1x, 1.2x, 1.3x MTP-1's at 4 users (above in
    every repeat), async top-K's 0.9x-1.1x (within noise); Eq. 1 predicts 1.1x the measured speed."""
    out = []
    for k in range(3):
        for r in REPORTS:
            agg = r["aggregate_tokens_per_s"]
            if r["users"] == 4 and r["policy"] == "algorithm1":
                agg = 40.0 * (1.1 + 0.1 * k)
            if r["users"] == 4 and r["policy"] == "mtp1":
                agg = 40.0
            if r["users"] == 4 and r["policy"] == "async-topk":
                agg = 40.0 * (0.9 + 0.1 * k)
            out.append(dict(r, repeat=k, aggregate_tokens_per_s=agg,
                            eq1_per_user_tokens_per_s=1.1 * r["per_user_tokens_per_s"]))
    return out


def test_paired_ratios_pair_runs_of_one_repeat_and_read_the_spread():
    from labkit.lab.serving_views import RATIO_HEADER, describe_ratios, paired_ratios, ratio_rows
    ratios = paired_ratios(_runs(), "mtp1")
    by = {(r["policy"], r["users"]): r for r in ratios}
    assert {p for p, _ in by} == set(SWEEP_POLICIES) - {"mtp1"}
    a1 = by[("algorithm1", 4)]
    assert (a1["ratio"], a1["low"], a1["high"], a1["repeats"]) == pytest.approx((1.2, 1.1, 1.3, 3))
    rows = {(r[0], r[1]): r for r in ratio_rows(ratios)}
    assert all(len(r) == len(RATIO_HEADER) for r in rows.values())
    assert rows[(4, "Algorithm 1")][-1] == "above" and rows[(4, POLICY_LABELS["async-topk"])][-1] == "within noise"
    text = describe_ratios(ratios, "mtp1")
    a1_text = next(s for s in text if s.startswith("Algorithm 1"))
    assert "above MTP-1 (DSpark's 1st draft)'s at " in a1_text and "1.20x [1.10-1.30] at 4 users (3 repeats)" in a1_text
    with pytest.raises(LabkitError, match="not summarized cells"):
        paired_ratios([{"spread": {}, "repeats": 1, "policy": "mtp1", "users": 1}])
    one = paired_ratios([dict(r, repeat=0) for r in REPORTS], "mtp1")
    assert ratio_rows(one)[0][-1] == "one repeat, spread unknown"


def test_eq1_is_set_beside_the_measured_speed():
    from labkit.lab.serving_views import EQ1_HEADER, describe_eq1, eq1_ratios, eq1_rows
    runs = _runs()
    rows = eq1_rows(runs, SWEEP_POLICIES)
    assert len(rows) == len(REPORTS) and all(len(r) == len(EQ1_HEADER) for r in rows)
    assert {r[4] for r in rows} == {"1.100"}
    assert eq1_ratios(runs) == pytest.approx([1.1] * len(runs))
    text = describe_eq1(runs)
    assert f"1.10x the measured per-user speed (median over {len(runs)} runs" in text and "overestimates" in text
    assert describe_eq1(REPORTS).startswith("No run has both")


def _label_of(policy: str) -> str:
    from labkit.lab.plots import POLICY_LABELS
    return POLICY_LABELS.get(policy, policy)


def test_serving_claims_set_the_papers_numbers_beside_the_measured_and_simulated_ones():
    from labkit.core.simulate import RequestTrace, TraceRound, roofline_cost, sweep
    from labkit.lab.serving_views import CLAIMS_HEADER, serving_claims
    from labkit.lab.simulation_views import sim_matched_gain, simulate_resampled
    runs = [dict(r, tau=1.5) for r in _runs()]
    traces = [RequestTrace("math", [TraceRound((0.9, 0.8, 0.6), 2), TraceRound((0.5, 0.2, 0.1), 0)]),
              RequestTrace("chat", [TraceRound((0.7, 0.5, 0.2), 1), TraceRound((0.9, 0.9, 0.9), 3)])]
    one = [RequestTrace(t.domain, [TraceRound((0.8,), 1), TraceRound((0.6,), 0)]) for t in traces]
    cost = roofline_cost("h100", gamma=3)
    sim = sweep(traces, [1, 8, 64], ["mtp1", "fixed", "algorithm1"], cost, {"mtp1": one})
    resampled = simulate_resampled(traces, one, [1, 8, 64], ["mtp1", "fixed", "algorithm1"], cost, 2)
    gain = sim_matched_gain(sim, resampled)
    rows = serving_claims(runs, sim, resampled, gain, knee_b=32, gamma=3, smoke=True, sim_label="an H100 model")
    assert len(rows) == 5 and all(len(r) == len(CLAIMS_HEADER) for r in rows)
    assert len(serving_claims(runs, sim, resampled, gain, also_static=["fixed:2"])) == 6
    by = {r[0].split(" (")[0]: r for r in rows}
    assert by["per-user speed at matched throughput, over MTP-1"][1].startswith("+60% to +85%")
    assert all(r[2].startswith("SMOKE RUN, concludes nothing") for r in rows)
    assert all(r[3].endswith("(an H100 model)") for r in rows)
    assert "knee at B = 32" in rows[0][4] and "not a trained MTP module" in rows[0][4]
    port = rows[-1]
    assert "+69.7% at 256" in port[1] and "K = gamma = 3" in port[4] and "at 64" in port[3]
    assert "at 4 users" not in port[2] and "at 4 (" in port[2]  # measured Algorithm 1 / verify-all at 1 and 4 users
    plain = serving_claims(runs)
    assert plain[0][3] == "not simulated" and not plain[0][2].startswith("SMOKE")
    # against a trained MTP-1 arm: the same claims, read against that arm, and the reason names it
    armed = [dict(r, policy="mtp1@one") if r["policy"] == "mtp1" else r for r in runs]
    trained = serving_claims(armed, baseline="mtp1@one")
    assert "a trained one-token drafter (one)" in trained[0][4] and "not a trained MTP module" not in trained[0][4]
    assert trained[0][2] == plain[0][2]
    # another load-aware arm stands for the scheduler in the measured cells, named; the simulated ones stay Algorithm 1
    column = [dict(r, policy="algorithm1-column~steps") if r["policy"] == "algorithm1" else r for r in runs]
    col = serving_claims(column, sim, resampled, gain, knee_b=32, gamma=3, scheduled="algorithm1-column~steps",
                         sim_label="an H100 model")
    assert col[0][2] == rows[0][2].removeprefix("SMOKE RUN, concludes nothing: ")
    assert col[1][2].startswith(_label_of("algorithm1-column~steps")) and col[1][3] == rows[1][3]
    assert col[-1][2].startswith(_label_of("algorithm1-column~steps") + " / ")


def test_the_layout_policy_and_a_drafter_arm_are_drawn_and_named(tiny, dspark, monkeypatch):
    """Notebook 06's full run sweeps `algorithm1-layout`, and a sweep may serve an arm "mtp1@SPEC": both get a
    trace in each figure, a row in each table and their own names (never the raw spec) in the sentences."""
    import labkit.lab.serving_views as sv
    from labkit.drafters.dflash import DFlashDrafter
    from test_dflash import make_backbone

    monkeypatch.setattr(tiny, "encode_prompt", lambda text, chat=True: [ord(c) % 16 for c in text])
    policies = ["mtp1", "algorithm1-layout", "mtp1@one"]
    out = run_sweeps(tiny, dspark, ["ab", "cde", "fg"], users=[1, 2], policies=policies, table=steep_table(),
                     temperatures=[0.0], max_new_tokens=6, requests_per_user=3, drafter_spec="tiny", repeats=2,
                     arm_drafters={"one": DFlashDrafter(make_backbone(tiny, gamma=1))})
    reps = out[0.0]
    names = {t.name for t in throughput_speed_figure(reps, policies).data}
    assert names == {POLICY_LABELS.get(p) for p in policies} and None not in names
    assert len(load_figure(reps, policies).data) == 2 * len(policies)
    assert len(sweep_rows(reps)) == 2 * len(policies)
    ratios = sv.paired_ratios(reps, "mtp1", policies=policies)
    assert {r["policy"] for r in ratios} == {"algorithm1-layout", "mtp1@one"}
    assert len(sv.ratio_rows(ratios)) == len(ratios)
    assert len(sv.eq1_rows(reps, policies)) == 2 * len(policies)
