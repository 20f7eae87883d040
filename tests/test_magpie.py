"""Self-generated prompts: the user header, near-duplicates, the filter, the domain classifier, CHAMP,
and disjointness from every benchmark file (exact and near-duplicate), enforced where data is made."""

from __future__ import annotations

import json
import random

import pytest

from labkit.core.errors import LabkitError
from labkit.pipeline.magpie import (MagpieConfig, PromptFilter, classify_domain, end_of_turn_ids, sample_user_turns,
                           self_generated_prompts, user_header)
from labkit.pipeline.packaged_prompts import champ_prompts
from labkit.pipeline.prompts import (NearDuplicateIndex, assert_not_near, benchmark_index, benchmark_texts, jaccard,
                            shingles)
from labkit.model.target import load_target

pytestmark = pytest.mark.usefixtures("one_thread")


def edit_words(text: str, rng: random.Random, n: int = 1) -> str:
    """A light paraphrase: n words replaced (what a model reproducing a benchmark turn might write)."""
    words = text.split()
    for i in rng.sample(range(len(words)), min(n, len(words))):
        words[i] = "zzz"
    return " ".join(words)


def every_benchmark_turn(path) -> dict[str, list[str]]:
    turns = {}
    for f in sorted(path.glob("*.jsonl")):
        turns[f.name] = [t for line in f.read_text().split("\n") if line.strip() for t in json.loads(line)["turns"]]
    return turns


# --------------------------------------------------------------------------------------------------
# near-duplicates


def test_shingles_ignore_case_and_punctuation_and_keep_short_texts_whole():
    assert shingles("Hello, World! How are you?") == {"hello world how", "world how are", "how are you"}
    assert shingles("Hi there") == {"hi there"}
    assert shingles("  ...  ") == set()
    assert jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)


def test_near_duplicate_index_finds_light_edits_and_only_true_matches():
    rng = random.Random(0)
    base = ("Write a short story about a robot who learns to paint sunsets on the beach while its owner "
            "is away at work every day.")
    index = NearDuplicateIndex(0.5)
    index.add(base, "base")
    index.add("Explain how photosynthesis turns sunlight into sugar in the leaves of green plants.", "other")
    assert index.nearest(base) == ("base", 1.0)
    assert index.nearest(edit_words(base, rng, 1))[0] == "base"
    assert index.nearest("What is the capital of France and why did it become the capital?") is None
    for key, j in index.query(edit_words(base, rng, 2)):  # every reported hit is a verified one
        assert j >= 0.5
    with pytest.raises(LabkitError, match="Jaccard"):
        NearDuplicateIndex(0.0)


def test_near_duplicate_recall_is_complete_on_many_random_pairs():
    """200 texts and a 1-word edit of each (Jaccard well above 0.5): every edit finds its original."""
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(500)]
    texts = [" ".join(rng.choices(vocab, k=rng.randint(15, 40))) for _ in range(200)]
    index = NearDuplicateIndex(0.5)
    for i, t in enumerate(texts):
        index.add(t, i)
    for i, t in enumerate(texts):
        edited = edit_words(t, rng, 1)
        if jaccard(shingles(edited), shingles(t)) >= 0.5:
            assert i in [k for k, _ in index.query(edited)]


# --------------------------------------------------------------------------------------------------
# the filter and the domain classifier


def test_prompt_filter_drops_and_counts_each_kind_of_bad_prompt():
    filt = PromptFilter(MagpieConfig(min_words=3, max_words=20))
    good = "How do I keep basil plants alive on a sunny windowsill in winter?"
    offers = [("", True), ("Help me", True), (" ".join(["word"] * 30), True), ("What is \x07 this thing here?", True),
              ("Tell me a joke <|im_start|>assistant", True), (good, True), (good.upper() + "  ", True),
              ("How do I keep basil plants alive on a sunny windowsill in the winter?", True),
              ("Write me a long essay about", False), ("Which planets in our solar system have rings?", True)]
    kept = [filt.offer(t, f) for t, f in offers]
    assert kept == [False, False, False, False, False, True, False, False, False, True]
    assert filt.kept == [good, "Which planets in our solar system have rings?"]
    assert {k: v for k, v in filt.counts.items()} == {
        "offered": 10, "kept": 2, "empty": 1, "short": 1, "long": 1, "unprintable": 1, "template": 1,
        "duplicate": 1, "near-duplicate": 1, "unfinished": 1}


@pytest.mark.parametrize("text,domain", [
    ("Write a Python function that reverses a linked list.", "code"),
    ("Why does my JavaScript loop print undefined?", "code"),
    ("How do I fix this SQL query that returns duplicate rows?", "code"),
    ("Solve the equation 3x + 5 = 20.", "math"),
    ("What is 15% of 240?", "math"),
    ("How many ways can 5 people sit around a round table?", "math"),
    ("Calculate the area of a circle with radius 4.", "math"),
    ("Can you suggest a good book for a long flight?", "chat"),
    ("Write a poem about autumn leaves.", "chat"),
    ("What are some tips for a job interview?", "chat"),
])
def test_keyword_domain_classifier(text, domain):
    assert classify_domain(text) == domain


# --------------------------------------------------------------------------------------------------
# the user header


class NoTemplate:
    chat_template = None


def test_user_header_is_cut_from_the_chat_template_at_the_user_message(real_tokenizer):
    before, after = user_header(real_tokenizer)
    assert before.endswith("<|im_start|>user\n") and before.startswith("<|im_start|>system\n")
    assert after.startswith("<|im_end|>")
    with pytest.raises(LabkitError, match="chat template"):
        user_header(NoTemplate())


@pytest.fixture(scope="module")
def tiny_chat_target(tiny_model_dir):
    return load_target(str(tiny_model_dir))


def test_user_turns_are_sampled_from_the_header_and_stop_at_end_of_turn(tiny_chat_target):
    assert tiny_chat_target.tokenizer.convert_tokens_to_ids("<|im_end|>") in end_of_turn_ids(tiny_chat_target)
    turns = sample_user_turns(tiny_chat_target, 6, MagpieConfig(max_prompt_tokens=5), seed=0)
    assert len(turns) == 6 and all(isinstance(t, str) and isinstance(f, bool) for t, f in turns)
    assert turns == sample_user_turns(tiny_chat_target, 6, MagpieConfig(max_prompt_tokens=5), seed=0)


def test_self_generated_prompts_fill_up_in_rounds_and_resume_from_raw_turns(tmp_path, monkeypatch):
    pool = [f"Please explain topic number {i} to me in simple words." for i in range(40)]
    calls = []

    def fake(target, n, cfg, seed):
        calls.append(seed)
        start = len(calls) - 1
        return [(pool[(start * n + j) % 40] if j % 2 == 0 else "", True) for j in range(n)]  # half are empty

    monkeypatch.setattr("labkit.pipeline.magpie.sample_user_turns", fake)
    raw = tmp_path / "raw.jsonl"
    got = self_generated_prompts(None, 7, MagpieConfig(near_duplicate=0.95), 0, 4, PromptFilter(), raw_path=raw)
    assert len(got) == 7 and len(calls) == 4  # 2 kept per round of 4
    again = self_generated_prompts(None, 7, MagpieConfig(near_duplicate=0.95), 0, 4, PromptFilter(), raw_path=raw)
    assert again == got and len(calls) == 4  # replayed from raw.jsonl, nothing sampled
    with pytest.raises(LabkitError, match="passed the filter"):
        monkeypatch.setattr("labkit.pipeline.magpie.sample_user_turns", lambda t, n, c, seed: [("", True)] * n)
        self_generated_prompts(None, 3, MagpieConfig(), 0, 4, PromptFilter(), max_rounds=2)


# --------------------------------------------------------------------------------------------------
# disjointness from ../shared/benchmarks (the required test)


def test_every_benchmark_file_is_caught_exactly_and_near_by_the_filter(shared_benchmarks):
    """From every benchmark file, 25 turns verbatim and 25 with one word replaced: the filter that
    self-generated and packaged prompts pass through drops all of them as benchmark prompts."""
    rng = random.Random(0)
    filt = PromptFilter(MagpieConfig(min_words=1, max_words=10_000), benchmark_texts(shared_benchmarks),
                        benchmark_index(shared_benchmarks))
    for name, turns in every_benchmark_turn(shared_benchmarks).items():
        for turn in rng.sample(turns, min(25, len(turns))):
            assert filt.reason(turn) in ("benchmark", "unprintable"), name
            edited = edit_words(turn, rng, 1)
            if jaccard(shingles(edited), shingles(turn)) >= 0.5:
                assert filt.reason(edited) in ("benchmark", "unprintable"), (name, edited[:80])
    assert filt.reason("Can you recommend a few board games for a family with young children?") is None


def test_assert_not_near_refuses_a_near_copy_of_a_benchmark_turn(shared_benchmarks):
    turn = every_benchmark_turn(shared_benchmarks)["gsm8k.jsonl"][3]
    index = benchmark_index(shared_benchmarks)
    with pytest.raises(LabkitError, match="near-duplicate"):
        assert_not_near(["A fine prompt about gardens and flowers.", edit_words(turn, random.Random(0))], index)


def test_champ_prompts_read_from_the_wheel_file_and_pass_the_benchmark_check(tmp_path, shared_benchmarks):
    fake = tmp_path / "v0.json"
    fake.write_text(json.dumps({"problems": {"P_A_1": {"_text": "How many primes are below 50?"},
                                             "P_A_2": {"_text": "  "}}}))
    assert champ_prompts(fake) == [{"id": 0, "domain": "math", "text": "How many primes are below 50?",
                                    "source": "champ", "source_id": "P_A_1"}]
    try:
        real = champ_prompts()
    except LabkitError:
        pytest.skip("champ-dataset is not installed (pip install --no-deps champ-dataset==1.0.0)")
    assert len(real) == 270
    assert_not_near([p["text"] for p in real], benchmark_index(shared_benchmarks))
