"""The trace-driven serving simulator (labkit.core.simulate) and its recorded traces (labkit.measure.traces).

- an engine's recorded step trace, replayed with the same table and policy, gives the engine's
  verification lengths exactly, for every policy (tiny target and drafter, a steep table);
- the closed-loop simulator is deterministic, and its accounting (accepted = min(l, accept_len), one
  token more a round, drafts capped as the engine caps them, time = fixed + 1 / SPS(B)) holds on
  hand-made traces;
- the roofline table is monotone and says it is a model; Appendix A's numbers come out of the simulator;
- the trace file round-trips, `simulate` runs from the command line on a hand-made file.
"""

from __future__ import annotations

import json

import pytest
import torch

from labkit.__main__ import main
from labkit.core.errors import LabkitError
from labkit.core.sampling import SamplingParams
from labkit.core.scheduler import POLICIES, CostTable, appendix_a_arithmetic, packed_tokens
from labkit.core.simulate import (DraftCost, RequestTrace, SimCost, TraceRound, appendix_a_simulated, domain_mix,
                                  replay_steps, roofline_cost, simulate, sweep)
from labkit.decode import engine as engine_mod
from labkit.decode.engine import Engine, ServeRequest, closed_loop, report
from labkit.measure.traces import TraceFile, TraceSet, load_traces, record_request, save_traces
from test_serving import dspark, steep_table, tiny  # noqa: F401  (the engine tests' tiny target, drafter and table)

pytestmark = pytest.mark.usefixtures("one_thread")


def requests(n: int, temperature: float = 0.0) -> list[ServeRequest]:
    out = []
    for i in range(n):
        prompt = [(3 * i + j) % 16 for j in range(1 + (5 * i) % 12)]
        out.append(ServeRequest(i, f"request {i}", prompt, 8 + (7 * i) % 12, SamplingParams(temperature), seed=i))
    return out


# ---- exact replay of the engine ---------------------------------------------------------------------


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_replay_reproduces_the_engines_verification_lengths_exactly(tiny, dspark, policy, temperature):
    """9 requests through 4 slots under a steep table: the recorded trace (through its JSON), replayed with
    the engine's table, policy and batch-token count, gives every step's lengths exactly."""
    engine = Engine(tiny, dspark, policy, steep_table())
    count = getattr(engine, "batch_tokens", engine_mod.padded_batch_tokens)
    for _ in closed_loop(requests(9, temperature), 4, engine):
        pass
    rep = json.loads(json.dumps(report(engine, 4, "test")))
    lengths = replay_steps(rep["step_trace"], rep["table"], policy, batch_tokens=count)
    assert lengths == [s["lengths"] for s in rep["step_trace"]]
    assert len(lengths) > 5
    if policy in ("algorithm1", "async-topk", "threshold", "retrospective"):
        assert any(sum(s["lengths"]) < sum(s["drafted"]) for s in rep["step_trace"]), "nothing was truncated"
    # the same from the StepRecords and the live table
    assert replay_steps(engine.steps, engine.table, policy, batch_tokens=count) == lengths


def test_replay_with_another_policy_differs_and_old_confidences_matter(tiny, dspark):
    """The replay is not a copy of the recorded lengths: algorithm1 replayed as fixed verifies more; the
    production variant's replay without history (each step alone) differs from the one with it."""
    engine = Engine(tiny, dspark, "async-topk", steep_table())
    count = getattr(engine, "batch_tokens", engine_mod.padded_batch_tokens)
    for _ in closed_loop(requests(9), 4, engine):
        pass
    steps = engine.steps
    fixed = replay_steps(steps, engine.table, "fixed", batch_tokens=count)
    assert sum(map(sum, fixed)) > sum(sum(s.lengths) for s in steps)
    alone = [replay_steps([s], engine.table, "async-topk", batch_tokens=count)[0] for s in steps]
    assert alone != [s.lengths for s in steps]


def test_replay_refuses_a_trace_without_what_the_policy_saw():
    with pytest.raises(LabkitError, match="confidence rows"):
        replay_steps([{"ids": [0, 1], "conf": [[0.5]], "draft_cost_s": None}], CostTable.flat(), "fixed")


# ---- the simulator's accounting ---------------------------------------------------------------------


def flat_cost(sps: float = 10.0, launch_s: float = 0.1) -> SimCost:
    return SimCost(CostTable.flat(sps), DraftCost(launch_s=launch_s))


def test_accepted_is_min_of_length_and_accept_len_and_each_round_emits_one_more():
    """A request of 7 tokens whose one round (c = 0.9, 0.9; accepted 2) repeats: verify-all takes 2 steps
    (1 + 3 + 3), MTP-1 3 steps (1 + 2 + 2 + 2); each step costs 0.1 s drafting + 1 / 10."""
    trace = RequestTrace("math", [TraceRound((0.9, 0.9), 2)], n_tokens=7)
    fixed = simulate([trace], 1, "fixed", flat_cost(), n_requests=1, record_steps=True)
    assert [s.accepted for s in fixed.step_trace] == [[2], [2]] and fixed.steps == 2
    assert fixed.elapsed_s == pytest.approx(0.4) and fixed.tau == 3.0 and fixed.mean_verify_budget == 3.0
    assert fixed.per_user_tokens_per_s == pytest.approx(6 / 0.4)
    assert fixed.aggregate_tokens_per_s == pytest.approx(7 / 0.4)
    mtp = simulate([trace], 1, "mtp1", flat_cost(), n_requests=1, record_steps=True)
    assert [s.accepted for s in mtp.step_trace] == [[1]] * 3 and mtp.tau == 2.0 and mtp.mean_verify_budget == 2.0
    assert mtp.wasted_verification == 0.0
    # a round accepting 0 of 2 verifies 3 tokens and emits 1, wasting 2 of the 3
    miss = simulate([RequestTrace("code", [TraceRound((0.9, 0.9), 0)], n_tokens=10)], 1, "fixed", flat_cost(),
                    n_requests=1, max_steps=1)
    assert miss.steps == 1 and miss.tau == 1.0 and miss.wasted_verification == pytest.approx(2 / 3)


def test_drafts_are_capped_at_the_remaining_tokens_minus_one_and_rounds_cycle():
    """4 tokens to emit, a round of 3 drafts all accepted: the first step may draft only 2 (1 + 2 + 1 = 4)."""
    trace = RequestTrace("chat", [TraceRound((0.9, 0.9, 0.9), 3)], n_tokens=4)
    res = simulate([trace], 1, "fixed", flat_cost(), n_requests=1, record_steps=True)
    assert res.steps == 1 and res.step_trace[0].drafted == [2] and res.step_trace[0].accepted == [2]
    # a request longer than its recording goes round its rounds again
    two = RequestTrace("chat", [TraceRound((0.9,), 1), TraceRound((0.2,), 0)], n_tokens=9)
    res = simulate([two], 1, "fixed", flat_cost(), n_requests=1, record_steps=True)
    assert [s.accepted[0] for s in res.step_trace] == [1, 0, 1, 0, 1] and res.requests == 1


def test_step_time_is_drafting_plus_one_over_sps_of_the_batch_tokens():
    """Two users, lengths from fixed: B = packed tokens; step = drafting(2) + kv + 1 / SPS(B) on a steep table."""
    table = steep_table(1.0)
    cost = SimCost(table, DraftCost(launch_s=0.01, per_request_s=0.02), kv_per_request_s=0.005)
    a = RequestTrace("math", [TraceRound((0.8, 0.8), 1)], n_tokens=20)
    b = RequestTrace("code", [TraceRound((0.8,), 0)], n_tokens=20)
    res = simulate([a, b], 2, "fixed", cost, n_requests=2, max_steps=1, record_steps=True)
    step = res.step_trace[0]
    assert step.lengths == [2, 1] and step.batch_tokens == packed_tokens([2, 1]) == 5
    assert step.seconds == pytest.approx(0.01 + 0.02 * 2 + 0.005 * 2 + 1.0 / table.sps(5))


def test_drafting_is_capped_as_the_engine_caps_it_and_charged_by_the_cap():
    """A policy that chooses lengths drafts at most one past the longest length it chose last step
    (`Engine.draft_caps`), one draft at its first step (`newcomer_cap`); the drafting charged runs on
    the line from one draft to a whole block."""
    cost = SimCost(steep_table(0.1), DraftCost(launch_s=0.08), draft_one=DraftCost(launch_s=0.01), gamma=8)
    trace = RequestTrace("math", [TraceRound((0.95, 0.9, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3), 2)], n_tokens=60)
    res = simulate([trace], 1, "algorithm1", cost, n_requests=1, max_steps=5, record_steps=True)
    for prev, step in zip(res.step_trace, res.step_trace[1:]):
        assert max(step.drafted) <= max(prev.lengths) + 1
    # one draft first, then one more a step while Algorithm 1 verifies all of it, held one past its 3
    assert [s.drafted[0] for s in res.step_trace] == [1, 2, 3, 4, 4]
    assert [s.lengths[0] for s in res.step_trace] == [1, 2, 3, 3, 3]
    k = res.step_trace[2].drafted[0]
    assert cost.draft_s(1, tokens=k) == pytest.approx(0.01 + 0.07 * (k - 1) / 7)
    assert cost.draft_s(1, tokens=None) == cost.draft_s(1, tokens=8) == 0.08 and cost.draft_s(1, tokens=0) == 0.0
    free = simulate([trace], 1, "algorithm1", cost, n_requests=1, max_steps=4, record_steps=True, adaptive_cap=False)
    assert all(s.drafted == [8] for s in free.step_trace)
    back = SimCost.from_dict(json.loads(json.dumps(cost.to_dict())))
    assert back.draft_one == cost.draft_one and back.gamma == 8

def test_prefill_is_charged_before_the_first_token_and_drain_serves_exactly_n():
    trace = RequestTrace("math", [TraceRound((0.9,), 1)], prompt_tokens=10, n_tokens=5)
    cost = SimCost(CostTable.flat(10.0), prefill_per_token_s=0.01)
    res = simulate([trace], 2, "fixed", cost, n_requests=3, drain=True)
    assert res.requests == 3
    # request 0's first token comes after its own prefill, then request 1's prefill (0.1 s) and two steps of
    # 0.1 s pass before its last; requests 1 and 2 see their two steps only (as in the engine)
    assert res.per_user_tokens_per_s == pytest.approx((4 / 0.3 + 4 / 0.2 + 4 / 0.2) / 3)
    assert res.elapsed_s == pytest.approx(0.2 + 0.2 + 0.1 + 0.2)


def test_the_simulator_is_deterministic_and_the_mix_is_seeded():
    gen = torch.Generator().manual_seed(1)
    traces = []
    for i in range(12):
        rounds = [TraceRound(tuple(torch.rand(4, generator=gen).tolist()), int(torch.randint(5, (1,), generator=gen)))
                  for _ in range(6)]
        traces.append(RequestTrace(("math", "code", "chat")[i % 3], rounds))
    cost = roofline_cost("h100", "8b")
    sources = {"mtp1": [RequestTrace(t.domain, [TraceRound(r.conf[:1], min(1, r.accept_len)) for r in t.rounds])
                        for t in traces]}
    policies = ["mtp1", "fixed", "threshold", "algorithm1", "async-topk"]
    one = sweep(traces, [1, 4, 16], policies, cost, sources, seed=3)
    two = sweep(traces, [1, 4, 16], policies, cost, sources, seed=3)
    assert one == two and len(one) == 15
    assert all(r["requests"] >= max(12, 2 * r["users"]) for r in one)
    assert [t.domain for t in domain_mix(traces, 0)][:3] == ["chat", "code", "math"]
    assert domain_mix(traces, 0) != domain_mix(traces, 1)
    # the load-aware policies shrink the budget as the load grows past the roofline's ridge
    big = sweep(traces, [1, 256], ["algorithm1"], cost, requests_per_user=1)
    assert big[1]["mean_verify_budget"] < big[0]["mean_verify_budget"]
    assert big[1]["aggregate_tokens_per_s"] > big[0]["aggregate_tokens_per_s"]


def test_bad_traces_are_refused():
    with pytest.raises(LabkitError, match="accept_len"):
        TraceRound((0.5, 0.5), 3)
    with pytest.raises(LabkitError, match="probabilities"):
        TraceRound((1.5,), 0)
    with pytest.raises(LabkitError, match="no request traces"):
        simulate([], 1, "fixed", flat_cost())
    with pytest.raises(LabkitError, match="unknown scheduler policy"):
        sweep([RequestTrace("math", [TraceRound((0.5,), 0)])], [1], ["nope"], flat_cost())


# ---- costs --------------------------------------------------------------------------------------------


def test_roofline_tables_are_monotone_labelled_and_ordered():
    h100, h200 = roofline_cost("h100", "8b"), roofline_cost("h200", "8b")
    for cost in (h100, h200):
        s = cost.table.smoothed_sps
        assert all(b <= a for a, b in zip(s, s[1:]))
        assert "roofline model, not measured" in cost.table.device and "not a measurement" in cost.label
        assert cost.draft(4) > 0 and cost.drafting("mtp1")(4) > 0 and cost.kv_per_request_s > 0
    assert h200.table.sps(1) > h100.table.sps(1)  # memory-bound: more bandwidth
    assert h200.table.sps(4096) == pytest.approx(h100.table.sps(4096), rel=1e-3)  # compute-bound: same flops
    assert roofline_cost("h100", "32b").table.sps(1) < h100.table.sps(1)
    # flat up to the ridge, then about 1 / B
    assert h100.table.sps(2) == h100.table.sps(1) and h100.table.sps(4000) < h100.table.sps(2000) * 0.6
    back = SimCost.from_dict(json.loads(json.dumps(h100.to_dict())))
    assert back.table.sps(700) == h100.table.sps(700) and back.drafting("mtp1") == h100.drafting("mtp1")
    assert back.draft_one == h100.draft_one and back.gamma == h100.gamma == 8
    # capped drafts run fewer slots (cut blocks): cheaper once drafting is compute-bound, never dearer
    assert h100.draft_s(256, tokens=1) < h100.draft_s(256, tokens=4) < h100.draft_s(256)
    assert h100.draft_s(1, tokens=1) <= h100.draft_s(1)
    with pytest.raises(LabkitError, match="unknown GPU"):
        roofline_cost("a100")
    with pytest.raises(LabkitError, match="unknown model size"):
        roofline_cost("h100", "7q")


# ---- Appendix A ---------------------------------------------------------------------------------------


def test_appendix_a_from_the_simulator_equals_the_arithmetic():
    sim, ref = appendix_a_simulated(), appendix_a_arithmetic()
    assert sim.theta_0 == pytest.approx(ref.theta_0) == pytest.approx(1.0)
    assert sim.theta_1 == pytest.approx(ref.theta_1) == pytest.approx(0.9)
    assert sim.theta_2["A"] == pytest.approx(1.134) and sim.theta_2["B"] == pytest.approx(0.81)
    assert sim.lengths == ref.lengths == {"algorithm1": {"A": 0, "B": 0}, "retrospective": {"A": 2, "B": 0}}
    for name in ("algorithm1", "retrospective"):
        assert sim.first_token_probs[name] == pytest.approx(ref.first_token_probs[name])
    assert sim.first_token_probs["retrospective"] == pytest.approx((0.85, 0.15))


# ---- recording and the command line -------------------------------------------------------------------


def test_record_request_observes_whole_blocks(tiny, dspark):
    """Solo decoding with every draft verified: tokens add up, accept lengths within the blocks, one-token
    rounds when capped, the same tokens as plain greedy decoding."""
    from labkit.decode.loop import generate
    prompt = [1, 2, 3, 4]
    trace, prefill_s = record_request(tiny, dspark, prompt, 14, SamplingParams(0.0), 0, domain="math")
    assert trace.n_tokens == 14 == 1 + sum(r.accept_len + 1 for r in trace.rounds) and prefill_s > 0
    solo = generate(tiny, prompt, dspark, 14, SamplingParams(0.0), 0)
    assert [r.accept_len for r in trace.rounds] == [r.accepted for r in solo.rounds]
    assert all(len(r.conf) <= 4 for r in trace.rounds)
    one, _ = record_request(tiny, dspark, prompt, 14, SamplingParams(0.0), 0, max_draft=1)
    assert all(len(r.conf) <= 1 for r in one.rounds) and one.n_tokens == 14


def test_a_one_token_source_may_come_from_a_drafter_without_confidences(tiny):
    """The trained MTP-1 (a one-token DFlash, no confidence head) records the `mtp1` source: one draft a
    round, the draft's own probability in the confidence's place, the accept lengths of solo decoding;
    asked for whole blocks it is refused with the reason."""
    from labkit.decode.loop import generate
    from labkit.drafters.dflash import DFlashDrafter
    from test_dflash import make_backbone
    mtp = DFlashDrafter(make_backbone(tiny, gamma=1))
    assert not mtp.has_confidences
    trace, _ = record_request(tiny, mtp, [1, 2, 3, 4], 14, SamplingParams(0.0), 0, max_draft=1)
    solo = generate(tiny, [1, 2, 3, 4], mtp, 14, SamplingParams(0.0), 0)
    assert [r.accept_len for r in trace.rounds] == [r.accepted for r in solo.rounds]
    assert all(len(r.conf) == 1 and 0 < r.conf[0] <= 1 for r in trace.rounds[:-1])
    with pytest.raises(LabkitError, match="confidence head"):
        record_request(tiny, mtp, [1, 2, 3, 4], 14, SamplingParams(0.0), 0)


def hand_made_file(path, with_cpu: bool = True) -> TraceFile:
    gen = torch.Generator().manual_seed(0)
    sets = []
    for temp in (0.0, 1.0):
        for source, cap in (("block", None), ("mtp1", 1)):
            reqs = []
            for i in range(6):
                k = 4 if cap is None else 1
                rounds = [TraceRound(tuple(torch.rand(k, generator=gen).tolist()),
                                     int(torch.randint(k + 1, (1,), generator=gen))) for _ in range(5)]
                reqs.append(RequestTrace(("math", "code", "chat")[i % 3], rounds, prompt_tokens=20, prompt=f"p{i}"))
            sets.append(TraceSet(source, temp, cap, reqs))
    cpu = SimCost(steep_table(0.05), DraftCost(0.01, 0.0, 0.002), prefill_per_token_s=1e-4,
                  drafts={"mtp1": DraftCost(0.01, 0.0, 0.001)}, label="hand-made") if with_cpu else None
    tf = TraceFile(sets, {"drafter": "dspark", "max_new_tokens": 16}, cpu)
    save_traces(tf, path)
    return tf


def test_trace_file_round_trips(tmp_path):
    path = tmp_path / "t.json"
    tf = hand_made_file(path)
    back = load_traces(path)
    assert back.temperatures == [0.0, 1.0] and back.meta["drafter"] == "dspark"
    assert [r.accept_len for r in back.get("block", 1.0).requests[2].rounds] == \
        [r.accept_len for r in tf.get("block", 1.0).requests[2].rounds]
    assert back.get("mtp1", 0.0).requests[0].rounds[0].conf == pytest.approx(tf.get("mtp1", 0.0).requests[0].rounds[0].conf,
                                                                              abs=1e-5)
    assert back.cpu_cost.drafting("mtp1") == DraftCost(0.01, 0.0, 0.001)
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(LabkitError, match="not a serving-trace file"):
        load_traces(tmp_path / "bad.json")


@pytest.mark.parametrize("table", ["cpu", "h200"])
def test_simulate_command_runs_on_a_trace_file(tmp_path, capsys, table):
    path, out = tmp_path / "t.json", tmp_path / "out.json"
    hand_made_file(path)
    argv = ["simulate", "--traces", str(path), "--table", table, "--users", "1", "4", "--policies", "mtp1",
            "algorithm1", "async-topk", "--json", str(out), "--figures", str(tmp_path / "figs")]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert len(res["results"]) == 2 * 2 * 3
    assert {r["temperature"] for r in res["results"]} == {0.0, 1.0}
    assert all(r["source"] == "mtp1" for r in res["results"] if r["policy"] == "mtp1")
    assert "algorithm1" in capsys.readouterr().out
    assert (tmp_path / "figs" / "simulated-fig7-T0.html").is_file()
    label = res["costs"]["label"]
    assert ("hand-made" in label) if table == "cpu" else ("not a measurement" in label)


def test_simulate_command_refuses_cpu_without_costs(tmp_path, capsys):
    path = tmp_path / "t.json"
    hand_made_file(path, with_cpu=False)
    assert main(["simulate", "--traces", str(path), "--table", "cpu"]) == 2
    assert "holds no CPU costs" in capsys.readouterr().err
    assert main(["simulate", "--traces", str(path), "--temperatures", "0.7"]) == 2
    assert "no traces at temperature 0.7" in capsys.readouterr().err


def test_simulated_figures_have_one_trace_per_policy():
    from labkit.lab.simulation_views import simulated_load, simulated_throughput_speed
    traces = [RequestTrace("math", [TraceRound((0.8, 0.6), 1), TraceRound((0.9, 0.9), 2)])] * 3
    results = sweep(traces, [1, 8], ["mtp1", "algorithm1"], roofline_cost("h100"))
    assert len(simulated_throughput_speed(results).data) == 2
    assert len(simulated_load(results, costs="x").data) == 4
    with pytest.raises(LabkitError, match="No simulation results"):
        simulated_load([])



def test_the_shipped_trace_file_is_small_and_complete():
    from labkit.measure.traces import DEFAULT_TRACES
    assert DEFAULT_TRACES.stat().st_size < 1_000_000
    tf = load_traces(DEFAULT_TRACES)
    assert tf.temperatures == [0.0, 1.0] and tf.cpu_cost is not None and "measured" in tf.cpu_cost.label
    for temp in tf.temperatures:
        block, one = tf.get("block", temp), tf.get("mtp1", temp)
        assert {d: sum(r.domain == d for r in block.requests) for d in ("math", "code", "chat")} == \
            {"math": 8, "code": 8, "chat": 8}
        assert all(len(r.conf) <= 1 for q in one.requests for r in q.rounds)
        assert [q.n_tokens for q in one.requests] == [q.n_tokens for q in block.requests] or temp > 0
