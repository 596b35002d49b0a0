"""A real browser drives the 07_agent chat widget in JupyterLab (used by test_notebooks.py).

Debian's chromium (installed by .ci/run) is driven by the Playwright Python package with
``executable_path``; no browser is downloaded. JupyterLab serves a copy of the notebook on
loopback with a token; the browser runs every cell, waits for the widget, types a message and
reads the reply's triage badge and sources back, then saves a screenshot."""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = os.environ.get("MEDKIT_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MESSAGE = "I'm allergic to penicillin. I have tonsillitis, what medicine should I take?"


def skip_reason() -> str | None:
    """Why the browser test cannot run here, or None when it can."""
    if not Path(CHROMIUM).exists():
        return f"no chromium at {CHROMIUM} (.ci/run installs Debian's chromium)"
    for mod in ("playwright", "jupyterlab", "ipywidgets"):
        try:
            __import__(mod)
        except ImportError:
            return f"the Python package {mod} is not installed (pip install -e '.[test]')"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer at {url} within {timeout:.0f} s")


def chat_in_jupyterlab(notebook: Path, output_root: Path, screenshot: Path, workdir: Path,
                       run_timeout_s: float = 600) -> dict[str, str]:
    """Run ``notebook`` in JupyterLab in chromium, chat once through the widget; return the
    badge, the sources panel and the conversation text as the browser shows them."""
    from playwright.sync_api import sync_playwright

    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(notebook, workdir / notebook.name)  # JupyterLab may save it: never the committed file
    port, token = _free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "MEDKIT_HEADLESS")}
    env.update(MEDKIT_OUTPUT_DIR=str(output_root), JUPYTER_CONFIG_DIR=str(workdir / ".jupyter"),
               JUPYTER_RUNTIME_DIR=str(workdir / ".runtime"), JUPYTERLAB_SETTINGS_DIR=str(workdir / ".lab-settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(workdir / ".lab-workspaces"))
    log = open(workdir / "jupyterlab.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
                               f"--port={port}", f"--IdentityProvider.token={token}",
                               f"--ServerApp.root_dir={workdir}", "--LabApp.news_url=",
                               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_http(f"http://127.0.0.1:{port}/api/status?token={token}", 120)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"http://127.0.0.1:{port}/lab/tree/{notebook.name}?token={token}")
                page.wait_for_selector(".jp-Notebook", timeout=120_000)
                page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]', timeout=120_000)
                started = False
                for _ in range(4):  # the menu can miss a click while the page settles: check that cells run
                    page.locator(".jp-Notebook .jp-Cell").first.click()
                    page.locator('.lm-MenuBar-itemLabel:text-is("Run")').click()
                    page.locator('.lm-Menu-itemLabel:text-is("Run All Cells")').click()
                    try:
                        page.wait_for_function(
                            "[...document.querySelectorAll('.jp-InputPrompt')].some(p => /\\[(\\*|\\d+)\\]/.test(p.innerText))",
                            timeout=30_000)
                        started = True
                        break
                    except Exception:  # noqa: BLE001 - not started yet: try the menu again
                        page.keyboard.press("Escape")
                if not started:
                    raise RuntimeError("JupyterLab did not start running the notebook (Run > Run All Cells)")
                box = page.locator(".medkit-chat-input input")
                error = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]')
                page.locator(".medkit-chat-input input, "
                             '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]').first.wait_for(
                    state="visible", timeout=run_timeout_s * 1000)
                if error.count():
                    raise RuntimeError(f"a cell of {notebook.name} failed in JupyterLab:\n{error.first.inner_text()[-3000:]}")
                box.click()
                box.fill(MESSAGE)
                box.press("Enter")
                page.wait_for_selector(".medkit-badge-box .medkit-badge", timeout=120_000)
                page.wait_for_function("document.querySelector('.medkit-sources-box') && "
                                       "document.querySelector('.medkit-sources-box').innerText.includes('[E1]')",
                                       timeout=60_000)
                chat = page.locator(".medkit-chat")
                chat.scroll_into_view_if_needed()
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                chat.screenshot(path=str(screenshot))
                return {"badge": page.locator(".medkit-badge-box").inner_text(),
                        "sources": page.locator(".medkit-sources-box").inner_text(),
                        "conversation": page.locator(".medkit-conversation").inner_text(),
                        "input_after": box.input_value()}
            finally:
                browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
