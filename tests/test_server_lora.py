"""The LoRA loop through a real ComfyUI server: POST /prompt, websocket progress, interrupt."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts.comfyclient import PromptRejected
from scripts.demo import draw_sample_subject
from scripts.graphs import lora_loop, txt2img
from tests.support.outputs import saved_image

pytestmark = pytest.mark.server

SUBJECT = "lora_subject"


@pytest.fixture(scope="module")
def subject_folder(comfy_server):
    draw_sample_subject(comfy_server.input_dir / SUBJECT, count=3, size=96)
    return SUBJECT


def lora_graph(ckpt, name, steps=3, unet_scale=1.0, te_scale=1.0, prefix="lora_e2e", **train_overrides):
    return lora_loop(ckpt, name, SUBJECT, positive="a photo of sks robot", unet_scale=unet_scale,
                     te_scale=te_scale, prefix=prefix, steps=steps, **train_overrides)


def loras(comfy_server):
    folder = comfy_server.models_dir / "loras"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture(scope="module")
def trained_run(comfy_server, subject_folder, test_models):
    """The full loop, with the training node scoring its sample rounds (random DINO and CLIP folders)
    and Apply LoRA taking its best_lora; the server log of the run rides along as ``.log``."""
    from scripts.comfyclient import ComfyClient
    from tests.support.paths import tokenizer_dir
    from trainers.eval.placeholder import write_random_fidelity_models

    write_random_fidelity_models(comfy_server.base_dir / "models" / "subject_eval", tokenizer_dir())
    client = ComfyClient(comfy_server.url)
    graph = lora_graph(test_models["checkpoint"].name, "e2e_lora", steps=3, sample_every=2, sample_steps=1,
                       save_every=2, keep_last=1, sample_prompts="a photo of sks robot\na photo of sks robot on the moon")
    graph["eval"] = {"class_type": "LoadFidelityModels",
                     "inputs": {"dino_model": "dino-random-tiny", "clip_model": "clip-random-tiny"}}
    graph["train"]["inputs"]["fidelity_models"] = ["eval", 0]
    graph["apply"]["inputs"]["lora"] = ["train", 4]  # best_lora
    log_before = len(comfy_server.log_text())
    result = client.run(graph, timeout=900).raise_for_status()
    result.log = comfy_server.log_text()[log_before:]
    return result


def test_full_loop_runs_and_reports_every_training_step(comfy_server, trained_run):
    assert [p["value"] for p in trained_run.progress_for("train")] == [1, 2, 3]
    assert all(p["max"] == 3 for p in trained_run.progress_for("train"))
    assert "e2e_lora.safetensors" in loras(comfy_server)
    image = saved_image(comfy_server, trained_run)
    assert image.shape == (64, 64, 3)
    # Apply LoRA's own match report: every module of the trained LoRA found in the model
    # the best step's LoRA went into Apply LoRA: every module found in the model
    assert "the connected LoRA: 128 UNet and 48 text-encoder modules matched of 176; 0 unmatched" in trained_run.log


def events_of(result, kind):
    return [e["data"] for e in result.events if e.get("type") == f"dreambooth_studio.{kind}"]


def test_the_loop_scores_each_sample_round_and_applies_the_best_step(comfy_server, trained_run):
    from trainers.training.callbacks import SampleRound
    from trainers.training.watch import best_round

    rounds = events_of(trained_run, "samples")
    assert [r["step"] for r in rounds] == [0, 2, 3]
    for round_ in rounds:  # every round carries its three means over the websocket
        assert set(round_["scores"]) == {"dino", "clip_i", "clip_t"}
        assert all(-1.0 <= v <= 1.0 for v in round_["scores"].values())
    best = events_of(trained_run, "status")[-1]["best"]
    # the rule, applied to the scores the page received, among the steps with a file (2 and the final 3)
    expected = best_round([SampleRound(r["step"], [], [], scores=r["scores"]) for r in rounds],
                          eligible=lambda step: step in (2, 3))
    assert expected is not None, rounds  # (random models: CLIP-T barely moves in 3 steps)
    assert best["step"] == expected.step
    assert (comfy_server.models_dir / "loras" / best["file"]).is_file()
    if best["step"] < 3:  # a step file, in the run's subfolder
        assert best["file"] == f"e2e_lora/e2e_lora-step{best['step']:06d}.safetensors"
    assert f"best scored step: {best['step']} ({best['file']})" in trained_run.log
    # the catch-up data has the scores and the best step too
    run = trained_run.outputs["train"]["dreambooth_studio"][0]
    assert run["best"] == best and [r["scores"] for r in run["samples"]] == [r["scores"] for r in rounds]


def test_scales_zero_equal_no_lora_and_each_scale_acts(comfy_server, comfy_client, trained_run, test_models):
    ckpt = test_models["checkpoint"].name
    plain = txt2img(ckpt, positive="a photo of sks robot", negative="blurry", prefix="lora_plain")
    no_lora = saved_image(comfy_server, comfy_client.run(plain).raise_for_status())
    images = {}
    for scales in [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)]:
        graph = lora_graph(ckpt, "e2e_lora", steps=3, unet_scale=scales[0], te_scale=scales[1],
                           prefix=f"lora_scale_{scales[0]}_{scales[1]}")
        result = comfy_client.run(graph).raise_for_status()
        images[scales] = saved_image(comfy_server, result)
    assert np.array_equal(images[(0.0, 0.0)], no_lora)
    assert not np.array_equal(images[(1.0, 0.0)], no_lora)
    assert not np.array_equal(images[(0.0, 1.0)], no_lora)


def test_interrupt_stops_training_within_a_step(comfy_server, comfy_client, subject_folder, test_models):
    import psutil

    # baseline: the server with the base checkpoint loaded, as the LoRA graph loads it too
    comfy_client.run(txt2img(test_models["checkpoint"].name, prefix="before_interrupt", steps=1)).raise_for_status()
    server_process = psutil.Process(comfy_server.proc.pid)
    rss_before = server_process.memory_info().rss
    before = loras(comfy_server)
    graph = lora_graph(test_models["checkpoint"].name, "interrupted_lora", steps=500)
    timing = {}

    def on_event(event):
        if event.get("type") == "progress" and event["data"].get("node") == "train" and "sent" not in timing:
            if event["data"]["value"] >= 1:
                timing["sent"] = time.monotonic()
                threading.Thread(target=comfy_client.interrupt).start()

    result = comfy_client.run(graph, timeout=900, on_event=on_event)
    assert result.status == "interrupted", result.error
    steps_seen = [p["value"] for p in result.progress_for("train")]
    assert max(steps_seen) < 500
    # ended within one step of the interrupt: at most one more progress event after it
    assert max(steps_seen) <= 2, steps_seen
    assert loras(comfy_server) == before  # no new file, not even a partial one
    assert not list((comfy_server.models_dir / "loras").glob("*.tmp*"))
    # the trainer's own fp32 copy of SD1.5 (~4.3 GB) is given back: a leak would show here
    rss_after = server_process.memory_info().rss
    assert rss_after < rss_before + 1.0e9, (rss_before / 1e9, rss_after / 1e9)
    # the server runs the next prompt normally
    comfy_client.run(txt2img(test_models["checkpoint"].name, prefix="after_interrupt", steps=1)).raise_for_status()


@pytest.mark.parametrize("overrides,expected", [
    ({"unet_lr": float("nan")}, "unet_lr must be a finite number > 0"),
    ({"unet_lr": 0.0}, "unet_lr must be a finite number > 0"),
    ({"steps": 0}, "steps must be a whole number >= 1"),
    ({"output_name": "../escape"}, "output name '../escape' contains a path separator; give a plain file name"),
])
def test_bad_inputs_are_rejected_with_a_clear_message(comfy_client, subject_folder, test_models,
                                                      overrides, expected):
    graph = lora_graph(test_models["checkpoint"].name, "never_written", steps=3)
    graph["train"]["inputs"].update(overrides)
    with pytest.raises(PromptRejected) as info:
        comfy_client.run(graph, timeout=120)
    # blamed on the training node alone, with the reason and what to use
    assert info.value.node_ids == {"train"}, info.value.payload
    assert any(expected in detail for detail in info.value.details("train")), info.value.details("train")


def test_resolution_not_a_multiple_of_64_is_rejected(comfy_client, subject_folder, test_models):
    graph = lora_graph(test_models["checkpoint"].name, "never_written")
    graph["subject"]["inputs"]["resolution"] = 100
    with pytest.raises(PromptRejected, match="multiple of 64"):
        comfy_client.run(graph, timeout=120)


LOADS = ("SD1.5 layout", "model weight dtype", "Requested to load", "loaded completely")  # model-load log lines


def test_an_export_through_the_api_writes_the_run_and_runs_nothing_downstream(comfy_server, comfy_client,
                                                                              subject_folder, test_models):
    """export_processes 2: the prompt succeeds, the node shows the command, the run folder is
    written, no model is loaded or trained, and the nodes after it (Apply LoRA, the sampler, the
    image savers) are blocked without an error."""
    graph = lora_graph(test_models["checkpoint"].name, "exported_via_api", steps=3, batch_size=1,
                       gradient_accumulation=2, export_processes=2, sample_every=0, validate_every=0)
    log_before = len(comfy_server.log_text())
    result = comfy_client.run(graph, timeout=120).raise_for_status()
    text = result.outputs["train"]["text"][0]
    assert "accelerate launch --multi_gpu --num_processes 2 -m trainers lora --config" in text
    run = comfy_server.base_dir / "output" / "dreambooth_studio" / "runs" / "exported_via_api"
    assert (run / "run.json").is_file() and len(list((run / "images").glob("*.png"))) == 3
    assert set(result.outputs) == {"train"}  # nothing downstream ran, and it is not an error
    assert "exported_via_api.safetensors" not in loras(comfy_server)
    this_run = comfy_server.log_text()[log_before:]  # (the graph's own checkpoint loader may run)
    assert "SD1.5 layout" not in this_run and "LoRA training" not in this_run, this_run[-2000:]
    assert "exported run" in this_run


@pytest.mark.parametrize("case", ["broken checkpoint", "output holds another run"])
def test_training_error_reaches_the_client_before_any_model_loads(comfy_server, comfy_client, subject_folder,
                                                                  test_models, trained_run, case):
    # the trained run above did load its base model, and said so in the log
    assert "sd15-random.safetensors (full SD1.5 layout" in comfy_server.log_text()
    (comfy_server.models_dir / "checkpoints" / "broken.safetensors").write_bytes(b"\x00" * 64)
    if case == "broken checkpoint":
        graph = lora_graph(test_models["checkpoint"].name, "never_written")
        graph["train"]["inputs"]["ckpt_name"] = "broken.safetensors"
        name, expected = "never_written.safetensors", "broken.safetensors"
    else:  # e2e_lora.safetensors was trained with 3 steps
        graph = lora_graph(test_models["checkpoint"].name, "e2e_lora", steps=2)
        name, expected = "e2e_lora.safetensors", "already exists"
    # only the photos, the training node and its loss curve: no other node would load a model
    graph = {node: graph[node] for node in ("subject", "train")}
    graph["loss"] = {"class_type": "SaveImage", "inputs": {"images": ["train", 2], "filename_prefix": "never_saved"}}
    before_files = {p.name: p.stat().st_mtime_ns for p in (comfy_server.models_dir / "loras").iterdir()}
    log_before = len(comfy_server.log_text())
    result = comfy_client.run(graph, timeout=120)
    assert result.status == "error"
    assert result.error["node_id"] == "train"
    assert expected in result.error["exception_message"]
    this_run = comfy_server.log_text()[log_before:]
    assert not [line for line in this_run.splitlines() if any(mark in line for mark in LOADS)], this_run[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in (comfy_server.models_dir / "loras").iterdir()} == before_files
    assert (name in before_files) == (case != "broken checkpoint")




def portrait_subject(folder: Path) -> None:
    """Two 1:2 portraits of the toy robot, each with a painted loss mask in masks/ (the robot's
    half of the picture white)."""
    from PIL import Image

    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(draw_sample_subject(folder, count=2, size=96)):
        with Image.open(path) as photo:
            tall = photo.convert("RGB").resize((96, 192))
        path.unlink()
        tall.save(folder / f"tall_{i}.png")
        mask = np.zeros((192, 96), dtype=np.uint8)
        mask[20:170, 10:86] = 255
        Image.fromarray(mask).save(folder / "masks" / f"tall_{i}.png")


def test_a_run_with_the_training_options_on_saves_them_and_the_loop_applies_it(comfy_server, comfy_client,
                                                                                test_models):
    """LoRA Train through /prompt with Prodigy, the EMA, caption dropout, DoRA on the attention
    layers and the convolutions, aspect-ratio buckets and a masked loss from painted masks: the file records them and the
    loop's sampler runs with it applied (every key loaded); hostile optimizer and loss-mask
    names are errors naming the choices, before any model loads."""
    from safetensors import safe_open

    portrait_subject(comfy_server.input_dir / "portraits")
    options = {"optimizer": "prodigy", "unet_lr": 1.0, "ema_decay": 0.9, "caption_dropout": 0.5, "conv_layers": True,
               "lora_type": "dora", "unmasked_weight": 0.2, "sample_every": 0, "validate_every": 0}
    graph = lora_graph(test_models["checkpoint"].name, "options_lora", steps=1, prefix="options_e2e", **options)
    graph["subject"]["inputs"].update(folder="portraits", resolution=192, crop_mode="bucket", loss_mask="mask")
    graph["crops"] = {"class_type": "SaveImage", "inputs": {"images": ["subject", 1], "filename_prefix": "bucket_crops"}}
    log_before = len(comfy_server.log_text())
    result = comfy_client.run(graph, timeout=600).raise_for_status()
    assert [p["value"] for p in result.progress_for("train")] == [1]
    assert saved_image(comfy_server, result).shape == (64, 64, 3)
    crops = [np.asarray(Image.open(comfy_server.output_dir / image["subfolder"] / image["filename"]))
             for image in result.files("crops")]
    assert [crop.shape for crop in crops] == [(256, 128, 3)] * 2  # the 1:2 bucket at 192 px, not a square
    this_run = comfy_server.log_text()[log_before:]
    assert "lora key not loaded" not in this_run and "178 UNet" in this_run, this_run[-2000:]
    with safe_open(str(comfy_server.models_dir / "loras" / "options_lora.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_optimizer"].startswith("Prodigy(") and meta["ss_caption_dropout_rate"] == "0.5"
    assert '"conv_dim"' in meta["ss_network_args"] and '"ema_decay": 0.9' in meta["dbs.config"]
    assert meta["ss_enable_bucket"] == "True" and '"resolution": [128, 256], "count": 2' in meta["ss_bucket_info"]
    assert meta["ss_masked_loss"] == "True" and meta["dbs.unmasked_weight"] == "0.2"
    assert '"dora_wd": "True"' in meta["ss_network_args"]  # DoRA: every dora_scale loaded too (no key left)

    for node, change, message in [
        ("train", {"optimizer": "sgd"}, "optimizer must be one of 'adamw', 'adafactor', 'adamw8bit', 'prodigy' (got 'sgd')"),
        ("subject", {"loss_mask": "everything"}, "loss mask must be one of 'off', 'face', 'mask' (got 'everything')"),
    ]:
        graph = lora_graph(test_models["checkpoint"].name, "never_written_options", steps=2, **options)
        graph["subject"]["inputs"].update(folder="portraits", resolution=192, crop_mode="bucket", loss_mask="mask")
        graph[node]["inputs"].update(change)
        graph = {name: graph[name] for name in ("subject", "train")}
        result = comfy_client.run(graph, timeout=120)
        assert result.status == "error" and result.error["node_id"] == node
        assert message in result.error["exception_message"]
        assert "never_written_options.safetensors" not in loras(comfy_server)
