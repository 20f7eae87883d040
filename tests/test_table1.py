"""labkit.measure.table1 and labkit.lab.table1_views: the macro average and its ratios computed from hand-made
per-prompt rounds, acceptance by position pooled over files, the paper's row reproducing the paper's own
headline ratios, and a live table on a tiny model (shapes only; its numbers mean nothing)."""

from __future__ import annotations

import json

import pytest

from labkit.__main__ import main
from labkit.core.errors import LabkitError
from labkit.lab.paper import PAPER, PAPER_TABLE1_QWEN3_4B
from labkit.lab.table1_views import (load_table1, paper_table1_rows, position_figure, table1_paper_row, table1_rows,
                                     table1_sentences)
from labkit.measure.table1 import acceptance_by_position, macro_ratio, macro_tau, measure_table1, table1_prompts
from labkit.model.target import load_target
from labkit.pipeline.prompt_sets import Prompt


def _cell(drafter, file, rounds, temp=1.0, acc=(0.8, 0.5), n=(10, 8)):
    tokens = sum(t for t, _ in rounds)
    count = sum(r for _, r in rounds)
    return {"drafter": drafter, "file": file, "domain": "math", "temperature": temp, "tau": tokens / count,
            "per_prompt_rounds": [list(x) for x in rounds], "position_acceptance": list(acc),
            "position_rounds": list(n), "n_prompts": len(rounds), "rounds": count, "tokens_per_s": 1.0}


def _result(cells, drafters=("dflash", "dspark"), files=("gsm8k", "mt-bench")):
    return {"target": "hand", "drafters": list(drafters), "files": list(files), "temperatures": [1.0],
            "cells": cells}


# two files, three prompts each: DSpark emits 20% more per round on every prompt of gsm8k, 50% more on mt-bench
HAND = _result([
    _cell("dflash", "gsm8k", [(30, 10), (40, 10), (20, 10)]),
    _cell("dspark", "gsm8k", [(36, 10), (48, 10), (24, 10)]),
    _cell("dflash", "mt-bench", [(20, 10), (20, 10), (20, 10)]),
    _cell("dspark", "mt-bench", [(30, 10), (30, 10), (30, 10)]),
])


def test_the_macro_average_is_the_mean_of_each_files_pooled_tau():
    """gsm8k pools (30 + 40 + 20) / 30 = 3.0 for DFlash and 3.6 for DSpark, mt-bench 2.0 and 3.0: macros 2.5
    and 3.3, ratio 1.32 (not the pooled 168 / 60 over 150 / 60)."""
    assert macro_tau(HAND, "dflash").value == pytest.approx(2.5)
    assert macro_tau(HAND, "dspark").value == pytest.approx(3.3)
    ratio = macro_ratio(HAND, "dspark", "dflash")
    assert ratio.value == pytest.approx(3.3 / 2.5) and ratio.n == 3
    assert ratio.low > 1.0  # every prompt slice favours DSpark: no resample can reverse it
    same = macro_ratio(HAND, "dflash", "dflash")
    assert same.value == same.low == same.high == pytest.approx(1.0)


def test_the_macro_needs_every_cell_and_equal_prompt_counts():
    short = _result(HAND["cells"][:3])
    with pytest.raises(LabkitError, match="no cell for dspark on mt-bench"):
        macro_ratio(short, "dspark", "dflash")
    uneven = _result([*HAND["cells"][:3], _cell("dspark", "mt-bench", [(30, 10), (30, 10)])])
    with pytest.raises(LabkitError, match="same number of prompts"):
        macro_tau(uneven, "dspark")


def test_acceptance_by_position_pools_the_files_by_their_rounds():
    """0.8 over 10 rounds and 0.4 over 30 at position 1 pool to (8 + 12) / 40 = 0.5."""
    result = _result([_cell("dspark", "gsm8k", [(3, 1)], acc=(0.8, 0.5), n=(10, 8)),
                      _cell("dspark", "mt-bench", [(3, 1)], acc=(0.4,), n=(30,))], drafters=("dspark",))
    acc, rounds = acceptance_by_position(result, "dspark")
    assert acc == pytest.approx([0.5, 0.5]) and rounds == [40, 8]
    fig = position_figure(result)
    assert list(fig.data[0].y) == pytest.approx([0.5, 0.5])


def test_the_papers_row_gives_the_papers_own_headline_ratios():
    """Table 1's Qwen3-4B row averages to DSpark +16.3% over DFlash and +30.9% over Eagle3 (Sec. 4.2)."""
    mean = {d: sum(v.values()) / len(v) for d, v in PAPER_TABLE1_QWEN3_4B.items()}
    assert mean["dspark"] / mean["dflash"] == pytest.approx(PAPER["dspark_over_dflash_tau"].low, abs=5e-4)
    assert mean["dspark"] / mean["eagle3"] == pytest.approx(PAPER["dspark_over_eagle3_tau"].high, abs=5e-4)
    header, rows = paper_table1_rows()
    assert header[-1] == "macro" and [r[0] for r in rows] == ["Eagle3", "DFlash", "DSpark"]


def test_table_rows_and_sentences_follow_the_measurement():
    header, rows = table1_rows(HAND)
    assert header[:4] == ("benchmark", "prompts", "DFlash tau", "DSpark tau")
    assert rows[0][:4] == ("gsm8k", 3, "3.00", "3.60") and rows[0][4:] == ("5.40", "6.11")  # the paper's GSM8K
    assert rows[-1][0] == "macro average" and rows[-1][2].startswith("2.50 [")
    first, second = table1_sentences(HAND)
    assert "1.32x DFlash's" in first and "higher, beyond the noise" in first and "above the paper's range" in first
    assert second == "DSpark against Eagle3: not measured (Eagle3 not in this table)."
    # one slice favours DFlash (0.80x), the other DSpark (1.28x): 1.01x overall, within noise
    noisy = _result([_cell("dflash", "gsm8k", [(30, 10), (20, 10)]), _cell("dspark", "gsm8k", [(20, 10), (31, 10)]),
                     _cell("dflash", "mt-bench", [(20, 10), (20, 10)]),
                     _cell("dspark", "mt-bench", [(20, 10), (20, 10)])])
    assert "1.01x DFlash's" in table1_sentences(noisy)[0] and "within noise" in table1_sentences(noisy)[0]


@pytest.fixture(scope="module")
def tiny_target(tiny_model_dir):
    return load_target(str(tiny_model_dir), device="cpu")


def test_a_live_table_measures_every_drafter_on_every_file_at_every_temperature(tiny_target, tmp_path, one_thread):
    prompts = [Prompt("What is 7 * 8?", "math", "gsm8k"), Prompt("Add two numbers in Python.", "code", "humaneval"),
               Prompt("What is 2 + 2?", "math", "gsm8k"), Prompt("Reverse a list.", "code", "humaneval")]
    result = measure_table1(tiny_target, prompts, ["prompt-lookup", "layer-skip"], (1.0, 0.0), 6, progress=False)
    assert result["files"] == ["gsm8k", "humaneval"] and result["temperatures"] == [1.0, 0.0]
    assert len(result["cells"]) == 2 * 2 * 2
    assert all(c["n_prompts"] == 2 and len(c["per_prompt_rounds"]) == 2 for c in result["cells"])
    header, rows = table1_rows(result, 0.0)
    assert len(rows) == 3 and rows[-1][0] == "macro average"
    again = measure_table1(tiny_target, prompts, ["prompt-lookup", "layer-skip"], (1.0, 0.0), 6, progress=False)
    assert [c["per_prompt_rounds"] for c in again["cells"]] == [c["per_prompt_rounds"] for c in result["cells"]]
    with pytest.raises(LabkitError, match="name at least one"):
        measure_table1(tiny_target, prompts, [], progress=False)


def test_table1_prompts_take_every_table1_file_the_folder_holds(tmp_path):
    for name in ("gsm8k", "lbpp", "notes"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"turns": [f"a {name} prompt"]}) + "\n")
    prompts, about = table1_prompts(tmp_path, 1)
    assert [p.source for p in prompts] == ["gsm8k", "lbpp"] and "using math 1, code 1" in about
    lab, _ = table1_prompts("lab", 2)
    assert sorted({p.source for p in lab}) == ["chat", "code", "math"] and len(lab) == 6
    (empty := tmp_path / "empty").mkdir()
    with pytest.raises(LabkitError, match="holds none of"):
        table1_prompts(empty, 1)


def test_table1_bad_input_is_one_line(capsys):
    assert main(["table1", "--drafters", "nonsense-drafter"]) == 2
    err = capsys.readouterr().err
    assert "nonsense-drafter" in err and "Traceback" not in err


def test_the_table1_command_writes_its_json_and_prints_each_temperature(tiny_model_dir, tmp_path, capsys, one_thread):
    for name, text in (("gsm8k", "What is 7 * 8?"), ("mbpp", "Reverse a list.")):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"turns": [text]}) + "\n")
    out = tmp_path / "table1.json"
    assert main(["table1", "--target", str(tiny_model_dir), "--device", "cpu", "--drafters", "prompt-lookup",
                 "layer-skip", "--benchmarks", str(tmp_path), "--limit", "1", "--max-new-tokens", "4",
                 "--temperatures", "1", "0", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["files"] == ["gsm8k", "mbpp"] and result["drafters"] == ["prompt-lookup", "layer-skip"]
    printed = capsys.readouterr().out
    assert "T = 1\n| benchmark |" in printed and "T = 0\n| benchmark |" in printed and "macro average" in printed


def test_the_closing_row_reads_a_saved_table_or_says_it_was_not_measured(tmp_path):
    saved = tmp_path / "table1.json"
    saved.write_text(json.dumps(dict(HAND, max_new_tokens=128)))
    row = table1_paper_row(load_table1(saved), "t.json")
    assert row[2].startswith("1.320 [") and row[3] == "above the paper's range"
    assert "t.json): temperature 1, 2 files, 3 prompts each, 128 new tokens" in row[4]
    assert load_table1(tmp_path / "none.json") is None
    missing = table1_paper_row(None, "none.json")
    assert missing[2] == "not measured in this run" and "not in none.json" in missing[4]
    greedy_only = dict(HAND, temperatures=[0.0])
    assert table1_paper_row(greedy_only, "g.json")[2] == "not measured in this run"
