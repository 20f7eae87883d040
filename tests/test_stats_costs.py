"""Fast tests of labkit.core.stats, labkit.measure.costs, labkit.lab.plots and labkit.lab.widgets (no real model needed).

Chi-square tests use fixed seeds, so they are deterministic; the docstrings still give the odds a
fresh seed would fail, to show the thresholds are not tuned to the seed.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import plotly.graph_objects as go
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from labkit.model.timing import ForwardCost, forward_cost, memory_bandwidth_gbs
from labkit.measure.costs import (break_even_tau, per_token_latency_s,
                          roofline_floor_s, speculative_speedup, time_ar_loops, compare_loops)
from labkit.core.errors import LabkitError
from labkit.lab import plots
from labkit.core.stats import acceptance_rate, chi_square_test, speculative_stream, total_variation
from labkit.model.target import Target
from labkit.core.trace import Round, prefix_survival
from labkit.lab.widgets import check_slider, decoding_dashboard, latency_explorer

P_T = torch.tensor([0.5, 0.2, 0.2, 0.1])
P_D = torch.tensor([0.2, 0.5, 0.1, 0.2])


# ---- chi-square ---------------------------------------------------------------------------------

def test_chi_square_matches_known_values():
    """[10, 20, 30] vs uniform: statistic 10 on 2 dof, whose tail is exactly exp(-5)."""
    r = chi_square_test([10, 20, 30], [1 / 3] * 3)
    assert r.statistic == pytest.approx(10.0)
    assert r.dof == 2
    assert r.p_value == pytest.approx(math.exp(-5), rel=1e-9)
    assert chi_square_test([48, 52], [0.5, 0.5]).p_value == pytest.approx(0.6892, abs=1e-4)


def test_chi_square_large_p_for_right_and_small_p_for_wrong_distribution():
    """20,000 multinomial draws from P_T: under the right p a fresh seed fails alpha=0.01 with odds 1%;
    against P_D (TV distance 0.4 away) the statistic is in the thousands, so p is ~0 for any seed."""
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.multinomial(P_T, 20_000, replacement=True, generator=gen), minlength=4)
    assert chi_square_test(counts, P_T).passes(alpha=0.01)
    assert chi_square_test(counts, P_D).p_value < 1e-12


def test_chi_square_pools_rare_outcomes_of_a_large_vocabulary():
    """A 5,000-token Zipf-like distribution: most tokens expect < 5 draws and are pooled, not dropped."""
    p = 1.0 / torch.arange(1, 5001, dtype=torch.float64)
    p /= p.sum()
    gen = torch.Generator().manual_seed(1)
    counts = torch.bincount(torch.multinomial(p, 3_000, replacement=True, generator=gen), minlength=5000)
    r = chi_square_test(counts, p)
    assert 2 <= r.n_bins < 5000 and r.n_draws == 3000
    assert r.passes(alpha=0.001)


def test_chi_square_outcome_with_zero_probability_fails_outright():
    assert chi_square_test([5, 5, 1], [0.5, 0.5, 0.0]).p_value == 0.0


@pytest.mark.parametrize("counts, probs", [([1, 2], [0.2, 0.3, 0.5]), ([1, 2], [0.5, 0.6]), ([0, 0], [0.5, 0.5]),
                                           ([-1, 2], [0.5, 0.5]), ([], [])])
def test_chi_square_rejects_bad_input_with_a_clear_error(counts, probs):
    with pytest.raises(LabkitError):
        chi_square_test(counts, probs)


# ---- speculative sampling, empirically ---------------------------------------------------------

def test_speculative_stream_emits_the_target_distribution():
    """verify_chain round after round on a context-free toy: counts pass chi-square vs p_t (alpha 0.01,
    1% false-fail odds for a fresh seed) and fail vs p_d (statistic in the thousands)."""
    stream = speculative_stream(P_T, P_D, n_tokens=20_000, gamma=4, seed=0)
    assert len(stream.tokens) == 20_000
    counts = stream.counts(4)
    assert chi_square_test(counts, P_T).passes(alpha=0.01)
    assert chi_square_test(counts, P_D).p_value < 1e-12
    assert sum(stream.counts(4, s).sum() for s in ("accepted", "residual", "bonus")) == 20_000
    assert 1.0 <= stream.tau <= 5.0


def test_bonus_tokens_appear_only_after_a_fully_accepted_block():
    stream = speculative_stream(P_T, P_T, n_tokens=500, gamma=3, seed=0)  # p_d = p_t accepts everything
    assert set(stream.source) == {"accepted", "bonus"}
    assert stream.tau == pytest.approx(4.0)


def test_acceptance_rate_is_one_minus_total_variation():
    assert acceptance_rate(P_T, P_D) == pytest.approx(1 - total_variation(P_T, P_D))
    assert acceptance_rate(P_T, P_D) == pytest.approx(0.6)


def test_prefix_survival_and_conditional_acceptance_on_hand_built_rounds():
    rounds = [Round(3, 3, 0, 0), Round(3, 1, 0, 0), Round(3, 0, 0, 0), Round(2, 2, 0, 0)]
    # position 1: 3 of 4 survive; position 2: 2 of 4; position 3: 1 of the 3 rounds that proposed 3
    assert prefix_survival(rounds) == pytest.approx([3 / 4, 2 / 4, 1 / 3])


# ---- latency model (Eq. 1) and roofline ---------------------------------------------------------

def test_eq1_latency_and_speedup_algebra():
    assert per_token_latency_s(tau=3.0, draft_s=0.01, verify_s=0.05) == pytest.approx(0.02)
    assert speculative_speedup(3.0, 0.0, 0.09, ar_step_s=0.06) == pytest.approx(2.0)
    tau0 = break_even_tau(0.02, 0.10, 0.06)
    assert tau0 == pytest.approx(2.0)
    assert speculative_speedup(tau0, 0.02, 0.10, 0.06) == pytest.approx(1.0)
    # tau = 1 with a free drafter and verify = one AR step is plain decoding
    assert speculative_speedup(1.0, 0.0, 0.06, 0.06) == pytest.approx(1.0)


@pytest.mark.parametrize("args", [(0.5, 0.0, 0.1, 0.1), (2.0, -0.1, 0.1, 0.1), (2.0, 0.0, 0.0, 0.1),
                                  (2.0, 0.0, 0.1, 0.0), (float("nan"), 0.0, 0.1, 0.1)])
def test_latency_model_rejects_impossible_values(args):
    with pytest.raises(LabkitError):
        speculative_speedup(*args)


def test_roofline_floor_arithmetic():
    assert roofline_floor_s(540e6, 27.0) == pytest.approx(0.02)
    with pytest.raises(LabkitError):
        roofline_floor_s(0, 27.0)
    with pytest.raises(LabkitError):
        roofline_floor_s(540e6, 0.0)


def test_memory_bandwidth_is_a_plausible_positive_number():
    bw = memory_bandwidth_gbs(size_mb=64, repeats=2)
    assert 0.1 < bw < 10_000


def _fake_cost() -> ForwardCost:
    return ForwardCost(context_len=10, ks=[1, 2, 4, 8], samples_s=[[0.06, 0.07], [0.08], [0.09], [0.12]])


def test_forward_cost_table_lookup_and_interpolation():
    cost = _fake_cost()
    assert cost.median_s[0] == pytest.approx(0.065)
    assert cost.at(4) == pytest.approx(0.09)
    assert cost.interp(3) == pytest.approx(0.085)
    assert cost.relative()[0] == 1.0
    with pytest.raises(LabkitError):
        cost.at(3)
    with pytest.raises(LabkitError):
        cost.interp(9)


# ---- measurement on a tiny random model (exercises the real code paths in a second) -------------

@pytest.fixture(scope="module")
def tiny_target():
    """A 2-layer random Llama; one torch thread, since thread hand-offs dominate a model this small."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=63, pad_token_id=63, bos_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    tokenizer = SimpleNamespace(pad_token_id=63, eos_token_id=63, decode=lambda ids, **_: " ".join(map(str, ids)))
    yield Target(model=model, tokenizer=tokenizer, name="tiny", eos_token_ids={63})
    torch.set_num_threads(threads)


def test_forward_cost_measures_every_k_and_leaves_the_context_intact(tiny_target):
    cost = forward_cost(tiny_target, context_len=20, ks=[4, 1, 2], repeats=2, progress=False)
    assert cost.ks == [1, 2, 4]
    assert all(len(s) == 2 and min(s) > 0 for s in cost.samples_s)
    with pytest.raises(LabkitError):
        forward_cost(tiny_target, ks=[0, 1], progress=False)


def test_time_ar_loops_runs_hf_and_lab_greedy_to_the_same_tokens(tiny_target):
    timings = time_ar_loops(tiny_target, [1, 2, 3, 4, 5], max_new_tokens=8, progress=False)
    hf, lab = timings["HF generate"], timings["lab AR loop"]
    assert hf.token_ids == lab.token_ids  # fp32 greedy: both loops pick the same argmaxes
    assert lab.new_tokens > 0 and lab.tokens_per_s > 0 and lab.s_per_token > 0
    assert len(lab.samples_s) == 1 and "no spread" in compare_loops(lab, hf)
    three = time_ar_loops(tiny_target, [1, 2, 3, 4, 5], max_new_tokens=8, repeats=3, progress=False)
    assert len(three["lab AR loop"].samples_s) == 3 and "over 3 alternating repeats" in compare_loops(*three.values())


def test_compare_loops_reads_the_per_repeat_ratios():
    from labkit.measure.costs import LoopTiming
    fast = LoopTiming("a", 10, 1.0, [], [1.0, 1.0, 1.1])
    slow = LoopTiming("b", 10, 2.0, [], [2.0, 2.1, 2.0])
    assert compare_loops(fast, slow).startswith("a ran at 2.00x b's speed [1.82-2.10 over 3 alternating repeats]: faster")
    mixed = LoopTiming("c", 10, 2.0, [], [1.9, 2.2, 2.0])
    assert compare_loops(mixed, slow).endswith("within noise.")


# ---- figures and widgets ------------------------------------------------------------------------

def test_figure_builders_return_figures():
    cost = _fake_cost()
    assert len(plots.forward_cost_figure(cost, floor_s=0.02).data) == 2
    assert len(plots.speedup_curves(cost, [1, 3]).data) == 2
    assert len(plots.speedup_heatmap([1, 2, 3], [0.0, 0.01], 0.09, 0.06, marker=(2.0, 0.0)).data) == 3
    toy = plots.toy_distribution_figure(P_T, P_D, list("abcd"))
    # the stacked parts on the right add up to p_t exactly: that is the lossless identity
    stacked = torch.tensor(toy.data[3].y) + torch.tensor(toy.data[4].y)
    assert torch.allclose(stacked, P_T.double(), atol=1e-6)
    stream = speculative_stream(P_T, P_D, n_tokens=200, seed=0)
    fig = plots.empirical_vs_target_figure(stream.counts(4), P_T, top=2,
                                           by_source={s: stream.counts(4, s) for s in ("accepted", "residual")})
    assert list(fig.data[0].x) == ["0", "1", "other"]
    assert isinstance(plots.position_acceptance_figure({"a": [0.5, 0.4]}, {"a": [0.5, 0.2]}), go.Figure)
    assert isinstance(plots.tokens_per_s_figure({"ar": 10.0, "spec": 15.0}, baseline="ar"), go.Figure)
    assert len(plots.dashboard_figure({"ar": 1.0, "spec": 2.0}, [0.5], "t").data) == 2


def test_check_slider_names_the_range():
    assert check_slider("tau", 2.0, 1.0, 5.0) == 2.0
    for bad in (0.5, 6.0, float("nan"), "3", True):
        with pytest.raises(LabkitError, match="tau must be a number from 1.0 to 5.0"):
            check_slider("tau", bad, 1.0, 5.0)


def test_latency_explorer_updates_and_refuses_tau_beyond_gamma_plus_one():
    dash = latency_explorer(_fake_cost(), gamma=3, tau=2.0)
    assert "speedup" in dash.figure.layout.title.text.lower() or dash.figure.data
    dash.update(gamma=5, tau=5.5)
    assert dash.sliders["tau"].value == 5.5 and dash.sliders["tau"].max == 6.0
    assert list(dash.figure.data[2].x) == [5.5]
    with pytest.raises(LabkitError, match="tau"):
        dash.update(gamma=2, tau=4.0)
    with pytest.raises(LabkitError, match="Unknown slider"):
        dash.update(rank=3)
    with pytest.raises(LabkitError):
        latency_explorer(_fake_cost(), gamma=2, tau=9.0)


def test_moving_gamma_down_clamps_tau_and_redraws():
    dash = latency_explorer(_fake_cost(), gamma=5, tau=5.5)
    dash.sliders["gamma"].value = 2  # as a user would: tau's range shrinks to 1..3 and the map redraws
    assert dash.sliders["tau"].max == 3.0 and dash.sliders["tau"].value == 3.0
    assert dash.readout.value.startswith("gamma=2")
    assert list(dash.figure.data[2].x) == [3.0]


def test_decoding_dashboard_runs_real_generations_and_validates_sliders(tiny_target):
    dash = decoding_dashboard(tiny_target, [1, 2, 3, 4, 1, 2, 3, 4, 1, 2], gamma=3, max_new_tokens=6)
    assert "tau" in dash.readout.value and len(dash.figure.data) == 2
    assert "median of 3 interleaved repeats" in dash.readout.value and "3 interleaved repeats" in dash.figure.layout.title.text
    dash.update(gamma=5, temperature=0.8)
    assert dash.sliders["gamma"].value == 5 and "gamma=5" in dash.figure.layout.title.text
    for bad in ({"gamma": 0}, {"gamma": 17}, {"temperature": -0.1}, {"temperature": 2.0}):
        with pytest.raises(LabkitError):
            dash.update(**bad)
    with pytest.raises(LabkitError):
        decoding_dashboard(tiny_target, [1, 2, 3], gamma=40)
    with pytest.raises(LabkitError, match="whole number >= 1"):
        decoding_dashboard(tiny_target, [1, 2, 3], gamma=3, repeats=0)


def test_vocab_costs_time_every_configuration_and_size_the_heads(make_tiny_target):
    """One row per (draft vocabulary, rank), sizes capped at the target's vocabulary; the head's memory
    grows with the draft vocabulary and with the rank (rank 0 is DFlash: no Markov factors)."""
    from labkit.measure.costs import vocab_costs
    target = make_tiny_target(vocab_size=64, n_layers=3, hidden=32)
    rows = vocab_costs(target, [16, 64, 1000], [0, 8], prompt_ids=[1, 2, 3], gamma=4, repeats=2, progress=False)
    assert [(r.v_draft, r.rank) for r in rows] == [(16, 0), (16, 8), (64, 0), (64, 8)]
    assert all(r.draft_ms > 0 for r in rows)
    mb = {(r.v_draft, r.rank): r.head_mb for r in rows}
    assert mb[(16, 0)] < mb[(64, 0)] and mb[(16, 0)] < mb[(16, 8)]
    assert mb[(64, 0)] == pytest.approx(64 * 32 * 4 / 2**20)
