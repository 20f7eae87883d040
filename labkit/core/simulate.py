"""Trace-driven serving simulation: recorded rounds, the scheduler's own policies and a cost table, past this machine.

Paper references (DSpark): Sec. 3.2.2 (Algorithm 1), Sec. 5.2 (the production variant), Sec. 5.3 and
Figs. 7-8 (throughput against per-user speed and against concurrency), Appendix A (the counterexample).

The batched engine (`labkit.decode.engine`) measures what this CPU does at 1-16 users. Fig. 7 and Fig. 8
are about a GPU at up to hundreds of concurrent requests. This module gets there without a GPU by
replaying what decoding really produced through the very policy functions the engine calls
(`labkit.core.scheduler.make_policy`) and a cost table:

1. `replay_steps`: an engine's recorded step trace (`StepRecord`: request ids, each request's
   confidences, the drafting cost the step charged) and its table in, the verification lengths out.
   The production variant's confidences of two steps before are rebuilt from the trace's own history,
   request by request, as the engine keeps them. Same table, same policy, same batch-token count: the
   engine's lengths exactly (tests/test_simulate.py).
2. `simulate`: a closed loop of N users over recorded request traces (`RequestTrace`: one request's
   rounds, each its drafted confidences c_1..c_k and `accept_len`, the drafts the target accepted when
   the whole block was verified). Every step the policy picks l_r from the confidences (those of two
   steps before for the production variant), accepted = min(l_r, accept_len), emitted = accepted + 1,
   and the step costs drafting(R) + KV reads(R) + 1 / SPS(B). It reports aggregate throughput, per-user
   speed, the verification budget per request and tau, like the engine's `report`.
3. `roofline_cost`: a named GPU (H100, H200) and model size as a cost table whose device says it is
   a model, not a measurement.
4. `appendix_a_simulated`: the Appendix A counterexample run through `simulate`; it gives the numbers of
   `labkit.core.scheduler.appendix_a_arithmetic`.

THE APPROXIMATION. A request's rounds come from one recording in which every round verified its whole
block. When the simulated policy verifies fewer drafts than the recording accepted, the request emits
fewer tokens this step, yet its next round's confidences and accept length are still the recorded
next round's, which was drafted after a longer verified prefix: the next round does not depend on the
verified length, as it would in real decoding. The acceptance process (how confident, how often right,
how that varies by domain and position) is real; the exact token path past a truncation is not. A
request still emits exactly its recorded number of tokens (it goes round its rounds again when it
needs more), so every policy serves the same work. Under a policy that verifies every draft (`fixed`)
and the one-token trace under `mtp1`, nothing is approximated but costs.

A "trained MTP-1" is a trace of one-token rounds (its own accept outcomes, recorded with one draft a
round) run with the `mtp1` policy: `sweep` takes a trace source per policy (`sources`) for that.

Determinism: a simulation is a pure function of its inputs; the only random choice, the order in which
the domain mix queues requests (`domain_mix`), is seeded.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from labkit.core.errors import LabkitError
from labkit.core.step_fit import StepRate
from labkit.core.scheduler import (APPENDIX_A_P_D, APPENDIX_A_P_T, AppendixAArithmetic, CostTable, HasSPS, POLICIES,
                                   RoundRate, ScheduleInput, _first_token_a_given, appendix_a_a1, appendix_a_c2,
                                   appendix_a_table, expected_throughput, held_after, make_policy, newcomer_cap,
                                   next_draft_cap, packed_tokens, whole_number)

# ---------------------------------------------------------------------------------------------------
# 1. Exact replay of an engine's step trace


def _get(step, name: str):
    """A field of a `StepRecord` or of its dict in `report(...)["step_trace"]`."""
    return step[name] if isinstance(step, dict) else getattr(step, name)


def _optional(step, name: str):
    """A field of a step that traces recorded before it existed lack (None then)."""
    return step.get(name) if isinstance(step, dict) else getattr(step, name, None)


def _as_table(table) -> HasSPS:
    if isinstance(table, dict):
        return CostTable.from_dict(table)
    if not callable(getattr(table, "sps", None)):
        raise LabkitError("replay needs the engine's cost table: a CostTable or its to_dict() (a serve report's "
                          "'table').")
    return table


def _conf_rows(confs: Sequence[Sequence[float]], gamma: int) -> torch.Tensor:
    out = torch.zeros(len(confs), gamma, dtype=torch.float64)
    for i, c in enumerate(confs):
        if len(c):
            out[i, :len(c)] = torch.tensor([float(x) for x in c], dtype=torch.float64)
    return out


class ConfHistory:
    """Each request's confidences of its last two steps, as the engine keeps them: the production variant
    reads the older one (`old`), truncated to the current step's width; a request seen in fewer than two
    earlier steps is new (None: survival 1 at each of its current slots). A request absent from the
    previous step starts afresh (the engine drops a retired request's history)."""

    def __init__(self):
        self._hist: dict[int, deque] = {}
        self._last_ids: set[int] = set()

    def old(self, ids: Sequence[int], gamma: int) -> tuple[torch.Tensor, list[int | None]]:
        for rid in ids:
            if rid not in self._last_ids or rid not in self._hist:
                self._hist[rid] = deque(maxlen=2)
        old = torch.zeros(len(ids), gamma, dtype=torch.float64)
        lengths: list[int | None] = []
        for i, rid in enumerate(ids):
            hist = self._hist[rid]
            if len(hist) == 2:
                c = list(hist[0])[:gamma]
                if c:
                    old[i, :len(c)] = torch.tensor(c, dtype=torch.float64)
                lengths.append(len(c))
            else:
                lengths.append(None)
        return old, lengths

    def push(self, ids: Sequence[int], confs: Sequence[Sequence[float]]) -> None:
        for rid, c in zip(ids, confs):
            self._hist[rid].append([float(x) for x in c])
        for rid in self._last_ids - set(ids):
            self._hist.pop(rid, None)
        self._last_ids = set(ids)


def replay_steps(step_trace: Sequence, table, policy, batch_tokens: Callable[[list[int]], int] = packed_tokens,
                 **policy_kw) -> list[list[int]]:
    """The verification lengths `policy` gives each recorded step of an engine run.

    step_trace: the engine's `StepRecord`s or `report(...)["step_trace"]`; each step needs `ids`, `conf`
    and `draft_cost_s`. table: the engine's `CostTable` (or its dict, `report(...)["table"]`). Each step
    is asked as the engine asked it: conf padded with zeros to the step's widest block, the step's
    `RoundRate(table, draft_cost_s * R)` (None counts as 0), or its `StepRate` where the engine's own fit
    priced it (`step_cost`), or `RoundRate(table, offset_s)` where its measured offset did, the table read
    at `price_rows` requests where the step was priced by rows (`CostTable.at_rows`), the production
    variant's confidences of two steps before from this trace's own history, and the step's
    `attention_weight` (0 where the trace has none). `batch_tokens` must be the count the engine used.
    """
    table = _as_table(table)
    policy = make_policy(policy, **policy_kw) if isinstance(policy, str) else policy
    history = ConfHistory()
    out = []
    for n, step in enumerate(step_trace):
        ids, confs = list(_get(step, "ids")), list(_get(step, "conf"))
        if len(ids) != len(confs):
            raise LabkitError(f"step {n} of the trace has {len(ids)} request ids but {len(confs)} confidence rows: "
                              "replay needs a trace recorded by an engine that keeps what its policy saw.")
        max_lengths = [len(c) for c in confs]
        gamma = max(max_lengths, default=0)
        old, old_lengths = history.old(ids, gamma)
        draft, fitted, offset = _get(step, "draft_cost_s"), _optional(step, "step_cost"), _optional(step, "offset_s")
        rows = _optional(step, "price_rows")
        read = table.at_rows(rows) if rows is not None else table
        rate = (StepRate(*fitted, len(ids)) if fitted is not None else
                RoundRate(read, offset if offset is not None else (draft or 0.0) * len(ids)))
        weight = _optional(step, "attention_weight")
        inp = ScheduleInput(conf=_conf_rows(confs, gamma), table=rate, max_lengths=max_lengths,
                            batch_tokens=batch_tokens, old_conf=old, old_max_lengths=old_lengths,
                            attention_weight=weight or 0.0)
        out.append(list(policy(inp)))
        history.push(ids, confs)
    return out


# ---------------------------------------------------------------------------------------------------
# 2. Recorded requests


@dataclass(frozen=True)
class TraceRound:
    """One recorded round: the drafted block's calibrated confidences c_1..c_k and how many of its k drafts
    the target accepted when all k were verified (0..k)."""

    conf: tuple[float, ...]
    accept_len: int

    def __post_init__(self):
        object.__setattr__(self, "conf", tuple(float(c) for c in self.conf))
        a = whole_number(self.accept_len, "a round's accept_len")
        if not 0 <= a <= len(self.conf):
            raise LabkitError(f"a round's accept_len must lie in 0..{len(self.conf)} (its drafts), got {a}.")
        if not all(0.0 <= c <= 1.0 for c in self.conf):
            raise LabkitError(f"a round's confidences must be probabilities in [0, 1], got {list(self.conf)}.")
        object.__setattr__(self, "accept_len", a)


@dataclass
class RequestTrace:
    """One request as decoding produced it: its rounds in order, its domain, prompt length and the tokens it
    emitted in all (the first one, from the prompt forward, included)."""

    domain: str
    rounds: list[TraceRound]
    prompt_tokens: int = 0
    n_tokens: int | None = None  # default: 1 + sum of (accept_len + 1)
    prompt: str | None = None

    def __post_init__(self):
        self.rounds = [r if isinstance(r, TraceRound) else TraceRound(*r) for r in self.rounds]
        if not self.rounds:
            raise LabkitError(f"a request trace needs at least one round ({self.domain}): record a longer answer.")
        if self.n_tokens is None:
            self.n_tokens = 1 + sum(r.accept_len + 1 for r in self.rounds)
        self.n_tokens = whole_number(self.n_tokens, "a request's n_tokens")
        if self.n_tokens < 2:
            raise LabkitError(f"a request trace must emit at least 2 tokens, got {self.n_tokens}.")

    def to_dict(self) -> dict:
        out = {"domain": self.domain, "prompt_tokens": self.prompt_tokens, "n_tokens": self.n_tokens,
               "rounds": [{"c": [round(c, 5) for c in r.conf], "a": r.accept_len} for r in self.rounds]}
        if self.prompt is not None:
            out["prompt"] = self.prompt
        return out

    @classmethod
    def from_dict(cls, d: dict) -> RequestTrace:
        try:
            rounds = [TraceRound(tuple(r["c"]), r["a"]) for r in d["rounds"]]
            return cls(d["domain"], rounds, d.get("prompt_tokens", 0), d.get("n_tokens"), d.get("prompt"))
        except (KeyError, TypeError) as exc:
            raise LabkitError(f"not a request trace ({exc!r} missing or malformed): record the traces again with "
                              "`python -m labkit record-traces`.") from exc


def domain_mix(requests: Sequence[RequestTrace], seed: int = 0) -> list[RequestTrace]:
    """The requests queued as a fixed mix of domains: each domain's requests in a seeded shuffled order,
    then the domains interleaved (math, code, chat, math, ...), so that every load sees the same mix."""
    by_domain: dict[str, list[RequestTrace]] = {}
    for r in requests:
        by_domain.setdefault(r.domain, []).append(r)
    gen = torch.Generator().manual_seed(seed)
    queues = []
    for d in sorted(by_domain):
        order = torch.randperm(len(by_domain[d]), generator=gen).tolist()
        queues.append([by_domain[d][i] for i in order])
    out = []
    for i in range(max((len(q) for q in queues), default=0)):
        out += [q[i] for q in queues if i < len(q)]
    return out


# ---------------------------------------------------------------------------------------------------
# Costs: the verify table plus what a step costs whatever its lengths


@dataclass
class DraftCost:
    """Seconds to draft one step for R requests: launch_s + max(floor_s, per_request_s * R) (0 at R = 0).

    A measured CPU fits launch + per-request (floor 0); a GPU roofline has a memory-bound floor (the
    drafter's weights read once) and a compute slope."""

    launch_s: float = 0.0
    floor_s: float = 0.0
    per_request_s: float = 0.0

    def __post_init__(self):
        for k, v in asdict(self).items():
            if not (isinstance(v, (int, float)) and 0.0 <= v < math.inf):
                raise LabkitError(f"a drafting cost's {k} must be a finite number of seconds >= 0, got {v!r}.")

    def __call__(self, requests: int) -> float:
        if requests <= 0:
            return 0.0
        return self.launch_s + max(self.floor_s, self.per_request_s * requests)


@dataclass
class SimCost:
    """What a simulated step costs: drafting(R) + kv_per_request_s * R (KV reads, which do not depend on
    the lengths) + 1 / table.sps(B); a request's admission costs prefill_per_token_s per prompt token.

    `draft` is the drafter's cost for a whole block of `gamma` drafts; `draft_one`, where given, the same
    drafter's cost for one draft a request, and a step whose drafts are capped at k pays the line between
    the two (the sequential head's steps; the engine caps drafting under load). `drafts` names another
    drafter's cost for a trace source (e.g. "mtp1": a one-token drafter). `label` says where the numbers
    came from (measured on which device, or a model)."""

    table: CostTable
    draft: DraftCost = field(default_factory=DraftCost)
    kv_per_request_s: float = 0.0
    prefill_per_token_s: float = 0.0
    drafts: dict[str, DraftCost] = field(default_factory=dict)
    label: str = ""
    draft_one: DraftCost | None = None
    gamma: int | None = None

    def drafting(self, source: str | None = None) -> DraftCost:
        return self.drafts.get(source, self.draft) if source is not None else self.draft

    def draft_s(self, requests: int, source: str | None = None, tokens: int | None = None) -> float:
        """Seconds of drafting for `requests` requests, each at most `tokens` drafts (None: a whole block)."""
        full = self.drafting(source)(requests)
        if source is not None or tokens is None or self.draft_one is None or not self.gamma or tokens >= self.gamma:
            return full
        if tokens <= 0:
            return 0.0  # the engine does not call the drafter for a request that may draft nothing
        one = self.draft_one(requests)
        return one + (full - one) * (tokens - 1) / max(1, self.gamma - 1)

    def fixed_s(self, requests: int, source: str | None = None, tokens: int | None = None) -> float:
        """The step's seconds that do not depend on the verification lengths."""
        return self.draft_s(requests, source, tokens) + self.kv_per_request_s * requests

    def to_dict(self) -> dict:
        return {"label": self.label, "table": self.table.to_dict(), "draft": asdict(self.draft),
                "drafts": {k: asdict(v) for k, v in self.drafts.items()},
                "draft_one": asdict(self.draft_one) if self.draft_one is not None else None, "gamma": self.gamma,
                "kv_per_request_s": self.kv_per_request_s, "prefill_per_token_s": self.prefill_per_token_s}

    @classmethod
    def from_dict(cls, d: dict) -> SimCost:
        try:
            one = d.get("draft_one")
            return cls(CostTable.from_dict(d["table"]), DraftCost(**d.get("draft", {})),
                       float(d.get("kv_per_request_s", 0.0)), float(d.get("prefill_per_token_s", 0.0)),
                       {k: DraftCost(**v) for k, v in d.get("drafts", {}).items()}, d.get("label", ""),
                       DraftCost(**one) if one else None, d.get("gamma"))
        except (KeyError, TypeError) as exc:
            raise LabkitError(f"not a simulation cost ({exc!r}): pass a table JSON with 'table' (a cost table) and "
                              "optionally 'draft' {launch_s, floor_s, per_request_s}.") from exc


# ---------------------------------------------------------------------------------------------------
# 3. A roofline model of a GPU


@dataclass(frozen=True)
class GPU:
    name: str
    bandwidth: float  # bytes / s, HBM
    flops: float  # dense bf16 FLOP / s
    memory: float  # bytes


#: datasheet numbers (SXM parts, dense bf16 without sparsity)
GPUS = {"h100": GPU("H100", 3.35e12, 989e12, 80e9), "h200": GPU("H200", 4.8e12, 989e12, 141e9)}


@dataclass(frozen=True)
class ModelSize:
    """A target model by size: parameters, KV bytes a token (bf16: 2 x layers x kv_heads x head_dim x 2),
    and the drafters' parameters read a step (assumed: DSpark as shipped here, two decoder layers of the
    target's width, a cut LM head and the Markov head; MTP-1, one layer and the full LM head)."""

    name: str
    params: float
    layers: int
    kv_heads: int
    head_dim: int
    draft_params: float
    mtp_params: float

    @property
    def kv_bytes_per_token(self) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2


MODEL_SIZES = {
    "135m": ModelSize("SmolLM2-135M", 1.35e8, 30, 3, 64, draft_params=1.8e7, mtp_params=3.3e7),
    "8b": ModelSize("8B (Qwen3-8B shape)", 8.2e9, 36, 8, 128, draft_params=5.0e8, mtp_params=8.3e8),
    "32b": ModelSize("32B (Qwen3-32B shape)", 32.8e9, 64, 8, 128, draft_params=1.3e9, mtp_params=1.4e9),
}


def _batch_grid(max_tokens: int) -> list[int]:
    return list(range(1, 257)) + list(range(264, max(max_tokens, 264) + 8, 8))


def roofline_cost(gpu: str = "h100", model: str = "8b", context: int = 1024, gamma: int = 8,
                  bytes_per_param: float = 2.0, bandwidth_eff: float = 0.8, flops_eff: float = 0.6,
                  launch_s: float = 5e-4, draft_launch_s: float = 2e-4, max_tokens: int = 4096) -> SimCost:
    """A cost model of `model` on `gpu`, NOT a measurement (the table's device says so).

    Target forward over B tokens: launch_s + max(weight bytes / bandwidth, 2 * params * B / flops), at
    the attainable fractions `bandwidth_eff` and `flops_eff` of the datasheet's numbers. Each request
    also reads its KV cache once a step (`context` tokens of kv_bytes_per_token), a per-request term
    that does not depend on l_r. Drafting R requests: draft_launch_s + max(drafter bytes / bandwidth,
    2 * draft_params * gamma * R / flops) (MTP-1: one token a request, its own parameters); a step whose
    drafts are capped at k runs k slots of each block (the engine's cut blocks, `fit_block`), priced on
    the line from one slot to the whole block (`SimCost.draft_s`). Prefill is
    left out (a disaggregated prefill, as in the paper's deployment). Memory capacity is not modelled:
    `fits(users)` says whether weights and KV caches would fit.
    """
    if gpu not in GPUS:
        raise LabkitError(f"unknown GPU {gpu!r} for the roofline model: choose one of {', '.join(GPUS)}.")
    if model not in MODEL_SIZES:
        raise LabkitError(f"unknown model size {model!r} for the roofline model: choose one of {', '.join(MODEL_SIZES)}.")
    for name, v in (("context", context), ("gamma", gamma), ("max_tokens", max_tokens)):
        if whole_number(v, name) < 1:
            raise LabkitError(f"{name} must be >= 1, got {v}.")
    if not (0 < bandwidth_eff <= 1 and 0 < flops_eff <= 1):
        raise LabkitError(f"bandwidth_eff and flops_eff are fractions in (0, 1], got {bandwidth_eff}, {flops_eff}.")
    g, m = GPUS[gpu], MODEL_SIZES[model]
    bw, fl = g.bandwidth * bandwidth_eff, g.flops * flops_eff
    sizes = _batch_grid(max_tokens)
    step = [launch_s + max(m.params * bytes_per_param / bw, 2 * m.params * b / fl) for b in sizes]
    sps = [1.0 / s for s in step]
    table = CostTable(device=f"{g.name} (roofline model, not measured)",
                      model=f"{m.name}, {m.params:.3g} params, {bytes_per_param:g} bytes/param",
                      dtype="bf16" if bytes_per_param == 2 else f"{bytes_per_param:g} bytes",
                      batch_sizes=sizes, raw_sps=sps, smoothed_sps=list(sps))
    draft = DraftCost(draft_launch_s, m.draft_params * bytes_per_param / bw, 2 * m.draft_params * gamma / fl)
    one = DraftCost(draft_launch_s, m.draft_params * bytes_per_param / bw, 2 * m.draft_params / fl)
    mtp = DraftCost(draft_launch_s, m.mtp_params * bytes_per_param / bw, 2 * m.mtp_params / fl)
    label = (f"roofline model of {m.name} on an {g.name} ({g.bandwidth / 1e12:g} TB/s x {bandwidth_eff:g}, "
             f"{g.flops / 1e12:g} TFLOP/s x {flops_eff:g}, launch {launch_s * 1e3:g} ms, KV of {context} tokens "
             f"a request, prefill not counted): a model, not a measurement")
    return SimCost(table, draft, kv_per_request_s=m.kv_bytes_per_token * context / bw, prefill_per_token_s=0.0,
                   drafts={"mtp1": mtp}, label=label, draft_one=one, gamma=gamma)


def roofline_fits(gpu: str, model: str, users: int, context: int = 1024, bytes_per_param: float = 2.0) -> bool:
    """Whether the weights and `users` KV caches of `context` tokens fit in the GPU's memory."""
    g, m = GPUS[gpu], MODEL_SIZES[model]
    return m.params * bytes_per_param + users * context * m.kv_bytes_per_token <= g.memory


# ---------------------------------------------------------------------------------------------------
# 4. The closed-loop simulator


@dataclass
class SimStep:
    t_s: float
    ids: list[int]
    lengths: list[int]
    drafted: list[int]
    accepted: list[int]
    batch_tokens: int
    seconds: float
    theta: float  # the policy's objective at the chosen lengths: expected tokens x steps per second


@dataclass
class _Live:
    id: int
    trace: RequestTrace
    first_token_s: float
    emitted: int = 1
    cursor: int = 0
    rounds: int = 0


@dataclass
class SimResult:
    """One simulated run, in the keys of the engine's `report` where they mean the same."""

    policy: str
    users: int
    source: str
    aggregate_tokens_per_s: float | None
    per_user_tokens_per_s: float | None
    mean_verify_budget: float | None
    tau: float | None
    wasted_verification: float | None
    mean_batch_tokens: float | None
    elapsed_s: float
    steps: int
    requests: int
    step_trace: list[SimStep] = field(default_factory=list)

    def to_dict(self, with_steps: bool = False) -> dict:
        d = asdict(self)
        if not with_steps:
            d.pop("step_trace")
        return d


def simulate(queue: Sequence[RequestTrace], users: int, policy, cost: SimCost, n_requests: int | None = None,
             drain: bool = False, batch_tokens: Callable[[list[int]], int] = packed_tokens, source: str | None = None,
             max_steps: int | None = None, record_steps: bool = False, adaptive_cap: bool = True) -> SimResult:
    """`users` users in a closed loop over `queue` (taken in order, round and round), one policy.

    Each user sends the next queued request as soon as its last one finished; a request's admission
    costs its prefill (`cost.prefill_per_token_s`), which, as in the engine, passes before its first
    token. Without `drain` the queue never runs dry and the run stops once `n_requests` requests
    (default 2 x users) finished: every step has all users active. With `drain` exactly `n_requests`
    are queued and the run goes on until the last one finished, as the engine's `closed_loop` does.

    A step: each active request drafts its current round (at most its remaining tokens - 1 drafts, at
    most the policy's `draft_cap`, and, with `adaptive_cap`, for a policy that chooses lengths from
    confidences at most one more than the length it chose for that request at its last step, a newcomer
    the last step's longest (`newcomer_cap`), held at its length between probes where the policy has a
    `probe_every`, a probe skipped where its `probe_may_pay` says no (`next_draft_cap`): the engine's
    `Engine.draft_caps`, charged as a batch drafted to its deepest cap); the policy gets the confidences, the
    step's `RoundRate(cost.table, cost.fixed_s(R))` and, for the production variant, each request's
    confidences of two steps before; accepted = min(l_r, accept_len); the step takes
    cost.fixed_s(R) + 1 / cost.table.sps(batch_tokens(l)). `source` names the drafting cost to charge
    (`SimCost.drafts`). See the module docstring for what is approximated.
    """
    users = whole_number(users, "users")
    if users < 1:
        raise LabkitError(f"users must be at least 1, got {users}.")
    if not queue:
        raise LabkitError("the simulation has no request traces: record some (`python -m labkit record-traces`).")
    n_requests = 2 * users if n_requests is None else whole_number(n_requests, "n_requests")
    if n_requests < 1:
        raise LabkitError(f"n_requests must be at least 1, got {n_requests}.")
    name = policy if isinstance(policy, str) else getattr(policy, "name", type(policy).__name__)
    policy = make_policy(policy) if isinstance(policy, str) else policy
    policy_cap = getattr(policy, "draft_cap", None)
    adaptive = adaptive_cap and getattr(policy, "chooses_lengths", False)
    last_lengths: list[int] | None = None
    last_length: dict[int, int] = {}
    held: dict[int, bool] = {}
    probe_every = getattr(policy, "probe_every", None)
    probe_may_pay, may_pay = getattr(policy, "probe_may_pay", None), True
    table = cost.table
    t = 0.0
    next_id = 0
    active: dict[int, _Live] = {}
    history = ConfHistory()
    finished_speeds: list[float] = []
    finished = 0
    steps: list[SimStep] = []
    n_steps = verified = emitted_steps = accepted_total = active_total = tokens_total = rounds = batch_total = 0

    def refill() -> None:
        nonlocal next_id, t
        while len(active) < users and (next_id < n_requests if drain else finished < n_requests):
            trace = queue[next_id % len(queue)]
            t += cost.prefill_per_token_s * trace.prompt_tokens
            active[next_id] = _Live(next_id, trace, first_token_s=t)
            next_id += 1

    refill()
    while active and (drain or finished < n_requests) and (max_steps is None or n_steps < max_steps):
        ids = list(active)
        newcomer = newcomer_cap(last_lengths) if adaptive else None
        confs, accept, caps = [], [], []
        for rid in ids:
            own = next_draft_cap(last_length.get(rid), held.get(rid, False), newcomer, n_steps,
                                 probe_every, may_pay) if adaptive else None
            limits = [c for c in (policy_cap, own) if c is not None]
            caps.append(min(limits) if limits else None)
            live = active[rid]
            rnd = live.trace.rounds[live.cursor % len(live.trace.rounds)]
            k = max(0, live.trace.n_tokens - live.emitted - 1)
            if caps[-1] is not None:
                k = min(k, caps[-1])
            c = rnd.conf[:k]
            confs.append(c)
            accept.append(min(rnd.accept_len, len(c)))
        max_lengths = [len(c) for c in confs]
        gamma = max(max_lengths, default=0)
        old, old_lengths = history.old(ids, gamma)
        deepest = None if None in caps else max(caps, default=None)
        fixed = cost.fixed_s(len(ids), source, deepest)
        rate = table if fixed == 0.0 else RoundRate(table, fixed)
        inp = ScheduleInput(conf=_conf_rows(confs, gamma), table=rate, max_lengths=max_lengths,
                            batch_tokens=batch_tokens, old_conf=old, old_max_lengths=old_lengths)
        lengths = list(policy(inp))
        last_lengths = lengths
        last_length.update(zip(ids, lengths))
        held.update((rid, held_after(l, c, held.get(rid, False), n_steps, probe_every, may_pay))
                    for rid, l, c in zip(ids, lengths, caps))
        may_pay = True if probe_may_pay is None else bool(probe_may_pay(inp, lengths))
        history.push(ids, confs)
        accepted = [min(l, a) for l, a in zip(lengths, accept)]
        b = batch_tokens(lengths)
        seconds = fixed + 1.0 / table.sps(b)
        t += seconds
        n_steps += 1
        verified += sum(lengths) + len(ids)
        accepted_total += sum(accepted)
        active_total += len(ids)
        batch_total += b
        tokens_total += sum(accepted) + len(ids)
        if record_steps:
            steps.append(SimStep(t, ids, lengths, max_lengths, accepted, b, seconds, expected_throughput(inp, lengths)))
        for rid, n in zip(ids, accepted):
            live = active[rid]
            live.emitted += n + 1
            live.cursor += 1
            live.rounds += 1
        for rid in ids:
            live = active[rid]
            if live.emitted >= live.trace.n_tokens:
                del active[rid]
                last_length.pop(rid, None)
                finished += 1
                elapsed = t - live.first_token_s
                if elapsed > 0:
                    finished_speeds.append((live.emitted - 1) / elapsed)
        refill()
    rounds = active_total
    first_tokens = next_id  # every admitted request's first token came from its prefill
    return SimResult(
        policy=name, users=users, source=source or "",
        aggregate_tokens_per_s=(tokens_total + first_tokens) / t if t > 0 else None,
        per_user_tokens_per_s=sum(finished_speeds) / len(finished_speeds) if finished_speeds else None,
        mean_verify_budget=verified / active_total if active_total else None,
        tau=(accepted_total + rounds) / rounds if rounds else None,
        wasted_verification=(verified - active_total - accepted_total) / verified if verified else None,
        mean_batch_tokens=batch_total / n_steps if n_steps else None,
        elapsed_s=t, steps=n_steps, requests=finished, step_trace=steps)


def sweep(traces: Sequence[RequestTrace], users: Sequence[int], policies: Sequence[str], cost: SimCost,
          sources: dict[str, Sequence[RequestTrace]] | None = None, requests_per_user: int = 2, seed: int = 0,
          batch_tokens: Callable[[list[int]], int] = packed_tokens,
          on_run: Callable[[SimResult], None] | None = None) -> list[dict]:
    """Every policy at every load, on the same domain mix (`domain_mix(traces, seed)`): one result dict
    per (policy, users), Fig. 7 and Fig. 8's points. Every load finishes whole copies of the mix, at
    least `requests_per_user` x users requests (so one user serves every request of the mix too).
    `sources` gives a policy its own traces (and the drafting cost of the same name in `cost.drafts`),
    e.g. {"mtp1": one-token rounds}. `on_run` is called after each run (a progress bar)."""
    for p in policies:
        if p not in POLICIES:
            make_policy(p)  # the one-line error naming the choices
    sources = sources or {}
    queues = {p: domain_mix(sources.get(p, traces), seed) for p in policies}
    out = []
    for u in users:
        for p in policies:
            src = p if p in sources else None
            mix = len(queues[p])
            n = mix * max(1, math.ceil(requests_per_user * u / mix))
            res = simulate(queues[p], u, p, cost, n_requests=n, batch_tokens=batch_tokens, source=src)
            out.append(res.to_dict())
            if on_run is not None:
                on_run(res)
    return out


# ---------------------------------------------------------------------------------------------------
# 5. Appendix A through the simulator


def appendix_a_simulated() -> AppendixAArithmetic:
    """Appendix A's numbers from `simulate`: one user, one step, conf [a_1, c2(x1)] for x1 = A and B, the
    paper's SPS curve, no drafting cost. theta_k comes from the step the simulator runs under a fixed
    cap of k drafts; each policy's l from the step it runs under that policy; P(Y) from those lengths
    (the first token is the verified draft's outcome when x1 is admitted, a fresh draw from p_t when not).
    Equal to `labkit.core.scheduler.appendix_a_arithmetic()`."""
    cost = SimCost(appendix_a_table(), label="Appendix A")
    request = {x: RequestTrace("appendix-a", [TraceRound((appendix_a_a1(), appendix_a_c2(i)), 0)], n_tokens=10)
               for i, x in enumerate("AB")}

    def step(x: str, policy) -> SimStep:
        # both drafts exist before the policy decides, as in the appendix: no adaptive cap
        return simulate([request[x]], 1, policy, cost, max_steps=1, record_steps=True,
                        adaptive_cap=False).step_trace[0]

    fixed = [make_policy("fixed", cap=k) for k in range(3)]
    out = AppendixAArithmetic(appendix_a_a1(), step("A", fixed[0]).theta, step("A", fixed[1]).theta,
                              {x: step(x, fixed[2]).theta for x in "AB"})
    for name in ("algorithm1", "retrospective"):
        out.lengths[name] = {x: step(x, name).lengths[0] for x in "AB"}
        p_a = sum(APPENDIX_A_P_D[i] * (_first_token_a_given(i) if out.lengths[name][x] >= 1 else APPENDIX_A_P_T[0])
                  for i, x in enumerate("AB"))
        out.first_token_probs[name] = (p_a, 1.0 - p_a)
    return out
