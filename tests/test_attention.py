"""Grouped-query attention without the KV copy (labkit.model.attention): the logits of every chunk size equal
transformers' SDPA path to fp32 rounding on Llama, Gemma 3 (sliding window) and Qwen3, a batch with
padding included; greedy decoding, solo and in the batched engine, gives the stock model's tokens; the
real target's greedy speculative output equals HF generate on the stock model."""

from __future__ import annotations

import pytest
import torch

from labkit import generate, make_drafter
from labkit.model.attention import NAME, grouped_sdpa, use_grouped_sdpa
from labkit.core.sampling import SamplingParams
from labkit.model.target import Target, load_target
from test_architectures import ARCHS, dspark, serve_greedy, tiny_model, tiny_target

from conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

#: relative fp32 tolerance on logits: only the order of a sum may differ, a few ulps per layer
REL_TOL = 1e-5


def chunk_logits(target: Target, ids: list[int], steps: list[int]) -> list[torch.Tensor]:
    """Logits of a prompt, then of each chunk of `steps` tokens over the growing cache."""
    cache = target.new_cache()
    out = [target.forward(ids, cache, logits_to_keep=len(ids))[0]]
    pos = 0
    for k in steps:
        chunk = [(5 * (pos + j) + 2) % target.vocab_size for j in range(k)]
        out.append(target.forward(chunk, cache, logits_to_keep=k)[0])
        pos += k
    return out


def pair(arch: str) -> tuple[Target, Target]:
    stock, grouped = tiny_target(arch), tiny_target(arch)
    assert use_grouped_sdpa(grouped.model) and grouped.model.config._attn_implementation == NAME
    return stock, grouped


@pytest.mark.parametrize("arch", ARCHS)
def test_grouped_attention_gives_the_stock_logits_for_every_chunk_size(arch):
    stock, grouped = pair(arch)
    ids = [3, 1, 4, 1, 5, 9, 2]
    for a, b in zip(chunk_logits(stock, ids, [1, 2, 4, 9, 16, 1]), chunk_logits(grouped, ids, [1, 2, 4, 9, 16, 1])):
        assert (a - b).abs().max() <= REL_TOL * a.abs().max()


def test_grouped_attention_is_the_path_actually_taken(monkeypatch):
    """A multi-token forward over a cache runs the grouped product, not transformers' repeat_kv."""
    import labkit.model.attention as attention
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, *args, **kwargs):
        calls.append((q.shape[1], k.shape[1]))
        return real_sdpa(q, k, *args, **kwargs)

    monkeypatch.setattr(attention.torch.nn.functional, "scaled_dot_product_attention", spy)
    _, grouped = pair("llama")
    cache = grouped.new_cache()
    grouped.forward([1, 2, 3], cache)
    calls.clear()
    grouped.forward([4, 5, 6, 7], cache, logits_to_keep=4)
    assert calls and all(q_heads == kv_heads == 1 for q_heads, kv_heads in calls)  # 2 heads folded onto 1


def test_a_padded_batch_gives_the_stock_logits():
    """Left padding through a 2-D attention mask: per-row masks reach the grouped product."""
    stock, grouped = pair("gemma3")
    ids = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10])
    with torch.inference_mode():
        a = stock.model(input_ids=ids, attention_mask=mask).logits
        b = grouped.model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert (a[keep] - b[keep]).abs().max() <= REL_TOL * a[keep].abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_speculative_greedy_on_grouped_attention_equals_the_stock_model(arch):
    stock, grouped = pair(arch)
    prompt = [1, 5, 2, 7, 3]
    ref = generate(stock, prompt, None, 24).token_ids
    assert generate(grouped, prompt, dspark(grouped), 24).token_ids == ref


def test_the_batched_engine_on_grouped_attention_serves_the_stock_tokens():
    stock, grouped = pair("gemma3")
    for req, served in serve_greedy(grouped, dspark(grouped), 5):
        assert served == generate(stock, req.prompt_ids, None, req.max_new_tokens).token_ids


def test_models_without_groups_or_sdpa_are_left_alone():
    plain = tiny_llama(vocab_size=16, heads=2)  # as many K/V heads as query heads
    assert not use_grouped_sdpa(plain) and plain.config._attn_implementation == "sdpa"
    eager = tiny_model("llama")
    eager.set_attn_implementation("eager")
    assert not use_grouped_sdpa(eager) and eager.config._attn_implementation == "eager"


def test_one_new_token_and_training_go_through_transformers():
    """The cases it does not cover fall back to transformers' own function (same result as stock)."""
    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    q, k, v = torch.randn(1, 2, 1, 16), torch.randn(1, 1, 6, 16), torch.randn(1, 1, 6, 16)
    mask = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    assert torch.equal(grouped_sdpa(attn, q, k, v, mask, scaling=0.25)[0],
                       sdpa_attention_forward(attn, q, k, v, mask, scaling=0.25)[0])


@pytest.mark.slow
def test_real_target_grouped_greedy_equals_hf_generate_on_the_stock_model():
    try:
        stock = load_target(grouped=False)
    except Exception as exc:  # noqa: BLE001 - the default target is not installed
        pytest.skip(str(exc))
    grouped = load_target()  # the CPU default
    assert grouped.grouped and not stock.grouped
    drafters = [make_drafter(spec, grouped) for spec in ("prompt-lookup", "dspark", "hybrid:dspark")]
    for text in ["What is 7 * 8? Explain.", "Write a Python function that reverses a string.",
                 "Give three tips for a first trip to Japan."]:
        ids = grouped.encode_prompt(text)
        ref = stock.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   do_sample=False, max_new_tokens=48, pad_token_id=stock.pad_token_id)
        ref_ids = ref[0, len(ids):].tolist()
        for drafter in drafters:
            assert generate(grouped, ids, drafter, len(ref_ids), SamplingParams(0.0)).token_ids == ref_ids
        verified = []
        for t in (stock, grouped):  # a 9-token verify forward over the cached prompt
            cache = t.new_cache()
            t.forward(ids, cache)
            verified.append(t.forward(ref_ids[:9], cache, logits_to_keep=9)[0])
        assert (verified[0] - verified[1]).abs().max() <= REL_TOL * verified[0].abs().max()
