"""Fault isolation in the batched engine (labkit.decode.engine): one request's failure is its own.

A request whose drafting or context update raises, or whose verification gets non-finite logits, is retired with the
error in its own record (and the tokens it had), and every other request's output is exactly what it
would have been alone: greedy, and sampled under the fixed policy (whose sampled outputs equal solo
decoding, so a rewound generator is checked too).
"""

from __future__ import annotations

import pytest
import torch

from labkit.core.sampling import SamplingParams
from labkit.decode.engine import Engine, closed_loop
from labkit.drafters.dspark import DSparkDrafter
from test_dspark import make_dspark
from test_serving import GREEDY, mixed_requests, solo, steep_table

pytestmark = pytest.mark.usefixtures("one_thread")

BAD = 2  # the request that fails


@pytest.fixture(scope="module")
def tiny(make_tiny_target):
    return make_tiny_target(vocab_size=16, n_layers=3, hidden=32, init=0.2)


class Armed(DSparkDrafter):
    """A DSpark drafter that knows one prompt to fail for, once it has emitted a few tokens (mid-run)."""

    def __init__(self, model, bad_prompt: list[int]):
        super().__init__(model)
        self.bad_prompt, self.armed = list(bad_prompt), True

    def _is_bad(self, request) -> bool:
        n = len(self.bad_prompt)
        return self.armed and request.ids[:n] == self.bad_prompt and len(request.ids) > n + 2


class FaultyDSpark(Armed):
    """Drafting raises for the bad prompt: its batched call raises for the whole batch after every request
    drew its samples, as a crash late in a batched forward would (so the engine must rewind the innocent
    requests' generators)."""

    def propose(self, request, max_tokens):
        if self._is_bad(request):
            raise RuntimeError("injected drafter fault")
        return super().propose(request, max_tokens)

    def propose_many(self, requests, max_tokens):
        out = super().propose_many(requests, max_tokens)  # every request has drawn from its generator
        if any(self._is_bad(r) for r in requests):
            raise RuntimeError("injected drafter fault")
        return out


class FaultyObserver(Armed):
    """The context update raises for the bad prompt: the batched `observe_many` raises before changing
    anything, and that request's own `observe` raises too."""

    def observe(self, request, n_accepted, hidden):
        if self._is_bad(request):
            raise RuntimeError("injected observe fault")
        return super().observe(request, n_accepted, hidden)

    def observe_many(self, requests, n_accepted, hidden):
        if any(self._is_bad(r) for r in requests):
            raise RuntimeError("injected observe fault")
        return super().observe_many(requests, n_accepted, hidden)


def run(engine: Engine, requests, users: int = 4) -> dict[int, object]:
    for _ in closed_loop(requests, users, engine):
        pass
    return {r.id: r for r in engine.done}


FAULTS = {"drafting": (FaultyDSpark, "drafting failed", "injected drafter fault"),
          "context update": (FaultyObserver, "verification failed", "injected observe fault")}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("params", [GREEDY, SamplingParams(1.0)], ids=["greedy", "T=1"])
def test_a_drafter_fault_retires_that_request_alone(tiny, params, fault):
    """Drafting or the context update raises for one request mid-run: it alone is retired, with the
    phase and the error in its record and the tokens it had; every other request equals solo decoding."""
    cls, phase, message = FAULTS[fault]
    requests = mixed_requests(7, params)
    drafter = cls(make_dspark(tiny, gamma=4), requests[BAD].prompt_ids)
    done = run(Engine(tiny, drafter, "fixed", steep_table()), requests)
    assert phase in done[BAD].error and message in done[BAD].error
    assert not done[BAD].finished and len(done[BAD].token_ids) >= 3  # it had emitted tokens before the fault
    drafter.armed = False
    for req in requests:
        if req.id != BAD:
            assert done[req.id].finished and done[req.id].error is None
            assert done[req.id].token_ids == solo(tiny, drafter, req), req.id


@pytest.mark.parametrize("policy", ["fixed", "algorithm1"])
def test_non_finite_logits_retire_that_request_alone(tiny, policy, monkeypatch):
    requests = mixed_requests(7)
    drafter = DSparkDrafter(make_dspark(tiny, gamma=4))
    engine = Engine(tiny, drafter, policy, steep_table())
    real_step, calls = engine.kv.step, []

    def poisoned(inputs):
        out = real_step(inputs)
        calls.append(1)
        if BAD in out and len(calls) >= 2:
            logits, hidden = out[BAD]
            out[BAD] = (torch.full_like(logits, float("nan")), hidden)
        return out

    monkeypatch.setattr(engine.kv, "step", poisoned)
    done = run(engine, requests)
    assert "not finite" in done[BAD].error and not done[BAD].finished
    assert BAD not in engine.kv.keys
    for req in requests:
        if req.id != BAD:
            assert done[req.id].finished and done[req.id].token_ids == solo(tiny, drafter, req), req.id


def test_a_failed_request_is_reported_with_its_error(tiny):
    from labkit.decode.engine import report
    requests = mixed_requests(5)
    drafter = FaultyDSpark(make_dspark(tiny, gamma=4), requests[BAD].prompt_ids)
    engine = Engine(tiny, drafter, "algorithm1", steep_table())
    run(engine, requests, users=3)
    rep = report(engine, 3, "faulty")
    errors = {r["id"]: r.get("error") for r in rep["requests"]}
    assert "drafting failed" in errors[BAD] and sum(e is not None for e in errors.values()) == 1
