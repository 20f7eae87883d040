"""Run the lab's notebooks headlessly and write complete, offline HTML copies of them.

One code path for `bash scripts/lab.sh --headless` (`python -m labkit notebooks`) and for the test
suite, so the two cannot drift apart. Each notebook runs in its own folder, as in JupyterLab, so its
relative paths (`../data/train`) resolve wherever the command was started;
the kernel gets LABKIT_HEADLESS=1 (dashboards then leave a static figure) and LABKIT_QUICK for quick
mode. The HTML copy needs no network: plotly figures become divs with plotly.js embedded once,
equations are typeset by an inlined MathJax 3 (SVG output, so no fonts to fetch), and widget views,
whose live state needs a kernel and a CDN, become static HTML of their last state (progress bars,
text); a dashboard leaves its static figure when headless. Left out: a notebook's own `fig.show(renderer=...)` overrides, which the lab never uses.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from labkit.core.errors import LabkitError

PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
TEMPLATES = Path(__file__).resolve().parent / "templates"
WIDGET_NOTE = ("<p class='labkit-widget-note'><em>A live widget was here: open the notebook in JupyterLab "
               "to move its sliders. The static figure beside it shows what this run measured.</em></p>")


@dataclass
class NotebookRun:
    """What one headless run of one notebook produced."""

    notebook: Path
    executed: Path  # the executed .ipynb (outputs kept)
    html: Path | None  # the offline HTML copy (None if execution failed before it was written)
    seconds: float
    figures: int  # plotly figures in the executed notebook (each is a div in the HTML)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@contextmanager
def kernel_environment(quick: bool) -> Iterator[None]:
    """Environment for the notebook kernel (a child process that inherits ours), restored afterwards.

    The python3 kernelspec runs `python` from PATH, so this interpreter's folder goes first, and this
    checkout's labkit goes on PYTHONPATH for a checkout without `pip install -e .`.
    """
    root = str(Path(__file__).resolve().parents[2])
    wanted = {
        "LABKIT_HEADLESS": "1",
        "LABKIT_QUICK": "1" if quick else "0",
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    before = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def execute(notebook: Path, out: Path, quick: bool, timeout_s: int = 1800) -> Path:
    """Execute `notebook` with papermill into `out`, in the notebook's own folder, QUICK set."""
    import papermill

    notebook = Path(notebook).resolve()
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with kernel_environment(quick):
        papermill.execute_notebook(str(notebook), str(out), parameters={"QUICK": quick}, kernel_name="python3",
                                   cwd=str(notebook.parent), progress_bar=False, execution_timeout=timeout_s)
    return out


def _mathjax_js() -> str:
    """MathJax 3's single-file TeX-to-SVG bundle, from the `django-static-mathjax` wheel (Apache-2.0)."""
    spec = importlib.util.find_spec("mathjax")
    path = Path(spec.origin).parent / "static" / "mathjax" / "es5" / "tex-svg-full.js" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise LabkitError("MathJax for the offline HTML copies is missing: run "
                          "`pip install django-static-mathjax==3.2.2.1` (bash scripts/lab.sh installs it).")
    return path.read_text(encoding="utf-8")


def static_widget(model_id: str, state: dict) -> str:
    """A widget's last state as plain HTML: boxes, text and progress bars (tqdm's notebook bar is an
    HBox of HTML, FloatProgress, HTML) as they were when the cell finished; sliders as their value;
    anything else (a live figure) as a note."""
    model = state.get(model_id.removeprefix("IPY_MODEL_"))
    if model is None:
        return WIDGET_NOTE
    name, st = model["model_name"], model["state"]
    if name in ("HBoxModel", "VBoxModel"):
        direction = "row" if name == "HBoxModel" else "column"
        inner = "".join(static_widget(child, state) for child in st.get("children", []))
        return f"<div style='display:flex;flex-direction:{direction};gap:0.5em;align-items:center'>{inner}</div>"
    if name in ("HTMLModel", "LabelModel", "HTMLMathModel"):
        return f"<span>{st.get('value', '')}</span>"
    if name in ("FloatProgressModel", "IntProgressModel"):
        return f"<progress value='{st.get('value', 0)}' max='{st.get('max', 100)}'></progress>"
    if name.endswith("SliderModel") or name in ("DropdownModel", "CheckboxModel", "ToggleButtonsModel"):
        return f"<span>{st.get('description', '')} <code>{st.get('value', st.get('index', ''))}</code></span>"
    return WIDGET_NOTE


def make_offline(nb) -> int:
    """Rewrite an executed notebook's outputs in place for a self-contained HTML copy; returns the
    number of plotly figures.

    A plotly figure becomes an HTML div (plotly.js inlined with the first one only, so the page loads
    it once and from nowhere else); a widget view becomes static HTML of its last state (progress bars,
    text) and the widget state itself goes (it needs a widget manager from a CDN).
    """
    import plotly.io as pio

    figures = 0
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.outputs:
            data = out.get("data", {})
            if PLOTLY_MIME in data:
                html = pio.to_html(data[PLOTLY_MIME], include_plotlyjs=figures == 0, full_html=False,
                                   validate=False, default_height="525px")
                out["data"] = {"text/html": html}
                figures += 1
            elif WIDGET_MIME in data:
                out["data"] = {"text/html": static_widget(data[WIDGET_MIME]["model_id"], state)}
    nb.metadata.pop("widgets", None)
    return figures


def write_html(executed: Path, html: Path) -> int:
    """Write the offline HTML copy of an executed notebook; returns its plotly figure count."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(executed), as_version=4)
    figures = make_offline(nb)
    exporter = HTMLExporter(template_name="labkit_offline", extra_template_basedirs=[str(TEMPLATES)])
    body, _ = exporter.from_notebook_node(nb, resources={"labkit_mathjax_js": _mathjax_js()})
    tmp = html.with_suffix(".html.tmp")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(html)  # atomic: a crash never leaves half a page behind
    return figures


def run_notebook(notebook: Path, out_dir: Path, quick: bool, timeout_s: int = 1800) -> NotebookRun:
    """Execute one notebook into out_dir and write its HTML copy; a failure is recorded, not raised,
    so that the notebooks after it still run (the executed copy up to the failing cell is kept)."""
    notebook = Path(notebook)
    out_dir = Path(out_dir)
    executed = out_dir / notebook.name
    start = time.perf_counter()
    error = None
    try:
        execute(notebook, executed, quick, timeout_s)
    except Exception as exc:  # papermill's PapermillExecutionError carries the cell's traceback
        error = f"{type(exc).__name__}: {exc}"
    html, figures = None, 0
    if executed.exists():
        try:
            html = executed.with_suffix(".html")
            figures = write_html(executed, html)
        except Exception:
            html, error = None, error or traceback.format_exc(limit=3)
    return NotebookRun(notebook, executed, html, time.perf_counter() - start, figures, error)


def find_notebooks(folder: Path, names: list[str] | None = None) -> list[Path]:
    """The lab's notebooks in order, or those whose file names start with one of `names`."""
    found = sorted(Path(folder).glob("[0-9]*.ipynb"))
    if names:
        found = [nb for nb in found if any(nb.name.startswith(n) for n in names)]
    if not found:
        raise LabkitError(f"No notebooks{' matching ' + ', '.join(names) if names else ''} in {folder}: "
                          f"run from the repository root or pass --dir notebooks.")
    return found


def run_notebooks(notebooks: list[Path], out_dir: Path, quick: bool, timeout_s: int = 1800) -> list[NotebookRun]:
    """Run every notebook (each in its own folder) into out_dir, one line of progress each."""
    runs = []
    for i, nb in enumerate(notebooks, 1):
        print(f"labkit: [{i}/{len(notebooks)}] executing {nb.name} ({'quick' if quick else 'full'} mode)", flush=True)
        run = run_notebook(nb, out_dir, quick, timeout_s)
        status = f"-> {run.html} ({run.figures} figures)" if run.ok else f"FAILED: {run.error.splitlines()[0]}"
        print(f"labkit:        {run.seconds:.0f} s {status}", flush=True)
        runs.append(run)
    return runs
