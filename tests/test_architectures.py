"""The target adapter on tiny random models of three architectures: Llama, Gemma 3 and Qwen3.

Each model is built from a config here (no download). Gemma 3's config has sliding-window layers with
a window of 4 positions, so every generation below runs past the window: the cache the lab builds
(`Target.new_cache`) must keep rollback after a rejected draft exact there, and the batched engine
must serve it. Each architecture must: generate what HF `generate` generates (greedy, fp32), decode
speculatively with every drafter kind (training-free and model-based) to the same tokens, follow the
target's distribution when sampling (chi-square), and train a drafter for a few steps.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

from conftest import ToyTokenizer
from labkit.pipeline.data import Sequence
from labkit.decode.loop import generate
from labkit.drafters.dflash import DFlashConfig, DFlashDrafter
from labkit.drafters.dspark import DSparkConfig, DSparkDrafter
from labkit.drafters.hybrid import make_hybrid
from labkit.drafters.layer_skip import LayerSkipConfig, LayerSkipDrafter
from labkit.drafters.prompt_lookup import PromptLookupDrafter
from labkit.pipeline.features import FeatureSequence, shard_features
from labkit.core.sampling import SamplingParams
from labkit.decode.engine import Engine, ServeRequest, closed_loop, report
from labkit.model.target import Target
from labkit.pipeline.train import TrainConfig, loss_terms, make_batch, new_backbone, train

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 16
WINDOW = 4  # Gemma 3's sliding window here: every test below decodes well past it
ARCHS = ("llama", "gemma3", "qwen3")


def tiny_model(arch: str, vocab: int = VOCAB, n_layers: int = 3, seed: int = 0, init: float = 0.5):
    """A random causal LM of `arch` in eval mode, fp32: 32 wide, 2 query heads over 1 KV head."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                  initializer_range=init, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "gemma3":
        types = ["sliding_attention"] * (n_layers - 1) + ["full_attention"]
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, sliding_window=WINDOW, layer_types=types,
                                                   query_pre_attn_scalar=16))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    else:
        raise ValueError(arch)
    return model.eval()


def tiny_target(arch: str, **kw) -> Target:
    return Target(model=tiny_model(arch, **kw), tokenizer=ToyTokenizer(kw.get("vocab", VOCAB)), name=f"tiny-{arch}")


@pytest.fixture(scope="module", params=ARCHS)
def target(request) -> Target:
    return tiny_target(request.param)


def dflash(target: Target, gamma: int = 4, seed: int = 0) -> DFlashDrafter:
    torch.manual_seed(seed)
    cfg = DFlashConfig.for_target(target, gamma=gamma, target_layers=(1, 2))
    return DFlashDrafter(new_backbone(target, cfg, init_from_target=False))


def dspark(target: Target, gamma: int = 4, seed: int = 0) -> DSparkDrafter:
    torch.manual_seed(seed)
    cfg = DSparkConfig.for_target(target, gamma=gamma, target_layers=(1, 2), rank=4)
    model = new_backbone(target, cfg, init_from_target=False)
    with torch.no_grad():
        model.seq_head.w2.weight.normal_(0, 0.5)  # a non-zero head, so it changes the draft
    return DSparkDrafter(model.eval())


DRAFTERS = {
    "prompt-lookup": lambda t: PromptLookupDrafter(t.vocab_size),
    "layer-skip": lambda t: LayerSkipDrafter(t, LayerSkipConfig(n_layers=1, gamma=3, stop_below=0.0)),
    "dflash": dflash,
    "dspark": dspark,
    "hybrid:dspark": lambda t: make_hybrid(dspark(t)),
}
PROMPTS = ([1, 2, 3], [5, 5, 9, 0, 11, 4, 5, 5, 9])


def test_gemma3_cache_keeps_every_position_behind_the_window():
    """The cache the lab builds holds full layers only, so `crop(-k)` can roll back past the window."""
    t = tiny_target("gemma3")
    cache = t.new_cache()
    assert all(not getattr(layer, "is_sliding", False) for layer in cache.layers)
    logits, _ = t.forward(list(range(10)), cache, logits_to_keep=1)
    assert cache.get_seq_length() == 10
    cache.crop(-3)
    again, _ = t.forward([7, 8, 9], cache, logits_to_keep=1)
    assert torch.allclose(logits, again, atol=1e-5), "rolling back 3 tokens and replaying them changes nothing"


def test_lab_greedy_equals_hf_generate(target):
    """The lab's cached AR loop gives HF `generate`'s greedy tokens (fp32), past Gemma 3's window."""
    for prompt in PROMPTS:
        with torch.inference_mode():
            ref = target.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                        dtype=torch.long), max_new_tokens=20, do_sample=False)
        assert generate(target, prompt, None, 20).token_ids == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", DRAFTERS)
def test_speculative_greedy_equals_target_greedy(target, kind):
    """Every drafter kind, on every architecture: greedy speculative output equals plain greedy output
    token for token, and drafts were really proposed (and, from the random model drafters, some
    rejected, so rollback ran past Gemma 3's window)."""
    drafter = DRAFTERS[kind](target)
    proposed = rejected = 0
    for prompt in PROMPTS:
        plain = generate(target, prompt, None, 24)
        spec = generate(target, prompt, drafter, 24)
        assert spec.token_ids == plain.token_ids, f"{kind} on {target.name}, prompt {prompt}"
        proposed += sum(r.proposed for r in spec.rounds)
        rejected += sum(r.proposed - r.accepted for r in spec.rounds)
    assert proposed > 0
    if kind in ("dflash", "dspark", "hybrid:dspark"):
        assert rejected > 0


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_sampled_dspark_sequences_follow_the_target(arch, chi2_gof):
    """1500 sequences of 4 new tokens at temperature 1 drafted by DSpark (gamma 3) on an 8-token tiny
    target of this architecture, chi-square against the exact distribution over 4096 sequences, alpha
    0.001, seeds fixed (prompt of 5 + 4 new tokens: past Gemma 3's window of 4)."""
    from test_lossless_tiny_model import assert_sequences_follow_target
    t = tiny_target(arch, vocab=8, n_layers=2)
    assert_sequences_follow_target(t, dspark(t, gamma=3), chi2_gof)


def serve_greedy(target: Target, drafter, n_requests: int, slots: int = 3) -> list[tuple[ServeRequest, list[int]]]:
    """n greedy requests of growing length through the batched engine: (request, its served tokens)."""
    requests = [ServeRequest(i, f"r{i}", [(3 * i + j) % VOCAB for j in range(2 + i)], 10 + i, SamplingParams(0.0), i)
                for i in range(n_requests)]
    engine = Engine(target, drafter, "fixed", None)
    for _ in closed_loop(requests, slots, engine):
        pass
    return [(requests[r["id"]], r["token_ids"]) for r in report(engine, slots, "test")["requests"]]


def test_batched_engine_serves_gemma3_like_solo_decoding():
    """Gemma 3 (sliding-window layers) in the batched engine: 6 requests through 3 slots, each request's
    greedy tokens equal its solo greedy decoding."""
    t = tiny_target("gemma3")
    drafter = dspark(t)
    for req, served in serve_greedy(t, drafter, 6):
        assert served == generate(t, req.prompt_ids, drafter, req.max_new_tokens).token_ids


def test_a_drafter_trains_on_every_architecture(target, tmp_path):
    """Features from the target's own layers, a DSpark drafter, 30 steps: the loss falls."""
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(8):
        prompt = torch.randint(VOCAB, (4,), generator=gen).tolist()
        seqs.append(Sequence(prompt + generate(target, prompt, None, 16, SamplingParams(0.8), seed=i).token_ids,
                             4, "math"))
    tokens = torch.tensor([t for s in seqs for t in s.ids], dtype=torch.int32)
    offsets = torch.tensor([0] + [len(s.ids) for s in seqs]).cumsum(0)
    path = tmp_path / "shard-00000.safetensors"
    from safetensors.torch import save_file
    save_file(shard_features(target, tokens, offsets, (1, 2), batch_tokens=64), str(path))
    items = [FeatureSequence(s, path, int(offsets[i])) for i, s in enumerate(seqs)]
    model = dspark(target).backbone.train()
    cfg = TrainConfig(steps=30, batch_seqs=4, anchors_per_seq=8, lr=3e-3, save_every=30, eval_every=30,
                      val_fraction=0.0)
    batch = make_batch(items, list(range(8)), 4, 16, torch.Generator().manual_seed(5), {})

    def loss() -> float:
        with torch.no_grad():
            out = model(batch["feats"], batch["anchor_pos"], batch["anchor_ids"], batch["targets"])
            return float(loss_terms(model, out, batch, cfg.loss)["loss"])
    before = loss()
    train(model, items, tmp_path / "run", cfg, progress=False, log=lambda *_: None)
    assert loss() < 0.8 * before
