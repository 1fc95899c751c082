"""The example workflows: listed by the template browser, load in the canvas, match their API twins,
and run to completion through the headless runner on the random test models."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from scripts.comfyclient import ComfyClient
from scripts.comfyserver import REPO_ROOT
from scripts.demo import draw_sample_subject
from scripts.workflow_specs import REFERENCE_IMAGE, small_overrides, specs
from tests.support.paths import tokenizer_dir
from trainers.eval.placeholder import write_random_fidelity_models

UI_DIR = REPO_ROOT / "example_workflows"
API_DIR = REPO_ROOT / "scripts" / "api_workflows"
STEMS = sorted(spec.stem for spec in specs())
SUBJECT = "workflow_subject"
RUNNER = [sys.executable, str(REPO_ROOT / "scripts" / "run_workflow.py")]
# Console noise of an offline machine (the frontend asks api.comfy.org about node packs).
NETWORK_NOISE = ("api.comfy.org", "Failed to load resource", "Content Security Policy")


def ui_workflow(stem: str) -> dict:
    return json.loads((UI_DIR / f"{stem}.json").read_text(encoding="utf-8"))


def api_twin(stem: str) -> dict:
    return json.loads((API_DIR / f"{stem}.json").read_text(encoding="utf-8"))


# -- the files ---------------------------------------------------------------------------------------

@pytest.mark.trainers
def test_one_workflow_per_experiment_each_with_note_thumbnail_and_twin():
    assert sorted(p.stem for p in UI_DIR.glob("*.json")) == STEMS
    assert len(STEMS) == 11
    for stem in STEMS:
        ui = ui_workflow(stem)
        notes = [n for n in ui["nodes"] if n["type"] == "Note"]
        assert len(notes) == 1 and len(notes[0]["widgets_values"][0]) > 200, stem
        with Image.open(UI_DIR / f"{stem}.jpg") as thumb:
            assert thumb.format == "JPEG" and thumb.width >= 640
            assert np.asarray(thumb.convert("L")).std() > 5  # a drawn graph, not a blank image
        assert (API_DIR / f"{stem}.json").is_file()
        assert not (UI_DIR / "api").exists()  # twins stay out of the template browser's folder


@pytest.mark.trainers
def test_workflows_use_real_default_settings():
    for stem in STEMS:
        api = api_twin(stem)
        for node in api.values():
            inputs = node["inputs"]
            if node["class_type"] == "LoadSubjectImages":
                assert inputs["resolution"] == 512, stem
            if node["class_type"] in ("LoRATrain", "DreamBoothTrain"):
                assert inputs["steps"] >= 800, stem
                # every experiment shows its run learning: samples and the validation loss
                assert 0 < inputs["sample_every"] < inputs["steps"], stem
                assert 0 < inputs["validate_every"] < inputs["steps"], stem
            if node["class_type"] in ("KSampler", "LoRAScaleGrid"):
                assert inputs["steps"] >= 20 and inputs.get("seed") == 123, stem
    face = api_twin("face_crop_prior_preservation")
    assert any(n["class_type"] == "EmptyLatentImage" and (n["inputs"]["width"], n["inputs"]["height"]) == (768, 1024)
               for n in face.values())


# -- through a server and the canvas -------------------------------------------------------------------

@pytest.mark.server
def test_every_workflow_is_listed_by_the_template_browser(comfy_client):
    listed = comfy_client.get_json("/workflow_templates")
    assert sorted(listed.get("dreambooth_studio", [])) == STEMS
    for stem in STEMS:
        served = comfy_client.get_json(f"/api/workflow_templates/dreambooth_studio/{stem}.json")
        assert served == ui_workflow(stem)


@pytest.mark.browser
def test_workflows_load_in_the_canvas_and_match_their_api_twins(canvas_page, artifacts_dir):
    from scripts.frontend import Frontend

    page = canvas_page
    frontend = Frontend.__new__(Frontend)  # reuse the fixture's page: same helpers, no second browser
    frontend.page, frontend.errors = page, page.console_errors
    for stem in STEMS:
        ui = ui_workflow(stem)
        assert frontend.missing_node_types(ui) == [], stem
        before = len(page.console_errors)
        twin = frontend.to_api(ui)
        page.wait_for_timeout(800)  # validation toasts appear shortly after loading
        errors = [e for e in page.console_errors[before:] if not any(n in e for n in NETWORK_NOISE)]
        assert errors == [], (stem, errors)
        assert frontend.visible_alerts() == [], stem  # e.g. "Invalid workflow against zod schema"
        assert page.evaluate("() => app.graph._nodes.length") == len(ui["nodes"])
        assert twin == api_twin(stem), f"{stem}: the API twin drifted; run scripts/build_workflows.py"
        if stem == "lora_scale_grid":
            page.screenshot(path=str(artifacts_dir / f"workflow-{stem}.png"))


@pytest.fixture(scope="module")
def workflow_inputs(comfy_server):
    # the random DINO and CLIP folders that small_overrides names for Load Fidelity Models
    write_random_fidelity_models(comfy_server.base_dir / "models" / "subject_eval", tokenizer_dir())
    draw_sample_subject(comfy_server.input_dir / SUBJECT, count=3, size=96)
    Image.fromarray((np.indices((96, 96)).sum(0) % 16 < 8).astype(np.uint8) * 255).convert("RGB").save(
        comfy_server.input_dir / REFERENCE_IMAGE)
    return SUBJECT


# dreambooth_lr_sweep and face_crop_prior_preservation train DreamBooth with the very same settings
# once made small (unet_lr 2e-6, the same photos, crop and class images; only the output name
# differs): they share one output name, so the second run finds the first one's checkpoint and
# takes the node's "identical earlier run" path (what a user gets who queues a workflow again)
# instead of training the same 2 GB model again. Any difference in settings would make it fail
# ("already exists"), not train twice. dreambooth_vs_lora trains its own: it
# is the graph that trains DreamBooth and then a LoRA in one prompt.
SHARED_DREAMBOOTH = ("dreambooth_lr_sweep", "face_crop_prior_preservation")


@pytest.fixture(scope="module")
def shared_dreambooth(comfy_server):
    name = "workflow_dreambooth_shared"
    yield name
    (comfy_server.models_dir / "checkpoints" / f"{name}.safetensors").unlink(missing_ok=True)  # 2 GB


def run_runner(args, timeout=1800):
    return subprocess.run(RUNNER + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO_ROOT)


@pytest.mark.server
@pytest.mark.parametrize("stem", STEMS)
def test_every_api_workflow_runs_through_the_runner(comfy_server, workflow_inputs, shared_dreambooth, test_models,
                                                   tmp_path, stem):
    api = api_twin(stem)
    sets = small_overrides(api, test_models["checkpoint"].name, test_models["controlnet"].name, workflow_inputs,
                           REFERENCE_IMAGE)
    # Every run writes new model files: give them names of their own (but the shared DreamBooth above).
    shared = comfy_server.models_dir / "checkpoints" / f"{shared_dreambooth}.safetensors"
    names = {nid: shared_dreambooth if stem in SHARED_DREAMBOOTH and node["class_type"] == "DreamBoothTrain"
             else f"{stem}_{nid}" for nid, node in api.items() if "output_name" in node["inputs"]}
    sets += [f"{nid}.output_name={name}" for nid, name in names.items()]
    reuse = shared.exists() and shared_dreambooth in names.values()
    if reuse:  # forget ComfyUI's cached outputs of the first run: the node runs again and finds the file
        ComfyClient(comfy_server.url).post_json("/free", {"free_memory": True})
    log_before = len(comfy_server.log_text())
    # A scored LoRA Train samples and scores a round before training and after its one step: one
    # prompt without guidance (a quarter of the default pair's UNet passes) still gives every
    # round its DINO / CLIP-I / CLIP-T and the run its best step (tests/test_server_lora.py scores
    # two prompts with guidance, tests/test_browser_live.py the default pair).
    sets += [f"{nid}.{name}={value}" for nid, node in api.items()
             if node["class_type"] == "LoRATrain" and "fidelity_models" in node["inputs"]
             for name, value in (("sample_prompts", "a photo of sks woman face"), ("sample_cfg", "1.0"))]
    args = [API_DIR / f"{stem}.json", "--server", comfy_server.url, "--out", tmp_path]
    for item in sets:
        args += ["--set", item]
    done = run_runner(args)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = [line for line in done.stdout.splitlines() if line.endswith(".png")]
    save_nodes = [n for n in api.values() if n["class_type"] == "SaveImage"]
    assert len(saved) == len(save_nodes), done.stdout
    assert "running node" in done.stderr  # progress was streamed
    if shared_dreambooth in names.values():  # trained by the first of the two, reused by the second
        said = "reused (an identical earlier run made it)" if reuse else "trained; prior preservation"
        assert f"{shared_dreambooth}.safetensors: {said}" in comfy_server.log_text()[log_before:]
    if stem == "lora_scale_grid":
        grid = np.asarray(Image.open(next(p for p in saved if "grid" in p)).convert("RGB"))
        # 2 UNet scales x 2 text-encoder scales = 4 rows, 2 CFG columns of 64 px cells (the small
        # overrides), each with a label strip (two lines of 10 px text) under it and a 20 px title band on top
        header, strip = 20, 30
        assert grid.shape == (header + 4 * (64 + strip + 4) + 4, 2 * (64 + 4) + 4, 3)
        for row in range(4):
            for column in range(2):
                y = header + row * (64 + strip + 4) + 64
                x = 4 + column * 68
                for line in range(2):  # "U0 TE1" and "CFG 10" under every cell
                    band = grid[y + 3 + line * 13:y + 3 + (line + 1) * 13, x:x + 64]
                    assert (band < 100).any(), (row, column, line)
    if stem == "lora_rank_sweep_scored":
        # one DINO / CLIP-I / CLIP-T table per rank, drawn (and its best step's 4-seed images saved)
        for rank in (4, 16, 64):
            table = next(p for p in saved if f"rank{rank}_fidelity" in p)
            assert np.asarray(Image.open(table).convert("L")).std() > 5, table
            assert any(f"rank{rank}_" in p and "fidelity" not in p for p in saved)
    if stem == "bucketed_masked_lora":  # the 1:2 bucket at 192 px and the face mask went into training
        from safetensors import safe_open

        lora = next(comfy_server.models_dir.glob(f"loras/{stem}_*.safetensors"))
        with safe_open(str(lora), "pt") as handle:
            meta = handle.metadata()
        assert meta["ss_enable_bucket"] == "True" and '"resolution": [128, 256]' in meta["ss_bucket_info"], meta
        assert meta["ss_masked_loss"] == "True" and meta["dbs.unmasked_weight"] == "0.1"
    for model in comfy_server.models_dir.glob(f"checkpoints/{stem}_*.safetensors"):
        model.unlink()  # 2 GB each


@pytest.mark.server
def test_runner_converts_a_ui_workflow_and_sets_inputs_by_title(comfy_server, workflow_inputs, test_models,
                                                                tmp_path):
    args = [UI_DIR / "lora_scale_grid.json", "--server", comfy_server.url, "--out", tmp_path, "--print-api",
            "--set", "LoRA Train.steps=2", "--set", f"Load Checkpoint.ckpt_name={test_models['checkpoint'].name}",
            "--set", "LoRA Scale x CFG Grid.cfg_values=4, 8"]
    done = run_runner(args)
    assert done.returncode == 0, done.stderr[-3000:]
    prompt = json.loads(done.stdout)
    by_title = {n["_meta"]["title"]: n["inputs"] for n in prompt.values()}
    assert by_title["LoRA Train"]["steps"] == 2
    assert by_title["LoRA Scale x CFG Grid"]["cfg_values"] == "4, 8"
    assert by_title["Load Checkpoint"]["ckpt_name"] == test_models["checkpoint"].name
    # everything else exactly as the API twin has it: same nodes, same inputs, same links
    expected = api_twin("lora_scale_grid")
    overrides = {"LoRA Train": {"steps": 2}, "Load Checkpoint": {"ckpt_name": test_models["checkpoint"].name},
                 "LoRA Scale x CFG Grid": {"cfg_values": "4, 8"}}
    for node in expected.values():
        node["inputs"].update(overrides.get(node["_meta"]["title"], {}))
    assert set(prompt) == set(expected)
    for node_id, node in expected.items():
        assert prompt[node_id]["class_type"] == node["class_type"], node_id
        assert prompt[node_id]["inputs"] == node["inputs"], node_id


@pytest.mark.server
def test_runner_reports_the_failing_node_with_a_nonzero_exit(comfy_server, workflow_inputs, test_models, tmp_path):
    (comfy_server.models_dir / "checkpoints" / "broken_for_runner.safetensors").write_bytes(b"\x00" * 64)
    api = api_twin("lora_scale_grid")
    sets = small_overrides(api, test_models["checkpoint"].name, test_models["controlnet"].name, workflow_inputs,
                           REFERENCE_IMAGE)
    args = [API_DIR / "lora_scale_grid.json", "--server", comfy_server.url, "--out", tmp_path]
    for item in sets + ["LoRA Train.ckpt_name=broken_for_runner.safetensors"]:
        args += ["--set", item]
    done = run_runner(args)
    assert done.returncode == 1
    assert "LoRA Train" in done.stderr and "broken_for_runner.safetensors" in done.stderr, done.stderr[-2000:]


@pytest.mark.server
@pytest.mark.parametrize("override,message", [
    ("No Such Node.steps=2", "no node 'No Such Node'"),
    ("LoRA Train.no_such_input=2", "has no input 'no_such_input'"),
    ("LoRA Train.subject=1", "is linked"),
    ("steps=2", "expected <node title or id>.<input>=<value>"),
])
def test_runner_refuses_bad_overrides(comfy_server, override, message):
    done = run_runner([API_DIR / "lora_scale_grid.json", "--server", comfy_server.url, "--set", override])
    assert done.returncode == 2
    assert message in done.stderr


@pytest.mark.server
def test_runner_reports_a_rejected_prompt_by_node(comfy_server, test_models, tmp_path):
    args = [API_DIR / "lora_scale_grid.json", "--server", comfy_server.url, "--out", tmp_path,
            "--set", "LoRA Scale x CFG Grid.cfg_values=5, lots"]
    done = run_runner(args)
    assert done.returncode == 1
    assert "LoRA Scale x CFG Grid" in done.stderr and "'lots' is not a number" in done.stderr, done.stderr[-2000:]
