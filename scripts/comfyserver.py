"""Start and stop a real ComfyUI server headless on a free loopback port.

Used by the demo and the test fixtures. `base_dir` (ComfyUI's --base-directory) gives the server
private models/, input/, output/, user/ and custom_nodes/ folders; without it the ComfyUI install's
own folders are used.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_DIR_NAME = "dreambooth_studio"


def comfyui_path() -> Path:
    """The ComfyUI the tests and demo use: $COMFYUI_PATH, else the dev copy made by setup.sh."""
    env = os.environ.get("COMFYUI_PATH")
    path = Path(env) if env else REPO_ROOT / ".comfyui" / "ComfyUI"
    if not (path / "main.py").is_file():
        raise FileNotFoundError(f"no ComfyUI at {path} (run `make test` or scripts/setup.sh, or set COMFYUI_PATH)")
    return path.resolve()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base_dir(base_dir: Path, models: dict[str, list[Path]] | None = None) -> Path:
    """Lay out a --base-directory: the pack linked into custom_nodes/, model files linked into
    models/<folder>/ (e.g. {"checkpoints": [path]}), empty input/ and output/."""
    base_dir = Path(base_dir)
    for sub in ("custom_nodes", "input", "output", "temp", "user"):
        (base_dir / sub).mkdir(parents=True, exist_ok=True)
    link = base_dir / "custom_nodes" / PACK_DIR_NAME
    if not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    for folder, files in (models or {}).items():
        target_dir = base_dir / "models" / folder
        target_dir.mkdir(parents=True, exist_ok=True)
        for f in files:
            dest = target_dir / Path(f).name
            if not dest.exists():
                dest.symlink_to(Path(f).resolve())
    return base_dir


class ComfyServer:
    def __init__(self, comfy_dir: Path | None = None, base_dir: Path | None = None,
                 port: int | None = None, log_path: Path | None = None, extra_args: list[str] | None = None,
                 python: str = sys.executable):
        self.comfy_dir = Path(comfy_dir) if comfy_dir else comfyui_path()
        self.base_dir = Path(base_dir) if base_dir else None
        self.port = port or free_port()
        self.log_path = Path(log_path) if log_path else (self.base_dir or self.comfy_dir) / "comfyui-server.log"
        self.extra_args = extra_args or []
        self.python = python
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output_dir(self) -> Path:
        return (self.base_dir or self.comfy_dir) / "output"

    @property
    def input_dir(self) -> Path:
        return (self.base_dir or self.comfy_dir) / "input"

    @property
    def models_dir(self) -> Path:
        return (self.base_dir or self.comfy_dir) / "models"

    def start(self, ready_timeout: float = 180.0) -> ComfyServer:
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--disable-api-nodes", "--log-stdout"]
        if self.base_dir:
            cmd += ["--base-directory", str(self.base_dir),
                    "--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}"]
        cmd += self.extra_args
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        log.info("starting ComfyUI: %s", " ".join(cmd))
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} during start:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as resp:
                    json.loads(resp.read())
                return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {ready_timeout:.0f}s:\n{self.log_tail()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        self._log_file.close()

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
