"""labkit.decode.batch_generate: a left-padded batch decodes each row as if it were alone (fp32, tiny Llama)."""

from __future__ import annotations

import pytest
import torch

from labkit.decode.batch_generate import BatchStats, generate_batch, left_pad
from labkit.decode.loop import generate
from labkit.core.errors import LabkitError
from labkit.core.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [3], [12, 13, 2, 5, 7]]
SAMPLED = SamplingParams(0.9, 0.9, 8)


@pytest.fixture(scope="module")
def target(make_tiny_target):
    return make_tiny_target(vocab_size=16, seed=1)


def hf_greedy(target, prompt: list[int], n: int) -> list[int]:
    out = target.model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_left_pad_right_aligns_masks_and_counts_positions_from_the_first_real_token():
    ids, mask, pos = left_pad([[5, 6, 7], [9]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    with pytest.raises(LabkitError, match="at least one token"):
        left_pad([[1], []], pad_id=0)


def test_each_greedy_row_of_a_mixed_length_batch_equals_its_solo_greedy_continuation(target):
    responses = generate_batch(target, PROMPTS, SamplingParams(), max_new_tokens=12)
    for prompt, response in zip(PROMPTS, responses):
        assert response == hf_greedy(target, prompt, 12)
        assert response == generate(target, prompt, None, 12, SamplingParams()).token_ids


def test_greedy_and_sampled_rows_share_a_batch(target):
    params = [SamplingParams(), SAMPLED, SamplingParams(), SAMPLED]
    responses = generate_batch(target, PROMPTS, params, max_new_tokens=10, seed=3)
    for i in (0, 2):
        assert responses[i] == hf_greedy(target, PROMPTS[i], 10)
    assert all(len(r) == 10 for r in responses)
    assert responses == generate_batch(target, PROMPTS, params, max_new_tokens=10, seed=3)  # reproducible


def test_sampled_rows_are_reproducible_by_seed_and_differ_across_seeds(target):
    a = generate_batch(target, PROMPTS * 4, SAMPLED, max_new_tokens=10, seed=7)
    assert a == generate_batch(target, PROMPTS * 4, SAMPLED, max_new_tokens=10, seed=7)
    assert a != generate_batch(target, PROMPTS * 4, SAMPLED, max_new_tokens=10, seed=8)


def test_a_row_that_stops_early_leaves_the_batch_and_does_not_disturb_the_others(target):
    solo = [hf_greedy(target, p, 12) for p in PROMPTS]
    # a stop token that ends one row early (not at its first token) and never occurs in another row
    stop = next(t for row in solo for t in row[1:6]
                if t != row[0] and any(t not in other for other in solo))
    stats = BatchStats()
    responses = generate_batch(target, PROMPTS, SamplingParams(), 12, stop_ids={stop}, drop_fraction=0.0,
                               stats=stats)
    for want, got in zip(solo, responses):
        cut = next((j + 1 for j, t in enumerate(want) if t == stop), len(want))
        assert got == want[:cut]  # each row stops at its own first stop token, else at max_new_tokens
    lengths = sorted(map(len, responses))
    assert lengths[0] < 12 and lengths[-1] == 12  # one stopped early, another ran to the end
    assert stats.compactions >= 1 and stats.new_tokens == sum(map(len, responses))


def test_bf16_batches_run_and_stop_at_max_new_tokens(make_tiny_target):
    target = make_tiny_target(vocab_size=16, seed=1)
    target.model.to(torch.bfloat16)
    responses = generate_batch(target, PROMPTS, [SamplingParams(), SAMPLED] * 2, max_new_tokens=5)
    assert [len(r) for r in responses] == [5] * 4
    assert all(0 <= t < 16 for r in responses for t in r)


def test_bad_arguments_name_the_fix(target):
    with pytest.raises(LabkitError, match="one per prompt"):
        generate_batch(target, PROMPTS, [SamplingParams()], 4)
    with pytest.raises(LabkitError, match="positive"):
        generate_batch(target, PROMPTS, SamplingParams(), 0)


@pytest.mark.slow
def test_real_target_greedy_batch_equals_hf_generate_row_by_row(real_target):
    """SmolLM2 in fp32: 3 chat prompts of different lengths, 12 greedy tokens each, batched vs alone."""
    prompts = [real_target.encode_prompt(t) for t in
               ("What is 7 * 8?", "Write a haiku about the sea and the moon at night.", "Hi")]
    responses = generate_batch(real_target, prompts, SamplingParams(), 12)
    for prompt, response in zip(prompts, responses):
        out = real_target.model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                         pad_token_id=real_target.pad_token_id)
        want = out[0, len(prompt):].tolist()
        cut = next((j + 1 for j, t in enumerate(want) if t in real_target.eos_token_ids), len(want))
        assert response == want[:cut]
