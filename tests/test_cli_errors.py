"""Every command's bad input ends in one line on stderr that names the fix, exit code 2, no traceback,
and before anything slow (loading a model) happens. Table-driven: one row per command and mistake."""

from __future__ import annotations

import pytest

from labkit.__main__ import main

CASES = {
    "setup: a model that is not on disk": (["setup", "--target", "/nonexistent/model"], "not available offline"),
    "round-cost: zero tokens": (["round-cost", "--ks", "0"], "expected a positive integer"),
    "notebooks: no such notebook": (["notebooks", "nosuchnotebook"], "No notebooks matching"),
    "serve: no users": (["serve", "--users", "0"], "expected a positive integer"),
    "serve: a negative duration": (["serve", "--duration", "-1"], "--duration must be a positive number"),
    "serve: an unknown drafter": (["serve", "--drafter", "nope"], "Unknown drafter"),
    "serve: an unknown policy": (["serve", "--policy", "nope"], "unknown scheduler policy"),
    "serve: a fixed cap that is no number": (["serve", "--policy", "fixed:x"], "fixed:K takes a whole number"),
    "serve-sweep: no users": (["serve-sweep", "--users", "0"], "expected a positive integer"),
    "serve-sweep: an unknown policy": (["serve-sweep", "--policies", "nope"], "unknown scheduler policy"),
    "serve-sweep: an unknown cost model": (["serve-sweep", "--cost-model", "guess"], "Unknown --cost-model 'guess': choose one of table, fit, offset"),
    "prepare-data: a greedy share above 1": (["prepare-data", "--greedy-share", "2"], "--greedy-share is a fraction"),
    "prepare-data: a benchmark folder that does not exist": (["prepare-data", "--benchmarks", "/nope"],
                                                             "benchmarks fetch"),
    "bench: a benchmark folder that does not exist": (["bench", "--benchmarks", "/nope"], "benchmarks fetch"),
    "bench: prompts and a benchmark folder": (["bench", "--prompts", "a.jsonl", "--benchmarks", "lab"], "not both"),
    "bench: an unknown method": (["bench", "--methods", "nope", "--benchmarks", "lab"], "Unknown bench method"),
    "eval: no drafter": (["eval", "--drafter", "none", "--benchmarks", "lab"], "eval measures a drafter"),
    "benchmarks fetch: an unknown set": (["benchmarks", "fetch", "--sets", "nope"], "Unknown benchmark set"),
    "record-traces: a negative temperature": (["record-traces", "--temperatures", "-1"], "--temperatures must be 0"),
    "record-traces: an unknown drafter": (["record-traces", "--drafter", "nope"], "Unknown drafter"),
    "simulate: no users": (["simulate", "--users", "0"], "expected a positive integer"),
    "simulate: an unknown policy": (["simulate", "--policies", "nope"], "unknown scheduler policy"),
    "simulate: an unknown table": (["simulate", "--table", "a100"], "neither cpu, h100, h200 nor a JSON file"),
    "simulate: an unknown model size": (["simulate", "--model", "7q"], "not a model size of the roofline model"),
    "simulate: --validate off this CPU": (["simulate", "--validate", "--table", "h100"], "needs --table cpu"),
    "simulate: a trace file that does not exist": (["simulate", "--traces", "/nonexistent/traces.json"],
                                                   "record-traces"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_that_names_the_fix(case, capsys):
    argv, expected = CASES[case]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("labkit: ")]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
