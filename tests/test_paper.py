"""The paper's numbers beside the lab's (labkit/lab/paper.py): where a measurement falls, judged by its
interval, and the row a notebook's closing table prints."""

from __future__ import annotations

import pytest

from labkit.core.errors import LabkitError
from labkit.core.evidence import Interval
from labkit.lab.paper import PAPER, PAPER_HEADER, PaperNumber, paper_claim_row, paper_row, where_it_falls

RANGE = PaperNumber("a ratio", 1.16, 1.18, "Table 1")


def test_where_a_measurement_falls_is_judged_by_its_interval():
    assert where_it_falls(RANGE, Interval(1.17, 1.10, 1.25, 8)) == "within the paper's range"
    assert where_it_falls(RANGE, Interval(1.05, 0.98, 1.12, 8)) == "below the paper's range"
    assert where_it_falls(RANGE, Interval(1.30, 1.20, 1.40, 8)) == "above the paper's range"
    assert where_it_falls(RANGE, Interval(1.08, 0.98, 1.28, 5)) == "outside it, but its interval reaches the paper's range"
    assert where_it_falls(RANGE, 1.5) == "above the paper's range (no spread)"
    one = PaperNumber("a value", 0.8, 0.8, "App. A")
    assert where_it_falls(one, Interval(0.795, 0.783, 0.805, 5000)) == "its interval holds the paper's value"
    assert where_it_falls(one, Interval(0.75, 0.74, 0.76, 5000)) == "below the paper's range"


def test_a_row_names_the_claim_both_numbers_and_why():
    row = paper_row("dspark_over_dflash_tau", Interval(1.077, 0.983, 1.278, 5), "smaller target", units="prompts")
    assert len(row) == len(PAPER_HEADER) and row[0] == PAPER["dspark_over_dflash_tau"].what
    assert row[1].startswith("1.163-1.184 (Table 1") and row[2] == "1.077 [0.983, 1.278] (95% interval over 5 prompts)"
    assert row[3].startswith("outside it") and row[4] == "smaller target"
    assert paper_row("raw_ece", None, "why")[2] == "not measured in this run"
    with pytest.raises(LabkitError, match="pick one of"):
        paper_row("no such claim", 1.0, "")


def test_every_paper_number_is_a_range_with_a_source():
    for key, number in PAPER.items():
        assert number.low <= number.high and number.where and number.what, key


def test_a_row_can_name_what_the_lab_measured_beside_the_papers_quantity():
    row = paper_row("dspark_tau", 1.21, "why", fmt=".2f", claim="tau a free drafter needs here to break even")
    assert row[0] == "tau a free drafter needs here to break even" and row[2] == "1.21"
    assert row[3] == "below the paper's range (no spread)"
    assert paper_row("dspark_tau", None, "why", claim="named")[0] == "named"
    assert paper_row("dspark_tau", None, "why", missing="too few rounds")[2] == "too few rounds"


def test_a_claim_without_a_paper_number_says_so():
    row = paper_claim_row("lossless", "by construction (Sec. 2.1)", "p = 0.41", "why")
    assert len(row) == len(PAPER_HEADER) and row[3] == "the paper gives no number" and row[2] == "p = 0.41"
