"""Every notebook in notebooks/ executes headlessly, end to end, in quick mode (papermill, kernel python3).

Quick mode still runs the real code path on the real default target, with fewer draws, prompts and
tokens. Executed copies go to pytest's tmp_path, never into the repository, whose notebooks are kept
without outputs.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_notebook_runs_in_quick_mode(notebook: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    papermill = pytest.importorskip("papermill")
    # The kernel is a fresh process: it must find this checkout's labkit and this interpreter's packages
    # (the python3 kernelspec runs `python` from PATH).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    monkeypatch.setenv("LABKIT_QUICK", "1")
    out = tmp_path / notebook.name
    start = time.perf_counter()
    papermill.execute_notebook(str(notebook), str(out), parameters={"QUICK": True}, kernel_name="python3",
                               cwd=str(notebook.parent), progress_bar=False, execution_timeout=900)
    print(f"{notebook.name}: executed in {time.perf_counter() - start:.0f} s")
    assert out.exists()
