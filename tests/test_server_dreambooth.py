"""DreamBooth through a real ComfyUI server: SUBJECT -> DreamBoothTrain -> KSampler -> SaveImage on
the full-size random SD1.5 at 64 px, class images generated once (into models/, never taken from a
forged set uploaded into input/), cancel in both phases."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from scripts.comfyclient import PromptRejected
from scripts.demo import draw_sample_subject
from scripts.graphs import dreambooth_loop, train_alone, txt2img
from tests.support.outputs import saved_image
from tests.test_placeholder_comfy import run_comfy_load_check
from trainers.data.class_images import MANIFEST, ClassImageSpec
from trainers.files.fileio import content_sha256

pytestmark = pytest.mark.server

SUBJECT = "dreambooth_subject"
CLASS_PROMPT = "a photo of robot"
# Sized so the two phases can be told apart on the node's progress bar: class generation is
# 1 batch x 3 sampling steps (max 3), training 2 steps (max 2).
CLASS_STEPS, TRAIN_STEPS = 3, 2


@pytest.fixture(scope="module")
def subject_folder(comfy_server):
    draw_sample_subject(comfy_server.input_dir / SUBJECT, count=3, size=96)
    return SUBJECT


def checkpoints(comfy_server) -> set[str]:
    return {p.name for p in (comfy_server.models_dir / "checkpoints").iterdir()}


def class_cache(comfy_server):
    return comfy_server.models_dir / "dreambooth_studio" / "class_images"


def class_sets(comfy_server) -> set[str]:
    folder = class_cache(comfy_server)
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def forge_class_set(comfy_server, client, test_models, tmp_path) -> Path:
    """Plant, through /upload/image, the set the first run needs where the old cache was
    (input/class_images/<set>/): red squares with a manifest whose key, names, hashes and sizes
    are all consistent. The cache lives in models/ now, so this must change nothing."""
    from PIL import Image

    spec = ClassImageSpec(base_fingerprint=content_sha256(test_models["checkpoint"]), prompt=CLASS_PROMPT, count=2,
                          resolution=64, steps=CLASS_STEPS)
    subfolder = f"class_images/{spec.folder_name()}"
    entries = []
    for name in spec.image_names():
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (255, 0, 0)).save(buffer, format="PNG")
        (tmp_path / name).write_bytes(buffer.getvalue())
        client.upload_image(tmp_path / name, subfolder=subfolder)
        entries.append({"name": name, "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
                        "size": len(buffer.getvalue())})
    (tmp_path / MANIFEST).write_text(json.dumps({"format": 2, "engine": "1", "key": spec.key(),
                                                 "count": 2, "images": entries}))
    client.upload_image(tmp_path / MANIFEST, subfolder=subfolder)
    forged = comfy_server.input_dir / subfolder
    assert sorted(p.name for p in forged.iterdir()) == [*spec.image_names(), MANIFEST]
    return forged


def graph(test_models, name, **overrides):
    train = {"steps": TRAIN_STEPS, "class_steps": CLASS_STEPS, **overrides}
    return dreambooth_loop(test_models["checkpoint"].name, name, SUBJECT, positive="a photo of sks robot",
                           class_prompt=CLASS_PROMPT, prefix=f"db_{name}", loss_prefix=f"db_loss_{name}", **train)


class PeakRSS:
    """Samples a process's resident memory in a thread; `peak` in bytes."""

    def __init__(self, pid: int, every: float = 0.2):
        self.process, self.every, self.peak = psutil.Process(pid), every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def first_run(comfy_server, subject_folder, test_models, artifacts_dir, tmp_path_factory):
    from scripts.comfyclient import ComfyClient

    client = ComfyClient(comfy_server.url)
    forged = forge_class_set(comfy_server, client, test_models, tmp_path_factory.mktemp("forged"))
    forged_files = {p.name: p.read_bytes() for p in forged.iterdir()}
    sets_before = class_sets(comfy_server)
    with PeakRSS(comfy_server.proc.pid) as rss:
        # lr high enough that the trained model samples differently from its base
        result = client.run(graph(test_models, "e2e_dreambooth", unet_lr=1e-4), timeout=1800).raise_for_status()
    (artifacts_dir / "dreambooth-server-peak-rss.txt").write_text(f"{rss.peak / 1e9:.2f} GB\n")
    # the forged upload was neither used nor touched
    assert {p.name: p.read_bytes() for p in forged.iterdir()} == forged_files
    yield result, class_sets(comfy_server) - sets_before, forged_files
    for name in ("e2e_dreambooth.safetensors", "e2e_dreambooth_again.safetensors"):
        (comfy_server.models_dir / "checkpoints" / name).unlink(missing_ok=True)


def test_dreambooth_loop_completes_and_reports_both_phases(comfy_server, first_run):
    result, new_sets, forged_files = first_run
    events = [(p["value"], p["max"]) for p in result.progress_for("train")]
    generation = [e for e in events if e[1] == CLASS_STEPS]
    training = [e for e in events if e[1] == TRAIN_STEPS]
    assert [v for v, _ in generation] == [1, 2, 3], events
    assert [v for v, _ in training] == [1, 2], events
    assert events.index(training[0]) > events.index(generation[-1])  # generation first
    assert "e2e_dreambooth.safetensors" in checkpoints(comfy_server)
    # two class images generated into models/dreambooth_studio/class_images/<prompt>-64px-2-<key>/
    # (the forged set uploaded to input/class_images/ under that very name was ignored), each
    # listed in the manifest with its hash and size
    assert len(new_sets) == 1
    folder = class_cache(comfy_server) / new_sets.pop()
    assert folder.name.startswith("a_photo_of_robot-64px-2-")
    assert sorted(p.name for p in folder.iterdir()) == ["class_00000.png", "class_00001.png", MANIFEST]
    manifest = json.loads((folder / MANIFEST).read_text())
    for entry in manifest["images"]:
        data = (folder / entry["name"]).read_bytes()
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (entry["sha256"], entry["size"])
        assert data != forged_files[entry["name"]]
    image = saved_image(comfy_server, result)
    assert image.shape == (64, 64, 3)
    loss = saved_image(comfy_server, result, "save_loss")
    assert loss.shape[0] > 100 and loss.std() > 5  # a drawn chart, not a blank image


def test_returned_model_is_the_saved_file_and_the_report_says_trained_then_reused(comfy_server, comfy_client,
                                                                                  first_run, test_models):
    result, _, _ = first_run
    trained = saved_image(comfy_server, result)
    # the same prompt and seed through Load Checkpoint on the saved file: the very same image
    sample = {"positive": "a photo of sks robot", "seed": 123, "steps": 2, "size": 64}
    reloaded = comfy_client.run(txt2img("e2e_dreambooth.safetensors", prefix="db_reloaded", **sample))
    assert np.array_equal(saved_image(comfy_server, reloaded.raise_for_status()), trained)
    base = comfy_client.run(txt2img(test_models["checkpoint"].name, prefix="db_base", **sample))
    assert not np.array_equal(saved_image(comfy_server, base.raise_for_status()), trained)  # not the base model
    log = comfy_server.log_text()
    assert "e2e_dreambooth.safetensors: trained; prior preservation: 2 class images of 'a photo of robot' at 64 px, " \
           "generated now" in log
    # forget ComfyUI's cached outputs: the node runs again and finds its own file
    comfy_client.post_json("/free", {"free_memory": True})
    again = comfy_client.run(graph(test_models, "e2e_dreambooth", unet_lr=1e-4), timeout=1800).raise_for_status()
    assert [p["max"] for p in again.progress_for("train")] == [TRAIN_STEPS]  # set to done at once, no training
    assert "e2e_dreambooth.safetensors: reused (an identical earlier run made it); checkpoint reused, no class " \
           "images needed" in comfy_server.log_text()[len(log):]


def test_saved_checkpoint_loads_in_comfyui_as_sd15_without_key_warnings(comfy_server, first_run):
    report = run_comfy_load_check(comfy_server.models_dir / "checkpoints" / "e2e_dreambooth.safetensors")
    assert report["model_type"] == "SD15"
    for field in ("unet_missing", "unet_unexpected", "clip_missing", "clip_unexpected", "vae_missing",
                  "vae_unexpected", "left_over"):
        assert report[field] == [], f"{field}: {report[field][:10]}"


def test_second_run_reuses_the_class_images(comfy_server, comfy_client, first_run, test_models):
    sets_before = class_sets(comfy_server)
    # LoadSubjectImages -> DreamBoothTrain and nothing else: the training node is an output node.
    # One training step: the progress bar (max 1) still tells it from class generation (max 3).
    alone = train_alone("DreamBoothTrain", test_models["checkpoint"].name, "e2e_dreambooth_again", SUBJECT,
                        class_prompt=CLASS_PROMPT, steps=1, class_steps=CLASS_STEPS, unet_lr=4e-6)
    result = comfy_client.run(alone, timeout=1800).raise_for_status()
    events = [(p["value"], p["max"]) for p in result.progress_for("train")]
    assert events == [(1, 1)]  # training only: no class image generated
    assert class_sets(comfy_server) == sets_before
    assert "e2e_dreambooth_again.safetensors" in checkpoints(comfy_server)


def _interrupt_when(comfy_client, predicate):
    sent = {}

    def on_event(event):
        if event.get("type") == "progress" and event["data"].get("node") == "train" and not sent:
            if predicate(event["data"]):
                sent["at"] = (event["data"]["value"], event["data"]["max"])
                threading.Thread(target=comfy_client.interrupt).start()

    return on_event, sent


def test_cancel_during_class_generation_leaves_nothing(comfy_server, comfy_client, subject_folder, test_models):
    # Cancelled inside the first batch: no image is finished, so neither a set folder nor a
    # temporary file is left (finished batches would stay, listed, for the next run to resume).
    before, sets_before = checkpoints(comfy_server), class_sets(comfy_server)
    # 8 images in 2 batches x 20 steps: 40 generation steps; cancel at the second.
    on_event, sent = _interrupt_when(comfy_client, lambda d: d["max"] == 40 and d["value"] >= 2)
    result = comfy_client.run(graph(test_models, "cancelled_in_generation", class_images=8, class_steps=20),
                              timeout=1800, on_event=on_event)
    assert result.status == "interrupted", result.error
    values = [p["value"] for p in result.progress_for("train")]
    assert max(values) <= 3, values  # stopped within a step of the cancel
    assert checkpoints(comfy_server) == before
    assert class_sets(comfy_server) == sets_before  # no partial class-image folder either
    assert not list(class_cache(comfy_server).rglob(".*"))  # no temporary file


def test_cancel_during_training_leaves_no_file_and_frees_memory(comfy_server, comfy_client, subject_folder,
                                                               test_models, first_run):
    comfy_client.run(txt2img(test_models["checkpoint"].name, prefix="db_before_cancel", steps=1)).raise_for_status()
    server = psutil.Process(comfy_server.proc.pid)
    rss_before = server.memory_info().rss
    before = checkpoints(comfy_server)
    on_event, sent = _interrupt_when(comfy_client, lambda d: d["max"] == 500 and d["value"] >= 1)
    result = comfy_client.run(graph(test_models, "cancelled_in_training", steps=500), timeout=1800,
                              on_event=on_event)
    assert result.status == "interrupted", result.error
    assert sent["at"][1] == 500
    values = [p["value"] for p in result.progress_for("train") if p["max"] == 500]
    assert max(values) <= 2, values
    assert checkpoints(comfy_server) == before
    assert not list((comfy_server.models_dir / "checkpoints").glob("*.tmp*"))
    # the trainer's fp32 SD1.5, gradients and optimizer state (~8 GB) are given back
    assert server.memory_info().rss < rss_before + 1.0e9, (rss_before / 1e9, server.memory_info().rss / 1e9)
    comfy_client.run(txt2img(test_models["checkpoint"].name, prefix="db_after_cancel", steps=1)).raise_for_status()


@pytest.mark.parametrize("overrides,expected", [
    ({"unet_lr": float("nan")}, "unet_lr must be a finite number > 0"),
    ({"prior_loss_weight": float("inf")}, "prior_loss_weight must be a finite number >= 0 and <= 100"),
    ({"output_name": "../escape"}, "output name '../escape' contains a path separator; give a plain file name"),
])
def test_bad_inputs_are_rejected_with_a_clear_message(comfy_client, subject_folder, test_models, overrides,
                                                      expected):
    bad = graph(test_models, "never_written")
    bad["train"]["inputs"].update(overrides)
    with pytest.raises(PromptRejected) as info:
        comfy_client.run(bad, timeout=120)
    # blamed on the training node alone, with the reason and what to use
    assert info.value.node_ids == {"train"}, info.value.payload
    assert any(expected in detail for detail in info.value.details("train")), info.value.details("train")


def test_prior_without_a_class_prompt_fails_before_any_model_loads(comfy_server, comfy_client, subject_folder,
                                                                   test_models):
    bad = graph(test_models, "never_written")
    bad["subject"]["inputs"]["class_prompt"] = ""
    loads = comfy_server.log_text().count(f"loaded {test_models['checkpoint'].name}")
    result = comfy_client.run(bad, timeout=300)
    assert result.status == "error"
    assert result.error["node_id"] == "train"
    assert "class prompt" in result.error["exception_message"]
    # the trainer never loaded the base model (it logs "loaded <file> (...)" when it does)
    assert comfy_server.log_text().count(f"loaded {test_models['checkpoint'].name}") == loads
    assert "never_written.safetensors" not in checkpoints(comfy_server)
