"""Whole engine steps as a cost table (labkit.measure.step_profile) and the engine's cost model "steps".

Tiny random target and DSpark drafter (tests/test_serving.py's); timings are only checked for shape and
count, never for speed.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from labkit.core.errors import LabkitError
from labkit.core.simulate import replay_steps
from labkit.decode.engine import Engine, closed_loop, report
from labkit.measure import step_profile
from labkit.measure.step_profile import VerifyWidth, profile_engine_steps, step_table_for
from labkit.measure.sweeps import sweep
from test_serving import dspark, mixed_requests, ticking_clock, tiny  # noqa: F401 (fixtures)
from test_step_fit import shaped_table

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_profiling_policy_drafts_its_width_and_verifies_it(tiny, dspark):
    engine = Engine(tiny, dspark, "mtp1")
    engine.add_many([replace(r, max_new_tokens=40) for r in mixed_requests(3)])
    for width in (0, 2, 1, 3):
        engine.policy = VerifyWidth(width)
        rec = engine.step()
        assert rec.caps == [max(width, 1)] * 3
        assert rec.lengths == [width] * 3


def test_the_profile_times_every_shape_and_keeps_whole_steps_as_rows_by_width(tiny, dspark):
    table, points = profile_engine_steps(tiny, dspark, "tiny-dspark", rows=(3, 1), widths=(2, 0, 1), kv_len=8,
                                         repeats=3)
    assert [(p["rows"], p["drafts"]) for p in points] == [(r, w) for r in (1, 3) for w in (0, 1, 2)]
    for p in points:
        assert p["width"] == 1 + p["drafts"] and p["batch_tokens"] == p["rows"] * p["width"]
        assert len(p["samples_s"]) == 3 and all(s > 0 for s in p["samples_s"])
        assert p["seconds"] == sorted(p["samples_s"])[1]
    assert sorted((s.rows, s.width) for s in table.shapes) == [(r, w) for r in (1, 3) for w in (1, 2, 3)]
    assert "tiny-dspark" in table.model and tiny.name in table.model


def test_a_sampled_profile_serves_sampled_requests_and_names_its_temperature(tiny, dspark, monkeypatch):
    served = []

    class Recording(step_profile.Engine):
        def add_many(self, requests):
            served.extend(r.params for r in requests)
            return super().add_many(requests)

    monkeypatch.setattr(step_profile, "Engine", Recording)
    sampled, _ = profile_engine_steps(tiny, dspark, "d", rows=(2,), widths=(0, 1), kv_len=8, repeats=1,
                                      temperature=1.0)
    assert served and all(p.temperature == 1.0 for p in served)
    served.clear()
    greedy, _ = profile_engine_steps(tiny, dspark, "d", rows=(2,), widths=(0, 1), kv_len=8, repeats=1)
    assert served and all(p.greedy for p in served)
    assert sampled.model.endswith("(engine steps, T=1)") and greedy.model.endswith("(engine steps)")


def test_the_profile_refuses_widths_the_block_cannot_draft_and_requests_past_the_window(tiny, dspark):
    with pytest.raises(LabkitError, match="widths up to 3"):
        profile_engine_steps(tiny, dspark, "d", rows=(1,), widths=(0, 4), kv_len=8, repeats=1)
    with pytest.raises(LabkitError, match="window of 256"):
        profile_engine_steps(tiny, dspark, "d", rows=(1,), widths=(0, 3), kv_len=250, repeats=1)


def test_a_stored_step_table_is_read_back_not_profiled_again(tiny, dspark, tmp_path, monkeypatch):
    calls = []
    real = step_profile.profile_engine_steps

    def counted(*args, **kw):
        calls.append(1)
        return real(*args, **{**kw, "rows": (1, 2), "widths": (0, 1), "kv_len": 8, "repeats": 1})

    monkeypatch.setattr(step_profile, "profile_engine_steps", counted)
    path = tmp_path / "tables.json"
    first = step_table_for(tiny, dspark, "tiny-dspark", path, progress=False)
    again = step_table_for(tiny, dspark, "tiny-dspark", path, progress=False)
    assert len(calls) == 1 and again.to_dict() == first.to_dict()
    step_table_for(tiny, dspark, "another-drafter", path, progress=False)
    step_table_for(tiny, dspark, "tiny-dspark", path, reprofile=True, progress=False)
    assert len(calls) == 3


def test_the_steps_model_prices_each_step_by_its_rows_with_nothing_added_and_replays_exactly(tiny, dspark):
    """cost_model="steps": the table already holds drafting, so the step's RoundRate adds 0 seconds (recorded
    as offset_s) at the step's own row count (price_rows); the replay through JSON gives every length."""
    table = shaped_table()
    engine = Engine(tiny, dspark, "algorithm1-column", table, clock=ticking_clock(), cost_model="steps")
    for _ in closed_loop(mixed_requests(10), 4, engine):
        pass
    assert [s.price_rows for s in engine.steps] == [s.active for s in engine.steps]
    assert all(s.offset_s == 0.0 for s in engine.steps)
    assert any(s.draft_cost_s for s in engine.steps), "drafting was never timed, so nothing was left out"
    rep = json.loads(json.dumps(report(engine, 4, "test")))
    assert replay_steps(rep["step_trace"], rep["table"], "algorithm1-column", batch_tokens=engine.batch_tokens) == \
        [s["lengths"] for s in rep["step_trace"]]


def test_a_sweep_arm_priced_by_steps_reads_the_step_table_and_needs_one(tiny, dspark):
    requests = mixed_requests(4)
    with pytest.raises(LabkitError, match="step_table="):
        sweep(tiny, dspark, requests, [2], ["algorithm1-column~steps"], shaped_table(), requests_per_user=2)
    steps = shaped_table()
    steps.model = "tiny + tiny-dspark (engine steps)"
    reps = sweep(tiny, dspark, requests, [2], ["algorithm1-column", "algorithm1-column~steps"], shaped_table(),
                 requests_per_user=2, step_table=steps)
    by = {r["policy"]: r for r in reps}
    assert by["algorithm1-column~steps"]["table"]["model"] == steps.model
    assert all(s["offset_s"] == 0.0 for s in by["algorithm1-column~steps"]["step_trace"])
    assert by["algorithm1-column"]["table"]["model"] == "tiny"


def test_profiled_requests_run_through_the_targets_stop_tokens(make_tiny_target, dspark):
    """A target that stops on every token still profiles full rows: the profile ignores stop tokens."""
    stops = make_tiny_target(vocab_size=16, n_layers=3, hidden=32, init=0.2, eos=set(range(16)))
    _, points = profile_engine_steps(stops, dspark, "d", rows=(2,), widths=(0, 1), kv_len=8, repeats=2)
    assert [len(p["samples_s"]) for p in points] == [2, 2]


def test_each_round_starts_from_fresh_requests_so_caches_do_not_grow_through_the_profile(tiny, dspark, monkeypatch):
    """Whatever the repeats, every profiled step sees a context of kv_len plus at most one round's tokens."""
    seen = []
    real_step = step_profile.Engine.step

    def spy(engine):
        seen.append(max(len(a.state.ids) for a in engine.active.values()))
        return real_step(engine)

    monkeypatch.setattr(step_profile.Engine, "step", spy)
    profile_engine_steps(tiny, dspark, "d", rows=(2,), widths=(0, 3), kv_len=8, repeats=12)
    assert len(seen) == 13 * 3  # per round: one untimed first step, then each width once
    assert max(seen) <= 8 + 3 * 4


def test_step_rows_put_each_whole_step_beside_its_forward_where_the_table_profiled_that_shape():
    from labkit.lab.scheduler_views import STEP_HEADER, step_rows
    steps = [{"rows": 2, "width": 1, "drafts": 0, "seconds": 0.05, "samples_s": [0.04, 0.05, 0.06]},
             {"rows": 2, "width": 2, "drafts": 1, "seconds": 0.08, "samples_s": [0.08]}]
    rows = step_rows(steps, [{"rows": 2, "width": 2, "seconds": 0.06}])
    assert all(len(r) == len(STEP_HEADER) for r in rows)
    assert rows[0][3] == "-" and rows[0][4] == "-"
    assert rows[1][2] == "80.0 [80.0-80.0]" and rows[1][3] == "60.0" and rows[1][4] == "+20.0"
