"""Pre-packed linear layers (labkit.model.packed): same logits as the stock kernels to fp32 rounding, same
greedy text as HF generate on the stock model, nothing else about the model changed."""

from __future__ import annotations

import pytest
import torch

from labkit import generate, make_drafter
from labkit.model.packed import PackedLinear, can_pack, pack_linears
from labkit.core.sampling import SamplingParams
from labkit.model.target import Target, load_target

from conftest import ToyTokenizer, tiny_llama

pytestmark = pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.float32),
                                reason="torch was built without oneDNN")

#: fp32 tolerance on logits, relative to their largest magnitude: another summation order inside the
#: matmul moves results by a few ulps per layer, far below this; a wrong weight would move them by O(1)
REL_TOL = 1e-5


def _cached_logits(model, ids: list[int], steps: list[int]) -> list[torch.Tensor]:
    """Logits of a prompt, then of each chunk of `steps` tokens over the growing cache."""
    from transformers import DynamicCache

    target = Target(model=model, tokenizer=ToyTokenizer(model.config.vocab_size), name="t")
    cache = DynamicCache(config=model.config)
    out = [target.forward(ids, cache, logits_to_keep=len(ids))[0]]
    pos = 0
    for k in steps:
        chunk = [(7 * (pos + j) + 3) % model.config.vocab_size for j in range(k)]
        out.append(target.forward(chunk, cache, logits_to_keep=k)[0])
        pos += k
    return out


def test_packed_model_gives_the_stock_logits_for_every_chunk_size(one_thread):
    stock = tiny_llama(vocab_size=64, n_layers=3, hidden=32, seed=1, init=0.2)
    packed = tiny_llama(vocab_size=64, n_layers=3, hidden=32, seed=1, init=0.2)
    assert pack_linears(packed) == 3 * 7 + 1  # q k v o gate up down per layer, and the LM head
    ids = [5, 9, 1, 33, 2, 60, 17]
    steps = [1, 2, 4, 9, 16, 1]
    for a, b in zip(_cached_logits(stock, ids, steps), _cached_logits(packed, ids, steps)):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= REL_TOL * a.abs().max()


def test_packing_keeps_weights_ties_and_state_dict(one_thread):
    model = tiny_llama(vocab_size=32, n_layers=2, hidden=16, tied=True)
    keys = set(model.state_dict())
    head = model.lm_head.weight
    pack_linears(model)
    assert isinstance(model.lm_head, PackedLinear) and model.lm_head.weight is head
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tie intact
    assert set(model.state_dict()) == keys


def test_packed_linear_falls_back_to_autograd_when_gradients_are_needed():
    lin = torch.nn.Linear(8, 4)
    packed = PackedLinear(lin.weight, lin.bias)
    x = torch.randn(3, 8, requires_grad=True)
    packed(x).sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, lin.weight.sum(0).expand(3, 8))
    assert lin.weight.grad is not None  # the weights learn too


def test_packed_drafter_proposes_what_the_stock_one_does(make_tiny_target, one_thread):
    """A DFlash drafter with packed products (layers and draft LM head) gives the same block
    probabilities as the stock one, to fp32 rounding."""
    from labkit.decode.loop import prefill
    from labkit.drafters.dflash import DFlashConfig, DFlashDrafter
    from labkit.pipeline.train import new_backbone

    target = make_tiny_target(vocab_size=32, n_layers=4, hidden=32)
    cfg = DFlashConfig.for_target(target, n_layers=1, gamma=4, target_layers=(1, 3))
    stock = new_backbone(target, cfg, init_from_target=False)
    packed = new_backbone(target, cfg, init_from_target=False)
    packed.load_state_dict(stock.state_dict())
    assert packed.eval().pack_for_inference() > 0
    blocks = []
    for model in (stock.eval(), packed):
        drafter = DFlashDrafter(model)
        state = prefill(target, [3, 1, 4, 1, 5, 9, 2, 6], 16, SamplingParams(1.0), drafter=drafter)
        blocks.append(drafter.draft_logits(state.request))
    assert (blocks[0] - blocks[1]).abs().max() <= REL_TOL * blocks[0].abs().max()


@pytest.mark.slow
def test_real_target_packed_greedy_equals_hf_generate_on_the_stock_model(one_thread):
    try:
        stock = load_target(packed=False)
    except Exception as exc:  # noqa: BLE001 - the default target is not installed
        pytest.skip(str(exc))
    packed = load_target(packed=True)
    assert packed.packed == 30 * 7 + 1 and stock.packed == 0
    prompts = ["What is 7 * 8? Explain.", "Write a Python function that reverses a string.",
               "Give three tips for a first trip to Japan."]
    for text in prompts:
        ids = packed.encode_prompt(text)
        ref = stock.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   do_sample=False, max_new_tokens=48, pad_token_id=stock.pad_token_id)
        ref_ids = ref[0, len(ids):].tolist()
        n = len(ref_ids)
        lab_ar = generate(packed, ids, None, n, SamplingParams(0.0)).token_ids
        lab_spec = generate(packed, ids, make_drafter("prompt-lookup", packed), n, SamplingParams(0.0)).token_ids
        assert lab_ar == ref_ids and lab_spec == ref_ids
        s_logits, _ = stock.forward(ids, stock.new_cache(), logits_to_keep=len(ids))
        p_logits, _ = packed.forward(ids, packed.new_cache(), logits_to_keep=len(ids))
        assert (s_logits - p_logits).abs().max() <= REL_TOL * s_logits.abs().max()


def test_a_loaded_drafter_is_packed_when_its_target_is(make_tiny_target, tmp_path, one_thread):
    from labkit.drafters.checkpoint import load_backbone, save_drafter
    from labkit.drafters.dflash import DFlashConfig
    from labkit.pipeline.train import new_backbone

    target = make_tiny_target(vocab_size=32, n_layers=4, hidden=32)
    cfg = DFlashConfig.for_target(target, n_layers=1, gamma=4, target_layers=(1, 3))
    path = save_drafter(new_backbone(target, cfg, init_from_target=False), tmp_path / "d")
    kinds = lambda m: {type(x).__name__ for x in m.modules()}  # noqa: E731
    assert "PackedLinear" not in kinds(load_backbone(path, target))  # target.packed == 0: stock kernels
    target.packed = 1
    loaded = load_backbone(path, target)
    assert "PackedLinear" in kinds(loaded) and loaded.packed_head is not None
    assert "PackedLinear" not in kinds(load_backbone(path, target, packed=False))


def test_bf16_packing_is_offered_exactly_where_the_cpu_can_run_it():
    """An AVX2-only CPU has no oneDNN bf16 path: loading a bf16 target there must fall back to the stock
    kernels instead of failing (the feature cache of `train --feature-dtype bfloat16` loads one)."""
    weight = torch.randn(24, 16, dtype=torch.bfloat16)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    if can_pack(torch.device("cpu"), torch.bfloat16):
        got = PackedLinear(weight)(x).float()
        torch.testing.assert_close(got, torch.nn.functional.linear(x, weight).float(), rtol=2e-2, atol=2e-2)
    else:
        with pytest.raises(RuntimeError):
            PackedLinear(weight)
