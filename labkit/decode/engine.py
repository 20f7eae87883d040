"""A batched speculative serving engine: many requests, one target forward per step (DSpark Sec. 3.2.2, 5.3).

Each engine step
1. drafts a block for every active request in one call of the drafter (`Drafter.propose_many`: one
   backbone forward for all requests where the drafter batches, each request on its own context state),
2. asks a prefix policy (`labkit.core.scheduler`) how many drafted tokens of each request to verify, from
   the drafter's confidences (by default corrected per position by how often this engine's verified
   drafts were accepted against what they predicted, `labkit.core.calibration.AcceptanceRatio`) and a
   step price: by default the profiled cost table SPS(B) plus the measured drafting time (`COST_MODELS`;
   a fit of the engine's own past steps, `labkit.core.step_fit`, is the alternative),
3. verifies ALL requests in ONE batched target forward with a different number of tokens per row
   (`labkit.model.batch_kv.BatchKV`: one KV cache of ragged rows, per-row positions and mask),
4. judges each request with its own generator (`decoding.judge`, as single-request decoding does), then
   commits all of them with one batched drafter context update (`decoding.advance_many`), and rolls each
   row's rejected tokens back,
5. streams the tokens, retires finished requests and admits new ones (prefilled together in one packed
   forward of their own, so an admission never changes another request's numbers).

The verify forward is packed (`labkit.model.ragged`): the token-wise layers run over the real tokens
only, so the scheduler's B is the paper's, sum_r (1 + l_r), and one deep row beside many short ones
costs its own tokens in the token-wise layers (`packed=False` keeps the padded forward, for comparison).
Each row of the KV cache grows by its own tokens only (`labkit.model.slab`: row slots written in
place; a rollback is overwritten by the next step), so a ragged step reads no more columns than a
uniform one, and admissions and retirements copy no other row.

Why outputs never depend on who else is in the batch: every request keeps its own sampling settings
and generator, the drafter runs per request, and the batched forward matches a solo forward to about
1e-6 in fp32 (tested), so greedy outputs equal solo greedy outputs token for token. Under a fixed or
MTP-1-like policy sampled outputs are the solo ones too; under a load-aware policy the verification
length depends on the other requests' confidences, which changes *which* random numbers are drawn but
not the output distribution (Algorithm 1's early break keeps the admission of draft k independent of
its value; Appendix A shows what happens without it).

Drafters without a confidence head (prompt lookup, DFlash, hybrid rounds with copied tokens) are
scheduled with the engine's own measured acceptance by position so far: a non-anticipating estimate
(it depends on past rounds only), so every policy stays lossless with them too.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from labkit.decode import loop as decoding
from labkit.model.batch_kv import BatchKV
from labkit.model.timing import profile_cost_table
from labkit.drafters.base import Drafter, Proposal, check_batchable
from labkit.core.calibration import AcceptanceRatio
from labkit.core.errors import LabkitError
from labkit.core.layout import attention_weight
from labkit.core.sampling import SamplingParams, Verdict
from labkit.core.scheduler import (CostTable, HasSPS, RoundRate, ScheduleInput, held_after, make_policy,
                                   newcomer_cap, next_draft_cap, packed_tokens, running_mean)
from labkit.core.step_fit import FIT_WEIGHT, StepFit, StepRate
from labkit.model.target import Target
from labkit.core.trace import MIN_ROUNDS, Round, mean_tau, position_acceptance, position_counts
from labkit.model.target import cache_root


@dataclass
class ServeRequest:
    """One request: a prompt (text and ids), its own sampling settings and seed, when it arrived."""

    id: int
    prompt: str
    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams
    seed: int
    arrival_s: float = 0.0


@dataclass
class RequestRecord:
    """What one request got: its tokens and how fast they came (or the error that refused it)."""

    id: int
    prompt: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    tokens_per_s: float | None = None  # new tokens / (finish - first token): the speed its user sees
    ttft_s: float | None = None  # arrival -> first token (queueing + prefill)
    first_token_s: float | None = None  # engine clock (seconds since the run started) at its first token
    finish_s: float | None = None  # engine clock when it was retired (its last token)
    rounds: int = 0
    mean_verify_budget: float | None = None  # tokens verified per step, anchor included
    tau: float | None = None
    finished: bool = False
    error: str | None = None


@dataclass
class StepRecord:
    """One engine step: who ran, what the policy gave them, what it cost and what came out."""

    t_s: float  # seconds since the run started, at the end of the step
    active: int
    lengths: list[int]  # drafted tokens verified per request (the policy's l_r)
    drafted: list[int]  # drafted tokens available per request
    accepted: list[int]
    batch_tokens: int  # what the forward's token-wise layers computed: real tokens packed, rows x width padded
    draft_s: float
    schedule_s: float
    verify_s: float
    #: what the policy saw, for an exact replay (`labkit.core.simulate`): request ids in row order, each
    #: request's confidences (its drafted length), and the drafting seconds per request the step's
    #: `RoundRate` charged (None before the first step had been timed)
    ids: list[int] = field(default_factory=list)
    conf: list[list[float]] = field(default_factory=list)
    draft_cost_s: float | None = None
    cap: int | None = None  # the most tokens any request could draft in this step (`Engine.draft_caps`)
    caps: list[int | None] = field(default_factory=list)  # each request's own cap, in `ids` order
    #: the step's cost as the policy read it when it came from the engine's own fit (`StepFit`): (fixed
    #: seconds, seconds per verified draft); None where the profiled table and `draft_cost_s` were used
    step_cost: tuple[float, float] | None = None
    admit_s: float = 0.0  # seconds spent admitting (prefilling) requests between the last step and this one
    #: cost models "offset" and "steps": the seconds the policy added to the table's step (None: not priced so;
    #: 0 for "steps", whose table timed whole steps)
    offset_s: float | None = None
    #: one attention query column's cost in tokens of the forward at this step's cache (`labkit.core.layout`),
    #: what the layout-aware policy priced the rectangle with
    attention_weight: float = 0.0
    #: cost model "rows": the row count whose profiled shapes priced the step (`CostTable.at_rows`);
    #: None where the table's pooled SPS(B) did
    price_rows: int | None = None
    #: whether this step's caps let a held request probe (`next_draft_cap`'s may_pay: the policy's
    #: `probe_may_pay` on the step before; True for a policy without one)
    probe_may_pay: bool = True

    @property
    def emitted(self) -> int:
        return sum(self.accepted) + self.active

    @property
    def verified(self) -> int:
        return sum(self.lengths) + self.active

    @property
    def wasted(self) -> int:
        """Verified draft tokens that were rejected (the anchor token is never wasted)."""
        return sum(self.lengths) - sum(self.accepted)


#: how the engine's Algorithm 1 prices a step: "table" (the default), the profiled table's forward
#: 1 / SPS(B) plus the running mean of drafting seconds for the step's requests; "fit", its own
#: least-squares fit t = a + b R + c (B - R) of past steps plus the mean admission time (`StepFit`);
#: "offset", the table plus the running mean of what a measured step (admissions included) took above it.
#: The table is the default: with its price Algorithm 1 stood at 0.90-1.06x the best fixed policy at
#: 1-32 users on this CPU (4 repeats, T = 0 and 1), with the fit's at 0.81-1.00x, and at or above the fit's
#: at every load (data/serving/cpu-measurements-2026-12-06.md, sweep14-table against sweep11). Priced by
#: the fit it verified deeper under load (2.55 against 1.77 tokens a request at 16 users, greedy) than
#: the steps paid back: the fit's few, noisy steps do not see what a deeper, ragged step costs here
#: "rows": the table read at the step's own number of requests (`labkit.core.row_price`: the profiled
#: R x W shapes, not every shape of one B pooled) plus the same drafting time; "steps": a table that timed
#: the engine's whole step with this drafter (`labkit.measure.step_profile`), read at the step's number of
#: requests with nothing added (its drafting, verdicts and context updates are in it)
COST_MODELS = ("table", "fit", "offset", "rows", "steps")


def padded_batch_tokens(lengths: list[int]) -> int:
    """What a padded forward computes for these verification lengths: every row padded to the widest,
    anchor included (R x (1 + max l)); the scheduler's B for an engine built with packed=False."""
    return len(lengths) * (1 + max(lengths)) if lengths else 0


@dataclass
class _Active:
    request: ServeRequest
    state: decoding.DecodeState
    first_token_s: float
    budgets: list[int] = field(default_factory=list)


class Engine:
    """Continuous batching over a `BatchKV`, a drafter and a prefix policy.

    `add` admits a request (prefill alone); `step` runs one engine step for every active request and
    returns its `StepRecord`; finished requests move to `self.done`. `policy` and `max_draft` may be
    changed between steps (the dashboard's controls do).
    """

    def __init__(self, target: Target, drafter: Drafter | None, policy: str = "algorithm1",
                 table: CostTable | None = None, max_draft: int | None = None, clock: Callable[[], float] = time.perf_counter,
                 on_tokens: Callable[[int, list[int]], None] | None = None, packed: bool = True,
                 adaptive_cap: bool = True, cost_model: str = "table", recalibrate: bool = True):
        if drafter is not None:
            check_batchable(drafter)
            decoding.check_drafter(target, drafter)
        self.target, self.drafter = target, drafter
        self.policy_name = policy
        self.policy = make_policy(policy)
        self.table = table or CostTable.flat(device=str(target.device), model=target.name, dtype=str(target.dtype).removeprefix("torch."))
        self.max_draft = max_draft
        self.adaptive_cap = adaptive_cap
        self.kv = BatchKV(target, drafter.hidden_layers if drafter is not None else (), packed=packed)
        #: the scheduler's B for a step's verification lengths: the real tokens of a packed forward (the
        #: paper's count), or rows x the widest row where the forward is padded
        self.batch_tokens = packed_tokens if packed else padded_batch_tokens
        self.active: dict[int, _Active] = {}
        self.done: list[RequestRecord] = []
        self.steps: list[StepRecord] = []
        self.rounds: list[Round] = []
        self._clock = clock
        self.t0 = clock()
        #: streaming: called with (request id, the tokens it just emitted) after its prefill and every step
        self.on_tokens = on_tokens
        #: per request, the confidences of the last two steps (the production policy reads the older one)
        self._conf_history: dict[int, deque] = {}
        #: per request, the verification length the policy chose for it at its last step (`draft_caps`)
        self._last_length: dict[int, int] = {}
        #: per request, whether it is held at its last length (`held_after`: drafts past it only on probe steps)
        self._held: dict[int, bool] = {}
        #: whether the next probe step drafts past held lengths (the policy's `probe_may_pay` on the last step)
        self._probe_may_pay = True
        #: running mean of drafting seconds per request and step (RoundRate), None before the first step
        self._draft_s_per_request: float | None = None
        if cost_model not in COST_MODELS:
            raise LabkitError(f"Unknown cost model {cost_model!r}: choose one of {', '.join(COST_MODELS)}.")
        if cost_model in ("rows", "steps") and not self.table.shapes:
            raise LabkitError(f"the cost model {cost_model!r} reads the profiled R x W shapes, and this cost table keeps "
                              "none: profile one (`cost_table_for(target, reprofile=True)`, or `serve-sweep "
                              "--reprofile`) or use the cost model 'table'.")
        #: how Algorithm 1 prices a step (`COST_MODELS`)
        self.cost_model = cost_model
        #: whether policies read confidences corrected by what this engine's own verdicts showed
        #: (`AcceptanceRatio`, one per sampling temperature), or the drafter's as they come
        self.recalibrate = recalibrate
        self.acceptance: dict[float, AcceptanceRatio] = {}
        #: cost model "fit": the step's seconds against its requests and verified drafts, from past steps
        self.step_fit: StepFit | None = StepFit() if cost_model == "fit" else None
        #: running mean of a step's measured seconds (admissions included) above the table's forward
        self._offset_mean: float | None = None
        #: seconds spent admitting requests since the last step, and their running mean per step
        self._admit_s = 0.0
        self._admit_mean: float | None = None

    def now(self) -> float:
        return self._clock() - self.t0

    def set_policy(self, name: str) -> None:
        self.policy = make_policy(name)
        self.policy_name = name

    # ---- admission and retirement -------------------------------------------------------------------

    def add(self, request: ServeRequest) -> RequestRecord | None:
        """Admit one request (`add_many` of one); a request that cannot run gets an error record."""
        return self.add_many([request]).get(request.id)

    def add_many(self, requests: list[ServeRequest]) -> dict[int, RequestRecord]:
        """Prefill `requests` together in one packed forward and make them active (batched admission).

        Each new row attends only to its own prompt and the running rows are not in that forward, so an
        admission never changes another request's numbers. Returns the error records of the requests
        that could not run (bad input), by id; the others start."""
        t0 = self._clock()
        try:
            return self._admit(requests)
        finally:  # the measured cost models charge admissions to the step that follows them (`_learn`)
            self._admit_s += self._clock() - t0

    def _admit(self, requests: list[ServeRequest]) -> dict[int, RequestRecord]:
        refused: dict[int, RequestRecord] = {}
        ready: list[ServeRequest] = []
        for request in requests:
            try:
                self._check(request)
                if any(r.id == request.id for r in ready):
                    raise LabkitError(f"Request id {request.id} is admitted twice: give every request its own id.")
                ready.append(request)
            except LabkitError as exc:
                refused[request.id] = self._refuse(request, str(exc))
        if not ready:
            return refused
        if self.kv.packed:
            prefills = self.kv.add_many({r.id: r.prompt_ids for r in ready})
        else:
            prefills = {r.id: self.kv.add(r.id, r.prompt_ids) for r in ready}
        for request in ready:
            logits, hidden = prefills[request.id]
            state = decoding.start_state(self.target, request.prompt_ids, request.max_new_tokens, request.params,
                                         request.seed, self.drafter, logits, hidden)
            self.active[request.id] = _Active(request, state, first_token_s=self.now())
            self._conf_history[request.id] = deque(maxlen=2)
            self._stream(request.id, state.new_ids)
            if state.finished:
                self._retire(request.id)
        return refused

    def _refuse(self, request: ServeRequest, error: str) -> RequestRecord:
        record = RequestRecord(request.id, request.prompt, error=error)
        self.done.append(record)
        return record

    def _check(self, request: ServeRequest) -> None:
        if request.id in self.active:
            raise LabkitError(f"Request id {request.id} is already running: give every request its own id.")
        decoding.check_inputs(request.prompt_ids, request.max_new_tokens)
        vocab = self.target.vocab_size
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in request.prompt_ids):
            raise LabkitError(f"The prompt of request {request.id} holds ids outside [0, {vocab}): encode text with "
                              "the target's tokenizer (make_requests does).")
        window = getattr(self.target.config, "max_position_embeddings", None)
        if window is not None and len(request.prompt_ids) + request.max_new_tokens > window:
            raise LabkitError(f"The prompt has {len(request.prompt_ids)} tokens; with max_new_tokens "
                              f"{request.max_new_tokens} it exceeds the model's window of {window}: "
                              "shorten the prompt or ask for fewer new tokens.")

    def _retire(self, rid: int) -> None:
        act = self.active.pop(rid)
        self._conf_history.pop(rid, None)
        self._last_length.pop(rid, None)
        self._held.pop(rid, None)
        self.kv.remove(rid)
        st = act.state
        finish = self.now()
        elapsed = finish - act.first_token_s
        n = len(st.new_ids)
        self.done.append(RequestRecord(
            id=rid, prompt=act.request.prompt, token_ids=st.new_ids, text=self.target.decode(st.new_ids),
            tokens_per_s=(n - 1) / elapsed if n > 1 and elapsed > 0 else None,
            ttft_s=act.first_token_s - act.request.arrival_s, first_token_s=act.first_token_s, finish_s=finish,
            rounds=len(st.rounds),
            mean_verify_budget=sum(act.budgets) / len(act.budgets) if act.budgets else None,
            tau=mean_tau(st.rounds),
            finished=True))

    def _stream(self, rid: int, tokens: list[int]) -> None:
        if self.on_tokens is not None and tokens:
            self.on_tokens(rid, list(tokens))

    # ---- one step -------------------------------------------------------------------------------------

    def _confidences(self, proposals: list[Proposal]) -> torch.Tensor:
        """(R, gamma) confidences: the drafter's calibrated c_k, else measured acceptance by position."""
        gamma = max((len(p) for p in proposals), default=0)
        prior = [0.5] * gamma
        if any(p.confidences is None and len(p) for p in proposals):
            measured, counts = position_acceptance(self.rounds), position_counts(self.rounds)
            prior = [measured[j] if j < len(measured) and counts[j] >= MIN_ROUNDS else 0.5 for j in range(gamma)]
        conf = torch.zeros(len(proposals), gamma)
        for i, p in enumerate(proposals):
            k = len(p)
            if p.confidences is not None:
                conf[i, :k] = p.confidences.float().clamp(0, 1).cpu()
            else:
                conf[i, :k] = torch.tensor(prior[:k])
        return conf

    def _temperature(self, rid: int) -> float:
        return self.active[rid].request.params.temperature

    def _recalibrated(self, ids: list[int], raw: torch.Tensor) -> torch.Tensor:
        """The confidences the policy reads: each row scaled by its temperature's `AcceptanceRatio`."""
        if not self.recalibrate or raw.shape[1] == 0:
            return raw
        conf = raw.clone()
        for i, rid in enumerate(ids):
            ratio = self.acceptance.get(self._temperature(rid))
            if ratio is not None:
                conf[i] = ratio.scale(raw[i:i + 1])[0]
        return conf

    def _observe_acceptance(self, ids: list[int], raw: torch.Tensor, lengths, judged: list[bool],
                            accepted: list[int]) -> None:
        """Feed each judged request's verdict to its temperature's `AcceptanceRatio` (uncorrected confidences)."""
        if not self.recalibrate or raw.shape[1] == 0:
            return
        for i, rid in enumerate(ids):
            if judged[i]:
                ratio = self.acceptance.setdefault(self._temperature(rid), AcceptanceRatio(self.drafter.gamma))
                ratio.update(raw[i:i + 1], [int(lengths[i])], [accepted[i]])

    def _old_confidences(self, ids: list[int], gamma: int) -> tuple[torch.Tensor, list[int | None]]:
        """Confidences from two steps before; None marks a request younger than that (survival 1)."""
        old = torch.zeros(len(ids), gamma)
        lengths: list[int | None] = []
        for i, rid in enumerate(ids):
            hist = self._conf_history[rid]
            if len(hist) == 2:
                c = hist[0][:gamma]
                old[i, :len(c)] = c
                lengths.append(len(c))
            else:
                lengths.append(None)
        return old, lengths

    def step(self) -> StepRecord | None:
        """Draft, schedule, verify in one batched forward, accept, roll back, retire; None when idle."""
        if not self.active:
            return None
        t_start = self._clock()
        may_pay = self._probe_may_pay  # what this step's caps read; the policy sets the next one below
        cap_of = dict(zip(self.active, self.draft_caps(list(self.active))))
        ids, proposals = self._draft(list(cap_of), list(cap_of.values()))  # no drafts the policy would drop
        caps = [cap_of[rid] for rid in ids]
        t_drafted = self._clock()
        if not ids:  # every request failed while drafting
            return None
        raw = self._confidences(proposals)
        conf = self._recalibrated(ids, raw)
        max_lengths = [len(p) for p in proposals]
        old_conf, old_lengths = self._old_confidences(ids, conf.shape[1])
        draft_cost_s = self._draft_s_per_request
        cost, step_cost, offset, price_rows = self._price(len(ids), draft_cost_s)
        weight = attention_weight(self.kv.columns) if self.kv.packed else 0.0
        inp = ScheduleInput(conf=conf, table=cost, max_lengths=max_lengths,
                            batch_tokens=self.batch_tokens,
                            old_conf=old_conf, old_max_lengths=old_lengths, attention_weight=weight)
        lengths = self.policy(inp)
        for i, rid in enumerate(ids):
            self._conf_history[rid].append(conf[i, :max_lengths[i]].clone())
            self._last_length[rid] = int(lengths[i])
            self._held[rid] = held_after(int(lengths[i]), caps[i], self._held.get(rid, False), len(self.steps),
                                         getattr(self.policy, "probe_every", None), may_pay)
        judge = getattr(self.policy, "probe_may_pay", None)
        self._probe_may_pay = True if judge is None else bool(judge(inp, list(lengths)))
        proposals = [p.truncate(l) for p, l in zip(proposals, lengths)]
        t_scheduled = self._clock()
        inputs = {rid: decoding.verify_inputs(self.active[rid].state, p) for rid, p in zip(ids, proposals)}
        batch_tokens = self.kv.computed_tokens([len(v) for v in inputs.values()])
        outs = self.kv.step(inputs)
        verdicts, failed = {}, {}
        for rid, prop in zip(ids, proposals):
            try:
                verdicts[rid] = self._judge(rid, prop, outs[rid][0])
            except Exception as exc:  # this request's verification failed: it alone is retired, with why
                failed[rid] = f"verification failed: {type(exc).__name__}: {exc}"
        self._commit(ids, proposals, verdicts, outs, failed, (t_drafted - t_start) / len(ids))
        accepted = [verdicts[rid].n_accepted if rid in verdicts and rid not in failed else 0 for rid in ids]
        self._observe_acceptance(ids, raw, lengths, [rid in verdicts and rid not in failed for rid in ids], accepted)
        t_end = self._clock()
        spent = (t_drafted - t_start) / len(ids)
        self._draft_s_per_request = running_mean(self._draft_s_per_request, spent)
        for rid in ids:
            if rid in failed:
                self._fail(rid, failed[rid])
            elif self.active[rid].state.finished:
                self._retire(rid)
        admit_s, self._admit_s = self._admit_s, 0.0
        self._learn(len(ids), self.batch_tokens(list(lengths)), self._clock() - t_start, admit_s)
        record = StepRecord(t_s=t_end - self.t0, active=len(ids), lengths=list(lengths), drafted=max_lengths,
                            accepted=accepted, batch_tokens=batch_tokens, draft_s=t_drafted - t_start,
                            schedule_s=t_scheduled - t_drafted, verify_s=t_end - t_scheduled, ids=ids,
                            conf=[conf[i, :m].tolist() for i, m in enumerate(max_lengths)],
                            draft_cost_s=draft_cost_s, cap=max((c for c in caps if c is not None), default=None),
                            caps=caps, step_cost=step_cost, admit_s=admit_s, offset_s=offset,
                            attention_weight=weight, price_rows=price_rows, probe_may_pay=may_pay)
        self.steps.append(record)
        return record

    def _price(self, requests: int, draft_cost_s: float | None
               ) -> tuple[HasSPS, tuple[float, float] | None, float | None, int | None]:
        """What Algorithm 1 reads for this step (`COST_MODELS`), and what the step records of it for an exact
        replay: (the price, the fit's (fixed, per-draft) seconds or None, the offset's seconds or None,
        the row count the table was read at or None).

        "fit": the fitted step at this many requests plus the running mean of admission seconds per step.
        Admissions are a serving cycle's cost as surely as its forwards (a long run pays every prefill),
        but they come in bursts that have nothing to do with a step's verified drafts, so they are averaged
        apart from the fit. Until a model has measurements: the table plus drafting for all requests."""
        rate = self.step_fit.rate(requests) if self.step_fit is not None else None
        if rate is not None:
            fitted = StepRate(rate.fixed_s + (self._admit_mean or 0.0), rate.per_token_s, requests)
            return fitted, (fitted.fixed_s, fitted.per_token_s), None, None
        if self.cost_model == "offset" and self._offset_mean is not None:
            offset = max(0.0, self._offset_mean)
            return RoundRate(self.table, offset), None, offset, None
        if self.cost_model == "rows":
            return RoundRate(self.table.at_rows(requests), (draft_cost_s or 0.0) * requests), None, None, requests
        if self.cost_model == "steps":  # the table timed whole engine steps, drafting included: nothing added
            return RoundRate(self.table.at_rows(requests), 0.0), None, 0.0, requests
        return RoundRate(self.table, (draft_cost_s or 0.0) * requests), None, None, None

    def _learn(self, requests: int, batch_tokens: int, step_s: float, admit_s: float) -> None:
        """Feed the measured cost model one finished step: `step_s` seconds (with its retirements) at
        `batch_tokens` verified tokens, after `admit_s` seconds of admissions since the last step. The first
        step's admissions fill the engine once and are left out; later ones recur."""
        weight = max(FIT_WEIGHT, 1.0 / (len(self.steps) or 1))  # a plain mean at first
        recurring = admit_s if self.steps else None
        if self.step_fit is not None:
            self.step_fit.update(requests, batch_tokens - requests, step_s)
            if recurring is not None:
                self._admit_mean = running_mean(self._admit_mean, recurring, weight)
        if self.cost_model == "offset":
            above = step_s + (recurring or 0.0) - 1.0 / self.table.sps(batch_tokens)
            self._offset_mean = running_mean(self._offset_mean, above, weight)

    def draft_caps(self, ids: list[int]) -> list[int | None]:
        """The most tokens each request drafts this step: the policy's own cap (MTP-1: 1, fixed:K: K),
        `max_draft`, and for a policy that chooses lengths from confidences (Algorithm 1, the production
        variant, a threshold) with `adaptive_cap`, one more than the length it chose for that request at
        its last step (a request admitted since: the longest length of the last step, `newcomer_cap`;
        `next_draft_cap`, where a policy's `probe_every` keeps a request that stopped short of its cap at
        its length except every few steps, and its `probe_may_pay` skips a probe not expected to pay).

        Why: drafting is paid before the policy decides, and under load Algorithm 1 verifies one or two
        drafts a request, so a whole block's sequential head steps would be paid for nothing; a batch-wide
        cap would let the one request verified deep make every other request draft as deep. The caps
        depend on past steps only (like the production variant's capacity from old confidences), so the
        policy's decisions stay non-anticipating and verification lossless; a request's cap grows by one
        a step while the policy wants more of it."""
        shared = [c for c in (self.max_draft, self.policy.draft_cap) if c is not None]
        adaptive = self.adaptive_cap and getattr(self.policy, "chooses_lengths", False)
        newcomer = newcomer_cap(self.steps[-1].lengths if self.steps else None) if adaptive else None
        probe_every = getattr(self.policy, "probe_every", None)
        out = []
        for rid in ids:
            own = next_draft_cap(self._last_length.get(rid), self._held.get(rid, False), newcomer, len(self.steps),
                                 probe_every, self._probe_may_pay) if adaptive else None
            caps = shared + ([own] if own is not None else [])
            out.append(min(caps) if caps else None)
        return out

    def _draft(self, ids: list[int], caps: list[int | None]) -> tuple[list[int], list[Proposal]]:
        """Proposals for `ids` in one drafter call; if that call raises, each request is drafted alone
        from the same random state, and a request whose drafting raises is retired with its error.

        The others lose nothing: a request's proposal is the same batched or alone (tested), and its
        generator is rewound to where it stood before the failed call."""
        states = [self.active[rid].state for rid in ids]
        saved = [s.generator.get_state() if s.generator is not None else None for s in states]
        try:
            return ids, decoding.draft_many(states, self.drafter, caps)
        except Exception:
            for s, g in zip(states, saved):
                if g is not None:
                    s.generator.set_state(g)
        kept, proposals = [], []
        for rid, state, cap in zip(ids, states, caps):
            try:
                proposals.append(decoding.draft_many([state], self.drafter, [cap])[0])
                kept.append(rid)
            except Exception as exc:
                self._fail(rid, f"drafting failed: {type(exc).__name__}: {exc}")
        return kept, proposals

    def _judge(self, rid: int, prop: Proposal, logits: torch.Tensor) -> Verdict:
        """One request's verdict from its rows of the verify forward, drawn with its own generator."""
        if not torch.isfinite(logits).all():
            raise LabkitError("the target's logits for this request were not finite (NaN or inf)")
        return decoding.judge(self.active[rid].state, prop, logits)

    def _commit(self, ids: list[int], proposals: list[Proposal], verdicts: dict[int, Verdict], outs: dict,
                failed: dict[int, str], draft_s: float) -> None:
        """Commit every judged request: its tokens, one `observe_many` for all of them (the drafters' context
        updates batched), its rollback, round and stream. If the batched observe raises, each request is
        observed alone and one whose observe raises joins `failed` (the others lose nothing: their tokens
        come from the target's forward and their own generators, whatever the drafter's state)."""
        judged = [(rid, prop) for rid, prop in zip(ids, proposals) if rid in verdicts]
        states = [self.active[rid].state for rid, _ in judged]
        before = [len(s.ids) for s in states]
        hidden = [outs[rid][1] for rid, _ in judged]
        try:
            decoding.advance_many(states, [p for _, p in judged], [verdicts[rid] for rid, _ in judged], hidden,
                                  self.drafter)
        except Exception:
            for (rid, _), state, h in zip(judged, states, hidden):
                try:
                    self.drafter.observe(state.request, verdicts[rid].n_accepted, h)
                except Exception as exc:
                    failed[rid] = f"verification failed: {type(exc).__name__}: {exc}"
        for (rid, prop), state, start in zip(judged, states, before):
            if rid in failed:
                continue
            act = self.active[rid]
            self.rounds.append(decoding.record_round(state, prop, verdicts[rid], draft_s=draft_s, verify_s=None))
            self.kv.rollback(rid, len(prop) - verdicts[rid].n_accepted)
            act.budgets.append(len(prop) + 1)
            self._stream(rid, state.ids[start:])

    def _fail(self, rid: int, error: str) -> None:
        """Retire a request that failed mid-run: its tokens so far and the error go in its own record."""
        act = self.active.pop(rid)
        self._conf_history.pop(rid, None)
        self._last_length.pop(rid, None)
        self._held.pop(rid, None)
        self.kv.remove(rid)
        st = act.state
        self.done.append(RequestRecord(id=rid, prompt=act.request.prompt, token_ids=st.new_ids,
                                       text=self.target.decode(st.new_ids), ttft_s=act.first_token_s - act.request.arrival_s,
                                       first_token_s=act.first_token_s, finish_s=self.now(),
                                       rounds=len(st.rounds), tau=mean_tau(st.rounds), error=error))


# ---- the cost table ----------------------------------------------------------------------------------


# ---- workloads -------------------------------------------------------------------------------------


def closed_loop(prompts: list[ServeRequest], users: int, engine: Engine, requests: int | None = None,
                duration_s: float | None = None) -> Iterator[StepRecord]:
    """N users, each sending its next prompt as soon as its last one finished; yields every step.

    Stops after `requests` requests finished (default: all prompts once) or after `duration_s`.
    """
    if users < 1:
        raise LabkitError(f"--users must be at least 1, got {users}.")
    total = requests if requests is not None else len(prompts)
    queue = deque(prompts[i % len(prompts)] for i in range(total))
    next_id = 0

    def refill() -> None:
        nonlocal next_id
        while queue and len(engine.active) < users:  # again if a request was refused or ended at its prefill
            batch = []
            while queue and len(engine.active) + len(batch) < users:
                req = queue.popleft()
                cycle = next_id // len(prompts)  # a prompt sent again gets a fresh seed
                batch.append(replace(req, id=next_id, arrival_s=engine.now(), seed=req.seed + cycle * len(prompts)))
                next_id += 1
            engine.add_many(batch)

    refill()
    while engine.active:
        if duration_s is not None and engine.now() >= duration_s:
            break
        rec = engine.step()
        refill()
        if rec is not None:
            yield rec


def open_loop(prompts: list[ServeRequest], rate: float, max_batch: int, engine: Engine, requests: int | None = None,
              duration_s: float | None = None, seed: int = 0) -> Iterator[StepRecord]:
    """Arrivals at `rate` requests per second (a Poisson process, seeded), at most `max_batch` running;
    the others wait in a queue (their time to first token counts the wait)."""
    if rate <= 0:
        raise LabkitError(f"--rate must be a positive number of requests per second, got {rate}.")
    rng = random.Random(seed)
    total = requests if requests is not None else len(prompts)
    arrivals, t = [], 0.0
    for i in range(total):
        t += rng.expovariate(rate)
        arrivals.append(replace(prompts[i % len(prompts)], id=i, arrival_s=t))
    pending: deque[ServeRequest] = deque(arrivals)
    waiting: deque[ServeRequest] = deque()
    while pending or waiting or engine.active:
        now = engine.now()
        if duration_s is not None and now >= duration_s:
            break
        while pending and pending[0].arrival_s <= now:
            waiting.append(pending.popleft())
        while waiting and len(engine.active) < max_batch:
            engine.add_many([waiting.popleft() for _ in range(min(len(waiting), max_batch - len(engine.active)))])
        if not engine.active:  # idle until the next arrival
            time.sleep(max(0.0, min(pending[0].arrival_s - engine.now(), 0.05)) if pending else 0.0)
            continue
        rec = engine.step()
        if rec is not None:
            yield rec


# ---- the report ------------------------------------------------------------------------------------


def report(engine: Engine, users: int, drafter_spec: str | None) -> dict:
    """The `serve` JSON: aggregate and per-user speed, verification budget, acceptance, every request."""
    steps = engine.steps
    elapsed = steps[-1].t_s if steps else 0.0
    done = [r for r in engine.done if r.finished]
    emitted = sum(s.emitted for s in steps) + len(done) + len(engine.active)  # + each first token
    speeds = [r.tokens_per_s for r in done if r.tokens_per_s is not None]
    verified = sum(s.verified for s in steps)
    requests = sorted(engine.done, key=lambda r: r.id)
    return {
        "policy": engine.policy_name, "users": users, "device": str(engine.target.device),
        "model": engine.target.name, "dtype": str(engine.target.dtype).removeprefix("torch."),
        "drafter": drafter_spec or "none", "elapsed_s": elapsed,
        "aggregate_tokens_per_s": emitted / elapsed if elapsed > 0 else None,
        "per_user_tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
        "mean_verify_budget": verified / sum(s.active for s in steps) if steps else None,
        "wasted_verification": sum(s.wasted for s in steps) / verified if verified else None,
        "acceptance_by_position": position_acceptance(engine.rounds),
        "acceptance_rounds": position_counts(engine.rounds),
        "tau": mean_tau(engine.rounds),
        "steps": len(steps),
        "table": engine.table.to_dict(),
        "recalibrate": engine.recalibrate,
        "acceptance_ratios": {f"{t:g}": r.ratios for t, r in engine.acceptance.items()},
        "step_trace": [{"t_s": s.t_s, "active": s.active, "lengths": s.lengths, "accepted": s.accepted,
                        "drafted": s.drafted, "batch_tokens": s.batch_tokens, "draft_s": s.draft_s,
                        "verify_s": s.verify_s, "ids": s.ids, "conf": s.conf, "draft_cost_s": s.draft_cost_s,
                        "cap": s.cap, "step_cost": s.step_cost, "schedule_s": s.schedule_s,
                        "admit_s": s.admit_s, "offset_s": s.offset_s, "attention_weight": s.attention_weight,
                        "price_rows": s.price_rows}
                       for s in steps],
        "requests": [{"id": r.id, "prompt": r.prompt, "token_ids": r.token_ids, "text": r.text,
                      "tokens_per_s": r.tokens_per_s, "ttft_s": r.ttft_s, "first_token_s": r.first_token_s,
                      "finish_s": r.finish_s, "rounds": r.rounds,
                      "tau": r.tau, "mean_verify_budget": r.mean_verify_budget,
                      **({"error": r.error} if r.error else {})} for r in requests],
    }


def run_closed_loop(target: Target, drafter: Drafter | None, requests: list[ServeRequest], users: int,
                    policy: str = "algorithm1", table: CostTable | None = None, n_requests: int | None = None,
                    duration_s: float | None = None, max_draft: int | None = None, drafter_spec: str | None = None,
                    progress: bool = False, on_step: Callable[[Engine, StepRecord], None] | None = None,
                    cost_model: str = "table", recalibrate: bool = True) -> dict:
    """One closed-loop run of `users` users over `requests` with one policy; returns `report(...)`."""
    from tqdm.auto import tqdm
    engine = Engine(target, drafter, policy, table, max_draft, cost_model=cost_model, recalibrate=recalibrate)
    total = n_requests if n_requests is not None else len(requests)
    with tqdm(total=total, desc=f"serve {policy} x{users}", unit="req", disable=not progress) as bar:
        for rec in closed_loop(requests, users, engine, n_requests, duration_s):
            bar.update(len(engine.done) - bar.n)
            if on_step is not None:
                on_step(engine, rec)
    return report(engine, users, drafter_spec)


def make_requests(target: Target, prompts: list, max_new_tokens: int, params: SamplingParams,
                  seed: int = 0) -> list[ServeRequest]:
    """ServeRequests from `bench.Prompt`s or strings: chat-encoded, seeds seed, seed + 1, ... .

    An empty prompt is kept (encoded as no tokens) so that the engine answers it with its own error.
    """
    out = []
    for i, p in enumerate(prompts):
        text = getattr(p, "text", p)
        ids = target.encode_prompt(text) if isinstance(text, str) and text.strip() else []
        out.append(ServeRequest(i, text, ids, max_new_tokens, params, seed + i))
    return out


def default_table_path() -> Path:
    """Where profiled cost tables are kept, keyed by device, model and dtype: the lab's cache folder."""
    return cache_root() / "cost_tables.json"


def cost_table_for(target: Target, path=None, reprofile: bool = False, progress: bool = True,
                   quick: bool = False) -> CostTable:
    """The stored SPS(B) table for this device, model and dtype; profiled (and stored) when absent or
    when `reprofile`. `quick` profiles fewer shapes with fewer repeats (a coarser table)."""
    from pathlib import Path
    path = Path(path) if path is not None else default_table_path()
    dtype = str(target.dtype).removeprefix("torch.")
    if not reprofile and path.exists():
        table = CostTable.load(path, str(target.device), target.name, dtype)
        if table is not None:
            return table
    shape = dict(rows=(1, 4, 16), widths=(1, 4, 9), repeats=2) if quick else {}
    table, _ = profile_cost_table(target, progress=progress, **shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.save(path)
    return table
