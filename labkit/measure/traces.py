"""Request traces for the serving simulator, recorded by real decoding; this CPU's costs; the check against the engine.

`labkit.core.simulate` replays what decoding produced through the scheduler's policies and a cost
table. This module makes its inputs on a real target:

- `record_request` / `record_traces`: solo decoding with a shipped drafter, verifying the WHOLE block
  every round, so each round's accept length (how many of its drafts the target accepts) is observed
  with the drafter's calibrated confidences beside it; by domain, per sampling temperature. A second
  source, "mtp1", decodes with one draft a round, whose rounds the simulator's `mtp1` runs exactly: by
  the trained MTP-1 (a one-token drafter of its own, `one_drafter`) or by the block drafter's first
  position.
- `measure_draft_cost`, `cpu_cost`: this CPU's costs in the simulator's terms: the engine's SPS(B)
  table (`labkit.decode.engine.cost_table_for`), the batched drafting time against the number of
  requests (one `propose_many` call, as the engine drafts), a prefill time per prompt token.
- `save_traces` / `load_traces`: one JSON file (`TraceFile`) with the sets, the CPU costs and how it
  was made; `data/serving/` ships one.
- `validate`: the engine and the simulator side by side on the same prompts, table and policy at a few
  loads, on this CPU: what the simulator is worth where it can be checked.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from labkit.core.errors import LabkitError
from labkit.core.sampling import SamplingParams
from labkit.core.simulate import DraftCost, RequestTrace, SimCost, TraceRound, simulate
from labkit.decode import loop as decoding
from labkit.drafters.base import Drafter, Proposal
from labkit.model.target import Target
from labkit.model.timing import sync_device, timed_runs

FORMAT = "labkit-serving-traces"
#: the trace file the lab ships (data/serving/README.md says how it was made)
DEFAULT_TRACES = Path(__file__).resolve().parents[2] / "data" / "serving" / "traces.json"
#: the trace sources: the drafter's full blocks, and one draft a round (the simulator's trained MTP-1)
SOURCES = {"block": None, "mtp1": 1}


def record_request(target: Target, drafter: Drafter, prompt_ids: list[int], max_new_tokens: int,
                   params: SamplingParams, seed: int, max_draft: int | None = None, domain: str = "",
                   prompt: str | None = None) -> tuple[RequestTrace, float]:
    """Decode one prompt alone, verifying every drafted token each round (at most `max_draft` a round),
    and keep each round's calibrated confidences and accept length; also the prefill's seconds.

    The round is `labkit.decode.loop.speculative_round`'s phases, with the proposal's confidences read
    before it is judged. A one-token source (`max_draft` 1) may come from a drafter without a confidence
    head (the trained MTP-1): its rounds keep the draft's own probability in the confidence's place,
    which the `mtp1` policy that replays them never reads."""
    if max_draft != 1 and not drafter.has_confidences:
        raise LabkitError("recording serving traces needs a drafter with a confidence head (dspark or a DSpark "
                          "checkpoint): the simulator's policies read its calibrated confidences.")
    state = decoding.prefill(target, prompt_ids, max_new_tokens, params, seed, drafter)
    rounds = []
    while not state.finished:
        k = state.remaining - 1 if max_draft is None else min(max_draft, state.remaining - 1)
        proposal = (drafter.propose(state.request, k).truncate(k) if k > 0
                    else Proposal.empty(state.vocab_size, state.generator.device))
        conf = [] if len(proposal) == 0 else _confidences(proposal).float().clamp(0, 1).tolist()
        inputs = decoding.verify_inputs(state, proposal)
        logits, hidden = target.forward(inputs, state.cache, logits_to_keep=len(inputs),
                                        hidden_states=bool(decoding.hidden_layers(drafter)))
        verdict = decoding.judge(state, proposal, logits)
        drop = decoding.positions_to_drop(proposal, verdict)
        if drop:
            state.cache.crop(-drop)
        decoding.advance(state, proposal, verdict, decoding.select_hidden(hidden, drafter), drafter)
        rounds.append(TraceRound(tuple(conf), verdict.n_accepted))
    trace = RequestTrace(domain, rounds, len(prompt_ids), len(state.new_ids), prompt)
    return trace, state.prefill_s


def _confidences(proposal: Proposal) -> torch.Tensor:
    """The proposal's calibrated confidences, or where it has none the probability of each drafted token."""
    if proposal.confidences is not None:
        return proposal.confidences
    return proposal.probs[torch.arange(len(proposal)), proposal.tokens]


@dataclass
class TraceSet:
    """The requests of one source at one sampling temperature."""

    source: str
    temperature: float
    max_draft: int | None
    requests: list[RequestTrace]

    def to_dict(self) -> dict:
        return {"source": self.source, "temperature": self.temperature, "max_draft": self.max_draft,
                "requests": [r.to_dict() for r in self.requests]}

    @classmethod
    def from_dict(cls, d: dict) -> TraceSet:
        return cls(d["source"], float(d["temperature"]), d.get("max_draft"),
                   [RequestTrace.from_dict(r) for r in d["requests"]])


@dataclass
class TraceFile:
    sets: list[TraceSet]
    meta: dict = field(default_factory=dict)
    cpu_cost: SimCost | None = None

    def get(self, source: str, temperature: float) -> TraceSet | None:
        return next((s for s in self.sets if s.source == source and s.temperature == temperature), None)

    @property
    def temperatures(self) -> list[float]:
        return sorted({s.temperature for s in self.sets})

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": 1, **self.meta, "sets": [s.to_dict() for s in self.sets],
                "cpu_cost": self.cpu_cost.to_dict() if self.cpu_cost is not None else None}


def save_traces(trace_file: TraceFile, path: str | Path) -> None:
    """Write the file atomically (compact JSON: one line a request)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    d = trace_file.to_dict()
    sets = d.pop("sets")
    head = json.dumps(d, indent=1)[:-2]
    body = ",\n".join(
        json.dumps({k: v for k, v in s.items() if k != "requests"})[:-1] + ', "requests": [\n'
        + ",\n".join(json.dumps(r, separators=(",", ":")) for r in s["requests"]) + "]}"
        for s in sets)
    text = head + ',\n "sets": [\n' + body + "]\n}\n"
    json.loads(text)  # the hand-joined layout must still be one JSON document
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_traces(path: str | Path) -> TraceFile:
    path = Path(path)
    if not path.is_file():
        raise LabkitError(f"no trace file at {path}: pass --traces data/serving/traces.json, or record one with "
                          "`python -m labkit record-traces --out FILE`.")
    try:
        d = json.loads(path.read_text())
    except ValueError as exc:
        raise LabkitError(f"{path} is not JSON ({exc}): record the traces again.") from exc
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise LabkitError(f"{path} is not a serving-trace file (format {FORMAT!r}): record one with "
                          "`python -m labkit record-traces --out FILE`.")
    try:
        sets = [TraceSet.from_dict(s) for s in d["sets"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise LabkitError(f"{path} has a malformed trace set ({exc!r}): record the traces again.") from exc
    if not sets:
        raise LabkitError(f"{path} holds no trace sets: record the traces again.")
    cpu = SimCost.from_dict(d["cpu_cost"]) if d.get("cpu_cost") else None
    meta = {k: v for k, v in d.items() if k not in ("format", "version", "sets", "cpu_cost")}
    return TraceFile(sets, meta, cpu)


# ---- this CPU's costs -------------------------------------------------------------------------------


def _fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares a + b x, both clamped at 0 (a time and a time per request)."""
    n = len(xs)
    if n == 1:
        return 0.0, max(0.0, ys[0] / xs[0])
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx)
    return max(0.0, my - b * mx), b


@torch.inference_mode()
def measure_draft_cost(target: Target, drafter: Drafter, prompts_ids: Sequence[list[int]],
                       rows: Sequence[int] = (1, 2, 4, 8, 16), max_tokens: int | None = None, repeats: int = 5,
                       params: SamplingParams | None = None) -> tuple[DraftCost, list[dict]]:
    """Median seconds of one `propose_many` call for R requests (the engine's drafting of a step), for
    each R in `rows`, and the line launch_s + per_request_s * R through them."""
    params = params or SamplingParams()
    states = [decoding.prefill(target, prompts_ids[i % len(prompts_ids)], 64, params, i, drafter)
              for i in range(max(rows))]
    k = max_tokens or drafter.gamma
    points = []
    for r in rows:
        reqs = [s.request for s in states[:r]]
        seconds = statistics.median(timed_runs(lambda: drafter.propose_many(reqs, [k] * r), repeats, warmup=1,
                                               sync=lambda: sync_device(target.device)))
        points.append({"requests": r, "max_tokens": k, "seconds": seconds})
    a, b = _fit_line([p["requests"] for p in points], [p["seconds"] for p in points])
    return DraftCost(launch_s=a, per_request_s=b), points


def cpu_cost(target: Target, drafter: Drafter, prompts_ids: Sequence[list[int]], prefill_s_per_token: float,
             table=None, progress: bool = False, one_drafter: Drafter | None = None) -> tuple[SimCost, dict]:
    """This device's costs for the simulator: the engine's stored SPS(B) table (profiled if absent), the
    block drafter's batched drafting cost for whole blocks and capped at one draft, the one-token
    source's (`one_drafter`, else the block drafter capped at one), the prefill time per token."""
    from labkit.decode.engine import cost_table_for
    table = table or cost_table_for(target, progress=progress)
    block, block_points = measure_draft_cost(target, drafter, prompts_ids)
    first, first_points = measure_draft_cost(target, drafter, prompts_ids, max_tokens=1)
    one, one_points = (first, first_points) if one_drafter is None else \
        measure_draft_cost(target, one_drafter, prompts_ids, max_tokens=1)
    label = (f"measured on this machine ({table.device}, {table.model}, {table.dtype}, "
             f"{torch.get_num_threads()} torch threads)")
    cost = SimCost(table, block, 0.0, prefill_s_per_token, {"mtp1": one}, label, draft_one=first, gamma=drafter.gamma)
    return cost, {"block": block_points, "first": first_points, "mtp1": one_points}


# ---- recording --------------------------------------------------------------------------------------


def record_traces(target: Target, drafter: Drafter, prompts: Sequence, max_new_tokens: int = 128,
                  temperatures: Sequence[float] = (0.0, 1.0), sources: dict[str, int | None] | None = None,
                  seed: int = 0, progress: bool = False, meta: dict | None = None,
                  one_drafter: Drafter | None = None) -> TraceFile:
    """Every prompt (`labkit.pipeline.prompt_sets.Prompt`s: text and domain) decoded alone at every
    temperature for every source (default: the drafter's full blocks and one draft a round, by
    `one_drafter` where given), prompt i with seed `seed + i`. The median prefill time per prompt token
    goes into the meta; this CPU's other costs come from `add_cpu_costs`."""
    sources = dict(SOURCES if sources is None else sources)
    encoded = [target.encode_prompt(p.text) for p in prompts]
    sets, prefill = [], []
    total = len(temperatures) * len(sources) * len(prompts)
    with tqdm(total=total, desc="recording traces", unit="req", disable=not progress) as bar:
        for temp in temperatures:
            params = SamplingParams(temperature=temp)
            for name, cap in sources.items():
                reqs = []
                for i, (p, ids) in enumerate(zip(prompts, encoded)):
                    by = one_drafter if cap == 1 and one_drafter is not None else drafter
                    trace, pre = record_request(target, by, ids, max_new_tokens, params, seed + i, cap,
                                                p.domain, p.text)
                    reqs.append(trace)
                    prefill.append(pre / max(1, len(ids)))
                    bar.update(1)
                sets.append(TraceSet(name, float(temp), cap, reqs))
    meta = {"target": target.name, "dtype": str(target.dtype).removeprefix("torch."), "device": str(target.device),
            "max_new_tokens": max_new_tokens, "seed": seed, "recorded": time.strftime("%Y-%m-%d"),
            "torch_threads": torch.get_num_threads(), "prefill_s_per_token": statistics.median(prefill),
            **(meta or {})}
    return TraceFile(sets, meta)


def add_cpu_costs(traces: TraceFile, target: Target, drafter: Drafter, table=None, progress: bool = False,
                  one_drafter: Drafter | None = None) -> None:
    """Measure this machine's costs (`cpu_cost`) on the file's own prompts and keep them in it."""
    prompts = [r.prompt for s in traces.sets for r in s.requests if r.prompt]
    if not prompts:
        raise LabkitError("the trace file's requests carry no prompt text to measure drafting on: record it again.")
    encoded = [target.encode_prompt(p) for p in dict.fromkeys(prompts)]
    prefill = traces.meta.get("prefill_s_per_token")
    if prefill is None:
        states = [decoding.prefill(target, ids, 2, SamplingParams(), 0, drafter) for ids in encoded[:8]]
        prefill = statistics.median(s.prefill_s / len(ids) for s, ids in zip(states, encoded))
    traces.cpu_cost, points = cpu_cost(target, drafter, encoded, prefill, table, progress, one_drafter)
    traces.meta["cpu_draft_points"] = points
    traces.meta["cpu_costs_measured"] = time.strftime("%Y-%m-%d")


# ---- the simulator against the engine --------------------------------------------------------------


def validate(target: Target, drafter: Drafter, traces: TraceFile, users: Sequence[int] = (1, 2, 4, 8, 16),
             policies: Sequence[str] = ("mtp1", "fixed", "algorithm1"), temperature: float = 0.0,
             requests_per_user: int = 2, drafter_spec: str = "dspark", progress: bool = False,
             on_row: Callable[[dict], None] | None = None, one_drafter: Drafter | None = None) -> list[dict]:
    """The engine and the simulator on the same requests (the trace file's prompts, in its order), table
    and policy, at each load: one row per (users, policy) with both reports' numbers.

    The simulator drains its queue as the engine's `closed_loop` does, counts batch tokens as the engine
    does (its `batch_tokens` where it has one, else `padded_batch_tokens`), charges the trace file's
    CPU costs, and gives `mtp1` the one-token trace source (and, in the engine, `one_drafter` where the
    file's one-token source was recorded by one)."""
    from labkit.decode.engine import Engine, closed_loop, make_requests, padded_batch_tokens, report
    if traces.cpu_cost is None:
        raise LabkitError("the trace file has no CPU costs: record it again without --no-costs.")
    block = traces.get("block", temperature)
    if block is None:
        raise LabkitError(f"the trace file has no block traces at temperature {temperature}: "
                          f"it holds {traces.temperatures}.")
    if any(r.prompt is None for r in block.requests):
        raise LabkitError("the trace file's requests carry no prompt text, so the engine cannot serve them.")
    cost = traces.cpu_cost
    params = SamplingParams(temperature=temperature)
    max_new = int(traces.meta.get("max_new_tokens", max(r.n_tokens for r in block.requests)))
    seed = int(traces.meta.get("seed", 0))
    requests = make_requests(target, [r.prompt for r in block.requests], max_new, params, seed)
    rows = []
    runs = [(u, p) for u in users for p in policies]
    for u, policy in tqdm(runs, desc="engine vs simulator", disable=not progress):
        n = u * requests_per_user
        by = one_drafter if policy == "mtp1" and one_drafter is not None else drafter
        engine = Engine(target, by, policy, cost.table)
        count = getattr(engine, "batch_tokens", padded_batch_tokens)
        for _ in closed_loop(requests, u, engine, n):
            pass
        rep = report(engine, u, drafter_spec)
        one = traces.get("mtp1", temperature)
        src, queue = ("mtp1", one.requests) if policy == "mtp1" and one is not None else (None, block.requests)
        sim = simulate([queue[i % len(queue)] for i in range(n)], u, policy, cost, n_requests=n, drain=True,
                       batch_tokens=count, source=src)
        row = {"users": u, "policy": policy, "temperature": temperature, "requests": n}
        for key in ("aggregate_tokens_per_s", "per_user_tokens_per_s", "mean_verify_budget", "tau"):
            row[f"engine_{key}"] = rep[key]
            row[f"sim_{key}"] = getattr(sim, key)
        row["engine_elapsed_s"], row["sim_elapsed_s"] = rep["elapsed_s"], sim.elapsed_s
        row["engine_steps"], row["sim_steps"] = rep["steps"], sim.steps
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def format_validation(rows: Sequence[dict]) -> str:
    head = (f"{'policy':<12}{'users':>6} {'aggregate tok/s':>22} {'per-user tok/s':>20} {'verify budget':>18} "
            f"{'tau':>14}")
    lines = [head, " " * 18 + "   engine / simulated (ratio)"]

    def cell(r, key, width):
        e, s = r[f"engine_{key}"], r[f"sim_{key}"]
        if e is None or s is None:
            return f"{'-':>{width}}"
        return f"{f'{e:.2f} / {s:.2f}':>{width - 8}} ({s / e:4.2f})" if e else f"{'-':>{width}}"

    for r in rows:
        lines.append(f"{r['policy']:<12}{r['users']:>6} {cell(r, 'aggregate_tokens_per_s', 22)} "
                     f"{cell(r, 'per_user_tokens_per_s', 20)} {cell(r, 'mean_verify_budget', 18)} {cell(r, 'tau', 14)}")
    return "\n".join(lines)
