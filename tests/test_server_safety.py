"""Hostile and unlucky inputs through a real ComfyUI: what /prompt refuses, what a training run
never replaces, a disk that fills up during training, and a save killed midway."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from scripts.comfyclient import ComfyClient, PromptRejected
from scripts.comfyserver import ComfyServer, prepare_base_dir
from scripts.demo import draw_sample_subject
from scripts.graphs import DREAMBOOTH_TRAIN_DEFAULTS, LORA_TRAIN_DEFAULTS
from tests.support.disk import fill_disk, small_tmpfs
from tests.support.paths import repo_root
from trainers.files.fileio import sha256_file

pytestmark = pytest.mark.server

SUBJECT = "safety_subject"


@pytest.fixture(scope="module")
def subject_folder(comfy_server):
    draw_sample_subject(comfy_server.input_dir / SUBJECT, count=3, size=96)
    return SUBJECT


def train_graph(kind: str, ckpt: str, output_name: str, **inputs) -> dict:
    """LoadSubjectImages -> LoRATrain / DreamBoothTrain -> SaveImage of the loss curve (no sampling)."""
    node, defaults, curve = {"lora": ("LoRATrain", LORA_TRAIN_DEFAULTS, 2),
                             "dreambooth": ("DreamBoothTrain", DREAMBOOTH_TRAIN_DEFAULTS, 4)}[kind]
    return {
        "subject": {"class_type": "LoadSubjectImages", "inputs": {
            "folder": SUBJECT, "instance_prompt": "a photo of sks robot", "class_prompt": "a photo of robot",
            "resolution": 64, "max_images": 0, "flip": False}},
        "train": {"class_type": node, "inputs": {
            "subject": ["subject", 0], "ckpt_name": ckpt, "output_name": output_name,
            **defaults, **inputs}},
        "save_loss": {"class_type": "SaveImage", "inputs": {"images": ["train", curve],
                                                             "filename_prefix": f"safety_{kind}"}},
    }


def rejection(client: ComfyClient, graph: dict) -> str:
    with pytest.raises(PromptRejected) as caught:
        client.queue(graph)
    assert caught.value.node_ids == {"train"}, caught.value.payload
    return " ".join(caught.value.details("train"))


def test_dreambooth_cannot_overwrite_its_own_base_checkpoint(comfy_server, comfy_client, subject_folder,
                                                             test_models):
    ckpt = test_models["checkpoint"].name
    base = comfy_server.models_dir / "checkpoints" / ckpt
    before = sha256_file(base)
    text = rejection(comfy_client, train_graph("dreambooth", ckpt, Path(ckpt).stem, overwrite=True,
                                               class_images=0))
    assert f"the output {ckpt} is the job's own input file" in text
    assert str(comfy_server.base_dir) not in text  # no server paths in what /prompt answers
    assert sha256_file(base) == before


def test_training_never_reuses_or_replaces_a_lora_it_did_not_write(comfy_server, comfy_client, subject_folder,
                                                                   test_models):
    loras = comfy_server.models_dir / "loras"
    loras.mkdir(exist_ok=True)
    third_party = loras / "downloaded_style.safetensors"
    save_file({"lora_unet_x.lora_up.weight": torch.ones(2, 2)}, str(third_party),
              metadata={"ss_network_module": "networks.lora"})
    before = sha256_file(third_party)
    for overwrite in (True, False):
        text = rejection(comfy_client, train_graph("lora", test_models["checkpoint"].name, "downloaded_style",
                                                   overwrite=overwrite))
        assert "downloaded_style.safetensors in models/loras was not written by DreamBooth Studio" in text
    assert sha256_file(third_party) == before


@pytest.mark.parametrize(("name", "reason"), [
    ("犬" * 80, "80 characters, 240 bytes in UTF-8"),  # trained every step, then failed at save before
    ("invoice\u202egnp", "direction-changing characters (U+202E RIGHT-TO-LEFT OVERRIDE)"),
    ("CONIN$", "reserved device name"),
])
def test_output_names_that_would_fail_or_spoof_are_refused_at_prompt(comfy_client, subject_folder, test_models,
                                                                     name, reason):
    assert reason in rejection(comfy_client, train_graph("lora", test_models["checkpoint"].name, name))


def test_errors_name_comfyui_folders_never_server_paths(comfy_server, comfy_client, subject_folder, test_models):
    client = ComfyClient(comfy_server.url)
    ckpt = test_models["checkpoint"].name
    client.run(train_graph("lora", ckpt, "twice_lora", steps=1), timeout=900).raise_for_status()
    result = client.run(train_graph("lora", ckpt, "twice_lora", steps=1, seed=1), timeout=900)
    assert result.status == "error"
    assert "twice_lora.safetensors already exists in models/loras and was trained differently" in \
        result.error["exception_message"]
    # /history is readable by anyone: no model or input folder of the server in the message (the
    # traceback ComfyUI adds names the code's own files, which is ComfyUI's choice)
    assert str(comfy_server.base_dir) not in result.error["exception_message"]
    history = json.dumps(comfy_client.history(result.prompt_id))
    assert str(comfy_server.models_dir) not in history and str(comfy_server.input_dir) not in history


# -- a disk that fills up during training ---------------------------------------------------------
@pytest.fixture
def full_loras_disk(comfy_server):
    """models/loras on a 32 MB tmpfs (mounted over the real folder for this test only)."""
    with small_tmpfs(comfy_server.models_dir / "loras", "32m") as folder:
        yield folder


def test_a_disk_full_at_save_keeps_the_lora_and_the_same_prompt_moves_it_into_place(
        comfy_server, subject_folder, test_models, full_loras_disk):
    client = ComfyClient(comfy_server.url)
    graph = train_graph("lora", test_models["checkpoint"].name, "disk_full_lora", steps=2)

    def fill_when_training_starts(event):
        if event.get("type") == "progress" and (event.get("data") or {}).get("node") == "train" \
                and not (full_loras_disk / "filler.bin").exists():
            fill_disk(full_loras_disk)  # another program filled the disk while the run trained

    result = client.run(graph, timeout=900, on_event=fill_when_training_starts)
    assert result.status == "error", result.error
    message = result.error["exception_message"]
    assert "disk_full_lora.safetensors could not be written in models/loras (No space left on device" in message
    assert "saved in models/dreambooth_studio/rescued as disk_full_lora.safetensors" in message
    assert "Queue the same prompt again once there is room" in message
    assert str(comfy_server.base_dir) not in message
    rescued = comfy_server.models_dir / "dreambooth_studio" / "rescued" / "disk_full_lora.safetensors"
    tensors = load_file(str(rescued))
    assert len(tensors) == (128 + 48) * 3  # every UNet and text-encoder module: down, up, alpha
    assert sorted(p.name for p in full_loras_disk.iterdir()) == ["filler.bin"]  # nothing partial left there
    content = rescued.read_bytes()

    (full_loras_disk / "filler.bin").unlink()
    again = client.run(graph, timeout=900).raise_for_status()
    assert again.progress_for("train")[-1]["value"] == 2 and len(again.progress_for("train")) == 1  # no training
    assert (full_loras_disk / "disk_full_lora.safetensors").read_bytes() == content
    assert not rescued.exists()


# -- a save killed midway, then the next start ---------------------------------------------------
_SLOW_SAVE = """
import sys, torch
from trainers.files.fileio import atomic_save_safetensors
tensors = {f"t{i}": torch.zeros(8 * 1024 * 1024) for i in range(64)}  # 2 GB: slow enough to be caught
atomic_save_safetensors(tensors, sys.argv[1])
"""


def kill_while_saving(output: Path) -> Path:
    child = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(output)], cwd=repo_root())
    deadline = time.monotonic() + 120
    temps: list[Path] = []
    while time.monotonic() < deadline and not temps:
        temps = [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.dbs-")
                 and p.stat().st_size > 0]
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert len(temps) == 1 and not output.exists()
    return temps[0]


def test_a_sigkilled_save_leaves_a_temp_file_that_the_next_start_removes(tmp_path, artifacts_dir):
    base = prepare_base_dir(tmp_path / "comfy")
    checkpoints = base / "models" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    killed = kill_while_saving(checkpoints / "big_run.safetensors")
    foreign = checkpoints / ".someone_elses.safetensors.tmp"  # not a name this pack writes: kept
    foreign.write_bytes(b"x")
    with ComfyServer(base_dir=base, log_path=artifacts_dir / "comfyui-sweep.log") as server:
        assert server.alive()
    assert not killed.exists() and foreign.exists()
    assert f"removed stale temporary file models/checkpoints/{killed.name}" in \
        (artifacts_dir / "comfyui-sweep.log").read_text()
    shutil.rmtree(base, ignore_errors=True)
