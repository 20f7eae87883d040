"""The README's headless command, run from the repository root, and the HTML copies it writes.

`bash scripts/lab.sh --headless --quick` sets up and then runs `python -m labkit notebooks --quick`;
the module fixture runs that same command line (`labkit.__main__.main`) once, from the repository
root, into build/test-artifacts/notebooks/ (kept after the run, with a screenshot of each page).
Quick mode still runs the real code path on the real default target, with fewer draws, prompts and
tokens. The notebooks in notebooks/ stay without outputs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from labkit.pipeline import prompt_sets
from labkit.__main__ import main
from labkit.lab.notebooks import PLOTLY_MIME, WIDGET_MIME, find_notebooks
from test_prompt_sets import PROMPT_LINE, parse_counts

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = find_notebooks(ROOT / "notebooks")
ARTIFACTS = ROOT / "build" / "test-artifacts" / "notebooks"
FIGURE_DIV = re.compile(r'<div [^>]*class="plotly-graph-div"')
CHROMIUM = next((p for p in ("chromium", "chromium-browser", "google-chrome") if shutil.which(p)), None)


def _selected_notebooks(session) -> list[str]:
    """The notebooks (file stems) that the selected tests of this module need: all of them when the
    whole-run test is selected or no notebook test is (a plain run of the module), else only those
    that `-k` left, so `pytest tests/test_notebooks.py -k 07` executes notebook 07 alone."""
    mine = [item for item in session.items if getattr(getattr(item, "module", None), "__name__", None) == __name__]
    if any(getattr(item, "originalname", "") == "test_headless_command_writes_one_html_file_per_notebook" for item in mine):
        return []
    return sorted({item.callspec.params["notebook"].stem for item in mine
                   if hasattr(item, "callspec") and "notebook" in item.callspec.params})


@pytest.fixture(scope="module")
def headless_run(request) -> dict[str, int]:
    """Runs the README's headless command in quick mode from the repository root, for the notebooks the
    selected tests need (`_selected_notebooks`); its exit code."""
    pytest.importorskip("papermill")
    names = _selected_notebooks(request.session)
    if names:  # a selection replaces its own notebooks' copies and leaves the others' in place
        for stale in (p for stem in names for p in ARTIFACTS.glob(f"{stem}.*")):
            stale.unlink()
    else:
        shutil.rmtree(ARTIFACTS, ignore_errors=True)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        code = main(["notebooks", "--quick", "--out", str(ARTIFACTS.relative_to(ROOT)), *names])
    finally:
        os.chdir(cwd)
    return {"exit_code": code}


def _executed(notebook: Path) -> dict:
    return json.loads((ARTIFACTS / notebook.name).read_text())


def _outputs(nb: dict):
    return [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]


@pytest.mark.slow
def test_headless_command_writes_one_html_file_per_notebook(headless_run):
    assert headless_run["exit_code"] == 0, f"some notebook failed: see {ARTIFACTS}"
    assert sorted(p.name for p in ARTIFACTS.glob("*.html")) == sorted(nb.with_suffix(".html").name for nb in NOTEBOOKS)


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_notebook_runs_in_quick_mode_from_its_folder(headless_run, notebook: Path):
    nb = _executed(notebook)
    errors = [o for o in _outputs(nb) if o["output_type"] == "error"]
    assert not errors, f"{notebook.name}: {errors[0]['ename']}: {errors[0]['evalue']}" if errors else ""

    text = "".join("".join(o.get("text", "")) for o in _outputs(nb) if o["output_type"] == "stream")
    if notebook.stem.startswith("00"):  # the only notebook that measures no prompt set
        return
    line = PROMPT_LINE.search(text)
    assert line, f"{notebook.name} does not name the prompt set it measured"
    assert line["label"].startswith(_expected_set()), f"{notebook.name} measured {line['label']}"
    used, held, need = (parse_counts(line[k]) for k in ("used", "held", "need"))
    assert used and all(n >= 1 for n in used.values())
    assert need, f"{notebook.name} does not say how many prompts a domain its full run takes"
    short = {d: (held.get(d, 0), n) for d, n in need.items() if held.get(d, 0) < n}
    assert not short, f"{notebook.name}: the set holds fewer prompts than the full run takes: {short}"


def _expected_set() -> str:
    """The set a run from this checkout should measure: public files where they sit beside it (CI), the
    lab's own on a clone with nothing beside it."""
    if os.environ.get(prompt_sets.ENV):
        return "" if os.environ[prompt_sets.ENV] != "lab" else prompt_sets.LAB_LABEL
    beside = prompt_sets.SHARED_DIR.is_dir() or prompt_sets.FETCHED_DIR.is_dir()
    return "public benchmark files" if beside else prompt_sets.LAB_LABEL


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_html_copy_holds_every_figure_and_fetches_nothing(headless_run, notebook: Path):
    nb = _executed(notebook)
    html = (ARTIFACTS / notebook.with_suffix(".html").name).read_text()
    figures = sum(PLOTLY_MIME in o.get("data", {}) for o in _outputs(nb))
    assert figures > 0, f"{notebook.name} draws no plotly figure"
    assert len(FIGURE_DIV.findall(html)) == figures
    assert html.count("window.PlotlyConfig") == 1, "plotly.js must be embedded exactly once"
    remote = re.findall(r'<(?:script|link|img)[^>]+(?:src|href)="(?:https?:)?//[^"]+"', html)
    assert not remote, f"the page fetches {remote[:3]}"
    assert WIDGET_MIME not in html and "application/vnd.jupyter.widget-state" not in html


def _render(html: Path, png: Path) -> str:
    """The page's DOM after its scripts ran in headless Chromium with every network name unresolvable
    and a dead proxy, so anything fetched from outside fails; a screenshot of the page's first 9000
    pixels (its first figures) goes to `png`."""
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update", "--disable-quic",
             "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9",
             "--virtual-time-budget=20000", "--window-size=1280,9000",
             f"--user-data-dir={png.parent / ('chromium-' + png.stem)}"]
    subprocess.run(flags + [f"--screenshot={png}", html.as_uri()], capture_output=True, timeout=180, check=True)
    done = subprocess.run(flags + ["--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=180,
                          check=True)
    shutil.rmtree(png.parent / ("chromium-" + png.stem), ignore_errors=True)
    return done.stdout


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed: `apt-get install chromium` "
                                             "(bash scripts/test.sh installs it when run as root)")
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_html_copy_renders_offline_in_chromium(headless_run, notebook: Path):
    html = ARTIFACTS / notebook.with_suffix(".html").name
    png = html.with_suffix(".png")
    dom = _render(html, png)
    figures = len(FIGURE_DIV.findall(html.read_text()))
    drawn = len(re.findall(r'class="plotly-graph-div js-plotly-plot"', dom))
    assert drawn == figures, f"{drawn} of {figures} figures drawn offline (screenshot {png})"
    assert png.stat().st_size > 10_000
    has_math = any("$" in "".join(c["source"]) for c in _executed(notebook)["cells"] if c["cell_type"] == "markdown")
    if has_math:
        assert "<mjx-container" in dom, f"equations were not typeset offline (screenshot {png})"


def _hand_made_notebook():
    """Two plotly figures, a tqdm-like progress bar and an unknown widget, as an executed notebook holds them."""
    import nbformat
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(y=[1, 3, 2])).to_plotly_json()
    view = lambda mid: nbformat.v4.new_output("display_data", data={WIDGET_MIME: {"model_id": mid}, "text/plain": "HBox()"})  # noqa: E731
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("$a^2$"),
                nbformat.v4.new_code_cell("", outputs=[nbformat.v4.new_output("display_data", data={PLOTLY_MIME: fig}),
                                                       view("bar"), view("live")]),
                nbformat.v4.new_code_cell("", outputs=[nbformat.v4.new_output("display_data", data={PLOTLY_MIME: fig})])]
    state = {"bar": {"model_name": "HBoxModel", "state": {"children": ["IPY_MODEL_t", "IPY_MODEL_p"]}},
             "t": {"model_name": "HTMLModel", "state": {"value": "forward cost: 100%"}},
             "p": {"model_name": "FloatProgressModel", "state": {"value": 6.0, "max": 6.0}},
             "live": {"model_name": "AnyModel", "state": {}}}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": state}}
    return nb


def test_offline_copy_embeds_plotly_once_and_renders_widget_state(tmp_path: Path):
    import nbformat

    from labkit.lab.notebooks import write_html

    executed = tmp_path / "nb.ipynb"
    nbformat.write(_hand_made_notebook(), str(executed))
    assert write_html(executed, tmp_path / "nb.html") == 2
    html = (tmp_path / "nb.html").read_text()
    assert len(FIGURE_DIV.findall(html)) == 2
    assert html.count("window.PlotlyConfig") == 1
    assert "forward cost: 100%" in html
    assert re.search(r'<progress (?=[^>]*max="6.0")(?=[^>]*value="6.0")', html)
    assert "A live widget was here" in html  # the widget with no static form says so
    assert "application/vnd.jupyter.widget-state" not in html
    assert "window.MathJax" in html and "cdnjs" not in html and "require.min.js" not in html
