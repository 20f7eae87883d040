"""The paper's Table 1 measured again: tau of several drafters on each benchmark file at hand, at T = 1
(the paper's setting) and greedy, with acceptance by position (the paper's Fig. 2).

Every drafter decodes the same prompts with the same seed; the offline setting of Sec. 4.2 (no
scheduler: every round verifies the whole block) is what `run_eval` measures. The result is one JSON
(`measure_table1`), which notebook 03 draws (`labkit.lab.table1_views`) and `python -m labkit table1`
writes; the macro average and its ratios carry a bootstrap interval over prompt slices (`macro_tau`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from labkit.core.errors import LabkitError
from labkit.core.evidence import Interval, bootstrap
from labkit.core.sampling import SamplingParams
from labkit.measure.bench import run_eval
from labkit.pipeline.prompt_sets import Prompt, describe_prompts, prompt_set

#: the paper's benchmarks that exist as public files here, in Table 1's order (LBPP stands where the paper
#: has LiveCodeBench; there is no Alpaca file)
TABLE1_FILES = ("gsm8k", "math500", "aime25", "mbpp", "humaneval", "lbpp", "mt-bench", "arena-hard-v2")
#: the lab's own set answers with one file a domain
LAB_NAMES = ("gsm8k", "humaneval", "mt-bench")


def table1_prompts(folder=None, limit: int | None = 10) -> tuple[list[Prompt], str]:
    """`limit` prompts from each Table 1 file the resolved set holds (`prompt_set`: the public files where
    present, else the lab's own set, one file a domain), and the line that names them."""
    chosen = prompt_set(folder)
    names = LAB_NAMES if chosen.folder is None else tuple(
        n for n in TABLE1_FILES if (chosen.folder / f"{n}.jsonl").is_file())
    if not names:
        raise LabkitError(f"{chosen.label} holds none of {', '.join(TABLE1_FILES)}: fetch them with "
                          "`python -m labkit benchmarks fetch` or use the lab's own set (--benchmarks lab).")
    prompts = chosen.load(limit, names)
    return prompts, chosen.describe(prompts, names)


def by_file(prompts: Sequence[Prompt]) -> dict[str, list[Prompt]]:
    """Prompts grouped by the file they came from, in first-seen order."""
    out: dict[str, list[Prompt]] = {}
    for p in prompts:
        out.setdefault(p.source, []).append(p)
    return out


def measure_table1(target, prompts: Sequence[Prompt], drafters: Sequence[str],
                   temperatures: Sequence[float] = (1.0, 0.0), max_new_tokens: int = 128, seed: int = 0,
                   progress: bool = True) -> dict:
    """tau per (temperature, drafter, file) by `run_eval` (whole blocks verified every round), each cell
    with its per-prompt (tokens emitted, rounds) for intervals and its acceptance by position. JSON keys:
    target, device, dtype, max_new_tokens, seed, drafters, files, temperatures, prompt_set, cells
    (drafter, file, domain, temperature, tau, per_prompt_rounds, position_acceptance, position_rounds,
    n_prompts, rounds, tokens_per_s)."""
    if not drafters:
        raise LabkitError("Table 1 compares drafters: name at least one (e.g. eagle3 dflash dspark).")
    files = by_file(prompts)
    if not files:
        raise LabkitError("Table 1 needs prompts: `table1_prompts` finds the benchmark files.")
    cells, last = [], {}
    for temp in temperatures:
        for spec in drafters:
            for name, group in files.items():
                last = run_eval(target, group, spec, max_new_tokens, SamplingParams(temperature=float(temp)), seed,
                                progress=progress)
                cells.append({"drafter": spec, "file": name, "domain": group[0].domain, "temperature": float(temp),
                              "tau": last["tau"], "per_prompt_rounds": last["per_prompt_rounds"],
                              "position_acceptance": last["position_acceptance"],
                              "position_rounds": last["position_rounds"], "n_prompts": last["n_prompts"],
                              "rounds": last["rounds"], "tokens_per_s": last["tokens_per_s"]})
    return {"target": target.name, "device": last.get("device"), "dtype": last.get("dtype"),
            "max_new_tokens": max_new_tokens, "seed": seed, "drafters": list(drafters), "files": list(files),
            "temperatures": [float(t) for t in temperatures], "prompt_set": describe_prompts(list(prompts)),
            "cells": cells}


def cell(result: dict, drafter: str, file: str, temperature: float) -> dict | None:
    """The cell of one drafter on one file at one temperature, or None."""
    return next((c for c in result["cells"] if c["drafter"] == drafter and c["file"] == file
                 and c["temperature"] == float(temperature)), None)


def _slices(result: dict, drafters: Sequence[str], temperature: float) -> torch.Tensor:
    """(n, files, drafters, 2): the j-th prompt of every file as one unit, (tokens emitted, rounds) per
    drafter, so a bootstrap over units keeps every file in every resample with its own prompt count."""
    per: list[list[list[list[int]]]] = []
    for f in result["files"]:
        rows = []
        for d in drafters:
            c = cell(result, d, f, temperature)
            if c is None:
                raise LabkitError(f"Table 1 has no cell for {d} on {f} at temperature {temperature:g}: measure it.")
            rows.append(c["per_prompt_rounds"])
        per.append(rows)
    counts = {len(r) for rows in per for r in rows}
    if len(counts) != 1:
        raise LabkitError("Table 1's macro average needs the same number of prompts on every file and drafter "
                          f"(got {sorted(counts)}): measure with one --limit that every file holds.")
    return torch.tensor(per, dtype=torch.float64).permute(2, 0, 1, 3)  # (n, files, drafters, 2)


def _macro(x: torch.Tensor) -> torch.Tensor:
    """Macro tau per drafter: each file's pooled tau (tokens emitted over rounds), averaged over files."""
    pooled = x.sum(0)  # (files, drafters, 2)
    return (pooled[..., 0] / pooled[..., 1]).mean(0)


def macro_tau(result: dict, drafter: str, temperature: float = 1.0, seed: int = 0) -> Interval:
    """The macro-average tau over the files (the paper's "macro-average accepted length", Sec. 4.2), each
    file's tau pooled over its rounds, with a bootstrap interval over prompt slices (`_slices`)."""
    x = _slices(result, [drafter], temperature)
    return bootstrap(lambda i: _macro(x[i])[0], x.shape[0], seed=seed)


def macro_ratio(result: dict, drafter: str, over: str, temperature: float = 1.0, seed: int = 0) -> Interval:
    """`drafter`'s macro tau over `over`'s on the same prompts (the paper's +16.3% ... is this ratio - 1),
    paired bootstrap over prompt slices."""
    x = _slices(result, [drafter, over], temperature)

    def ratio(i):
        m = _macro(x[i])
        return m[0] / m[1]
    return bootstrap(ratio, x.shape[0], seed=seed)


def acceptance_by_position(result: dict, drafter: str,
                           temperature: float = 1.0) -> tuple[list[float | None], list[int]]:
    """Acceptance at draft position k given positions 1..k-1 accepted (the paper's Fig. 2) over every
    file's rounds: each cell's `labkit.core.trace.position_acceptance` weighted by the rounds behind it,
    which is that function over all the rounds at once; with the rounds behind each position."""
    cells = [c for c in result["cells"] if c["drafter"] == drafter and c["temperature"] == float(temperature)]
    width = max((len(c["position_rounds"]) for c in cells), default=0)
    hits, rounds = [0.0] * width, [0] * width
    for c in cells:
        for k, (a, n) in enumerate(zip(c["position_acceptance"], c["position_rounds"])):
            if a is not None and n:
                hits[k] += a * n
                rounds[k] += n
    return [h / n if n else None for h, n in zip(hits, rounds)], rounds


__all__ = ["LAB_NAMES", "TABLE1_FILES", "acceptance_by_position", "by_file", "cell", "macro_ratio", "macro_tau",
           "measure_table1", "table1_prompts"]
