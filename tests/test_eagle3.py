"""Eagle3 (labkit/drafters/eagle3.py) on tiny random targets: the layers it reads and the training-time
test's horizon as configured; the decode-time chain equal to the training forward, step by step; the
per-request cache after every round equal to one rebuilt from scratch; proposals that carry exactly the
distributions their tokens were drawn from; lossless decoding (greedy equality in fp32, and a chi-square
on sampled sequences that rejects a deliberately wrong verifier at the same alpha); training (the loss
falls on an overfit set; the `train` command twice with one seed gives bit-identical weights); and the
export in DeepSpec's Eagle3 layout read back through DeepSpec's names into an independent forward.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import labkit.core.sampling
import labkit.decode.loop
from labkit.core.errors import LabkitError
from labkit.core.sampling import SamplingParams, logits_to_probs
from labkit.decode.loop import generate, prefill, speculative_round
from labkit.drafters.base import DraftRequest
from labkit.drafters.checkpoint import load_backbone, save_drafter
from labkit.drafters.eagle3 import Eagle3Cache, Eagle3Config, Eagle3Drafter, Eagle3Model, eagle3_layers
from labkit.pipeline.train import TrainConfig, forward_batch, loss_terms, make_batch, new_backbone, train

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 16
H = 32


@pytest.fixture(scope="module")
def tiny(make_tiny_target):
    return make_tiny_target(vocab_size=VOCAB, n_layers=4, hidden=H, init=0.5)


def make_model(target, gamma=4, n_layers=1, layers=(1, 3), seed=0, draft_vocab=0, vocab_ids=None, **kw) -> Eagle3Model:
    torch.manual_seed(seed)
    cfg = Eagle3Config.for_target(target, gamma=gamma, n_layers=n_layers, target_layers=layers,
                                  draft_vocab=draft_vocab, **kw)
    return new_backbone(target, cfg, vocab_ids=vocab_ids, init_from_target=False).eval()


@torch.no_grad()
def hidden_states(target, ids: list[int]):
    return target.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states


def features(hs, layers) -> torch.Tensor:
    """(1, N, m * H): the configured layers' outputs, as the feature cache stores them."""
    return torch.cat([hs[i][0] for i in layers], -1)[None]


def started(drafter: Eagle3Drafter, target, ids: list[int], a: int, params=SamplingParams(), generator=None):
    """A request whose anchor (last id, not yet in the target's cache) sits at position a."""
    hs = hidden_states(target, ids[:a])
    request = DraftRequest(ids=list(ids[: a + 1]), params=params, generator=generator)
    drafter.start(request, tuple(hs[i][0] for i in drafter.hidden_layers))
    return request


# ----------------------------------------------------------------------------- shape and configuration


def test_default_layers_are_low_middle_high_as_eagle3_reads_them():
    assert eagle3_layers(30) == (2, 15, 27)  # SmolLM2-135M: hidden_states[2], [15], [27]
    assert eagle3_layers(36) == (2, 18, 33)
    for n in (1, 2, 3, 4, 6):
        layers = eagle3_layers(n)
        assert layers == tuple(sorted(set(layers))) and all(1 <= i <= n for i in layers)


def test_config_round_trip_and_refusals(tiny):
    cfg = Eagle3Config.for_target(tiny, gamma=5, target_layers=(3, 1, 2), draft_vocab=8)
    assert cfg.target_layers == (3, 1, 2) and cfg.kind == "eagle3"
    back = Eagle3Config.from_dict(json.loads(cfg.to_json()))
    assert back == cfg
    assert Eagle3Config.for_target(tiny).target_layers == eagle3_layers(4)
    for bad, match in ((dict(gamma=0), "gamma"), (dict(target_layers=(0, 2)), "target_layers"),
                       (dict(target_layers=(5,)), "target_layers"), (dict(hidden_size=16), "width"),
                       (dict(draft_vocab=VOCAB + 1), "draft_vocab"), (dict(nope=1), "no field")):
        with pytest.raises(LabkitError, match=match):
            Eagle3Config.for_target(tiny, **bad)


def test_it_reads_exactly_the_configured_layers(tiny):
    """fc takes m x H (the layers configured, in their order); the decode loop hands the drafter exactly
    those layers (hidden_layers), and the training forward over features built from them gives the
    decode path's drafts: changing a layer that is not configured changes nothing, a configured one does."""
    for layers in ((2,), (1, 3), (3, 1, 2)):
        model = make_model(tiny, layers=layers)
        drafter = Eagle3Drafter(model)
        assert drafter.hidden_layers == layers and model.fc.in_features == len(layers) * H
    model = make_model(tiny, layers=(1, 3))
    drafter = Eagle3Drafter(model)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    request = started(drafter, tiny, ids, 6)
    hs = list(hidden_states(tiny, ids[:6]))
    base = model.logits(drafter.draft_states(request, [7]))
    for layer, moves in ((2, False), (4, False), (0, False), (1, True), (3, True)):
        changed = list(hs)
        changed[layer] = changed[layer] + 1.0
        fresh = DraftRequest(ids=ids[:7], params=SamplingParams(), generator=None)
        drafter.start(fresh, tuple(changed[i][0] for i in drafter.hidden_layers))
        after = model.logits(drafter.draft_states(fresh, [7]))
        assert (not torch.allclose(base, after, atol=1e-4)) == moves, layer


@pytest.mark.parametrize("gamma,n_layers", [(3, 1), (5, 1), (4, 2)])
def test_training_forward_unrolls_gamma_steps_and_equals_the_decode_chain(tiny, gamma, n_layers):
    """The training forward produces gamma steps of logits per anchor (the TTT horizon), and step j equals
    the decode-time chain fed the same j tokens (teacher-forced), for every anchor of a packed batch."""
    model = make_model(tiny, gamma=gamma, n_layers=n_layers, layers=(1, 2, 3))
    drafter = Eagle3Drafter(model)
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3]
    feats = features(hidden_states(tiny, ids), (1, 2, 3))
    anchors = [2, 5, 9, 11]
    targets = [[ids[min(a + 1 + j, len(ids) - 1)] for j in range(gamma)] for a in anchors]
    with torch.no_grad():
        out = model(feats, torch.tensor([anchors]), torch.tensor([[ids[a] for a in anchors]]),
                    torch.tensor([targets]), torch.tensor([ids]))
    assert out["logits"].shape == (1, len(anchors), gamma, VOCAB) and out["h"].shape == (1, len(anchors), gamma, H)
    assert out["valid"].all()
    for b, a in enumerate(anchors):
        request = started(drafter, tiny, ids, a)
        dec = model.logits(drafter.draft_states(request, targets[b][: gamma - 1]))
        assert dec.shape == (gamma, VOCAB)
        assert torch.allclose(dec, out["logits"][0, b], atol=1e-5), (a, (dec - out["logits"][0, b]).abs().max())


def test_each_step_reads_its_own_previous_state_not_the_target_feature(tiny):
    """The training-time test: no step of a block reads a target feature at or after the anchor (at decode
    time the target has not run there), and step j reads the block's tokens before it, none after."""
    gamma = 4
    model = make_model(tiny, gamma=gamma, layers=(1, 3))
    n, anchor = 16, 7
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(1, n, 2 * H, generator=gen)
    ids = torch.randint(VOCAB, (1, n), generator=gen)
    targets = ids[:, anchor + 1: anchor + 1 + gamma][:, None]
    args = (torch.tensor([[anchor]]), ids[:, anchor: anchor + 1])
    with torch.no_grad():
        base = model(feats, *args, targets, ids)["logits"][0, 0]
        later = feats.clone()
        later[0, anchor:] += 3.0  # the anchor's own feature and everything after: what decoding cannot see
        assert torch.allclose(model(later, *args, targets, ids)["logits"][0, 0], base, atol=1e-5)
        earlier = feats.clone()
        earlier[0, anchor - 1] += 3.0  # the slot the block grows from: every step moves
        moved = model(earlier, *args, targets, ids)["logits"][0, 0]
        assert all(not torch.allclose(moved[j], base[j], atol=1e-4) for j in range(gamma))
        for j in range(gamma):  # changing the block's token j moves steps after j only
            t2 = targets.clone()
            t2[0, 0, j] = (t2[0, 0, j] + 1) % VOCAB
            got = model(feats, *args, t2, ids)["logits"][0, 0]
            assert torch.allclose(got[: j + 1], base[: j + 1], atol=1e-5)
            if j + 1 < gamma:
                assert not torch.allclose(got[j + 1], base[j + 1], atol=1e-4)


def test_an_anchor_with_no_slot_before_it_is_masked(tiny):
    model = make_model(tiny, gamma=3)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    feats = features(hidden_states(tiny, ids[0].tolist()), (1, 3))
    with torch.no_grad():
        out = model(feats, torch.tensor([[0, 2]]), ids[:, [0, 2]], torch.tensor([[[2, 3, 4], [4, 5, 6]]]), ids)
    assert out["valid"].tolist() == [[[False] * 3, [True] * 3]]


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_incremental_cache_equals_recomputed(tiny, temperature):
    """After every round the request's cache (grown by observe with the accepted tokens' features)
    drafts what a cache rebuilt from the target's recomputed features drafts; it holds one slot per
    position the target has cached, and accepted lengths of several sizes occur.

    In float64: the verify forward and the fresh forward multiply different shapes, so in fp32 their
    features differ by rounding that the drafter's logits amplify to 1e-5..1e-4 (CPU-dependent); in
    float64 that rounding is below 1e-9, so any real mismatch of the cache shows."""
    tiny = copy.copy(tiny)
    tiny.model = copy.deepcopy(tiny.model).double()
    model = make_model(tiny, gamma=4, n_layers=2, layers=(1, 3)).double()
    drafter = Eagle3Drafter(model)
    state = prefill(tiny, [2, 7, 1, 8], 28, SamplingParams(temperature), seed=3, drafter=drafter)
    lengths = set()
    while not state.finished:
        rnd = speculative_round(tiny, state, drafter)
        lengths.add(rnd.accepted)
        if state.finished:
            break
        cache: Eagle3Cache = state.request.memo
        assert cache.length == len(state.ids) - 1 == state.cache.get_seq_length()
        fresh = started(drafter, tiny, state.ids, len(state.ids) - 1)
        for drafts in ([], [5, 2, 9]):
            a = model.logits(drafter.draft_states(state.request, drafts))
            b = model.logits(drafter.draft_states(fresh, drafts))
            assert a.dtype == torch.float64 and torch.allclose(a, b, rtol=0, atol=1e-9)
    assert len(lengths) >= 2, f"only accepted lengths {lengths}: the test should see several"


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.7, 0.9), SamplingParams(0.0)])
def test_proposal_rows_are_the_distributions_drawn_from(tiny, params):
    """Row j is logits_to_probs of the chain's logits given the drafts before j, and propose changes
    nothing in the request (drafting twice with the same generator state gives the same block)."""
    model = make_model(tiny, gamma=5, layers=(1, 3))
    drafter = Eagle3Drafter(model)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    request = started(drafter, tiny, ids, 7, params, torch.Generator().manual_seed(11))
    before = [t.clone() for kv in request.memo.kv for t in kv]
    prop = drafter.propose(request, 5)
    assert len(prop) == 5 and prop.probs.shape == (5, VOCAB)
    expected = logits_to_probs(model.logits(drafter.draft_states(request, prop.tokens[:-1].tolist())).float(), params)
    assert torch.allclose(prop.probs, expected, atol=1e-6)
    assert torch.allclose(prop.probs.sum(-1), torch.ones(5), atol=1e-5)
    assert all(float(prop.probs[j, t]) > 0 for j, t in enumerate(prop.tokens.tolist()))
    after = [t for kv in request.memo.kv for t in kv]
    assert all(torch.equal(x, y) for x, y in zip(before, after)) and request.memo.length == 7
    request.generator = torch.Generator().manual_seed(11)
    again = drafter.propose(request, 5)
    assert torch.equal(again.tokens, prop.tokens) and torch.equal(again.probs, prop.probs)
    assert len(drafter.propose(request, 2)) == 2 and len(drafter.propose(request, 0)) == 0


@pytest.mark.parametrize("n_layers", [1, 2])
def test_greedy_eagle3_equals_target_greedy(tiny, n_layers):
    drafter = Eagle3Drafter(make_model(tiny, gamma=4, n_layers=n_layers, layers=(1, 2, 3)))
    for prompt in ([1, 2, 3], [5, 5, 9, 0, 11, 4]):
        plain = generate(tiny, prompt, None, 30)
        spec = generate(tiny, prompt, drafter, 30)
        assert spec.token_ids == plain.token_ids
        assert any(r.proposed for r in spec.rounds)


def test_cut_draft_vocabulary_is_lossless_and_zero_outside(tiny):
    ids = torch.tensor([0, 2, 3, 5, 7, 11, 13])
    drafter = Eagle3Drafter(make_model(tiny, gamma=3, draft_vocab=len(ids), vocab_ids=ids))
    state = prefill(tiny, [1, 2, 3], 10, SamplingParams(1.0), seed=0, drafter=drafter)
    prop = drafter.propose(state.request, 3)
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[ids] = False
    assert torch.all(prop.probs[:, outside] == 0) and set(prop.tokens.tolist()) <= set(ids.tolist())
    assert generate(tiny, [1, 2, 3], drafter, 20).token_ids == generate(tiny, [1, 2, 3], None, 20).token_ids


# Sampled decoding: N sequences of NEW_TOKENS tokens at temperature 1 on the 8-token tiny target,
# against the exact distribution of all 8^4 sequences (test_lossless_tiny_model's enumeration).
SAMPLED_N, SAMPLED_ALPHA, SAMPLED_MIN_DF = 1500, 0.001, 10


def _sampled_fit(make_tiny_target, chi2_gof):
    from test_lossless_tiny_model import NEW_TOKENS, PROMPT, exact_sequence_probs, sample_sequences
    target = make_tiny_target(vocab_size=8, n_layers=2, tied=True, init=0.5)
    torch.manual_seed(0)
    drafter = Eagle3Drafter(new_backbone(target, Eagle3Config.for_target(target, gamma=3, target_layers=(1,)),
                                         init_from_target=False))
    params = SamplingParams(1.0)
    exact = exact_sequence_probs(target, PROMPT, NEW_TOKENS, params)
    counts, acceptance = sample_sequences(target, drafter, params, SAMPLED_N)
    seqs = list(exact)
    return chi2_gof([counts[s] for s in seqs], [exact[s] for s in seqs], min_df=SAMPLED_MIN_DF), acceptance


def test_sampled_eagle3_sequences_follow_target(make_tiny_target, chi2_gof):
    """N = 1500 sequences of 4 new tokens at temperature 1 with an Eagle3 drafter (gamma 3, one draft
    layer, random weights) on a 2-layer, 8-token target; Pearson chi-square against the exact target
    distribution over the 4096 sequences (cells with expected count < 5 pooled), alpha = 0.001, at
    least 10 degrees of freedom after pooling; seeds fixed (generate's seed = draw index)."""
    fit, acceptance = _sampled_fit(make_tiny_target, chi2_gof)
    assert 0.05 < acceptance < 0.95, f"acceptance {acceptance:.2f}: the drafter must differ from the target"
    assert fit.impossible == 0 and fit.df >= SAMPLED_MIN_DF
    assert not fit.rejects(SAMPLED_ALPHA), f"chi-square {fit.statistic:.1f} on {fit.df} df, p = {fit.p_value:.2e}"


def test_sampled_test_rejects_a_wrong_verifier(make_tiny_target, chi2_gof, monkeypatch):
    """Power: the same N, alpha and minimum degrees of freedom reject a verifier that accepts every draft
    as if the target agreed (then draws the bonus token from p_t): the Eagle3 drafter's own distribution
    leaks into the output."""

    def accept_all(draft, p_d, p_t, generator=None):
        k = int(draft.shape[0])
        return labkit.core.sampling.Verdict(k, int(labkit.core.sampling.sample(p_t[k], generator)))

    monkeypatch.setattr(labkit.decode.loop, "verify_chain", accept_all)
    fit, acceptance = _sampled_fit(make_tiny_target, chi2_gof)
    assert acceptance == 1.0  # the patch is in effect
    assert fit.rejects(SAMPLED_ALPHA), f"the wrong verifier passed: p = {fit.p_value:.2e} on {fit.df} df"


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny_data(tiny, tmp_path_factory):
    """12 sequences sampled from the tiny target, with their cached features of layers (1, 3) (one shard)."""
    from test_dflash import feature_data
    return feature_data(tiny, tmp_path_factory.mktemp("feats"), (1, 3), 20, VOCAB)


def test_batches_carry_the_sequences_and_the_loss_sees_every_step(tiny, tiny_data):
    """make_batch's ids are the sequences; the lab's loss terms (labkit.pipeline.train.loss_terms, not
    rewritten) score all gamma steps of the TTT forward."""
    model = make_model(tiny, gamma=4).train()
    batch = make_batch(tiny_data, [0, 1], 4, 6, torch.Generator().manual_seed(0), {})
    for r in range(2):
        seq = tiny_data[r].seq.ids
        assert batch["ids"][r, : len(seq)].tolist() == seq
    out = forward_batch(model, batch)
    assert out["logits"].shape[:3] == (2, 6, 4)
    terms = loss_terms(model, out, batch, TrainConfig().loss)
    terms["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert 1.0 <= float(terms["tau_est"]) <= 5.0


def test_training_reduces_loss_on_overfit_set(tiny, tiny_data, tmp_path):
    model = make_model(tiny, gamma=4)
    batch = make_batch(tiny_data, list(range(12)), 4, 16, torch.Generator().manual_seed(5), {})
    cfg = TrainConfig(steps=80, batch_seqs=4, anchors_per_seq=8, lr=3e-3, save_every=40, eval_every=40,
                      val_fraction=0.0)

    def loss():
        with torch.no_grad():
            return float(loss_terms(model, forward_batch(model, batch), batch, cfg.loss)["loss"])
    before = loss()
    train(model, tiny_data, tmp_path / "run", cfg, progress=False, log=lambda *_: None)
    after = loss()
    assert after < 0.7 * before, f"loss {before:.3f} -> {after:.3f}"
    loaded = load_backbone(tmp_path / "run" / "last", tiny, packed=False)
    assert isinstance(loaded, Eagle3Model)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def cli_data(tiny_model_dir, tmp_path_factory):
    from labkit.__main__ import main
    out = tmp_path_factory.mktemp("eagle3-cli") / "data"
    assert main(["prepare-data", "--target", str(tiny_model_dir), "--out", str(out), "--n-prompts", "8",
                 "--max-new-tokens", "12", "--shard-size", "4", "--benchmarks", "lab"]) == 0
    return out


def test_train_command_is_reproducible_and_reads_the_configured_layers(tiny_model_dir, cli_data, tmp_path):
    """`train --drafter eagle3` twice with one --seed gives bit-identical weights (random init included);
    another seed gives other weights; the checkpoint records the kind, the horizon and the layers, the
    feature cache holds those layers only, and `generate --drafter PATH` decodes with it."""
    from labkit.__main__ import main

    def run(name: str, seed: int) -> Path:
        out = tmp_path / name
        assert main(["train", "--drafter", "eagle3", "--target", str(tiny_model_dir), "--data", str(cli_data),
                     "--out", str(out), "--steps", "4", "--save-every", "2", "--batch-seqs", "2", "--anchors", "4",
                     "--gamma", "3", "--target-layers", "2,5,8", "--draft-vocab", "64", "--seed", str(seed)]) == 0
        return out
    a, b, c = run("a", 3), run("b", 3), run("c", 4)
    wa, wb, wc = (load_file(str(r / "last" / "model.safetensors")) for r in (a, b, c))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa if wa[k].is_floating_point())
    cfg = json.loads((a / "last" / "config.json").read_text())
    assert cfg["kind"] == "eagle3" and cfg["gamma"] == 3 and cfg["target_layers"] == [2, 5, 8]
    assert "--drafter eagle3" in cfg["extra"]["train_command"]
    assert [p.name for p in (cli_data / "features").iterdir()] == ["layers-2-5-8"]
    assert main(["generate", "--target", str(tiny_model_dir), "--prompt", "hi", "--drafter", str(a / "last"),
                 "--max-new-tokens", "6"]) == 0


def test_specs_and_options_that_do_not_apply_are_refused(tmp_path):
    from labkit.drafters import check_spec
    from labkit.drafters.factory import make_drafter
    from labkit.pipeline.train import TrainJob
    check_spec("eagle3")
    check_spec("sched:eagle3")
    with pytest.raises(LabkitError, match="one token at a time"):
        check_spec("hybrid:eagle3")
    with pytest.raises(LabkitError, match="eagle3 drafter has none"):
        TrainJob(drafter="eagle3", frozen_mask=True, out=str(tmp_path))
    with pytest.raises(LabkitError, match="No shipped eagle3 drafter.*train --drafter eagle3"):
        make_drafter("eagle3", type("T", (), {"name": "no-such-target"})())


# ----------------------------------------------------------------------------- export (DeepSpec's Eagle3 layout)


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos: int, theta: float):
    """Rotate-half RoPE of x (heads, d) at one position, as Qwen3 applies it."""
    d = x.shape[-1]
    ang = pos / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cat([ang.cos()] * 2), torch.cat([ang.sin()] * 2)
    return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin


def deepspec_eagle3_logits(cfg: dict, w: dict, hidden_states, ids: list[int], p: int, drafts: list[int],
                           shift: int = 1) -> torch.Tensor:
    """Draft logits (len(drafts) + 1, V) read from an export through DeepSpec's names only, in fp64, one slot
    at a time over a growing cache (as DeepSpec's evaluator runs it): slot t < p reads the feature at t
    (hidden_states[id + 1] for each target_layer_id) and token ids[t + 1]; then each draft continues from
    the last output at the next position. `shift` 0 is a deliberately wrong reading of the layer ids."""
    eps, nh, nkv, d = cfg["rms_norm_eps"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta"))
    feats = torch.cat([hidden_states[i + shift][0, :p].double() for i in cfg["target_layer_ids"]], -1)
    g = feats @ w["fc.weight"].T
    emb = w["embed_tokens.weight"]
    cache = [([], []) for _ in range(cfg["num_hidden_layers"])]

    def slot(token: int, x: torch.Tensor, pos: int) -> torch.Tensor:
        for layer, (keys, values) in enumerate(cache):
            t = {k[len(f"layers.{layer}."):]: v for k, v in w.items() if k.startswith(f"layers.{layer}.")}
            u = torch.cat([_rms(emb[token], t["input_layernorm.weight"], eps), _rms(x, t["hidden_norm.weight"], eps)])
            q = _rms((u @ t["self_attn.q_proj.weight"].T).view(nh, d), t["self_attn.q_norm.weight"], eps)
            k = _rms((u @ t["self_attn.k_proj.weight"].T).view(nkv, d), t["self_attn.k_norm.weight"], eps)
            keys.append(_rope(k, pos, theta))
            values.append((u @ t["self_attn.v_proj.weight"].T).view(nkv, d))
            q, kk, vv = _rope(q, pos, theta), torch.stack(keys), torch.stack(values)
            heads = [torch.softmax(kk[:, i // (nh // nkv)] @ q[i] / d ** 0.5, 0) @ vv[:, i // (nh // nkv)]
                     for i in range(nh)]
            x = x + torch.cat(heads) @ t["self_attn.o_proj.weight"].T
            h = _rms(x, t["post_attention_layernorm.weight"], eps)
            x = x + (F.silu(h @ t["mlp.gate_proj.weight"].T) * (h @ t["mlp.up_proj.weight"].T)) @ t["mlp.down_proj.weight"].T
        return x

    for t in range(p):
        x = slot(ids[t + 1], g[t], t)
    rows = [x]
    for j, tok in enumerate(drafts, start=1):
        x = slot(tok, x, p - 1 + j)
        rows.append(x)
    return _rms(torch.stack(rows), w["norm.weight"], eps) @ w["lm_head.weight"].T


@pytest.mark.parametrize("n_layers", [1, 2])
def test_export_read_through_deepspec_names_gives_the_lab_draft_logits(tmp_path, n_layers):
    """A Qwen3 target (grouped-query attention, q/k norms) and an exportable Eagle3 drafter (q/k norm,
    whole vocabulary, layers given unsorted), every weight perturbed and rounded to bf16: the export's
    tensors read by DeepSpec's names into the independent fp64 forward above give the lab's draft logits
    for every step of a chain (1e-4); reading the layer ids without DeepSpec's shift misses by far more."""
    from test_export import _qwen3_target, _round_to_bf16

    from labkit.drafters.export import export_eagle3
    target = _qwen3_target()
    torch.manual_seed(4)
    cfg = Eagle3Config.for_target(target, gamma=4, n_layers=n_layers, target_layers=(2, 1), qk_norm=True)
    model = new_backbone(target, cfg, init_from_target=False)
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(torch.randn_like(prm) * 0.3)
    _round_to_bf16(model)
    model.eval()
    out = export_eagle3(model, target, tmp_path / "export", "test")
    config = json.loads((out / "config.json").read_text())
    w = {k: v.double() for k, v in load_file(str(out / "model.safetensors")).items()}
    assert config["architectures"] == ["Qwen3Eagle3Model"] and config["target_layer_ids"] == [0, 1]
    assert config["ttt_length"] == 4 and config["num_hidden_layers"] == n_layers == config["draft_num_hidden_layers"]
    assert w["fc.weight"].shape == (32, 2 * 32) and w["layers.0.self_attn.q_proj.weight"].shape[1] == 2 * 32
    assert {"layers.0.hidden_norm.weight", "layers.0.input_layernorm.weight", "norm.weight", "lm_head.weight",
            "embed_tokens.weight"} <= w.keys()
    ids = torch.randint(VOCAB, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    p, drafts = 9, [4, 11, 2]
    hs = hidden_states(target, ids)
    drafter = Eagle3Drafter(model)
    request = DraftRequest(ids=ids[: p + 1], params=SamplingParams(), generator=None)
    drafter.start(request, tuple(hs[i][0, :p] for i in cfg.target_layers))
    lab = model.logits(drafter.draft_states(request, drafts)).detach().double()
    theirs = deepspec_eagle3_logits(config, w, hs, ids, p, drafts)
    err = float((lab - theirs).abs().max())
    assert err < 1e-4, err
    wrong = float((lab - deepspec_eagle3_logits(config, w, hs, ids, p, drafts, shift=0)).abs().max())
    assert wrong > 100 * max(err, 1e-6), (wrong, err)


def test_inexpressible_eagle3_drafters_are_refused_and_nothing_written(make_tiny_target, tmp_path):
    from labkit.drafters.export import export_checkpoint, export_eagle3
    target = make_tiny_target(vocab_size=VOCAB, n_layers=3, hidden=H, name="tiny-llama")
    for overrides, fix in ((dict(qk_norm=False), "--qk-norm"),
                           (dict(qk_norm=True, draft_vocab=8), "--draft-vocab 0"),
                           (dict(qk_norm=True, target_layers=(1, 3)), "--target-layers below 3")):
        cfg = Eagle3Config.for_target(target, gamma=3, **overrides)
        model = new_backbone(target, cfg, init_from_target=False)
        with pytest.raises(LabkitError, match=f"Eagle3 layout exactly, so nothing was written.*{fix}"):
            export_eagle3(model, target, tmp_path / "out")
        assert not (tmp_path / "out").exists()
        save_drafter(model, tmp_path / "ck")
        with pytest.raises(LabkitError, match=fix):  # refused from the config, before any model loads
            export_checkpoint(tmp_path / "ck", "no-such-target", tmp_path / "out")
        assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the whole protocol, through its callers


@pytest.fixture(scope="module")
def real_vocab(tiny_model_dir, tmp_path_factory):
    """The tiny model with the default target's tokenizer, and an Eagle3 checkpoint for it (by path, as a
    user passes one), with a cut draft vocabulary of 512 tokens."""
    from labkit.model.target import load_target
    target = load_target(str(tiny_model_dir), device="cpu")
    torch.manual_seed(0)
    cfg = Eagle3Config.for_target(target, gamma=4, target_layers=(1, 2, 5), draft_vocab=512)
    path = save_drafter(new_backbone(target, cfg, init_from_target=False), tmp_path_factory.mktemp("e3") / "ck")
    return target, str(path)


def test_the_protocol_callers_take_an_eagle3_checkpoint(real_vocab):
    """Through make_drafter by path: the declarations the callers read; greedy generate, the bench and the
    batched engine (several requests in one step, algorithm1 policy) all give plain greedy's tokens."""
    from test_drafter_protocol import NEW_TOKENS, PROMPTS

    from labkit.core.scheduler import CostTable
    from labkit.decode.engine import make_requests, run_closed_loop
    from labkit.drafters import make_drafter
    from labkit.measure.bench import run_bench
    target, path = real_vocab
    d = make_drafter(path, target)
    assert isinstance(d, Eagle3Drafter) and d.name == "eagle3" and d.vocab_size == target.vocab_size
    assert d.gamma == 4 and d.hidden_layers == (1, 2, 5) and d.batchable and not d.needs_target_cache
    assert not d.has_confidences and d.temperatures(SamplingParams(1.0)) is None and len(d.draft_vocab()) == 512
    assert make_drafter(path, target, gamma=2).gamma == 2
    solo = {i: generate(target, target.encode_prompt(p.text), None, NEW_TOKENS, SamplingParams()).token_ids
            for i, p in enumerate(PROMPTS)}
    for i, p in enumerate(PROMPTS):
        assert generate(target, target.encode_prompt(p.text), d, NEW_TOKENS, SamplingParams()).token_ids == solo[i]
    result = run_bench(target, PROMPTS, ["ar", f"spec:{path}"], max_new_tokens=NEW_TOKENS, progress=False)
    assert {r["method"]: r for r in result["rows"]}[f"spec:{path}"]["identical_to_ar"] == "2/2"
    requests = make_requests(target, PROMPTS, NEW_TOKENS, SamplingParams(), seed=0)
    rep = run_closed_loop(target, d, requests, 2, "algorithm1", CostTable.flat())
    assert {r["id"]: r["token_ids"] for r in rep["requests"]} == solo
