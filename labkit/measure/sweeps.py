"""Serving sweeps: every policy at every load, closed-loop, policies interleaved (paper Figs. 7 and 8).

Runs `labkit.decode.engine.run_closed_loop` for each (users, policy) pair and collects its reports;
the figures are `labkit.lab.serving_views`'s.
"""

from __future__ import annotations

from labkit.core.sampling import SamplingParams
from labkit.core.scheduler import CostTable
from labkit.decode.engine import make_requests, run_closed_loop
from labkit.drafters.base import Drafter
from labkit.model.target import Target


def sweep(target: Target, drafter: Drafter | None, requests: list[ServeRequest], users: list[int],
          policies: list[str], table: CostTable | None = None, requests_per_user: int = 2,
          drafter_spec: str | None = None, progress: bool = False) -> list[dict]:
    """Every (policy, users) pair, policies interleaved at each load (noisy machines): one report each.

    Each run serves `requests_per_user * users` requests (at least len(policies)), so every load gets the
    same work per user. The figures of throughput against per-user speed (paper Fig. 7) and of throughput
    and verification budget against concurrency (Fig. 8) are drawn from these reports.
    """
    out = []
    for n in users:
        for policy in policies:
            out.append(run_closed_loop(target, drafter, requests, n, policy, table,
                                       n_requests=max(requests_per_user * n, 1), drafter_spec=drafter_spec,
                                       progress=progress))
    return out


def run_sweeps(target: Target, drafter: Drafter | None, prompts: list, users: list[int], policies: list[str],
               table: CostTable | None, temperatures: list[float], max_new_tokens: int,
               requests_per_user: int = 1, seed: int = 0, drafter_spec: str | None = None,
               progress: bool = False, top_p: float = 1.0) -> dict[float, list[dict]]:
    """`sweep` at each sampling temperature over the same prompts; each report gets its
    "temperature" added. Returns {temperature: [report, ...]}."""
    out = {}
    for temp in temperatures:
        requests = make_requests(target, list(prompts), max_new_tokens, SamplingParams(temperature=float(temp), top_p=top_p), seed)
        reps = sweep(target, drafter, requests, list(users), list(policies), table, requests_per_user,
                     drafter_spec, progress)
        out[temp] = [dict(r, temperature=float(temp)) for r in reps]
    return out


def format_sweep(reports: list[dict]) -> str:
    """The sweep as a table: one line per (temperature, users, policy)."""
    lines = [f"{'T':>4} {'users':>5} {'policy':<12} {'agg tok/s':>9} {'user tok/s':>10} {'budget':>6} {'tau':>5} "
             f"{'wasted':>6} {'steps':>5}"]
    for r in reports:
        lines.append(f"{r.get('temperature', 0.0):>4.1f} {r['users']:>5} {r['policy']:<12} "
                     f"{r['aggregate_tokens_per_s'] or 0:>9.2f} {r['per_user_tokens_per_s'] or 0:>10.2f} "
                     f"{r['mean_verify_budget'] or 0:>6.2f} {r['tau'] or 0:>5.2f} "
                     f"{r['wasted_verification'] or 0:>6.2f} {r['steps']:>5}")
    return "\n".join(lines)
