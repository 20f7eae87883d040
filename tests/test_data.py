"""Training prompts and target-regenerated data: distinct, reproducible, disjoint, resumable."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from labkit.data import DataConfig, load_sequences, prepare_data
from labkit.errors import LabkitError
from labkit.prompts import DOMAIN_SHARES, assert_disjoint, benchmark_texts, training_prompts
from labkit.target import load_target

pytestmark = pytest.mark.usefixtures("one_thread")


def test_training_prompts_are_distinct_reproducible_and_in_proportion():
    prompts = training_prompts(3000, seed=1)
    texts = [p["text"] for p in prompts]
    assert len(set(texts)) == len(texts)
    assert texts == [p["text"] for p in training_prompts(3000, seed=1)]
    assert texts != [p["text"] for p in training_prompts(3000, seed=2)]
    shares = Counter(p["domain"] for p in prompts)
    for domain, share in DOMAIN_SHARES.items():  # binomial sd at n=3000 is under 0.01
        assert abs(shares[domain] / len(prompts) - share) < 0.04


def test_a_training_prompt_found_in_an_evaluation_file_is_refused(tmp_path):
    prompts = [p["text"] for p in training_prompts(50)]
    (tmp_path / "eval.jsonl").write_text(json.dumps({"turns": ["  " + prompts[7].upper() + " "]}) + "\n")
    with pytest.raises(LabkitError, match="disjoint"):
        assert_disjoint(prompts, benchmark_texts(tmp_path))
    assert_disjoint(prompts[:7], benchmark_texts(tmp_path))  # the others pass


def test_training_prompts_never_overlap_the_shared_benchmarks(shared_benchmarks):
    assert_disjoint([p["text"] for p in training_prompts(4000)], benchmark_texts(shared_benchmarks))


@pytest.fixture(scope="module")
def tiny_real_vocab_target(tiny_model_dir):
    return load_target(str(tiny_model_dir))


def test_prepare_data_writes_shards_that_load_back(tmp_path, tiny_real_vocab_target):
    cfg = DataConfig(n_prompts=5, max_new_tokens=6, shard_size=2)
    prepare_data(tiny_real_vocab_target, tmp_path, cfg, progress=False)
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == [f"shard-0000{i}.safetensors" for i in range(3)]
    seqs = load_sequences(tmp_path)
    prompts = training_prompts(5)
    assert [s.domain for s in seqs] == [p["domain"] for p in prompts]
    for seq, prompt in zip(seqs, prompts):
        assert seq.ids[:seq.prompt_len] == tiny_real_vocab_target.encode_prompt(prompt["text"])
        assert 1 <= len(seq.ids) - seq.prompt_len <= 6


def test_prepare_data_resumes_only_what_is_missing(tmp_path, tiny_real_vocab_target):
    cfg = DataConfig(n_prompts=4, max_new_tokens=4, shard_size=2)
    prepare_data(tiny_real_vocab_target, tmp_path, cfg, progress=False)
    kept = (tmp_path / "shard-00000.safetensors").read_bytes()
    (tmp_path / "shard-00001.safetensors").unlink()  # as if the run had been interrupted there
    prepare_data(tiny_real_vocab_target, tmp_path, cfg, progress=False)
    assert (tmp_path / "shard-00000.safetensors").read_bytes() == kept
    assert (tmp_path / "shard-00001.safetensors").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_prepare_data_refuses_to_mix_settings(tmp_path, tiny_real_vocab_target):
    prepare_data(tiny_real_vocab_target, tmp_path, DataConfig(n_prompts=2, max_new_tokens=2, shard_size=2),
                 progress=False)
    with pytest.raises(LabkitError, match="other settings"):
        prepare_data(tiny_real_vocab_target, tmp_path, DataConfig(n_prompts=2, max_new_tokens=3, shard_size=2),
                     progress=False)


def test_load_sequences_names_the_command_when_empty(tmp_path):
    with pytest.raises(LabkitError, match="prepare-data"):
        load_sequences(tmp_path)
