"""Durable runs through a real ComfyUI: step files that load like the final file, and a run
interrupted with POST /interrupt that the same prompt, queued again, finishes to the very bytes of
an uninterrupted run."""

from __future__ import annotations

import threading

import pytest

from scripts.comfyclient import ComfyClient
from scripts.demo import draw_sample_subject
from scripts.graphs import train_alone, txt2img

pytestmark = pytest.mark.server

SUBJECT = "resume_subject"
STEPS = 3


@pytest.fixture(scope="module")
def subject_folder(comfy_server):
    draw_sample_subject(comfy_server.input_dir / SUBJECT, count=3, size=96)
    return SUBJECT


def lora_graph(ckpt: str, output_name: str, **inputs) -> dict:
    graph = train_alone("LoRATrain", ckpt, output_name, SUBJECT, steps=STEPS, **inputs)
    graph["save_loss"] = {"class_type": "SaveImage", "inputs": {"images": ["train", 2], "filename_prefix": "resume"}}
    return graph


def test_an_interrupted_run_resumes_to_the_bytes_of_an_uninterrupted_one(comfy_server, subject_folder, test_models):
    client = ComfyClient(comfy_server.url)
    ckpt = test_models["checkpoint"].name
    loras = comfy_server.models_dir / "loras"
    client.run(lora_graph(ckpt, "resume_whole"), timeout=900).raise_for_status()
    whole = (loras / "resume_whole.safetensors").read_bytes()

    graph = lora_graph(ckpt, "resume_run", save_every=1, keep_last=0)

    def interrupt_after_step_1(event):
        data = event.get("data") or {}
        if event.get("type") == "progress" and data.get("node") == "train" and data.get("value") == 1:
            threading.Thread(target=client.interrupt).start()

    stopped = client.run(graph, timeout=900, on_event=interrupt_after_step_1)
    assert stopped.status == "interrupted"
    assert not (loras / "resume_run.safetensors").exists()  # a cancel writes no final file
    done_steps = [p["value"] for p in stopped.progress_for("train")]
    states = comfy_server.models_dir / "dreambooth_studio" / "states"
    assert len(list(states.iterdir())) == 1  # the job's state folder, kept for the next run

    resumed = client.run(graph, timeout=900).raise_for_status()
    again = [p["value"] for p in resumed.progress_for("train")]
    assert again[0] == done_steps[-1] + 1 and again[-1] == STEPS  # continued, not restarted
    assert f"resumed from step {done_steps[-1]}" in comfy_server.log_text()
    assert (loras / "resume_run.safetensors").read_bytes() == whole
    # the pack asked MKL for reproducible sums before ComfyUI's first matrix product (without it,
    # two threads summed in varying order and the bytes differed)
    assert "MKL started before this pack" not in comfy_server.log_text()
    assert not any(states.iterdir())  # finished: its states are removed
    # the node's chart of the resumed run starts with the steps trained before the interrupt
    chart = resumed.outputs["train"]["dreambooth_studio"][0]
    assert [s["step"] for s in chart["steps"]] == list(range(1, STEPS + 1))
    assert chart["status"] == "finished"

    # every step file loads in ComfyUI like the final LoRA: all modules matched, none unmatched
    step_files = sorted((loras / "resume_run").iterdir())
    assert [p.name for p in step_files] == [f"resume_run-step{s:06d}.safetensors" for s in range(1, STEPS)]
    sample = txt2img(ckpt, positive="a photo of sks robot", prefix="resume_step", steps=1)
    sample["apply"] = {"class_type": "ApplyLoRAScaled", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": "resume_run/resume_run-step000002.safetensors",
        "unet_scale": 1.0, "text_encoder_scale": 1.0}}
    sample["pos"]["inputs"]["clip"] = sample["neg"]["inputs"]["clip"] = ["apply", 1]
    sample["sampler"]["inputs"]["model"] = ["apply", 0]
    client.run(sample, timeout=600).raise_for_status()
    assert ("resume_run/resume_run-step000002.safetensors: 128 UNet and 48 text-encoder modules matched of 176; "
            "0 unmatched") in comfy_server.log_text()
