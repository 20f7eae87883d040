"""labkit.lab.simulation_views beyond the figures: the spread of a simulation by resampling the recorded
requests, the matched-throughput gain read from it, the engine-against-simulator rows and sentences,
and simulated ratios set beside measured ones. Hand-made traces and rows; no model, no clock."""

from __future__ import annotations

import pytest

from labkit.core.errors import LabkitError
from labkit.core.simulate import RequestTrace, TraceRound, roofline_cost, sweep
from labkit.lab.simulation_views import (SIM_LABELS, SIM_VS_MEASURED_HEADER, VALIDATION_HEADER,
                                         describe_sim_vs_measured, describe_simulation, describe_validation, relabel,
                                         sim_matched_gain, sim_ratio, sim_ratio_spread, sim_vs_measured,
                                         simulate_resampled, simulated_load, simulation_rows, validation_rows)

TRACES = [RequestTrace("math", [TraceRound((0.9, 0.8, 0.6), 2), TraceRound((0.5, 0.2, 0.1), 0)]),
          RequestTrace("code", [TraceRound((0.95, 0.9, 0.9), 3), TraceRound((0.9, 0.7, 0.3), 1)]),
          RequestTrace("chat", [TraceRound((0.7, 0.5, 0.2), 1), TraceRound((0.4, 0.3, 0.2), 0)])]
ONE = [RequestTrace(t.domain, [TraceRound((0.8,), 1), TraceRound((0.6,), 0)]) for t in TRACES]
COST = roofline_cost("h100", gamma=3)
POLICIES = ["mtp1", "fixed", "fixed:2", "algorithm1"]


@pytest.fixture(scope="module")
def sim():
    return sweep(TRACES, [1, 8, 64], POLICIES, COST, {"mtp1": ONE})


@pytest.fixture(scope="module")
def resampled():
    return simulate_resampled(TRACES, ONE, [1, 8, 64], ["mtp1", "fixed", "algorithm1"], COST, 3, seed=1)


def test_resamples_are_labelled_as_repeats_and_seeded(resampled):
    assert sorted({r["repeat"] for r in resampled}) == [0, 1, 2]
    assert len(resampled) == 3 * 3 * 3
    again = simulate_resampled(TRACES, ONE, [1, 8, 64], ["mtp1", "fixed", "algorithm1"], COST, 3, seed=1)
    assert again == resampled
    assert simulate_resampled(TRACES, ONE, [1], ["mtp1"], COST, 0) == []


def test_ratios_and_their_spread_over_resamples(sim, resampled):
    x = sim_ratio(sim, "algorithm1", "mtp1", 8)
    a1 = next(r for r in sim if r["policy"] == "algorithm1" and r["users"] == 8)
    mtp = next(r for r in sim if r["policy"] == "mtp1" and r["users"] == 8)
    assert x == pytest.approx(a1["aggregate_tokens_per_s"] / mtp["aggregate_tokens_per_s"])
    assert sim_ratio(sim, "algorithm1", "threshold", 8) is None
    lo, hi, n = sim_ratio_spread(resampled, "algorithm1", "mtp1", 8)
    assert lo <= hi and n == 3
    assert sim_ratio_spread(resampled, "fixed:2", "mtp1", 8) is None  # not resampled


def test_matched_gain_of_a_simulation_carries_the_resamples_spread(sim, resampled):
    gain = sim_matched_gain(sim, resampled)
    assert gain["policy"] == "algorithm1" and gain["baseline"] == "mtp1"
    best = gain["best"]
    assert best is not None and 1 <= best["repeats"] <= 4 and best["repeat_best_repeats"] <= 4  # full sample + 3
    assert best["spread"][0] <= best["gain"] <= best["spread"][1]  # the full sample is one of the draws
    plain = sim_matched_gain(sim)  # the full sample alone: one "repeat", so no spread to read
    assert plain["best"]["gain"] == best["gain"] and plain["best"]["repeats"] == 1


def test_simulation_rows_and_sentences(sim, resampled):
    rows, header = simulation_rows(sim, resampled, [("algorithm1", "mtp1"), ("fixed:2", "mtp1")])
    assert [r[0] for r in rows] == [1, 8, 64] and all(len(r) == len(header) for r in rows)
    assert "[" in rows[1][1] and "[" not in rows[1][2]  # fixed:2 was not resampled
    text = describe_simulation(sim, resampled, sim_matched_gain(sim, resampled),
                               [("algorithm1", "mtp1"), ("fixed:2", "mtp1")], n_requests=3)
    assert any("3 bootstrap resamples of the 3 recorded requests" in s or "share no throughput" in s for s in text)
    assert any(s.startswith("Algorithm 1 / MTP-1") for s in text)
    assert any(s.startswith("fixed K=2 / MTP-1") and "spread unknown" in s for s in text)
    assert text[-1].startswith("Algorithm 1 verifies")


def test_relabel_names_policy_specs(sim):
    fig = relabel(simulated_load(sim, POLICIES))
    assert {t.name for t in fig.data} == {"MTP-1 (one-token rounds)", "fixed (verify all)", "fixed K=2", "Algorithm 1"}


ROWS = [{"users": u, "policy": p, "requests": 2, "engine_steps": 100, "sim_steps": 100 if p == "mtp1" else 95,
         "engine_mean_verify_budget": 2.0, "sim_mean_verify_budget": 2.0, "engine_tau": 1.5, "sim_tau": 1.5,
         "engine_aggregate_tokens_per_s": 10.0 * u, "sim_aggregate_tokens_per_s": 10.0 * u * (1.1 if p == "mtp1" else 1.32),
         "engine_per_user_tokens_per_s": 10.0, "sim_per_user_tokens_per_s": 11.0}
        for u in (1, 4) for p in ("mtp1", "algorithm1")]


def test_validation_rows_and_sentences_say_how_far_the_simulator_is():
    rows = validation_rows(ROWS)
    assert all(len(r) == len(VALIDATION_HEADER) for r in rows)
    assert rows[1][2:] == ("0.95", "1.00", "1.00", "1.32", "1.10")
    text = describe_validation(ROWS)
    assert text[0].startswith("4 runs, 1-4 users, 2 policies")
    assert "simulated steps: -5% to +0% against the engine's" in text
    assert text[-1] == ("Algorithm 1 against MTP-1 (one-token rounds): the simulator moves the throughput ratio by "
                        "+20% to +20% over 2 loads")
    assert rows[0][1] == "MTP-1 (one-token rounds)"  # the trace file's one-token source on both sides
    assert SIM_LABELS.get("fixed:2") == "fixed K=2" and SIM_LABELS.get("mtp1@x") == "MTP-1 (trained: x)"
    with pytest.raises(LabkitError):
        describe_validation([])


def test_simulated_ratios_beside_the_measured_spread(sim):
    ratios = [{"policy": "algorithm1", "users": 8, "ratio": 1.0, "low": 0.5, "high": 5.0, "repeats": 3},
              {"policy": "fixed", "users": 8, "ratio": 9.0, "low": 8.0, "high": 10.0, "repeats": 3},
              {"policy": "fixed", "users": 2, "ratio": 1.0, "low": 0.9, "high": 1.1, "repeats": 3}]
    rows = sim_vs_measured(sim, ratios)
    assert all(len(r) == len(SIM_VS_MEASURED_HEADER) for r in rows)
    assert [r[-1] for r in rows] == ["yes", "no: below it", "-"]
    text = describe_sim_vs_measured(rows)
    assert text.startswith("1 of 2 simulated ratios") and "fixed (verify all) at 8 user(s) (below it) outside" in text
    assert describe_sim_vs_measured(rows[2:]) == "No load was both measured and simulated."
