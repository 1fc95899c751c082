"""The random full-size test models load cleanly in a real ComfyUI (its own loaders, its own logs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.models import ensure_test_models
from tests.support.paths import comfyui_path, repo_root

pytestmark = pytest.mark.nodes

CHECK_SCRIPT = repo_root() / "tests" / "support" / "comfy_load_check.py"


def run_comfy_load_check(checkpoint, controlnet=None, sample=False) -> dict:
    """Run tests/support/comfy_load_check.py in ComfyUI's folder; return its JSON report."""
    command = [
        sys.executable,
        str(CHECK_SCRIPT),
        "--checkpoint",
        str(checkpoint),
        "--comfyui",
        str(comfyui_path()),
    ]
    if controlnet is not None:
        command += ["--controlnet", str(controlnet)]
    if sample:
        command.append("--sample")
    # Nothing of this repo on sys.path: our nodes/ package would shadow ComfyUI's nodes.py.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run(command, cwd=comfyui_path(), env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def comfy_report():
    models = ensure_test_models()
    return run_comfy_load_check(models["checkpoint"], models["controlnet"], sample=True)


def test_comfyui_detects_sd15_with_no_missing_or_extra_keys(comfy_report):
    assert comfy_report["model_type"] == "SD15"
    assert comfy_report["prediction"] == "EPS"
    for field in (
        "unet_missing",
        "unet_unexpected",
        "clip_missing",
        "clip_unexpected",
        "vae_missing",
        "vae_unexpected",
        "left_over",
    ):
        assert comfy_report[field] == [], f"{field}: {comfy_report[field][:10]}"
    # The SD1.5 file format has no slot for these; ComfyUI itself ignores them for SD1.5.
    assert set(comfy_report["clip_missing_ignored"]) <= {
        "clip_l.logit_scale",
        "clip_l.transformer.text_projection.weight",
    }


def test_comfyui_loads_the_controlnet_cleanly(comfy_report):
    assert comfy_report["controlnet_loaded"] is True
    assert comfy_report["controlnet_class"] == "ControlNet"
    for field in ("controlnet_missing", "controlnet_unexpected", "controlnet_leftover"):
        assert comfy_report[field] == [], f"{field}: {comfy_report[field][:10]}"


def test_comfyui_samples_finite_values_and_the_controlnet_matters(comfy_report):
    sample = comfy_report["sample"]
    assert sample["latent_finite"] and sample["image_finite"] and sample["controlled_finite"]
    assert sample["image_shape"] == [1, 64, 64, 3]
    assert sample["control_changed_latent"] > 1e-3


def test_no_unexplained_comfyui_warnings(comfy_report):
    # Warnings about optional audio packages come from ComfyUI's import, not from our files.
    ours = [w for w in comfy_report["warnings"] if "torchaudio" not in w]
    assert ours == []
