"""Watching a run through a real ComfyUI server: a training node alone is a complete graph, its
websocket events, sample PNGs under output/, the samples grid, and the catch-up route."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request

import pytest

from scripts import graphs
from scripts.demo import draw_sample_subject
from tests.conftest import install_checkpoint

pytestmark = pytest.mark.server

SUBJECT = "live_subject"
STEPS = 4
PROMPTS = ["a photo of sks robot", "a photo of sks robot on the moon"]


@pytest.fixture(scope="module")
def subject_folder(comfy_server):
    draw_sample_subject(comfy_server.input_dir / SUBJECT, count=3, size=96)
    return SUBJECT


def train_alone(ckpt: str, name: str, **overrides) -> dict:
    """LoadSubjectImages -> LoRATrain and nothing else: no node consumes the training outputs."""
    watch = {"sample_every": 2, "validate_every": 2, "sample_prompts": "\n".join(PROMPTS), "sample_steps": 1,
             "sample_seed": 7}
    return graphs.train_alone("LoRATrain", ckpt, name, SUBJECT, steps=STEPS, **{**watch, **overrides})


def events_of(result, kind: str) -> list[dict]:
    return [e["data"] for e in result.events if e.get("type") == f"dreambooth_studio.{kind}"]


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return error.code, json.loads(body)
        except ValueError:  # aiohttp's own 404 page for a path no route matches
            return error.code, {"error": body.decode(errors="replace")}


@pytest.fixture(scope="module")
def tiny_name(comfy_server, tiny_checkpoint):
    """What watching shows does not depend on the model's size: the tiny model trains in seconds."""
    return install_checkpoint(comfy_server, tiny_checkpoint)


@pytest.fixture(scope="module")
def watched_run(comfy_server, subject_folder, tiny_name):
    from scripts.comfyclient import ComfyClient

    client = ComfyClient(comfy_server.url)
    return client.run(train_alone(tiny_name, "live_lora"), timeout=900).raise_for_status()


def test_a_training_node_alone_queues_runs_and_writes_its_file(comfy_server, watched_run):
    assert (comfy_server.models_dir / "loras" / "live_lora.safetensors").is_file()
    # its UI output: the loss curve and the sample grid as previews, and the run for the chart
    outputs = watched_run.outputs["train"]
    assert len(outputs["images"]) == 2
    run = outputs["dreambooth_studio"][0]
    assert run["status"] == "finished" and run["node"] == "train"
    assert [s["step"] for s in run["steps"]] == list(range(1, STEPS + 1))


def test_websocket_carries_one_event_per_step_and_per_sample_round(watched_run):
    steps = events_of(watched_run, "step")
    assert [e["step"] for e in steps] == list(range(1, STEPS + 1))
    assert all(e["node"] == "train" and e["total"] == STEPS for e in steps)
    assert all(isinstance(e["loss"], float) and isinstance(e["lr"], float) for e in steps)
    # validation before training (step 0) rides on the first step event, then every 2 steps
    assert [[p[0] for p in e["validation"]] for e in steps] == [[0], [2], [], [4]]
    rounds = events_of(watched_run, "samples")
    assert [r["step"] for r in rounds] == [0, 2, 4]
    assert all([image["prompt"] for image in r["images"]] == PROMPTS for r in rounds)
    assert [e["status"] for e in events_of(watched_run, "status")] == ["running", "finished"]


def test_sample_pngs_land_in_output_with_step_and_prompt_in_their_names(comfy_server, watched_run):
    folder = comfy_server.output_dir / "dreambooth_studio" / "lora-live_lora"
    names = sorted(p.name for p in folder.glob("*.png"))
    assert len(names) == 3 * len(PROMPTS), names
    assert "step000002-p1-a-photo-of-sks-robot-on-the-moon.png" in names
    for round_ in events_of(watched_run, "samples"):
        for image in round_["images"]:
            assert image["type"] == "output" and image["subfolder"] == "dreambooth_studio/lora-live_lora"
            assert (folder / image["filename"]).is_file()
            assert f"step{round_['step']:06d}" in image["filename"]


def test_sample_grid_has_a_labelled_cell_per_step_and_prompt(comfy_client, watched_run):
    from PIL import Image

    grid = Image.open(io.BytesIO(comfy_client.download(watched_run.outputs["train"]["images"][1])))
    # 3 rows (steps 0, 2, 4) x 2 columns of 64 px samples, plus room for the labels
    assert grid.width >= 2 * 64 and grid.height >= 3 * 64
    assert grid.width < 2 * 64 + 400 and grid.height < 3 * 64 + 300
    pixels = grid.convert("L")
    # the label strip above the first column differs from a blank strip: text is drawn there
    assert len(set(pixels.crop((0, 0, grid.width, 12)).getdata())) > 1


def test_the_catch_up_route_returns_the_newest_run_of_a_node(comfy_server, watched_run):
    status, run = get(f"{comfy_server.url}/dreambooth_studio/runs/train")
    assert status == 200
    assert run["status"] == "finished" and run["total"] == STEPS and run["output"] == "live_lora.safetensors"
    assert [s["step"] for s in run["steps"]] == list(range(1, STEPS + 1))
    assert [p[0] for p in run["validation"]] == [0, 2, 4]
    assert [r["step"] for r in run["samples"]] == [0, 2, 4]
    # the /api/ twin the frontend uses; a node that never trained has no steps (not an error:
    # every page asks this for each training node it loads)
    status, run = get(f"{comfy_server.url}/api/dreambooth_studio/runs/987654")
    assert status == 200 and run["status"] == "none" and "steps" not in run and "987654" in run["message"]
    for hostile in ("1;2", "%00", "x" * 200, "..%2F..%2Fetc"):
        status, answer = get(f"{comfy_server.url}/dreambooth_studio/runs/{hostile}")
        assert status == 400 and "node id" in answer["error"], hostile


def test_changing_only_sample_settings_reuses_the_file(comfy_server, comfy_client, watched_run, tiny_name):
    path = comfy_server.models_dir / "loras" / "live_lora.safetensors"
    before = path.read_bytes()
    again = comfy_client.run(train_alone(tiny_name, "live_lora", sample_seed=8),
                             timeout=900).raise_for_status()
    assert events_of(again, "step") == []  # nothing trained
    assert [e["status"] for e in events_of(again, "status")] == ["running", "reused"]
    run = again.outputs["train"]["dreambooth_studio"][0]
    assert [s["step"] for s in run["steps"]] == list(range(1, STEPS + 1))  # the chart from the file's history
    assert path.read_bytes() == before
