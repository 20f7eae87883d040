"""The paper's numbers that the notebooks measure again, in one place, and the closing table that sets
each beside the lab's.

Each `PaperNumber` is what the paper reports (a value, or the range over its targets), where it says so,
and the setting it was measured in. `paper_row` sets a lab measurement (an `Interval` where the run has
one) beside it and says where the lab's value falls, judged by its interval; `why` is the notebook's
sentence, built from this run's own setting (model, data, hardware), on why the two can differ.
"""

from __future__ import annotations

from dataclasses import dataclass

from labkit.core.errors import LabkitError
from labkit.core.evidence import Interval

#: the setting of every number below unless it says otherwise (Sec. 4.1, 5)
PAPER_SETTING = "Qwen3 4B-14B and Gemma4-12B targets, drafters trained on the paper's data, GPU serving"


@dataclass(frozen=True)
class PaperNumber:
    """A number the paper reports: `low`-`high` (equal for one value), `unit`, where, in what setting."""

    what: str
    low: float
    high: float
    where: str
    setting: str = PAPER_SETTING
    unit: str = ""

    def text(self) -> str:
        value = f"{self.low:g}{self.unit}" if self.low == self.high else f"{self.low:g}-{self.high:g}{self.unit}"
        return f"{value} ({self.where})"


PAPER: dict[str, PaperNumber] = {
    "dspark_over_dflash_tau": PaperNumber(
        "DSpark tau / DFlash tau (macro over benchmarks, T = 1)", 1.163, 1.184,
        "Table 1, Sec. 4.2: +16.3%, +18.4%, +18.3% on Qwen3-4B, 8B, 14B"),
    "dspark_over_eagle3_tau": PaperNumber(
        "DSpark tau / Eagle3 tau (macro over benchmarks, T = 1)", 1.267, 1.309,
        "Table 1, Sec. 4.2: +30.9%, +26.7%, +30.0% on Qwen3-4B, 8B, 14B"),
    "dflash_tau": PaperNumber("DFlash tau, block of 8 (per benchmark, T = 1)", 2.59, 5.45, "Table 1, all targets"),
    "dspark_tau": PaperNumber("DSpark tau, block of 8 (per benchmark, T = 1)", 2.92, 6.21, "Table 1, all targets"),
    "head_latency_overhead": PaperNumber(
        "the sequential head's share of a serving round (draft + verify) at block sizes 4-16", 0.006, 0.013,
        "Fig. 4 right, Sec. 4.3.2: +0.6% to +1.3%, batch 128", unit=" of the round"),
    "raw_ece": PaperNumber("confidence head ECE before STS", 0.033, 0.082, "Fig. 6, Sec. 4.3.4: 3%-8%"),
    "sts_ece": PaperNumber("mean ECE after STS", 0.004, 0.02, "Fig. 6: 0.4%-2.0%, 'about 1%' on average"),
    "raw_auc": PaperNumber("confidence head ROC-AUC (positions 1, 3, 5, 7)", 0.812, 0.907, "Fig. 6"),
    "first_acceptance": PaperNumber(
        "conditional acceptance of draft position 1", 0.53, 0.88,
        "Fig. 2, Sec. 4.3.1: Eagle3 0.81 and DFlash 0.88 on math, 0.53 and 0.72 on chat"),
    "one_draft_acceptance": PaperNumber(
        "one draft's acceptance sum_x min(p_t, p_d) for p_t = (0.7, 0.3), p_d = (0.5, 0.5)", 0.8, 0.8, "App. A",
        setting="the appendix's two-token example, worked by hand"),
    "production_verify_tokens": PaperNumber(
        "tokens verified per request a step at moderate load (MTP-1: a static 2)", 4, 6, "Sec. 5.4, Fig. 8",
        setting="DeepSeek-V4 Flash and Pro served on GPUs under live traffic"),
    "dspark_tau_second_family": PaperNumber(
        "DSpark tau on another model family (per benchmark, T = 1)", 2.92, 6.05, "Table 1, the Gemma4-12B row"),
}


#: Table 1's Qwen3-4B row (tau per round, T = 1, block 7, the bonus token counted), benchmark by benchmark
PAPER_TABLE1_QWEN3_4B: dict[str, dict[str, float]] = {
    "eagle3": {"GSM8K": 5.14, "MATH": 4.62, "AIME25": 3.92, "MBPP": 3.69, "HumanEval": 4.16, "LCB": 3.77,
               "MT-Bench": 2.39, "Alpaca": 2.26, "Arena-Hard": 2.55},
    "dflash": {"GSM8K": 5.40, "MATH": 4.85, "AIME25": 4.15, "MBPP": 4.40, "HumanEval": 4.74, "LCB": 4.18,
               "MT-Bench": 3.07, "Alpaca": 2.96, "Arena-Hard": 2.83},
    "dspark": {"GSM8K": 6.11, "MATH": 5.70, "AIME25": 4.89, "MBPP": 5.13, "HumanEval": 5.38, "LCB": 4.86,
               "MT-Bench": 3.64, "Alpaca": 3.54, "Arena-Hard": 3.29},
}


def paper_number(key: str) -> PaperNumber:
    if key not in PAPER:
        raise LabkitError(f"no paper number {key!r}: pick one of {', '.join(sorted(PAPER))}.")
    return PAPER[key]


def where_it_falls(number: PaperNumber, lab: Interval | float) -> str:
    """Where the lab's value falls against the paper's range, judged by its interval where it has one:
    "within the paper's range", "below it", "above it", "its interval holds the paper's value" for a single
    paper value inside the interval, or "outside it, but its interval reaches the paper's range"; without an
    interval only the value is compared ("no spread")."""
    if not isinstance(lab, Interval):
        v = float(lab)
        place = "within the paper's range" if number.low <= v <= number.high else (
            "below the paper's range" if v < number.low else "above the paper's range")
        return place + " (no spread)"
    if number.low <= lab.value <= number.high:
        return "within the paper's range"
    if number.low == number.high and lab.low <= number.low <= lab.high:
        return "its interval holds the paper's value"
    if lab.high < number.low:
        return "below the paper's range"
    if lab.low > number.high:
        return "above the paper's range"
    return "outside it, but its interval reaches the paper's range"


PAPER_HEADER = ("claim", "paper", "this run", "where it falls", "why they can differ")


def paper_row(key: str, lab: Interval | float | None, why: str, fmt: str = ".3f", units: str = "units",
              claim: str | None = None, missing: str = "not measured in this run") -> tuple[str, str, str, str, str]:
    """One closing-table row (`PAPER_HEADER`): the claim, the paper's number and where it is, the lab's
    (with its interval and the `units` it resampled, e.g. "prompts"), where it falls, and why they can differ.
    `claim` names what the lab measured where it is not the paper's quantity itself (e.g. the tau a drafter
    needs here to break even, set beside the tau the paper's drafters reach); `missing` says why a None `lab`
    has no value (e.g. too few rounds to conclude anything)."""
    number = paper_number(key)
    what = claim or number.what
    if lab is None:
        return (what, number.text(), missing, "-", why)
    if isinstance(lab, Interval):
        measured = f"{lab.text(fmt)} ({lab.level:.0%} interval over {lab.n} {units})"
    else:
        measured = f"{float(lab):{fmt}}"
    return (what, number.text(), measured, where_it_falls(number, lab), why)


def paper_claim_row(claim: str, paper: str, lab: str, why: str) -> tuple[str, str, str, str, str]:
    """A closing-table row for a claim the paper states without a number to set the lab's beside (e.g. that
    speculative sampling is lossless): its words, the lab's measurement, and "the paper gives no number"."""
    return (claim, paper, lab, "the paper gives no number", why)
