"""The hybrid drafter (prompt lookup, then DSpark or DFlash for the rest of the block) on tiny random
targets: greedy equality, every proposal row the exact distribution its token was drawn from given the
drafted prefix, sampled sequences distributed as the target's, the spec grammar, and one real check.

Prompts repeat themselves so that n-gram matches really occur; every test that decodes asserts that
both parts drafted, and that rounds with a copied prefix *and* a model tail occurred (the path where
the model is conditioned on forced tokens).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from labkit.decode.loop import generate, prefill, speculative_round
from labkit.drafters import BUILTIN, check_spec, make_drafter
from labkit.drafters.checkpoint import save_drafter
from labkit.drafters.dflash import DFlashDrafter
from labkit.drafters.dspark import DSparkDrafter
from labkit.drafters.hybrid import HybridConfig, HybridDrafter
from labkit.drafters.prompt_lookup import PromptLookupConfig
from labkit.core.errors import LabkitError
from labkit.core.sampling import SamplingParams, logits_to_probs
from test_dflash import make_backbone, target_features
from test_dspark import make_dspark

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 16
ALPHA = 0.001
REPEATING = [3, 9, 4, 1, 3, 9, 4, 1, 3, 9, 4, 1, 3, 9]


@pytest.fixture(scope="module")
def tiny(make_tiny_target):
    return make_tiny_target(vocab_size=VOCAB, n_layers=3, hidden=32, init=0.5)


def model_drafter(target, kind: str):
    """dspark-markov / dspark-rnn (random non-zero heads) or dflash, gamma 4, on `target`; drafting whole
    blocks even when capped (fit_block=False), as the training forward these tests recompute rows with
    does (a cut block's batched and solo drafts are tested equal in test_batched_drafting)."""
    if kind == "dflash":
        return DFlashDrafter(make_backbone(target, gamma=4), fit_block=False)
    return DSparkDrafter(make_dspark(target, head=kind.split("-")[1], gamma=4, scale=1.0), fit_block=False)


def hybrid(model, lookup_gamma: int = 2, min_ngram: int = 2) -> HybridDrafter:
    """Lookup gamma 2 < the model's 4, so every matched round also has a model tail."""
    return HybridDrafter(model, HybridConfig(PromptLookupConfig(gamma=lookup_gamma, min_ngram=min_ngram)))


KINDS = ["dspark-markov", "dspark-rnn", "dflash"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lookup_gamma", [2, 8])
def test_greedy_hybrid_equals_target_greedy(tiny, kind, lookup_gamma):
    """fp32 greedy speculative output is the target's own greedy output, token for token."""
    drafter = hybrid(model_drafter(tiny, kind), lookup_gamma)
    for prompt in (REPEATING, [5, 5, 9, 0, 11, 4, 5, 5, 9]):
        spec = generate(tiny, prompt, drafter, 40)
        assert spec.token_ids == generate(tiny, prompt, None, 40).token_ids
    c = drafter.counts
    assert c["copy_rounds"] > 0 and c["copied"] > 0 and c["rounds"] > c["copy_rounds"], c
    assert c["drafted"] > 0, c


def _model_rows(target, model, state, tokens: torch.Tensor) -> torch.Tensor:
    """The model's own distributions for the block `tokens` after state.ids, recomputed independently:
    DSpark's teacher-forced training forward (the head fed the block's tokens as x_{k-1}), DFlash's
    training forward (positions independent of earlier drafts); from an uncached target forward."""
    m = model.backbone
    feats = target_features(target, state.ids, m.cfg.target_layers)[None]
    anchor_pos, anchor = torch.tensor([[len(state.ids) - 1]]), torch.tensor([[state.ids[-1]]])
    with torch.no_grad():
        if isinstance(model, DSparkDrafter):
            padded = torch.cat([tokens, tokens.new_zeros(m.cfg.gamma - len(tokens))])  # later slots unused
            logits = m(feats, anchor_pos, anchor, padded[None, None])["logits"][0, 0]
        else:
            logits = m(feats, anchor_pos, anchor)["logits"][0, 0]
    p = logits_to_probs(logits[: len(tokens)].float(), state.params)
    if m.full_vocab:
        return p
    full = torch.zeros(len(tokens), target.vocab_size)
    full[:, m.vocab_ids] = p
    return full


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_proposal_rows_are_the_distributions_drawn_from(tiny, kind, temperature):
    """Over whole decodes: copied positions are the n-gram continuation with one-hot rows; every model
    position's row equals the model's distribution for that drafted prefix (recomputed by teacher
    forcing); each proposed token has positive mass in its row; rounds without a match are the model's."""
    model = model_drafter(tiny, kind)
    drafter = hybrid(model, min_ngram=1)
    mixed = plain = 0
    for seed in range(3):
        state = prefill(tiny, REPEATING, 24, SamplingParams(temperature), seed=seed, drafter=drafter)
        while not state.finished:
            copied = drafter.continuation(state.request, state.remaining - 1)
            gen_before = state.generator.get_state()
            prop = drafter.propose(state.request, state.remaining - 1)
            n_copy = len(copied)
            assert prop.tokens[:n_copy].tolist() == copied
            assert torch.equal(prop.probs[:n_copy], torch.nn.functional.one_hot(prop.tokens[:n_copy], VOCAB).float())
            rows = prop.probs[n_copy:]
            if len(rows):
                expect = _model_rows(tiny, model, state, prop.tokens)[n_copy:]
                assert torch.allclose(rows, expect, atol=1e-5)
                mixed += n_copy > 0
                plain += n_copy == 0
            if n_copy == 0:  # no match: exactly the model drafter's own proposal, confidences included
                state.generator.set_state(gen_before)
                own = model.propose(state.request, state.remaining - 1)
                assert torch.equal(own.tokens, prop.tokens) and torch.equal(own.probs, prop.probs)
                assert (own.conf_logits is None) == (prop.conf_logits is None)
            else:
                assert prop.conf_logits is None
            assert bool((prop.probs.gather(1, prop.tokens[:, None]) > 0).all())
            # verify this very proposal: rewind the generator so the round re-drafts the same block
            state.generator.set_state(gen_before)
            speculative_round(tiny, state, drafter)
    assert mixed > 0 and plain > 0, (mixed, plain)


@pytest.mark.parametrize("kind", ["dspark-markov", "dspark-rnn"])
def test_model_tail_tokens_follow_their_rows(tiny, chi2_gof, kind):
    """The first model token after a copied prefix is drawn from the row the proposal states: 3000
    proposals from one state at temperature 10 (flat enough rows for the test to have power; generator
    seeds 0..2999), chi-square of that token's counts against the row, alpha 0.001. The row depends on
    the prefix only, and on the copied token: the head reads it as x_{k-1}."""
    model = model_drafter(tiny, kind)
    drafter = hybrid(model, min_ngram=1)
    params = SamplingParams(10.0)
    states = (prefill(tiny, REPEATING, 12, params, seed=s, drafter=drafter) for s in range(50))
    state = next(st for st in states if 0 < len(drafter.continuation(st.request, 4)) < 4)
    copied = drafter.continuation(state.request, 4)
    counts, row = Counter(), None
    for seed in range(3000):
        state.generator.manual_seed(seed)
        prop = drafter.propose(state.request, 4)
        counts[int(prop.tokens[len(copied)])] += 1
        row = prop.probs[len(copied)] if row is None else row
        assert torch.equal(row, prop.probs[len(copied)])
    assert row.max() < 0.9
    fit = chi2_gof([counts[v] for v in range(VOCAB)], row.tolist())
    assert fit.impossible == 0 and not fit.rejects(ALPHA), fit
    other = copied[:-1] + [(copied[-1] + 1) % VOCAB]
    h = model.draft_hidden(state.request)[:4]
    with torch.no_grad():
        rows = [model.sample_sequential(h, state.ids[-1], params, state.generator, forced=f).probs[0]
                for f in (copied, other)]
    assert torch.equal(rows[0], row) and (rows[0].log() - rows[1].log()).abs().max() > 1e-3


def _exact_sequence_probs(target, prompt: list[int], length: int) -> dict[tuple[int, ...], float]:
    """P_target(new tokens = s) at temperature 1 for every s in V^length (test_lossless_tiny_model's)."""
    from test_lossless_tiny_model import exact_sequence_probs
    return exact_sequence_probs(target, prompt, length, SamplingParams(1.0))


#: the sampled tests: sequences drawn, and the fewest degrees of freedom left after pooling cells of
#: expected count < 5 (fewer and the test could hardly reject anything); the significance level is ALPHA
SAMPLED_N, SAMPLED_MIN_DF = 1500, 10


@pytest.mark.parametrize("kind,verifier", [("dspark-markov", "exact"), ("dspark-rnn", "exact"), ("dflash", "exact"),
                                           ("dspark-markov", "wrong")])
def test_sampled_hybrid_sequences_follow_target(make_tiny_target, chi2_gof, kind, verifier, monkeypatch):
    """SAMPLED_N sequences of 3 new tokens at temperature 1 (generate's seed = draw index) on the
    8-token tiny target after a repeating prompt, drafted by the hybrid (lookup min_ngram 1, gamma 1;
    model gamma 3); chi-square against the exact target distribution over the 512 sequences, alpha
    ALPHA, at least SAMPLED_MIN_DF degrees of freedom. Drafts must be both accepted and rejected, and
    copied and model-drafted. The same test rejects a deliberately wrong verifier (`wrong_judge`: every
    draft accepted), so passing it means something."""
    target = make_tiny_target(vocab_size=8, n_layers=2, tied=True, init=0.5)
    prompt = [1, 5, 2, 1, 5, 2, 1, 5]
    torch.manual_seed(0)
    from labkit.drafters.dflash import DFlashConfig
    from labkit.drafters.dspark import DSparkConfig
    from labkit.pipeline.train import new_backbone
    if kind == "dflash":
        model = DFlashDrafter(new_backbone(target, DFlashConfig.for_target(target, gamma=3, target_layers=(1,)),
                                           init_from_target=True))
    else:
        cfg = DSparkConfig.for_target(target, gamma=3, target_layers=(1,), rank=4, head=kind.split("-")[1])
        backbone = new_backbone(target, cfg, init_from_target=True)
        with torch.no_grad():
            backbone.seq_head.w2.weight.normal_(0, 1.0)
        model = DSparkDrafter(backbone.eval())
    drafter = hybrid(model, lookup_gamma=1, min_ngram=1)
    exact = _exact_sequence_probs(target, prompt, 3)
    if verifier == "wrong":
        import labkit.decode.loop as loop
        from test_serving import wrong_judge
        monkeypatch.setattr(loop, "judge", wrong_judge)
    counts, accepted, proposed = Counter(), 0, 0
    for seed in range(SAMPLED_N):
        result = generate(target, prompt, drafter, max_new_tokens=3, params=SamplingParams(1.0), seed=seed)
        counts[tuple(result.token_ids)] += 1
        accepted += sum(r.accepted for r in result.rounds)
        proposed += sum(r.proposed for r in result.rounds)
    c = drafter.counts
    assert c["copy_rounds"] > 0 and c["rounds"] > c["copy_rounds"] and c["drafted"] > c["copy_rounds"], c
    seqs = list(exact)
    fit = chi2_gof([counts[s] for s in seqs], [exact[s] for s in seqs], min_df=SAMPLED_MIN_DF)
    if verifier == "wrong":
        assert fit.rejects(ALPHA), f"the wrong verifier passed: p = {fit.p_value:.2e} on {fit.df} df"
        return
    assert 0.05 < accepted / proposed < 0.95, accepted / proposed
    assert fit.impossible == 0 and fit.df >= SAMPLED_MIN_DF
    assert not fit.rejects(ALPHA), f"chi-square {fit.statistic:.1f} on {fit.df} df, p = {fit.p_value:.2e}"


def test_spec_grammar_accepts_and_refuses(tiny, tmp_path):
    assert "hybrid" in BUILTIN
    for ok in ("hybrid:dspark", "hybrid:dflash"):
        check_spec(ok)
    save_drafter(make_dspark(tiny, gamma=4), tmp_path / "ck")
    check_spec(f"hybrid:{tmp_path / 'ck'}")
    refused = {"hybrid": "needs the model drafter", "hybrid:": "needs the model drafter",
               "hybrid:prompt-lookup": "hybrid:dspark, hybrid:dflash", "hybrid:layer-skip:2": "hybrid:PATH",
               "hybrid:hybrid:dspark": "hybrid:dspark", "hybrid:none": "hybrid:dflash",
               "hybrid:dspark:x": "got .hybrid:dspark:x", f"hybrid:{tmp_path / 'nothing'}": "not a drafter checkpoint"}
    for spec, message in refused.items():
        with pytest.raises(LabkitError, match=message) as err:
            check_spec(spec)
        assert "\n" not in str(err.value)


def test_make_drafter_builds_the_hybrid_and_gamma_caps_both_parts(tiny, tmp_path):
    save_drafter(make_dspark(tiny, gamma=4), tmp_path / "spark")
    save_drafter(make_backbone(tiny, gamma=4), tmp_path / "flash")
    spark = make_drafter(f"hybrid:{tmp_path / 'spark'}", tiny)
    assert isinstance(spark, HybridDrafter) and isinstance(spark.model, DSparkDrafter)
    assert spark.name == "hybrid:dspark" and spark.gamma == 4 == spark.cfg.lookup.gamma
    assert spark.hidden_layers == spark.model.hidden_layers
    flash = make_drafter(f"hybrid:{tmp_path / 'flash'}", tiny, gamma=3)
    assert type(flash.model) is DFlashDrafter and flash.model.gamma == 3 == flash.cfg.lookup.gamma
    assert generate(tiny, REPEATING, flash, 20).token_ids == generate(tiny, REPEATING, None, 20).token_ids
    with pytest.raises(LabkitError, match="wraps a DFlash or DSpark drafter"):
        HybridDrafter(make_drafter("prompt-lookup", tiny))


@pytest.mark.slow
def test_real_hybrid_dspark_greedy_equals_plain(real_target):
    """The shipped DSpark behind the hybrid, fp32 greedy, 2 real prompts x 48 new tokens."""
    drafter = make_drafter("hybrid:dspark", real_target)
    prompts = ["Repeat this sentence exactly twice: the quick brown fox jumps over the lazy dog.",
               "Write a Python function that returns the sum of a list of numbers, then call it on [1, 2, 3]."]
    for text in prompts:
        ids = real_target.encode_prompt(text)
        assert generate(real_target, ids, drafter, 48).token_ids == generate(real_target, ids, None, 48).token_ids
    assert drafter.counts["copy_rounds"] > 0 and drafter.counts["drafted"] > 0, drafter.counts
