"""Figures of the trace-driven serving simulation (`labkit.core.simulate`): simulated paper Figs. 7 and 8.

They draw the result dicts of `labkit.core.simulate.sweep` (or the `results` of `python -m labkit
simulate --json`), one trace per policy, and say in their titles that they are simulated and from which
costs (a CPU table measured here, or a GPU roofline model, which is a model and not a measurement).

- `simulated_throughput_speed`: aggregate throughput against per-user speed, one point per load (Fig. 7).
- `simulated_load`: aggregate throughput (top) and the verification budget per request (bottom) against
  concurrent users (Fig. 8).
- `write_figures`: both as offline HTML files, per temperature.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from labkit.core.errors import LabkitError
from labkit.lab.plots import POLICY_COLORS, POLICY_LABELS, TEMPLATE

#: in the simulator, mtp1 replays one-token rounds (its own accept outcomes), the trained MTP-1's shape
SIM_LABELS = {**POLICY_LABELS, "mtp1": "MTP-1 (one-token rounds)"}


def _groups(results: Sequence[dict], policies: Sequence[str] | None) -> dict[str, list[dict]]:
    if not results:
        raise LabkitError("No simulation results to plot: run `labkit.core.simulate.sweep` or "
                          "`python -m labkit simulate` first.")
    out: dict[str, list[dict]] = {p: [] for p in policies or ()}
    for r in results:
        if policies is None or r["policy"] in out:
            out.setdefault(r["policy"], []).append(r)
    return {p: sorted(rs, key=lambda r: r["users"]) for p, rs in out.items() if rs}


def _subtitle(costs: str | None) -> str:
    return f"<br><sup>simulated from recorded traces; costs: {costs}</sup>" if costs else "<br><sup>simulated</sup>"


def simulated_throughput_speed(results: Sequence[dict], policies: Sequence[str] | None = None,
                               costs: str | None = None) -> go.Figure:
    """Aggregate tokens/s against per-user tokens/s (Fig. 7), one trace per policy, points labelled x<users>."""
    fig = go.Figure()
    for policy, rs in _groups(results, policies).items():
        rs = [r for r in rs if r.get("per_user_tokens_per_s") is not None]
        color = POLICY_COLORS.get(policy)
        fig.add_trace(go.Scatter(
            x=[r["per_user_tokens_per_s"] for r in rs], y=[r["aggregate_tokens_per_s"] for r in rs],
            mode="lines+markers+text", name=SIM_LABELS.get(policy, policy), text=[f"x{r['users']}" for r in rs],
            textposition="top center", marker=dict(size=8, color=color), line=dict(color=color),
            hovertemplate="%{text}<br>%{x:.1f} tokens/s per user<br>%{y:.1f} tokens/s in all<extra></extra>"))
    fig.update_layout(template=TEMPLATE, height=480,
                      title="Throughput against per-user speed (paper Fig. 7)" + _subtitle(costs),
                      xaxis_title="per-user speed (tokens/s per request)", yaxis_title="aggregate throughput (tokens/s)",
                      legend=dict(orientation="h", y=-0.18))
    fig.update_xaxes(rangemode="tozero")
    fig.update_yaxes(rangemode="tozero")
    return fig


def simulated_load(results: Sequence[dict], policies: Sequence[str] | None = None,
                   costs: str | None = None) -> go.Figure:
    """Aggregate throughput and mean verification budget per request (1 + l) against users (Fig. 8)."""
    groups = _groups(results, policies)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("aggregate throughput (tokens/s)", "verification budget per request (tokens)"))
    for policy, rs in groups.items():
        style = dict(color=POLICY_COLORS.get(policy))
        for row, key in ((1, "aggregate_tokens_per_s"), (2, "mean_verify_budget")):
            fig.add_trace(go.Scatter(x=[r["users"] for r in rs], y=[r[key] for r in rs], mode="lines+markers",
                                     name=SIM_LABELS.get(policy, policy), legendgroup=policy, showlegend=row == 1,
                                     line=style, marker=dict(size=7, **style)), row=row, col=1)
    users = sorted({r["users"] for rs in groups.values() for r in rs})
    fig.update_xaxes(type="log", tickvals=users, ticktext=[str(u) for u in users])
    fig.update_xaxes(title_text="concurrent requests (closed loop)", row=2, col=1)
    fig.update_yaxes(rangemode="tozero")
    fig.update_layout(template=TEMPLATE, height=640,
                      title="Throughput and verification budget against load (paper Fig. 8)" + _subtitle(costs),
                      legend=dict(orientation="h", y=-0.12))
    return fig


def write_figures(results: Sequence[dict], folder: str | Path, costs: str | None = None) -> list[Path]:
    """Fig. 7 and Fig. 8 as self-contained HTML files in `folder`, one pair per temperature."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    temps = sorted({r.get("temperature", 0.0) for r in results})
    paths = []
    for t in temps:
        rs = [r for r in results if r.get("temperature", 0.0) == t]
        for name, make in (("fig7", simulated_throughput_speed), ("fig8", simulated_load)):
            path = folder / f"simulated-{name}-T{t:g}.html"
            make(rs, costs=f"{costs}; T={t:g}" if costs else f"T={t:g}").write_html(path, include_plotlyjs=True)
            paths.append(path)
    return paths
