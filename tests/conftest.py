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
from scripts.frontend import NEWEST_FRONTEND_VERSION, frontend_root

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
    # Not logged by a page with core nodes only, but by the frontend itself for any pack: when it
    # restores a workflow (a page reload) it asks the registry which pack each non-core node type
    # comes from, the twin of the comfy-core lookup above, refused the same way.
    ("Connecting to 'https://api.comfy.org/comfy-nodes/", ""),
)

# The same for the newest frontend package (scripts/frontend.py, served with --front-end-root) on
# ComfyUI 0.3.75 with no custom node (checked the same way, two fresh pages, classic canvas and
# Nodes 2.0): the optional user files again (user.css is asked for at two addresses), the jobs API
# it reads the queue and history from (/api/jobs, newer than this ComfyUI: a 404 and two messages
# naming it, again after every run), and the model-metadata lookups its default workflow makes on
# huggingface.co, which the page's content security policy (--disable-api-nodes) refuses.
NEWEST_CORE_CONSOLE_NOISE = (
    ("Failed to load resource: the server responded with a status of 404", "/user.css"),
    ("Failed to load resource: the server responded with a status of 404", "/api/userdata?dir=workflows"),
    ("Failed to load resource: the server responded with a status of 404", "/api/userdata?dir=subgraphs"),
    ("Failed to load resource: the server responded with a status of 404", "/api/userdata/comfy.templates.json"),
    ("Failed to load resource: the server responded with a status of 404", "/api/jobs?"),
    ("[Jobs API] Error fetching jobs: JobsApiError: Failed to fetch jobs: 404", ""),
    ("Failed to fetch queue: JobsApiError: Failed to fetch jobs: 404", ""),
    ("Connecting to 'https://huggingface.co/", ""),
    ("Fetch API cannot load https://huggingface.co/", ""),
)


def is_core_noise(text: str, url: str, noise=CORE_CONSOLE_NOISE) -> bool:
    return any(text.startswith(start) and where in url for start, where in noise)


def write_user_settings(base: Path, settings: dict | None = None) -> None:
    """A first start would open the template browser over the canvas; mark the tutorial as seen."""
    path = base / "user" / "default" / "comfy.settings.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"Comfy.TutorialCompleted": True, **(settings or {})}))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (``pytest.mark.usefixtures("one_thread")``):
    tiny models gain nothing from a second thread, two threads wait on each other on a 2-core
    machine shared with another busy process, and child processes get the same bytes."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> Path:
    """A tiny random SD1.5 single-file checkpoint in fp16 (the layout users' files have), in its own folder."""
    from trainers.sd15 import placeholder

    return placeholder.write_random_sd15_checkpoint(tmp_path_factory.mktemp("base") / "tiny.safetensors", size="tiny")


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
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random SD1.5 single file (the engine trains it like the full size, in seconds; ComfyUI's
    own loaders do not take it): for server and browser tests of what the training nodes do and
    show, where model size changes nothing but the time."""
    from trainers.sd15 import placeholder

    path = tmp_path_factory.mktemp("tiny-model") / placeholder.TINY_CHECKPOINT_NAME
    return placeholder.write_random_sd15_checkpoint(path, size="tiny")


def install_checkpoint(server, path: Path) -> str:
    """Link a checkpoint into a running server's models/checkpoints/ (listed on the next request)."""
    prepare_base_dir(server.base_dir, models={"checkpoints": [path]})
    return path.name


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, test_models, artifacts_dir):
    """A real ComfyUI on a free loopback port, with private folders and the test models."""
    base = prepare_base_dir(
        tmp_path_factory.mktemp("comfy-base"),
        models={"checkpoints": [test_models["checkpoint"]], "controlnet": [test_models["controlnet"]]},
    )
    write_user_settings(base)
    server = ComfyServer(base_dir=base, log_path=artifacts_dir / "comfyui-server.log",
                         extra_args=["--verbose", "DEBUG"])
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def newest_frontend_server(tmp_path_factory, test_models, artifacts_dir):
    """A second ComfyUI, the same install, serving the newest frontend package (--front-end-root).

    Started only when a test asks for it (after the first server's browser tests, in file order);
    both stay up, and tests run one at a time, so no two trainings ever overlap."""
    root = frontend_root()
    if not (root / "index.html").is_file():
        pytest.fail(f"frontend {NEWEST_FRONTEND_VERSION} is not installed in {root}: run scripts/setup.sh")
    base = prepare_base_dir(tmp_path_factory.mktemp("comfy-base-newest"),
                            models={"checkpoints": [test_models["checkpoint"]]})
    write_user_settings(base)
    server = ComfyServer(base_dir=base, log_path=artifacts_dir / "comfyui-server-newest-frontend.log",
                         extra_args=["--verbose", "DEBUG", "--front-end-root", str(root)])
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


APP_READY_JS = "() => window.app && window.app.graph && window.app.canvas"


def open_canvas(browser, server, noise=CORE_CONSOLE_NOISE):
    """A new page with the ComfyUI canvas of `server` loaded and `window.app` ready. Console errors
    other than the frontend's own `noise` and uncaught page errors collect in
    `page.console_errors` (across reloads too). Close with `page.context.close()`."""
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    page.console_errors = []

    def on_console(msg):
        url = (msg.location or {}).get("url", "")
        if msg.type == "error" and not is_core_noise(msg.text, url, noise):
            page.console_errors.append(f"{msg.text} ({url})" if url else msg.text)

    page.on("console", on_console)
    page.on("pageerror", lambda error: page.console_errors.append(f"uncaught: {error}"))

    def on_dialog(dialog):
        if dialog.type == "beforeunload":  # "leave the page?" on a reload: the user says yes
            dialog.accept()
        else:
            page.console_errors.append(f"dialog: {dialog.message}")
            dialog.dismiss()

    page.on("dialog", on_dialog)
    try:
        page.goto(server.url, wait_until="domcontentloaded", timeout=120_000)
        page.wait_for_function(APP_READY_JS, timeout=120_000)
    except BaseException:
        context.close()
        raise
    return page


@pytest.fixture
def canvas_page(browser, comfy_server):
    """A page with the ComfyUI canvas loaded and `window.app` ready; console errors collected."""
    page = open_canvas(browser, comfy_server)
    try:
        yield page
    finally:
        page.context.close()
