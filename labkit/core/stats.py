"""Statistics that check losslessness and summarise acceptance (paper Sec. 2.1, Fig. 2).

Losslessness is tested, never assumed: `speculative_stream` runs the lab's own `verify_chain` round
after round against a toy target whose distribution does not depend on context, so every emitted token
must be an independent draw from p_t; `chi_square_test` then says how surprising the observed counts
are under p_t. Acceptance statistics of decoding traces (tau, acceptance by position, prefix survival)
live in `labkit.core.trace`. Notation follows the paper: p_t is the target's distribution, p_d the drafter's.
This module knows probabilities and counts, not models; it needs no scipy (the chi-square tail is the
regularised upper incomplete gamma function, which torch ships).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from labkit.core.errors import LabkitError
from labkit.core.sampling import verify_chain
from labkit.core.trace import expected_acceptance


@dataclass(frozen=True)
class ChiSquareResult:
    """Pearson's goodness-of-fit test of counts against probabilities."""

    statistic: float
    dof: int
    p_value: float
    n_draws: int
    n_bins: int  # after pooling bins with too few expected draws

    def passes(self, alpha: float = 0.01) -> bool:
        """True when the counts are consistent with the probabilities at significance `alpha`."""
        return self.p_value >= alpha


def _as_1d(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).flatten()
    if t.numel() == 0 or not torch.isfinite(t).all() or (t < 0).any():
        raise LabkitError(f"{name} must be a non-empty list of finite, non-negative numbers.")
    return t


def chi_square_test(counts, probs, min_expected: float = 5.0) -> ChiSquareResult:
    """Does `counts` (draws per outcome) look like `probs`? Pearson's chi-square with pooled tails.

    Outcomes whose expected count n * p is below `min_expected` are pooled into one bin (the usual
    rule that keeps the chi-square approximation honest), so a 49,152-token vocabulary works too. An
    outcome drawn although its probability is 0 gives p-value 0: no sampling noise explains it.
    Example: chi_square_test([48, 52], [0.5, 0.5]).p_value is about 0.69.
    """
    c, p = _as_1d(counts, "counts"), _as_1d(probs, "probs")
    if c.shape != p.shape:
        raise LabkitError(f"counts has {c.numel()} outcomes but probs has {p.numel()}: give one count per outcome.")
    if abs(float(p.sum()) - 1.0) > 1e-4:
        raise LabkitError(f"probs must sum to 1 (they sum to {float(p.sum()):.6f}).")
    n = int(c.sum())
    if n <= 0:
        raise LabkitError("counts are all zero: draw at least one sample before testing it.")
    if bool(((p == 0) & (c > 0)).any()):
        return ChiSquareResult(float("inf"), max(int((p > 0).sum()) - 1, 0), 0.0, n, int(p.numel()))
    c, p = c[p > 0], p[p > 0]
    expected = n * p
    small = expected < min_expected
    if bool(small.any()):
        big_c, big_e = c[~small], expected[~small]
        pooled_c, pooled_e = c[small].sum(), expected[small].sum()
        # A pooled bin that is itself too small joins the smallest big bin, keeping every bin >= min_expected.
        if pooled_e < min_expected and big_e.numel() > 0:
            j = int(big_e.argmin())
            big_c, big_e = big_c.clone(), big_e.clone()
            big_c[j] += pooled_c
            big_e[j] += pooled_e
            c, expected = big_c, big_e
        else:
            c, expected = torch.cat([big_c, pooled_c.view(1)]), torch.cat([big_e, pooled_e.view(1)])
    dof = int(c.numel()) - 1
    stat = float(((c - expected) ** 2 / expected).sum())
    if dof == 0:
        return ChiSquareResult(stat, 0, 1.0, n, int(c.numel()))
    # P(chi2_dof > stat) = Q(dof / 2, stat / 2), the regularised upper incomplete gamma function.
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                            torch.tensor(stat / 2, dtype=torch.float64)))
    return ChiSquareResult(stat, dof, p_value, n, int(c.numel()))


def total_variation(p, q) -> float:
    """TV distance 0.5 * ||p - q||_1 between two distributions (or normalised counts)."""
    p, q = _as_1d(p, "p"), _as_1d(q, "q")
    if p.shape != q.shape:
        raise LabkitError(f"p has {p.numel()} outcomes but q has {q.numel()}.")
    return 0.5 * float((p / p.sum() - q / q.sum()).abs().sum())


def acceptance_rate(p_t: torch.Tensor, p_d: torch.Tensor) -> float:
    """Probability that one draft x ~ p_d is accepted: sum_x min(p_t(x), p_d(x)) = 1 - TV(p_t, p_d)
    (`labkit.core.trace.expected_acceptance` of two distributions)."""
    return float(expected_acceptance(p_d, p_t))


@dataclass
class StreamResult:
    """Tokens emitted by speculative rounds, with where each came from."""

    tokens: torch.Tensor  # (n,) token ids in emission order
    source: list[str]  # per token: "accepted" draft, "residual" resample or "bonus" draw
    rounds: list[int]  # accepted drafts per round

    def counts(self, vocab_size: int, source: str | None = None) -> torch.Tensor:
        """Draws per token id, over all tokens or only those of one source."""
        keep = self.tokens if source is None else self.tokens[torch.tensor([s == source for s in self.source])]
        return torch.bincount(keep, minlength=vocab_size)

    @property
    def tau(self) -> float:
        """Mean tokens emitted per round (accepted drafts + 1), counting the last round's cut-short tokens
        (`labkit.core.trace.mean_tau` is the same mean over decoding's `Round` traces)."""
        return len(self.tokens) / max(len(self.rounds), 1)


def speculative_stream(p_t: torch.Tensor, p_d: torch.Tensor, n_tokens: int, gamma: int = 4,
                       seed: int = 0) -> StreamResult:
    """Emit `n_tokens` tokens by draft-then-`verify_chain` rounds against a context-free toy target.

    Each round drafts gamma tokens i.i.d. from p_d (V,), verifies them against p_t (V,) at every
    position and keeps the accepted prefix plus the residual or bonus token, exactly as the decoding
    loop does. Since p_t ignores context, the lossless theorem says the stream is i.i.d. p_t, so its
    counts can be tested with `chi_square_test(stream.counts(V), p_t)`.
    """
    if p_t.dim() != 1 or p_t.shape != p_d.shape:
        raise LabkitError(f"p_t and p_d must be two probability vectors of one size, got "
                          f"{tuple(p_t.shape)} and {tuple(p_d.shape)}.")
    if gamma < 1 or n_tokens < 1:
        raise LabkitError(f"gamma and n_tokens must be >= 1, got gamma={gamma}, n_tokens={n_tokens}.")
    gen = torch.Generator().manual_seed(seed)
    p_t, p_d = p_t.float().cpu(), p_d.float().cpu()
    block_d, block_t = p_d.expand(gamma, -1), p_t.expand(gamma + 1, -1)
    # Drafts are i.i.d. p_d, so draw them all at once (one multinomial over V instead of one per round):
    # at most n_tokens rounds, since every round emits at least one token.
    pool = torch.multinomial(p_d, n_tokens * gamma, replacement=True, generator=gen).view(n_tokens, gamma)
    tokens: list[int] = []
    source: list[str] = []
    rounds: list[int] = []
    while len(tokens) < n_tokens:
        draft = pool[len(rounds)]  # (gamma,)
        verdict = verify_chain(draft, block_d, block_t, gen)
        n = verdict.n_accepted
        tokens += draft[:n].tolist() + [verdict.next_token]
        source += ["accepted"] * n + ["bonus" if n == gamma else "residual"]
        rounds.append(n)
    # Cutting the last round short keeps the prefix of an i.i.d. stream, which is still i.i.d.
    return StreamResult(torch.tensor(tokens[:n_tokens]), source[:n_tokens], rounds)
