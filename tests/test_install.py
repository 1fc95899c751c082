"""The pack installed the way ComfyUI-Manager and the registry install it: a copy of the repository
in custom_nodes/ of a ComfyUI environment that already holds ComfyUI's requirements and
opencv-python-headless 5.x, then `pip install -r requirements.txt` alone. Nothing installed
changes version, one OpenCV stays, and the pack loads in that ComfyUI with face crop working on
real photos (OpenCV 5 has no cascade classifier: the pack's own detector runs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts.comfyclient import ComfyClient
from scripts.comfyserver import PACK_DIR_NAME, REPO_ROOT, ComfyServer, comfyui_path, prepare_base_dir
from tests.test_trainers_images import _astronaut, _chelsea, _grace_hopper
from trainers.data.images import OPENCV_DISTRIBUTIONS

pytestmark = pytest.mark.server

OPENCV_5 = "opencv-python-headless==5.1.0.95"
TORCH = ("torch==2.14.1", "torchvision==0.29.1")


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=900, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, args))}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def installed(python: Path) -> dict[str, str]:
    listing = run(python, "-m", "pip", "list", "--format", "json", "--disable-pip-version-check").stdout
    return {item["name"].lower().replace("_", "-"): item["version"] for item in json.loads(listing)}


def copy_of_the_repository(dest: Path) -> Path:
    """What a `git clone` of this tree gives: the tracked files plus new ones not ignored."""
    names = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO_ROOT).stdout
    for name in filter(None, names.split("\0")):
        source = REPO_ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.fixture(scope="module")
def user_env(tmp_path_factory):
    """A ComfyUI user's venv: ComfyUI's requirements at the index's newest, torch, and
    opencv-python-headless 5.x (built with uv from its download cache)."""
    root = tmp_path_factory.mktemp("user-env")
    venv, python = root / "venv", root / "venv" / "bin" / "python"
    uv = Path(sys.executable).with_name("uv")
    run(uv, "venv", "--quiet", "--seed", "--python", sys.executable, venv)
    requirements = [line.strip() for line in (comfyui_path() / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")
                    and line.split("=")[0].split(">")[0].split("<")[0].strip() not in ("torch", "torchvision",
                                                                                         "torchaudio")]
    env = dict(os.environ)
    if env.get("PIP_FIND_LINKS"):  # this machine's local wheels (torch)
        env["UV_FIND_LINKS"] = env["PIP_FIND_LINKS"]
    # not compiled to bytecode ahead (pip would): Python compiles what ComfyUI imports on its first
    # start, which costs seconds, where compiling every installed package took about a minute
    run(uv, "pip", "install", "--quiet", "--python", python, *TORCH, *requirements, OPENCV_5,
        env=env)
    return python


@pytest.fixture(scope="module")
def installed_pack(user_env, tmp_path_factory):
    base = tmp_path_factory.mktemp("user-comfy")
    pack = copy_of_the_repository(base / "custom_nodes" / PACK_DIR_NAME)
    before = installed(user_env)
    report_path = base / "pip-report.json"
    done = run(user_env, "-m", "pip", "install", "--disable-pip-version-check", "-r", pack / "requirements.txt",
               "--report", report_path)
    return base, before, installed(user_env), json.loads(report_path.read_text()), done.stdout


def test_installing_the_requirements_changes_no_installed_version(installed_pack):
    _, before, after, report, log = installed_pack
    assert before["opencv-python-headless"].startswith("5.")
    changed = {name: (version, after.get(name)) for name, version in before.items() if after.get(name) != version}
    assert changed == {}, changed
    # pip's report: everything it installed was new to the environment (no upgrade, no downgrade)
    chosen = {item["metadata"]["name"].lower().replace("_", "-") for item in report["install"]}
    assert chosen and not chosen & set(before), chosen & set(before)
    assert {"diffusers", "peft"} <= chosen | set(before)
    assert "Attempting uninstall" not in log
    assert {name for name in after if name in OPENCV_DISTRIBUTIONS} == {"opencv-python-headless"}


def test_the_pack_loads_in_that_comfyui_and_crops_faces_with_opencv_5(user_env, installed_pack, tmp_path):
    base, *_ = installed_pack
    prepare_base_dir(base)  # the copy in custom_nodes/ stays: no link to this checkout
    assert not (base / "custom_nodes" / PACK_DIR_NAME).is_symlink()
    server = ComfyServer(base_dir=base, python=str(user_env), log_path=base / "comfyui.log")
    server.start()
    try:
        client = ComfyClient(server.url)
        nodes = client.get_json("/object_info")
        assert {"LoadSubjectImages", "LoRATrain", "DreamBoothTrain", "SubjectFidelity"} <= set(nodes)
        folder = "faces"
        for name, photo in (("astronaut.png", _astronaut()), ("grace_hopper.png", _grace_hopper()),
                            ("chelsea.png", _chelsea())):
            Image.fromarray(np.ascontiguousarray(photo)).save(tmp_path / name)
            client.upload_image(tmp_path / name, subfolder=folder)
        graph = {
            "subject": {"class_type": "LoadSubjectImages", "inputs": {
                "folder": folder, "instance_prompt": "a photo of sks woman", "class_prompt": "a photo of woman",
                "resolution": 128, "max_images": 0, "flip": False, "crop_mode": "face",
                "caption_mode": "instance prompt", "bad_files": "stop"}},
            "report": {"class_type": "PreviewAny", "inputs": {"source": ["subject", 2]}},
        }
        report = client.run(graph, timeout=600).raise_for_status().outputs["report"]["text"][0]
        log = server.log_text()
    finally:
        server.stop()
    # ComfyUI's list of custom nodes: the pack imported (its audio nodes may fail without torchaudio)
    pack_line = next(line for line in log.splitlines() if line.rstrip().endswith(f"custom_nodes/{PACK_DIR_NAME}")
                     or f"custom_nodes/{PACK_DIR_NAME} " in line)
    assert "IMPORT FAILED" not in pack_line, pack_line
    assert not [line for line in log.splitlines() if "Cannot import" in line and PACK_DIR_NAME in line]
    assert "OpenCV distributions" not in log  # one OpenCV: no warning from the pack
    assert "OpenCV 5.1.0 has no cascade classifier: faces are found by the pack's own" in log
    # the boxes OpenCV 4's own classifier finds on these photos (tests/test_trainers_haar.py)
    assert "astronaut.png: crop face (" in report and "frontal face found at x=177 y=67 size=93x93" in report
    assert "grace_hopper.png: crop face (" in report and "frontal face found at x=149 y=100 size=231x231" in report
    assert "chelsea.png: crop face (" in report and "cat face found at x=270 y=207 size=67x67" in report
