"""Evaluation prompt sets: which prompts a bench, a serving run or a notebook measures, and saying so.

Two kinds of set. The lab's own (`data/eval`: math, code and chat, 40 prompts each, written for the
lab and disjoint from every training prompt) ships with the repository and needs nothing else. A
folder of public benchmark files (`gsm8k.jsonl`, `humaneval.jsonl`, ... in the `{"turns": [...]}`
format; `python -m labkit benchmarks fetch` writes one) is used where one is found, in this order:

1. a folder named explicitly (`--benchmarks DIR`, a notebook's `BENCH_DIR`);
2. the `LABKIT_BENCHMARKS` environment variable;
3. a `shared/benchmarks` folder beside the checkout, where present (as on the project's CI machines);
4. `build/benchmarks`, where `benchmarks fetch` writes by default;
5. otherwise the lab's own set.

The name `lab` in place of a folder (1 or 2) forces the lab's own set. A prompt remembers the set it
came from, so every result can name what it measured (`describe_prompts`). When a caller asks for
public files by name (gsm8k, math500, humaneval, mbpp, mt-bench), the lab's set answers with the same
number of prompts a domain: `limit` times the number of requested files of that domain.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from labkit.core.errors import LabkitError

REPO = Path(__file__).resolve().parents[2]
LAB_DIR = REPO / "data" / "eval"
SHARED_DIR = REPO.parent / "shared" / "benchmarks"
FETCHED_DIR = REPO / "build" / "benchmarks"
ENV = "LABKIT_BENCHMARKS"
LAB = "lab"

#: domain of each public benchmark file, by file stem (and of the lab's own files)
DOMAINS = {"gsm8k": "math", "math500": "math", "aime25": "math", "humaneval": "code", "mbpp": "code",
           "lbpp": "code", "mt-bench": "chat", "arena-hard-v2": "chat", "math": "math", "code": "code",
           "chat": "chat"}
#: the public files measured by default: two math, two code, one chat (the paper's Table 1 subset)
PUBLIC_FILES = ("gsm8k", "math500", "humaneval", "mbpp", "mt-bench")
LAB_FILES = ("math", "code", "chat")
LAB_LABEL = "the lab's own evaluation set (data/eval)"


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt: its first user turn, domain, file stem and the set it came from."""

    text: str
    domain: str
    source: str
    origin: str = "files"


def _rows(path: Path) -> list[dict]:
    """The rows of a prompt file, read once per version of the file (`load`, `held` and `describe`
    all ask for them)."""
    if not path.is_file():
        raise LabkitError(f"Prompt file {path} does not exist: pass a JSONL file of {{\"turns\": [...]}} rows, "
                          "or leave --prompts out to use the lab's own evaluation set (data/eval).")
    stat = path.stat()
    return _read_rows(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=64)
def _read_rows(path: str, mtime_ns: int, size: int) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().split("\n") if line.strip()]  # not splitlines: U+2028
    for row in rows:
        turns = row.get("turns") if isinstance(row, dict) else None
        if not turns or not isinstance(turns[0], str):
            raise LabkitError(f"{path}: every row needs a non-empty \"turns\" list of strings.")
    return rows


def load_prompts(paths: list[str | Path], limit: int | None = None, origin: str | None = None) -> list[Prompt]:
    """First turns of `{"turns": [...]}` JSONL files, `limit` from each file; domain from the row or file.
    `origin` names the set (default: the files' folder)."""
    if limit is not None and limit <= 0:
        raise LabkitError(f"--limit must be a positive number of prompts per file, got {limit}.")
    prompts: list[Prompt] = []
    for path in map(Path, paths):
        where = origin or f"files in {path.parent}"
        prompts += [Prompt(row["turns"][0], row.get("domain", DOMAINS.get(path.stem, path.stem)), path.stem, where)
                    for row in _rows(path)[:limit]]
    if not prompts:
        raise LabkitError(f"No prompts found in {', '.join(map(str, paths))}.")
    return prompts


def _domain(name: str) -> str:
    if name not in DOMAINS:
        raise LabkitError(f"Unknown benchmark file {name!r}: use one of {', '.join(DOMAINS)}.")
    return DOMAINS[name]


@dataclass(frozen=True)
class PromptSet:
    """A resolved evaluation set: the lab's own (`folder` None) or a folder of public files."""

    folder: Path | None
    how: str  # why this set was chosen, e.g. "LABKIT_BENCHMARKS" or "beside the checkout"

    @property
    def label(self) -> str:
        return LAB_LABEL if self.folder is None else f"public benchmark files in {self.folder} ({self.how})"

    def _files(self, names: tuple[str, ...]) -> list[tuple[Path, int]]:
        """(file, how many of the caller's per-file limit it supplies) for the requested public names."""
        if self.folder is not None:
            missing = [n for n in names if not (self.folder / f"{n}.jsonl").is_file()]
            if missing:
                raise LabkitError(f"{self.folder} has no {', '.join(m + '.jsonl' for m in missing)}: run "
                                  f"`python -m labkit benchmarks fetch --out {self.folder}`, name other files, or "
                                  f"use the lab's own set (--benchmarks lab, or {ENV}=lab).")
            return [(self.folder / f"{n}.jsonl", 1) for n in names]
        per_domain = Counter(_domain(n) for n in names)
        return [(LAB_DIR / f"{d}.jsonl", k) for d, k in per_domain.items()]

    def load(self, limit: int | None = None, names: tuple[str, ...] = PUBLIC_FILES,
             need: int | None = None) -> list[Prompt]:
        """`limit` prompts from each named public file (all with None), or as many a domain from the
        lab's set. `need`: the per-file limit the caller's full run takes; a set holding fewer prompts
        a domain than that run would is refused, so a conclusion never rests on a set too small for it."""
        files = self._files(tuple(names))
        if need is not None:
            held, wanted = self.held(names), self.wanted(names, need)
            short = [f"{d} {held.get(d, 0)} of the {n} needed" for d, n in wanted.items() if held.get(d, 0) < n]
            if short:
                raise LabkitError(f"{self.label} holds too few prompts for this run: {', '.join(short)}. Use "
                                  f"another folder or the lab's own set ({ENV}=lab).")
        prompts: list[Prompt] = []
        for path, k in files:
            prompts += load_prompts([path], None if limit is None else limit * k, origin=self.label)
        return prompts

    def held(self, names: tuple[str, ...] = PUBLIC_FILES) -> dict[str, int]:
        """Prompts the set holds a domain, over the files `names` selects."""
        out: Counter = Counter()
        for path, _ in self._files(tuple(names)):
            out[_domain(path.stem)] += len(_rows(path))
        return dict(out)

    def wanted(self, names: tuple[str, ...], per_file: int) -> dict[str, int]:
        """Prompts a domain that `per_file` prompts from each named file amount to."""
        out: Counter = Counter()
        for path, k in self._files(tuple(names)):
            out[_domain(path.stem)] += per_file * k
        return dict(out)

    def describe(self, prompts: list[Prompt], names: tuple[str, ...] = PUBLIC_FILES,
                 need: int | None = None) -> str:
        """One line naming the set, the prompts used a domain, what the set holds and what a full run
        takes, e.g. "prompt set: the lab's own evaluation set (data/eval); using math 2, code 2, chat 1
        (the set holds math 40, code 40, chat 40; a full run takes math 16, code 16, chat 8)"."""
        used = Counter(p.domain for p in prompts)
        held = self.held(names)
        text = f"prompt set: {self.label}; using {_counts(used)} (the set holds {_counts(held)}"
        if need is not None:
            text += f"; a full run takes {_counts(self.wanted(names, need))}"
        return text + ")"


def _counts(by_domain) -> str:
    order = {d: i for i, d in enumerate(LAB_FILES)}
    return ", ".join(f"{d} {n}" for d, n in sorted(by_domain.items(), key=lambda kv: order.get(kv[0], 9)))


def prompt_set(folder: str | Path | None = None) -> PromptSet:
    """The evaluation set to measure (the order is in the module docstring). A folder named
    explicitly or by the environment must exist: a typo is an error, never a silent fallback."""
    for value, how in ((folder, "named"), (os.environ.get(ENV) or None, ENV)):
        if value is None:
            continue
        if str(value) == LAB:
            return PromptSet(None, how)
        path = Path(value).expanduser()
        if not path.is_dir():
            raise LabkitError(f"The benchmark folder {path} ({how}) does not exist: fetch the public sets with "
                              f"`python -m labkit benchmarks fetch --out {path}`, or use the lab's own set "
                              f"(--benchmarks lab, {ENV}=lab).")
        return PromptSet(path.resolve(), how)
    for path, how in ((SHARED_DIR, "beside the checkout"), (FETCHED_DIR, "fetched")):
        if path.is_dir() and any(path.glob("*.jsonl")):
            return PromptSet(path, how)
    return PromptSet(None, "default")


def describe_prompts(prompts: list[Prompt]) -> dict:
    """What a result measured, for its JSON: the sets, prompts by file and by domain."""
    return {"sets": sorted({p.origin for p in prompts}),
            "files": dict(Counter(p.source for p in prompts)),
            "domains": dict(Counter(p.domain for p in prompts))}


def eval_prompts(folder: str | Path | None = None, limit: int | None = None,
                 names: tuple[str, ...] = PUBLIC_FILES, need: int | None = None) -> tuple[list[Prompt], str]:
    """The prompts of the resolved set (see `prompt_set` and `PromptSet.load`) and the line that names
    them (`PromptSet.describe`), for a notebook to print."""
    chosen = prompt_set(folder)
    prompts = chosen.load(limit, names, need)
    return prompts, chosen.describe(prompts, names, need)
