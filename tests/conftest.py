"""Shared fixtures: cached random-weight models, a real ComfyUI server, headless Chromium.

Test tiers (markers, see pyproject.toml): trainers, nodes, server, browser.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from scripts.comfyclient import ComfyClient
from scripts.comfyserver import REPO_ROOT, ComfyServer, prepare_base_dir

ARTIFACTS = Path(os.environ.get("DBS_ARTIFACTS", REPO_ROOT / "artifacts"))
CHROMIUM = os.environ.get("DBS_CHROMIUM", "/usr/bin/chromium")
# What ComfyUI 0.3.75's own frontend logs as errors on a fresh install, with no custom node at all
# (checked by loading the page from a server started with --disable-all-custom-nodes): optional
# user files a new user folder lacks, the favicon, the offline registry lookup, and a TypeError in
# its workflow-tab store on first load. The pages of these tests must log nothing else.
CORE_CONSOLE_NOISE = (
    ("Failed to load resource: the server responded with a status of 404", "/favicon.ico"),
    ("Failed to load resource: the server responded with a status of 404", "/user.css"),
    ("Failed to load resource: the server responded with a status of 404", "/api/userdata?dir=workflows"),
    ("Failed to load resource: the server responded with a status of 404", "/api/userdata?dir=subgraphs"),
    ("Failed to load resource: the server responded with a status of 404", "/api/userdata/comfy.templates.json"),
    ("Connecting to 'https://api.comfy.org/nodes?node_id=comfy-core' violates", ""),
    ("TypeError: Cannot read properties of undefined (reading 'id')\n    at onChange", ""),
)


def is_core_noise(text: str, url: str) -> bool:
    return any(text.startswith(start) and where in url for start, where in CORE_CONSOLE_NOISE)


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def test_models() -> dict[str, Path]:
    """Full-size SD1.5 checkpoint and ControlNet with random weights (generated once, cached)."""
    from tests.support.models import ensure_test_models

    return ensure_test_models()


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, test_models, artifacts_dir):
    """A real ComfyUI on a free loopback port, with private folders and the test models."""
    base = prepare_base_dir(
        tmp_path_factory.mktemp("comfy-base"),
        models={"checkpoints": [test_models["checkpoint"]], "controlnet": [test_models["controlnet"]]},
    )
    # A first start would open the template browser over the canvas; mark the tutorial as seen.
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    server = ComfyServer(base_dir=base, log_path=artifacts_dir / "comfyui-server.log",
                         extra_args=["--verbose", "DEBUG"])
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def comfy_client(comfy_server) -> ComfyClient:
    return ComfyClient(comfy_server.url)


@pytest.fixture(scope="session")
def browser(artifacts_dir):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists() and not shutil.which(CHROMIUM):
        pytest.fail(f"Chromium not found at {CHROMIUM}: run scripts/setup.sh (installs Debian chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def canvas_page(browser, comfy_server):
    """A page with the ComfyUI canvas loaded and `window.app` ready; console errors collected."""
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    page.console_errors = []

    def on_console(msg):
        url = (msg.location or {}).get("url", "")
        if msg.type == "error" and not is_core_noise(msg.text, url):
            page.console_errors.append(f"{msg.text} ({url})" if url else msg.text)

    page.on("console", on_console)
    page.on("dialog", lambda dialog: (page.console_errors.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    page.goto(comfy_server.url, wait_until="domcontentloaded", timeout=120_000)
    page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=120_000)
    try:
        yield page
    finally:
        context.close()
