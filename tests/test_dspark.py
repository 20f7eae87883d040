"""DSpark on tiny random targets: r = 0 is DFlash, the sequential sampler uses exactly the teacher-forced
training distribution, lossless decoding (greedy equality, chi-square), the confidence loss, rank
truncation by SVD, and checkpoints that keep their kind and calibration."""

from __future__ import annotations

import pytest
import torch

from labkit.decode.loop import generate, prefill
from labkit.drafters.checkpoint import load_backbone, save_drafter
from labkit.drafters.dflash import DFlashConfig, DFlashDrafter
from labkit.drafters.dspark import DSparkConfig, DSparkDrafter, DSparkModel, calibration_key, with_transition_rank
from labkit.core.errors import LabkitError
from labkit.core.sampling import SamplingParams
from labkit.pipeline.train import LossWeights, forward_batch, loss_terms, make_batch, new_backbone
from test_dflash import tiny_data  # noqa: F401  (the shared fixture: 12 sequences with cached features)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 16


@pytest.fixture(scope="module")
def tiny(make_tiny_target):
    return make_tiny_target(vocab_size=VOCAB, n_layers=3, hidden=32, init=0.5)


def make_dspark(target, rank=4, head="markov", gamma=4, seed=0, scale=0.5, **kw) -> DSparkModel:
    """A DSpark model whose head is *not* zero (W2 random), so the head changes the draft."""
    torch.manual_seed(seed)
    cfg = DSparkConfig.for_target(target, gamma=gamma, target_layers=(1, 2), rank=rank, head=head, **kw)
    model = new_backbone(target, cfg, init_from_target=False)
    if model.seq_head is not None:
        with torch.no_grad():
            model.seq_head.w2.weight.normal_(0, scale)
    return model.eval()


def _request(target, drafter, prompt=(1, 2, 3), temperature=1.0, seed=0):
    """The drafter's view of a request just prefilled (what propose reads)."""
    return prefill(target, list(prompt), 12, SamplingParams(temperature), seed=seed, drafter=drafter).request


def test_rank_zero_dspark_equals_dflash(tiny):
    """Same seed, rank 0: the same backbone weights, the same logits and the same proposals."""
    torch.manual_seed(0)
    dflash = new_backbone(tiny, DFlashConfig.for_target(tiny, gamma=4, target_layers=(1, 2)),
                          init_from_target=False).eval()
    dspark = make_dspark(tiny, rank=0)
    assert dspark.seq_head is None
    flat = {k: v for k, v in dspark.state_dict().items() if not k.startswith("confidence")}
    assert all(torch.equal(v, dflash.state_dict()[k]) for k, v in flat.items())
    a, b = DFlashDrafter(dflash), DSparkDrafter(dspark)
    for temperature in (0.0, 1.0):
        pa = a.propose(_request(tiny, a, temperature=temperature, seed=5), 4)
        pb = b.propose(_request(tiny, b, temperature=temperature, seed=5), 4)
        assert torch.equal(pa.tokens, pb.tokens)
        assert torch.allclose(pa.probs, pb.probs, atol=1e-6)
    assert generate(tiny, [4, 2], a, 20).token_ids == generate(tiny, [4, 2], b, 20).token_ids


def test_zero_initialised_head_leaves_the_dflash_distribution(tiny):
    model = make_dspark(tiny, rank=4, scale=0.0)
    feats = torch.randn(1, 12, model.fc.in_features)
    anchors, ids = torch.tensor([[3, 7]]), torch.tensor([[1, 5]])
    targets = torch.randint(VOCAB, (1, 2, 4))
    with torch.no_grad():
        out = model(feats, anchors, ids, targets)
    assert torch.equal(out["logits"], out["base_logits"])


@pytest.mark.parametrize("head", ["markov", "rnn"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampled_block_uses_the_teacher_forced_training_distribution(tiny, head, temperature):
    """The probabilities a proposal carries are softmax(U_k + B_k(prefix drawn)), the training forward's
    distribution when that same prefix is fed as targets: what is sampled is what is verified."""
    from labkit.core.sampling import logits_to_probs
    model = make_dspark(tiny, head=head)
    drafter = DSparkDrafter(model)
    request = _request(tiny, drafter, prompt=(3, 1, 4, 1, 5), temperature=temperature, seed=2)
    prop = drafter.propose(request, 4)
    from test_dflash import target_features
    feats = target_features(tiny, request.ids, model.cfg.target_layers)[None]
    with torch.no_grad():
        out = model(feats, torch.tensor([[len(request.ids) - 1]]), torch.tensor([[request.ids[-1]]]), prop.tokens[None, None])
    expect = logits_to_probs(out["logits"][0, 0].float(), SamplingParams(temperature))
    assert torch.allclose(prop.probs, expect, atol=1e-5)
    assert torch.allclose(prop.conf_logits, out["conf_logits"][0, 0], atol=1e-5)
    # the head really moved the logits away from the backbone's
    assert (out["logits"] - out["base_logits"]).abs().max() > 0.1


@pytest.mark.parametrize("head", ["markov", "rnn"])
def test_greedy_dspark_equals_target_greedy(tiny, head):
    drafter = DSparkDrafter(make_dspark(tiny, head=head, scale=1.0))
    for prompt in ([1, 2, 3], [5, 5, 9, 0, 11, 4]):
        spec = generate(tiny, prompt, drafter, 30)
        assert spec.token_ids == generate(tiny, prompt, None, 30).token_ids
        assert any(r.proposed for r in spec.rounds)
        assert all(len(r.conf_logits) == r.proposed for r in spec.rounds if r.proposed)


def test_reduced_vocabulary_dspark_is_lossless(tiny):
    ids = torch.tensor([0, 2, 3, 5, 7, 11, 13])
    torch.manual_seed(0)
    cfg = DSparkConfig.for_target(tiny, gamma=3, target_layers=(1, 2), rank=3, draft_vocab=len(ids))
    model = new_backbone(tiny, cfg, vocab_ids=ids, init_from_target=False).eval()
    with torch.no_grad():
        model.seq_head.w2.weight.normal_(0, 1.0)
    drafter = DSparkDrafter(model)
    prop = drafter.propose(_request(tiny, drafter), 3)
    assert set(prop.tokens.tolist()) <= set(ids.tolist())
    assert torch.allclose(prop.probs.sum(-1), torch.ones(3))
    assert generate(tiny, [1, 2, 3], drafter, 20).token_ids == generate(tiny, [1, 2, 3], None, 20).token_ids


@pytest.mark.parametrize("head", ["markov", "rnn"])
def test_sampled_dspark_sequences_follow_target(make_tiny_target, chi2_gof, head):
    """1500 sequences of 4 new tokens at temperature 1 with a DSpark drafter (gamma 3, random non-zero
    head) on the 8-token tiny target; chi-square against the exact target distribution, alpha 0.001."""
    from test_lossless_tiny_model import assert_sequences_follow_target
    target = make_tiny_target(vocab_size=8, n_layers=2, tied=True, init=0.5)
    torch.manual_seed(0)
    cfg = DSparkConfig.for_target(target, gamma=3, target_layers=(1,), rank=4, head=head)
    model = new_backbone(target, cfg, init_from_target=True)
    with torch.no_grad():
        model.seq_head.w2.weight.normal_(0, 1.0)
    drafter = DSparkDrafter(model.eval())
    assert_sequences_follow_target(target, drafter, chi2_gof)


def test_calibrated_confidences_apply_the_stored_temperatures(tiny):
    model = make_dspark(tiny)
    model.cfg.calibration = {calibration_key(1.0): {"temperatures": [2.0, 0.5, 1.0, 4.0]}}
    drafter = DSparkDrafter(model)
    prop = drafter.propose(_request(tiny, drafter), 4)
    assert torch.allclose(prop.confidences, torch.sigmoid(prop.conf_logits / torch.tensor([2.0, 0.5, 1.0, 4.0])))
    greedy = drafter.propose(_request(tiny, drafter, temperature=0.0), 4)  # no greedy fit: raw sigmoid
    assert torch.allclose(greedy.confidences, torch.sigmoid(greedy.conf_logits))
    raw = DSparkDrafter(model, calibrated=False).propose(_request(tiny, drafter), 4)
    assert torch.allclose(raw.confidences, torch.sigmoid(raw.conf_logits))


def test_transition_rank_truncation_is_the_best_low_rank_approximation(tiny):
    model = make_dspark(tiny, rank=4)
    rows = torch.arange(model.token_index.n_rows)
    full = model.seq_head.w2(model.seq_head.w1(rows)).detach().double()
    sv = torch.linalg.svdvals(full)
    for r in range(5):
        cut = with_transition_rank(model, r)
        bias = cut.seq_head.step(None, rows)[0].double()
        err = torch.linalg.matrix_norm(full - bias)
        assert torch.isclose(err, sv[r:].pow(2).sum().sqrt(), atol=1e-5)  # Eckart-Young
        assert torch.equal(cut.seq_head.step(None, rows)[1], model.seq_head.w1(rows))  # confidence feature kept
    assert model.seq_head.__class__.__name__ == "MarkovHead"  # the original is untouched
    with pytest.raises(LabkitError, match="rank must lie"):
        with_transition_rank(model, 5)


def test_confidence_loss_is_bce_against_one_minus_half_l1(tiny, tiny_data):
    """The conf term equals a hand computation of BCE(c, 1 - 0.5 * L1) with the position weights."""
    import torch.nn.functional as F
    from labkit.pipeline.train import position_weights, target_probs
    model = make_dspark(tiny, gamma=4)
    batch = make_batch(tiny_data, [0, 1], 4, 8, torch.Generator().manual_seed(0), {})
    with torch.no_grad():
        out = forward_batch(model, batch)
        terms = loss_terms(model, out, batch, LossWeights())
        q = torch.softmax(out["logits"].float(), -1)
        c_star = 1 - 0.5 * (q - target_probs(model, batch["final"], batch["lse"])).abs().sum(-1)
        w = position_weights(4, 4.0) * batch["valid"].float()
        bce = F.binary_cross_entropy_with_logits(out["conf_logits"], c_star.clamp(0, 1), reduction="none")
    assert torch.isclose(terms["conf"], (bce * w).sum() / w.sum(), atol=1e-5)
    assert torch.isclose(terms["loss"], 0.1 * terms["ce"] + 0.9 * terms["l1"] + terms["conf"], atol=1e-5)


def test_dspark_training_lowers_loss_and_round_trips(tiny, tiny_data, tmp_path):
    from test_dflash import _cfg
    from labkit.pipeline.train import train
    model = make_dspark(tiny, gamma=4).train()
    batch = make_batch(tiny_data, list(range(12)), 4, 16, torch.Generator().manual_seed(5), {})

    def terms():
        with torch.no_grad():
            return loss_terms(model, forward_batch(model, batch), batch, LossWeights())
    before = terms()
    train(model, tiny_data, tmp_path / "run", _cfg(steps=80), progress=False, log=lambda *_: None)
    after = terms()
    assert after["loss"] < 0.7 * before["loss"] and after["conf_mae"] < before["conf_mae"]
    model.cfg.calibration = {"T=1": {"temperatures": [1.5, 1, 1, 1]}}
    save_drafter(model, tmp_path / "ck")
    loaded = load_backbone(tmp_path / "ck", tiny)
    assert isinstance(loaded, DSparkModel) and loaded.cfg.calibration == model.cfg.calibration
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
