"""Confidence-scheduled verification for one request: Algorithm 1 (DSpark Sec. 3.2.2) at R = 1.

A drafter with a confidence head (DSpark) proposes gamma tokens with calibrated confidences c_j;
verifying l of them costs one target forward over 1 + l tokens. On this CPU that cost jumps between
one token and two (a GEMV against a packed GEMM: `labkit round-cost`), so a block whose first draft
will probably be rejected is cheaper not verified at all: the round becomes a plain decoding step.

`ScheduledDrafter` wraps any drafter and cuts each proposal to the prefix that the scheduler's own
Algorithm 1 admits, on a table of round rates for one request:

    SPS(1 + l) = 1 / (T_draft + T_verify(1 + l))

with T_verify measured on this device (`labkit.model.timing.verify_table`, the forward cost of notebook 00) and T_draft
the wrapped drafter's running mean, measured here around every proposal. The objective is the
paper's: expected tokens of the round, (1 + sum_{j<=l} a_j), times the rate, where a_j is the
survival prod_{i<=j} c_i. Proposals without confidences (prompt lookup, a hybrid block with a copied
part) pass unchanged.

Lossless: the cut is a prefix, and with the early break whether draft j is verified depends on
c_1..c_j only, which are computed before x_j is drawn (c_j reads x_{j-1}, never x_j: Appendix A).
The verified tokens keep the exact probability rows they were drawn from. The batched engine runs
its own scheduler over all requests, so this wrapper serves single-request decoding only.
"""

from __future__ import annotations

import time

import torch

from labkit.drafters.base import Drafter, DraftRequest, Proposal
from labkit.core.errors import LabkitError
from labkit.core.scheduler import Algorithm1, CostTable, RoundRate, ScheduleInput, running_mean

class ScheduledDrafter(Drafter):
    """Drafter protocol around `inner`: each confident proposal is cut to the prefix Algorithm 1 admits.

    `counts`: rounds seen, rounds scheduled (they had confidences), rounds cut short, rounds cut to
    nothing (a plain decoding step), and drafts dropped unverified.
    """

    batchable = False  # the engine schedules all requests together (labkit.decode.engine.Engine), not one by one

    def __init__(self, inner: Drafter, table: CostTable):
        if isinstance(inner, ScheduledDrafter):
            raise LabkitError("This drafter is already scheduled: use sched:<drafter> once.")
        self.inner, self.table = inner, table
        self.name = f"sched:{inner.name}"
        self.vocab_size = inner.vocab_size
        self.hidden_layers = inner.hidden_layers
        self.needs_target_cache = inner.needs_target_cache
        self.has_confidences = inner.has_confidences
        self.policy = Algorithm1()
        self.draft_s: float | None = None
        self.counts = {"rounds": 0, "scheduled": 0, "cut": 0, "skipped": 0, "dropped": 0}

    @property
    def gamma(self) -> int:
        return self.inner.gamma

    def temperatures(self, params):
        """The wrapped drafter's STS temperatures (None if it has none)."""
        return self.inner.temperatures(params)

    def draft_vocab(self) -> torch.Tensor | None:
        return self.inner.draft_vocab()

    def start(self, request: DraftRequest, hidden) -> None:
        self.inner.start(request, hidden)

    def observe(self, request: DraftRequest, n_accepted: int, hidden) -> None:
        self.inner.observe(request, n_accepted, hidden)

    def propose(self, request: DraftRequest, max_tokens: int) -> Proposal:
        begin = time.perf_counter()
        prop = self.inner.propose(request, max_tokens)
        self.counts["rounds"] += 1
        if prop.confidences is None or len(prop) == 0:
            return prop
        spent = time.perf_counter() - begin
        self.draft_s = running_mean(self.draft_s, spent)
        keep = self.length(prop.confidences)
        self.counts["scheduled"] += 1
        if keep < len(prop):
            self.counts["cut"] += 1
            self.counts["skipped"] += keep == 0
            self.counts["dropped"] += len(prop) - keep
        return prop.truncate(keep)

    def length(self, confidences: torch.Tensor) -> int:
        """l: how many of these drafts Algorithm 1 verifies at the current round rates."""
        inp = ScheduleInput(conf=confidences.detach().float().view(1, -1),
                            table=RoundRate(self.table, self.draft_s or 0.0))
        return self.policy(inp)[0]


__all__ = ["ScheduledDrafter"]
