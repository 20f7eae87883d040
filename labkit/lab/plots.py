"""Plotly figures for the notebooks: each function takes measured numbers and returns a go.Figure
(and `markdown_table` renders a notebook's closing summary).

Figures compute nothing expensive and time nothing: the measuring lives in `labkit.measure.costs`,
`labkit.core.stats` and `labkit.decode.loop`, so a figure can be rebuilt (by a widget) as often as wanted.
Notation follows the paper: p_t the target's distribution, p_d the drafter's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from IPython.display import Markdown
from plotly.subplots import make_subplots

from labkit.measure.costs import speculative_speedup
from labkit.model.timing import ForwardCost
from labkit.core.sampling import residual
from labkit.core.scaling import DataFit
from labkit.core.trace import MIN_ROUNDS

COLORS = {"p_t": "#1f77b4", "p_d": "#ff7f0e", "accepted": "#2ca02c", "residual": "#d62728", "bonus": "#9467bd",
          "floor": "#7f7f7f"}
TEMPLATE = "plotly_white"


#: how every figure and table names and colours the prefix policies. "mtp1" is the production
#: baseline's shape (one draft, two tokens verified) played by the DSpark drafter's first draft, not a
#: separately trained MTP module: the label says so.
class _BySpec(dict):
    """Labels or colours by policy name; a "fixed:K" or "threshold:T" spec (`scheduler.make_policy`) gets
    one derived from its base policy's, and a sweep arm "POLICY@DRAFTER" (`measure.sweeps.split_arm`)
    one from its policy's and its drafter (`arm`), and an arm "...~MODEL" (`measure.sweeps.arm_cost_model`)
    one from the arm's and its cost model (`priced`)."""

    def __init__(self, known: dict, derive, arm, priced):
        super().__init__(known)
        self._derive, self._arm, self._priced = derive, arm, priced

    def overriding(self, known: dict) -> _BySpec:
        """A copy with some names' entries replaced, deriving specs and arms as this one does."""
        return _BySpec({**self, **known}, self._derive, self._arm, self._priced)

    def get(self, key, default=None):
        if key in self:
            return self[key]
        head, tilde, model = str(key).rpartition("~")
        if tilde:
            own = self.get(head)
            return self._priced(own, model) if own is not None else default
        policy, at, spec = str(key).partition("@")
        if at:
            own = self.get(policy)
            return self._arm(policy, own, spec) if own is not None else default
        base, _, arg = policy.partition(":")
        return self._derive(base, arg) if arg and base in self else default


POLICY_LABELS = _BySpec({"algorithm1": "Algorithm 1", "algorithm1-layout": "Algorithm 1, layout-priced",
                         "algorithm1-column": "Algorithm 1, whole columns", "fixed": "fixed (verify all)", "mtp1": "MTP-1 (DSpark's 1st draft)",
                         "async-topk": "async top-K (Sec. 5.2)", "retrospective": "retrospective (biased)",
                         "threshold": "static threshold"},
                        lambda base, arg: f"fixed K={arg}" if base == "fixed" else f"static threshold {arg}",
                        lambda policy, label, spec: (f"MTP-1 (trained: {spec})" if policy == "mtp1"
                                                     else f"{label} with {spec}"),
                        lambda label, model: f"{label}, priced by {model}")
POLICY_COLORS = _BySpec({"algorithm1": "#2ca02c", "algorithm1-layout": "#bcbd22", "algorithm1-column": "#98df8a",
                         "fixed": "#1f77b4", "mtp1": "#ff7f0e", "async-topk": "#9467bd",
                         "retrospective": "#d62728", "threshold": "#8c564b"},
                        lambda base, arg: {"fixed": ["#6baed6", "#3182bd", "#08519c", "#17becf"],
                                           "threshold": ["#c49c94", "#8c564b"]}[base][int(float(arg) * 10) % 2 if base == "threshold"
                                                                                      else int(arg) % 4],
                        lambda policy, colour, spec: "#e377c2" if policy == "mtp1" else colour,
                        lambda colour, model: _darker(colour))


def _darker(colour: str, share: float = 0.45) -> str:
    """`colour` (#rrggbb) mixed toward black: a priced arm beside its plain policy."""
    rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(c * (1 - share)):02x}" for c in rgb)

def _np(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=float)


def forward_cost_figure(cost: ForwardCost, floor_s: float | None = None) -> go.Figure:
    """Measured cost of one cached forward over k new tokens, beside k one-token forwards and the floor.

    Error bars span the fastest and slowest repeat. The dashed line is what k separate one-token
    forwards would cost (k times the k=1 median): the gap is what verifying a block at once saves.
    """
    ms = [1e3 * m for m in cost.median_s]
    lo = [1e3 * min(s) for s in cost.samples_s]
    hi = [1e3 * max(s) for s in cost.samples_s]
    fig = go.Figure(go.Scatter(
        x=cost.ks, y=ms, mode="lines+markers", name="one forward over k tokens (median)",
        error_y=dict(type="data", symmetric=False, array=[h - m for h, m in zip(hi, ms)],
                     arrayminus=[m - low for m, low in zip(ms, lo)])))
    fig.add_trace(go.Scatter(x=cost.ks, y=[k * ms[0] / cost.ks[0] for k in cost.ks], mode="lines",
                             line=dict(dash="dash"), name="k one-token forwards"))
    if floor_s is not None:
        fig.add_hline(y=1e3 * floor_s, line=dict(color=COLORS["floor"], dash="dot"),
                      annotation_text=f"memory floor {1e3 * floor_s:.1f} ms", annotation_position="bottom right")
    fig.update_layout(template=TEMPLATE, title=f"Cost of one cached forward on a {cost.context_len}-token context",
                      xaxis_title="new tokens in the forward (k)", yaxis_title="milliseconds",
                      yaxis_range=[0, 1.4 * max(hi)], legend=dict(x=0.01, y=0.99))
    return fig


def speedup_heatmap(taus: Sequence[float], draft_s: Sequence[float], verify_s: float, ar_step_s: float,
                    marker: tuple[float, float] | None = None, title: str | None = None) -> go.Figure:
    """Eq. 1 as a map: speedup over AR for each tau (x) and drafting cost per round (y, ms).

    The white contour is speedup 1 (break-even); `marker` = (tau, draft_s) marks one operating point.
    The trace layout (heatmap, contour, marker) is fixed so a widget can update it in place.
    """
    z = np.array([[speculative_speedup(t, d, verify_s, ar_step_s) for t in taus] for d in draft_s])
    y_ms = [1e3 * d for d in draft_s]
    # Colour by log2(speedup) so 2x faster and 2x slower are equally strong and 1x is white.
    ticks = [0.125, 0.25, 0.5, 1, 2, 4, 8, 16]
    fig = go.Figure(go.Heatmap(x=list(taus), y=y_ms, z=np.log2(z), customdata=z, zmid=0.0, colorscale="RdBu",
                               colorbar=dict(title="speedup", tickvals=np.log2(ticks), ticktext=[f"{t:g}x" for t in ticks]),
                               hovertemplate="tau %{x:.2f}<br>draft %{y:.1f} ms<br>speedup %{customdata:.2f}x"
                                             "<extra></extra>"))
    fig.add_trace(go.Contour(x=list(taus), y=y_ms, z=z, showscale=False, contours_coloring="none",
                             contours=dict(start=1.0, end=1.0, size=1.0, showlabels=True),
                             line=dict(color="black", width=2), hoverinfo="skip", name="break-even"))
    mx, my = marker if marker is not None else (None, None)
    fig.add_trace(go.Scatter(x=[mx], y=[None if my is None else 1e3 * my], mode="markers",
                             marker=dict(size=14, color="gold", line=dict(color="black", width=2)),
                             name="this setting"))
    fig.update_layout(template=TEMPLATE, showlegend=False,
                      title=title or f"Speedup over AR (Eq. 1), verify {1e3 * verify_s:.0f} ms, "
                                     f"AR step {1e3 * ar_step_s:.0f} ms",
                      xaxis_title="tau (tokens per round, bonus included)",
                      yaxis_title="drafting cost per round (ms)")
    return fig


def speedup_curves(cost: ForwardCost, gammas: Sequence[int], draft_s: float = 0.0) -> go.Figure:
    """Eq. 1 speedup vs tau for several block lengths, each verified at its measured cost (k = gamma + 1)."""
    ar = cost.interp(1)
    fig = go.Figure()
    for g in gammas:
        verify = cost.interp(g + 1)
        taus = np.linspace(1.0, g + 1.0, 50)
        fig.add_trace(go.Scatter(x=taus, y=[speculative_speedup(t, draft_s, verify, ar) for t in taus],
                                 mode="lines", name=f"gamma={g} (verify {1e3 * verify:.0f} ms)"))
    fig.add_hline(y=1.0, line=dict(color=COLORS["floor"], dash="dot"), annotation_text="break-even")
    fig.update_layout(template=TEMPLATE, title=f"Speedup vs tau, drafting {1e3 * draft_s:.0f} ms a round",
                      xaxis_title="tau (tokens per round)", yaxis_title="speedup over AR")
    return fig


def toy_distribution_figure(p_t, p_d, labels: Sequence[str]) -> go.Figure:
    """Accept / reject / residual on a toy vocabulary, and why the result is exactly p_t.

    Left: p_t, p_d and the residual norm(max(0, p_t - p_d)) that a rejection resamples from.
    Right: P(emit x) = min(p_t, p_d)(x) [draft accepted] + (1 - alpha) * residual(x) [rejected,
    resampled], alpha = sum min(p_t, p_d); the two stacked parts reach p_t (diamonds) in every column.
    """
    pt, pd = torch.as_tensor(p_t, dtype=torch.float64), torch.as_tensor(p_d, dtype=torch.float64)
    overlap = torch.minimum(pt, pd)
    alpha = float(overlap.sum())
    res = residual(pt, pd)
    labels = list(labels)
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "target p_t, draft p_d, residual", f"emitted = accepted + rejected-and-resampled (alpha = {alpha:.2f})"))
    # One barmode per figure: grouped on the left by distinct offsetgroups, stacked on the right by
    # sharing one offsetgroup and giving the upper part a base.
    for i, (name, y, color) in enumerate((("p_t (target)", pt, COLORS["p_t"]), ("p_d (draft)", pd, COLORS["p_d"]),
                                          ("residual norm(max(0, p_t - p_d))", res, COLORS["residual"]))):
        fig.add_trace(go.Bar(x=labels, y=_np(y), name=name, marker_color=color, offsetgroup=str(i)), row=1, col=1)
    fig.add_trace(go.Bar(x=labels, y=_np(overlap), name="min(p_t, p_d): draft accepted", offsetgroup="stack",
                         marker_color=COLORS["accepted"]), row=1, col=2)
    fig.add_trace(go.Bar(x=labels, y=_np((1 - alpha) * res), base=_np(overlap), offsetgroup="stack",
                         name="(1 - alpha) residual: rejected, resampled", marker_color=COLORS["residual"],
                         opacity=0.6), row=1, col=2)
    fig.add_trace(go.Scatter(x=labels, y=_np(pt), mode="markers", name="p_t",
                             marker=dict(symbol="diamond", size=12, color=COLORS["p_t"])), row=1, col=2)
    fig.update_layout(template=TEMPLATE, barmode="group", height=420, yaxis_title="probability",
                      legend=dict(orientation="h", y=-0.15))
    return fig


def empirical_vs_target_figure(counts, p_t, labels: Sequence[str] | Callable[[int], str] | None = None,
                               by_source: dict[str, object] | None = None, top: int | None = None,
                               title: str = "What speculative sampling emitted vs the target p_t") -> go.Figure:
    """Observed frequencies (stacked by where each token came from, when `by_source` is given) vs p_t.

    `top` keeps the `top` most likely tokens under p_t and pools the rest into "other", for a real
    vocabulary; `labels` name the tokens, as a list or a function of the id (default: the ids).
    """
    c, p = _np(counts), _np(p_t)
    n = c.sum()
    order = np.arange(len(p)) if top is None else np.argsort(-p, kind="stable")[:top]
    name = str if labels is None else labels if callable(labels) else list(labels).__getitem__
    x = [name(int(i)) for i in order]

    def view(v: np.ndarray) -> np.ndarray:
        kept = v[order]
        return kept if top is None else np.append(kept, v.sum() - kept.sum())

    if top is not None:
        x = x + ["other"]
    fig = go.Figure()
    parts = {"all draws": c} if not by_source else {k: _np(v) for k, v in by_source.items()}
    for name, v in parts.items():
        fig.add_trace(go.Bar(x=x, y=view(v) / n, name=name, marker_color=COLORS.get(name)))
    fig.add_trace(go.Scatter(x=x, y=view(p), mode="markers", name="p_t (target)",
                             marker=dict(symbol="diamond", size=12, color="black")))
    fig.update_layout(template=TEMPLATE, barmode="stack", title=title, yaxis_title=f"frequency over {int(n):,} draws")
    return fig


def _thin_marks(counts: Sequence[int] | None, n: int, min_rounds: int) -> dict:
    """Bar styling that fades positions resting on fewer than `min_rounds` rounds and labels each with its n."""
    if counts is None:
        return {}
    return dict(marker_opacity=[1.0 if c >= min_rounds else 0.35 for c in counts[:n]],
                text=[f"n={c}" for c in counts[:n]], textposition="outside",
                hovertext=[f"{c} rounds" + ("" if c >= min_rounds else f" (fewer than {min_rounds})") for c in counts[:n]])


def position_acceptance_figure(conditional: dict[str, Sequence[float]],
                               survival: dict[str, Sequence[float]] | None = None,
                               counts: dict[str, Sequence[int]] | None = None,
                               min_rounds: int = MIN_ROUNDS) -> go.Figure:
    """Per-position acceptance (paper Fig. 2): bars = conditional P(accept j | 1..j-1 accepted).

    Lines (optional) = unconditional prefix survival P(1..j all accepted), DeepSpec's accept_rate@k.
    `counts` (optional, labkit.decode.loop.position_counts per name) labels each bar with the rounds behind
    it and fades bars with fewer than `min_rounds`.
    """
    fig = go.Figure()
    for name, rates in conditional.items():
        fig.add_trace(go.Bar(x=list(range(1, len(rates) + 1)), y=list(rates), name=f"{name}: conditional",
                             **_thin_marks((counts or {}).get(name), len(rates), min_rounds)))
    for name, rates in (survival or {}).items():
        fig.add_trace(go.Scatter(x=list(range(1, len(rates) + 1)), y=list(rates), mode="lines+markers",
                                 name=f"{name}: prefix survival", line=dict(dash="dot")))
    title = "Acceptance by draft position"
    if counts and any(c < min_rounds for cs in counts.values() for c in cs):
        title += f" (faded bars: fewer than {min_rounds} rounds)"
    fig.update_layout(template=TEMPLATE, barmode="group", title=title,
                      xaxis_title="draft position j", yaxis_title="rate", yaxis_range=[0, 1.12])
    return fig


def tokens_per_s_figure(tokens_per_s: dict[str, float], baseline: str | None = None,
                        title: str = "Decoding speed") -> go.Figure:
    """Horizontal bars of tokens/s per method; with `baseline`, each bar is labelled with its speedup."""
    names = list(tokens_per_s)
    vals = [tokens_per_s[n] for n in names]
    base = tokens_per_s.get(baseline) if baseline else None
    text = [f"{v:.1f} tok/s" + (f" ({v / base:.2f}x)" if base else "") for v in vals]
    fig = go.Figure(go.Bar(x=vals, y=names, orientation="h", text=text, textposition="outside", cliponaxis=False))
    fig.update_layout(template=TEMPLATE, title=title, xaxis_title="new tokens per second (prefill included)",
                      xaxis_range=[0, 1.3 * max(vals, default=1.0)], yaxis=dict(autorange="reversed"),
                      height=max(260, 160 + 60 * len(names)))
    return fig


def dashboard_figure(tokens_per_s: dict[str, float], acceptance: Sequence[float], title: str,
                     max_position: int | None = None, counts: Sequence[int] | None = None,
                     min_rounds: int = MIN_ROUNDS) -> go.Figure:
    """Notebook 01's widget: tokens/s bars (left) and this run's per-position acceptance (right).

    Always the same two traces, so a widget can redraw it in place; positions up to `max_position`
    (gamma) are shown even when no round reached them. With `counts` (rounds behind each position),
    positions with fewer than `min_rounds` rounds are faded and every bar is labelled with its count.
    """
    n_pos = max(max_position or 0, len(acceptance), 1)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.45, 0.55],
                        subplot_titles=("tokens / s", "conditional acceptance by position"
                                        + ("" if counts is None else f" (faded: < {min_rounds} rounds)")))
    fig.add_trace(go.Bar(x=list(tokens_per_s), y=list(tokens_per_s.values()),
                         text=[f"{v:.1f}" for v in tokens_per_s.values()], textposition="auto",
                         marker_color=[COLORS["p_t"], COLORS["p_d"]][:len(tokens_per_s)]), row=1, col=1)
    marks = _thin_marks(counts, len(acceptance), min_rounds)
    if counts is not None:
        marks["text"] = [f"{a:.2f}<br>n={c}" for a, c in zip(acceptance, counts)]
    fig.add_trace(go.Bar(x=list(range(1, len(acceptance) + 1)), y=list(acceptance),
                         **({"text": [f"{a:.2f}" for a in acceptance], "textposition": "outside"} | marks),
                         marker_color=COLORS["accepted"]), row=1, col=2)
    fig.update_yaxes(range=[0, 1.25], row=1, col=2)
    fig.update_xaxes(title_text="draft position", range=[0.5, n_pos + 0.5], dtick=1, row=1, col=2)
    fig.update_layout(template=TEMPLATE, title=title, showlegend=False, height=380)
    return fig


def markdown_table(rows: Sequence[Sequence[object]], header: Sequence[str] = ("measured in this run", "value")) -> Markdown:
    """A Markdown table (shown as a table by Jupyter, kept as text in the saved notebook)."""
    def esc(v: object) -> str:  # a pipe would end the cell early
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in rows]
    return Markdown("\n".join(lines))


def attention_mask_figure(mask, n_ctx: int, n_slots: int, anchors: Sequence[int],
                          title: str = "DFlash attention mask (Eq. 3): who each block slot may read") -> go.Figure:
    """A (queries x keys) boolean mask as a heatmap: context keys left, the packed blocks' keys right."""
    m = _np(mask).astype(float)
    rows = [f"block {b} (anchor {a}) slot {s}" for b, a in enumerate(anchors) for s in range(n_slots)]
    cols = [f"ctx {i}" for i in range(n_ctx)] + [f"b{b}.s{s}" for b in range(len(anchors)) for s in range(n_slots)]
    fig = go.Figure(go.Heatmap(z=m, x=cols, y=rows, colorscale=[[0, "#f0f0f0"], [1, COLORS["p_t"]]], showscale=False,
                               xgap=1, ygap=1, hovertemplate="%{y} reads %{x}: %{z}<extra></extra>"))
    fig.add_vline(x=n_ctx - 0.5, line=dict(color="black", width=2))
    fig.update_layout(template=TEMPLATE, title=title, yaxis=dict(autorange="reversed"),
                      height=max(300, 22 * len(rows) + 120), xaxis_title="keys: context features | block slots")
    return fig


def training_curve_figure(runs: dict[str, Sequence[dict]], x: str = "anchors",
                          y: Sequence[str] = ("val_tau_est", "val_tau_greedy_est")) -> go.Figure:
    """Metrics rows (labkit.pipeline.train's metrics.jsonl) of one or more runs: tau estimates against anchors seen."""
    fig = go.Figure()
    for name, rows in runs.items():
        for key in y:
            pts = [(r[x], r[key]) for r in rows if key in r and x in r]
            if pts:
                fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                                         name=f"{name}: {key}"))
    fig.update_layout(template=TEMPLATE, title="Held-out tau estimate during training", xaxis_title=f"{x} seen",
                      yaxis_title="tau (estimated from teacher-forced blocks)")
    return fig


def data_curve_figure(curves: dict[str, Sequence[dict]], fit: DataFit | None = None, upto: float | None = None,
                      keys: Sequence[str] = ("tf_tau_greedy", "tf_tau_t1")) -> go.Figure:
    """scripts/recipe_ab.py rows (one per data size) of one or more curves: tau against training tokens on
    a log2 axis; `fit` (labkit.core.scaling) drawn as a dashed line, extended to `upto` tokens and labelled so."""
    fig = go.Figure()
    for name, rows in curves.items():
        rows = sorted(rows, key=lambda r: r["train_response_tokens"])
        for key in keys:
            fig.add_trace(go.Scatter(x=[r["train_response_tokens"] for r in rows], y=[r[key] for r in rows],
                                     mode="lines+markers", name=f"{name}: {key}"))
    if fit is not None:
        xs = np.geomspace(fit.min_tokens, max(upto or fit.max_tokens, fit.max_tokens), 40)
        fig.add_trace(go.Scatter(x=xs, y=[fit.tau_at(x) for x in xs], mode="lines", line=dict(dash="dash"),
                                 name=f"fit: +{fit.per_doubling:.2f} per doubling"
                                      + (" (extrapolated past the last point)" if upto and upto > fit.max_tokens else "")))
    fig.update_layout(template=TEMPLATE, title="tau against training data (one epoch each)",
                      xaxis_title="training response tokens", xaxis_type="log",
                      yaxis_title="tau on held-out sequences (teacher-forced)")
    return fig


def tau_by_domain_figure(taus: dict[str, dict[str, float]], title: str = "tau by domain") -> go.Figure:
    """Grouped bars: one group per domain, one bar per drafter."""
    domains = sorted({d for v in taus.values() for d in v})
    fig = go.Figure([go.Bar(name=name, x=domains, y=[v.get(d) for d in domains],
                            text=[f"{v[d]:.2f}" if v.get(d) is not None else "" for d in domains], textposition="outside")
                     for name, v in taus.items()])
    fig.update_layout(template=TEMPLATE, barmode="group", title=title, yaxis_title="tokens per round (tau)")
    return fig


def rank_curve_figure(rows: Sequence[dict], marker: int | None = None,
                      title: str = "tau against the Markov head's rank (SVD truncation of the trained transition)") -> go.Figure:
    """labkit.measure.diagnostics.rank_curve rows: tau (greedy and T=1) against rank; `marker` rings one rank."""
    ranks = [r["rank"] for r in rows]
    fig = go.Figure()
    for key, name in (("tau_greedy", "greedy (top-1 agreement)"), ("tau_t1", "temperature 1 (1 - TV)")):
        fig.add_trace(go.Scatter(x=ranks, y=[r[key] for r in rows], mode="lines+markers", name=name))
    if marker is not None:
        hit = [r for r in rows if r["rank"] == marker]
        if hit:
            fig.add_trace(go.Scatter(x=[marker] * 2, y=[hit[0]["tau_greedy"], hit[0]["tau_t1"]], mode="markers",
                                     marker=dict(size=16, symbol="circle-open", color="black"), name=f"rank {marker}"))
    fig.update_layout(template=TEMPLATE, title=title, xaxis_title="rank r (0 = DSpark's backbone with its head off, not the DFlash drafter)",
                      yaxis_title="tau on held-out sequences", xaxis_type="log" if min(ranks) > 0 else "linear")
    return fig


def reliability_figure(before: Sequence[Sequence[dict]], after: Sequence[Sequence[dict]] | None,
                       positions: Sequence[int], ece_before: Sequence[float], ece_after: Sequence[float] | None = None,
                       auc: Sequence[float | None] | None = None) -> go.Figure:
    """Reliability diagrams (paper Fig. 6): per position, observed acceptance against predicted survival
    in each confidence bin (labkit.core.calibration.reliability_bins), before and after STS."""
    fig = make_subplots(rows=1, cols=len(positions), shared_yaxes=True,
                        subplot_titles=[f"position {k + 1}: ECE {100 * ece_before[k]:.1f}%"
                                        + (f" -> {100 * ece_after[k]:.1f}%" if ece_after else "")
                                        + (f", AUC {auc[k]:.2f}" if auc and auc[k] is not None else "")
                                        for k in positions])
    for col, k in enumerate(positions, start=1):
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(color="grey", dash="dot"),
                                 name="perfect", showlegend=col == 1), row=1, col=col)
        for bins, name, color in ((before[k], "before STS", COLORS["residual"]),
                                  (after[k] if after else None, "after STS", COLORS["accepted"])):
            if not bins:
                continue
            pts = [b for b in bins if b["count"]]
            fig.add_trace(go.Scatter(x=[b["mean_conf"] for b in pts], y=[b["frac_pos"] for b in pts],
                                     mode="lines+markers", name=name, marker=dict(color=color,
                                     size=[4 + 10 * (b["count"] / max(p["count"] for p in pts)) ** 0.5 for b in pts]),
                                     showlegend=col == 1, hovertext=[f"{b['count']} rounds" for b in pts]), row=1, col=col)
        fig.update_xaxes(range=[0, 1], title_text="predicted survival", row=1, col=col)
    fig.update_yaxes(range=[0, 1.02], title_text="observed acceptance", row=1, col=1)
    fig.update_layout(template=TEMPLATE, title="Reliability of the prefix survival, per draft position", height=380)
    return fig


def threshold_sweep_figure(sweeps: dict[str, Sequence[dict]], title: str = "Static confidence threshold sweep") -> go.Figure:
    """Paper Fig. 5: per domain, accepted and rejected drafts per step (stacked bars) and the acceptance
    rate (line, right axis) against the survival threshold (labkit.core.calibration.threshold_sweep rows)."""
    names = list(sweeps)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, specs=[[{"secondary_y": True}] * len(names)])
    for col, name in enumerate(names, start=1):
        rows = sweeps[name]
        xs = [f"{r['threshold']:.1f}" for r in rows]
        fig.add_trace(go.Bar(x=xs, y=[r["accepted_per_step"] for r in rows], name="accepted",
                             marker_color=COLORS["accepted"], showlegend=col == 1), row=1, col=col)
        fig.add_trace(go.Bar(x=xs, y=[r["rejected_per_step"] for r in rows], name="rejected",
                             marker_color=COLORS["residual"], marker_pattern_shape="/", showlegend=col == 1), row=1, col=col)
        fig.add_trace(go.Scatter(x=xs, y=[r["acceptance_rate"] for r in rows], mode="lines+markers", name="acceptance rate",
                                 line=dict(color="black"), showlegend=col == 1), row=1, col=col, secondary_y=True)
        fig.update_xaxes(title_text="threshold on survival", row=1, col=col)
        fig.update_yaxes(range=[0, 1.05], secondary_y=True, row=1, col=col, showticklabels=col == len(names))
    fig.update_yaxes(title_text="drafts per step", secondary_y=False, row=1, col=1)
    fig.update_layout(template=TEMPLATE, barmode="stack", title=title, height=380)
    return fig
