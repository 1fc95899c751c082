"""Write example_workflows/<stem>.json + <stem>.jpg and scripts/api_workflows/<stem>.json.

    .venv/bin/python scripts/build_workflows.py [--only STEM ...]

Starts a private ComfyUI (no models needed) and lets its own frontend, in headless Chromium,
build each UI-format workflow from the API-format specs in scripts/workflow_specs.py
(``app.loadApiJson`` + a Note node + ``graph.arrange``), take the thumbnail, and produce the API
twin with ``app.graphToPrompt()`` from the saved UI workflow: the very file users open.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.comfyserver import REPO_ROOT, ComfyServer, prepare_base_dir  # noqa: E402
from scripts.frontend import Frontend  # noqa: E402
from scripts.workflow_specs import specs  # noqa: E402

UI_DIR = REPO_ROOT / "example_workflows"
API_DIR = REPO_ROOT / "scripts" / "api_workflows"


def dump(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


def api_twin(frontend: Frontend, ui: dict) -> dict:
    return frontend.to_api(ui)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="stems to rebuild (default: all)")
    args = parser.parse_args(argv)
    UI_DIR.mkdir(exist_ok=True)
    API_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dbs-build-") as tmp:
        base = prepare_base_dir(Path(tmp))
        settings = base / "user" / "default" / "comfy.settings.json"
        settings.parent.mkdir(parents=True, exist_ok=True)
        # Full-detail node drawing at the thumbnail's zoom.
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "LiteGraph.Canvas.MinFontSizeForLOD": 1}))
        server = ComfyServer(base_dir=base, log_path=Path(tmp) / "server.log")
        server.start()
        try:
            with Frontend(server.url, viewport=(2400, 1500)) as frontend:
                frontend.errors.clear()  # the page's own start-up noise on an empty user folder
                for spec in specs():
                    if args.only and spec.stem not in args.only:
                        continue
                    ui = frontend.from_api(spec.graph, notes=[{"title": f"About: {spec.title}",
                                                               "text": spec.note}])
                    ui.setdefault("extra", {})["dreambooth_studio"] = {"title": spec.title}
                    (UI_DIR / f"{spec.stem}.json").write_text(dump(ui), encoding="utf-8")
                    api = api_twin(frontend, ui)
                    (API_DIR / f"{spec.stem}.json").write_text(dump(api), encoding="utf-8")
                    frontend.load(ui)
                    frontend.screenshot(UI_DIR / f"{spec.stem}.jpg")
                    print(f"{spec.stem}: {len(ui['nodes'])} nodes, {len(api)} in the API prompt")
                errors = [e for e in frontend.errors if "api.comfy.org" not in e and "Failed to load resource" not in e]
                if errors:
                    print("frontend errors:\n  " + "\n  ".join(errors), file=sys.stderr)
                    return 1
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
