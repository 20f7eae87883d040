"""Training prompts and target-regenerated data: distinct, reproducible, disjoint, resumable."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from safetensors import safe_open
from safetensors.torch import load_file

from labkit.__main__ import build_parser, data_config
from labkit.pipeline.data import (DataConfig, build_prompts, check_disjoint, load_sequences, prepare_data,
                         sequences_trained_on, shard_sequence_count)
from labkit.core.errors import LabkitError
from labkit.pipeline.magpie import MagpieConfig
from labkit.pipeline.prompts import DOMAIN_SHARES, assert_disjoint, benchmark_texts, training_prompts
from labkit.model.target import load_target

# manifest.json "settings" exactly as prepare-data wrote them before --prompts / --greedy-share existed
# (data/train's command: --n-prompts 6144, other options at their defaults)
TODAYS_SETTINGS = {"target": "SmolLM2-135M-Instruct", "n_prompts": 6144, "max_new_tokens": 256, "temperature": 0.7,
                   "top_p": 0.8, "top_k": 20, "shard_size": 64, "seed": 0}

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


def cli_config(*argv: str) -> DataConfig:
    return data_config(build_parser().parse_args(["prepare-data", *argv]))


def test_the_data_train_command_keeps_todays_settings_exactly():
    cfg = cli_config("--out", "data/train", "--n-prompts", "6144")
    assert cfg.settings("SmolLM2-135M-Instruct") == TODAYS_SETTINGS
    assert list(cfg.settings("SmolLM2-135M-Instruct")) == list(TODAYS_SETTINGS)  # same keys, same order
    # how data is computed (batch, dtype, device) is recorded per shard, not in the settings
    assert cli_config("--n-prompts", "6144", "--batch-size", "512", "--dtype", "bfloat16").settings(
        "SmolLM2-135M-Instruct") == TODAYS_SETTINGS
    assert "greedy_share" in cli_config("--n-prompts", "6144", "--greedy-share", "0.25").settings("x")
    assert cli_config("--n-prompts", "6144", "--prompts", "magpie").settings("x")["prompts"] == "magpie"


def test_a_folder_with_a_manifest_in_todays_format_resumes(tmp_path, tiny_real_vocab_target):
    cfg = DataConfig(n_prompts=4, max_new_tokens=3, shard_size=2)
    old = {**TODAYS_SETTINGS, "target": tiny_real_vocab_target.name, "n_prompts": 4, "max_new_tokens": 3,
           "shard_size": 2}
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"settings": old, "n_shards": 2, "created_by": "python -m labkit prepare-data"}, indent=2))
    prepare_data(tiny_real_vocab_target, tmp_path, cfg, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest == {"settings": old, "n_shards": 2, "created_by": "python -m labkit prepare-data"}
    assert len(load_sequences(tmp_path)) == 4


def test_every_shard_records_how_it_was_made(tmp_path, tiny_real_vocab_target):
    cfg = DataConfig(n_prompts=6, max_new_tokens=4, shard_size=2, batch_size=4, greedy_share=0.5)
    prepare_data(tiny_real_vocab_target, tmp_path, cfg, progress=False)
    shards = sorted(tmp_path.glob("shard-*.safetensors"))
    assert len(shards) == 3
    flags = []
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            meta = f.metadata()
        assert meta["generator"] == "labkit.decode.batch_generate" and meta["prompt_source"] == "templates"
        assert meta["dtype"] == "float32" and meta["device"] == "cpu" and meta["target"] == tiny_real_vocab_target.name
        assert float(meta["seconds"]) >= 0 and int(meta["response_tokens"]) >= 2 and meta["labkit_commit"]
        assert meta["decoding"] in ("greedy", "sampled", "greedy+sampled")
        flags += load_file(str(shard))["greedy"].tolist()
    assert sum(flags) == 3  # half of 6 prompts answered greedily, recorded per sequence
    seqs = load_sequences(tmp_path)
    assert [s.greedy for s in seqs] == [bool(f) for f in flags] and {s.source for s in seqs} == {"templates"}


def test_greedy_responses_are_the_targets_greedy_continuations(tmp_path, tiny_real_vocab_target):
    from labkit.decode.loop import generate
    from labkit.core.sampling import SamplingParams
    prepare_data(tiny_real_vocab_target, tmp_path, DataConfig(n_prompts=3, max_new_tokens=5, shard_size=3,
                                                              greedy_share=1.0), progress=False)
    for seq in load_sequences(tmp_path):
        want = generate(tiny_real_vocab_target, seq.ids[:seq.prompt_len], None, 5, SamplingParams()).token_ids
        assert seq.greedy and seq.ids[seq.prompt_len:] == want


def fake_user_turns(turns: list[str]):
    state = {"i": 0}

    def fake(target, n, cfg, seed):
        out = [(turns[(state["i"] + j) % len(turns)], True) for j in range(n)]
        state["i"] += n
        return out
    return fake


def test_magpie_prompts_are_made_once_filtered_and_kept_for_resuming(tmp_path, monkeypatch, tiny_real_vocab_target,
                                                                     shared_benchmarks):
    bench_turn = json.loads((shared_benchmarks / "mt-bench.jsonl").read_text().split("\n")[0])["turns"][0]
    turns = ["Write a Python function that checks whether a number is prime.", bench_turn,
             "Write a Python function that checks whether a number is prime!", "", "What is 12% of 250?",
             "Can you suggest three board games for a rainy weekend with friends?"]
    monkeypatch.setattr("labkit.pipeline.magpie.sample_user_turns", fake_user_turns(turns))
    cfg = DataConfig(n_prompts=3, max_new_tokens=3, shard_size=2, prompts="magpie")
    prepare_data(tiny_real_vocab_target, tmp_path, cfg, benchmark_dir=shared_benchmarks, progress=False)
    prompts = [json.loads(x) for x in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert [p["text"] for p in prompts] == [turns[0], turns[4], turns[5]]
    assert [p["domain"] for p in prompts] == ["code", "math", "chat"]
    counts = json.loads((tmp_path / "prompts-filter.json").read_text())
    assert counts == {"offered": 6, "kept": 3, "benchmark": 1, "near-duplicate": 1, "empty": 1, "used": 3}
    seqs = load_sequences(tmp_path)
    assert [s.source for s in seqs] == ["magpie"] * 3
    assert seqs[1].ids[:seqs[1].prompt_len] == tiny_real_vocab_target.encode_prompt(turns[4])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["settings"]["prompts"] == "magpie" and manifest["prompts_file"] == "prompts.jsonl"
    # a rerun answers the same prompts without sampling any
    monkeypatch.setattr("labkit.pipeline.magpie.sample_user_turns", None)
    (tmp_path / "shard-00001.safetensors").unlink()
    prepare_data(tiny_real_vocab_target, tmp_path, cfg, benchmark_dir=shared_benchmarks, progress=False)
    assert [s.ids for s in load_sequences(tmp_path)][:2] == [s.ids for s in seqs][:2]


def test_disjointness_is_enforced_where_data_is_made_even_for_a_tampered_prompt_list(
        tmp_path, tiny_real_vocab_target, shared_benchmarks):
    cfg = DataConfig(n_prompts=2, max_new_tokens=2, shard_size=2, prompts="magpie")
    turn = json.loads((shared_benchmarks / "gsm8k.jsonl").read_text().split("\n")[5])["turns"][0]
    words = turn.split()
    words[len(words) // 2] = "zzz"  # a near-duplicate, not an exact copy
    prepare_data_dir = tmp_path / "d"
    prepare_data_dir.mkdir()
    (prepare_data_dir / "prompts.jsonl").write_text(
        json.dumps({"id": 0, "domain": "chat", "text": "Tell me about tides.", "source": "magpie", "greedy": False})
        + "\n" + json.dumps({"id": 1, "domain": "math", "text": " ".join(words), "source": "magpie", "greedy": False})
        + "\n")
    with pytest.raises(LabkitError, match="near-duplicate"):
        prepare_data(tiny_real_vocab_target, prepare_data_dir, cfg, benchmark_dir=shared_benchmarks, progress=False)
    assert not list(prepare_data_dir.glob("shard-*"))
    with pytest.raises(LabkitError, match="disjoint"):
        check_disjoint([turn], shared_benchmarks)


def test_mixed_prompts_take_champ_templates_and_magpie_shuffled(tmp_path, monkeypatch, tiny_real_vocab_target):
    champ = tmp_path / "v0.json"
    champ.write_text(json.dumps({"problems": {f"P_{i}": {"_text": f"Prove that {i} squared plus {i} is even, "
                                                                  f"for the integer {i}."} for i in range(3)}}))
    monkeypatch.setattr("labkit.pipeline.packaged_prompts.champ_file", lambda: champ)
    monkeypatch.setattr("labkit.pipeline.magpie.sample_user_turns", fake_user_turns(
        [f"Give me {w} ideas for a birthday party in the park." for w in ("two", "three", "five", "seven", "nine")]))
    cfg = DataConfig(n_prompts=10, prompts="mixed", template_share=0.3, magpie=MagpieConfig(near_duplicate=0.9))
    prompts, counts = build_prompts(tiny_real_vocab_target, cfg, tmp_path, progress=False)
    sources = Counter(p["source"] for p in prompts)
    assert sources == {"champ": 3, "templates": 3, "magpie": 4}
    assert [p["id"] for p in prompts] == list(range(10))
    assert [p["source"] for p in prompts] != sorted(p["source"] for p in prompts)  # shuffled together
    assert counts["used"] == 7 and counts["kept"] >= 7


def test_bad_data_options_name_the_fix():
    with pytest.raises(LabkitError, match="greedy-share"):
        DataConfig(greedy_share=1.5)
    with pytest.raises(LabkitError, match="prompt source"):
        DataConfig(prompts="sharegpt")



def test_shard_sequence_count_reads_the_first_shards_metadata(tmp_path, tiny_real_vocab_target):
    prepare_data(tiny_real_vocab_target, tmp_path, DataConfig(n_prompts=5, max_new_tokens=3, shard_size=2),
                 progress=False)
    assert shard_sequence_count(tmp_path) == len(load_sequences(tmp_path)) == 5
    assert [shard_sequence_count(tmp_path, n) for n in (1, 2, 3)] == [2, 4, 5]


def test_held_out_prompts_are_counted_per_folder_when_a_drafter_trained_on_several(tmp_path, monkeypatch):
    record = {"data_sequences": 160, "data_folders": {"data/a": 100, "data/b": 60}}
    monkeypatch.chdir(tmp_path)  # the record names folders relative to where training ran
    assert sequences_trained_on(record, "data/a") == 100
    assert sequences_trained_on(record, tmp_path / "data" / "b") == 60
    assert sequences_trained_on(record, "data/c") == 0
    # recorded relative to the repository root, asked for from a notebook's folder beside data/
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    assert sequences_trained_on(record, "../data/a") == 100
    assert sequences_trained_on(record, "../data/ab") == 0
    # an older record knows only its total: every folder counts it, so nothing trained on is held out
    assert sequences_trained_on({"data_sequences": 160}, "data/a") == 160
