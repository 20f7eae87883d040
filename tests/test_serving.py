"""The batched serving engine (labkit.decode.engine): lossless per request, whatever else shares the batch.

Tiny random targets (tests/conftest.py) and tiny DSpark drafters with a random, non-zero Markov head
(so the confidence head's values, and with them Algorithm 1's verification lengths, depend on the
drafted tokens: the case Appendix A is about). A steep cost table makes the load-aware policies
truncate blocks at different lengths from step to step; a flat one makes them verify everything.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from labkit.decode.loop import generate
from labkit.drafters.dspark import DSparkDrafter
from labkit.drafters.layer_skip import LayerSkipDrafter
from labkit.drafters.prompt_lookup import PromptLookupDrafter
from labkit.core.errors import LabkitError
from labkit.core.sampling import SamplingParams
from labkit.core.scheduler import CostTable
from labkit.decode.engine import Engine, ServeRequest, closed_loop, open_loop, padded_batch_tokens, report
from labkit.core.scheduler import packed_tokens
from test_dspark import make_dspark
from test_lossless_tiny_model import NEW_TOKENS, PROMPT, exact_sequence_probs

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(0.0)
POLICIES = ("fixed", "mtp1", "threshold", "algorithm1", "async-topk")


def steep_table(slope: float = 1 / 3) -> CostTable:
    """Step time grows by `slope` one-token steps per extra token (default a third: worth verifying only
    the likely drafts of a few requests)."""
    sizes = list(range(1, 129))
    return CostTable(device="test", model="tiny", dtype="float32", batch_sizes=sizes,
                     raw_sps=[1.0 / (1.0 + (b - 1) * slope) for b in sizes])


@pytest.fixture(scope="module")
def tiny(make_tiny_target):
    return make_tiny_target(vocab_size=16, n_layers=3, hidden=32, init=0.2)


@pytest.fixture(scope="module")
def dspark(tiny):
    return DSparkDrafter(make_dspark(tiny, gamma=4))


def mixed_requests(n: int, params: SamplingParams = GREEDY) -> list[ServeRequest]:
    """Prompts of 1 to 12 tokens, 6 to 17 new tokens each: rows of different lengths and widths."""
    out = []
    for i in range(n):
        prompt = [(3 * i + j) % 16 for j in range(1 + (5 * i) % 12)]
        out.append(ServeRequest(i, f"request {i}", prompt, 6 + (7 * i) % 12, params, seed=i))
    return out


def solo(target, drafter, req: ServeRequest) -> list[int]:
    return generate(target, req.prompt_ids, drafter, req.max_new_tokens, req.params, req.seed).token_ids


def ticking_clock(tick: float = 0.01):
    """A deterministic engine clock: each reading is `tick` seconds after the last."""
    ticks = iter(range(10 ** 9))
    return lambda: tick * next(ticks)


def serve(target, drafter, requests, users, policy, table=None, **kw) -> tuple[Engine, dict]:
    engine = Engine(target, drafter, policy, table, **kw)
    for _ in closed_loop(requests, users, engine):
        pass
    return engine, report(engine, users, "test")


@pytest.mark.parametrize("policy", POLICIES)
def test_mixed_batch_greedy_output_equals_solo_greedy(tiny, dspark, policy):
    """9 requests through 4 slots (admissions and retirements mid-run), ragged verification lengths:
    every request's greedy tokens equal its own solo greedy decoding, token for token (fp32)."""
    requests = mixed_requests(9)
    engine, rep = serve(tiny, dspark, requests, 4, policy, steep_table())
    assert len(rep["requests"]) == 9 and all(r["token_ids"] for r in rep["requests"])
    for r in rep["requests"]:
        assert r["token_ids"] == solo(tiny, dspark, requests[r["id"]]), f"request {r['id']} under {policy}"
    truncated = sum(l < d for s in engine.steps for l, d in zip(s.lengths, s.drafted))
    if policy == "mtp1":  # it never verifies more than one draft, so the engine drafts no more than one
        assert all(d <= 1 for s in engine.steps for d in s.drafted) and truncated == 0
        assert any(l == 1 for s in engine.steps for l in s.lengths)
    elif policy in ("algorithm1", "async-topk", "threshold"):
        assert truncated > 0, "the steep table should make this policy verify fewer tokens than drafted"
    else:
        assert truncated == 0


def test_large_batch_keeps_every_request_its_own_tokens(tiny, dspark):
    """12 requests at once with prompt lookup and with DSpark: no token of one request shows up in
    another, i.e. each output is its solo output; and changing one request changes no other."""
    requests = mixed_requests(12)
    for drafter in (PromptLookupDrafter(16), dspark):
        _, rep = serve(tiny, drafter, requests, 12, "algorithm1", steep_table())
        outputs = {r["id"]: r["token_ids"] for r in rep["requests"]}
        assert outputs == {q.id: solo(tiny, drafter, q) for q in requests}
    changed = list(requests)
    changed[5] = ServeRequest(5, "changed", [15, 14, 13], 9, GREEDY, 5)
    _, rep2 = serve(tiny, dspark, changed, 12, "algorithm1", steep_table())
    _, rep1 = serve(tiny, dspark, requests, 12, "algorithm1", steep_table())
    for a, b in zip(rep1["requests"], rep2["requests"]):
        if a["id"] != 5:
            assert a["token_ids"] == b["token_ids"]


def test_fixed_policy_sampled_output_is_the_solo_output(tiny, dspark):
    """Temperature 1 under the fixed policy: a request's draws come from its own generator in the same
    order as solo decoding, so its sampled tokens do not depend on who else is in the batch."""
    requests = mixed_requests(8, SamplingParams(1.0))
    _, rep = serve(tiny, dspark, requests, 3, "fixed")
    for r in rep["requests"]:
        assert r["token_ids"] == solo(tiny, dspark, requests[r["id"]])


#: the engine's sampled test: requests, significance level, and the fewest degrees of freedom left after
#: pooling cells of expected count < 5 (fewer and the test could not reject anything)
SAMPLED_N, SAMPLED_ALPHA, SAMPLED_MIN_DF = 1200, 0.001, 10


def wrong_judge(state, proposal, logits):
    """A deliberately wrong verifier: every draft accepted as if the target agreed (p_t := the drafter's
    own probabilities at the drafted positions), the bonus token from the target. Its output follows the
    drafter, not the target: the control that the sampled test must reject."""
    from labkit.core.sampling import logits_to_probs, verify_chain
    p_t = logits_to_probs(logits, state.params)
    q = proposal.probs.to(p_t.device)
    return verify_chain(proposal.tokens, q, torch.cat([q, p_t[len(q):]]), state.generator)


@pytest.mark.parametrize("verifier", ["exact", "wrong"])
@pytest.mark.parametrize("policy", ["algorithm1", "algorithm1-layout", "algorithm1-column", "async-topk"])
def test_sampled_engine_output_follows_the_target(make_tiny_target, chi2_gof, policy, verifier, monkeypatch):
    """SAMPLED_N requests of PROMPT, 4 new tokens each at temperature 1, 8 users at a time, a DSpark
    drafter whose confidences depend on the drafted tokens, and a cost table (1% more step time per
    token) under which the policy truncates blocks differently from step to step: the emitted sequences
    pass a chi-square test against the target's exact distribution over all 8^4 sequences at alpha
    SAMPLED_ALPHA with at least SAMPLED_MIN_DF degrees of freedom (fixed seeds: deterministic); the same
    test rejects the wrong verifier (`wrong_judge`) at the same alpha. The layout-aware policy runs with
    an attention weight of about 1 a query column (a parity of 8 cached tokens), so its first-draft
    search, not the break, decides which first drafts are verified."""
    import labkit.core.layout as layout
    import labkit.decode.loop as loop
    monkeypatch.setattr(layout, "ATTENTION_PARITY_TOKENS", 8)
    target = make_tiny_target(vocab_size=8, n_layers=2, tied=True, init=0.5)
    torch.manual_seed(0)
    drafter = DSparkDrafter(make_dspark(target, gamma=3, rank=4, scale=1.0))
    params = SamplingParams(1.0)
    exact = exact_sequence_probs(target, PROMPT, NEW_TOKENS, params)
    requests = [ServeRequest(i, "p", PROMPT, NEW_TOKENS, params, seed=i) for i in range(SAMPLED_N)]
    if verifier == "wrong":
        monkeypatch.setattr(loop, "judge", wrong_judge)
    # a clock that ticks per reading: the engine's measured drafting time, part of its step price, is then
    # the same every run, so the verification lengths, and with them the draws, are too
    engine, rep = serve(target, drafter, requests, 8, policy, steep_table(0.01), clock=ticking_clock())
    counts = Counter(tuple(r["token_ids"]) for r in rep["requests"])
    seqs = list(exact)
    fit = chi2_gof([counts[s] for s in seqs], [exact[s] for s in seqs], min_df=SAMPLED_MIN_DF)
    if verifier == "exact":
        lengths = Counter(l for s in engine.steps for l in s.lengths)
        assert len(lengths) >= 2, f"the policy should pick several verification lengths, got {dict(lengths)}"
        assert fit.impossible == 0
        assert not fit.rejects(SAMPLED_ALPHA), f"chi-square {fit.statistic:.1f} on {fit.df} df, p = {fit.p_value:.2e}"
    else:
        assert fit.rejects(SAMPLED_ALPHA), f"the wrong verifier passed: p = {fit.p_value:.2e} on {fit.df} df"


def test_a_failing_request_leaves_the_others_unchanged(tiny, dspark):
    """An empty prompt and a prompt past the model's window get an error entry each; every other request
    gets exactly the tokens it gets without them."""
    good = mixed_requests(5)
    window = tiny.config.max_position_embeddings
    bad = [ServeRequest(90, "", [], 8, GREEDY, 0), ServeRequest(91, "long", [1] * window, 8, GREEDY, 0)]
    mixed = good[:2] + bad[:1] + good[2:4] + bad[1:] + good[4:]
    _, rep = serve(tiny, dspark, mixed, 3, "algorithm1", steep_table())
    _, clean = serve(tiny, dspark, good, 3, "algorithm1", steep_table())
    errors = [r for r in rep["requests"] if "error" in r]
    assert len(errors) == 2
    assert "empty" in errors[0]["error"] and "window" in errors[1]["error"]
    by_prompt = {r["prompt"]: r["token_ids"] for r in rep["requests"] if "error" not in r}
    assert by_prompt == {r["prompt"]: r["token_ids"] for r in clean["requests"]}


def test_no_request_starves(tiny, dspark):
    """With 10 users and a steep table (where most drafts are not worth verifying), every active request
    still verifies at least its anchor each step: each step advances every request by at least one token."""
    requests = mixed_requests(10)
    engine = Engine(tiny, dspark, "algorithm1", steep_table())
    progress = {}
    for _ in closed_loop(requests, 10, engine):
        for rid, act in engine.active.items():
            n = len(act.state.new_ids)
            assert n > progress.get(rid, 0), f"request {rid} made no progress in a step"
            progress[rid] = n
    assert all(r.finished for r in engine.done)


def test_flat_table_verifies_every_draft(tiny, dspark):
    """An unprofiled (flat) cost table read as it is (cost_model "table", the default): Algorithm 1
    degenerates to verify-all, as SGLang's path does. (cost_model "fit" prices steps by the engine's own
    measurements once it has some, profiled table or not: tests/test_step_fit.py.)"""
    engine, _ = serve(tiny, dspark, mixed_requests(6), 3, "algorithm1", CostTable.flat(), cost_model="table")
    assert all(s.lengths == s.drafted for s in engine.steps)


def test_batch_tokens_count_real_tokens_packed_and_the_padding_padded(tiny, dspark):
    """The scheduler is told what the forward computes: packed (the default), the real tokens
    sum_r (1 + l_r), the paper's B; padded, R rows x (1 + the longest l)."""
    assert padded_batch_tokens([0, 3, 1]) == 12 and packed_tokens([0, 3, 1]) == 7
    engine, _ = serve(tiny, dspark, mixed_requests(6), 3, "fixed")
    assert engine.batch_tokens is packed_tokens
    assert all(s.batch_tokens == s.active + sum(s.lengths) for s in engine.steps)
    assert any(s.batch_tokens < s.active * (1 + max(s.lengths)) for s in engine.steps)  # ragged steps happened
    engine, _ = serve(tiny, dspark, mixed_requests(6), 3, "fixed", packed=False)
    assert engine.batch_tokens is padded_batch_tokens
    assert all(s.batch_tokens == s.active * (1 + max(s.lengths)) for s in engine.steps)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_both_layouts_and_batched_admission_give_solo_greedy(tiny, dspark, packed):
    """Packed and padded engines, 7 requests through 3 slots, several admitted at once: greedy outputs
    equal solo greedy token for token; a bad request in an admission batch is refused alone."""
    requests = mixed_requests(7)
    engine = Engine(tiny, dspark, "algorithm1", steep_table(), packed=packed)
    bad = ServeRequest(99, "bad", [tiny.vocab_size + 5], 4, requests[0].params, 0)
    refused = engine.add_many([requests[0], bad, requests[1], requests[2]])
    assert list(refused) == [99] and "outside" in refused[99].error and len(engine.active) == 3
    while engine.active:
        engine.step()
    for r in requests[3:]:
        engine.add_many([r])
    while engine.active:
        engine.step()
    done = {r.id: r for r in engine.done if r.finished}
    for req in requests:
        assert done[req.id].token_ids == solo(tiny, dspark, req), req.id


def test_layer_skip_is_refused_with_the_fix(tiny):
    with pytest.raises(LabkitError, match="single-request"):
        Engine(tiny, LayerSkipDrafter(tiny), "fixed")


def test_policy_changes_between_steps_act_on_the_running_engine(tiny, dspark):
    requests = mixed_requests(6)
    engine = Engine(tiny, dspark, "fixed", steep_table())
    for i, _ in enumerate(closed_loop(requests, 3, engine)):
        if i == 2:
            engine.set_policy("mtp1")
            engine.max_draft = 1
    assert all(l <= 1 for s in engine.steps[3:] for l in s.lengths)
    assert any(l > 1 for s in engine.steps[:3] for l in s.lengths)


def test_open_loop_serves_every_arrival(tiny, dspark):
    engine = Engine(tiny, dspark, "algorithm1", steep_table())
    for _ in open_loop(mixed_requests(5), rate=200.0, max_batch=2, engine=engine):
        assert len(engine.active) <= 2
    assert sorted(r.id for r in engine.done) == list(range(5))
    assert all(r.ttft_s is not None and r.ttft_s >= 0 for r in engine.done)


def test_report_holds_the_documented_keys(tiny, dspark):
    _, rep = serve(tiny, dspark, mixed_requests(4), 2, "algorithm1", steep_table())
    for key in ("policy", "users", "device", "drafter", "aggregate_tokens_per_s", "per_user_tokens_per_s",
                "mean_verify_budget", "acceptance_by_position", "steps", "requests"):
        assert key in rep
    for r in rep["requests"]:
        assert {"id", "prompt", "token_ids", "text", "tokens_per_s", "ttft_s", "rounds"} <= set(r)
    assert 1.0 <= rep["mean_verify_budget"] <= 5.0
    json.dumps(rep)  # serialisable as is


@pytest.mark.slow
def test_serve_command_writes_its_json(tiny_model_dir, tmp_path):
    """`python -m labkit serve` on a saved tiny model: one entry per prompt, an empty prompt refused in its own entry."""
    from labkit.__main__ import main
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"turns": [t]}) for t in ["Hello there", "", "Count to five"]))
    out = tmp_path / "serve.json"
    code = main(["serve", "--prompts", str(prompts), "--target", str(tiny_model_dir), "--drafter", "prompt-lookup",
                 "--users", "2", "--max-new-tokens", "8", "--policy", "algorithm1",
                 "--table", str(tmp_path / "tables.json"), "--json", str(out)])
    assert code == 0
    rep = json.loads(out.read_text())
    assert [("error" in r) for r in rep["requests"]] == [False, True, False]
    assert all(len(r["token_ids"]) > 0 for r in rep["requests"] if "error" not in r)
    assert json.loads((tmp_path / "tables.json").read_text())  # the profiled table was stored


@pytest.mark.slow
def test_real_target_engine_greedy_equals_solo(real_target):
    """The shipped DSpark drafter on the real target, 3 chat prompts through 2 slots: solo greedy tokens."""
    from labkit.drafters import make_drafter
    drafter = make_drafter("dspark", real_target)
    texts = ["What is 12 * 7?", "Write a haiku about rain.", "def fib(n):"]
    requests = [ServeRequest(i, t, real_target.encode_prompt(t), 24, GREEDY, i) for i, t in enumerate(texts)]
    table = CostTable(device="test", model="real", dtype="float32", batch_sizes=[1, 8, 32],
                      raw_sps=[1.0, 0.8, 0.3])
    _, rep = serve(real_target, drafter, requests, 2, "algorithm1", table)
    for r in rep["requests"]:
        assert r["token_ids"] == solo(real_target, drafter, requests[r["id"]])


def test_tokens_stream_in_order_as_they_are_emitted(tiny, dspark):
    """on_tokens gets each request's tokens as they come (first token at admission, then per step):
    concatenated per request they are exactly its output."""
    streamed: dict[int, list[int]] = {}
    engine = Engine(tiny, dspark, "algorithm1", steep_table(),
                    on_tokens=lambda rid, toks: streamed.setdefault(rid, []).extend(toks))
    for _ in closed_loop(mixed_requests(5), 2, engine):
        pass
    assert streamed == {r.id: r.token_ids for r in engine.done}


def test_a_length_choosing_policy_drafts_one_past_each_requests_last_length(tiny, dspark):
    """Algorithm 1 under a steep table: every request drafts at most one more token than the length the
    policy chose for it at its last step (the adaptive cap, per request), a newcomer the last step's
    longest (at least one; one at the first step), never a whole block it would not verify; a fixed policy
    is not capped that way; and greedy outputs still equal solo greedy."""
    requests = mixed_requests(6)
    engine, rep = serve(tiny, dspark, requests, 3, "algorithm1", steep_table())
    last: dict[int, int] = {}
    for prev, step in zip(engine.steps, engine.steps[1:]):
        last.update(zip(prev.ids, prev.lengths))
        for rid, cap, drafted in zip(step.ids, step.caps, step.drafted):
            assert cap == (last[rid] + 1 if rid in last else max(1, max(prev.lengths, default=0)))
            assert drafted <= cap
        assert step.cap == max(step.caps)
    assert engine.steps[0].caps == [1] * len(engine.steps[0].ids)  # nothing known yet: one draft each
    assert any(s.cap < dspark.gamma for s in engine.steps[1:])
    # caps differ within a step: a request verified short drafts less than one verified deep
    assert any(len(set(s.caps)) > 1 for s in engine.steps[1:])
    for r in rep["requests"]:
        assert r["token_ids"] == solo(tiny, dspark, requests[r["id"]])
    fixed, _ = serve(tiny, dspark, requests, 3, "fixed", steep_table(slope=1.0))
    assert all(s.cap is None for s in fixed.steps)
    uncapped, _ = serve(tiny, dspark, requests, 3, "algorithm1", steep_table(slope=1.0), adaptive_cap=False)
    assert all(s.cap is None for s in uncapped.steps)


def test_policies_read_confidences_corrected_by_the_engines_own_verdicts(tiny, dspark):
    """With recalibration (the default) each step's recorded confidences, what the policy read, are the
    drafter's times the ratio learnt from earlier steps only; without it they are the drafter's. Greedy
    outputs equal solo greedy either way."""
    requests = mixed_requests(6)
    on, _ = serve(tiny, dspark, requests, 3, "algorithm1", steep_table())
    off, _ = serve(tiny, dspark, requests, 3, "algorithm1", steep_table(), recalibrate=False)
    assert set(on.acceptance) == {0.0} and off.acceptance == {}
    ratios = on.acceptance[0.0].ratios
    assert any(abs(x - 1.0) > 1e-3 for x in ratios)  # the tiny drafter is far from calibrated
    assert on.steps[0].conf == off.steps[0].conf  # nothing learnt before the first verdicts
    for engine in (on, off):
        for rec in engine.done:
            assert rec.token_ids == solo(tiny, dspark, next(r for r in requests if r.id == rec.id))


def test_a_probing_policy_drafts_past_a_held_length_only_on_probe_steps(tiny, dspark):
    """`algorithm1-column` probes every 4th step (`probe_every`): each step's caps follow `next_draft_cap` and
    `held_after` from the steps before, some request was held at its length off a probe step, and a held
    request never drafted past its length off a probe step."""
    from labkit.core.scheduler import held_after, newcomer_cap, next_draft_cap
    engine, _ = serve(tiny, dspark, mixed_requests(12), 4, "algorithm1-column", steep_table(0.15))
    assert engine.policy.probe_every == 4
    held: dict[int, bool] = {}
    last: dict[int, int] = {}
    kept = 0
    for i, step in enumerate(engine.steps):
        newcomer = newcomer_cap(engine.steps[i - 1].lengths if i else None)
        for rid, cap, length in zip(step.ids, step.caps, step.lengths):
            assert cap == next_draft_cap(last.get(rid), held.get(rid, False), newcomer, i, 4, step.probe_may_pay)
            if held.get(rid) and (i % 4 or not step.probe_may_pay):
                assert cap == max(last[rid], 1)
                kept += 1
            held[rid] = held_after(length, cap, held.get(rid, False), i, 4, step.probe_may_pay)
            last[rid] = length
    assert kept > 0, "no request was ever held at its length: the probe period was never exercised"


def test_a_probe_not_expected_to_pay_is_not_drafted(tiny, dspark):
    """Where a step costs so much more per token that no draft past the held widths is expected to raise
    theta (`next_column_may_pay`), the probe steps draft nothing past them; where one may, they do."""
    dear, _ = serve(tiny, dspark, mixed_requests(8), 4, "algorithm1-column", steep_table(5.0))
    skipped = [s for i, s in enumerate(dear.steps) if i and i % 4 == 0 and not s.probe_may_pay]
    assert skipped, "no probe step was skipped under a price no draft is expected to pay"
    for s in skipped:
        assert all(c == 1 for c in s.caps), s.caps  # held at no draft verified: one draft, never two
    cheap, _ = serve(tiny, dspark, mixed_requests(8), 4, "algorithm1-column", steep_table(0.01))
    assert any(s.probe_may_pay for i, s in enumerate(cheap.steps) if i and i % 4 == 0)
