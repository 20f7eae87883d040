"""The README's current results table, rendered from the committed bench JSON of the shipped drafters.

The runs it shows are listed in docs/current-results.json: each run's JSON file under data/ab/, and what
the JSON itself does not record (the date, the commit, the machine and, for runs older than the
`prompt_set` key, the prompt set, as the README stated them for that run). One markdown table a run:
method, tokens/s, speed against HF generate, tau, tau / speed by domain, the macro speedup (the mean of
the three domains') and how many outputs were identical to the AR loop's, under a caption line.

    python scripts/results_table.py                  # print the block
    python scripts/results_table.py --check README.md  # exit 1 if the README's block differs
    python scripts/results_table.py --write README.md  # replace the README's block

The block is the text between the lines `<!-- results:begin -->` and `<!-- results:end -->`.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "docs" / "current-results.json"
BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
DOMAINS = ("math", "code", "chat")


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _tau(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def prompt_set_text(result: dict, run: dict) -> str:
    """The prompt set a run measured: the JSON's own record where it has one, else what the README said."""
    ps = result.get("prompt_set")
    if ps:
        files = ", ".join(f"{name} {n}" for name, n in ps["files"].items())
        return f"{'; '.join(ps['sets'])} ({files} prompts)"
    return run["prompt_set"]


def caption(result: dict, run: dict) -> str:
    """One line: what was measured, when, at which commit, on what, at which temperature, on which prompts."""
    n = max((r.get("n_prompts") or 0) for r in result["rows"])
    return (f"**{run['title']}** (temperature {result['temperature']:g}): measured {run['date']}, JSON committed in "
            f"{run['commit']}, {run['machine']}, {result['dtype']} on both sides; {result['model']}, "
            f"{result.get('torch_threads', '?')} torch threads, {n} prompts, {result['max_new_tokens']} new "
            f"tokens, all methods interleaved in one run; prompt set: {prompt_set_text(result, run)}; "
            f"drafters: {run['drafters']}; JSON: `{run['json']}`.")

def table(result: dict) -> list[str]:
    """The markdown rows of one bench result."""
    lines = ["| method | tokens/s | vs HF generate | tau | math (tau / speed) | code (tau / speed) "
             "| chat (tau / speed) | macro speed | identical outputs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        by = r.get("by_domain", {})
        cells, speeds = [], []
        for d in DOMAINS:
            dom = by.get(d)
            if dom is None:
                cells.append("-")
                continue
            speeds.append(dom["speedup_vs_hf"])
            cells.append(_x(dom["speedup_vs_hf"]) if dom.get("tau") is None
                         else f"{_tau(dom['tau'])} / {_x(dom['speedup_vs_hf'])}")
        macro = sum(speeds) / len(speeds) if len(speeds) == len(DOMAINS) else None
        lines.append(f"| {r['method']} | {r['tokens_per_s']:.2f} | {_x(r.get('speedup_vs_hf'))} | {_tau(r.get('tau'))} | "
                     + " | ".join(cells) + f" | {_x(macro)} | {r.get('identical_to_ar') or '-'} |")
    return lines


def render(root: Path = ROOT) -> str:
    """The whole block (without the marker lines): a caption and a table per run, in the listed order."""
    runs = json.loads((root / "docs" / "current-results.json").read_text())["runs"]
    out: list[str] = []
    for run in runs:
        result = json.loads((root / run["json"]).read_text())
        if out:
            out.append("")
        out += [caption(result, run), "", *table(result)]
    return "\n".join(out) + "\n"


def _marker_lines(lines: list[str]) -> tuple[int, int]:
    """The indices of the begin and end marker lines, or a LookupError naming what is missing."""
    try:
        b = next(i for i, line in enumerate(lines) if line.strip() == BEGIN)
        e = next(i for i, line in enumerate(lines) if line.strip() == END and i > b)
    except StopIteration:
        raise LookupError(f"the file has no block between the lines {BEGIN} and {END}") from None
    return b, e


def readme_block(text: str) -> str:
    """The text between the marker lines (both excluded)."""
    lines = text.splitlines(keepends=True)
    b, e = _marker_lines(lines)
    return "".join(lines[b + 1:e])


def replace_block(text: str, block: str) -> str:
    """`text` with the lines between its marker lines replaced by `block`."""
    lines = text.splitlines(keepends=True)
    b, e = _marker_lines(lines)
    return "".join(lines[:b + 1]) + block + "".join(lines[e:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--check", metavar="README", default=None,
                   help="compare the block between the results markers in this file with the rendering; "
                        "exit 1 if they differ")
    g.add_argument("--write", metavar="README", default=None,
                   help="replace the block between the results markers in this file with the rendering")
    args = p.parse_args(argv)
    block = render()
    if args.check is None and args.write is None:
        sys.stdout.write(block)
        return 0
    path = Path(args.check or args.write)
    text = path.read_text()
    try:
        current = readme_block(text)
    except LookupError as e:
        print(f"{path}: {e}", file=sys.stderr)
        return 2
    if args.check is not None:
        if current != block:
            print(f"{path}: the results block differs from what scripts/results_table.py renders; "
                  f"run python scripts/results_table.py --write {path}", file=sys.stderr)
            return 1
        print(f"{path}: the results block is up to date")
        return 0
    if current != block:
        path.write_text(replace_block(text, block))
        print(f"{path}: results block rewritten")
    else:
        print(f"{path}: the results block is already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
