"""DFlash on tiny random targets: the mask (no leakage), the incremental context cache, training,
checkpoints, resume, and lossless decoding (greedy equality, chi-square on sampled sequences)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit.pipeline.data import Sequence
from labkit.decode.loop import generate, prefill, speculative_round
from labkit.drafters.base import DraftRequest
from labkit.drafters.checkpoint import load_backbone, save_drafter
from labkit.drafters.dflash import ContextCache, DFlashConfig, DFlashDrafter, block_attention_mask, default_layers
from labkit.core.errors import LabkitError
from labkit.pipeline.features import FeatureSequence, shard_features
from labkit.core.sampling import SamplingParams
from labkit.pipeline.train import TrainConfig, loss_terms, make_batch, new_backbone, read_metrics, train

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 16


@pytest.fixture(scope="module")
def tiny(make_tiny_target):
    return make_tiny_target(vocab_size=VOCAB, n_layers=3, hidden=32, init=0.5)


def make_backbone(target, gamma=4, n_layers=1, anchor_predicts=True, seed=0, draft_vocab=0, vocab_ids=None):
    torch.manual_seed(seed)
    cfg = DFlashConfig.for_target(target, gamma=gamma, n_layers=n_layers, target_layers=(1, 2),
                                  anchor_predicts=anchor_predicts, draft_vocab=draft_vocab)
    return new_backbone(target, cfg, vocab_ids=vocab_ids, init_from_target=False)


@torch.no_grad()
def target_features(target, ids: list[int], layers) -> torch.Tensor:
    out = target.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return torch.cat([out.hidden_states[i][0] for i in layers], -1)


def test_default_layers_spread_over_depth():
    for n in (12, 30, 36):
        layers = default_layers(n)
        gaps = [b - a for a, b in zip(layers, layers[1:])]
        assert layers[0] == 1 and layers[-1] == n - 2 and len(layers) == 5
        assert max(gaps) - min(gaps) <= 1 and min(gaps) > 0
    assert default_layers(2) == (1,)
    assert all(1 <= i <= 3 for i in default_layers(4))


def test_block_mask_shape_and_rules():
    mask = block_attention_mask(torch.tensor([[3, 5]]), n_ctx=8, n_slots=2)
    assert mask.shape == (1, 4, 8 + 4)
    # block 0 (anchor 3): context 0..2, its own two slots
    assert mask[0, 0, :8].tolist() == [True] * 3 + [False] * 5
    assert mask[0, 1, 8:].tolist() == [True, True, False, False]
    # block 1 (anchor 5): context 0..4, its own two slots only
    assert mask[0, 2, :8].tolist() == [True] * 5 + [False] * 3
    assert mask[0, 3, 8:].tolist() == [False, False, True, True]


@settings(max_examples=15, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("anchor_predicts", [True, False])
def test_no_leakage(tiny, anchor_predicts, data):
    """Changing any context feature at or after a block's anchor, or another block's anchor token,
    leaves that block's draft logits unchanged (training-time forward, several blocks packed)."""
    model = make_backbone(tiny, gamma=3, anchor_predicts=anchor_predicts).eval()
    n = 20
    feats = torch.randn(1, n, model.fc.in_features)
    anchors = torch.tensor([data.draw(st.lists(st.integers(0, n - 1), min_size=3, max_size=3))])
    ids = torch.tensor([data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=3, max_size=3))])
    block = data.draw(st.integers(0, 2))
    with torch.no_grad():
        before = model(feats, anchors, ids)["logits"][0, block]
        feats2 = feats.clone()
        cut = int(anchors[0, block])
        feats2[0, cut:] = torch.randn(n - cut, feats.shape[-1]) * 3
        ids2 = ids.clone()
        for other in range(3):
            if other != block:
                ids2[0, other] = (ids2[0, other] + 1) % VOCAB
        after = model(feats2, anchors, ids2)["logits"][0, block]
        assert torch.allclose(before, after, atol=1e-5)
        # and the block does read its context: changing a position before the anchor moves it
        if cut > 0:
            feats3 = feats.clone()
            feats3[0, :cut] += 5.0
            moved = model(feats3, anchors, ids)["logits"][0, block]
            assert not torch.allclose(before, moved, atol=1e-4)


def test_decode_time_drafting_matches_training_forward(tiny):
    """The decode-time path (context cache + one block) gives the training forward's logits."""
    model = make_backbone(tiny, gamma=4).eval()
    drafter = DFlashDrafter(model)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    feats = target_features(tiny, ids[:-1], model.cfg.target_layers)

    request = DraftRequest(ids=ids, params=SamplingParams(), generator=None)  # all a drafter sees
    drafter.start(request, tuple(feats[:, i * 32:(i + 1) * 32] for i in range(2)))  # (T, H) per layer
    dec = drafter.draft_logits(request)
    with torch.no_grad():
        full = target_features(tiny, ids, model.cfg.target_layers)[None]
        train_logits = model(full, torch.tensor([[len(ids) - 1]]), torch.tensor([[ids[-1]]]))["logits"][0, 0]
    assert torch.allclose(dec, train_logits, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_incremental_context_cache_equals_recomputed(tiny, temperature):
    """After every round, drafting from the incrementally extended cache equals drafting from a cache
    rebuilt from the full context recomputed by the target (accepted prefixes of different lengths)."""
    model = make_backbone(tiny, gamma=4).eval()
    drafter = DFlashDrafter(model)
    state = prefill(tiny, [2, 7, 1, 8], 24, SamplingParams(temperature), seed=3, drafter=drafter)
    lengths = set()
    while not state.finished:
        rnd = speculative_round(tiny, state, drafter)
        lengths.add(rnd.accepted)
        if state.finished:
            break
        cache: ContextCache = state.request.memo
        assert cache.length == len(state.ids) - 1 == state.cache.get_seq_length()
        fresh = DraftRequest(ids=list(state.ids), params=state.params, generator=None)
        feats = target_features(tiny, state.ids[:-1], model.cfg.target_layers)
        drafter.start(fresh, tuple(feats[:, i * 32:(i + 1) * 32] for i in range(2)))
        assert torch.allclose(drafter.draft_logits(state.request), drafter.draft_logits(fresh), atol=1e-5)
    assert len(lengths) >= 2, f"only accepted lengths {lengths}: the test should see crops of several sizes"


def test_context_cache_crop():
    kv = [(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))]
    cache = ContextCache(kv=kv, length=5)
    cache.crop(3)
    assert cache.length == 3 and cache.kv[0][0].shape[2] == 3
    assert torch.equal(cache.kv[0][0], kv[0][0][:, :, :3])


@pytest.mark.parametrize("anchor_predicts", [True, False])
def test_greedy_dflash_equals_target_greedy(tiny, anchor_predicts):
    model = make_backbone(tiny, gamma=4, anchor_predicts=anchor_predicts)
    drafter = DFlashDrafter(model)
    for prompt in ([1, 2, 3], [5, 5, 9, 0, 11, 4]):
        plain = generate(tiny, prompt, None, 30)
        spec = generate(tiny, prompt, drafter, 30)
        assert spec.token_ids == plain.token_ids
        assert any(r.proposed for r in spec.rounds)


def test_reduced_draft_vocabulary_is_lossless_and_zero_outside(tiny):
    ids = torch.tensor([0, 2, 3, 5, 7, 11, 13])
    model = make_backbone(tiny, gamma=3, draft_vocab=len(ids), vocab_ids=ids)
    drafter = DFlashDrafter(model)
    state = prefill(tiny, [1, 2, 3], 10, SamplingParams(1.0), seed=0, drafter=drafter)
    prop = drafter.propose(state.request, 3)
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[ids] = False
    assert torch.all(prop.probs[:, outside] == 0)
    assert torch.allclose(prop.probs.sum(-1), torch.ones(3))
    assert set(prop.tokens.tolist()) <= set(ids.tolist())
    assert generate(tiny, [1, 2, 3], drafter, 20).token_ids == generate(tiny, [1, 2, 3], None, 20).token_ids


def test_sampled_dflash_sequences_follow_target(make_tiny_target, chi2_gof):
    """1500 sequences of 4 new tokens at temperature 1 with a DFlash drafter (gamma 3) on the 8-token
    tiny target; chi-square against the exact target distribution over 4096 sequences, alpha 0.001,
    seeds fixed (the foundation's test, with this drafter)."""
    from test_lossless_tiny_model import assert_sequences_follow_target
    target = make_tiny_target(vocab_size=8, n_layers=2, tied=True, init=0.5)
    torch.manual_seed(0)
    cfg = DFlashConfig.for_target(target, gamma=3, target_layers=(1,))
    drafter = DFlashDrafter(new_backbone(target, cfg, init_from_target=True))
    assert_sequences_follow_target(target, drafter, chi2_gof)


# ----------------------------------------------------------------------------- training


def feature_data(target, folder, layers: tuple[int, ...], new_tokens: int, vocab: int = VOCAB) -> list:
    """12 sequences sampled from `target` (4-token prompts, `new_tokens` at T=0.8), with their cached
    features of `layers` in one shard under `folder`."""
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(12):
        prompt = torch.randint(vocab, (4,), generator=gen).tolist()
        out = generate(target, prompt, None, new_tokens, SamplingParams(0.8), seed=i)
        seqs.append(Sequence(prompt + out.token_ids, 4, "math"))
    tokens = torch.tensor([t for s in seqs for t in s.ids], dtype=torch.int32)
    offsets = torch.tensor([0] + [len(s.ids) for s in seqs]).cumsum(0)
    path = folder / "shard-00000.safetensors"
    save_file(shard_features(target, tokens, offsets, layers, batch_tokens=64), str(path))
    return [FeatureSequence(s, path, int(offsets[i])) for i, s in enumerate(seqs)]


@pytest.fixture(scope="module")
def tiny_data(tiny, tmp_path_factory):
    """12 sequences sampled from the tiny target, with their cached features (one shard)."""
    return feature_data(tiny, tmp_path_factory.mktemp("feats"), (1, 2), 24)


def test_make_batch_targets_and_positions(tiny_data):
    gen = torch.Generator().manual_seed(0)
    batch = make_batch(tiny_data, [0, 1], gamma=4, anchors=8, gen=gen, handles={})
    for r in range(2):
        seq = tiny_data[r].seq
        for a in range(8):
            pos = int(batch["anchor_pos"][r, a])
            assert seq.prompt_len - 1 <= pos <= len(seq.ids) - 2
            assert int(batch["anchor_ids"][r, a]) == seq.ids[pos]
            for j in range(4):
                if batch["valid"][r, a, j]:
                    assert int(batch["targets"][r, a, j]) == seq.ids[pos + 1 + j]


def test_target_probs_from_cache_match_the_model(tiny, tiny_data):
    """exp(h_final . W - lse) from the feature cache is the target's own next-token distribution."""
    from labkit.pipeline.train import target_probs
    model = make_backbone(tiny)
    batch = make_batch(tiny_data, [0], gamma=4, anchors=4, gen=torch.Generator().manual_seed(1), handles={})
    p = target_probs(model, batch["final"], batch["lse"])
    ids = tiny_data[0].seq.ids
    with torch.no_grad():
        ref = torch.softmax(tiny.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    pos = int(batch["anchor_pos"][0, 0])
    assert torch.allclose(p[0, 0, 0], ref[pos], atol=2e-3)  # final hidden is cached in fp16


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=40, batch_seqs=4, anchors_per_seq=8, lr=3e-3, save_every=20, eval_every=20,
                val_fraction=0.0)
    base.update(kw)
    return TrainConfig(**base)


def test_training_reduces_loss_on_overfit_set(tiny, tiny_data, tmp_path):
    model = make_backbone(tiny, gamma=4)
    gen = torch.Generator().manual_seed(5)
    batch = make_batch(tiny_data, list(range(12)), 4, 16, gen, {})

    def loss():
        with torch.no_grad():
            return float(loss_terms(model, model(batch["feats"], batch["anchor_pos"], batch["anchor_ids"]),
                                    batch, _cfg().loss)["loss"])
    before = loss()
    train(model, tiny_data, tmp_path / "run", _cfg(steps=80), progress=False, log=lambda *_: None)
    after = loss()
    assert after < 0.7 * before, f"loss {before:.3f} -> {after:.3f}"
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [20, 40, 60, 80]
    assert all(1.0 <= r["tau_est"] <= 5.0 for r in rows)


def test_checkpoint_round_trip_is_exact(tiny, tmp_path):
    model = make_backbone(tiny, gamma=4, seed=3)
    save_drafter(model, tmp_path / "ck")
    loaded = load_backbone(tmp_path / "ck", tiny)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["gamma"] == 4 and tuple(cfg["target_layers"]) == (1, 2)
    assert not any(k in a for k in ("embed", "head")), "the frozen target tensors are not saved"


def test_resume_continues_from_saved_step(tiny, tiny_data, tmp_path):
    """Stopped at step 20 and resumed, a run ends with the same weights as an uninterrupted one."""
    full = make_backbone(tiny, seed=1)
    train(full, tiny_data, tmp_path / "a", _cfg(), progress=False, log=lambda *_: None)
    part = make_backbone(tiny, seed=1)
    train(part, tiny_data, tmp_path / "b", _cfg(), progress=False, log=lambda *_: None, stop_at=20)
    assert json.loads((tmp_path / "b" / "last" / "config.json").read_text())["extra"]["step"] == 20
    messages = []
    resumed = make_backbone(tiny, seed=99)  # different init: the checkpoint must overwrite it
    train(resumed, tiny_data, tmp_path / "b", _cfg(), progress=False, log=messages.append)
    assert any("step 20" in m for m in messages)
    for k, v in full.state_dict().items():
        assert torch.allclose(v, resumed.state_dict()[k], atol=1e-6), k


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tiny, tiny_data, tmp_path):
    model = make_backbone(tiny)
    train(model, tiny_data, tmp_path / "r", _cfg(steps=2, save_every=1), progress=False, log=lambda *_: None)
    good = (tmp_path / "r" / "last" / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "nan.safetensors"))
    bad = make_backbone(tiny)
    with torch.no_grad():
        bad.fc.weight.fill_(float("nan"))
    with pytest.raises(LabkitError, match="loss became nan at step 0.*last good checkpoint"):
        train(bad, tiny_data, tmp_path / "r", _cfg(steps=4, save_every=1), resume=False, progress=False,
              log=lambda *_: None)
    assert (tmp_path / "r" / "last" / "model.safetensors").read_bytes() == good


def test_checkpoint_for_another_target_is_refused(tiny, make_tiny_target, tmp_path):
    save_drafter(make_backbone(tiny), tmp_path / "ck")
    other = make_tiny_target(vocab_size=VOCAB, n_layers=4, hidden=32, name="other-llama")
    with pytest.raises(LabkitError, match="tiny-llama.*other-llama.*num_layers 3 vs 4"):
        load_backbone(tmp_path / "ck", other)


def test_not_a_checkpoint_names_the_fix(tiny, tmp_path):
    with pytest.raises(LabkitError, match="not a drafter checkpoint.*labkit train"):
        load_backbone(tmp_path, tiny)


def test_drafter_modules_import_one_way():
    """dspark imports dflash, never the reverse; checkpoint I/O (which knows both kinds) imports both.
    Read from the modules' syntax trees (tests/test_layers.py), function bodies included."""
    from test_layers import graph
    g = graph()
    assert "labkit.drafters.dflash" in g["labkit.drafters.dspark"]
    assert "labkit.drafters.dspark" not in g["labkit.drafters.dflash"]
    assert {"labkit.drafters.dflash", "labkit.drafters.dspark"} <= g["labkit.drafters.checkpoint"]


def test_frequent_tokens_keeps_the_most_common_and_the_stop_tokens(tmp_path):
    from labkit.pipeline.train import frequent_tokens, vocab_coverage
    items = [FeatureSequence(Sequence([9, 9, 1, 1, 1, 2, 3], 2, "chat"), tmp_path, 0),
             FeatureSequence(Sequence([9, 1, 2, 4], 1, "code"), tmp_path, 0)]
    ids = frequent_tokens(items, 3, always={7})
    assert ids.tolist() == [1, 2, 7]  # prompt tokens (9) do not count; 7 is kept as a stop token
    assert vocab_coverage(items, ids) == pytest.approx(6 / 8)  # responses 1 1 1 2 3 and 1 2 4
