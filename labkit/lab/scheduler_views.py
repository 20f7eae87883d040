"""Figures and small computations for notebook 05, the hardware-aware prefix scheduler.

`labkit.core.scheduler` holds the math (cost table, survival, Algorithm 1, the production variant, the
Appendix A counterexample); this module only looks at it: it walks Algorithm 1's admission path one
candidate at a time and records theta after each admission (`admission_walk`), replays recorded
confidence blocks as batches of R requests to see how the verification budget per request falls as
the load rises (`budget_sweep`), and draws plotly figures of both, of the profiled SPS(B) curve and of
the Appendix A sampling. Nothing here times anything or loads a model.

Notation as in the paper and `labkit.core.scheduler`: c_{r,j} calibrated confidences, a_{r,j} = prod_{i<=j}
c_{r,i} survivals, B tokens in the target forward, tau* = R + sum of admitted survivals, theta =
tau* x SPS(B), the expected tokens per second.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from labkit.core.errors import LabkitError
from labkit.core.evidence import verdict
from labkit.lab.plots import COLORS, POLICY_COLORS, POLICY_LABELS, TEMPLATE
from labkit.core.scheduler import (
    APPENDIX_A_P_T,
    AppendixAArithmetic,
    CostTable,
    HasSPS,
    ScheduleInput,
    admission_path,
    expected_throughput,
    make_policy,
    packed_tokens,
)
from labkit.core.calibration import survival
from labkit.core.scheduler import admission_walk as core_walk

#: the policies the load sweep compares by default (paper Fig. 8: MTP-1 is the production baseline)
SWEEP_POLICIES = ("algorithm1", "fixed", "mtp1", "async-topk")

# ---------------------------------------------------------------------------------------------------
# The profiled SPS(B) curve


def sps_figure(table: CostTable, points: Sequence[dict] | None = None,
               title: str | None = None) -> go.Figure:
    """SPS(B) as profiled (each (R, W) shape, the median per B with the quartiles of its samples as
    error bars) and as the scheduler reads it (the isotonic fit, `CostTable.smoothed_sps`).

    Left: steps per second against B (log axis). Right: tokens per second, B x SPS(B), which levels off
    where the device is compute-bound. `points` are `profile_cost_table`'s per-shape measurements
    ({"rows", "width", "batch_tokens", "sps"}); traces: "per shape (R x W)" (when points are given),
    "raw (median per B)" (error bars where the table kept its spread), "fitted (isotonic)".
    """
    fig = make_subplots(rows=1, cols=2, subplot_titles=("target steps per second, SPS(B)",
                                                        "tokens per second, B x SPS(B)"))
    xs, raw, fitted = table.batch_sizes, table.raw_sps, table.smoothed_sps
    if points:
        fig.add_trace(go.Scatter(
            x=[p["batch_tokens"] for p in points], y=[p["sps"] for p in points], mode="markers",
            name="per shape (R x W)", marker=dict(size=8, color=COLORS["floor"], symbol="circle-open"),
            text=[f"R={p['rows']} x W={p['width']}" for p in points],
            hovertemplate="%{text}<br>B=%{x}<br>SPS %{y:.3g}<extra></extra>"), row=1, col=1)
        fig.add_trace(go.Scatter(
            x=[p["batch_tokens"] for p in points], y=[p["batch_tokens"] * p["sps"] for p in points],
            mode="markers", name="per shape (R x W)", showlegend=False, legendgroup="shape",
            marker=dict(size=8, color=COLORS["floor"], symbol="circle-open")), row=1, col=2)
        fig.data[0].legendgroup = "shape"
    counts = table.counts or [None] * len(xs)
    for col, scale in ((1, [1] * len(xs)), (2, xs)):
        errors = None
        if table.raw_low is not None:
            errors = dict(type="data", symmetric=False, thickness=1.5,
                          array=[k * (hi - r) for k, hi, r in zip(scale, table.raw_high, raw)],
                          arrayminus=[k * (r - lo) for k, lo, r in zip(scale, table.raw_low, raw)])
        unit = "steps/s" if col == 1 else "tokens/s"
        fig.add_trace(go.Scatter(
            x=xs, y=[k * r for k, r in zip(scale, raw)], mode="markers", name="raw (median per B)",
            legendgroup="raw", showlegend=col == 1, error_y=errors,
            marker=dict(size=7, color=COLORS["p_d"]), customdata=[c if c else "?" for c in counts],
            hovertemplate=f"B=%{{x}}<br>median %{{y:.3g}} {unit}<br>%{{customdata}} samples<extra></extra>"),
            row=1, col=col)
        fig.add_trace(go.Scatter(
            x=xs, y=[k * f for k, f in zip(scale, fitted)], mode="lines+markers", name="fitted (isotonic)",
            legendgroup="fitted", showlegend=col == 1, line=dict(color=COLORS["p_t"], width=3),
            hovertemplate=f"B=%{{x}}<br>fitted %{{y:.3g}} {unit}<extra></extra>"), row=1, col=col)
    fig.update_xaxes(type="log", title_text="tokens in the forward, B")
    fig.update_yaxes(title_text="steps / s", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="tokens / s", rangemode="tozero", row=1, col=2)
    fig.update_layout(template=TEMPLATE, height=420, legend=dict(orientation="h", y=-0.2),
                      title=title or f"SPS(B) profiled on {table.device} ({table.model}, {table.dtype})")
    return fig


def describe_sps(table: CostTable) -> str:
    """How steeply SPS falls with B on this table (from the fitted curve), and which batch sizes the
    isotonic fit pooled (where a larger B measured faster than a smaller one)."""
    xs, ys = table.batch_sizes, table.smoothed_sps
    b_half = next((b for b, s in zip(xs, ys) if s <= ys[0] / 2), None)
    cost = ys[0] / ys[-1]
    half = (f"SPS halves by B = {b_half}" if b_half is not None
            else f"SPS never halves within the profile (B <= {xs[-1]})")
    pooled = table.pooled
    fit = (" The fit pooled no sizes: the medians already fall with B." if not pooled else
           " The fit pooled " + "; ".join(f"B = {', '.join(map(str, sizes))}" for sizes in pooled) +
           " into the weighted mean of their medians (a larger B measured at least as fast as a smaller one).")
    raised = [b for b, r, v in zip(xs, table.raw_sps, ys) if v > 1.25 * r]
    lowered = [b for b, r, v in zip(xs, table.raw_sps, ys) if v < r / 1.25]
    moved = [f"{verb} SPS by more than 20% at B = {', '.join(map(str, bs))}"
             for verb, bs in (("raised", raised), ("lowered", lowered)) if bs]
    noise = ("" if not moved else
             f" The fit {' and '.join(moved)}: the measurements there disagree with their neighbours, usually "
             "another job on the machine; profile again before trusting this curve.")
    return (f"On {table.device} SPS falls from {ys[0]:.3g} steps/s at B = {xs[0]} to {ys[-1]:.3g} at B = {xs[-1]}: "
            f"one forward of {xs[-1]} tokens costs {cost:.2f}x one of {xs[0]}, so {xs[-1] / xs[0] / cost:.1f}x the "
            f"tokens per second; {half}.{fit}{noise}")


# ---------------------------------------------------------------------------------------------------
# Algorithm 1, one admission at a time


@dataclass
class AdmissionStep:
    """The state after the k-th admission of the sorted path (k = 0: nothing admitted yet)."""

    k: int
    request: int | None  # r of the k-th candidate (0-based); None at k = 0
    position: int | None  # its j (1-based)
    survival: float | None  # its a_{r,j}: the expected tokens it adds
    batch_tokens: int  # B after the admission
    tau: float  # tau* after the admission
    sps: float  # SPS(B)
    theta: float  # tau* x SPS(B)
    needed: float | None  # the a that would have kept theta level: tau*_{k-1} (SPS(B_{k-1}) / SPS(B_k) - 1)


@dataclass
class AdmissionWalk:
    """Algorithm 1's admission path walked to its end (past the break, to show what lies there).

    `break_at` is the k of the first admission that does not raise theta above the best so far:
    Algorithm 1 undoes it and stops, keeping `algorithm1_k` = break_at - 1 admissions (all of them
    when there is no break). `peak_k` is where theta is largest along the whole path, what the biased
    retrospective search (no break) keeps.
    """

    steps: list[AdmissionStep]
    break_at: int | None
    algorithm1_k: int
    peak_k: int
    n_requests: int
    gamma: int

    def lengths(self, k: int) -> list[int]:
        """l_r after the first k admissions (each extends one request's prefix by one)."""
        out = [0] * self.n_requests
        for s in self.steps[1:k + 1]:
            out[s.request] = s.position
        return out

    @property
    def algorithm1_lengths(self) -> list[int]:
        return self.lengths(self.algorithm1_k)

    @property
    def retrospective_lengths(self) -> list[int]:
        return self.lengths(self.peak_k)

    def rows(self, limit: int | None = None) -> list[tuple]:
        """The walk as table rows: k, (r, j), a, B, tau*, SPS(B), theta, and what Algorithm 1 did."""
        out = []
        for s in self.steps[:None if limit is None else limit + 1]:
            if s.k == 0:
                verdict = "start: one token per request"
            elif s.k <= self.algorithm1_k:
                verdict = "admitted (theta rose)"
            elif s.k == self.break_at:
                verdict = "BREAK: theta did not rise; undone, stop"
            else:
                verdict = "never looked at by Algorithm 1"
            out.append((s.k, "-" if s.request is None else f"r{s.request + 1}, j={s.position}",
                        "-" if s.survival is None else f"{s.survival:.3f}", s.batch_tokens, f"{s.tau:.3f}",
                        f"{s.sps:.4g}", f"{s.theta:.4g}", verdict))
        return out


ADMISSION_HEADER = ("k", "candidate", "a_{r,j}", "B", "tau*", "SPS(B)", "theta = tau* x SPS(B)", "Algorithm 1")


def admission_walk(inp: ScheduleInput) -> AdmissionWalk:
    """Every candidate of `inp`'s global sort admitted in turn, with theta after each, for the table and
    the figure: the walk itself is `labkit.core.scheduler.admission_walk`, the arithmetic `Algorithm1`
    and the retrospective search run on, so `algorithm1_lengths` equals `Algorithm1()(inp)` and
    `retrospective_lengths` equals `Retrospective()(inp)`.
    """
    w = core_walk(inp)
    steps = [AdmissionStep(0, None, None, None, w.batch_tokens[0], w.tau[0], w.sps[0], w.theta[0], None)]
    for k, (r, j, a) in enumerate(w.path.candidates(), start=1):
        needed = w.tau[k - 1] * (w.sps[k - 1] / w.sps[k] - 1.0)
        steps.append(AdmissionStep(k, r, j, a, w.batch_tokens[k], w.tau[k], w.sps[k], w.theta[k], needed))
    return AdmissionWalk(steps, w.break_at, w.algorithm1_k, w.peak_k, w.n_requests, inp.conf.shape[1])


def admission_path_figure(walk: AdmissionWalk, title: str | None = None) -> go.Figure:
    """theta after each admission of the sorted path, Algorithm 1's stop and the path's global maximum.

    Top: traces "theta along the sorted path", "admitted by Algorithm 1", "Algorithm 1's peak",
    "break: first drop" (empty when Algorithm 1 admits the whole path) and "global maximum (no
    break)". Bottom: each candidate's survival a_{r,j} ("a_{r,j}: tokens it adds") against the gain
    it needed to keep theta level ("gain needed to pay"); the first bar below its mark is the break.
    """
    steps = walk.steps
    ks = [s.k for s in steps]
    label = ["start" if s.k == 0 else f"r{s.request + 1}, j={s.position}" for s in steps]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.6, 0.4],
                        subplot_titles=("expected throughput theta = tau* x SPS(B) after k admissions",
                                        "what the k-th candidate adds, and what it needed to add"))
    fig.add_trace(go.Scatter(x=ks, y=[s.theta for s in steps], mode="lines+markers", name="theta along the sorted path",
                             line=dict(color=COLORS["floor"]), text=label, customdata=[s.batch_tokens for s in steps],
                             hovertemplate="k=%{x}: %{text}<br>B=%{customdata}<br>theta %{y:.4g}<extra></extra>"),
                  row=1, col=1)
    kept = steps[:walk.algorithm1_k + 1]
    fig.add_trace(go.Scatter(x=[s.k for s in kept], y=[s.theta for s in kept], mode="markers",
                             name="admitted by Algorithm 1", marker=dict(size=10, color=COLORS["accepted"])), row=1, col=1)
    peak = steps[walk.algorithm1_k]
    fig.add_trace(go.Scatter(x=[peak.k], y=[peak.theta], mode="markers", name="Algorithm 1's peak",
                             marker=dict(size=18, symbol="star", color="gold", line=dict(color="black", width=1))),
                  row=1, col=1)
    brk = [] if walk.break_at is None else [steps[walk.break_at]]
    fig.add_trace(go.Scatter(x=[s.k for s in brk], y=[s.theta for s in brk], mode="markers", name="break: first drop",
                             marker=dict(size=16, symbol="x", color=COLORS["residual"])), row=1, col=1)
    top = steps[walk.peak_k]
    fig.add_trace(go.Scatter(x=[top.k], y=[top.theta], mode="markers", name="global maximum (no break)",
                             marker=dict(size=20, symbol="circle-open", color=COLORS["bonus"], line=dict(width=3))),
                  row=1, col=1)
    if walk.break_at is not None:
        fig.add_vline(x=walk.break_at - 0.5, line=dict(color=COLORS["residual"], dash="dash"))
    later = steps[1:]
    fig.add_trace(go.Bar(x=[s.k for s in later], y=[s.survival for s in later], name="a_{r,j}: tokens it adds",
                         marker_color=[COLORS["accepted"] if s.k <= walk.algorithm1_k else COLORS["floor"] for s in later],
                         text=[label[s.k] for s in later], hovertemplate="%{text}<br>a=%{y:.3f}<extra></extra>"),
                  row=2, col=1)
    fig.add_trace(go.Scatter(x=[s.k for s in later], y=[s.needed for s in later], mode="markers",
                             name="gain needed to pay", marker=dict(symbol="line-ew-open", size=18, color="black",
                                                                    line=dict(width=3))), row=2, col=1)
    fig.update_xaxes(range=[-0.6, len(ks) - 0.4])
    fig.update_xaxes(title_text="admissions k (candidates in global sort order)", dtick=1 if len(ks) <= 40 else None,
                     row=2, col=1)
    fig.update_yaxes(title_text="expected tokens / s", row=1, col=1)
    fig.update_yaxes(title_text="tokens", rangemode="tozero", row=2, col=1)
    fig.update_layout(template=TEMPLATE, height=620, legend=dict(orientation="h", y=-0.15),
                      title=title or (f"Algorithm 1 on {walk.n_requests} requests x gamma {walk.gamma}: "
                                      + (f"break at k = {walk.break_at}" if walk.break_at is not None
                                         else "no break (the whole path pays)")))
    return fig


def prefix_grid_figure(inp: ScheduleInput, lengths: Sequence[int], title: str | None = None) -> go.Figure:
    """Requests x draft positions, coloured by survival a_{r,j}, the verified prefix outlined.

    Each cell reads c (its confidence), a (its survival) and #n, its place in the global sort. Traces:
    "survival a_{r,j}" (the heatmap) and "admitted (verified)" (a marker on every admitted cell).
    Cells past a request's real drafts stay blank.
    """
    a = survival(inp.conf, inp.max_lengths)
    n_req, gamma = a.shape
    real = torch.arange(gamma) < torch.tensor(inp.max_lengths).view(-1, 1)
    rank = {(r, j): n for n, (r, j, _) in enumerate(admission_path(inp).candidates(), start=1)}
    z = [[float(a[r, j]) if real[r, j] else None for j in range(gamma)] for r in range(n_req)]
    text = [[(f"c={float(inp.conf[r, j]):.2f}<br>a={float(a[r, j]):.2f}<br>#{rank[(r, j + 1)]}"
              if (r, j + 1) in rank else f"c={float(inp.conf[r, j]):.2f}<br>a=0") if real[r, j] else ""
             for j in range(gamma)] for r in range(n_req)]
    ys = [f"request {r + 1}" for r in range(n_req)]
    fig = go.Figure(go.Heatmap(z=z, x=list(range(1, gamma + 1)), y=ys, text=text, texttemplate="%{text}",
                               colorscale="Greens", zmin=0, zmax=1, name="survival a_{r,j}",
                               colorbar=dict(title="a_{r,j}"), hoverinfo="skip"))
    cells = [(j, ys[r]) for r in range(n_req) for j in range(1, int(lengths[r]) + 1)]
    fig.add_trace(go.Scatter(x=[c[0] for c in cells], y=[c[1] for c in cells], mode="markers",
                             name="admitted (verified)",
                             marker=dict(symbol="square-open", size=46, color=COLORS["residual"], line=dict(width=3))))
    fig.update_xaxes(title_text="draft position j", dtick=1)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(template=TEMPLATE, height=120 + 70 * n_req, legend=dict(orientation="h", y=-0.25),
                      title=title or "Verified prefixes: " + ", ".join(
                          f"l_{r + 1} = {int(l)}" for r, l in enumerate(lengths)))
    return fig


# ---------------------------------------------------------------------------------------------------
# Appendix A


def appendix_a_rows(arith: AppendixAArithmetic) -> list[tuple[str, str]]:
    """The counterexample's numbers as (quantity, value) rows, all read from `appendix_a_arithmetic()`."""
    rows = [("a_1 = sum_x min(p_t(x), p_d(x))", f"{arith.a1:.3f}"),
            ("theta_0 = 1 x SPS(1)", f"{arith.theta_0:.3f}"),
            ("theta_1 = (1 + a_1) x SPS(2)", f"{arith.theta_1:.3f}")]
    rows += [(f"theta_2 if x_1 = {x} (c_2 = {'0.9' if x == 'A' else '0'})", f"{v:.3f}") for x, v in arith.theta_2.items()]
    for name, by_x in arith.lengths.items():
        rows.append((f"{POLICY_LABELS.get(name, name)}: l if x_1 = A / B", " / ".join(str(by_x[x]) for x in "AB")))
        p = arith.first_token_probs[name]
        rows.append((f"{POLICY_LABELS.get(name, name)}: P(first token = A, B)", f"({p[0]:.3f}, {p[1]:.3f})"))
    return rows


def appendix_a_figure(counts: dict[str, Sequence[int]], p_t: Sequence[float] = APPENDIX_A_P_T,
                      labels: Sequence[str] = ("A", "B"), title: str | None = None) -> go.Figure:
    """First-token frequencies per policy (one bar group per token) against the target p_t.

    Traces: one bar trace per policy in `counts` (named by the policy), then "target p_t".
    """
    fig = go.Figure()
    for name, c in counts.items():
        n = sum(c)
        fig.add_trace(go.Bar(x=list(labels), y=[v / n for v in c], name=name,
                             marker_color=POLICY_COLORS.get(name), text=[f"{v / n:.3f}" for v in c],
                             textposition="outside", hovertemplate=f"{name}<br>%{{x}}: %{{y:.4f}} of {n:,} draws<extra></extra>"))
    fig.add_trace(go.Scatter(x=list(labels), y=list(p_t), mode="markers", name="target p_t",
                             marker=dict(symbol="diamond", size=16, color="black")))
    fig.update_layout(template=TEMPLATE, barmode="group", yaxis_title="frequency of the first output token",
                      yaxis_range=[0, 1.05], height=420,
                      title=title or "Appendix A by sampling: the first output token under each search")
    return fig


# ---------------------------------------------------------------------------------------------------
# Budget against load: recorded confidence blocks replayed as batches of R requests


@dataclass
class BudgetPoint:
    """One policy at one load, averaged over the sampled batches."""

    policy: str
    requests: int
    batches: int
    budget: float  # mean tokens verified per request per step, 1 + l_r (the anchor/bonus slot included)
    batch_tokens: float  # mean B
    tau_per_request: float  # mean expected tokens per request per step, 1 + sum_{j<=l_r} a_{r,j}
    theta: float  # mean expected throughput, tokens / s (tau* x SPS(B))

    @property
    def per_request_tokens_per_s(self) -> float:
        """Expected tokens per second each request sees, theta / R (the per-user speed)."""
        return self.theta / self.requests


def budget_sweep(conf: torch.Tensor, table: HasSPS, loads: Sequence[int], policies: Sequence[str] = SWEEP_POLICIES,
                 batches: int = 64, seed: int = 0, max_lengths: Sequence[int] | None = None,
                 batch_tokens: Callable[[list[int]], int] = packed_tokens) -> list[BudgetPoint]:
    """For each R in `loads`: sample `batches` batches of R blocks from the recorded `conf` (N, gamma),
    ask each policy for its lengths, and average the verification budget 1 + l_r and theta.

    Rows are drawn with replacement, the same batches for every policy (a paired comparison). The
    production variant (async-topk) needs each request's confidences of two steps before: they are
    another block drawn from the same pool, independently (the capacity then comes from a block like
    the current one, not the same one, which is what two steps of delay make of it).
    """
    if not isinstance(conf, torch.Tensor) or conf.dim() != 2 or conf.shape[0] == 0:
        raise LabkitError("budget_sweep needs recorded confidences as an (N, gamma) tensor with N >= 1: "
                          "decode a few prompts with a DSpark drafter first.")
    if batches < 1 or any(int(r) < 1 for r in loads):
        raise LabkitError(f"budget_sweep needs batches >= 1 and every load >= 1, got batches={batches}, loads={list(loads)}.")
    n, gamma = conf.shape
    ml = [gamma] * n if max_lengths is None else [int(m) for m in max_lengths]
    if len(ml) != n:
        raise LabkitError(f"max_lengths must have one entry per recorded block ({n}), got {len(ml)}.")
    chosen = {name: make_policy(name) for name in policies}
    gen = torch.Generator().manual_seed(seed)
    out = []
    for r_count in loads:
        r_count = int(r_count)
        sums = {name: [0.0, 0.0, 0.0, 0.0] for name in chosen}  # budget, B, tau per request, theta
        for _ in range(batches):
            rows = torch.randint(n, (r_count,), generator=gen)
            old = torch.randint(n, (r_count,), generator=gen)
            inp = ScheduleInput(conf[rows], table, [ml[i] for i in rows.tolist()], batch_tokens,
                                old_conf=conf[old], old_max_lengths=[ml[i] for i in old.tolist()])
            a = survival(inp.conf, inp.max_lengths)
            for name, policy in chosen.items():
                lengths = policy(inp)
                admitted = torch.arange(gamma) < torch.tensor(lengths).view(-1, 1)
                s = sums[name]
                s[0] += 1.0 + sum(lengths) / r_count
                s[1] += inp.batch_tokens(list(lengths))
                s[2] += 1.0 + float(a[admitted].sum()) / r_count
                s[3] += expected_throughput(inp, lengths)
        for name, s in sums.items():
            out.append(BudgetPoint(name, r_count, batches, *(v / batches for v in s)))
    return out


def budget_figure(points: Sequence[BudgetPoint], title: str | None = None) -> go.Figure:
    """Left: mean verification budget per request (1 + l_r) against R. Right: expected throughput theta.

    One trace per policy in each panel, both named by the policy (one legend entry per policy).
    """
    fig = make_subplots(rows=1, cols=2, subplot_titles=("verification budget per request, 1 + l_r",
                                                        "expected throughput theta (tokens / s)"))
    for name in dict.fromkeys(p.policy for p in points):
        pts = sorted((p for p in points if p.policy == name), key=lambda p: p.requests)
        style = dict(color=POLICY_COLORS.get(name), width=3 if name == "algorithm1" else 2)
        xs = [p.requests for p in pts]
        fig.add_trace(go.Scatter(x=xs, y=[p.budget for p in pts], mode="lines+markers", name=name, line=style,
                                 legendgroup=name, hovertemplate=f"{name}<br>R=%{{x}}<br>1 + l = %{{y:.2f}}<extra></extra>"),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=xs, y=[p.theta for p in pts], mode="lines+markers", name=name, line=style,
                                 legendgroup=name, showlegend=False, customdata=[p.batch_tokens for p in pts],
                                 hovertemplate=f"{name}<br>R=%{{x}}<br>theta %{{y:.3g}} tokens/s<br>mean B %{{customdata:.1f}}"
                                               "<extra></extra>"), row=1, col=2)
    loads = sorted({p.requests for p in points})
    fig.update_xaxes(title_text="concurrent requests R", tickvals=loads if len(loads) <= 16 else None)
    fig.update_yaxes(title_text="tokens verified per request per step", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="expected tokens / s", rangemode="tozero", row=1, col=2)
    fig.update_layout(template=TEMPLATE, height=440, legend=dict(orientation="h", y=-0.2),
                      title=title or "How the verification budget per request falls as load rises")
    return fig


def budget_rows(points: Sequence[BudgetPoint]) -> list[tuple]:
    """Rows R, then per policy 'budget / theta', for a markdown table; and its header."""
    names = list(dict.fromkeys(p.policy for p in points))
    by = {(p.policy, p.requests): p for p in points}
    loads = sorted({p.requests for p in points})
    return [(r, *(f"{by[(n, r)].budget:.2f} / {by[(n, r)].theta:.3g}" for n in names)) for r in loads]


def budget_header(points: Sequence[BudgetPoint]) -> tuple[str, ...]:
    return ("R", *(f"{n}: 1 + l / theta" for n in dict.fromkeys(p.policy for p in points)))


def describe_budget_sweep(points: Sequence[BudgetPoint], policy: str = "algorithm1",
                          baseline: str = "fixed") -> str:
    """What the sweep shows, in words computed from it: the policy's budget at the lightest and heaviest
    load, and its expected throughput against the baseline's there."""
    by = {(p.policy, p.requests): p for p in points}
    loads = sorted({p.requests for p in points if p.policy == policy})
    if not loads:
        raise LabkitError(f"the sweep has no points for {policy!r}: include it in policies.")
    lo, hi = by[(policy, loads[0])], by[(policy, loads[-1])]
    budgets = [by[(policy, r)].budget for r in loads]
    rises = [(r0, r1) for r0, r1, b0, b1 in zip(loads, loads[1:], budgets, budgets[1:]) if b1 > b0]
    shape = ("" if len(loads) < 3 else "; its budget falls at every step of load" if not rises else
             "; its budget does not fall steadily (it rises from R = "
             + ", ".join(f"{r0} to {r1}" for r0, r1 in rises) + ")")
    text = (f"{POLICY_LABELS.get(policy, policy)} verifies {lo.budget:.2f} tokens per request at R = {lo.requests} "
            f"and {hi.budget:.2f} at R = {hi.requests}")
    compare = ""
    if (baseline, loads[-1]) in by and (baseline, loads[0]) in by:
        b_lo, b_hi = by[(baseline, loads[0])], by[(baseline, loads[-1])]
        text += f" ({POLICY_LABELS.get(baseline, baseline)}: {b_lo.budget:.2f} and {b_hi.budget:.2f})"
        compare = (f"; its expected throughput is {lo.theta / b_lo.theta:.2f}x the {baseline} policy's at "
                   f"R = {lo.requests} and {hi.theta / b_hi.theta:.2f}x at R = {hi.requests}")
    return text + shape + compare + "."


def best_policy_by_load(points: Sequence[BudgetPoint]) -> dict[int, str]:
    """The policy with the highest mean expected throughput at each load (the first listed on a tie)."""
    best: dict[int, BudgetPoint] = {}
    for p in points:
        if p.requests not in best or p.theta > best[p.requests].theta:
            best[p.requests] = p
    return {r: best[r].policy for r in sorted(best)}


# ---------------------------------------------------------------------------------------------------
# Where SPS(B) bends: the knee, with the spread of the measurements


@dataclass
class Knee:
    """Where a profiled SPS(B) bends: `b_half`, the smallest profiled B whose fitted SPS is at most half
    of SPS at the smallest B (a forward of b_half tokens costs twice a one-token step; on a roofline
    max(T_weights, c B) that is twice the ridge point), None when the profile never halves. `b_low` /
    `b_high`: the same point read on the isotonic fits of the lower and of the upper quartiles, each
    against the median at the smallest B (the measured spread: a slower device halves sooner).
    `tokens_gain`: B x SPS(B) at the largest profiled B over the smallest B's, on the fit."""

    b_half: int | None
    b_low: int | None
    b_high: int | None
    largest: int
    tokens_gain: float


def sps_knee(table: CostTable) -> Knee:
    """The knee of `table` (see `Knee`), from its fit and from its quartiles where it kept them."""
    xs, s0 = table.batch_sizes, table.smoothed_sps[0]

    def half(curve: Sequence[float]) -> int | None:
        return next((b for b, s in zip(xs, curve) if s <= s0 / 2), None)

    b_low = b_high = None
    if table.raw_low is not None:
        weights = table.counts
        b_low = half(isotonic_fit(table.raw_low, weights))
        b_high = half(isotonic_fit(table.raw_high, weights))
    gain = xs[-1] * table.smoothed_sps[-1] / (xs[0] * s0)
    return Knee(half(table.smoothed_sps), b_low, b_high, xs[-1], gain)


def isotonic_fit(values: Sequence[float], weights: Sequence[float] | None = None) -> list[float]:
    """The non-increasing fit the cost table uses (`labkit.core.scheduler.isotonic_decreasing`), values only."""
    from labkit.core.scheduler import isotonic_decreasing
    return isotonic_decreasing(values, weights)[0]


def describe_knee(knee: Knee) -> str:
    """The knee in words, with its spread: where a step's cost doubles and what B tokens buy in all."""
    def at(b):
        return f"B = {b}" if b is not None else f"beyond B = {knee.largest}"
    if knee.b_half is None:
        head = f"SPS never halves within the profile (B <= {knee.largest}): the knee lies beyond it"
    else:
        head = f"the knee: SPS halves (a step costs twice a one-token step) at B = {knee.b_half}"
    spread = ("" if knee.b_low is None else
              f" (between {at(knee.b_low)} on the lower quartiles and {at(knee.b_high)} on the upper ones)")
    return (head + spread + f"; B = {knee.largest} tokens in one forward give {knee.tokens_gain:.1f}x the tokens per "
            f"second of one token")


# ---------------------------------------------------------------------------------------------------
# Static MTP-K against Algorithm 1: recorded blocks replayed as batches, realized tokens, paired


@dataclass
class Blocks:
    """Recorded full blocks: calibrated confidences (N, gamma), drafts accepted when the whole block was
    verified (N,), the request (prompt) each came from (the unit a bootstrap resamples) and its domain."""

    conf: torch.Tensor
    accepted: torch.Tensor
    groups: list[int]
    domains: list[str]
    source: str

    def __len__(self) -> int:
        return int(self.conf.shape[0])

    @property
    def n_groups(self) -> int:
        return len(set(self.groups))


def blocks_from_traces(trace_set, gamma: int, source: str = "") -> Blocks:
    """The full blocks (gamma drafts) of a recorded trace set (`labkit.measure.traces.TraceSet`, source
    "block": every round verified whole), grouped by request."""
    conf, acc, groups, domains = [], [], [], []
    for i, req in enumerate(trace_set.requests):
        for r in req.rounds:
            if len(r.conf) == gamma:
                conf.append(list(r.conf))
                acc.append(r.accept_len)
                groups.append(i)
                domains.append(req.domain)
    if not conf:
        raise LabkitError(f"the trace set holds no full block of {gamma} drafts: record it with that drafter.")
    return Blocks(torch.tensor(conf, dtype=torch.float64), torch.tensor(acc), groups, domains, source)


def blocks_from_rounds(conf: torch.Tensor, accepted: torch.Tensor, domains: Sequence[str], source: str = "") -> Blocks:
    """Blocks from `labkit.pipeline.calibrate.decode_rounds` (calibrated confidences beside it); its rounds
    carry no request id, so each block is its own group."""
    n = int(conf.shape[0])
    return Blocks(conf.to(torch.float64), accepted.long(), list(range(n)), list(domains), source)


@dataclass
class ReplayCell:
    """One policy at one load over replayed batches of recorded blocks, paired with the baseline.

    Every step verifies one batch of `requests` blocks drawn from the pool (`batches` of them), the same for every
    policy. tokens = sum_r (1 + min(l_r, accepted_r)) (realized: what verification gave on those very
    drafts) or sum_r (1 + sum_{j<=l_r} a_{r,j}) (expected, the scheduler's tau*); time = sum of
    1 / SPS(B) over the steps (the verify forward only). `ratio` is the policy's realized tokens per
    second over the baseline's: on the whole pool without resampling, else the median over `resamples`
    bootstrap resamples of the pool's requests (each with fresh batches), whose central `level` share
    is `ratio_low` / `ratio_high` (None without resampling).
    """

    policy: str
    requests: int
    batches: int
    blocks: int
    groups: int
    budget: float  # mean 1 + l_r
    expected: float  # expected tokens per second of the verify forward
    realized: float  # realized tokens per second
    ratio: float
    ratio_low: float | None = None
    ratio_high: float | None = None
    resamples: int = 0
    tau: float | None = None  # realized tokens per request per step (accepted drafts + 1)
    gamma: int | None = None  # drafts in a recorded block


def _replay_totals(blocks: Blocks, rows_pool: torch.Tensor, table: HasSPS, loads: Sequence[int],
                   policies: dict, draws: int, gen: torch.Generator,
                   batch_tokens: Callable[[list[int]], int]) -> dict:
    """{(policy, R): [budget sum, expected tokens, realized tokens, seconds]} over ceil(draws / R) batches."""
    gamma = blocks.conf.shape[1]
    out = {}
    n = rows_pool.numel()
    for r_count in loads:
        r_count = int(r_count)
        sums = {name: [0.0, 0.0, 0.0, 0.0] for name in policies}
        for _ in range(math.ceil(draws / r_count)):
            rows = rows_pool[torch.randint(n, (r_count,), generator=gen)]
            old = rows_pool[torch.randint(n, (r_count,), generator=gen)]
            inp = ScheduleInput(blocks.conf[rows], table, None, batch_tokens, old_conf=blocks.conf[old])
            a = survival(inp.conf, inp.max_lengths)
            acc = blocks.accepted[rows]
            for name, policy in policies.items():
                lengths = policy(inp)
                lt = torch.tensor(lengths)
                admitted = torch.arange(gamma) < lt.view(-1, 1)
                seconds = 1.0 / table.sps(inp.batch_tokens(list(lengths)))
                s = sums[name]
                s[0] += 1.0 + sum(lengths) / r_count
                s[1] += r_count + float(a[admitted].sum())
                s[2] += r_count + int(torch.minimum(lt, acc).sum())
                s[3] += seconds
        for name, s in sums.items():
            out[(name, r_count)] = s
    return out


def replay_sweep(blocks: Blocks, table: HasSPS, loads: Sequence[int], policies: Sequence[str],
                 baseline: str = "algorithm1", draws: int = 512, resamples: int = 0, level: float = 0.9,
                 seed: int = 0, batch_tokens: Callable[[list[int]], int] = packed_tokens) -> list[ReplayCell]:
    """Every policy at every load on the same batches of recorded blocks (`ReplayCell`), and the spread
    of each policy's throughput against `baseline`'s by a bootstrap over the pool's requests.

    Each load draws about `draws` blocks: ceil(draws / R) batches of R blocks, with replacement from the
    pool (so a light load is not judged on a handful of blocks); the production variant's confidences
    of two steps before are another block of the pool, drawn independently (as in `budget_sweep`). The
    interval is the central `level` share of the ratio over `resamples` resamples (0: none)."""
    if len(blocks) == 0 or draws < 1 or any(int(r) < 1 for r in loads) or resamples < 0:
        raise LabkitError(f"replay_sweep needs recorded blocks, draws >= 1, loads >= 1 and resamples >= 0, got "
                          f"{len(blocks)} blocks, draws={draws}, loads={list(loads)}, resamples={resamples}.")
    names = list(dict.fromkeys([*policies, baseline]))
    chosen = {name: make_policy(name) for name in names}
    gen = torch.Generator().manual_seed(seed)
    everything = torch.arange(len(blocks))
    point = _replay_totals(blocks, everything, table, loads, chosen, draws, gen, batch_tokens)
    by_group: dict[int, list[int]] = {}
    for i, g in enumerate(blocks.groups):
        by_group.setdefault(g, []).append(i)
    members = list(by_group.values())
    ratios: dict[tuple[str, int], list[float]] = {}
    for _ in range(resamples):
        picks = torch.randint(len(members), (len(members),), generator=gen).tolist()
        pool = torch.tensor([i for p in picks for i in members[p]])
        totals = _replay_totals(blocks, pool, table, loads, chosen, draws, gen, batch_tokens)
        for (name, r), s in totals.items():
            base = totals[(baseline, r)]
            ratios.setdefault((name, r), []).append((s[2] / s[3]) / (base[2] / base[3]))
    out = []
    for r in loads:
        r = int(r)
        base = point[(baseline, r)]
        for name in names:
            s = point[(name, r)]
            batches = math.ceil(draws / r)
            cell = ReplayCell(name, r, batches, len(blocks), blocks.n_groups, s[0] / batches, s[1] / s[3],
                              s[2] / s[3], (s[2] / s[3]) / (base[2] / base[3]), resamples=resamples,
                              tau=s[2] / (batches * r), gamma=int(blocks.conf.shape[1]))
            if resamples:
                xs = sorted(ratios[(name, r)])
                cell.ratio = _quantile(xs, 0.5)
                cell.ratio_low = _quantile(xs, (1 - level) / 2)
                cell.ratio_high = _quantile(xs, 1 - (1 - level) / 2)
            out.append(cell)
    return out


def _quantile(xs: Sequence[float], q: float) -> float:
    """The q-quantile of sorted xs, linear between order statistics."""
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ratio_text(c: ReplayCell) -> str:
    if c.ratio_low is None:
        return f"{c.ratio:.3f}"
    return f"{c.ratio:.3f} [{c.ratio_low:.3f}-{c.ratio_high:.3f}]"


REPLAY_HEADER = ("R", "policy", "budget 1 + l", "expected tokens/s", "realized tokens/s",
                 "realized / baseline [interval]", "verdict")


def replay_rows(cells: Sequence[ReplayCell], baseline: str = "algorithm1", tie: float = 0.01) -> list[tuple]:
    """One row per (load, policy) (REPLAY_HEADER), the baseline's own row without a ratio."""
    return [(c.requests, POLICY_LABELS.get(c.policy, c.policy), f"{c.budget:.2f}", f"{c.expected:.3g}",
             f"{c.realized:.3g}", "-" if c.policy == baseline else _ratio_text(c),
             "-" if c.policy == baseline else verdict(c.ratio, c.ratio_low, c.ratio_high, tie))
            for c in sorted(cells, key=lambda c: c.requests)]


def replay_figure(cells: Sequence[ReplayCell], baseline: str = "algorithm1", title: str | None = None) -> go.Figure:
    """Left: the verification budget per request against R. Right: each policy's realized throughput over
    the baseline's on the same batches (error bars: the bootstrap interval), 1 dashed. One trace per
    policy in each panel, named by its label."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("verification budget per request, 1 + l_r",
                                                        f"realized throughput / {POLICY_LABELS.get(baseline, baseline)}'s"))
    for name in dict.fromkeys(c.policy for c in cells):
        pts = sorted((c for c in cells if c.policy == name), key=lambda c: c.requests)
        label = POLICY_LABELS.get(name, name)
        style = dict(color=POLICY_COLORS.get(name), width=3 if name == baseline else 2)
        xs = [c.requests for c in pts]
        fig.add_trace(go.Scatter(x=xs, y=[c.budget for c in pts], mode="lines+markers", name=label, line=style,
                                 legendgroup=name, hovertemplate=f"{label}<br>R=%{{x}}<br>1 + l = %{{y:.2f}}<extra></extra>"),
                      row=1, col=1)
        errors = None
        if pts and pts[0].ratio_low is not None:
            errors = dict(type="data", symmetric=False, array=[c.ratio_high - c.ratio for c in pts],
                          arrayminus=[c.ratio - c.ratio_low for c in pts], thickness=1.2)
        fig.add_trace(go.Scatter(x=xs, y=[c.ratio for c in pts], mode="lines+markers", name=label, line=style,
                                 legendgroup=name, showlegend=False, error_y=errors,
                                 hovertemplate=f"{label}<br>R=%{{x}}<br>%{{y:.3f}} of {baseline}'s<extra></extra>"),
                      row=1, col=2)
    fig.add_hline(y=1.0, line=dict(color="#444", dash="dash"), row=1, col=2)
    loads = sorted({c.requests for c in cells})
    fig.update_xaxes(title_text="concurrent requests R", type="log", tickvals=loads, ticktext=[str(r) for r in loads])
    fig.update_yaxes(title_text="tokens verified per request per step", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="ratio (1 = the same)", row=1, col=2)
    fig.update_layout(template=TEMPLATE, height=460, legend=dict(orientation="h", y=-0.22),
                      title=title or "Static K against Algorithm 1 as load rises (recorded blocks, this device's SPS)")
    return fig


def describe_static_k(cells: Sequence[ReplayCell], baseline: str = "algorithm1", tie: float = 0.01) -> list[str]:
    """Sentences chosen from the replay: which static K is best at each load (by realized throughput),
    whether any one K is best at every load, and, for each static K, where it falls below the baseline
    beyond the interval and by how much at the heaviest load."""
    if not cells:
        raise LabkitError("describe_static_k needs the cells of replay_sweep.")
    statics = [p for p in dict.fromkeys(c.policy for c in cells) if p == "mtp1" or p.split(":")[0] == "fixed"]
    by = {(c.policy, c.requests): c for c in cells}
    loads = sorted({c.requests for c in cells})
    base_label = POLICY_LABELS.get(baseline, baseline)
    c0 = cells[0]
    spread = (f"intervals: {c0.resamples} bootstrap resamples of the {c0.groups} recorded requests" if c0.resamples
              else "no resampling: spread unknown")
    out = [f"Sample: {c0.blocks} recorded blocks from {c0.groups} requests, about {c0.batches * c0.requests} blocks drawn "
           f"per load; {spread}."]
    if statics:
        best = {r: max(statics, key=lambda p: by[(p, r)].realized) for r in loads}
        labels = {r: POLICY_LABELS.get(best[r], best[r]) for r in loads}
        moves = len(set(best.values())) > 1
        text = ("The best static K by realized throughput: " + ", ".join(f"R={r}: {labels[r]}" for r in loads)
                + ("; no single K is best at every load." if moves else f"; {labels[loads[0]]} is best at every load here."))
        judged: dict[str, list[int]] = {}
        for r in loads:
            judged.setdefault(verdict(1 / by[(best[r], r)].ratio, *_inverse(by[(best[r], r)]), tie), []).append(r)
        out.append(text + f" Against the best static K at each load, {base_label} is "
                   + "; ".join(f"{v} at R = {', '.join(map(str, rs))}" for v, rs in judged.items()) + ".")
        for p in statics:
            label = POLICY_LABELS.get(p, p)
            below = [r for r in loads if verdict(by[(p, r)].ratio, by[(p, r)].ratio_low, by[(p, r)].ratio_high, tie) == "below"]
            last = by[(p, loads[-1])]
            where = (f"below {base_label} at R = {', '.join(map(str, below))}" if below
                     else f"never below {base_label} beyond the interval")
            out.append(f"{label}: {where}; at R = {loads[-1]} it gives {_ratio_text(last)} of {base_label}'s realized "
                       f"throughput ({verdict(last.ratio, last.ratio_low, last.ratio_high, tie)}).")
    return out


def _inverse(c: ReplayCell) -> tuple[float | None, float | None]:
    """The interval of baseline / policy from that of policy / baseline."""
    if c.ratio_low is None:
        return None, None
    return 1 / c.ratio_high, 1 / c.ratio_low


SPS_HEADER = ("B", "samples", "measured SPS, median [quartiles]", "fitted SPS (what the scheduler reads)",
              "tokens/s at the fit, B x SPS")


def sps_rows(table: CostTable) -> list[tuple]:
    """The profiled table as rows (SPS_HEADER): per B the samples, the median with its quartiles, the fit."""
    counts = table.counts or [1] * len(table.batch_sizes)
    rows = []
    for i, (b, r, f) in enumerate(zip(table.batch_sizes, table.raw_sps, table.smoothed_sps)):
        spread = "" if table.raw_low is None else f" [{table.raw_low[i]:.3g}-{table.raw_high[i]:.3g}]"
        rows.append((b, counts[i], f"{r:.3g}{spread}", f"{f:.3g}", f"{b * f:.3g}"))
    return rows


def choose_blocks(target_name: str, drafter_spec: str, temperature: float, gamma: int, live: Blocks,
                  traces_path=None) -> tuple[Blocks, str]:
    """The pool of recorded blocks to replay and a sentence naming it: the shipped serving traces
    (`labkit.measure.traces.DEFAULT_TRACES`, or `traces_path`) where they were recorded with this target,
    drafter, block size and sampling temperature (more requests and blocks than a notebook decodes), else
    the blocks `live` decoded in this run."""
    from labkit.measure.traces import DEFAULT_TRACES, load_traces
    path = traces_path or DEFAULT_TRACES
    why = None
    try:
        tf = load_traces(path)
        meta = tf.meta
        block = tf.get("block", float(temperature))
        if meta.get("target") != target_name or meta.get("drafter") != drafter_spec:
            why = f"they were recorded with {meta.get('target')} and {meta.get('drafter')}"
        elif block is None:
            why = f"they hold no blocks at temperature {temperature:g}"
        else:
            pool = blocks_from_traces(block, gamma, source=f"the serving traces {path.name if hasattr(path, 'name') else path}")
            ps = meta.get("prompt_set") or {}
            return pool, (f"{len(pool)} full blocks of {gamma} from {pool.n_groups} requests ({ps.get('domains', '?')}) "
                          f"of the shipped serving traces (data/serving/traces.json: {meta.get('target')} with "
                          f"{meta.get('drafter')}, temperature {temperature:g}, every block verified whole, recorded "
                          f"{meta.get('recorded', '?')}; data/serving/README.md)")
    except LabkitError as exc:
        why = str(exc)
    return live, (f"{len(live)} full blocks decoded in this run ({live.n_groups} resampling units, each block its own: "
                  f"the rounds keep no request id); the shipped serving traces were not used: {why}")


def describe_replay_budget(cells: Sequence[ReplayCell], policy: str = "algorithm1") -> str:
    """How the policy's verification budget moves with load, beside the static policies' fixed budgets."""
    pts = sorted((c for c in cells if c.policy == policy), key=lambda c: c.requests)
    if not pts:
        raise LabkitError(f"the replay has no cells of {policy!r}.")
    budgets = [c.budget for c in pts]
    rises = [(a.requests, b.requests) for a, b in zip(pts, pts[1:]) if b.budget > a.budget + 1e-9]
    shape = ("falls at every step of load" if not rises and len(pts) > 2 else
             "does not fall steadily (it rises from R = " + ", ".join(f"{a} to {b}" for a, b in rises) + ")" if rises
             else "")
    statics = {c.policy: c.budget for c in cells if c.policy == "mtp1" or c.policy.split(":")[0] == "fixed"}
    return (f"{POLICY_LABELS.get(policy, policy)} verifies {budgets[0]:.2f} tokens per request at R = {pts[0].requests} "
            f"and {budgets[-1]:.2f} at R = {pts[-1].requests}" + (f"; its budget {shape}" if shape else "")
            + ("; the static policies verify " + ", ".join(f"{POLICY_LABELS.get(p, p)} {b:.2f}" for p, b in statics.items())
               + " at every load" if statics else "") + ".")


def describe_policy_vs(cells: Sequence[ReplayCell], policy: str, baseline: str = "algorithm1", tie: float = 0.01) -> str:
    """One policy's realized throughput against the baseline's, load by load, judged by its interval."""
    pts = sorted((c for c in cells if c.policy == policy), key=lambda c: c.requests)
    if not pts:
        raise LabkitError(f"the replay has no cells of {policy!r}.")
    judged: dict[str, list[str]] = {}
    for c in pts:
        judged.setdefault(verdict(c.ratio, c.ratio_low, c.ratio_high, tie), []).append(f"{c.requests} ({_ratio_text(c)})")
    return (f"{POLICY_LABELS.get(policy, policy)} against {POLICY_LABELS.get(baseline, baseline)}, realized throughput: "
            + "; ".join(f"{v} at R = {', '.join(rs)}" for v, rs in judged.items()) + ".")


CLAIMS_HEADER = ("claim", "paper", "this run", "why they differ")


def scheduler_claims(table: CostTable, knee: Knee, cells: Sequence[ReplayCell], appendix: dict, draws: int,
                     tests: dict, smoke: bool = False, tie: float = 0.01) -> list[tuple]:
    """The paper's claims on the scheduler, claim by claim, beside this run's numbers and why they differ,
    from this run: the profiled `table` and its `knee`, the replay `cells` (`replay_sweep`, baseline
    Algorithm 1), the Appendix A sampling (`appendix`: {policy: [#A, #B]}, `tests`: {policy: chi-square}).
    With `smoke` every lab cell says the run concludes nothing (quick mode)."""
    tag = "SMOKE RUN, concludes nothing: " if smoke else ""
    by = {(c.policy, c.requests): c for c in cells}
    loads = sorted({c.requests for c in cells})
    lo, hi = loads[0], loads[-1]
    a1 = {r: by[("algorithm1", r)] for r in loads}
    statics = [p for p in dict.fromkeys(c.policy for c in cells) if p == "mtp1" or p.split(":")[0] == "fixed"]
    knee_at = f"B = {knee.b_half}" if knee.b_half else f"beyond B = {knee.largest}"
    device = f"{table.device} ({table.model}, {table.dtype})"
    rows = [("SPS(B): profiled once, and jagged on real hardware (Sec. 3.2.2, 5.2)",
             "a step-wise, jagged curve on GPUs; Algorithm 1's break assumes it decays smoothly",
             tag + describe_knee(knee) + f"; the fit pooled {len(table.pooled)} run(s) of sizes where a larger B "
             f"measured at least as fast as a smaller one", f"{device}: a small CPU turns compute-bound within a few "
             "tokens, a GPU stays bound by reading the weights into the hundreds; here the pooled runs are medians that "
             "rose with B (noise on a shared machine, or a cheaper shape), on a GPU kernel tiles and graph sizes")]
    for name, c in appendix.items():
        rows.append((f"Appendix A, {POLICY_LABELS.get(name, name)}",
                     "(0.85, 0.15) without the break" if name == "retrospective" else "(0.7, 0.3), the target's, with the break",
                     f"({c[0] / sum(c):.3f}, {c[1] / sum(c):.3f}) over {sum(c):,} draws, chi-square p "
                     + (f"= {tests[name].p_value:.2g}" if tests[name].p_value > 0 else "< 1e-300"),
                     "the same arithmetic; only sampling noise (binomial sd "
                     f"{(0.7 * 0.3 / sum(c)) ** 0.5:.4f} on P(A) at these draws)"))
    rows.append(("verification budget per request at light load (Fig. 8)", "about 4-6 tokens in production, MTP-1's 2",
                 tag + f"Algorithm 1: {a1[lo].budget:.2f} at R = {lo} (mean over {a1[lo].batches} replayed steps)",
                 f"a block of gamma = {cells[0].gamma} here against 5; SmolLM2-135M's DSpark accepts fewer drafts: "
                 + (f"tau {by[('fixed', lo)].tau:.2f} when every draft is verified (this pool)" if ("fixed", lo) in by
                    else "see tau above") + f"; this CPU's knee at {knee_at}"))
    rows.append(("the budget shrinks as load rises (Fig. 8)", "decreases smoothly with concurrency",
                 tag + f"Algorithm 1: {a1[lo].budget:.2f} at R = {lo} to {a1[hi].budget:.2f} at R = {hi}",
                 "the same mechanism; " + (
                     f"this CPU's knee (B = {knee.b_half}) is reached at R = {math.ceil(knee.b_half / (1 + (cells[0].gamma or 1)))} "
                     f"verifying every draft and at R = {math.ceil(knee.b_half / 2)} with MTP-1, where a GPU's lies "
                     "hundreds of tokens out" if knee.b_half else "this CPU's SPS never halved within the profile")))
    for p in statics:
        c = by[(p, hi)]
        rows.append((f"a static multi-token drafter loses under load: {POLICY_LABELS.get(p, p)}",
                     "MTP-3/5 strictly degrades aggregate throughput under high concurrency (Sec. 5.4)",
                     tag + f"{_ratio_text(c)} of Algorithm 1's realized tokens/s at R = {hi} "
                     f"({verdict(c.ratio, c.ratio_low, c.ratio_high, tie)}); at R = {lo}: {_ratio_text(by[(p, lo)])} "
                     f"({verdict(by[(p, lo)].ratio, by[(p, lo)].ratio_low, by[(p, lo)].ratio_high, tie)})",
                     "the verify forward alone, in this CPU's SPS(B); drafting (the same block for every policy here) "
                     "and the engine's other costs are left out: notebook 06 measures whole steps"))
    if statics:
        best = max(statics, key=lambda p: by[(p, lo)].realized)
        c = by[(best, lo)]
        inv = _inverse(c)
        rows.append(("at one request the scheduler gains little (a published port)",
                     "within about 2% of the best fixed length",
                     tag + f"Algorithm 1 / {POLICY_LABELS.get(best, best)} (the best static K at R = {lo}): "
                     f"{1 / c.ratio:.3f}" + (f" [{inv[0]:.3f}-{inv[1]:.3f}]" if inv[0] is not None else "")
                     + f" ({verdict(1 / c.ratio, *inv, tie)})",
                     "another engine and model there; here the best K is chosen after the fact from this very replay"))
    if ("async-topk", hi) in by:
        rows.append(("the production variant (no break, capacity from two steps before) (Sec. 5.2)",
                     "escapes the local maxima of a jagged SPS; stays lossless",
                     tag + describe_policy_vs(cells, "async-topk", tie=tie),
                     "its old confidences here are another recorded block, not the same request's two steps before"))
    return rows


STEP_HEADER = ("requests R", "drafts verified each W", "whole engine step ms, median [quartiles]",
               "its verify forward alone ms (R x (1 + W), the SPS table's shape)", "the rest of the step ms")


def step_rows(step_points: Sequence[dict], forward_points: Sequence[dict] = ()) -> list[tuple]:
    """The whole-step profile (`labkit.measure.step_profile`) as rows (STEP_HEADER): per (R, W) the median
    step with its quartiles, and where the forward table profiled the same shape (R rows x 1 + W tokens),
    its forward's median and what the rest of the step (drafting, verdicts, context updates) added."""
    forward = {(p["rows"], p["width"]): p["seconds"] for p in forward_points}
    rows = []
    for p in step_points:
        q = statistics.quantiles(p["samples_s"], n=4) if len(p["samples_s"]) > 1 else [p["seconds"]] * 3
        fwd = forward.get((p["rows"], p["width"]))
        rows.append((p["rows"], p["drafts"], f"{1e3 * p['seconds']:.1f} [{1e3 * q[0]:.1f}-{1e3 * q[2]:.1f}]",
                     "-" if fwd is None else f"{1e3 * fwd:.1f}",
                     "-" if fwd is None else f"{1e3 * (p['seconds'] - fwd):+.1f}"))
    return rows
