"""From canvas to cluster: a training node exports its run (crops, captions, settings) and the
command that trains it on N processes; that command, run as printed (two processes on this CPU),
makes the node's very job, and the file, put in the models folder, is reused by the node."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.support.comfy_inprocess import import_comfyui, import_pack

pytestmark = pytest.mark.nodes

SETTINGS = dict(rank=4, alpha=4.0, steps=3, unet_lr=1e-3, text_encoder_lr=1e-4, lr_scheduler="constant",
                lr_warmup_steps=0, batch_size=1, gradient_accumulation=2, seed=0, precision="fp32",
                gradient_checkpointing=False, cache_latents=True, sample_every=0, validate_every=0)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_checkpoint):
    base = tmp_path_factory.mktemp("comfy-export")
    folder_paths = import_comfyui(base, {"checkpoints": [tiny_checkpoint]})
    import_pack()
    return {"base": base, "folder_paths": folder_paths, "ckpt": tiny_checkpoint.name}


def subject(flip: bool = True):
    images = importlib.import_module("dreambooth_studio.trainers.data.images")
    gen = torch.Generator().manual_seed(0)
    raw = [torch.rand(80, 96, 3, generator=gen) for _ in range(4)]
    return images.prepare_subject(raw, [f"img{i}.png" for i in range(4)], "a photo of sks toy", "a photo of toy",
                                  64, flip=flip).subject


def train_node(env, name: str, **overrides):
    lora_train = importlib.import_module("dreambooth_studio.nodes.lora_train")
    return lora_train.LoRATrain.execute(subject=subject(), ckpt_name=env["ckpt"], output_name=name,
                                        overwrite=False, **{**SETTINGS, **overrides})


def test_an_exported_run_trained_by_its_command_is_the_nodes_job_and_the_node_reuses_it(env, monkeypatch,
                                                                                         tmp_path):
    graph_utils = importlib.import_module("comfy_execution.graph_utils")
    loras = Path(env["folder_paths"].get_folder_paths("loras")[0])

    exported = train_node(env, "exported_lora", export_processes=2)
    *blocked, command = exported.result
    assert all(isinstance(b, graph_utils.ExecutionBlocker) for b in blocked) and len(blocked) == 6
    assert "accelerate launch --multi_gpu --num_processes 2 -m trainers lora --config" in command
    assert command in exported.ui["text"][0]
    assert not (loras / "exported_lora.safetensors").exists()  # nothing trained, nothing loaded
    run_folder = Path(env["folder_paths"].get_output_directory()) / "dreambooth_studio" / "runs" / "exported_lora"
    run = json.loads((run_folder / "run.json").read_text())
    assert run["processes"] == 2 and run["command"] == "lora"
    assert command in (run_folder / "launch.sh").read_text()
    # the global batch 1 x 2 accumulation steps is shared by the 2 processes: 1 x 1 each
    assert (run["options"]["batch_size"], run["options"]["gradient_accumulation"]) == (1, 1)
    assert len(list((run_folder / "images").glob("*.png"))) == 4 == len(list((run_folder / "images").glob("*.txt")))

    # the command as printed, in a shell whose PATH has the venv's accelerate
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                   "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run(["bash", "-c", command], env=environment, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-4000:]
    trained = run_folder / "exported_lora.safetensors"
    with safe_open(str(trained), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["dbs.processes"] == "2" and metadata["ss_total_batch_size"] == "2"

    # put where the node writes it: the node reuses it (the base model is never loaded)
    shutil.copy(trained, loras / "exported_lora.safetensors")

    def no_load(*args, **kwargs):
        raise AssertionError("the base model was loaded for a job whose file is in models/loras")

    checkpoint = importlib.import_module("dreambooth_studio.trainers.sd15.checkpoint")
    monkeypatch.setattr(checkpoint, "load_sd15", no_load)
    again = train_node(env, "exported_lora")
    assert again.result[1] == "exported_lora.safetensors" and again.result[-1] == ""
    assert "reused" in json.dumps(again.ui["dreambooth_studio"])


def test_an_export_whose_global_batch_the_processes_cannot_share_is_refused_before_anything_is_written(env):
    runs = Path(env["folder_paths"].get_output_directory()) / "dreambooth_studio" / "runs"
    with pytest.raises(Exception, match=r"cannot be shared evenly by 3 processes"):
        train_node(env, "odd_batch", export_processes=3)
    assert not (runs / "odd_batch").exists()
