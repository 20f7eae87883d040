"""Notebook 03's Table 1: the lab's rows beside the paper's Qwen3-4B row, the macro ratios the paper
headlines with their intervals, and acceptance by position (the paper's Fig. 2), drawn from a
`labkit.measure.table1` result (a committed JSON or a live quick run)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go

from labkit.core.evidence import describe_ratio
from labkit.lab.paper import PAPER_TABLE1_QWEN3_4B, paper_row
from labkit.measure.table1 import acceptance_by_position, cell, macro_ratio, macro_tau

#: the paper's column for each lab file ("-": the paper has no such benchmark)
PAPER_COLUMN = {"gsm8k": "GSM8K", "math500": "MATH", "aime25": "AIME25", "mbpp": "MBPP", "humaneval": "HumanEval",
                "lbpp": "LCB", "mt-bench": "MT-Bench", "arena-hard-v2": "Arena-Hard"}
NAMES = {"eagle3": "Eagle3", "dflash": "DFlash", "dspark": "DSpark"}


def _name(spec: str) -> str:
    return NAMES.get(spec, spec)


def table1_rows(result: dict, temperature: float = 1.0) -> tuple[tuple[str, ...], list[tuple]]:
    """(header, rows): one row per file with each drafter's tau and, where the paper has that benchmark,
    its Qwen3-4B tau for each drafter (LBPP stands beside the paper's LiveCodeBench, a different set);
    then the macro average with its 95% interval over prompt slices."""
    drafters = result["drafters"]
    header = ("benchmark", "prompts", *(f"{_name(d)} tau" for d in drafters),
              *(f"paper {_name(d)} (Qwen3-4B)" for d in drafters if d in PAPER_TABLE1_QWEN3_4B))
    rows = []
    for f in result["files"]:
        cells = [cell(result, d, f, temperature) for d in drafters]
        col = PAPER_COLUMN.get(f)
        paper = [PAPER_TABLE1_QWEN3_4B[d].get(col) for d in drafters if d in PAPER_TABLE1_QWEN3_4B]
        label = f + (f" (paper: {col})" if col and col.lower().replace("-", "") != f.replace("-", "") else "")
        rows.append((label, cells[0]["n_prompts"] if cells[0] else 0,
                     *(f"{c['tau']:.2f}" if c else "-" for c in cells),
                     *("-" if v is None else f"{v:.2f}" for v in paper)))
    macro = [macro_tau(result, d, temperature) for d in drafters]
    paper_macro = [_paper_macro(d) for d in drafters if d in PAPER_TABLE1_QWEN3_4B]
    rows.append(("macro average", "", *(m.text(".2f") for m in macro), *(f"{v:.2f}" for v in paper_macro)))
    return header, rows


def _paper_macro(drafter: str) -> float:
    values = list(PAPER_TABLE1_QWEN3_4B[drafter].values())
    return sum(values) / len(values)


def table1_sentences(result: dict, temperature: float = 1.0, pairs: Sequence[tuple[str, str]] = (
        ("dspark", "dflash"), ("dspark", "eagle3"))) -> list[str]:
    """For each (drafter, baseline) pair measured: the macro tau ratio with its interval, chosen by its
    verdict (`describe_ratio`), and where it falls against the paper's ratio."""
    out = []
    for a, b in pairs:
        missing = [_name(x) for x in (a, b) if x not in result["drafters"]]
        if missing:
            out.append(f"{_name(a)} against {_name(b)}: not measured ({' and '.join(missing)} not in this table).")
            continue
        ratio = macro_ratio(result, a, b, temperature)
        n_files = len(result["files"])
        text = describe_ratio("macro tau", _name(a), _name(b), ratio, f"prompt slices of {n_files} files")
        row = paper_row(f"{a}_over_{b}_tau", ratio, "", ".3f", "prompt slices")
        out.append(f"{text} The paper: {row[1]}; this run is {row[3]}.")
    return out


def paper_table1_rows() -> tuple[tuple[str, ...], list[tuple]]:
    """The paper's Qwen3-4B row of Table 1, as printed (tau, T = 1, block 7)."""
    cols = list(next(iter(PAPER_TABLE1_QWEN3_4B.values())))
    rows = [(_name(d), *(f"{v:.2f}" for v in row.values()), f"{_paper_macro(d):.2f}")
            for d, row in PAPER_TABLE1_QWEN3_4B.items()]
    return ("Qwen3-4B drafter", *cols, "macro"), rows


def load_table1(path: str | Path) -> dict | None:
    """A `measure_table1` result from its JSON, or None where the file does not exist (not measured yet)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def table1_paper_row(result: dict | None, source: str) -> tuple:
    """The closing-table row (`paper_row`) for DSpark over DFlash at T = 1 from a Table 1 result read from
    `source`, or the row that says it was not measured there."""
    if not (result and {"dspark", "dflash"} <= set(result["drafters"]) and 1.0 in result["temperatures"]):
        return paper_row("dspark_over_dflash_tau", None, f"Table 1 at temperature 1 is not in {source}")
    why = (f"Table 1 as committed ({source}): temperature 1, {len(result['files'])} files, "
           f"{result['cells'][0]['n_prompts']} prompts each, {result['max_new_tokens']} new tokens; the paper's "
           "drafters are 5-layer at block 7 on Qwen3, trained on 1.3 M prompts for 10 epochs")
    return paper_row("dspark_over_dflash_tau", macro_ratio(result, "dspark", "dflash", 1.0), why, units="prompt slices")


def position_figure(result: dict, temperature: float = 1.0) -> go.Figure:
    """Acceptance at each draft position given the earlier ones accepted, one line per drafter (Fig. 2)."""
    fig = go.Figure()
    for d in result["drafters"]:
        acc, rounds = acceptance_by_position(result, d, temperature)
        fig.add_scatter(x=list(range(1, len(acc) + 1)), y=acc, mode="lines+markers", name=_name(d),
                        customdata=rounds, hovertemplate="position %{x}: %{y:.3f} over %{customdata} rounds")
    fig.update_layout(title=f"Acceptance by draft position, T = {temperature:g} ({result['target']}, "
                            f"{len(result['files'])} files)", xaxis_title="draft position k",
                      yaxis_title="P(draft k accepted | 1..k-1 accepted)", yaxis_range=[0, 1])
    return fig


__all__ = ["PAPER_COLUMN", "load_table1", "paper_table1_rows", "position_figure", "table1_paper_row", "table1_rows",
           "table1_sentences"]
