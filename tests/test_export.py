"""`labkit export --format deepspec` (labkit/drafters/export.py, docs/facts.md, "Export layout for vLLM and SGLang").

The exported folder is read back here through DeepSpec's config keys and tensor names only (json +
safetensors, no labkit code) into an independent forward written from DeepSpec's description:
fc -> hidden_norm on the target's features (hidden_states[i + 1] for each target_layer_id i), Qwen3-style
layers with per-head q/k RMSNorm before RoPE (context at positions 0..p-1, the block at p..p+g-1),
attention to context strictly before the anchor p and bidirectionally within the block, the final norm,
lm_head, the Markov (or RNN) bias from the previous token (the anchor for slot 0, then the drafted
tokens), and the confidence logit from [h_k ; markov_w1[x_{k-1}]]. Its draft distributions and
confidence logits must equal the lab drafter's decode-time ones. The lab model runs in fp32 with every
weight (the target's too) rounded to bf16 first, so the only difference left is arithmetic (fp32 in the
lab, fp64 here): the tolerance is 1e-5 on probabilities and 1e-4 on logits. A deliberately wrong
reading (layer ids not shifted by one) is checked to miss by far more, so the comparison can fail.

Then every drafter the layout cannot express is refused with a sentence naming the fix, nothing
written; `init_from_target` copies only layers that compute what a draft layer computes; and the
command line trains an exportable drafter (--qk-norm --frozen-mask) and exports it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ToyTokenizer
from safetensors.torch import load_file
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen3Config, Qwen3ForCausalLM

from labkit.drafters.base import DraftRequest
from labkit.drafters.dflash import DFlashConfig, DFlashDrafter
from labkit.drafters.dspark import DSparkConfig, DSparkDrafter
from labkit.core.errors import LabkitError
from labkit.drafters.export import engine_lines, engine_support, export_deepspec
from labkit.core.sampling import SamplingParams
from labkit.model.target import Target
from labkit.pipeline.train import new_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 16
PROB_TOL, LOGIT_TOL = 1e-5, 1e-4


# ----------------------------------------------------------------------------- tiny targets


def _round_to_bf16(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(torch.bfloat16).float())


def _llama_target(make_tiny_target) -> Target:
    target = make_tiny_target(vocab_size=VOCAB, n_layers=3, hidden=32, tied=False, seed=1, name="tiny-llama")
    _round_to_bf16(target.model)
    return target


def _qwen3_target(seed: int = 2) -> Target:
    """A random 3-layer Qwen3 (q/k norms, grouped-query attention: 4 query heads over 2 kv heads)."""
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                      tie_word_embeddings=False, initializer_range=0.5, rope_parameters={
                          "rope_type": "default", "rope_theta": 10000.0})
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms at 1: make the target's q/k norms worth copying
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.3)
    _round_to_bf16(model)
    return Target(model=model, tokenizer=ToyTokenizer(VOCAB), name="tiny-qwen3")


def _gemma3_target() -> Target:
    torch.manual_seed(3)
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    return Target(model=Gemma3ForCausalLM(cfg).eval(), tokenizer=ToyTokenizer(VOCAB), name="tiny-gemma3")


def _exportable(target: Target, kind: str = "dflash", init: bool = False, seed: int = 0, **overrides):
    """An exportable drafter (q/k norm, frozen mask, whole vocabulary) with every trainable weight perturbed,
    then rounded to bf16 (the lab side of the comparison)."""
    torch.manual_seed(seed)
    fields = dict(gamma=4, n_layers=2, target_layers=(1, 2), qk_norm=True, train_mask=False, mask_init_token=5)
    fields.update(overrides)
    config_cls = DSparkConfig if kind == "dspark" else DFlashConfig
    model = new_backbone(target, config_cls.for_target(target, **fields), init_from_target=init)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    _round_to_bf16(model)
    return model.eval()


# ----------------------------------------------------------------------------- DeepSpec, read independently


def read_export(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and model.safetensors of an exported folder; tensors in fp64."""
    cfg = json.loads((path / "config.json").read_text())
    return cfg, {k: v.double() for k, v in load_file(str(path / "model.safetensors")).items()}


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE of x (T, heads, d) at positions pos (T,), as Qwen3 applies it."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin


def deepspec_states(cfg: dict, w: dict, hidden_states, p: int, anchor: int) -> torch.Tensor:
    """Final-normed states (block_size, H) of the block whose anchor sits at position p.

    hidden_states: the target's HF hidden_states (batch 1) over any number N >= p of positions; the block
    sees context positions < p only."""
    g, eps = cfg["block_size"], cfg["rms_norm_eps"]
    nh, nkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta"))
    feats = torch.cat([hidden_states[i + 1][0].double() for i in cfg["target_layer_ids"]], -1)
    n = feats.shape[0]
    ctx = _rms(feats @ w["fc.weight"].T, w["hidden_norm.weight"], eps)
    x = w["embed_tokens.weight"][torch.tensor([anchor] + [cfg["mask_token_id"]] * (g - 1))]
    pos = torch.cat([torch.arange(n), torch.arange(p, p + g)])
    visible = torch.cat([torch.arange(n) < p, torch.ones(g, dtype=torch.bool)])  # same for every slot
    for layer in range(cfg["num_hidden_layers"]):
        t = {k[len(f"layers.{layer}."):]: v for k, v in w.items() if k.startswith(f"layers.{layer}.")}
        h = _rms(x, t["input_layernorm.weight"], eps)
        q = _rms((h @ t["self_attn.q_proj.weight"].T).view(g, nh, d), t["self_attn.q_norm.weight"], eps)
        kv_in = torch.cat([ctx, h])  # the context's keys/values come from the fc'd features, then the block's
        k = _rms((kv_in @ t["self_attn.k_proj.weight"].T).view(n + g, nkv, d), t["self_attn.k_norm.weight"], eps)
        v = (kv_in @ t["self_attn.v_proj.weight"].T).view(n + g, nkv, d)
        q, k = _rope(q, pos[n:], theta), _rope(k, pos, theta)
        heads = []
        for i in range(nh):
            j = i // (nh // nkv)  # query head i reads kv head j (grouped-query attention)
            scores = (q[:, i] @ k[:, j].T / d ** 0.5).masked_fill(~visible, float("-inf"))
            heads.append(torch.softmax(scores, -1) @ v[:, j])
        x = x + torch.cat(heads, -1) @ t["self_attn.o_proj.weight"].T
        h = _rms(x, t["post_attention_layernorm.weight"], eps)
        mlp = F.silu(h @ t["mlp.gate_proj.weight"].T) * (h @ t["mlp.up_proj.weight"].T)
        x = x + mlp @ t["mlp.down_proj.weight"].T
    return _rms(x, w["norm.weight"], eps)


def deepspec_outputs(cfg: dict, w: dict, h: torch.Tensor, prev: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draft logits (g, V) with the head's bias given the previous tokens, and confidence logits (g,) or None."""
    logits = h @ w["lm_head.weight"].T
    e = None
    if cfg["markov_rank"]:
        e = w["markov_head.markov_w1.weight"][torch.tensor(prev)]
        w2 = w["markov_head.markov_w2.weight"]
        if cfg["markov_head_type"] == "vanilla":
            logits = logits + e @ w2.T
        else:  # rnn: z = [s; W1[x]; h] -> gate, candidate, output
            s, rows = torch.zeros(cfg["markov_rank"], dtype=torch.float64), []
            for k in range(h.shape[0]):
                z = torch.cat([s, e[k], h[k]]) @ w["markov_head.joint_proj.weight"].T + w["markov_head.joint_proj.bias"]
                gate, cand, out = z.chunk(3)
                s = torch.sigmoid(gate) * s + (1 - torch.sigmoid(gate)) * torch.tanh(cand)
                rows.append(logits[k] + w2 @ torch.tanh(out))
            logits = torch.stack(rows)
    conf = None
    if cfg["enable_confidence_head"]:
        feat = torch.cat([h, e], -1) if cfg["confidence_head_with_markov"] else h
        conf = feat @ w["confidence_head.proj.weight"][0] + w["confidence_head.proj.bias"][0]
    return logits, conf


# ----------------------------------------------------------------------------- the lab's decode-time draft


def _context(target: Target, n_extra: int = 3, seed: int = 0):
    """A sequence: p context tokens, the anchor at p, n_extra later tokens (which no draft may see)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(VOCAB, (9 + 1 + n_extra,), generator=gen).tolist()
    with torch.no_grad():
        hs = target.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    return ids, hs, 9


def _lab_request(drafter, ids, hs, p, temperature=1.0):
    request = DraftRequest(ids=ids[: p + 1], params=SamplingParams(temperature),
                           generator=torch.Generator().manual_seed(7))
    drafter.start(request, tuple(hs[layer][0, :p] for layer in drafter.cfg.target_layers))
    return request


def test_dflash_export_matches_the_lab_draft(make_tiny_target, tmp_path):
    target = _llama_target(make_tiny_target)
    model = _exportable(target, "dflash")
    out = export_deepspec(model, target, tmp_path / "dflash")
    cfg, w = read_export(out)
    assert cfg["architectures"] == ["Qwen3DSparkModel"] and cfg["model_type"] == "llama"
    assert cfg["target_layer_ids"] == [0, 1] and cfg["num_target_layers"] == 3 and cfg["block_size"] == 4
    assert cfg["num_hidden_layers"] == 2 and cfg["mask_token_id"] == 5 and cfg["tie_word_embeddings"] is False
    assert cfg["markov_rank"] == 0 and cfg["enable_confidence_head"] is False and cfg["hidden_act"] == "silu"
    assert cfg["layer_types"] == ["full_attention"] * 2 and cfg["vocab_size"] == VOCAB
    layer = {f"layers.{i}.{n}" for i in range(2) for n in (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        "self_attn.q_norm.weight", "self_attn.k_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
        "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")}
    assert set(w) == layer | {"embed_tokens.weight", "lm_head.weight", "norm.weight", "fc.weight", "hidden_norm.weight"}
    assert all(v.dtype == torch.bfloat16 for v in load_file(str(out / "model.safetensors")).values())
    # SGLang's DSPARK refuses markov_rank 0: only vLLM's command is printed, SGLang is said not to load it
    text = (out / "README.md").read_text()
    assert "vllm serve" in text and "--speculative-algorithm DSPARK" not in text
    assert "Not for SGLang: SGLang's DSPARK refuses markov_rank 0" in text
    assert engine_support(cfg)["vllm"] is None and "markov_rank 0" in engine_support(cfg)["sglang"]

    ids, hs, p = _context(target)
    drafter = DFlashDrafter(model)
    lab = drafter.draft_logits(_lab_request(drafter, ids, hs, p)).double()
    ref, _ = deepspec_outputs(cfg, w, deepspec_states(cfg, w, hs, p, ids[p]), [])
    torch.testing.assert_close(lab, ref, atol=LOGIT_TOL, rtol=0)
    unshifted = dict(cfg, target_layer_ids=[i - 1 for i in cfg["target_layer_ids"]])  # hidden_states[i]: wrong
    wrong, _ = deepspec_outputs(cfg, w, deepspec_states(unshifted, w, hs, p, ids[p]), [])
    assert (wrong - lab).abs().max() > 100 * LOGIT_TOL


@pytest.mark.parametrize("head", ["markov", "rnn"])
def test_dspark_export_matches_the_lab_draft(tmp_path, head):
    """Qwen3 target (its layers copied in, q/k norms included), grouped-query attention, target layers given
    out of order (2, 1): the export sorts them and permutes fc's input blocks to match."""
    target = _qwen3_target()
    model = _exportable(target, "dspark", init=True, head=head, rank=4, target_layers=(2, 1))
    model.cfg.calibration = {"T=1": {"temperatures": [1.5, 1.0, 0.8, 1.2]}}
    out = export_deepspec(model, target, tmp_path / "dspark")
    cfg, w = read_export(out)
    assert cfg["model_type"] == "qwen3" and cfg["target_layer_ids"] == [0, 1]
    assert cfg["markov_rank"] == 4 and cfg["markov_head_type"] == {"markov": "vanilla", "rnn": "rnn"}[head]
    assert cfg["enable_confidence_head"] and cfg["confidence_head_with_markov"]
    assert w["markov_head.markov_w1.weight"].shape == w["markov_head.markov_w2.weight"].shape == (VOCAB, 4)
    assert w["confidence_head.proj.weight"].shape == (1, 32 + 4)
    assert cfg["labkit"]["sts_calibration"] == model.cfg.calibration
    # vLLM's DSpark model builds only the vanilla Markov head: an RNN-head export names SGLang alone
    text, support = (out / "README.md").read_text(), engine_support(cfg)
    assert "--speculative-algorithm DSPARK" in text and support["sglang"] is None
    if head == "rnn":
        assert "vllm serve" not in text and "Not for vLLM: vLLM's DSpark model builds only the vanilla" in text
        assert "--head markov" in support["vllm"]
    else:
        assert "vllm serve" in text and "Not for" not in text and support["vllm"] is None
    assert [line.split(":")[0] for line in engine_lines(out)] == ["vLLM", "SGLang"]

    ids, hs, p = _context(target, seed=1)
    drafter = DSparkDrafter(model, calibrated=False)
    prop = drafter.propose(_lab_request(drafter, ids, hs, p), model.cfg.gamma)  # sampled at temperature 1
    prev = [ids[p]] + prop.tokens[:-1].tolist()
    logits, conf = deepspec_outputs(cfg, w, deepspec_states(cfg, w, hs, p, ids[p]), prev)
    torch.testing.assert_close(prop.probs.double(), torch.softmax(logits, -1), atol=PROB_TOL, rtol=0)
    torch.testing.assert_close(prop.conf_logits.double(), conf, atol=LOGIT_TOL, rtol=0)
    assert torch.softmax(logits, -1).max(-1).values.min() < 0.9, "distributions this peaked would test little"


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("overrides, fix", [
    (dict(draft_vocab=8), "--draft-vocab 0"),
    (dict(qk_norm=False), "--qk-norm"),
    (dict(anchor_predicts=False), "--anchor-mode anchor-first"),
    (dict(target_layers=(1, 3)), "--target-layers below 3"),
])
def test_inexpressible_drafters_are_refused(make_tiny_target, tmp_path, overrides, fix):
    target = _llama_target(make_tiny_target)
    model = _exportable(target, "dspark", rank=4, **overrides)
    with pytest.raises(LabkitError, match="cannot be exported in DeepSpec's layout") as err:
        export_deepspec(model, target, tmp_path / "out")
    assert fix in str(err.value) and not (tmp_path / "out").exists()


def test_trained_mask_is_refused_and_a_frozen_one_is_not_trainable(make_tiny_target, tmp_path):
    target = _llama_target(make_tiny_target)
    frozen = _exportable(target)
    assert not frozen.mask_embedding.requires_grad
    assert all(p is not frozen.mask_embedding for p in frozen.parameters() if p.requires_grad)
    trained = _exportable(target, train_mask=True)  # _exportable perturbs what is trainable: the mask too
    with pytest.raises(LabkitError, match="trained mask embedding.*--frozen-mask"):
        export_deepspec(trained, target, tmp_path / "out")
    untouched = _exportable(target, train_mask=True)
    with torch.no_grad():
        untouched.mask_embedding.copy_(target.model.get_input_embeddings().weight[5])
    export_deepspec(untouched, target, tmp_path / "out")  # numerically the target's row: exact, exported


def test_scaled_embedding_target_is_refused(tmp_path):
    target = _gemma3_target()
    model = _exportable(target, target_layers=(1, 2))
    with pytest.raises(LabkitError, match="scales its embedding rows"):
        export_deepspec(model, target, tmp_path / "out")


def test_old_configs_load_with_todays_behaviour():
    cfg = DFlashConfig.from_dict({"target_layers": [1], "target_num_layers": 3, "gamma": 4})
    assert cfg.qk_norm is False and cfg.train_mask is True


# ----------------------------------------------------------------------------- init_from_target


def test_init_from_target_copies_only_layers_of_the_same_shape(make_tiny_target):
    qwen = _qwen3_target()
    with_norms = new_backbone(qwen, DFlashConfig.for_target(qwen, n_layers=2, target_layers=(1,), qk_norm=True),
                              init_from_target=False)
    assert with_norms.init_from_target(qwen.model) == 2
    last = qwen.model.model.layers[-1].self_attn
    assert torch.equal(with_norms.layers[-1].q_norm.weight, last.q_norm.weight)
    assert torch.equal(with_norms.layers[-1].k_proj.weight, last.k_proj.weight)
    plain = new_backbone(qwen, DFlashConfig.for_target(qwen, n_layers=2, target_layers=(1,)), init_from_target=False)
    assert plain.init_from_target(qwen.model) == 0  # a Qwen3 layer without its q/k norms is another function
    llama = make_tiny_target(vocab_size=VOCAB, n_layers=3)
    assert new_backbone(llama, DFlashConfig.for_target(llama, target_layers=(1,)),
                        init_from_target=False).init_from_target(llama.model) == 1
    gemma = _gemma3_target()
    for qk in (False, True):
        mine = new_backbone(gemma, DFlashConfig.for_target(gemma, target_layers=(1,), qk_norm=qk),
                            init_from_target=False)
        assert mine.init_from_target(gemma.model) == 0  # pre/post-feedforward norms, (1 + w) norms, gelu


# ----------------------------------------------------------------------------- command line


def test_export_cli_trains_and_exports(tiny_model_dir, tmp_path, capsys):
    """prepare-data -> train --qk-norm --frozen-mask --draft-vocab 0 -> export: the folder holds DeepSpec's
    files; a cut-vocabulary checkpoint and a non-drafter are refused with one line."""
    from labkit.__main__ import main
    model, data, run = str(tiny_model_dir), tmp_path / "data", tmp_path / "run"
    assert main(["prepare-data", "--target", model, "--out", str(data), "--n-prompts", "4", "--max-new-tokens", "8",
                 "--shard-size", "4", "--benchmarks", "lab"]) == 0
    common = ["--target", model, "--data", str(data), "--steps", "2", "--save-every", "2", "--batch-seqs", "2",
              "--anchors", "4", "--gamma", "3", "--target-layers", "2,5"]
    assert main(["train", "--drafter", "dspark", "--rank", "4", "--out", str(run), "--qk-norm", "--frozen-mask",
                 *common]) == 0
    out = tmp_path / "exported"
    assert main(["export", "--drafter", str(run / "last"), "--format", "deepspec", "--target", model, str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3DSparkModel"] and cfg["target_layer_ids"] == [1, 4]
    assert cfg["block_size"] == 3 and cfg["markov_rank"] == 4 and (out / "README.md").exists()
    assert "layers.0.self_attn.q_norm.weight" in load_file(str(out / "model.safetensors"))
    said = capsys.readouterr().out
    assert "vLLM: loads it" in said and "SGLang: loads it" in said
    cut = tmp_path / "cut"
    assert main(["train", "--drafter", "dflash", "--out", str(cut), "--draft-vocab", "64", *common]) == 0
    capsys.readouterr()
    assert main(["export", "--drafter", str(cut / "last"), "--target", model, str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip()
    for fix in ("--draft-vocab 0", "--qk-norm", "--frozen-mask"):
        assert fix in err
    assert "\n" not in err and not (tmp_path / "no").exists()
    assert main(["export", "--drafter", "prompt-lookup", str(tmp_path / "no")]) == 2
    assert "export takes a trained drafter" in capsys.readouterr().err


def test_shipped_drafters_are_refused_before_any_model_loads(tmp_path, capsys):
    from labkit.__main__ import main
    from labkit.drafters import SHIPPED_DIR
    if not (SHIPPED_DIR / "dspark" / "config.json").exists():
        pytest.skip("the shipped drafters are absent")
    assert main(["export", "--drafter", "dspark", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert all(fix in err for fix in ("--draft-vocab 0", "--qk-norm", "--frozen-mask"))
