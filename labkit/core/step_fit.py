"""What an engine step costs, fitted from the engine's own steps: t = a + b R + c X.

Algorithm 1 (paper Sec. 3.2.2) weighs expected accepted tokens against the seconds a step takes at B
verified tokens, SPS(B), profiled once per device. On a GPU at serving scale a flattened batch costs by
its tokens. A CPU engine at tens of requests costs mostly by its requests: each request's drafting, its
attention over its own cache, its verdict and its drafter update. Measured here (SmolLM2-135M, 16
requests): about 12 ms a request and 0.2-0.7 ms a verified draft. A table pooled over shapes R x W
reads that per-request cost as a per-token cost (B = R x W grows with R), so Algorithm 1 thinks a verified
draft costs several times what it does, and verifies too little.

`StepFit` keeps an exponentially weighted least-squares fit of the step's wall seconds t (the step with
its retirements; the engine adds the mean admission time per step apart) against R (the requests in the
step) and X = B - R (the verified drafts, as the engine counts B), from past steps only, so the schedule
never depends on anything drawn in the step it schedules (verification stays lossless). `StepRate` is that fit seen from one step: R is fixed, so sps(B) = 1 / (a + b R + c (B - R)).
The drafting a deeper verification causes (the next step's drafting caps follow this step's lengths)
lands in c, because in steady state X moves with the depth drafted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from labkit.core.errors import LabkitError

#: weight of the newest step in the fit's running moments (an effective memory of about 1 / weight steps)
FIT_WEIGHT = 0.05
#: steps seen before the fit is used at all
MIN_STEPS = 8
#: below this weighted variance of X given R (tokens^2), the recent steps cannot tell c: no fit
MIN_SPREAD = 0.5


@dataclass
class StepRate:
    """One step's cost as Algorithm 1 reads it: sps(B) = 1 / (fixed_s + per_token_s * max(0, B - requests)).

    Non-increasing in B (per_token_s >= 0), the shape Algorithm 1's early break assumes."""

    fixed_s: float
    per_token_s: float
    requests: int

    def __post_init__(self):
        if not (self.fixed_s > 0.0 and self.per_token_s >= 0.0):
            raise LabkitError(f"a step's cost needs fixed seconds > 0 and seconds per token >= 0, got "
                              f"{self.fixed_s} and {self.per_token_s}.")

    def sps(self, batch_tokens: float) -> float:
        return 1.0 / (self.fixed_s + self.per_token_s * max(0.0, batch_tokens - self.requests))


@dataclass
class StepFit:
    """Exponentially weighted least squares of t = a + b R + c X over past engine steps (module docstring).

    `update` after each step; `coefficients` gives (a, b, c) once `min_steps` steps were seen and
    X varied at the same load, else None (the caller keeps its profiled table); b and c are never
    negative (a negative one is fixed at 0 and the rest refitted)."""

    weight: float = FIT_WEIGHT
    min_steps: int = MIN_STEPS
    steps: int = 0
    #: running means of the products of (1, R, X, t): the normal equations' moments
    moments: torch.Tensor = field(default_factory=lambda: torch.zeros(4, 4, dtype=torch.float64))

    def __post_init__(self):
        if not 0.0 < self.weight <= 1.0:
            raise LabkitError(f"the fit's weight must lie in (0, 1], got {self.weight}.")

    def update(self, requests: int, extra_tokens: int, seconds: float) -> None:
        if requests < 1 or extra_tokens < 0 or not seconds > 0.0:
            raise LabkitError(f"a step needs >= 1 request, >= 0 verified drafts and > 0 seconds, got "
                              f"{requests}, {extra_tokens}, {seconds}.")
        v = torch.tensor([1.0, float(requests), float(extra_tokens), float(seconds)], dtype=torch.float64)
        outer = torch.outer(v, v)
        w = max(self.weight, 1.0 / (self.steps + 1))  # the first steps are a plain mean, not biased to 0
        self.moments = (1 - w) * self.moments + w * outer
        self.steps += 1

    def coefficients(self) -> tuple[float, float, float] | None:
        if self.steps < self.min_steps:
            return None
        m = self.moments
        mean = m[0, 1:]
        cov = m[1:, 1:] - torch.outer(mean, mean)  # of (R, X, t)
        var_r, var_x, cov_rx = float(cov[0, 0]), float(cov[1, 1]), float(cov[0, 1])
        spread_x = var_x - (cov_rx ** 2 / var_r if var_r > 1e-9 else 0.0)  # variance of X left once R is known
        if spread_x < MIN_SPREAD:
            return None
        with_r = var_r > 1e-9
        b, c = self._slopes(cov, with_r)
        if c < 0.0:
            b, c = (float(cov[0, 2] / cov[0, 0]) if with_r else 0.0), 0.0
        if b < 0.0:
            b, c = 0.0, max(0.0, float(cov[1, 2] / cov[1, 1]))
        a = float(mean[2]) - b * float(mean[0]) - c * float(mean[1])
        return a, b, c

    @staticmethod
    def _slopes(cov: torch.Tensor, with_r: bool) -> tuple[float, float]:
        if not with_r:  # one load throughout: b is not identifiable, and the intercept absorbs it
            return 0.0, float(cov[1, 2] / cov[1, 1])
        b, c = torch.linalg.solve(cov[:2, :2], cov[:2, 2]).tolist()
        return b, c

    def rate(self, requests: int) -> StepRate | None:
        """This step's `StepRate` at `requests` requests, or None while the fit is not ready (or predicts a
        step of no time at this load, which only a fit far outside the loads it saw can)."""
        coef = self.coefficients()
        if coef is None:
            return None
        a, b, c = coef
        fixed = a + b * requests
        return StepRate(fixed, c, requests) if fixed > 0.0 else None
