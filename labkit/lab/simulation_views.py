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
SIM_LABELS = POLICY_LABELS.overriding({"mtp1": "MTP-1 (one-token rounds)"})


def _label(policy: str) -> str:
    """A policy's name in the simulator's terms (its own spec where it has no label)."""
    return SIM_LABELS.get(policy, policy)


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
            mode="lines+markers+text", name=_label(policy), text=[f"x{r['users']}" for r in rs],
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
                                     name=_label(policy), legendgroup=policy, showlegend=row == 1,
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


# ---------------------------------------------------------------------------------------------------
# Labels for policy specs, the spread of a simulation, and what the simulator is worth on this CPU


def relabel(fig: go.Figure) -> go.Figure:
    """Trace names of policy specs (fixed:K, threshold:T) as the lab labels them ("fixed K=4")."""
    for t in fig.data:
        if t.name and ":" in t.name and t.name not in SIM_LABELS:
            t.name = POLICY_LABELS.get(t.name, t.name)
    return fig


def simulate_resampled(block: Sequence, one: Sequence | None, users: Sequence[int], policies: Sequence[str], cost,
                       resamples: int, requests_per_user: int = 2, seed: int = 0) -> list[dict]:
    """`labkit.core.simulate.sweep` on `resamples` bootstrap resamples of the recorded requests (`block`,
    and `one`, the one-token traces of the same prompts, resampled alike for `mtp1`); every result
    carries its resample as "repeat", so `matched_gain` and the serving views read the resamples as
    repeats. The spread of a simulated number is then what 24 prompts (or however many) leave open."""
    import random

    from labkit.core.simulate import sweep
    out = []
    for k in range(resamples):
        rng = random.Random(seed + 1 + k)
        picks = [rng.randrange(len(block)) for _ in block]
        sources = {"mtp1": [one[i] for i in picks]} if one is not None and "mtp1" in policies else None
        for r in sweep([block[i] for i in picks], list(users), list(policies), cost, sources, requests_per_user, seed):
            out.append({**r, "repeat": k})
    return out


def sim_matched_gain(results: Sequence[dict], resampled: Sequence[dict] = (), policy: str = "algorithm1",
                     baseline: str = "mtp1") -> dict:
    """`labkit.measure.sweeps.matched_gain` of a simulation: the headline from the full sample, its spread
    from the resamples (`simulate_resampled`): the gain at the headline's throughput on each resample's
    frontiers, and each resample's own best, min-max with the full sample's own (as `matched_gain` reads
    repeats: `repeats` counts the full sample and the resamples that reach that throughput)."""
    from labkit.core.frontier import best_gain, frontier, gain_at, matched_gains
    from labkit.measure.sweeps import matched_gain
    gain = matched_gain([{k: v for k, v in r.items() if k != "repeat"} for r in results], policy, baseline)
    best = gain["best"]
    if best is None or not resampled:
        return gain
    at, own = [], []
    for rep in sorted({r["repeat"] for r in resampled}):
        runs = [r for r in resampled if r["repeat"] == rep]
        pts = lambda p: [(r["aggregate_tokens_per_s"], r["per_user_tokens_per_s"]) for r in runs if r["policy"] == p]  # noqa: E731
        f, b = frontier(pts(policy)), frontier(pts(baseline))
        g = gain_at(f, b, best["throughput"])
        if g is not None:
            at.append(g)
        mine = best_gain(matched_gains(f, b))
        if mine is not None:
            own.append(mine.gain)
    at, own = [best["gain"], *at], [best["gain"], *own]  # the full sample counts as one more draw
    best.update(spread=[min(at), max(at)], repeats=len(at), repeat_best=[min(own), max(own)],
                repeat_best_repeats=len(own))
    return gain


def sim_ratio(results: Sequence[dict], policy: str, baseline: str, users: int,
              key: str = "aggregate_tokens_per_s") -> float | None:
    """A policy's `key` over the baseline's at one load of a simulation; None where either is missing."""
    a = next((r for r in results if r["policy"] == policy and r["users"] == users), None)
    b = next((r for r in results if r["policy"] == baseline and r["users"] == users), None)
    if a is None or b is None or not a.get(key) or not b.get(key):
        return None
    return a[key] / b[key]


def sim_ratio_spread(resampled: Sequence[dict], policy: str, baseline: str, users: int,
                     key: str = "aggregate_tokens_per_s", full: float | None = None) -> tuple[float, float, int] | None:
    """(min, max, resamples) of `sim_ratio` over the resamples, with the full sample's ratio `full` among
    them where given; None without any resample."""
    xs = [x for rep in sorted({r["repeat"] for r in resampled})
          if (x := sim_ratio([r for r in resampled if r["repeat"] == rep], policy, baseline, users, key)) is not None]
    if not xs:
        return None
    ys = xs + ([full] if full is not None else [])
    return min(ys), max(ys), len(xs)


VALIDATION_HEADER = ("users", "policy", "steps (sim / engine)", "verify budget", "tau", "aggregate tokens/s",
                     "per-user tokens/s")


def validation_rows(rows: Sequence[dict]) -> list[tuple]:
    """The engine against the simulator (`labkit.measure.traces.validate` rows), each metric as
    simulated / engine (the ratio) per (users, policy). Both sides serve `mtp1` with the trace file's
    one-token source, so it is labelled as the simulator labels it."""
    def ratio(r, key):
        e, s = r.get(f"engine_{key}"), r.get(f"sim_{key}")
        return "-" if not e or s is None else f"{s / e:.2f}"
    return [(r["users"], _label(r["policy"]), ratio(r, "steps"), ratio(r, "mean_verify_budget"),
             ratio(r, "tau"), ratio(r, "aggregate_tokens_per_s"), ratio(r, "per_user_tokens_per_s")) for r in rows]


def _span(xs: Sequence[float]) -> str:
    return f"{min(xs) - 1:+.0%} to {max(xs) - 1:+.0%}"


def describe_validation(rows: Sequence[dict], baseline: str = "mtp1") -> list[str]:
    """What the engine-against-simulator rows say: how far each metric's simulated value is from the
    engine's (the range over the rows), and how far the simulator moves a policy's throughput relative to
    the baseline's (what a simulated comparison of policies inherits), per policy, over the loads."""
    if not rows:
        raise LabkitError("No validation rows: run `python -m labkit simulate --table cpu --validate` first.")
    users = sorted({r["users"] for r in rows})
    out = [f"{len(rows)} runs, {users[0]}-{users[-1]} users, {len({r['policy'] for r in rows})} policies, "
           f"{rows[0].get('requests', '?')} request(s) at one user, the same prompts on both sides."]
    for key, name in (("steps", "steps"), ("mean_verify_budget", "verification budget"), ("tau", "tau"),
                      ("aggregate_tokens_per_s", "aggregate throughput"), ("per_user_tokens_per_s", "per-user speed")):
        xs = [r[f"sim_{key}"] / r[f"engine_{key}"] for r in rows if r.get(f"engine_{key}") and r.get(f"sim_{key}") is not None]
        if xs:
            out.append(f"simulated {name}: {_span(xs)} against the engine's")
    base = {r["users"]: r for r in rows if r["policy"] == baseline}
    for policy in dict.fromkeys(r["policy"] for r in rows if r["policy"] != baseline):
        rel = [(r["sim_aggregate_tokens_per_s"] / r["engine_aggregate_tokens_per_s"])
               / (base[r["users"]]["sim_aggregate_tokens_per_s"] / base[r["users"]]["engine_aggregate_tokens_per_s"])
               for r in rows if r["policy"] == policy and r["users"] in base]
        if rel:
            out.append(f"{_label(policy)} against {_label(baseline)}: the "
                       f"simulator moves the throughput ratio by {_span(rel)} over {len(rel)} loads")
    return out


SIM_VS_MEASURED_HEADER = ("users", "policy", "measured ratio to the baseline [min-max]", "simulated ratio",
                          "simulated inside the measured spread?")


def sim_vs_measured(sim: Sequence[dict], ratios: Sequence[dict], baseline: str = "mtp1") -> list[tuple]:
    """Each measured paired ratio (`labkit.lab.serving_views.paired_ratios`: policy over baseline, median
    [min-max] across repeats) beside the simulated one at the same load (`sim_ratio`)."""
    rows = []
    for r in ratios:
        s = sim_ratio(sim, r["policy"], baseline, r["users"])
        inside = "-" if s is None else ("yes" if r["low"] <= s <= r["high"] else
                                         f"no: {'above' if s > r['high'] else 'below'} it")
        rows.append((r["users"], POLICY_LABELS.get(r["policy"], r["policy"]),
                     f"{r['ratio']:.2f} [{r['low']:.2f}-{r['high']:.2f}]", "-" if s is None else f"{s:.2f}", inside))
    return rows


def describe_sim_vs_measured(rows: Sequence[tuple]) -> str:
    """How many simulated ratios (`sim_vs_measured`) fall inside the measured spread, and which do not."""
    judged = [r for r in rows if r[-1] != "-"]
    if not judged:
        return "No load was both measured and simulated."
    inside = [r for r in judged if r[-1] == "yes"]
    out = [f"{r[1]} at {r[0]} user(s) ({r[-1].removeprefix('no: ')})" for r in judged if r[-1] != "yes"]
    return (f"{len(inside)} of {len(judged)} simulated ratios to the baseline fall inside the min-max of this run's "
            "repeats" + (": " + "; ".join(out) + " outside" if out else "") + ".")


def _ratio_cell(results: Sequence[dict], resampled: Sequence[dict], policy: str, baseline: str, users: int) -> str:
    x = sim_ratio(results, policy, baseline, users)
    if x is None:
        return "-"
    s = sim_ratio_spread(resampled, policy, baseline, users, full=x) if resampled else None
    return f"{x:.2f}" + (f" [{s[0]:.2f}-{s[1]:.2f}]" if s else "")


def simulation_rows(results: Sequence[dict], resampled: Sequence[dict] = (),
                    pairs: Sequence[tuple[str, str]] = (("algorithm1", "mtp1"), ("algorithm1", "fixed"))) -> tuple[list, tuple]:
    """Per load: each pair's aggregate throughput ratio (full sample, [min-max] over it and the resamples
    where they ran), Algorithm 1's verification budget and per-user speed. Returns (rows, header)."""
    header = ("users", *(f"{_label(a)} / {_label(b)} throughput [resamples]" for a, b in pairs),
              "Algorithm 1 budget", "Algorithm 1 tokens/s per user")
    rows = []
    for u in sorted({r["users"] for r in results}):
        a1 = next((r for r in results if r["policy"] == "algorithm1" and r["users"] == u), None)
        rows.append((u, *(_ratio_cell(results, resampled, a, b, u) for a, b in pairs),
                     "-" if a1 is None else f"{a1['mean_verify_budget']:.2f}",
                     "-" if a1 is None or a1.get("per_user_tokens_per_s") is None else f"{a1['per_user_tokens_per_s']:.1f}"))
    return rows, header


def describe_simulation(results: Sequence[dict], resampled: Sequence[dict] = (), gain: dict | None = None,
                        pairs: Sequence[tuple[str, str]] = (("algorithm1", "mtp1"), ("algorithm1", "fixed")),
                        n_requests: int | None = None, tie: float = 0.01) -> list[str]:
    """Sentences from a simulation: the matched-throughput gain (`sim_matched_gain`) with its resampled
    spread, where each pair's throughput ratio is above, below or within the resamples' spread of 1, and
    how Algorithm 1's budget moves from the lightest load to the heaviest."""
    from labkit.core.evidence import verdict
    out = []
    k = len({r["repeat"] for r in resampled}) if resampled else 0
    unit = f"{k} bootstrap resamples of the {n_requests or '?'} recorded requests" if k else "no resampling"
    if gain is not None:
        b = gain.get("best")
        if b is None:
            out.append(f"{_label(gain['policy'])} and {_label(gain['baseline'])} "
                       "share no throughput range in the simulation.")
        else:
            text = (f"At matched aggregate throughput, {_label(gain['policy'])}'s per-user speed "
                    f"is {b['gain']:+.0%} over {_label(gain['baseline'])}'s at best "
                    f"(at {b['throughput']:.4g} tokens/s")
            if b.get("spread") and b.get("repeats", 0) > 1:
                text += (f"; {b['spread'][0]:+.0%} to {b['spread'][1]:+.0%} over the full sample and the "
                         f"{b['repeats'] - 1} of {unit} that reach that throughput")
            else:
                text += f"; {unit}"
            text += ")"
            if gain.get("range") and len(gain.get("gains", [])) > 1:
                text += f", and {gain['range'][0]:+.0%} to {gain['range'][1]:+.0%} over the throughputs both frontiers cover"
            out.append(text + ".")
    users = sorted({r["users"] for r in results})
    for a, b in pairs:
        judged: dict[str, list[str]] = {}
        for u in users:
            x = sim_ratio(results, a, b, u)
            if x is None:
                continue
            s = sim_ratio_spread(resampled, a, b, u, full=x) if resampled else None
            v = verdict(x, s[0], s[1], tie) if s and s[2] > 1 else ("above" if x > 1 + tie else "below" if x < 1 - tie
                                                                     else f"tied (within {tie:.0%})") + ", spread unknown"
            judged.setdefault(v, []).append(f"{u} ({x:.2f}x)")
        if judged:
            out.append(f"{_label(a)} / {_label(b)} aggregate throughput: "
                       + "; ".join(f"{v} at {', '.join(us)}" for v, us in judged.items()) + ".")
    a1 = sorted((r for r in results if r["policy"] == "algorithm1"), key=lambda r: r["users"])
    if a1:
        out.append(f"Algorithm 1 verifies {a1[0]['mean_verify_budget']:.2f} tokens per request at {a1[0]['users']} user(s) "
                   f"and {a1[-1]['mean_verify_budget']:.2f} at {a1[-1]['users']}.")
    return out
