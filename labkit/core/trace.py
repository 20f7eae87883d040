"""The per-round trace of speculative decoding and every statistic read from it (paper Sec. 2.1, Eq. 1).

A round drafts k tokens; the target keeps the first n and adds one of its own (the residual resample
or the bonus token), so it emits n + 1. Eq. 1's per-token latency L = (T_draft + T_verify) / tau uses
tau = mean tokens emitted per round. Acceptance by position comes in two kinds, named for what they are:
the paper's Fig. 2 shows the *conditional* rate (draft j accepted given drafts 1..j-1 were), DeepSpec's
`accept_rate@k` is the *unconditional* prefix survival (drafts 1..j all accepted).

Decoding, the bench, calibration, the figures and the notebooks all import these from here, so a number
called tau or acceptance means the same thing wherever it is printed. The same holds for the estimates
made without decoding, from teacher-forced blocks (training metrics, held-out diagnostics): the
probability that a draft from p_d survives p_t (`expected_acceptance`, 1 - TV) and the tau it implies
(`offline_tau`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from labkit.core.errors import LabkitError
from labkit.core.evidence import Interval, pooled_rate_interval


@dataclass
class Round:
    """The trace of one round: drafted k, accepted n (n + 1 tokens emitted), and its two costs."""

    proposed: int
    accepted: int
    draft_s: float
    #: None where the round shared one target forward with other requests (the batched engine)
    verify_s: float | None
    #: the confidence head's raw logits for the proposed drafts (drafters with one; else None)
    conf_logits: list[float] | None = None

    @property
    def emitted(self) -> int:
        return self.accepted + 1


#: fewer rounds than this behind a position make its acceptance rate a coin toss (1.00 or 0.00 from
#: one or two rounds); `format_acceptance` and the figures mark such positions
MIN_ROUNDS = 10


def mean_tau(rounds: Sequence[Round]) -> float | None:
    """Eq. 1's tau: mean tokens emitted per round (accepted drafts + 1), over all rounds; None without any."""
    if not rounds:
        return None
    return sum(r.emitted for r in rounds) / len(rounds)


def tau_interval(per_prompt: Sequence[tuple[int, int]], seed: int = 0) -> Interval:
    """tau pooled as `mean_tau` pools rounds (tokens emitted over rounds), given per prompt as (tokens
    emitted, rounds), with its bootstrap interval over prompts (see `tau_ratio_interval`)."""
    x = torch.tensor(per_prompt, dtype=torch.float64).reshape(-1, 2)
    if x.shape[0] == 0 or bool((x[:, 1] < 1).any()):
        raise LabkitError("tau needs rounds on every prompt: give (tokens emitted, rounds) with rounds >= 1.")
    return pooled_rate_interval(x, seed=seed)


def tau_ratio_interval(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]], seed: int = 0) -> Interval:
    """tau of one drafter over another's on the same prompts, each pooled as `mean_tau` pools rounds (tokens
    emitted over rounds), given per prompt as (tokens emitted, rounds); the interval is a paired bootstrap
    over prompts (`labkit.core.evidence`), since rounds of one prompt share its text and are not independent."""
    x = torch.tensor(a, dtype=torch.float64).reshape(-1, 2)
    y = torch.tensor(b, dtype=torch.float64).reshape(-1, 2)
    if x.shape != y.shape or x.shape[0] == 0 or bool((x[:, 1] < 1).any()) or bool((y[:, 1] < 1).any()):
        raise LabkitError("a tau ratio needs both drafters' rounds on the same prompts, at least one round on each.")
    return pooled_rate_interval(x, y, seed=seed)


def token_coverage(token_lists: Sequence[Sequence[int]], vocab: Sequence[int]) -> float:
    """The share of tokens that a cut draft vocabulary holds: a drafter can never propose the others,
    so at every position acceptance is capped by it (1.0 for no tokens)."""
    keep = set(int(t) for t in vocab)
    total = sum(len(ts) for ts in token_lists)
    return sum(int(t) in keep for ts in token_lists for t in ts) / total if total else 1.0


def _position_tallies(rounds: Sequence[Round]) -> list[tuple[int, int]]:
    """(rounds that reached draft position j, rounds that accepted draft j) for j = 1, 2, ...

    A round reaches position j when it proposed at least j tokens and accepted the first j - 1.
    Positions nobody reached are left out.
    """
    out = []
    depth = max((r.proposed for r in rounds), default=0)
    for j in range(1, depth + 1):
        reached = [r for r in rounds if r.proposed >= j and r.accepted >= j - 1]
        if not reached:
            break
        out.append((len(reached), sum(r.accepted >= j for r in reached)))
    return out


def position_acceptance(rounds: Sequence[Round]) -> list[float]:
    """Conditional acceptance at draft position j: P(draft j accepted | drafts 1..j-1 accepted).

    Only rounds that proposed at least j tokens and accepted the first j - 1 count at position j
    (paper Fig. 2); `position_counts` gives how many rounds that is. Positions nobody reached are left out.
    """
    return [acc / n for n, acc in _position_tallies(rounds)]


def position_counts(rounds: Sequence[Round]) -> list[int]:
    """The number of rounds behind each entry of `position_acceptance` (those that reached position j)."""
    return [n for n, _ in _position_tallies(rounds)]


def position_interval(per_prompt: Sequence[Sequence[Round]], j: int = 1, seed: int = 0,
                      min_rounds: int = MIN_ROUNDS) -> Interval | None:
    """`position_acceptance` at draft position j pooled over prompts (rounds that accepted draft j over rounds
    that reached it), with its bootstrap interval over the prompts where some round reached j, since rounds
    of one prompt share its text and are not independent; None where fewer than `min_rounds` rounds reached j
    in all (a rate from a handful of rounds is a coin toss, whatever its interval over prompts says)."""
    if j < 1:
        raise LabkitError(f"draft positions count from 1, got {j}.")
    rows = []
    for rounds in per_prompt:
        tallies = _position_tallies(rounds)
        if len(tallies) >= j:
            reached, accepted = tallies[j - 1]
            rows.append((accepted, reached))
    if sum(reached for _, reached in rows) < max(min_rounds, 1):
        return None
    return pooled_rate_interval(rows, seed=seed)


def prefix_survival(rounds: Sequence[Round]) -> list[float]:
    """Unconditional survival at draft position j: P(drafts 1..j all accepted | j were proposed).

    DeepSpec reports this as `accept_rate@k`; the paper's Fig. 2 shows the conditional acceptance
    (`position_acceptance`). Their ratio at j is the conditional rate at j.
    """
    out = []
    depth = max((r.proposed for r in rounds), default=0)
    for j in range(1, depth + 1):
        reached = [r for r in rounds if r.proposed >= j]
        if not reached:
            break
        out.append(sum(r.accepted >= j for r in reached) / len(reached))
    return out


def format_acceptance(rates: Sequence[float | None], counts: Sequence[int], min_rounds: int = MIN_ROUNDS,
                      with_counts: bool = True) -> str:
    """Per-position acceptance as text, a position with fewer than `min_rounds` rounds in parentheses.

    E.g. "0.38 0.27 (0.50) (1.00) | rounds 52 30 4 1; (..) = fewer than 10": a rate from a handful of
    rounds reads as a measurement unless it is marked. `with_counts=False` leaves out the counts.
    """
    if len(rates) != len(counts):
        raise LabkitError(f"Got {len(rates)} acceptance rates but {len(counts)} round counts: "
                          "pass position_acceptance(rounds) and position_counts(rounds) of the same rounds.")
    if not rates:
        return "none (no round drafted a token)"
    # a position no round reached (None, 0 rounds: e.g. from calibrate.confidence_vs_acceptance) reads "-"
    text = " ".join("-" if a is None else f"{a:.2f}" if n >= min_rounds else f"({a:.2f})" for a, n in zip(rates, counts))
    if with_counts:
        text += " | rounds " + " ".join(str(n) for n in counts)
        if any(n < min_rounds for n in counts):
            text += f"; (..) = fewer than {min_rounds}"
    elif any(n < min_rounds for n in counts):
        text += f" ((..): fewer than {min_rounds} rounds)"
    return text


def format_position_acceptance(rounds: Sequence[Round], min_rounds: int = MIN_ROUNDS, with_counts: bool = True) -> str:
    """`format_acceptance` of a list of rounds: their conditional acceptance with its round counts."""
    return format_acceptance(position_acceptance(rounds), position_counts(rounds), min_rounds, with_counts)


__all__ = ["Round", "MIN_ROUNDS", "mean_tau", "position_acceptance", "position_counts", "prefix_survival",
           "format_acceptance", "format_position_acceptance"]


# ---- estimates from distributions, without decoding (teacher-forced blocks) ------------------------


def l1_to_target(p_d: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """||p_d - p_t||_1 over the last dimension, where p_d may cover only a cut draft vocabulary: the
    target's mass outside it (p_t's rows then sum to less than 1) counts in full, since such tokens are
    never drafted. 2 x TV; the distillation term of the loss (Eq. 10)."""
    outside = (1 - p_t.sum(-1)).clamp(min=0)
    return (p_d - p_t).abs().sum(-1) + outside


def acceptance_from_l1(l1: torch.Tensor) -> torch.Tensor:
    """1 - TV = 1 - ||p_d - p_t||_1 / 2: the probability that a draft x ~ p_d is accepted against p_t
    by rejection sampling (Sec. 2.1), and the confidence head's label c*_k (Eq. 8)."""
    return 1 - 0.5 * l1


def expected_acceptance(p_d: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """sum_x min(p_t(x), p_d(x)) = 1 - TV(p_d, p_t) along the last dimension (see `l1_to_target`)."""
    return acceptance_from_l1(l1_to_target(p_d, p_t))


def offline_tau(accept: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """tau implied by per-position acceptance of teacher-forced blocks (..., gamma): 1 + the mean over
    blocks of sum_k prod_{i<=k} accept_i, a block ending at its first invalid position. With
    probabilities it is the expected tau at temperature 1; with top-1 agreement (0/1), the greedy tau."""
    return 1 + torch.cumprod(accept.float() * valid.float(), -1).sum(-1).mean()
