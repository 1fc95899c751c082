"""ComfyUI's own frontend in headless Chromium: UI-format workflow <-> API-format prompt.

The API format is what ``POST /prompt`` takes; the UI format is what the canvas saves and the
template browser opens. Converting between them is the frontend's job (widget order, seed
controls, upload widgets, links, notes, bypassed nodes), so this module asks the real frontend
of a running ComfyUI to do it instead of re-implementing it:

- :meth:`Frontend.to_api`: ``app.loadGraphData(ui)`` then ``app.graphToPrompt()``.
- :meth:`Frontend.from_api`: ``app.loadApiJson(api)``, optional Note nodes, ``app.graph.serialize()``.

Needs the ``playwright`` package and Debian's ``chromium`` (scripts/setup.sh installs both;
``playwright install`` is never run).

It also installs the newest frontend package next to the one ComfyUI pins, so the same ComfyUI
can serve either (``--front-end-root``): ``python -m scripts.frontend install`` (setup.sh runs it).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

CHROMIUM = os.environ.get("DBS_CHROMIUM", "/usr/bin/chromium")
REPO_ROOT = Path(__file__).resolve().parents[1]
# The newest comfyui-frontend-package on PyPI that the pack is tested with (ComfyUI 0.3.75 pins
# 1.32.9, installed in the venv). The only place its version is written: setup.sh and the
# tests read it from here.
NEWEST_FRONTEND_VERSION = "1.58.1"
NEWEST_FRONTEND_SHA256 = "37912597537a731a8f421179618a736c24184c5bdbfa327f38b2fb7c291852d9"
FRONTENDS_DIR = REPO_ROOT / ".comfyui" / "frontends"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# Texts of the toasts and dialogs on screen (the frontend's workflow-validation alert is a toast,
# not a console error).
VISIBLE_ALERTS_JS = """() => [...document.querySelectorAll('.p-toast-message, .p-dialog, [role=alertdialog]')]
    .filter(e => e.offsetParent !== null).map(e => e.innerText.trim().slice(0, 500))"""


def is_ui_workflow(data: object) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def is_api_prompt(data: object) -> bool:
    return isinstance(data, dict) and bool(data) and all(
        isinstance(v, dict) and "class_type" in v for v in data.values())


class Frontend:
    """A headless page on a running ComfyUI with ``window.app`` ready. Use as a context manager."""

    def __init__(self, server_url: str, chromium: str = CHROMIUM, viewport=(1600, 1000)):
        self.server_url = server_url.rstrip("/")
        self.chromium = chromium
        self.viewport = viewport
        self.errors: list[str] = []

    def __enter__(self) -> Frontend:
        from playwright.sync_api import sync_playwright

        if not Path(self.chromium).exists() and not shutil.which(self.chromium):
            raise RuntimeError(f"Chromium not found at {self.chromium}: run scripts/setup.sh (installs Debian "
                               "chromium) or set DBS_CHROMIUM")
        self._pw = sync_playwright().start()
        try:
            self.browser = self._pw.chromium.launch(executable_path=self.chromium, headless=True,
                                                    args=CHROMIUM_ARGS)
            self.page = self.browser.new_page(viewport={"width": self.viewport[0], "height": self.viewport[1]})
            self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
            self.page.on("dialog", lambda d: (self.errors.append(f"dialog: {d.message}"), d.dismiss()))
            self.page.goto(self.server_url, wait_until="domcontentloaded", timeout=120_000)
            self.page.wait_for_function("() => window.app && window.app.graph && window.app.canvas",
                                        timeout=120_000)
        except BaseException:
            self._pw.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.browser.close()
        finally:
            self._pw.stop()

    def missing_node_types(self, ui: dict) -> list[str]:
        """Node types of a UI workflow that this ComfyUI does not know."""
        return self.page.evaluate(
            "(wf) => [...new Set(wf.nodes.map(n => n.type))].filter(t => !LiteGraph.registered_node_types[t])", ui)

    def visible_alerts(self) -> list[str]:
        """Texts of the toasts and dialogs on screen (the frontend's workflow-validation alert is a
        toast, not a console error)."""
        return self.page.evaluate(VISIBLE_ALERTS_JS)

    def load(self, ui: dict) -> None:
        """Open a UI-format workflow in the canvas (no missing-model dialogs)."""
        self.page.evaluate(
            """async (wf) => {
                await app.loadGraphData(structuredClone(wf), true, true, null,
                    {showMissingNodesDialog: false, showMissingModelsDialog: false});
                app.canvas.setDirty(true, true);
            }""", ui)

    def to_api(self, ui: dict) -> dict:
        """The API-format prompt the frontend queues for this UI-format workflow."""
        missing = self.missing_node_types(ui)
        if missing:
            raise ValueError(f"this ComfyUI has no node type(s) {', '.join(missing)}: install the pack that "
                             "provides them")
        self.load(ui)
        return self.page.evaluate("async () => (await app.graphToPrompt()).output")

    def from_api(self, api: dict, notes: list[dict] | None = None, arrange: bool = True) -> dict:
        """A UI-format workflow built by the frontend from an API prompt (``_meta.title`` become node
        titles); ``notes`` adds Note nodes: ``{"text", "pos": [x, y], "size": [w, h], "title"}``."""
        return json.loads(self.page.evaluate(
            """async ([api, notes, arrange]) => {
                app.loadApiJson(structuredClone(api), "workflow.json");
                // Experiments compare runs at one seed: no seed changes by itself after a run.
                for (const n of app.graph._nodes)
                    for (const w of n.widgets || [])
                        if (w.name === "control_after_generate") w.value = "fixed";
                // nodes with DOM widgets (the training nodes' live chart) take their size when drawn
                app.canvas.draw(true, true);
                for (const n of app.graph._nodes) {
                    const [w, h] = n.computeSize();
                    n.setSize([Math.max(n.size[0], w), Math.max(n.size[1], h)]);
                }
                if (arrange) app.graph.arrange(80);
                let left = Infinity, top = Infinity;
                for (const n of app.graph._nodes) { left = Math.min(left, n.pos[0]); top = Math.min(top, n.pos[1]); }
                if (!isFinite(left)) { left = 0; top = 0; }
                for (const note of notes) {
                    const node = LiteGraph.createNode("Note");
                    node.title = note.title || "Note";
                    node.widgets[0].value = note.text;
                    node.size = note.size || [460, 420];
                    node.pos = note.pos || [left - node.size[0] - 60, top];
                    if (note.color) { node.color = note.color; node.bgcolor = note.bgcolor || note.color; }
                    app.graph.add(node);
                }
                app.canvas.setDirty(true, true);
                // JSON, not the object: playwright would turn undefined fields into nulls, which
                // the workflow schema rejects.
                return JSON.stringify(app.graph.serialize());
            }""", [api, notes or [], arrange]))

    def screenshot(self, path: str | os.PathLike, width: int = 1280) -> None:
        """A picture of the whole graph (drawn by the canvas itself, without the page's menus and
        banners), scaled to `width` pixels and saved as JPEG or PNG by the file's suffix."""
        data_url = self.page.evaluate("""() => {
            const c = app.canvas;
            const nodes = app.graph._nodes;
            if (nodes.length) {
                let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
                for (const n of nodes) {
                    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT);
                    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
                }
                const w = c.canvas.width, h = c.canvas.height;
                const scale = Math.min(w / (x1 - x0 + 60), h / (y1 - y0 + 60), 1.5);
                c.ds.scale = scale;
                c.ds.offset = [-x0 + 30 / scale, -y0 + 30 / scale];
            }
            c.setDirty(true, true);
            c.draw(true, true);
            return c.canvas.toDataURL("image/png");
        }""")
        from PIL import Image

        image = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")
        if image.width > width:
            image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
        path = Path(path)
        image.save(path, quality=88) if path.suffix.lower() in (".jpg", ".jpeg") else image.save(path)


def frontend_root(version: str = NEWEST_FRONTEND_VERSION) -> Path:
    """The folder to pass as ``--front-end-root`` for an installed frontend version."""
    return FRONTENDS_DIR / version


def install_frontend(version: str = NEWEST_FRONTEND_VERSION, sha256: str = NEWEST_FRONTEND_SHA256,
                     python: str = sys.executable) -> Path:
    """Put the static files of comfyui-frontend-package==`version` in ``frontend_root(version)``.

    The wheel comes from PyPI through pip (``pip download --no-deps``), is checked against its
    sha256 and unpacked under a temporary name, then renamed into place; an existing complete
    install (its ``index.html`` and a stamp naming the wheel's hash) is left as it is."""
    dest = frontend_root(version)
    stamp = dest / ".installed-from"
    if (dest / "index.html").is_file() and stamp.is_file() and stamp.read_text().strip() == sha256:
        return dest
    cache = FRONTENDS_DIR / "download"
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / f"comfyui_frontend_package-{version}-py3-none-any.whl"
    if not wheel.is_file() or _sha256(wheel) != sha256:
        wheel.unlink(missing_ok=True)
        done = subprocess.run([python, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                               "--no-deps", f"comfyui-frontend-package=={version}", "-d", str(cache)],
                              stderr=subprocess.PIPE, text=True)
        # pip's notes about this machine's unused local index locations are not news
        noise = [line for line in done.stderr.splitlines() if "is ignored: it is neither" not in line]
        if done.returncode != 0 or not wheel.is_file():
            raise RuntimeError(f"pip download of comfyui-frontend-package=={version} failed:\n" + "\n".join(noise))
    got = _sha256(wheel)
    if got != sha256:
        wheel.unlink(missing_ok=True)
        raise RuntimeError(f"{wheel.name} has sha256 {got}, expected {sha256}: not installed")
    staging = FRONTENDS_DIR / f".{version}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    prefix = "comfyui_frontend_package/static/"
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
        if not any(m.filename == prefix + "index.html" for m in members):
            raise RuntimeError(f"{wheel.name} has no {prefix}index.html")
        for member in members:
            target = staging / member.filename[len(prefix):]
            if staging.resolve() not in target.resolve().parents:
                raise RuntimeError(f"{wheel.name}: unsafe member name {member.filename!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    (staging / ".installed-from").write_text(sha256 + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    return dest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m scripts.frontend install   (installs comfyui-frontend-package=="
                 f"{NEWEST_FRONTEND_VERSION} into {frontend_root().relative_to(REPO_ROOT)})")
    print(f"[setup] frontend {NEWEST_FRONTEND_VERSION}: {install_frontend().relative_to(REPO_ROOT)}")
