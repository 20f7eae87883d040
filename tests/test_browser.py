"""Notebook 06 as a person uses it: JupyterLab in headless Chromium, Run All, move the users slider.

The test starts JupyterLab on loopback (a free port, a token) over a copy of notebook 06 in a folder
under build/ (`<copy>/notebooks/06...ipynb`, so autosaves land in the copy, never in notebooks/; the
notebook finds its prompts through the installed labkit, as it does in notebooks/). The server's kernels get
LABKIT_QUICK=1 (the live notebook's sweeps are then short) and no LABKIT_HEADLESS, so the dashboard is
the live widget running the real engine in its background thread. Playwright drives Debian's
/usr/bin/chromium: accept the kernel, Run > Run All Cells, wait for every cell, then press ArrowRight
three times on the users slider and wait until the figure's "active requests" trace (read from the
plotly div's data) reaches the new value and the readout says so; Stop stops it. A screenshot goes to
build/test-artifacts/browser/ (with the server's log, and on failure the page as it was and its
console). The server is always stopped, and its kernel with it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "06_serving_dashboard.ipynb"
ARTIFACTS = ROOT / "build" / "test-artifacts" / "browser"
CHROMIUM = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium") if p and Path(p).exists()), None)

pytestmark = pytest.mark.slow

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # the test extra is not installed
    sync_playwright = None

requires_browser = pytest.mark.skipif(
    sync_playwright is None or CHROMIUM is None,
    reason="needs Playwright and Chromium: `pip install -e '.[test]'` (playwright==1.65.2) and `apt-get install "
           "chromium` (bash scripts/test.sh installs both, chromium when run as root)")

START_USERS = 2  # notebook 06's DASH_USERS
PRESSES = 3
RUN_ALL_TIMEOUT_MS = 9 * 60 * 1000  # the whole quick notebook, live, on a loaded 2-core CPU


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lay_out_copy(base: Path) -> Path:
    """base/work/notebooks/<notebook 06>; returns the server's root folder (base/work)."""
    shutil.rmtree(base, ignore_errors=True)
    notebooks = base / "work" / "notebooks"
    notebooks.mkdir(parents=True)
    shutil.copy2(NOTEBOOK, notebooks / NOTEBOOK.name)
    shutil.copy2(NOTEBOOK.parent / "lab_setup.py", notebooks / "lab_setup.py")  # every notebook imports it
    # every cell attached to the page, so that the figures can be read wherever the notebook is scrolled
    settings = base / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    news = base / "settings" / "@jupyterlab" / "apputils-extension"  # no "Jupyter news?" toast over the page
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    return base / "work"


def _server_env(base: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LABKIT_HEADLESS"}
    env.update({
        "LABKIT_QUICK": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "JUPYTER_CONFIG_DIR": str(base / "config"), "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(base / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces"),
        "IPYTHONDIR": str(base / "ipython"),
    })
    return env


def _start_lab(root_dir: Path, port: int, token: str, env: dict, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root_dir}", "--ServerApp.port_retries=0"]
    if hasattr(os, "getuid") and os.getuid() == 0:
        cmd.append("--allow-root")
    server = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                _stop(server)
                raise RuntimeError(f"JupyterLab did not start (exit {server.poll()}); its log: {log}")
            time.sleep(0.5)


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)


# JavaScript run in the page: the dashboard's figure is the plotly div with an "active requests" trace.
ACTIVE = """() => {
  for (const gd of document.querySelectorAll('.js-plotly-plot')) {
    const t = (gd.data || []).find(d => d.name === 'active requests');
    if (t) { const y = Array.from(t.y || []); return {n: y.length, last: y.length ? y[y.length - 1] : null}; }
  }
  return null;
}"""
READOUT = """() => { const el = [...document.querySelectorAll('.widget-html')].find(e => e.innerText.includes('proposal'));
  return el ? el.innerText : ''; }"""
BUSY = """() => document.querySelector('.jp-Notebook-ExecutionIndicator')?.getAttribute('data-status') !== 'idle'
  || [...document.querySelectorAll('.jp-InputPrompt')].some(p => p.innerText.includes('*'))"""


@requires_browser
def test_notebook_06_live_in_jupyterlab_the_users_slider_moves_the_charts():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    base = ROOT / "build" / "browser-lab"
    root_dir = _lay_out_copy(base)
    port, token = _free_port(), "labkit-browser-test"
    server = _start_lab(root_dir, port, token, _server_env(base), ARTIFACTS / "jupyterlab.log")
    shot = ARTIFACTS / "notebook06_dashboard.png"
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            console = []
            page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
            try:
                page.goto(f"http://127.0.0.1:{port}/lab/tree/notebooks/{NOTEBOOK.name}?token={token}")
                page.wait_for_selector(".jp-Notebook", timeout=120_000)
                try:  # "Select Kernel" when the server asks which kernel to start
                    page.locator(".jp-Dialog button", has_text="Select").click(timeout=8_000)
                except Exception:
                    pass
                page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
                page.locator("li.lm-MenuBar-item", has_text="Run").first.click()
                page.locator("li.lm-Menu-item", has_text="Run All Cells").first.click()

                # the dashboard appears and serves while the later cells wait their turn
                page.wait_for_function(f"(() => {{ const a = ({ACTIVE})(); return a && a.n > 0; }})()", timeout=300_000)
                page.wait_for_function(f"!({BUSY})()", timeout=RUN_ALL_TIMEOUT_MS, polling=1000)
                outputs = page.inner_text(".jp-Notebook")
                assert "Traceback (most recent call last)" not in outputs, "a cell failed in the live kernel"
                assert "prompt set: " in outputs, "the live notebook does not name its prompt set"
                assert page.locator(".js-plotly-plot").count() >= 3  # the dashboard, Fig. 7 and Fig. 8

                # after the sweeps the dashboard serves again, at the users it started with
                page.wait_for_function(f"(() => {{ const a = ({ACTIVE})(); return a && a.last === {START_USERS}; }})()",
                                       timeout=60_000)
                page.wait_for_function(f"({READOUT})().startsWith('running')", timeout=60_000)
                before = page.evaluate(ACTIVE)
                readout_before = page.evaluate(READOUT)
                assert f"users {START_USERS}" in readout_before

                handle = page.locator(".widget-slider .noUi-handle").first  # the users slider comes first
                handle.scroll_into_view_if_needed()
                handle.focus()
                for _ in range(PRESSES):
                    page.keyboard.press("ArrowRight")
                wanted = START_USERS + PRESSES
                page.wait_for_function(f"(() => {{ const a = ({ACTIVE})(); return a && a.last === {wanted}; }})()",
                                       timeout=90_000)
                page.wait_for_function(f"({READOUT})().includes('users {wanted}')", timeout=30_000)
                after = page.evaluate(ACTIVE)
                assert after["n"] > before["n"], "the charts grew while the engine served"
                assert page.evaluate(READOUT) != readout_before
                page.evaluate("document.querySelector('.widget-slider').closest('.jp-OutputArea-output')"
                              ".scrollIntoView({block: 'start'})")
                page.wait_for_timeout(1_500)  # one more redraw of the figure
                page.screenshot(path=str(shot))

                page.locator("button.widget-button", has_text="Stop").first.click()
                page.wait_for_function(f"({READOUT})().startsWith('stopped')", timeout=60_000)
            except Exception:
                page.screenshot(path=str(ARTIFACTS / "failure.png"))
                (ARTIFACTS / "console.log").write_text("\n".join(console))
                raise
            finally:
                browser.close()
    finally:
        _stop(server)
    shutil.rmtree(base, ignore_errors=True)  # the copy and its autosaves; the screenshot and log stay
    assert shot.stat().st_size > 20_000
