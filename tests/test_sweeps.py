"""labkit.measure.sweeps: the same prompt mix at every load, several requests per user, repeats with the
policies interleaved; per-user speed, time to first token and aggregate throughput over one stated
window, read from the engine's report; cells as median and min-max across repeats; the per-user speed
gain at matched aggregate throughput with its spread; and `serve-sweep` end to end on a tiny model."""

from __future__ import annotations

import json
from collections import Counter

import pytest

import labkit.__main__ as cli
from labkit.core.errors import LabkitError
from labkit.core.sampling import SamplingParams
from labkit.decode.engine import ServeRequest
from labkit.measure.sweeps import (METRICS, WINDOW, against_best_fixed, format_against_best_fixed, is_fixed,
                                   cells_of, format_gain, format_sweep, load_queue, matched_gain,
                                   measure_run, prompt_mix, run_sweeps, split_arm, summarize, sweep)
from labkit.pipeline.prompt_sets import Prompt
from labkit.drafters.dflash import DFlashDrafter
from test_dflash import make_backbone
from test_serving import dspark, steep_table, tiny  # noqa: F401  (shared fixtures: a tiny target and DSpark drafter)

pytestmark = pytest.mark.usefixtures("one_thread")


def P(text: str, domain: str) -> Prompt:
    return Prompt(text, domain, f"{domain}.jsonl")


PROMPTS = [P("m1", "math"), P("m2", "math"), P("c1", "code"), P("c2", "code"), P("h1", "chat")]


# ---------------------------------------------------------------------------------------------------
# The workload


def test_the_mix_interleaves_domains_and_is_cycled_to_the_requests_per_user():
    assert [p.text for p in prompt_mix(PROMPTS, 3)] == ["m1", "c1", "h1"]
    assert [p.text for p in prompt_mix(PROMPTS, 7)] == ["m1", "c1", "h1", "m2", "c2", "m1", "c1"]
    assert prompt_mix(["a", "b"], 3) == ["a", "b", "a"]  # plain strings: one domain, in order
    with pytest.raises(LabkitError, match="at least 1"):
        prompt_mix(PROMPTS, 0)
    with pytest.raises(LabkitError, match="one prompt"):
        prompt_mix([], 3)


def test_every_load_serves_the_same_multiset_of_prompts_staggered_with_distinct_seeds():
    mix = [ServeRequest(i, t, [i + 1], 4, SamplingParams(0.0), seed=100 + i) for i, t in enumerate("abc")]
    for users in (1, 2, 4, 5):
        queue = load_queue(mix, users, seed_offset=7)
        assert Counter(r.prompt for r in queue) == Counter({t: users for t in "abc"})
        assert [r.id for r in queue] == list(range(3 * users))
        assert [r.seed for r in queue] == [107 + k for k in range(3 * users)]
    first = [r.prompt for r in load_queue(mix, 3)[:3]]
    assert first == ["a", "b", "c"]  # the first requests of three users start on different prompts
    with pytest.raises(LabkitError, match="--users"):
        load_queue(mix, 0)


# ---------------------------------------------------------------------------------------------------
# What one run measured, from a hand-made report


def _req(rid: int, n: int, speed: float | None, ttft: float = 0.1, **extra) -> dict:
    return {"id": rid, "token_ids": list(range(n)), "tokens_per_s": speed, "ttft_s": ttft, **extra}


def _steps(*rows) -> list[dict]:
    """(t_s, ids) per step; each step 0.5 s of drafting and verifying."""
    return [{"t_s": t, "active": len(ids), "ids": ids, "draft_s": 0.25, "verify_s": 0.25} for t, ids in rows]


def test_one_user_one_request_aggregate_equals_per_user_speed():
    # 11 tokens; 10 after the first over 2 s; the run's prefill (before the first token) is not in the window
    rep = {"requests": [_req(0, 11, 5.0, ttft=0.4)], "step_trace": _steps((3.0, [0]), (3.5, [0]), (4.0, [0]), (4.4, [0])),
           "tau": 2.5}
    m = measure_run(rep)
    assert m["per_user_tokens_per_s"] == pytest.approx(5.0) and m["aggregate_tokens_per_s"] == pytest.approx(5.0)
    assert m["window_s"] == pytest.approx(2.0) and m["window_tokens"] == 10 and m["ttft_s"] == pytest.approx(0.4)
    assert m["mean_active"] == pytest.approx(1.0)
    # Eq. 1: tau 2.5 over the mean time between rounds, (0.5 + 0.5 + 0.5 + 0.4) / 4 s
    assert m["eq1_per_user_tokens_per_s"] == pytest.approx(2.5 / (1.9 / 4))


def test_one_user_several_requests_aggregate_counts_the_prefills_between_them():
    # request 0: first token at 0, last at 2 (10 after the first); request 1: first at 3, last at 5
    rep = {"requests": [_req(0, 11, 5.0), _req(1, 11, 5.0), _req(2, 0, None, error="refused")],
           "step_trace": _steps((2.0, [0]), (5.0, [1])), "tau": None}
    m = measure_run(rep)
    assert m["per_user_tokens_per_s"] == pytest.approx(5.0)
    assert m["window_s"] == pytest.approx(5.0) and m["window_tokens"] == 21  # request 1's first token is inside
    assert m["aggregate_tokens_per_s"] == pytest.approx(21 / 5) and m["aggregate_tokens_per_s"] < m["per_user_tokens_per_s"]
    assert m["eq1_per_user_tokens_per_s"] is None and m["measured_requests"] == 2


def test_request_times_the_report_carries_are_used_as_they_are():
    rep = {"requests": [_req(0, 5, 4.0, first_token_s=1.0, finish_s=2.0), _req(1, 3, 2.0, first_token_s=1.5, finish_s=2.5)],
           "step_trace": []}
    m = measure_run(rep)
    assert m["window_s"] == pytest.approx(1.5) and m["window_tokens"] == 4 + 2 + 1
    assert m["per_user_tokens_per_s"] == pytest.approx(3.0)


def test_a_report_without_requests_measures_nothing():
    m = measure_run({"requests": [], "step_trace": []})
    assert m["aggregate_tokens_per_s"] is None and m["per_user_tokens_per_s"] is None and m["window_tokens"] == 0
    assert m["draft_s_per_step"] is None and m["verify_s_per_step"] is None


def test_step_phases_are_the_mean_drafting_and_verifying_seconds_of_a_step():
    steps = _steps((1.0, [0]), (2.0, [0, 1]))
    steps[1].update(draft_s=0.75, verify_s=0.05)
    m = measure_run({"requests": [], "step_trace": steps})
    assert m["draft_s_per_step"] == pytest.approx(0.5) and m["verify_s_per_step"] == pytest.approx(0.15)


# ---------------------------------------------------------------------------------------------------
# Cells and the matched-throughput gain, from hand-made runs


def _run(policy: str, users: int, rep: int, agg: float, speed: float, temp: float = 0.0) -> dict:
    return {"policy": policy, "users": users, "repeat": rep, "temperature": temp, "aggregate_tokens_per_s": agg,
            "per_user_tokens_per_s": speed, "mean_verify_budget": 2.0, "tau": 1.5, "steps": 10}


# MTP-1: throughput 10, 20, 40 at per-user 10, 8, 6; Algorithm 1 reaches the same throughputs 25% faster per
# user in repeat 0, 15% in repeat 1, 20% in repeat 2 (the median run)
RUNS = [_run(p, n, rep, agg, speed * (1 + g if p == "algorithm1" else 1))
        for rep, g in enumerate((0.25, 0.15, 0.20))
        for n, agg, speed in ((1, 10.0, 10.0), (2, 20.0, 8.0), (4, 40.0, 6.0)) for p in ("mtp1", "algorithm1")]


def test_cells_are_medians_with_their_min_max_across_repeats():
    cells = summarize(RUNS)
    assert len(cells) == 6 and all(c["repeats"] == 3 for c in cells)
    a1 = next(c for c in cells if c["policy"] == "algorithm1" and c["users"] == 2)
    assert a1["per_user_tokens_per_s"] == pytest.approx(8 * 1.2) and a1["spread"]["per_user_tokens_per_s"] == \
        pytest.approx([8 * 1.15, 8 * 1.25])
    assert a1["ttft_s"] is None and a1["spread"]["ttft_s"] is None  # no run had it
    assert set(METRICS) <= set(a1)
    assert cells_of(cells) == cells and cells_of(RUNS) == cells


def test_the_gain_at_matched_throughput_is_a_number_with_its_spread_across_repeats():
    gain = matched_gain(RUNS)
    assert gain["overlap"] == [10.0, 40.0]
    assert [g["throughput"] for g in gain["gains"]] == [10.0, 20.0, 40.0]
    assert all(g["gain"] == pytest.approx(0.2) for g in gain["gains"])
    best = gain["best"]
    assert best["gain"] == pytest.approx(0.2) and best["spread"] == pytest.approx([0.15, 0.25]) and best["repeats"] == 3
    line = format_gain(gain)
    assert "+20.0%" in line and "+15.0% to +25.0% across 3 repeats" in line and "noise" not in line


def test_a_spread_that_reaches_zero_is_within_noise():
    runs = [r for r in RUNS if r["repeat"] < 2] + [
        _run(p, n, 2, agg, speed * (0.9 if p == "algorithm1" else 1))
        for n, agg, speed in ((1, 10.0, 10.0), (2, 20.0, 8.0), (4, 40.0, 6.0)) for p in ("mtp1", "algorithm1")]
    assert ", within noise" in format_gain(matched_gain(runs))


def test_where_repeats_do_not_reach_the_best_throughput_each_repeats_own_best_gives_the_spread():
    # the median frontiers meet at 10-40 tokens/s, best at 10; repeat by repeat the two policies' throughputs
    # move apart (MTP-1 by +s, Algorithm 1 by -s), so only the middle repeat reaches 10 on both
    runs = [_run(p, n, k, agg + (s if p == "mtp1" else -s), speed * ({1: 1.3, 2: 1.2, 4: 1.1}[n] if p == "algorithm1" else 1))
            for k, s in enumerate((-6.0, 0.0, 6.0))
            for n, agg, speed in ((1, 10.0, 10.0), (2, 20.0, 8.0), (4, 40.0, 6.0)) for p in ("mtp1", "algorithm1")]
    best = matched_gain(runs)["best"]
    assert best["throughput"] == 10.0 and best["gain"] == pytest.approx(0.3)
    assert best["repeats"] == 1 and best["repeat_best_repeats"] == 3
    line = format_gain(matched_gain(runs))
    assert "as each of 3 repeats' own best" in line


def test_frontiers_that_share_no_throughput_are_said_so():
    runs = [_run("mtp1", 1, 0, 10.0, 9.0), _run("mtp1", 2, 0, 15.0, 8.0),
            _run("algorithm1", 1, 0, 30.0, 12.0), _run("algorithm1", 2, 0, 50.0, 11.0)]
    gain = matched_gain(runs)
    assert gain["overlap"] is None and gain["best"] is None and gain["gains"] == []
    assert "no overlapping throughput range" in format_gain(gain)
    with pytest.raises(LabkitError, match="one temperature"):
        matched_gain(runs + [_run("mtp1", 1, 0, 10.0, 9.0, temp=1.0)])


def test_the_table_shows_medians_and_spread():
    table = format_sweep(RUNS)
    assert len(table.splitlines()) == 1 + 6
    assert "9.60 [9.20-10.00]" in table  # Algorithm 1 per-user at 2 users
    assert "[min-max]" in table.splitlines()[0]


# ---------------------------------------------------------------------------------------------------
# A real sweep on a tiny model


@pytest.fixture
def encoded(tiny, monkeypatch):
    monkeypatch.setattr(tiny, "encode_prompt", lambda text, chat=True: [ord(c) % 16 for c in text])
    return tiny


def test_a_sweep_serves_the_same_prompts_at_every_load_repeats_outermost(encoded, dspark):
    out = run_sweeps(encoded, dspark, PROMPTS, users=[1, 2], policies=["mtp1", "fixed"], table=steep_table(),
                     temperatures=[0.0], max_new_tokens=5, requests_per_user=3, drafter_spec="tiny", repeats=2)
    reps = out[0.0]
    assert [(r["repeat"], r["users"], r["policy"]) for r in reps] == [
        (0, 1, "mtp1"), (0, 1, "fixed"), (0, 2, "mtp1"), (0, 2, "fixed"),
        (1, 1, "fixed"), (1, 1, "mtp1"), (1, 2, "fixed"), (1, 2, "mtp1")]  # policy order rotates each repeat
    for r in reps:
        prompts = Counter(q["prompt"] for q in r["requests"])
        assert prompts == Counter({"m1": r["users"], "c1": r["users"], "h1": r["users"]})
        assert r["requests_per_user"] == 3 and r["temperature"] == 0.0 and "step_trace" in r  # the raw report is kept
        assert r["aggregate_tokens_per_s"] > 0 and r["per_user_tokens_per_s"] > 0 and r["ttft_s"] > 0
        assert r["engine_aggregate_tokens_per_s"] > 0
    # greedy: the same requests give the same tokens under every policy and in every repeat
    texts = {(r["users"], tuple(q["prompt"] for q in r["requests"])): None for r in reps}
    for r in reps:
        key = (r["users"], tuple(q["prompt"] for q in r["requests"]))
        ids = [q["token_ids"] for q in r["requests"]]
        assert texts[key] in (None, ids)
        texts[key] = ids
    cells = summarize(reps)
    assert len(cells) == 4 and all(c["repeats"] == 2 for c in cells)
    assert "mtp1" in format_sweep(reps)


def test_one_user_one_request_gives_equal_per_user_and_aggregate_speed(encoded, dspark):
    reqs = [ServeRequest(0, "ab", [3, 4], 6, SamplingParams(0.0), seed=0)]
    (r,) = sweep(encoded, dspark, reqs, [1], ["mtp1"], steep_table(), requests_per_user=1)
    assert r["aggregate_tokens_per_s"] == pytest.approx(r["per_user_tokens_per_s"], rel=1e-6)
    assert r["window_tokens"] == 5
    with pytest.raises(LabkitError, match="--repeats"):
        sweep(encoded, dspark, reqs, [1], ["mtp1"], steep_table(), repeats=0)


def test_serve_sweep_writes_cells_gains_and_the_window(encoded, dspark, monkeypatch, tmp_path, capsys):
    import labkit.decode.engine as engine
    import labkit.drafters as drafters
    import labkit.model.target as target_mod

    monkeypatch.setattr(cli, "_load_prompts", lambda args: PROMPTS)
    monkeypatch.setattr(target_mod, "load_target", lambda *a, **k: encoded)
    monkeypatch.setattr(drafters, "make_drafter", lambda *a, **k: dspark)
    monkeypatch.setattr(engine, "cost_table_for", lambda *a, **k: steep_table())
    out = tmp_path / "sweep.json"
    assert cli.main(["serve-sweep", "--users", "1", "2", "--policies", "mtp1", "algorithm1", "--temperatures", "0",
                     "--max-new-tokens", "4", "--repeats", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[min-max]" in printed and "algorithm1 over mtp1 at matched aggregate throughput" in printed
    data = json.loads(out.read_text())
    assert data["window"] == WINDOW and data["repeats"] == 2 and data["requests_per_user"] == 3
    assert data["prompt_mix"] == ["m1", "c1", "h1"]
    assert len(data["cells"]) == 4 and all(c["repeats"] == 2 and "spread" in c for c in data["cells"])
    assert len(data["reports"]) == 8
    gain = data["matched_gains"]["0.0"]["algorithm1"]
    assert gain["baseline"] == "mtp1" and "overlap" in gain and "best" in gain


class _Counting(DFlashDrafter):
    """A block-1 DFlash (the trained MTP-1's shape) that counts the requests it drafted for."""

    def __init__(self, model):
        super().__init__(model)
        self.drafted = 0

    def propose_many(self, requests, max_tokens):
        self.drafted += len(requests)
        return super().propose_many(requests, max_tokens)


def test_an_arm_serves_its_policy_with_its_own_drafter(encoded, dspark):
    """"mtp1@one" serves the MTP-1 policy with the drafter named "one" (here a block-1 DFlash), interleaved
    with the arms on the sweep's drafter: its reports carry the arm's label and that drafter's name, that
    drafter drafted for its runs alone, its verification never exceeds one draft, and greedy outputs are
    the same tokens under every arm (each is the target's)."""
    one = _Counting(make_backbone(encoded, gamma=1))
    reps = sweep(encoded, dspark, [ServeRequest(i, p.text, [3 + i, 4, 5], 6, SamplingParams(0.0), seed=i)
                                   for i, p in enumerate(PROMPTS)],
                 [1, 2], ["mtp1", "mtp1@one", "algorithm1"], steep_table(), requests_per_user=3, drafter_spec="tiny",
                 arm_drafters={"one": one})
    assert [r["policy"] for r in reps[:3]] == ["mtp1", "mtp1@one", "algorithm1"]
    arm = [r for r in reps if r["policy"] == "mtp1@one"]
    assert len(arm) == 2 and all(r["drafter"] == "one" for r in arm)
    assert all(r["drafter"] == "tiny" for r in reps if r["policy"] != "mtp1@one")
    assert 0 < one.drafted <= sum(s["active"] for r in arm for s in r["step_trace"])
    before = one.drafted  # the arms on the sweep's drafter never call it
    sweep(encoded, dspark, [ServeRequest(0, "a", [3, 4], 6, SamplingParams(0.0), seed=0)], [1], ["mtp1", "algorithm1"],
          steep_table(), requests_per_user=1, arm_drafters={"one": one})
    assert one.drafted == before
    assert all(max(s["lengths"]) <= 1 for r in arm for s in r["step_trace"])
    for users in (1, 2):
        outs = [sorted((q["prompt"], q["token_ids"]) for q in r["requests"]) for r in reps if r["users"] == users]
        assert all(o == outs[0] for o in outs)
    assert is_fixed("mtp1@one") and not is_fixed("algorithm1@one")
    rows = against_best_fixed(reps)
    assert {r["best"] for r in rows} <= {"mtp1", "mtp1@one"}
    with pytest.raises(LabkitError, match="No drafter given for one"):
        sweep(encoded, dspark, [ServeRequest(0, "a", [3], 2, SamplingParams(0.0), seed=0)], [1], ["mtp1@one"], steep_table())


def test_arm_labels_split_into_policy_and_drafter_and_name_the_trained_mtp1():
    from labkit.lab.plots import POLICY_COLORS, POLICY_LABELS
    assert split_arm("mtp1") == ("mtp1", None) and split_arm("fixed:2@dflash") == ("fixed:2", "dflash")
    assert split_arm("mtp1@data/drafters/mtp1") == ("mtp1", "data/drafters/mtp1")
    for bad in ("mtp1@", "@dflash"):
        with pytest.raises(LabkitError, match="POLICY@DRAFTER"):
            split_arm(bad)
    assert POLICY_LABELS.get("mtp1@mtp1") == "MTP-1 (trained: mtp1)"
    assert POLICY_LABELS.get("fixed:2@dflash") == "fixed K=2 with dflash"
    assert POLICY_COLORS.get("mtp1@mtp1") != POLICY_COLORS.get("mtp1")
    assert POLICY_LABELS.get("nonsense@x") is None


def test_a_cost_model_suffix_prices_one_arm_and_is_named():
    from labkit.lab.plots import POLICY_COLORS, POLICY_LABELS
    from labkit.measure.sweeps import arm_cost_model
    assert arm_cost_model("algorithm1") == ("algorithm1", None)
    assert arm_cost_model("algorithm1~rows") == ("algorithm1", "rows")
    assert arm_cost_model("mtp1@data/drafters/mtp1~table") == ("mtp1@data/drafters/mtp1", "table")
    for bad in ("algorithm1~guess", "~rows"):
        with pytest.raises(LabkitError, match="POLICY~MODEL"):
            arm_cost_model(bad)
    assert is_fixed("mtp1~rows") and not is_fixed("algorithm1~rows")
    assert POLICY_LABELS.get("algorithm1~rows") == "Algorithm 1, priced by rows"
    assert POLICY_COLORS.get("algorithm1~rows") not in (None, POLICY_COLORS.get("algorithm1"))


@pytest.mark.parametrize("argv, expected", [
    (["serve-sweep", "--repeats", "0"], "expected a positive integer"),
    (["serve-sweep", "--policies", "fixed", "algorithm1"], "--baseline mtp1 is not among"),
    (["serve-sweep", "--policies", "mtp1", "mtp1@"], "write POLICY@DRAFTER"),
])
def test_serve_sweep_bad_input_is_one_line(argv, expected, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_against_best_fixed_pairs_each_repeat_with_its_own_best_fixed_policy():
    """In each repeat the best fixed policy is the fastest fixed one of that repeat (MTP-1 at one load,
    fixed:4 at another, and a different one from repeat to repeat); the ratio's median and min-max run
    across repeats; policies that choose lengths are never the baseline."""
    runs = []
    for rep, (m, f) in enumerate(((10.0, 12.0), (11.0, 9.0), (10.0, 10.5))):
        runs += [_run("mtp1", 1, rep, m, 1.0), _run("fixed:4", 1, rep, f, 1.0), _run("algorithm1", 1, rep, 12.0, 1.0),
                 _run("async-topk", 1, rep, 99.0, 1.0)]
        runs += [_run("mtp1", 8, rep, 40.0, 1.0), _run("fixed:4", 8, rep, 20.0, 1.0), _run("algorithm1", 8, rep, 36.0, 1.0)]
    rows = {r["users"]: r for r in against_best_fixed(runs)}
    one = rows[1]  # repeat by repeat: 12/12, 12/11, 12/10.5
    assert one["ratio"] == pytest.approx(12 / 11) and one["low"] == pytest.approx(1.0)
    assert one["high"] == pytest.approx(12 / 10.5) and one["repeats"] == 3 and one["best"] == "fixed:4"
    assert rows[8]["ratio"] == rows[8]["low"] == rows[8]["high"] == pytest.approx(0.9) and rows[8]["best"] == "mtp1"
    assert is_fixed("mtp1") and is_fixed("fixed") and is_fixed("fixed:2") and not is_fixed("algorithm1")
    line = format_against_best_fixed(against_best_fixed(runs))
    assert "1.09x [1.00-1.14] at 1 (best fixed:4)" in line and "0.90x [0.90-0.90] at 8 (best mtp1)" in line
    with pytest.raises(LabkitError, match="one temperature"):
        against_best_fixed(runs + [_run("mtp1", 1, 0, 10.0, 9.0, temp=1.0)])


def test_the_best_fixed_policy_by_median_is_one_policy_for_every_repeat():
    """Two fixed policies as fast as the scheduled one, each repeat's noise favouring a different one: each
    repeat's fastest scores the scheduled policy 11/12 in two repeats of three (the fastest of two noisy
    draws), the one fixed policy fastest by median (a tie at 11, broken by name: fixed:2) scores it 1.00."""
    runs = []
    for rep, (m, f) in enumerate(((10.0, 12.0), (12.0, 10.0), (11.0, 11.0))):
        runs += [_run("mtp1", 4, rep, m, 1.0), _run("fixed:2", 4, rep, f, 1.0), _run("algorithm1", 4, rep, 11.0, 1.0)]
    oracle, = against_best_fixed(runs)
    assert oracle["ratio"] == pytest.approx(11 / 12) and oracle["choose"] == "repeat"
    chosen, = against_best_fixed(runs, choose="median")
    assert chosen["ratio"] == pytest.approx(1.0) and chosen["best"] == "fixed:2" and chosen["choose"] == "median"
    assert chosen["low"] == pytest.approx(11 / 12) and chosen["high"] == pytest.approx(11 / 10)
    assert "the fixed policy fastest by median across repeats" in format_against_best_fixed([chosen])
    assert "each repeat's fastest fixed policy" in format_against_best_fixed([oracle])
    with pytest.raises(LabkitError, match="choose is one of repeat, median"):
        against_best_fixed(runs, choose="mean")


def test_a_priced_arm_runs_its_steps_under_its_cost_model(encoded, dspark):
    """"algorithm1~rows" beside "algorithm1" in one sweep: the first prices every step at its own number of
    requests (recorded as price_rows), the second by the sweep's cost model (the pooled table)."""
    from test_step_fit import shaped_table
    reps = sweep(encoded, dspark, [ServeRequest(i, p.text, [3 + i, 4, 5], 6, SamplingParams(0.0), seed=i)
                                   for i, p in enumerate(PROMPTS)],
                 [2], ["algorithm1", "algorithm1~rows"], shaped_table(), requests_per_user=2)
    by = {r["policy"]: r for r in reps}
    assert all(s["price_rows"] == s["active"] for s in by["algorithm1~rows"]["step_trace"])
    assert all(s["price_rows"] is None for s in by["algorithm1"]["step_trace"])
