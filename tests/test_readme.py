"""The README is the lab's entry point and stays true: its results block is what
scripts/results_table.py renders from the committed JSON, it is short, every repository path it names
exists, and its package tree lists exactly the modules under labkit/.

The tree format (README, "The package"): a fenced block whose first line is `labkit/`; two spaces of
indent a level; each entry is the first word of its line, a folder ending in `/` (standing for its
`__init__.py`) or a module ending in `.py`; the tree ends at the next line without indent.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 300

spec = importlib.util.spec_from_file_location("results_table", ROOT / "scripts" / "results_table.py")
results_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results_table)


def readme() -> str:
    return README.read_text()


def test_the_results_block_is_the_scripts_rendering():
    assert results_table.readme_block(readme()) == results_table.render(), \
        "run: python scripts/results_table.py --write README.md"


def test_the_script_check_and_write_agree(tmp_path):
    good = tmp_path / "README.md"
    good.write_text(readme())
    assert results_table.main(["--check", str(good)]) == 0
    stale = tmp_path / "stale.md"
    stale.write_text(results_table.replace_block(readme(), "| an old table |\n"))
    assert results_table.main(["--check", str(stale)]) == 1
    assert results_table.main(["--write", str(stale)]) == 0
    assert stale.read_text() == readme()
    missing = tmp_path / "none.md"
    missing.write_text("# no markers\n")
    assert results_table.main(["--check", str(missing)]) == 2


def test_each_shown_run_names_date_commit_machine_and_prompt_set():
    runs = json.loads((ROOT / "docs" / "current-results.json").read_text())["runs"]
    assert runs
    for run in runs:
        result = json.loads((ROOT / run["json"]).read_text())
        line = results_table.caption(result, run)
        for key in ("date", "commit", "machine"):
            assert run[key] and run[key] in line
        assert "prompt set: " in line and (result.get("prompt_set") or run.get("prompt_set"))
        assert f"temperature {result['temperature']:g}" in line


def test_the_headline_near_the_top_quotes_the_table():
    """The pitch's headline gives the hybrid's speed against HF generate, overall and macro, as the first
    (greedy) table has them."""
    first = results_table.render().split("\n\n")[1]
    row = next(line for line in first.splitlines() if line.startswith("| spec:hybrid:dspark |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    overall, macro = cells[2], cells[7]
    top = "\n".join(readme().splitlines()[:20])
    assert f"{overall} the speed of HF `generate`" in top and f"{macro} on the macro average" in top, (overall, macro)


def test_the_readme_is_at_most_300_lines():
    n = len(readme().splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines"


PATH = re.compile(r"(?<![\w./-])((?:labkit|scripts|notebooks|data|docs)/[\w./-]*)")


def named_paths(text: str) -> set[str]:
    """Every repository path the text names under labkit/, scripts/, notebooks/, data/ or docs/
    (a path stops at a placeholder such as <target>; trailing punctuation dropped)."""
    return {m.rstrip(".,:;") for m in PATH.findall(text)}


def test_named_paths_finds_what_it_should():
    found = named_paths("see `labkit/decode/engine.py`, data/README.md. and docs/usage.md, then "
                        "runs/dspark/last, build/benchmarks, ../shared/x, data/drafters/<target>/")
    assert found == {"labkit/decode/engine.py", "data/README.md", "docs/usage.md", "data/drafters/"}


def test_every_path_the_readme_names_exists():
    paths = named_paths(readme())
    assert "labkit/pipeline/prompt_sets.py" in paths  # the pattern sees the README's paths at all
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"README.md names paths that do not exist: {missing}"


def tree_modules(text: str) -> list[str]:
    """The modules the README's package tree lists, as paths under labkit/ (a folder: its __init__.py)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.startswith("labkit/") and i > 0 and lines[i - 1].startswith("```"))
    folders: list[str] = []
    modules: list[str] = []
    for i, line in enumerate(lines[start:]):
        if line.startswith("```") or (i > 0 and not line.startswith(" ")):
            break
        indent = len(line) - len(line.lstrip(" "))
        assert indent % 2 == 0, f"odd indent in the package tree: {line!r}"
        level = indent // 2
        name = line.split()[0]
        assert level <= len(folders), f"the package tree skips a level at {line!r}"
        folders = folders[:level]
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
            modules.append("/".join(folders + ["__init__.py"]))
        else:
            assert name.endswith(".py"), f"the package tree holds neither a folder nor a module: {line!r}"
            modules.append("/".join(folders + [name]))
    return modules


def test_the_package_tree_lists_exactly_the_modules():
    listed = tree_modules(readme())
    assert len(listed) == len(set(listed)), "a module is listed twice"
    actual = {p.relative_to(ROOT).as_posix() for p in (ROOT / "labkit").rglob("*.py")}
    assert set(listed) == actual, (f"in the tree but not in labkit/: {sorted(set(listed) - actual)}; "
                                   f"in labkit/ but not in the tree: {sorted(actual - set(listed))}")


@pytest.mark.parametrize("text, expected", [
    ("```\nlabkit/   pkg\n  a.py   x\n  sub/   y\n    b.py\n  c.py\ntests/\n```\n",
     ["labkit/__init__.py", "labkit/a.py", "labkit/sub/__init__.py", "labkit/sub/b.py", "labkit/c.py"]),
])
def test_tree_modules_reads_the_format(text, expected):
    assert tree_modules(text) == expected
