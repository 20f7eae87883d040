"""Lossless on the second real target, Gemma 3 270M (base model, no chat template, 262144-token
vocabulary, sliding-window layers), fp32 on the CPU: the same properties as test_real_target.py for
SmolLM2, with no architecture-specific code in the loop.

Greedy: the lab's AR loop equals HF `generate(do_sample=False)`, and speculative output equals it for
the training-free drafters and for the drafters trained for Gemma 3 with the lab's own commands
(shipped under data/drafters/gemma-3-270m/). Sampled: the first token emitted by chain verification
follows the model's next-token distribution (chi-square, alpha 0.001), with a layer-skip draft and
with the trained DSpark drafter. Loads the model once for the module; skipped if it is not set up
(`python -m labkit setup --target gemma3-270m`; scripts/test.sh does it).
"""

from __future__ import annotations

import pytest
import torch

from labkit.decode.loop import generate
from labkit.drafters import LayerSkipConfig, LayerSkipDrafter, make_drafter
from labkit.core.errors import LabkitError
from labkit.core.sampling import SamplingParams, verify_chain
from labkit.model.target import PLAIN_PROMPT, load_target
from test_real_target import ALPHA, N_DRAWS, first_token_counts, next_token_pair, verify_resample_target

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

NEW_TOKENS = 24
PROMPTS = [
    "Write a Python function that returns the sum of a list of numbers.",
    "What is 12 + 35?",
    "List the days of the week, one per line.",
]


@pytest.fixture(scope="module")
def gemma(one_thread):
    try:
        return load_target("gemma3-270m")
    except LabkitError as exc:
        pytest.skip(f"Gemma 3 270M is not set up ({exc})")


@pytest.fixture(scope="module")
def prompt_ids(gemma):
    return [gemma.encode_prompt(text) for text in PROMPTS]


@pytest.fixture(scope="module")
def ar_outputs(gemma, prompt_ids):
    return [generate(gemma, ids, None, NEW_TOKENS).token_ids for ids in prompt_ids]


def test_the_adapter_derives_what_the_model_is(gemma, prompt_ids):
    """Shape, vocabulary, prompt format and cache come from the model, not from code for Gemma."""
    assert (gemma.name, gemma.num_layers, gemma.vocab_size, gemma.hidden_size) == ("gemma-3-270m", 18, 262144, 640)
    assert not gemma.has_chat_template
    assert gemma.tokenizer.decode(prompt_ids[1]) == "<bos>" + PLAIN_PROMPT.format(prompt=PROMPTS[1])
    assert any(t == "sliding_attention" for t in gemma.config.layer_types)
    assert not any(getattr(layer, "is_sliding", False) for layer in gemma.new_cache().layers)


@torch.inference_mode()
def test_lab_ar_greedy_equals_hf_generate(gemma, prompt_ids, ar_outputs):
    for ids, ar in zip(prompt_ids, ar_outputs):
        x = torch.tensor([ids])
        out = gemma.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                                   do_sample=False, pad_token_id=gemma.pad_token_id)
        assert out[0, len(ids):].tolist() == ar


@pytest.mark.parametrize("spec", ["prompt-lookup", "layer-skip:12", "dflash", "dspark", "hybrid:dspark"])
def test_greedy_speculative_equals_ar(gemma, prompt_ids, ar_outputs, spec):
    drafter = make_drafter(spec, gemma)
    proposed = 0
    for ids, ar in zip(prompt_ids, ar_outputs):
        result = generate(gemma, ids, drafter, NEW_TOKENS)
        assert result.token_ids == ar, f"{spec} on {gemma.decode(ids)!r}"
        proposed += sum(r.proposed for r in result.rounds)
    assert proposed > 0, f"{spec} proposed nothing: the test exercised no verification"


def assert_first_token_follows_target(gemma, drafter, chi2_gof, prompts, band: float, seed: int,
                                      min_df: int = 1) -> None:
    """10000 first emitted tokens at temperature 1, top-p 0.9, on the first prompt whose acceptance lies
    in (band, 1 - band) (the test needs both outcomes) and whose p_t leaves more than `min_df` cells of
    at least 5 expected draws (the test needs the degrees of freedom it asserts); chi-square against p_t at alpha 0.001 on the
    union of the two supports. The same draws through a verifier that resamples p_t instead of the
    residual must be rejected, or the test had no power."""
    params = SamplingParams(1.0, 0.9)
    for prompt in prompts:  # the context ends in a sampled token, so the sampler decides which prompt serves
        p_t, p_d, support = next_token_pair(gemma, drafter, params, prompt)
        acceptance = torch.minimum(p_t, p_d).sum().item()
        if band < acceptance < 1 - band and int((p_t * N_DRAWS >= 5).sum()) > min_df:
            break
    assert band < acceptance < 1 - band, f"acceptance {acceptance:.2f}: need both accepted and rejected drafts"
    counts = first_token_counts(verify_chain, p_t, p_d, N_DRAWS, seed=seed)
    fit = chi2_gof([counts[i] for i in range(len(support))], p_t.tolist())
    assert fit.impossible == 0 and fit.df >= min_df
    assert not fit.rejects(ALPHA), f"chi-square {fit.statistic:.1f} on {fit.df} df, p = {fit.p_value:.2e}"
    wrong = first_token_counts(verify_resample_target, p_t, p_d, N_DRAWS, seed=seed)
    assert chi2_gof([wrong[i] for i in range(len(support))], p_t.tolist()).rejects(ALPHA), \
        "the test has no power here: it accepts a verifier that resamples p_t instead of the residual"


SAMPLED_PROMPTS = ("Write a short poem about the sea.", "Give three tips for staying healthy.",
                   "Explain what a prime number is.")


def test_next_token_distribution_with_layer_skip_draft(gemma, chi2_gof):
    """Drafted by the first 12 of 18 layers."""
    drafter = LayerSkipDrafter(gemma, LayerSkipConfig(n_layers=12, gamma=1, stop_below=0.0))
    assert_first_token_follows_target(gemma, drafter, chi2_gof, SAMPLED_PROMPTS, band=0.1, seed=0, min_df=5)


# Open questions whose next token is spread over many words, so the test has power (about 50-220
# degrees of freedom at 10000 draws) where a rejected draft is resampled from the residual.
OPEN_PROMPTS = ("What is your favorite food?", "Give me a random word.", "Tell me a story.",
                "What should I cook tonight?")


def test_next_token_distribution_with_the_trained_dspark(gemma, chi2_gof):
    """With the trained DSpark drafter's real p_d (zero outside its draft vocabulary)."""
    assert_first_token_follows_target(gemma, make_drafter("dspark", gemma), chi2_gof, OPEN_PROMPTS,
                                      band=0.1, seed=1, min_df=20)
