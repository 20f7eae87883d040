"""The evaluation prompt sets (labkit/pipeline/prompt_sets.py): the lab's own set in data/eval, which folder of
public files is used where, and the line that names what a run measured."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from labkit.pipeline import prompt_sets
from labkit.pipeline.data import folder_prompts
from labkit.core.errors import LabkitError
from labkit.pipeline.prompt_sets import LAB_DIR, LAB_FILES, PromptSet, eval_prompts, load_prompts, prompt_set
from labkit.pipeline.prompts import NearDuplicateIndex, benchmark_index, benchmark_texts

ROOT = Path(__file__).resolve().parents[1]
#: what a notebook prints about its prompts (tests/test_notebooks.py reads it with this pattern)
PROMPT_LINE = re.compile(r"prompt set: (?P<label>.+?); using (?P<used>[^(]+) \(the set holds (?P<held>[^;)]+)"
                         r"(?:; a full run takes (?P<need>[^)]+))?\)")


def parse_counts(text: str) -> dict[str, int]:
    """"math 2, code 2, chat 1" -> {"math": 2, "code": 2, "chat": 1}"""
    return {d: int(n) for d, n in (part.rsplit(" ", 1) for part in text.split(", "))}


def _write(folder: Path, name: str, n: int, domain: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    rows = [{"turns": [f"{name} prompt {i}"], **({"domain": domain} if domain else {})} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def public(tmp_path) -> Path:
    folder = tmp_path / "bench"
    for name, n in (("gsm8k", 5), ("math500", 4), ("humaneval", 3), ("mbpp", 6), ("mt-bench", 2)):
        _write(folder, name, n)
    return folder


# the lab's own set

def test_the_lab_set_holds_forty_prompts_a_domain_with_unique_ids_and_its_files_domain():
    for name in LAB_FILES:
        rows = [json.loads(line) for line in (LAB_DIR / f"{name}.jsonl").read_text().split("\n") if line.strip()]
        assert len(rows) == 40, name
        assert len({r["id"] for r in rows}) == 40, name
        assert all(r["domain"] == name and r["turns"] and all(t.strip() for t in r["turns"]) for r in rows), name


def _training_folders() -> list[Path]:
    return sorted(p.parent for p in (ROOT / "data").glob("*/manifest.json"))


def test_the_lab_set_is_disjoint_from_every_training_prompt_exactly_and_nearly():
    """Every prepare-data folder in data/ (templated prompts made again from the manifest, self-generated
    and packaged ones read from prompts.jsonl) against every turn of the lab's set: no normalised exact
    match, no word-3-gram Jaccard similarity of 0.5 or more (the training data's own filter)."""
    folders = _training_folders()
    assert {f.name for f in folders} >= {"train", "train-v2"}, "the committed training folders are missing"
    exact = benchmark_texts(LAB_DIR)
    near = benchmark_index(LAB_DIR, threshold=0.5)
    for folder in folders:
        texts = folder_prompts(folder)
        assert texts, folder
        clash = [t for t in texts if " ".join(t.lower().split()) in exact]
        assert not clash, f"{folder.name}: {clash[0][:80]!r} is an evaluation prompt"
        close = [(t, hit) for t in texts if (hit := near.nearest(t)) is not None]
        assert not close, f"{folder.name}: {close[0][0][:60]!r} ~ {str(close[0][1][0])[:60]!r} ({close[0][1][1]:.2f})"


def test_the_lab_set_has_no_near_duplicates_inside_it():
    index = NearDuplicateIndex(0.5)
    for name in LAB_FILES:
        for line in (LAB_DIR / f"{name}.jsonl").read_text().split("\n"):
            if line.strip():
                for turn in json.loads(line)["turns"]:
                    assert index.nearest(turn) is None, turn[:80]
                    index.add(turn)


def test_the_lab_set_is_disjoint_from_the_public_benchmarks(shared_benchmarks):
    index = benchmark_index(shared_benchmarks, threshold=0.5)
    exact = benchmark_texts(shared_benchmarks)
    for name in LAB_FILES:
        for line in (LAB_DIR / f"{name}.jsonl").read_text().split("\n"):
            if line.strip():
                for turn in json.loads(line)["turns"]:
                    assert " ".join(turn.lower().split()) not in exact
                    assert index.nearest(turn) is None, turn[:80]


# which set is used

def test_a_clone_with_nothing_beside_it_measures_the_lab_set(nothing_beside):
    chosen = prompt_set()
    assert chosen.folder is None
    prompts = chosen.load(3)
    assert {p.domain for p in prompts} == {"math", "code", "chat"}
    assert all(p.origin == prompt_sets.LAB_LABEL for p in prompts)


def test_the_order_is_named_folder_then_environment_then_beside_the_checkout_then_fetched(
        monkeypatch, tmp_path, public):
    shared, fetched, env = tmp_path / "shared", tmp_path / "fetched", tmp_path / "env"
    for folder in (shared, fetched, env):
        _write(folder, "gsm8k", 1)
    monkeypatch.setattr(prompt_sets, "SHARED_DIR", shared)
    monkeypatch.setattr(prompt_sets, "FETCHED_DIR", fetched)
    monkeypatch.setenv(prompt_sets.ENV, str(env))
    assert prompt_set(public).folder == public.resolve()
    assert prompt_set().folder == env.resolve()
    monkeypatch.delenv(prompt_sets.ENV)
    assert prompt_set().folder == shared
    monkeypatch.setattr(prompt_sets, "SHARED_DIR", tmp_path / "absent")
    assert prompt_set().folder == fetched


def test_lab_forces_the_lab_set_by_argument_or_environment(monkeypatch, public):
    assert prompt_set("lab").folder is None
    monkeypatch.setenv(prompt_sets.ENV, "lab")
    assert prompt_set().folder is None
    assert prompt_set(public).folder == public.resolve()  # an explicit folder still wins


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_a_named_folder_that_does_not_exist_is_an_error_that_names_the_fetch_command(monkeypatch, tmp_path, how):
    missing = tmp_path / "typo"
    if how == "environment":
        monkeypatch.setenv(prompt_sets.ENV, str(missing))
    with pytest.raises(LabkitError, match="benchmarks fetch"):
        prompt_set(missing if how == "argument" else None)


def test_a_folder_without_a_requested_file_is_an_error_naming_it(tmp_path):
    folder = tmp_path / "some"
    _write(folder, "gsm8k", 3)
    with pytest.raises(LabkitError, match="humaneval.jsonl"):
        prompt_set(folder).load(1, ("gsm8k", "humaneval"))


# what is loaded and how it is named

def test_public_files_give_limit_prompts_each_and_keep_their_file_and_domain(public):
    prompts = prompt_set(public).load(2)
    assert [p.source for p in prompts] == ["gsm8k"] * 2 + ["math500"] * 2 + ["humaneval"] * 2 + ["mbpp"] * 2 + \
        ["mt-bench"] * 2
    assert [p.domain for p in prompts][::2] == ["math", "math", "code", "code", "chat"]


def test_the_lab_set_answers_public_names_with_as_many_prompts_a_domain(public):
    names = ("gsm8k", "math500", "humaneval", "mt-bench")
    lab = PromptSet(None, "test").load(2, names)
    pub = prompt_set(public).load(2, names)
    count = lambda ps: {d: sum(p.domain == d for p in ps) for d in ("math", "code", "chat")}  # noqa: E731
    assert count(lab) == count(pub) == {"math": 4, "code": 2, "chat": 2}


def test_a_set_too_small_for_the_full_run_is_refused_with_what_is_missing(public):
    with pytest.raises(LabkitError, match="chat 2 of the 8 needed"):
        prompt_set(public).load(1, need=8)
    assert len(prompt_set(public).load(1, need=2)) == 5


def test_the_description_names_the_set_and_counts_used_held_and_needed(public, nothing_beside):
    prompts, line = eval_prompts(None, 2, need=8)
    m = PROMPT_LINE.search(line)
    assert m and m["label"] == prompt_sets.LAB_LABEL
    assert parse_counts(m["used"]) == {"math": 4, "code": 4, "chat": 2}
    assert parse_counts(m["held"]) == {"math": 40, "code": 40, "chat": 40}
    assert parse_counts(m["need"]) == {"math": 16, "code": 16, "chat": 8}
    _, line = eval_prompts(public, 1)
    m = PROMPT_LINE.search(line)
    assert str(public.resolve()) in m["label"] and m["need"] is None
    assert parse_counts(m["held"]) == {"math": 9, "code": 9, "chat": 2}


def test_load_prompts_names_the_folder_of_files_it_read(public):
    prompts = load_prompts([public / "gsm8k.jsonl"], 1)
    assert prompts[0].origin == f"files in {public}"
    assert prompt_sets.describe_prompts(prompts) == {"sets": [f"files in {public}"], "files": {"gsm8k": 1},
                                                     "domains": {"math": 1}}
