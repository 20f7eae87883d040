"""scripts/soak.py runs the engine in closed loop for a while, drains it, and reports memory and step
time in JSON (a benchmark, not a timed test: only what it reports is checked here, on a tiny model)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"


def test_a_short_soak_finishes_every_request_and_reports_memory_and_drift(tiny_model_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("soak", SCRIPT)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    out = tmp_path / "soak.json"
    rc = soak.main(["--target", str(tiny_model_dir), "--drafter", "prompt-lookup", "--minutes", "0.05",
                    "--users", "3", "--max-new-tokens", "6", "--benchmarks", "lab", "--table", str(tmp_path / "tables.json"), "--json", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0 and report["all_finished"] and report["failed"] == []
    assert report["requests_served"] > 3 and report["steps"] > 0
    assert report["rss_start_mb"] > 0 and report["rss_peak_mb"] >= report["rss_end_mb"] > 0
    assert report["step_ms_first_fifth"] > 0 and report["step_ms_last_fifth"] > 0
    assert "all finished: True" in capsys.readouterr().out
    assert json.loads((tmp_path / "tables.json").read_text())  # the tiny model's table went there, not to the user's cache
