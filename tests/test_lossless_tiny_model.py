"""Lossless on a tiny random model: sampled speculative sequences are distributed as the target's.

A random 2-layer Llama over 8 tokens is the target; its first layer (LayerSkipDrafter, n_layers=1,
gamma=3, never stopping early) is the drafter, so p_d is a real, non-one-hot distribution that
differs from p_t (about half the drafts are rejected). `generate` samples 4 new tokens per seed:
the first from prefill, the rest in rounds of up to 2 drafts, so acceptance, rejection with the
residual, the bonus token, cache cropping and a further round all occur. The exact target
probability of each of the 8^4 sequences is computed by enumeration with the model itself (one
batched forward, no cache), and a Pearson chi-square test (cells with expected count < 5 pooled)
compares the two at alpha = 0.001. Seeds are fixed (generate's seed = draw index), so each test is
deterministic; a correct decoder would fail a fresh set of seeds with probability 0.001.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

import labkit.decode.loop
import labkit.core.sampling
from labkit.decode.loop import generate
from labkit.drafters.layer_skip import LayerSkipConfig, LayerSkipDrafter
from labkit.core.sampling import SamplingParams, logits_to_probs

ALPHA = 0.001
VOCAB = 8
NEW_TOKENS = 4
PROMPT = [1, 5, 2, 7, 3]

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.inference_mode()
def exact_sequence_probs(target, prompt: list[int], length: int, params: SamplingParams) -> dict:
    """P_target(new tokens = s) for every s in V^length, from one uncached forward of all prefixes."""
    v = target.vocab_size
    prefixes = list(itertools.product(range(v), repeat=length - 1))
    ids = torch.tensor([prompt + list(p) for p in prefixes])
    logits = target.model(input_ids=ids).logits[:, len(prompt) - 1:, :]  # (B, length, V)
    probs = logits_to_probs(logits, params).double()
    out = {}
    for b, prefix in enumerate(prefixes):
        p_prefix = 1.0
        for j, tok in enumerate(prefix):
            p_prefix *= float(probs[b, j, tok])
        for last in range(v):
            out[prefix + (last,)] = p_prefix * float(probs[b, length - 1, last])
    return out


def sample_sequences(target, drafter, params: SamplingParams, n: int) -> tuple[Counter, float]:
    counts, accepted, proposed = Counter(), 0, 0
    for seed in range(n):
        result = generate(target, PROMPT, drafter, max_new_tokens=NEW_TOKENS, params=params, seed=seed)
        counts[tuple(result.token_ids)] += 1
        accepted += sum(r.accepted for r in result.rounds)
        proposed += sum(r.proposed for r in result.rounds)
    return counts, accepted / max(proposed, 1)


def assert_sequences_follow_target(target, drafter, chi2_gof, n: int = 1500) -> None:
    """n sequences of NEW_TOKENS tokens at temperature 1 after PROMPT, drafted by `drafter`: the drafts
    must be sometimes accepted and sometimes not, and the chi-square against the exact target
    distribution must not reject at ALPHA (a trained-drafter form of the test below)."""
    params = SamplingParams(1.0)
    exact = exact_sequence_probs(target, PROMPT, NEW_TOKENS, params)
    counts, acceptance = sample_sequences(target, drafter, params, n)
    assert 0.05 < acceptance < 0.95, f"acceptance {acceptance:.2f}: the drafter must differ from the target"
    seqs = list(exact)
    fit = chi2_gof([counts[s] for s in seqs], [exact[s] for s in seqs])
    assert fit.impossible == 0
    assert not fit.rejects(ALPHA), f"chi-square {fit.statistic:.1f} on {fit.df} df, p = {fit.p_value:.2e}"


CASES = {  # name: (temperature, top_p, tied embeddings, weight std, draws)
    "t1.0-tied": (1.0, 1.0, True, 0.5, 1500),
    # flatter weights, so that at temperature 0.7 the top-0.8 nucleus still leaves ~60 sequences
    "t0.7-top_p0.8-untied": (0.7, 0.8, False, 0.2, 1200),
}


def run_case(make_tiny_target, chi2_gof, case: str):
    temperature, top_p, tied, init, n_draws = CASES[case]
    target = make_tiny_target(vocab_size=VOCAB, n_layers=2, tied=tied, init=init)
    drafter = LayerSkipDrafter(target, LayerSkipConfig(n_layers=1, gamma=3, stop_below=0.0))
    params = SamplingParams(temperature, top_p)
    exact = exact_sequence_probs(target, PROMPT, NEW_TOKENS, params)
    assert sum(exact.values()) == pytest.approx(1.0, abs=1e-6)
    counts, acceptance = sample_sequences(target, drafter, params, n_draws)
    assert 0.1 < acceptance < 0.9, f"acceptance {acceptance:.2f}: the drafter must differ from the target"
    seqs = list(exact)
    return chi2_gof([counts[s] for s in seqs], [exact[s] for s in seqs])


@pytest.mark.parametrize("case", list(CASES))
def test_sampled_sequences_follow_target(make_tiny_target, chi2_gof, case):
    """1500 (temperature 1) or 1200 (temperature 0.7, top-p 0.8) sequences of 4 new tokens from
    speculative decoding with a layer-skip drafter; chi-square against the exact target distribution
    over the 4096 sequences, alpha 0.001."""
    fit = run_case(make_tiny_target, chi2_gof, case)
    assert fit.impossible == 0, "emitted a sequence the target (after top-p) gives probability 0"
    assert fit.df >= 10
    assert not fit.rejects(ALPHA), f"chi-square {fit.statistic:.1f} on {fit.df} df, p = {fit.p_value:.2e}"


def test_sequence_test_rejects_decoder_that_resamples_target(make_tiny_target, chi2_gof, monkeypatch):
    """Power on the real decoding path: with verify_chain swapped for one that resamples p_t instead
    of the residual after a rejection, the same 1500-draw, alpha 0.001 test (temperature 1) rejects."""

    def resample_target(draft, p_d, p_t, generator=None):
        verdict = labkit.core.sampling.verify_chain(draft, p_d, p_t, generator)
        if verdict.n_accepted < draft.shape[0]:
            return labkit.core.sampling.Verdict(verdict.n_accepted,
                                           int(labkit.core.sampling.sample(p_t[verdict.n_accepted], generator)))
        return verdict

    monkeypatch.setattr(labkit.decode.loop, "verify_chain", resample_target)
    fit = run_case(make_tiny_target, chi2_gof, "t1.0-tied")
    assert fit.rejects(ALPHA), f"chi-square {fit.statistic:.1f} on {fit.df} df did not reject"
