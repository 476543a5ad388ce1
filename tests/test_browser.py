"""The README's notebook in JupyterLab, in headless Chromium, as a new user meets it.

A notebook is built from the README's "In a notebook" cells verbatim, plus one long run to interrupt. The test
runs it cell by cell and checks: the run paused and ``_djinn`` shows the pause, the inspector and the steering
panel render, streamed text appeared while the cell was still running, and Kernel → Interrupt cancels a long
run within 2 s with a one-line message, after which the session runs again. Screenshots of every step go to
``build/test-artifacts/browser/``.

Needs Chromium (``apt-get install -y chromium``) and the ``playwright`` Python package (its own browser
downloads are not used); skipped with the reason when either is missing. Deselect with ``-m "not browser"``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lab_util import CHROMIUM, CHROMIUM_ARGS
from notebook_cells import readme_notebook_cells

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "build" / "test-artifacts" / "browser"
LONG_RUN = "%djinn delete\n%djinn run Write a very long story about the sea and its sailors. --max-new-tokens 400"
AGAIN = "%djinn run Hi --max-new-tokens 2"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install -y chromium)"),
]


def _notebook(folder: Path) -> Path:
    cells = [*readme_notebook_cells(), LONG_RUN, AGAIN]
    nb = {
        "cells": [
            {"cell_type": "code", "metadata": {}, "source": c.rstrip("\n"), "outputs": [], "execution_count": None}
            for c in cells
        ],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path = folder / "readme.ipynb"
    path.write_text(json.dumps(nb))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a free port whose kernels import this checkout."""
    folder = tmp_path_factory.mktemp("lab")
    _notebook(folder)
    port, token = _free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "JUPYTER_CONFIG_DIR": str(folder / ".jupyter"),
        "JUPYTER_RUNTIME_DIR": str(folder / ".runtime"),
    }
    log = open(folder / "lab.log", "wb")
    server = subprocess.Popen(
        [
            sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}",
            "--ip=127.0.0.1", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}",
            "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not start:\n{(folder / 'lab.log').read_text()[-3000:]}")
            time.sleep(0.2)  # waiting on another process's start-up
    yield f"{url}/lab/tree/readme.ipynb?token={token}"
    server.terminate()
    server.wait(20)
    log.close()


@pytest.fixture
def page(lab, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (browser downloads unused)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(lab)
        yield page
        context.close()
        browser.close()


class Notebook:
    def __init__(self, page) -> None:
        self.page = page
        self.shots = 0

    def cell(self, i: int):
        return self.page.locator(".jp-Notebook .jp-Cell").nth(i)

    def prompt(self, i: int) -> str:
        return self.cell(i).locator(".jp-InputPrompt").inner_text().strip()

    def start(self, i: int) -> float:
        """Run cell ``i`` (Shift+Enter in its editor); returns when it was sent."""
        self.cell(i).locator(".jp-InputArea-editor").click()
        self.page.keyboard.press("Shift+Enter")
        return time.monotonic()

    def wait_done(self, i: int, timeout: float = 90) -> float:
        """Wait until cell ``i`` shows an execution count; returns when it was seen."""
        self.page.wait_for_function(
            """i => { const p = document.querySelectorAll('.jp-Notebook .jp-Cell')[i]
                        .querySelector('.jp-InputPrompt').textContent; return /\\[\\d+\\]/.test(p); }""",
            arg=i, timeout=timeout * 1000, polling=50,
        )  # fmt: skip
        return time.monotonic()

    def run(self, i: int) -> str:
        self.start(i)
        self.wait_done(i)
        return self.output(i)

    def output(self, i: int) -> str:
        return self.cell(i).locator(".jp-OutputArea").inner_text()

    def shot(self, name: str) -> None:
        self.shots += 1
        self.page.screenshot(path=str(ARTIFACTS / f"{self.shots:02d}-{name}.png"), full_page=True)


def test_readme_notebook_in_jupyterlab(page):
    nb = Notebook(page)
    page.locator(".jp-Notebook .jp-Cell").first.wait_for()
    page.get_by_text(re.compile(r"Python 3 \(ipykernel\) \| Idle")).wait_for(timeout=90_000)
    nb.shot("opened")

    out = nb.run(0)  # %load_ext, load, break, run ...?: pauses
    assert "Object `France` not found" not in out
    assert "paused at layer 15 (output)" in out, out
    nb.shot("run-paused")

    out = nb.run(1)  # _djinn
    assert "paused at layer 15 (output), prefill" in out and "NameError" not in out, out

    nb.run(2)  # %djinn inspect
    nb.cell(2).locator(".jp-OutputArea img").first.wait_for()
    assert "model.layers.15" in nb.output(2)
    nb.shot("inspector")

    nb.run(3)  # SteeringPanel(_djinn)
    nb.cell(3).get_by_role("button", name="Apply & resume").wait_for()
    assert nb.cell(3).locator(".widget-slider").count() == 1
    nb.shot("steering-panel")

    # %djinn steer scale 0.9 / %djinn continue: text streams in while the cell runs.
    started = nb.start(4)
    progress = nb.cell(4).locator(".djinn-progress")
    page.wait_for_function(
        """i => { const c = document.querySelectorAll('.jp-Notebook .jp-Cell')[i];
                  const p = c.querySelector('.djinn-progress');
                  return p && / running · [1-9]\\d*\\/32 tokens/.test(p.textContent); }""",
        arg=4, timeout=60_000, polling=50,
    )  # fmt: skip
    first_token = time.monotonic()
    assert "[*]" in nb.prompt(4), "streamed text must show before the cell ends"
    nb.shot("streaming")
    finished = nb.wait_done(4)
    assert re.search(r"run \d+ finished, 32 token\(s\)", nb.output(4)), nb.output(4)
    assert progress.count() == 1
    print(f"first streamed token {first_token - started:.2f} s after Shift+Enter; cell done after {finished - started:.2f} s")

    # A long run, interrupted from the toolbar once it is generating.
    nb.start(5)
    page.wait_for_function(
        """i => { const p = document.querySelectorAll('.jp-Notebook .jp-Cell')[i].querySelector('.djinn-progress');
                  return p && / running · [1-9]\\d*\\/400 tokens/.test(p.textContent); }""",
        arg=5, timeout=60_000, polling=50,
    )  # fmt: skip
    nb.shot("long-run")
    clicked = time.monotonic()
    page.locator("jp-button[data-command='notebook:interrupt-kernel'], [data-jp-item-name='interrupt'] button").first.click()
    done = nb.wait_done(5, timeout=10)
    latency = done - clicked
    out = nb.output(5)
    nb.shot("interrupted")
    print(f"interrupt to cell done: {latency:.2f} s")
    lines = [line for line in out.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and "cancelled at token step" in lines[0], out
    assert "Traceback" not in out and "engine.py" not in out and "KeyboardInterrupt" not in out, out
    assert latency < 2.0, f"interrupt took {latency:.2f} s"

    out = nb.run(6)  # the session is usable at once
    assert re.search(r"run \d+ finished, 2 token\(s\)", out), out
    nb.shot("usable-again")
