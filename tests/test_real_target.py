"""Lossless on the real default target, SmolLM2-135M-Instruct in fp32 on the CPU.

Greedy: speculative output equals the lab's AR output and HF `generate(do_sample=False)` token for
token, for chat prompts and both built-in drafters. Sampled: the first token emitted by chain
verification with a real layer-skip draft follows the model's own next-token distribution (chi-square,
alpha 0.001). Loads the model once for the module; skipped if the default target is not installed.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from labkit.decode.loop import generate, prefill
from labkit.drafters import LayerSkipConfig, LayerSkipDrafter, make_drafter
from labkit.core.sampling import SamplingParams, Verdict, logits_to_probs, sample, verify_chain
from labkit.core.trace import mean_tau

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

NEW_TOKENS = 32
PROMPTS = [
    "Repeat this sentence exactly twice: the quick brown fox jumps over the lazy dog.",
    "Write a Python function that returns the sum of a list of numbers.",
    "What is 12 + 35? Answer in one sentence.",
    "List the days of the week, one per line.",
]
ALPHA = 0.001
N_DRAWS = 10_000


@pytest.fixture(scope="module")
def prompt_ids(real_target):
    return [real_target.encode_prompt(text) for text in PROMPTS]


@pytest.fixture(scope="module")
def ar_outputs(real_target, prompt_ids):
    return [generate(real_target, ids, None, NEW_TOKENS).token_ids for ids in prompt_ids]


def test_chat_prompts_go_through_the_template(real_target, prompt_ids):
    text = real_target.tokenizer.decode(prompt_ids[0])
    assert "<|im_start|>user" in text and text.rstrip().endswith("<|im_start|>assistant")


@torch.inference_mode()
def test_lab_ar_greedy_equals_hf_generate(real_target, prompt_ids, ar_outputs):
    for ids, ar in zip(prompt_ids, ar_outputs):
        x = torch.tensor([ids])
        out = real_target.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                                         do_sample=False, temperature=None, top_p=None, top_k=None,
                                         pad_token_id=real_target.tokenizer.pad_token_id)
        assert out[0, len(ids):].tolist() == ar
        assert len(ar) == NEW_TOKENS or ar[-1] in real_target.eos_token_ids


@pytest.mark.parametrize("spec", ["prompt-lookup", "layer-skip", "dflash", "dspark", "mtp1"])
def test_greedy_speculative_equals_ar(real_target, prompt_ids, ar_outputs, spec):
    drafter = make_drafter(spec, real_target)
    proposed = 0
    for ids, ar in zip(prompt_ids, ar_outputs):
        result = generate(real_target, ids, drafter, NEW_TOKENS)
        assert result.token_ids == ar, f"{spec} on {real_target.decode(ids)!r}"
        proposed += sum(r.proposed for r in result.rounds)
    assert proposed > 0, f"{spec} proposed nothing: the test exercised no verification"


def first_token_counts(verifier, p_t: torch.Tensor, p_d: torch.Tensor, n: int, seed: int) -> Counter:
    gen = torch.Generator().manual_seed(seed)
    drafts = sample(p_d.expand(n, -1), gen)
    rows_t = torch.stack([p_t, p_t])  # row 1 (the bonus row) never decides the first token
    counts = Counter()
    for draft in drafts:
        verdict = verifier(draft.view(1), p_d.view(1, -1), rows_t, gen)
        counts[int(draft) if verdict.n_accepted else verdict.next_token] += 1
    return counts


def next_token_pair(target, drafter, params: SamplingParams, prompt: str = "Write a short poem about the sea."):
    """p_t and the drafter's p_d for the token after the first new one, on the union of their supports
    (exact for these tests: verification never emits a token both give probability 0)."""
    ids = target.encode_prompt(prompt)
    state = prefill(target, ids, 8, params, seed=0, drafter=drafter)
    p_d = drafter.propose(state.request, 1).probs[0]
    logits, _ = target.forward([state.ids[-1]], state.cache)
    p_t = logits_to_probs(logits[-1], params)
    support = ((p_t > 0) | (p_d > 0)).nonzero().view(-1)
    return p_t[support], p_d[support], support


def verify_resample_target(draft, p_d, p_t, generator=None) -> Verdict:
    """Wrong on purpose: after a rejection it samples p_t instead of the residual."""
    verdict = verify_chain(draft, p_d, p_t, generator)
    if verdict.n_accepted == 0:
        return Verdict(0, int(sample(p_t[0], generator)))
    return verdict


def test_real_next_token_distribution_with_layer_skip_draft(real_target, chi2_gof):
    """10000 first emitted tokens at temperature 1, top-p 0.9, drafted by the target's first 29 of 30
    layers (the default 8 layers put almost no mass where the target does); chi-square against the
    model's p_t at alpha 0.001. The same test rejects a verifier that resamples p_t instead of the
    residual. p_t and p_d are restricted to the union of their supports (exact: verification never
    emits a token both give probability 0), which keeps each draw cheap."""
    params = SamplingParams(1.0, 0.9)
    drafter = LayerSkipDrafter(real_target, LayerSkipConfig(n_layers=real_target.num_layers - 1, gamma=1,
                                                           stop_below=0.0))
    # the first of these contexts where the draft is neither almost always accepted nor almost never (the
    # context ends in a token sampled with seed 0, so the sampler decides which; the prompts are fixed, so
    # the choice is too)
    for prompt in ("Write a short poem about the sea.", "What do you like about autumn?"):
        p_t, p_d, support = next_token_pair(real_target, drafter, params, prompt)
        acceptance = torch.minimum(p_t, p_d).sum().item()
        if 0.1 < acceptance < 0.9:
            break
    assert 0.1 < acceptance < 0.9, f"acceptance {acceptance:.2f}: need both accepted and rejected drafts"

    counts = first_token_counts(verify_chain, p_t, p_d, N_DRAWS, seed=0)
    fit = chi2_gof([counts[i] for i in range(len(support))], p_t.tolist())
    assert fit.impossible == 0, "emitted a token outside the target's top-p nucleus"
    assert fit.df >= 5
    assert not fit.rejects(ALPHA), f"chi-square {fit.statistic:.1f} on {fit.df} df, p = {fit.p_value:.2e}"

    wrong = first_token_counts(verify_resample_target, p_t, p_d, N_DRAWS, seed=0)
    assert chi2_gof([wrong[i] for i in range(len(support))], p_t.tolist()).rejects(ALPHA)


@pytest.mark.parametrize("name", ["dflash", "dspark", "mtp1"])
def test_shipped_drafter_is_small_matches_the_target_and_says_how_it_was_made(real_target, name):
    from labkit.drafters import shipped_checkpoint
    from labkit.drafters.checkpoint import read_config
    path = shipped_checkpoint(name)
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 60e6, f"{size / 1e6:.0f} MB: the shipped drafter must stay small"
    cfg = read_config(path)
    assert cfg["target_vocab_size"] == real_target.vocab_size and cfg["target_num_layers"] == real_target.num_layers
    assert cfg["extra"]["train_command"].startswith("python -m labkit train")
    assert (path / "metrics.jsonl").exists()
    assert cfg["kind"] == ("dflash" if name == "mtp1" else name)


def test_shipped_mtp1_is_a_one_token_dflash_with_the_shipped_recipe():
    """The serving baseline's MTP module: block size 1 with the anchor predicting, the shipped DFlash's
    shape, draft vocabulary size, steps and anchors (its data is a subset: data/README.md says why)."""
    from labkit.drafters import shipped_checkpoint
    from labkit.drafters.checkpoint import read_config
    flash, mtp = read_config(shipped_checkpoint("dflash")), read_config(shipped_checkpoint("mtp1"))
    assert mtp["gamma"] == 1 and mtp["anchor_predicts"] and mtp["kind"] == "dflash"
    for key in ("n_layers", "target_layers", "draft_vocab", "hidden_size", "intermediate_size"):
        assert flash[key] == mtp[key], key
    for key in ("step", "anchors"):
        assert flash["extra"][key] == mtp["extra"][key], key
    assert set(mtp["extra"]["data_folders"]) == set(flash["extra"]["data_folders"])


def test_shipped_dspark_is_comparable_to_dflash_and_calibrated():
    """Same data, steps and depth as the shipped DFlash drafter (a fair comparison), and STS temperatures
    fitted for greedy and temperature-1 decoding, one per position, on held-out rounds."""
    from labkit.drafters import shipped_checkpoint
    from labkit.drafters.checkpoint import read_config
    flash, spark = read_config(shipped_checkpoint("dflash")), read_config(shipped_checkpoint("dspark"))
    for key in ("n_layers", "gamma", "target_layers", "draft_vocab", "hidden_size"):
        assert flash[key] == spark[key], key
    for key in ("step", "anchors", "data_sequences", "data_response_tokens"):
        assert flash["extra"][key] == spark["extra"][key], key
    for key in ("greedy", "T=1"):
        fit = spark["calibration"][key]
        assert len(fit["temperatures"]) == spark["gamma"] and all(t > 0 for t in fit["temperatures"])
        assert fit["rounds"] > 0


@pytest.mark.parametrize("name", ["dflash", "dspark", "mtp1"])
def test_shipped_drafter_drafts_better_than_chance(real_target, prompt_ids, name):
    """The shipped drafter is trained: over the test prompts it keeps more than one token a round."""
    drafter = make_drafter(name, real_target)
    rounds = [r for ids in prompt_ids for r in generate(real_target, ids, drafter, NEW_TOKENS).rounds]
    tau = mean_tau(rounds)
    assert tau > 1.3, f"{name}: tau {tau:.2f}"


@pytest.mark.parametrize("name", ["dflash", "dspark"])
def test_real_sampled_decoding_with_trained_drafter_follows_target(real_target, chi2_gof, name):
    """10000 first emitted tokens at temperature 1 drafted by a shipped drafter (its real p_d, zero
    outside its draft vocabulary; DSpark's includes the Markov head's bias from the anchor); chi-square
    against the model's p_t at alpha 0.001, on the union of the two supports, as the layer-skip test above."""
    params = SamplingParams(1.0, 0.9)
    drafter = make_drafter(name, real_target)
    # the first of these contexts where the draft is neither almost always accepted nor almost never
    # (the test needs both outcomes to have power); the prompts are fixed, so the choice is too
    for prompt in ("Write a short poem about the sea.", "Give three tips for staying healthy.",
                   "What do you like about autumn?"):
        p_t, p_d, support = next_token_pair(real_target, drafter, params, prompt)
        acceptance = torch.minimum(p_t, p_d).sum().item()
        if 0.05 < acceptance < 0.95:
            break
    assert 0.05 < acceptance < 0.95, f"acceptance {acceptance:.2f}: need both accepted and rejected drafts"
    counts = first_token_counts(verify_chain, p_t, p_d, N_DRAWS, seed=1)
    fit = chi2_gof([counts[i] for i in range(len(support))], p_t.tolist())
    assert fit.impossible == 0
    assert not fit.rejects(ALPHA), f"chi-square {fit.statistic:.1f} on {fit.df} df, p = {fit.p_value:.2e}"


JOINT_N, JOINT_MIN_DF = 400, 4


def exact_joint(target, ids: list[int], params: SamplingParams, length: int) -> dict[tuple, float]:
    """P_target(the first `length` new tokens = s) for every s in the top-k support, position by position."""
    out = {(): 1.0}
    for _ in range(length):
        nxt = {}
        for prefix, p in out.items():
            with torch.no_grad():
                logits = target.model(input_ids=torch.tensor([ids + list(prefix)])).logits[0, -1]
            probs = logits_to_probs(logits.float(), params).double()
            for tok in probs.nonzero().view(-1).tolist():
                nxt[prefix + (tok,)] = p * float(probs[tok])
        out = nxt
    return out


def test_real_sampled_generate_follows_the_targets_joint_of_three_tokens(real_target, chi2_gof):
    """Sampled decoding through `generate` with the shipped DSpark (gamma 2, so one round drafts the
    second and third tokens, each from the drafter's real p_d): JOINT_N runs of 3 new tokens at
    temperature 1, top-k 3 (27 sequences, exact probabilities from the model); chi-square at ALPHA with at
    least JOINT_MIN_DF degrees of freedom after pooling. The wrong-verifier controls live with the tiny
    models (tests/test_serving.py, tests/test_lossless_tiny_model.py), where the exact joint is cheap."""
    params = SamplingParams(1.0, top_k=3)
    drafter = make_drafter("dspark", real_target, gamma=2)
    ids = real_target.encode_prompt("Write a short poem about the sea.")
    exact = exact_joint(real_target, ids, params, 3)
    counts, drafted = Counter(), 0
    for seed in range(JOINT_N):
        result = generate(real_target, ids, drafter, 3, params, seed)
        counts[tuple(result.token_ids)] += 1
        drafted += sum(r.proposed for r in result.rounds)
    assert drafted >= JOINT_N, "the drafter proposed too little for the test to exercise verification"
    seqs = list(exact)
    fit = chi2_gof([counts[s] for s in seqs], [exact[s] for s in seqs], min_df=JOINT_MIN_DF)
    assert fit.impossible == 0 and sum(counts[s] for s in seqs) == JOINT_N
    assert not fit.rejects(ALPHA), f"chi-square {fit.statistic:.1f} on {fit.df} df, p = {fit.p_value:.2e}"
