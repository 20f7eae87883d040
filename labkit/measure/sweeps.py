"""Serving sweeps that measure what they claim: every policy at every load, closed loop (paper Figs. 7 and 8).

The workload. One prompt mix serves every load: the prompts with their domains interleaved (math, code,
chat, math, ...), cycled to `requests_per_user` prompts, and every load of N users serves the mix N
times over (N x requests_per_user requests), so load is never confounded with prompts. The queue is
staggered (user u's j-th request is mix[(u + j) % len(mix)]), so users start on different prompts; in
closed loop whichever user finishes first takes the next request, so the whole load's multiset of
prompts is exactly N copies of the mix. Request k of a run gets seed `seed + k + repeat * N *
requests_per_user`; every policy of one (repeat, load) serves the same requests with the same seeds.

The order. Repeats outermost, then loads, then policies interleaved (their order rotated by one each
repeat), so a slow spell of the machine, or a warm-up, hits every policy alike.

The arms. A policy name serves that policy with the sweep's drafter; "POLICY@DRAFTER" serves it with
another drafter (`split_arm`), so one sweep can set a separately trained one-token drafter under the
MTP-1 policy ("mtp1@mtp1", the trained MTP-1) beside DSpark under Algorithm 1, interleaved alike.

What one run measures (`measure_run`, from the engine's `report(...)` alone):

- per-user speed: each request's tokens after its first, over the wall time from its first token to
  its last (the engine's `tokens_per_s`), averaged over the run's requests; time to first token
  (admission to first token: the prefill, in closed loop) is reported apart, as `ttft_s`;
- aggregate throughput over the WINDOW below: every token emitted inside it, over its length. The
  window opens at the first token of the run's first request (that token marks the start and is not
  counted, as a request's first token is not counted in its own speed) and closes at the run's last
  token. So at one user serving one request the two numbers are equal, and at one user serving several
  the aggregate is lower by the prefills between them;
- the Eq. 1 prediction of per-user speed: tau over the mean time between a request's rounds.

Each run's report is kept whole (with `repeat`, the measured numbers and `engine_aggregate_tokens_per_s`,
the engine's own count from its start, first prefill included, added); `summarize` turns the runs of
a (temperature, users, policy) cell into the median and the min-max spread across repeats, and
`matched_gain` reads the per-user speed of a policy against a baseline at matched aggregate
throughput from the cells' frontiers (`labkit.core.frontier`), with its spread across repeats.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import replace

from labkit.core.errors import LabkitError
from labkit.core.frontier import best_gain, eq1_speed, frontier, gain_at, matched_gains, overlap
from labkit.core.sampling import SamplingParams
from labkit.core.scheduler import CostTable
from labkit.decode.engine import COST_MODELS, ServeRequest, make_requests, run_closed_loop
from labkit.drafters.base import Drafter
from labkit.model.target import Target

#: the window aggregate throughput is counted over (said in every JSON the sweeps write)
WINDOW = ("from the first token of the run's first request to the run's last token; every token emitted "
          "inside it counts (each request's first token marks its own start and is not counted in its speed)")

#: the numbers a cell summarizes across repeats (median and min-max)
METRICS = ("aggregate_tokens_per_s", "per_user_tokens_per_s", "ttft_s", "eq1_per_user_tokens_per_s",
           "mean_verify_budget", "tau", "wasted_verification", "mean_active", "window_s", "steps",
           "draft_s_per_step", "verify_s_per_step")


# ---- the workload ----------------------------------------------------------------------------------


def prompt_mix(prompts: Sequence, requests_per_user: int) -> list:
    """The prompts each user serves at every load: domains interleaved (round robin over the domains in
    the order they first appear, each domain's prompts in order; prompts without a `domain` count as one
    domain), cycled or cut to `requests_per_user`."""
    if requests_per_user < 1:
        raise LabkitError(f"requests_per_user must be at least 1, got {requests_per_user}.")
    if not prompts:
        raise LabkitError("A sweep needs at least one prompt.")
    by_domain: dict = {}
    for p in prompts:
        by_domain.setdefault(getattr(p, "domain", None), []).append(p)
    lanes = list(by_domain.values())
    interleaved = [lane[i] for i in range(max(map(len, lanes))) for lane in lanes if i < len(lane)]
    return [interleaved[i % len(interleaved)] for i in range(requests_per_user)]


def load_queue(mix: Sequence[ServeRequest], users: int, seed_offset: int = 0) -> list[ServeRequest]:
    """The requests of one load: `users` copies of the mix, staggered (request j of user u is
    mix[(u + j) % len(mix)]), ids 0, 1, ... and seeds the mix's first seed + seed_offset + k."""
    if users < 1:
        raise LabkitError(f"--users must be at least 1, got {users}.")
    base = mix[0].seed
    queue = [mix[(u + j) % len(mix)] for j in range(len(mix)) for u in range(users)]
    return [replace(r, id=k, seed=base + seed_offset + k) for k, r in enumerate(queue)]


# ---- what one run measured ---------------------------------------------------------------------------


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def measure_run(report: dict) -> dict:
    """Per-user speed, time to first token, aggregate throughput over `WINDOW` and the Eq. 1 prediction,
    from one `labkit.decode.engine.report(...)` (its "requests" and "step_trace").

    A request's first-token and last-token times are its own fields `first_token_s` / `finish_s` where
    the report has them; else the last token is the end of the last step that ran the request and the
    first is that less (tokens - 1) / tokens_per_s (the engine's own clock; off by the retirement's
    bookkeeping at most)."""
    steps = report.get("step_trace") or []
    last_step: dict[int, float] = {}
    for s in steps:
        for rid in s.get("ids") or []:
            last_step[rid] = s["t_s"]
    spans, ttfts = [], []
    for r in report.get("requests") or []:
        if r.get("error"):
            continue
        if r.get("ttft_s") is not None:
            ttfts.append(r["ttft_s"])
        n = len(r.get("token_ids") or [])
        if r.get("first_token_s") is not None and r.get("finish_s") is not None:
            spans.append((r["first_token_s"], r["finish_s"], n, r.get("tokens_per_s")))
        elif r.get("tokens_per_s") and n > 1 and r["id"] in last_step:
            end = last_step[r["id"]]
            spans.append((end - (n - 1) / r["tokens_per_s"], end, n, r["tokens_per_s"]))
    speeds = [v for *_, v in spans if v is not None]
    out = {"per_user_tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
           "ttft_s": sum(ttfts) / len(ttfts) if ttfts else None,
           "aggregate_tokens_per_s": None, "window_s": None, "window_tokens": 0, "measured_requests": len(spans),
           "eq1_per_user_tokens_per_s": None, "mean_active": None, **step_phases(steps)}
    if spans:
        start, end = min(a for a, *_ in spans), max(b for _, b, *_ in spans)
        # every token after each request's first, plus the first tokens emitted after the window opened
        tokens = sum(n - 1 for *_, n, _ in spans) + sum(1 for a, *_ in spans if a > start)
        out.update(window_s=end - start, window_tokens=tokens,
                   aggregate_tokens_per_s=tokens / (end - start) if end > start else None)
    if steps:
        durations = [s["t_s"] - (steps[i - 1]["t_s"] if i else s["t_s"] - s.get("draft_s", 0.0) - s.get("verify_s", 0.0))
                     for i, s in enumerate(steps)]
        active = [s["active"] for s in steps]
        busy = sum(durations)
        if busy > 0:
            out["mean_active"] = sum(a * d for a, d in zip(active, durations)) / busy
        round_s = sum(a * d for a, d in zip(active, durations)) / sum(active) if sum(active) else 0.0
        if report.get("tau") is not None and round_s > 0:
            out["eq1_per_user_tokens_per_s"] = eq1_speed(report["tau"], round_s)
    return out


def step_phases(steps: Sequence[dict]) -> dict:
    """Mean seconds a step spent drafting (every request's proposals) and verifying (the target's forward,
    the verdicts, the drafters' context updates), over a report's "step_trace"; None without steps."""
    if not steps:
        return {"draft_s_per_step": None, "verify_s_per_step": None}
    return {"draft_s_per_step": sum(s.get("draft_s", 0.0) for s in steps) / len(steps),
            "verify_s_per_step": sum(s.get("verify_s", 0.0) for s in steps) / len(steps)}


# ---- running -----------------------------------------------------------------------------------------


def _rotated(policies: list[str], k: int) -> list[str]:
    k %= len(policies)
    return policies[k:] + policies[:k]


def split_arm(label: str) -> tuple[str, str | None]:
    """A sweep arm's (policy, drafter spec): "POLICY@DRAFTER" serves POLICY with DRAFTER (e.g. "mtp1@mtp1",
    the trained MTP-1 under the one-draft policy); a plain policy name, None (the sweep's drafter)."""
    policy, at, spec = label.partition("@")
    if at and not (policy and spec):
        raise LabkitError(f"Sweep arm {label!r}: write POLICY@DRAFTER, e.g. mtp1@mtp1 (the trained MTP-1 under the "
                          "one-draft policy) or fixed:2@dflash.")
    return policy, spec or None


def arm_cost_model(label: str) -> tuple[str, str | None]:
    """A sweep arm's (arm without it, cost model): "POLICY~MODEL" prices POLICY's steps by MODEL (one of
    the engine's `COST_MODELS`, e.g. "algorithm1~rows" beside "algorithm1" in one sweep); without the
    suffix, None (the sweep's cost model)."""
    head, tilde, model = label.rpartition("~")
    if not tilde:
        return label, None
    if model not in COST_MODELS or not head:
        raise LabkitError(f"Sweep arm {label!r}: write POLICY~MODEL with MODEL one of {', '.join(COST_MODELS)}, "
                          "e.g. algorithm1~rows.")
    return head, model


def sweep(target: Target, drafter: Drafter | None, requests: list[ServeRequest], users: list[int],
          policies: list[str], table: CostTable | None = None, requests_per_user: int = 3,
          drafter_spec: str | None = None, progress: bool = False, repeats: int = 1,
          cost_model: str = "table", recalibrate: bool = True,
          arm_drafters: Mapping[str, Drafter | None] | None = None,
          step_table: CostTable | None = None) -> list[dict]:
    """Every (users, policy) cell `repeats` times: repeats outermost, then loads, then the policies
    interleaved (rotated by one each repeat). `requests` is the prompt mix (cycled to
    `requests_per_user`); each load of N users serves it N times over (`load_queue`). A policy
    "POLICY@SPEC" (`split_arm`) is served with `arm_drafters[SPEC]`, the others with `drafter`; an arm
    "...~MODEL" (`arm_cost_model`) is priced by that cost model, the others by `cost_model`; the arms priced
    by "steps" read `step_table` (`labkit.measure.step_profile`: whole engine steps with `drafter`). One report
    per run, its "policy" the arm's label, with `repeat`, `requests_per_user` and `measure_run`'s numbers
    added (the engine's own aggregate kept as `engine_aggregate_tokens_per_s`)."""
    if repeats < 1:
        raise LabkitError(f"--repeats must be at least 1, got {repeats}.")
    if not policies:
        raise LabkitError("A sweep needs at least one policy.")
    priced = {label: arm_cost_model(label) for label in policies}
    arms = {label: split_arm(priced[label][0]) for label in policies}
    missing = sorted({spec for _, spec in arms.values() if spec is not None} - set(arm_drafters or {}))
    if missing:
        raise LabkitError(f"No drafter given for {', '.join(missing)}: pass arm_drafters={{spec: drafter}} "
                          "(serve-sweep loads them itself).")
    models = {label: priced[label][1] or cost_model for label in policies}
    if step_table is None and "steps" in models.values():
        raise LabkitError("the cost model 'steps' reads a table of whole engine steps: pass step_table= "
                          "(`labkit.measure.step_profile.step_table_for`; serve-sweep profiles it itself).")
    mix = prompt_mix(requests, requests_per_user)
    out = []
    for rep in range(repeats):
        for n in users:
            queue = load_queue(mix, n, seed_offset=rep * n * len(mix))
            for label in _rotated(list(policies), rep):
                policy, spec = arms[label]
                report = run_closed_loop(target, drafter if spec is None else arm_drafters[spec], queue, n, policy,
                                         step_table if models[label] == "steps" else table, n_requests=len(queue),
                                         drafter_spec=spec or drafter_spec, progress=progress, cost_model=models[label],
                                         recalibrate=recalibrate)
                out.append(dict(report, policy=label, repeat=rep, requests_per_user=len(mix),
                                engine_aggregate_tokens_per_s=report.get("aggregate_tokens_per_s"),
                                **measure_run(report)))
    return out


def run_sweeps(target: Target, drafter: Drafter | None, prompts: list, users: list[int], policies: list[str],
               table: CostTable | None, temperatures: list[float], max_new_tokens: int,
               requests_per_user: int = 3, seed: int = 0, drafter_spec: str | None = None,
               progress: bool = False, top_p: float = 1.0, repeats: int = 3,
               cost_model: str = "table", recalibrate: bool = True,
               arm_drafters: Mapping[str, Drafter | None] | None = None,
               step_table: CostTable | None = None) -> dict[float, list[dict]]:
    """`sweep` at each sampling temperature over the same prompt mix (`prompt_mix(prompts,
    requests_per_user)`); each report gets its "temperature" added. Returns {temperature: [report, ...]}."""
    mix = prompt_mix(list(prompts), requests_per_user)
    out = {}
    for temp in temperatures:
        requests = make_requests(target, mix, max_new_tokens, SamplingParams(temperature=float(temp), top_p=top_p), seed)
        reps = sweep(target, drafter, requests, list(users), list(policies), table, requests_per_user,
                     drafter_spec, progress, repeats, cost_model, recalibrate, arm_drafters, step_table)
        out[temp] = [dict(r, temperature=float(temp)) for r in reps]
    return out


# ---- cells: median and spread across repeats -----------------------------------------------------------


def summarize(reports: Sequence[dict]) -> list[dict]:
    """One cell per (temperature, users, policy), in the order cells first appear: each of `METRICS`
    as the median across the cell's runs, and `spread[metric]` = [min, max] (None where no run had the
    number); `repeats` counts the runs."""
    groups: dict[tuple, list[dict]] = {}
    for r in reports:
        groups.setdefault((float(r.get("temperature", 0.0)), r["users"], r["policy"]), []).append(r)
    cells = []
    for (temp, users, policy), runs in groups.items():
        cell = {"temperature": temp, "users": users, "policy": policy, "repeats": len(runs), "spread": {}}
        for m in METRICS:
            xs = [r[m] for r in runs if r.get(m) is not None]
            cell[m] = _median(xs)
            cell["spread"][m] = [min(xs), max(xs)] if xs else None
        cells.append(cell)
    return cells


def is_cells(items: Sequence[dict]) -> bool:
    """Whether these are `summarize` cells (else runs' reports)."""
    return bool(items) and all("spread" in c and "repeats" in c for c in items)


def cells_of(items: Sequence[dict]) -> list[dict]:
    """`items` as cells: cells as they are, reports summarized."""
    return list(items) if is_cells(items) else summarize(items)


def _points(rows: Sequence[dict], policy: str) -> list[tuple]:
    return [(r.get("aggregate_tokens_per_s"), r.get("per_user_tokens_per_s")) for r in rows if r["policy"] == policy]


def matched_gain(reports: Sequence[dict], policy: str = "algorithm1", baseline: str = "mtp1") -> dict:
    """Per-user speed of `policy` against `baseline` at matched aggregate throughput, from one
    temperature's reports (or cells).

    The frontiers are the cells' medians (aggregate throughput, per-user speed); the gain is read at
    every measured throughput inside their overlap (`labkit.core.frontier.matched_gains`), and the
    headline is the best of them. Its spread: the gain at that same throughput on each repeat's own
    frontiers (runs of one repeat were interleaved, so they saw the same machine), min-max over the
    `repeats` that cover it; and, as every repeat's frontiers need not reach that throughput, each
    repeat's own best gain, min-max over the `repeat_best_repeats` whose frontiers overlap. Returns
    {"policy", "baseline", "overlap": [lo, hi] or None, "gains": [{throughput, speed, baseline_speed,
    gain}], "best": {throughput, speed, baseline_speed, gain, "spread", "repeats", "repeat_best",
    "repeat_best_repeats"} or None, "range": [lowest gain, highest gain] or None}."""
    if len({float(r.get("temperature", 0.0)) for r in reports}) > 1:
        raise LabkitError("matched_gain compares one temperature's runs: pass the reports of one temperature.")
    cells = cells_of(reports)
    front, base = frontier(_points(cells, policy)), frontier(_points(cells, baseline))
    gains = matched_gains(front, base)
    span = overlap(front, base)
    out = {"policy": policy, "baseline": baseline, "overlap": list(span) if span else None,
           "gains": [{"throughput": g.throughput, "speed": g.speed, "baseline_speed": g.baseline_speed, "gain": g.gain}
                     for g in gains],
           "best": None, "range": None}
    scored = [g.gain for g in gains if g.gain is not None]
    if scored:
        out["range"] = [min(scored), max(scored)]
    best = best_gain(gains)
    if best is not None:
        at_best, own_best = [], []
        if not is_cells(reports):
            for rep in sorted({r.get("repeat", 0) for r in reports}):
                runs = [r for r in reports if r.get("repeat", 0) == rep]
                f, b = frontier(_points(runs, policy)), frontier(_points(runs, baseline))
                g = gain_at(f, b, best.throughput)
                if g is not None:
                    at_best.append(g)
                mine = best_gain(matched_gains(f, b))
                if mine is not None:
                    own_best.append(mine.gain)
        out["best"] = {"throughput": best.throughput, "speed": best.speed, "baseline_speed": best.baseline_speed,
                       "gain": best.gain, "spread": [min(at_best), max(at_best)] if at_best else None,
                       "repeats": len(at_best),
                       "repeat_best": [min(own_best), max(own_best)] if own_best else None,
                       "repeat_best_repeats": len(own_best)}
    return out


# ---- text ---------------------------------------------------------------------------------------------


def _num(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _spread(cell: dict, m: str, spec: str = ".2f", width: int = 0) -> str:
    x, s = cell.get(m), cell["spread"].get(m)
    if x is None:
        text = "-"
    elif s is None or cell["repeats"] < 2:
        text = format(x, spec)
    else:
        text = f"{format(x, spec)} [{format(s[0], spec)}-{format(s[1], spec)}]"
    return text.rjust(width)


def format_sweep(reports: Sequence[dict]) -> str:
    """The sweep as a table: one line per (temperature, users, policy) cell, each number the median
    across repeats with [min-max] beside it."""
    cells = cells_of(reports)
    lines = [f"{'T':>4} {'users':>5} {'policy':<12} {'agg tok/s [min-max]':>21} {'user tok/s [min-max]':>21} "
             f"{'ttft s':>6} {'budget':>6} {'tau':>5} {'wasted':>6} {'runs':>4}"]
    for c in cells:
        lines.append(f"{c['temperature']:>4.1f} {c['users']:>5} {c['policy']:<12} "
                     f"{_spread(c, 'aggregate_tokens_per_s', width=21)} {_spread(c, 'per_user_tokens_per_s', width=21)} "
                     f"{_num(c['ttft_s'], '.3f'):>6} {_num(c['mean_verify_budget']):>6} {_num(c['tau']):>5} "
                     f"{_num(c['wasted_verification']):>6} {c['repeats']:>4}")
    return "\n".join(lines)


def is_fixed(policy: str) -> bool:
    """A policy (or arm, `split_arm`) that verifies the same length at every load: MTP-1, fixed, fixed:K."""
    policy = split_arm(arm_cost_model(policy)[0])[0]
    return policy in ("mtp1", "fixed") or policy.startswith("fixed:")


BEST_FIXED = ("repeat", "median")


def against_best_fixed(reports: Sequence[dict], policy: str = "algorithm1",
                       key: str = "aggregate_tokens_per_s", choose: str = "repeat") -> list[dict]:
    """`policy`'s `key` over the best fixed-length policy's (`is_fixed`) at each load, paired by repeat
    (the runs of one repeat were interleaved: the same machine); the ratio's median across repeats is
    reported with its min and max. One temperature's reports.

    `choose` says which fixed policy is the best: "repeat", in each repeat the one with the highest `key`
    in that repeat (an oracle that sees each repeat's noise: with n fixed policies of equal speed it is
    the fastest of n noisy draws, so a policy as fast as they are scores below 1); "median", the one fixed
    policy with the highest median `key` across the repeats at that load, every repeat paired with it
    (a policy a deployment could pick; no repeat's noise picks the baseline, though with few repeats the
    choice itself still favours a lucky policy). Rows {"users", "ratio", "low", "high", "repeats", "best",
    "choose"}: `best` names the fixed policy that was best in most repeats ("repeat") or by median."""
    if choose not in BEST_FIXED:
        raise LabkitError(f"against_best_fixed: choose is one of {', '.join(BEST_FIXED)}, not {choose!r}.")
    if len({float(r.get("temperature", 0.0)) for r in reports}) > 1:
        raise LabkitError("against_best_fixed compares one temperature's runs: pass the reports of one temperature.")
    runs: dict[tuple, dict[str, float]] = {}
    for r in reports:
        if r.get(key) is not None:
            runs.setdefault((r["users"], r.get("repeat", 0)), {})[r["policy"]] = r[key]
    out = []
    for users in sorted({u for u, _ in runs}):
        repeats = [got for (u, _), got in sorted(runs.items())
                   if u == users and policy in got and any(is_fixed(p) for p in got)]
        by_median = _median_best(repeats) if choose == "median" else None
        ratios, winners = [], []
        for got in repeats:
            fixed = {p: v for p, v in got.items() if is_fixed(p)}
            best = max(fixed, key=fixed.get) if choose == "repeat" else by_median
            if fixed.get(best, 0.0) <= 0:
                continue
            ratios.append(got[policy] / fixed[best])
            winners.append(best)
        if ratios:
            out.append({"users": users, "ratio": _median(ratios), "low": min(ratios), "high": max(ratios),
                        "repeats": len(ratios), "best": max(set(winners), key=winners.count), "choose": choose})
    return out


def _median_best(repeats: list[dict[str, float]]) -> str | None:
    """The fixed policy with the highest median across `repeats` (each {policy: value}), ties by name."""
    values: dict[str, list[float]] = {}
    for got in repeats:
        for p, v in got.items():
            if is_fixed(p):
                values.setdefault(p, []).append(v)
    return max(sorted(values), key=lambda p: _median(values[p]), default=None)


def format_against_best_fixed(rows: Sequence[dict], policy: str = "algorithm1") -> str:
    """One line: `against_best_fixed`'s rows, load by load."""
    if not rows:
        return f"{policy} against the best fixed policy: no load has both."
    which = ("each repeat's fastest fixed policy" if rows[0].get("choose", "repeat") == "repeat"
             else "the fixed policy fastest by median across repeats")
    return (f"{policy} against {which}, paired by repeat (median [min-max]): "
            + "; ".join(f"{r['ratio']:.2f}x [{r['low']:.2f}-{r['high']:.2f}] at {r['users']} (best {r['best']})"
                        for r in rows))


def noise(best: dict) -> tuple[list[float] | None, str]:
    """The spread a best matched gain is judged by, and what it is: the repeats' gains at its throughput
    where two or more repeats reach it, else each repeat's own best gain where two or more repeats have
    one, else None and why."""
    if best.get("spread") is not None and best["repeats"] > 1:
        return best["spread"], f"across {best['repeats']} repeats"
    if best.get("repeat_best") is not None and best.get("repeat_best_repeats", 0) > 1:
        return best["repeat_best"], (f"as each of {best['repeat_best_repeats']} repeats' own best (fewer than two "
                                     "repeats reach that throughput on their own)")
    if max(best.get("repeats", 0), best.get("repeat_best_repeats", 0)) <= 1:
        return None, "one repeat, spread unknown"
    return None, "spread unknown"


def spread_words(best: dict, pct: str = "+.0%", what: str = "repeats") -> str:
    """The spread of a best matched gain in words (`noise`): "-10% to +30% across 3 repeats, within
    noise" (within noise where the spread reaches zero), or "(one repeat, spread unknown)"; `what` renames
    the repeats (e.g. resamples) and `pct` is the percentage format."""
    spread, label = noise(best)
    label = label.replace("repeats", what)
    if spread is None:
        return f"({label})"
    text = f"{spread[0]:{pct}} to {spread[1]:{pct}} {label}"
    return text + (", within noise" if spread[0] <= 0 <= spread[1] else "")


def format_gain(gain: dict) -> str:
    """One line: the best per-user speed gain at matched throughput, its spread and the range, or why none."""
    head = f"{gain['policy']} over {gain['baseline']} at matched aggregate throughput: "
    if gain["best"] is None:
        return head + "no overlapping throughput range (the frontiers share no throughput)."
    b = gain["best"]
    text = (head + f"{b['gain']:+.1%} per-user speed at {b['throughput']:.2f} tokens/s "
            f"({b['speed']:.2f} against {b['baseline_speed']:.2f} tokens/s per user)")
    words = spread_words(b, "+.1%")
    text += f" {words}" if words.startswith("(") else f", {words}"
    lo, hi = gain["overlap"]
    return text + (f"; {gain['range'][0]:+.1%} to {gain['range'][1]:+.1%} over the overlap {lo:.2f}-{hi:.2f} tokens/s.")


__all__ = ["BEST_FIXED", "METRICS", "WINDOW", "against_best_fixed", "cells_of", "format_against_best_fixed",
           "format_gain", "format_sweep", "is_cells", "is_fixed", "load_queue", "matched_gain", "measure_run", "noise",
           "prompt_mix", "run_sweeps", "spread_words", "summarize", "sweep"]
