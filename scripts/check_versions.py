"""Run the engine's tests against the oldest versions requirements.txt allows.

    .venv/bin/python scripts/check_versions.py [--venv DIR] [-- PYTEST_ARGS...]

Builds a venv (default .cache/versions-lowest/) with uv: torch as in the dev venv, the test
tools, then requirements.txt resolved to the lowest version of each package it names
(`--resolution lowest-direct`), prints those versions, and runs `pytest -m trainers` there (the
engine alone: no ComfyUI). The versions and the outcome belong in README's "Tested with" table.
A failure means a lower bound is too low: raise it in requirements.txt and pyproject.toml.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what the tests import besides the pack's requirements (left at the newest)
TEST_TOOLS = ["pytest", "scikit-image", "matplotlib", "packaging", "requests", "websocket-client", "psutil", "aiohttp"]
NAMED = ["diffusers", "transformers", "peft", "accelerate", "safetensors", "opencv-python-headless", "numpy",
         "torch", "huggingface-hub", "tokenizers"]
DESELECT = [
    # the README table names the dev venv's versions, not these
    "tests/test_packaging.py::test_readme_names_the_versions_make_test_runs_with",
    # the cached random test model (.cache/test-models) was drawn by the dev venv's transformers;
    # an older one draws a different random CLIP from the same seed
    "tests/test_trainers_models.py::test_full_size_placeholder_file_loads_exactly",
]


def run(*args: str, **kwargs) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True, **kwargs)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=ROOT / ".cache" / "versions-lowest")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    uv = str(Path(sys.executable).with_name("uv"))
    python = args.venv / "bin" / "python"
    env = dict(os.environ)
    if env.get("PIP_FIND_LINKS"):
        env["UV_FIND_LINKS"] = env["PIP_FIND_LINKS"]
    torch = [f"{name}=={importlib.metadata.version(name)}" for name in ("torch", "torchvision")]
    run(uv, "venv", "--quiet", "--allow-existing", "--python", sys.executable, str(args.venv))
    run(uv, "pip", "install", "--quiet", "--python", str(python), *torch, *TEST_TOOLS, env=env)
    run(uv, "pip", "install", "--quiet", "--python", str(python), "--resolution", "lowest-direct",
        "-r", str(ROOT / "requirements.txt"), env=env)
    versions = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m, sys\n"
         "for n in sys.argv[1:]:\n"
         "    try: print(f'{n} {m.version(n)}')\n"
         "    except m.PackageNotFoundError: print(f'{n} -')", *NAMED],
        check=True, capture_output=True, text=True).stdout
    print("lowest allowed versions installed:\n" + versions, flush=True)
    command = [str(python), "-m", "pytest", "-m", "trainers", "-p", "no:cacheprovider", "-q"]
    command += [f"--deselect={item}" for item in DESELECT] + pytest_args
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
