"""What a whole engine step costs at R requests verifying W drafts each: the table cost model "steps" reads.

The profiled SPS(B) table times the target's verify forward alone (`labkit.model.timing`), and the engine
adds a running mean of drafting per request. On this CPU a step is more than that forward: drafting to
the step's caps, the forward, the verdicts, the drafters' batched context update and the rollback.
Measured on session 9's CPU at 8 users (data/serving/cpu-measurements-2026-12-06.md, sweep19), a step
verifying 2 drafts a request took 117.7 ms to verify and 17.4 to draft where the table priced its forward
at 108.7 ms and its drafting as a one-draft step's, so Algorithm 1 over whole columns verified a second
column that did not pay.

`profile_engine_steps` times the engine's own `step` instead: one engine per row count R, each holding R
requests over random prompts of `kv_len` tokens, and for every width W a step under a policy that drafts
W tokens a request (at least one) and verifies them (the steady state of a policy that keeps verifying W:
it drafts one past W only every few steps, `next_draft_cap`); the profiled requests stop on no token, so
every step runs R rows. The (R, W) shapes are interleaved in rounds, each round on fresh requests so that
the caches do not grow through the profile (a first version let them grow by up to 550 tokens and priced
a 16-request step 15-25% above what the engine's steps took in a sweep). The result is a `CostTable`
whose shapes are (R, 1 + W tokens a row, median seconds of the whole step), read at the step's R by
`CostTable.at_rows` with no drafting added (`Engine(cost_model="steps")`). It belongs to the drafter it
was profiled with: its `model` names both. About 5 minutes on a 2-core CPU, mostly the fresh prefills.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from labkit.core.errors import LabkitError
from labkit.core.sampling import SamplingParams
from labkit.core.scheduler import CostTable, ScheduleInput
from labkit.decode.engine import Engine, ServeRequest, default_table_path
from labkit.drafters.base import Drafter
from labkit.model.target import Target
from labkit.model.timing import table_from_points

#: timed engine steps per shape, one a round (after one untimed round)
STEP_REPEATS = 12
#: drafts verified per request in the profiled steps (0 = plain batched decoding)
STEP_WIDTHS = (0, 1, 2, 3, 4, 6)
STEP_ROWS = (1, 2, 4, 8, 16, 32)
#: context tokens in each profiled request's cache: the served mix's prompts (about 96 tokens from the
#: benchmark files) plus half of a 48-token answer
STEP_KV_LEN = 128


@dataclass
class VerifyWidth:
    """A profiling policy: every request drafts `width` tokens (at least one) and verifies them all."""

    width: int
    chooses_lengths = False

    @property
    def name(self) -> str:
        return f"profile:{self.width}"

    @property
    def draft_cap(self) -> int:
        return max(self.width, 1)

    def __call__(self, inp: ScheduleInput) -> list[int]:
        return [min(self.width, m) for m in inp.max_lengths]


def step_table_model(target: Target, drafter_spec: str, temperature: float = 0.0) -> str:
    """The `model` key of a whole-step table: the target, the drafter it was profiled with and, for sampled
    steps, the temperature (a sampled step also pays for probability rows and draws)."""
    served = f", T={float(temperature):g}" if temperature > 0 else ""
    return f"{target.name} + {drafter_spec} (engine steps{served})"


def _fresh_engines(target: Target, drafter: Drafter, rows: Sequence[int], kv_len: int, new_tokens: int,
                   gen: torch.Generator, seed: int, params: SamplingParams) -> dict[int, Engine]:
    """One engine per row count, filled with that many requests over random prompts, each engine stepped
    once untimed (whatever a drafter sets up on a request's first step is not a step's cost)."""
    engines = {}
    for r in rows:
        engine = Engine(target, drafter, "mtp1")
        ids = torch.randint(0, target.vocab_size, (r, kv_len), generator=gen).tolist()
        refused = engine.add_many([ServeRequest(i, "", ids[i], new_tokens, params, seed + i)
                                   for i in range(r)])
        if refused:
            raise LabkitError(f"profiling could not admit its requests: {next(iter(refused.values())).error}")
        engine.policy = VerifyWidth(0)
        engine.step()
        engines[r] = engine
    return engines


def profile_engine_steps(target: Target, drafter: Drafter, drafter_spec: str,
                         rows: Sequence[int] = STEP_ROWS, widths: Sequence[int] = STEP_WIDTHS,
                         kv_len: int = STEP_KV_LEN, repeats: int = STEP_REPEATS, seed: int = 0,
                         progress: bool = False, clock: Callable[[], float] = time.perf_counter,
                         temperature: float = 0.0) -> tuple[CostTable, list[dict]]:
    """The whole-step table of `drafter` on `target` (module docstring) and its points, one per (R, W):
    {"rows", "width" (1 + W tokens a row), "drafts" (W), "batch_tokens", "seconds" (median), "sps",
    "samples_s"}.

    One untimed round first, then `repeats` rounds; each round starts from fresh requests (prefilled
    and stepped once untimed), so the caches stay near `kv_len` instead of growing through the profile,
    and times every shape once in a fresh seeded order. `temperature` > 0 serves the profiled requests
    sampled at it (greedy by default) and names it in the table's `model`. Measured on session 13's CPU
    (data/serving/cpu-measurements-2026-12-06.md): a T = 1 step cost 2-5% more than a greedy one at 1, 2
    and 4 rows, with no trend in the width (0.91-1.11 shape by shape, the profile's own noise), so a
    greedy table prices T = 1 steps in the same proportions and Algorithm 1's choice does not move."""
    rows, widths = sorted(set(rows)), sorted(set(widths))
    if not rows or rows[0] < 1 or not widths or widths[0] < 0 or repeats < 1 or kv_len < 1:
        raise LabkitError(f"profiling engine steps needs row counts >= 1, widths >= 0, repeats >= 1 and kv_len "
                          f">= 1, got {rows}, {widths}, {repeats} and {kv_len}.")
    if widths[-1] + 1 > drafter.gamma:
        raise LabkitError(f"a width of {widths[-1]} drafts needs a block of {widths[-1] + 1}, and this drafter "
                          f"drafts {drafter.gamma}: pass widths up to {drafter.gamma - 1}.")
    new_tokens = (1 + len(widths)) * (widths[-1] + 1) + 1  # a round never finishes a request
    window = getattr(target.config, "max_position_embeddings", None)
    if window is not None and kv_len + new_tokens > window:
        raise LabkitError(f"profiling grows each request to {kv_len + new_tokens} tokens, past the model's window "
                          f"of {window}: pass a smaller kv_len.")
    # No stop tokens: a random prompt can make the target emit one, and a profiled row must keep running.
    endless = replace(target, eos_token_ids=set())
    params = SamplingParams(temperature=float(temperature))
    gen, order = torch.Generator().manual_seed(seed), random.Random(seed)
    shapes = [(r, w) for r in rows for w in widths]
    samples: dict[tuple[int, int], list[float]] = {rw: [] for rw in shapes}
    for round_ in tqdm(range(1 + repeats), desc="profiling engine steps", disable=not progress, unit="round"):
        engines = _fresh_engines(endless, drafter, rows, kv_len, new_tokens, gen, seed, params)
        visit = list(shapes)
        order.shuffle(visit)
        for r, w in visit:
            engine = engines[r]
            engine.policy = VerifyWidth(w)
            start = clock()
            engine.step()
            if round_:
                samples[(r, w)].append(clock() - start)
    points = []
    for r, w in shapes:
        seconds = statistics.median(samples[(r, w)])
        points.append({"rows": r, "width": 1 + w, "drafts": w, "batch_tokens": r * (1 + w), "seconds": seconds,
                       "sps": 1.0 / seconds, "samples_s": samples[(r, w)]})
    table = table_from_points(points, str(target.device), step_table_model(target, drafter_spec, temperature),
                              str(target.dtype).removeprefix("torch."))
    return table, points


def step_table_for(target: Target, drafter: Drafter, drafter_spec: str, path=None, reprofile: bool = False,
                   progress: bool = True) -> CostTable:
    """The stored whole-step table of this device, target, drafter and dtype; profiled (and stored, in the
    same file as the forward tables) when absent or when `reprofile`."""
    path = Path(path) if path is not None else default_table_path()
    dtype = str(target.dtype).removeprefix("torch.")
    model = step_table_model(target, drafter_spec)
    if not reprofile and path.exists():
        table = CostTable.load(path, str(target.device), model, dtype)
        if table is not None:
            return table
    table, _ = profile_engine_steps(target, drafter, drafter_spec, progress=progress)
    table.save(path)
    return table
