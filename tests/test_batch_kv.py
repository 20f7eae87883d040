"""labkit.model.batch_kv: one batched KV cache with ragged rows, per-row rollback, admission and retirement.

Every batched result is compared with the same request run alone: `Target.forward` on its own
DynamicCache, unpadded, rolled back with `crop`. Tolerance: max abs difference <= 1e-4 in fp32 (TOL),
for logits and hidden states. The tiny Llamas here use init 0.2, where fp32 rounding alone moves their
logits (|logit| up to ~5) by ~3e-6 between a chunked and a one-shot forward, while changing one context
token moves them by ~1: a leak or a wrong position would be 4 orders of magnitude above TOL.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from labkit.model.batch_kv import BatchKV
from labkit.model.timing import time_step
from labkit.core.errors import LabkitError
from labkit.model.target import Target

from conftest import ToyTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4


@pytest.fixture(params=[True, False], ids=["packed", "padded"])
def packed(request) -> bool:
    """Both step layouts: packed (labkit.model.ragged, the default) and padded."""
    return request.param
VOCAB = 64
LAYERS = (0, 1, 3)  # embeddings, first and last layer of the 3-layer toy


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def target(request, make_tiny_target):
    t = make_tiny_target(vocab_size=VOCAB, n_layers=3, hidden=32, init=0.2, seed=1)
    t.model.set_attn_implementation(request.param)
    return t


@pytest.fixture(scope="module")
def sdpa_target(make_tiny_target):
    return make_tiny_target(vocab_size=VOCAB, n_layers=3, hidden=32, init=0.2, seed=2)


class Solo:
    """One request alone: the unpadded reference."""

    def __init__(self, target: Target, prompt: list[int]):
        self.target, self.cache = target, target.new_cache()
        self.accepted = list(prompt)
        logits, hidden = target.forward(prompt, self.cache, hidden_states=True)
        self.first = logits[-1], tuple(hidden[i][0] for i in LAYERS)

    def step(self, tokens: list[int]):
        logits, hidden = self.target.forward(tokens, self.cache, logits_to_keep=len(tokens), hidden_states=True)
        self.accepted += tokens
        return logits, tuple(hidden[i][0] for i in LAYERS)

    def rollback(self, n: int) -> None:
        if n:
            self.cache.crop(-n)
            del self.accepted[-n:]


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def check_row(got, want) -> None:
    (logits, hidden), (solo_logits, solo_hidden) = got, want
    assert torch.isfinite(logits).all()
    assert close(logits, solo_logits) <= TOL
    if hidden is None:  # a BatchKV without hidden_layers
        return
    assert len(hidden) == len(solo_hidden)
    for h, s in zip(hidden, solo_hidden):
        assert close(h, s) <= TOL


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def run_step(kv: BatchKV, solos: dict, widths: dict, rng: random.Random, rollback: bool = True) -> dict:
    """One batched step checked against every solo; then a random rollback per row (the first token,
    the one a real engine always keeps, stays). Returns the batched outputs."""
    inputs = {key: tokens(rng, widths[key]) for key in kv.keys}
    out = kv.step(inputs)
    assert list(out) == kv.keys
    for key, toks in inputs.items():
        check_row(out[key], solos[key].step(toks))
        n = rng.randrange(len(toks)) if rollback else 0
        kv.rollback(key, n)
        solos[key].rollback(n)
        assert kv.length(key) == solos[key].cache.get_seq_length() == len(solos[key].accepted)
    return out


def admit(kv: BatchKV, target: Target, solos: dict, key, prompt: list[int]) -> None:
    solos[key] = Solo(target, prompt)
    logits, hidden = kv.add(key, prompt)
    check_row((logits, hidden), solos[key].first)
    assert hidden is None or hidden[0].shape == (len(prompt), target.hidden_size)


@pytest.fixture
def read_widths(monkeypatch) -> list[int]:
    """The columns every forward's attention reads (each layout's T), in call order."""
    import labkit.model.ragged as ragged
    seen, layout = [], ragged.layout

    def spy(*args, **kwargs):
        plan = layout(*args, **kwargs)
        seen.append(plan.columns)
        return plan

    monkeypatch.setattr(ragged, "layout", spy)
    return seen


def test_mixed_batch_matches_solo_over_steps_with_rollbacks(target, packed, read_widths):
    """4 prompts of 2-13 tokens, 8 steps of 1-6 tokens per row (ragged), random rollbacks: every row's
    logits and hidden states equal its solo run within TOL, and every step's attention reads exactly
    the longest row after the step (a rolled-back token is written over, never read again)."""
    rng = random.Random(0)
    kv, solos = BatchKV(target, hidden_layers=LAYERS, packed=packed), {}
    for key, n in zip("abcd", [2, 7, 13, 4]):
        admit(kv, target, solos, key, tokens(rng, n))
    for _ in range(8):
        before = {key: kv.length(key) for key in kv.keys}
        widths = {key: rng.randint(1, 6) for key in kv.keys}
        run_step(kv, solos, widths, rng)
        assert read_widths[-1] == max(before[k] + widths[k] for k in kv.keys)


def test_rows_that_are_mostly_padding_give_no_nan(target, packed):
    """One row sends 9 tokens, the others 1 (8 of their 9 columns are padding), and a row whose whole
    last step was rolled back steps again: finite, equal to solo."""
    rng = random.Random(1)
    kv, solos = BatchKV(target, hidden_layers=LAYERS, packed=packed), {}
    for key, n in zip("abc", [1, 5, 3]):
        admit(kv, target, solos, key, tokens(rng, n))
    for wide in "abcab":
        out = run_step(kv, solos, {key: 9 if key == wide else 1 for key in kv.keys}, rng, rollback=False)
        assert all(torch.isfinite(logits).all() for logits, _ in out.values())
        kv.rollback(wide, 9)  # the whole step: only holes remain of it
        solos[wide].rollback(9)
    assert kv.stats.padding_fraction == 0.0 if packed else kv.stats.padding_fraction > 0.5


def test_rollback_then_step_equals_recompute_from_accepted_tokens(sdpa_target, packed):
    """After steps with rollbacks, the next step's logits equal a from-scratch forward over the
    accepted tokens only (the rejected tokens' cells were written over), and the only cells that hold
    no live token are the short rows' tail (holes = R x longest - live tokens)."""
    t, rng = sdpa_target, random.Random(2)
    kv, solos = BatchKV(t, packed=packed), {}
    for key, n in zip("abc", [3, 8, 5]):
        admit(kv, t, solos, key, tokens(rng, n))
    for _ in range(5):
        run_step(kv, solos, {key: rng.randint(2, 6) for key in kv.keys}, rng)
    stats, lengths = kv.stats, [kv.length(k) for k in kv.keys]
    assert stats.columns == max(lengths) and stats.holes == sum(max(lengths) - n for n in lengths)
    new = {key: tokens(rng, rng.randint(1, 4)) for key in kv.keys}
    out = kv.step(new)
    for key in kv.keys:
        logits, _ = t.forward(solos[key].accepted + new[key], t.new_cache(), logits_to_keep=len(new[key]))
        assert close(out[key][0], logits) <= TOL


def test_admission_and_retirement_mid_run_leave_other_rows_unchanged(target, packed):
    """Rows come and go between steps (a prompt longer than the batch pads the batch, a short one pads
    itself); every row still equals its solo run, and after a removal the columns only it used are no
    longer read."""
    rng = random.Random(3)
    kv, solos = BatchKV(target, hidden_layers=LAYERS, packed=packed), {}
    admit(kv, target, solos, "a", tokens(rng, 3))
    admit(kv, target, solos, "b", tokens(rng, 4))
    run_step(kv, solos, {"a": 3, "b": 1}, rng)
    admit(kv, target, solos, "long", tokens(rng, 20))  # longer than the batch's columns
    run_step(kv, solos, {"a": 2, "b": 4, "long": 5}, rng)
    admit(kv, target, solos, "short", tokens(rng, 1))
    run_step(kv, solos, {"a": 1, "b": 2, "long": 3, "short": 6}, rng)
    columns = kv.columns
    kv.remove("long")
    assert kv.keys == ["a", "b", "short"] and kv.columns < columns
    run_step(kv, solos, {"a": 4, "b": 1, "short": 2}, rng)
    kv.remove("a")
    admit(kv, target, solos, "e", tokens(rng, 6))
    run_step(kv, solos, {"b": 3, "short": 1, "e": 2}, rng)
    for key in list(kv.keys):
        kv.remove(key)
    assert kv.keys == [] and kv.columns == 0
    admit(kv, target, solos, "again", tokens(rng, 2))  # an emptied cache starts over
    run_step(kv, solos, {"again": 3}, rng)


def test_batched_admission_equals_solo_prefills_and_leaves_other_rows_unchanged(target):
    """`add_many` prefills several prompts of different lengths in one packed forward, mid-run: each new
    row's first logits and hidden states equal its solo prefill, the running rows' next steps still
    equal their solo runs (within TOL), and repeated or active keys are refused."""
    rng = random.Random(6)
    kv, solos = BatchKV(target, hidden_layers=LAYERS), {}
    admit(kv, target, solos, "a", tokens(rng, 5))
    run_step(kv, solos, {"a": 3}, rng)
    prompts = {"b": tokens(rng, 2), "c": tokens(rng, 11), "d": tokens(rng, 1)}
    got = kv.add_many(prompts)
    assert list(got) == list(prompts) and kv.keys == ["a", "b", "c", "d"]
    for key, prompt in prompts.items():
        solos[key] = Solo(target, prompt)
        check_row(got[key], solos[key].first)
        assert got[key][1][0].shape == (len(prompt), target.hidden_size)
    run_step(kv, solos, {"a": 2, "b": 4, "c": 1, "d": 3}, rng)
    run_step(kv, solos, {"a": 1, "b": 1, "c": 5, "d": 2}, rng)
    with pytest.raises(LabkitError, match="already active or repeated"):
        kv.add_many({"a": [1, 2]})
    assert kv.add_many({}) == {}


def _twelve_rows(target: Target, changed: int | None, packed: bool) -> tuple[list, list, list]:
    """12 rows of different prompts and widths, 3 steps with rollbacks; row `changed` gets other
    step tokens. Returns (prompts, inputs per step, logits per step)."""
    rng = random.Random(4)
    kv = BatchKV(target, packed=packed)
    prompts = [tokens(rng, 1 + (5 * i) % 11) for i in range(12)]
    for i, p in enumerate(prompts):
        kv.add(i, p)
    steps, outs = [], []
    for s in range(3):
        inputs = {i: tokens(rng, 1 + (i + s) % 7) for i in range(12)}
        if changed is not None:
            inputs[changed] = [(x + 1) % VOCAB for x in inputs[changed]]
        steps.append(inputs)
        outs.append({i: logits for i, (logits, _) in kv.step(inputs).items()})
        for i in range(12):
            kv.rollback(i, (i * s) % len(inputs[i]))
    return prompts, steps, outs


def test_twelve_row_batch_has_no_leakage(sdpa_target, packed):
    """Each of 12 ragged rows equals its solo run; changing one row's tokens changes that row only
    (the other rows' logits stay bit for bit the same)."""
    t = sdpa_target
    prompts, steps, outs = _twelve_rows(t, None, packed)
    for i, prompt in enumerate(prompts):
        solo = Solo(t, prompt)
        for s, (inputs, out) in enumerate(zip(steps, outs)):
            assert close(out[i], solo.step(inputs[i])[0]) <= TOL
            solo.rollback((i * s) % len(inputs[i]))
    _, _, changed = _twelve_rows(t, 5, packed)
    for s in range(3):
        for i in range(12):
            if i == 5:
                assert close(outs[s][i], changed[s][i]) > 0.1
            else:
                assert torch.equal(outs[s][i], changed[s][i])


def test_heavy_rollbacks_never_widen_the_cache(sdpa_target, packed, read_widths):
    """6 steps of 6 tokens, 5 of them rolled back each time: each step reads its rows' kept tokens plus
    its own 6 (a layout that appended every step's columns would read 6 more each step), and the
    logits still equal the solo runs."""
    t, rng = sdpa_target, random.Random(5)
    kv, solos = BatchKV(t, packed=packed), {}
    for key, n in zip("xy", [2, 3]):
        admit(kv, t, solos, key, tokens(rng, n))
    for s in range(6):
        inputs = {key: tokens(rng, 6) for key in kv.keys}
        out = kv.step(inputs)
        assert read_widths[-1] == 3 + s + 6
        for key, toks in inputs.items():
            assert close(out[key][0], solos[key].step(toks)[0]) <= TOL
            kv.rollback(key, 5)
            solos[key].rollback(5)
    stats = kv.stats
    assert stats.columns == 3 + 6 and 0.0 < stats.waste_fraction < 1.0


def test_padded_tokens_and_time_step(sdpa_target):
    assert BatchKV.padded_tokens([1, 4, 2]) == 12 and BatchKV.padded_tokens([]) == 0
    seconds = time_step(sdpa_target, rows=3, width=2, kv_len=5, repeats=2)
    assert 0.0 < seconds < 10.0


def test_bad_input_names_the_fix(sdpa_target):
    kv = BatchKV(sdpa_target)
    with pytest.raises(LabkitError, match="No request is active"):
        kv.step({})
    with pytest.raises(LabkitError, match="at least one token"):
        kv.add("a", [])
    kv.add("a", [1, 2, 3])
    kv.add("b", [4])
    with pytest.raises(LabkitError, match="already active"):
        kv.add("a", [1])
    with pytest.raises(LabkitError, match="not active: add it"):
        kv.rollback("zzz", 1)
    with pytest.raises(LabkitError, match="not active: add it"):
        kv.remove("zzz")
    with pytest.raises(LabkitError, match="missing \\['b'\\]"):
        kv.step({"a": [1]})
    with pytest.raises(LabkitError, match="not active \\['c'\\]"):
        kv.step({"a": [1], "b": [2], "c": [3]})
    with pytest.raises(LabkitError, match="at least one token id"):
        kv.step({"a": [1], "b": []})
    with pytest.raises(LabkitError, match="integer ids in"):
        kv.step({"a": [1], "b": [VOCAB]})
    with pytest.raises(LabkitError, match="only the 0 token"):
        kv.rollback("a", 1)  # nothing stepped yet: the prompt cannot be rolled back
    kv.step({"a": [1, 2], "b": [3]})
    with pytest.raises(LabkitError, match="only the 2 token"):
        kv.rollback("a", 3)
    kv.rollback("a", 1)
    with pytest.raises(LabkitError, match="only the 1 token"):
        kv.rollback("a", 2)
    with pytest.raises(LabkitError, match="layer indices"):
        BatchKV(sdpa_target, hidden_layers=(4,))


def test_sliding_window_models_get_full_layers_and_trimmed_caches_are_refused():
    """A sliding-window model is served: Target.new_cache keeps full layers (the window lives in the
    masks); a cache that does trim its window (as transformers builds it from the config) is refused."""
    from transformers import DynamicCache

    from labkit.model.batch_kv import _check_cache_type
    cfg = MistralConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, sliding_window=4)
    t = Target(model=MistralForCausalLM(cfg).eval(), tokenizer=ToyTokenizer(16), name="mistral-sw")
    BatchKV(t)
    with pytest.raises(LabkitError, match="DynamicSlidingWindowLayer.*one request at a time"):
        _check_cache_type(DynamicCache(config=cfg), t.name)


@pytest.mark.slow
def test_real_target_batched_equals_solo(real_target, packed):
    """SmolLM2-135M fp32 (packed linears): 3 chat prompts, 3 ragged steps with rollbacks; each row's
    logits within 1e-3 of its solo run (|logit| ~ 20-30 there) and the same argmax at every position."""
    t, rng = real_target, random.Random(6)
    prompts = ["What is 7 * 8?", "Name three colours.", "Write a haiku about the sea, please."]
    kv, solos = BatchKV(t, packed=packed), {}
    for key, text in enumerate(prompts):
        ids = t.encode_prompt(text)
        solos[key] = Solo(t, ids)
        logits, _ = kv.add(key, ids)
        assert close(logits, solos[key].first[0]) <= 1e-3
    for s in range(3):
        inputs = {key: [rng.randrange(t.vocab_size) for _ in range(1 + (key + s) % 4)] for key in kv.keys}
        out = kv.step(inputs)
        for key, toks in inputs.items():
            want, _ = solos[key].step(toks)
            assert close(out[key][0], want) <= 1e-3
            assert torch.equal(out[key][0].argmax(-1), want.argmax(-1))
            n = (key + s) % len(toks)
            kv.rollback(key, n)
            solos[key].rollback(n)


@pytest.mark.parametrize("headroom", [0, 2, 64])
def test_slab_growth_keeps_logits(sdpa_target, headroom, monkeypatch):
    """The cache's buffers grow (one copy) only when a step or an admission needs more rows or columns;
    with no, little and much headroom (a new buffer every step, every few steps, rarely), through
    rollbacks, admissions and removals, every row still equals its solo run."""
    import labkit.model.slab as slab
    monkeypatch.setattr(slab, "HEADROOM", headroom)
    monkeypatch.setattr(slab, "ROW_HEADROOM", min(headroom, 4))
    t, rng = sdpa_target, random.Random(8)
    kv, solos = BatchKV(t), {}
    for key, n in zip("pq", [3, 7]):
        admit(kv, t, solos, key, tokens(rng, n))
    for s in range(12):
        if s == 4:
            admit(kv, t, solos, "r", tokens(rng, 5))
        if s == 8:
            kv.remove("p")
        if s == 10:
            admit(kv, t, solos, "s", tokens(rng, 30))  # longer than every row: columns grow at admission
        run_step(kv, solos, {key: 1 + (s + i) % 4 for i, key in enumerate(kv.keys)}, rng)
    rows, columns = kv.slab.capacity
    assert rows >= len(kv.keys) and columns >= kv.columns


def test_admission_and_retirement_copy_no_other_row(sdpa_target):
    """With room in the buffers, admitting requests writes into free slots and retiring one moves only
    the last row into its slot: the buffers are the same tensors before and after, and every row still
    equals its solo run."""
    t, rng = sdpa_target, random.Random(9)
    kv, solos = BatchKV(t), {}
    for key, n in zip("abc", [4, 6, 5]):
        admit(kv, t, solos, key, tokens(rng, n))
    run_step(kv, solos, {key: 2 for key in kv.keys}, rng)
    buffers = [b.data_ptr() for b in kv.slab.keys + kv.slab.values]
    kv.remove("a")
    assert kv.keys == ["c", "b"]  # the last row took the freed slot
    admit(kv, t, solos, "d", tokens(rng, 3))
    run_step(kv, solos, {key: 3 for key in kv.keys}, rng)
    assert [b.data_ptr() for b in kv.slab.keys + kv.slab.values] == buffers


def test_split_width_runs_deep_rows_apart_only_when_it_pays(monkeypatch):
    """Hand-made widths: one deep row among many shallow ones runs apart; uniform or few rows run in one
    pass; the split minimises R s + PASS_COST + sum over wide rows of (W - s + GATHER_COST)."""
    import labkit.core.layout as ragged  # the split's cost model lives with the scheduler's math
    monkeypatch.setattr(ragged, "GATHER_COST", 8)
    monkeypatch.setattr(ragged, "PASS_COST", 16)
    assert ragged.split_width([8] + [1] * 31) == 1  # 32 + 16 + 15 = 63 < 256
    assert ragged.split_width([2] * 32) == 2  # uniform: nothing to split
    assert ragged.split_width([6, 1]) == 6  # 2 rows: a second pass costs more than the padding
    assert ragged.split_width([5, 5, 4, 4] + [1] * 10 + [2] * 18) == 2  # 64 + 16 + 4 * 11 = 124 < 160
    monkeypatch.setattr(ragged, "PASS_COST", 300)  # 32 + 300 + 15 > 256
    assert ragged.split_width([8] + [1] * 31) == 8


@pytest.mark.parametrize("layout_packed", [True, False], ids=["packed", "padded"])
def test_two_pass_attention_matches_solo(sdpa_target, layout_packed, monkeypatch):
    """With the second pass free, every ragged step splits its rows (checked), and every row still
    equals its solo run through rollbacks, an admission and a removal."""
    import labkit.core.layout as costs
    import labkit.model.ragged as ragged
    monkeypatch.setattr(costs, "GATHER_COST", 0)
    monkeypatch.setattr(costs, "PASS_COST", 0)
    splits, layout = [], ragged.layout

    def spy(widths, *args, **kwargs):
        plan = layout(widths, *args, **kwargs)
        splits.append((plan.split, max(widths)))
        return plan

    monkeypatch.setattr(ragged, "layout", spy)
    t, rng = sdpa_target, random.Random(10)
    kv, solos = BatchKV(t, hidden_layers=LAYERS, packed=layout_packed), {}
    for key, n in zip("abcd", [3, 9, 4, 6]):
        admit(kv, t, solos, key, tokens(rng, n))
    for s in range(6):
        if s == 3:
            kv.remove("b")
            admit(kv, t, solos, "e", tokens(rng, 5))
        run_step(kv, solos, {key: rng.choice([1, 1, 2, 5]) for key in kv.keys}, rng)
    assert sum(split < width for split, width in splits) >= 3


def test_replicate_and_undo_step_outside_inference_mode(sdpa_target):
    """The profiler's batches (scripts/bench_verify.py calls these outside inference mode): `replicate`
    copies the one row into every slot, each copy steps to the same logits, and `undo_step` takes back
    exactly what the step added."""
    kv = BatchKV(sdpa_target)
    kv.add(0, [1, 2, 3, 4])
    kv.replicate(3)
    assert kv.keys == [0, 1, 2] and [kv.length(k) for k in kv.keys] == [4, 4, 4]
    out = kv.step({0: [5, 6], 1: [5, 6], 2: [5]})
    assert close(out[0][0], out[1][0]) <= TOL and close(out[0][0][:1], out[2][0]) <= TOL
    kv.undo_step()
    assert [kv.length(k) for k in kv.keys] == [4, 4, 4]
