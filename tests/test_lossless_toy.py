"""Lossless on toy distributions: what verify_chain emits is distributed as the target, p_t.

Each test draws many outcomes with a fixed seed and runs a Pearson chi-square goodness-of-fit test
(tests/conftest.py, cells with expected count < 5 pooled) at alpha = 0.001. With the seeds fixed the
outcome is deterministic; for a correct verifier, the chance that a fresh seed would fail is 0.001
per test. Each test of the correct verifier is paired with deliberately wrong verifiers that the SAME
test, at the SAME alpha and number of draws, must reject, which shows it has the power to catch the
mistakes that matter (always accepting; resampling from p_t instead of the residual; a bonus token
from the wrong row).
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections import Counter

import pytest
import torch

from labkit.core.sampling import Verdict, residual, sample, verify_chain

ALPHA = 0.001
V = 6  # single-position vocabulary
N_FIRST = 20_000  # draws of the first emitted token
N_JOINT = 8_000  # draws of the first three emitted tokens
GAMMA = 3

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------
# wrong verifiers (same signature as verify_chain)


def verify_always_accept(draft, p_d, p_t, generator=None) -> Verdict:
    """Wrong: keeps every draft, so it emits the drafter's distribution."""
    k = draft.shape[0]
    return Verdict(k, int(sample(p_t[k], generator)))


def verify_resample_target(draft, p_d, p_t, generator=None) -> Verdict:
    """Wrong: the right acceptance test, but after a rejection it samples p_t instead of the residual."""
    k = draft.shape[0]
    for i in range(k):
        x = int(draft[i])
        ratio = float(p_t[i, x] / p_d[i, x].clamp_min(1e-30))
        if float(torch.rand((), generator=generator)) >= ratio:
            return Verdict(i, int(sample(p_t[i], generator)))
    return Verdict(k, int(sample(p_t[k], generator)))


def verify_bonus_from_wrong_row(draft, p_d, p_t, generator=None) -> Verdict:
    """Wrong: right accept/residual, but the bonus token comes from p_t[k - 1] instead of p_t[k]."""
    verdict = verify_chain(draft, p_d, p_t, generator)
    k = draft.shape[0]
    if verdict.n_accepted == k and k:
        return Verdict(k, int(sample(p_t[k - 1], generator)))
    return verdict


WRONG_FIRST_TOKEN = [verify_always_accept, verify_resample_target]
WRONG_JOINT = [verify_always_accept, verify_resample_target, verify_bonus_from_wrong_row]


# ----------------------------------------------------------------------------------------------------
# the first emitted token


@pytest.fixture(scope="module")
def single_position():
    """p_t and p_d over 6 tokens, far apart: token 5 is impossible under p_t but likely under p_d,
    token 0 is impossible under p_d, so both the acceptance test and the residual matter."""
    dirichlet = torch.distributions.Dirichlet(torch.ones(V))
    torch.manual_seed(1234)
    p_t = dirichlet.sample((GAMMA + 1,))
    p_d = dirichlet.sample((GAMMA,))
    p_t[:, 5] = 0.0
    p_d[:, 0] = 0.0
    p_d[0, 5] += 0.3
    p_t = p_t / p_t.sum(-1, keepdim=True)
    p_d = p_d / p_d.sum(-1, keepdim=True)
    return p_t, p_d


def draw_first_tokens(verifier, p_t, p_d, n, seed):
    gen = torch.Generator().manual_seed(seed)
    drafts = sample(p_d.expand(n, *p_d.shape), gen)  # (n, GAMMA): one token from each drafter row
    counts = Counter()
    for draft in drafts:
        verdict = verifier(draft, p_d, p_t, gen)
        counts[int(draft[0]) if verdict.n_accepted else verdict.next_token] += 1
    return [counts[x] for x in range(p_t.shape[-1])]


def test_first_emitted_token_follows_target(single_position, chi2_gof):
    """20000 draws of the first emitted token of a 3-token chain; chi-square vs p_t[0], alpha 0.001."""
    p_t, p_d = single_position
    assert 0.5 * (p_t[0] - p_d[0]).abs().sum() > 0.3  # a real gap between drafter and target
    counts = draw_first_tokens(verify_chain, p_t, p_d, N_FIRST, seed=0)
    fit = chi2_gof(counts, p_t[0].tolist())
    assert counts[5] == 0, "emitted a token the target gives probability 0"
    assert not fit.rejects(ALPHA), f"chi-square {fit.statistic:.1f} on {fit.df} df, p = {fit.p_value:.2e}"


@pytest.mark.parametrize("verifier", WRONG_FIRST_TOKEN, ids=lambda f: f.__name__)
def test_first_token_test_rejects_wrong_verifier(single_position, chi2_gof, verifier):
    """Power: the same 20000-draw chi-square test at alpha 0.001 rejects a wrong verifier."""
    p_t, p_d = single_position
    counts = draw_first_tokens(verifier, p_t, p_d, N_FIRST, seed=0)
    fit = chi2_gof(counts, p_t[0].tolist())
    assert fit.rejects(ALPHA), f"chi-square {fit.statistic:.1f} on {fit.df} df did not reject {verifier.__name__}"


def test_first_token_when_drafter_equals_target_always_accepts(single_position):
    """p_d = p_t: the ratio is 1, so every draft is accepted and the bonus comes from p_t[k]."""
    p_t, _ = single_position
    gen = torch.Generator().manual_seed(5)
    for _ in range(200):
        draft = sample(p_t[:GAMMA], gen)
        assert verify_chain(draft, p_t[:GAMMA].clone(), p_t, gen).n_accepted == GAMMA


# ----------------------------------------------------------------------------------------------------
# the first three emitted tokens of a toy autoregressive "model"


class MarkovToy:
    """A toy language model on 4 tokens whose next-token distribution depends on the previous token:
    P_t[a, b] = p_t(b | a) for the target and P_d for the drafter. Context starts at token 0."""

    v = 4

    def __init__(self, seed: int = 7):
        torch.manual_seed(seed)
        dirichlet = torch.distributions.Dirichlet(torch.full((self.v,), 0.8))
        self.P_t = dirichlet.sample((self.v,))
        self.P_d = 0.5 * dirichlet.sample((self.v,)) + 0.5 * self.P_t.roll(1, dims=1)
        self._d_cdf = [list(itertools.accumulate(row.tolist())) for row in self.P_d]

    def draft_token(self, prev: int, rng: random.Random) -> int:
        """One draw from P_d[prev] by inverting its CDF (fast, and exact up to float rounding)."""
        cdf = self._d_cdf[prev]
        return min(bisect.bisect_right(cdf, rng.random() * cdf[-1]), self.v - 1)

    def exact(self, length: int) -> dict[tuple[int, ...], float]:
        out = {}
        for seq in itertools.product(range(self.v), repeat=length):
            p, prev = 1.0, 0
            for tok in seq:
                p *= float(self.P_t[prev, tok])
                prev = tok
            out[seq] = p
        return out

    def emit(self, verifier, length: int, gamma: int, rng: random.Random,
             gen: torch.Generator) -> tuple[int, ...]:
        """Speculative decoding of `length` tokens: draft gamma from P_d, verify against P_t rows."""
        out, prev = [], 0
        while len(out) < length:
            tokens, x = [], prev
            for _ in range(gamma):
                x = self.draft_token(x, rng)
                tokens.append(x)
            d_rows = self.P_d[[prev] + tokens[:-1]]  # p_d each draft was drawn from
            t_rows = self.P_t[[prev] + tokens]  # p_t after the context and after each draft
            verdict = verifier(torch.tensor(tokens), d_rows, t_rows, gen)
            out += tokens[:verdict.n_accepted] + [verdict.next_token]
            prev = out[-1]
        return tuple(out[:length])


def draw_joint(verifier, n: int, seed: int, length: int = 3, gamma: int = 2):
    toy = MarkovToy()
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    counts = Counter(toy.emit(verifier, length, gamma, rng, gen) for _ in range(n))
    exact = toy.exact(length)
    seqs = list(exact)
    return [counts[s] for s in seqs], [exact[s] for s in seqs]


def test_first_three_emitted_tokens_follow_target(chi2_gof):
    """8000 draws of the first 3 emitted tokens (64 sequences; chains of 2 drafts, so acceptance,
    residual and bonus all occur within and across rounds); chi-square against the exact product of
    target conditionals, alpha 0.001."""
    counts, probs = draw_joint(verify_chain, N_JOINT, seed=0)
    fit = chi2_gof(counts, probs)
    assert fit.n_cells > 20
    assert not fit.rejects(ALPHA), f"chi-square {fit.statistic:.1f} on {fit.df} df, p = {fit.p_value:.2e}"


@pytest.mark.parametrize("verifier", WRONG_JOINT, ids=lambda f: f.__name__)
def test_three_token_test_rejects_wrong_verifier(chi2_gof, verifier):
    """Power: the same 8000-draw, alpha 0.001 test rejects each wrong verifier, including one whose
    first token is right but whose bonus token comes from the wrong target row."""
    counts, probs = draw_joint(verifier, N_JOINT, seed=0)
    fit = chi2_gof(counts, probs)
    assert fit.rejects(ALPHA), f"chi-square {fit.statistic:.1f} on {fit.df} df did not reject {verifier.__name__}"


def test_residual_mass_completes_acceptance_exactly():
    """The algebra the tests above rely on, exactly: P(emit x) = min(p_d, p_t)(x) + (1 - beta) r(x)
    equals p_t(x), where beta = sum min(p_d, p_t) and r the residual."""
    torch.manual_seed(0)
    for _ in range(50):
        p_t, p_d = torch.distributions.Dirichlet(torch.ones(V)).sample((2,)).double()
        beta = torch.minimum(p_t, p_d).sum()
        emitted = torch.minimum(p_t, p_d) + (1 - beta) * residual(p_t, p_d)
        torch.testing.assert_close(emitted, p_t)
