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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from labkit.core.errors import LabkitError
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
