"""Load Fidelity Models and Subject Fidelity through a running ComfyUI: a prompt scores photos with
the random DINO and CLIP folders in models/subject_eval, and crafted or missing model names are
refused at /prompt before anything loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from scripts.comfyclient import PromptRejected
from tests.support.paths import tokenizer_dir
from trainers.eval import fidelity
from trainers.eval.placeholder import write_random_fidelity_models

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def eval_models(comfy_server):
    return write_random_fidelity_models(comfy_server.base_dir / "models" / "subject_eval", tokenizer_dir())


@pytest.fixture(scope="module")
def photos(comfy_server):
    from skimage import data

    names = {"fidelity_astronaut.png": data.astronaut(), "fidelity_coffee.png": data.coffee()}
    for name, pixels in names.items():
        Image.fromarray(pixels).save(comfy_server.input_dir / name)
    return list(names)


def _graph(generated: str, real: str, dino: str, clip: str, prompt: str) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": generated}},
        "2": {"class_type": "LoadImage", "inputs": {"image": real}},
        "3": {"class_type": "LoadFidelityModels", "inputs": {"dino_model": dino, "clip_model": clip}},
        "4": {"class_type": "SubjectFidelity", "inputs": {"images": ["1", 0], "fidelity_models": ["3", 0],
                                                          "prompts": prompt, "real_images": ["2", 0]}},
    }


def test_a_prompt_scores_images_as_the_engine_does(comfy_server, comfy_client, eval_models, photos):
    result = comfy_client.run(_graph(*photos, "dino-random-tiny", "clip-random-tiny", "an astronaut"),
                              timeout=300).raise_for_status()
    output = result.outputs["4"]
    table = output["text"][0]
    assert output["images"], output  # the table's preview
    # the same scores as the engine computes from the same files in this process
    models = fidelity.load_fidelity_models(eval_models["dino"], eval_models["clip"])
    loaded = [torch.from_numpy(np.asarray(Image.open(comfy_server.input_dir / name).convert("RGB"),
                                          dtype=np.float32) / 255)[None] for name in photos]
    expected = fidelity.score(models, loaded[0], loaded[1], "an astronaut")
    assert table.splitlines()[2].split()[1:] == [f"{expected.dino:.3f}", f"{expected.clip_i:.3f}",
                                                 f"{expected.clip_t:.3f}"]
    assert "an astronaut" in table and "dino-random-tiny (DINO)" in table


@pytest.mark.parametrize("dino, clip, message", [
    ("../../../../etc", "clip-random-tiny", "'../../../../etc' not found in models/subject_eval"),
    ("dino-random-tiny", "dino-random-tiny", "CLIP model 'dino-random-tiny' not found in models/subject_eval"),
    ("dino-random-tiny", "openai/clip-vit-base-patch32", "not found in models/subject_eval (there: clip-random-tiny)"),
])
def test_crafted_or_missing_model_names_are_refused_at_prompt(comfy_client, eval_models, photos, dino, clip, message):
    with pytest.raises(PromptRejected) as caught:
        comfy_client.queue(_graph(*photos, dino, clip, "an astronaut"))
    assert message in str(caught.value)
    assert "LoadFidelityModels" in str(caught.value)


# -- a training node with fidelity models (the scored full loop is in test_server_lora.py) -----------

SUBJECT = "fidelity_subject"


def test_scoring_needs_sample_rounds(comfy_server, comfy_client, eval_models, test_models):
    from scripts import graphs
    from scripts.demo import draw_sample_subject

    draw_sample_subject(comfy_server.input_dir / SUBJECT, count=3, size=96)
    ckpt = test_models["checkpoint"].name
    graph = graphs.train_alone("LoRATrain", ckpt, "scored_no_samples", SUBJECT, steps=2, sample_every=0,
                               validate_every=0)
    graph["eval"] = {"class_type": "LoadFidelityModels",
                     "inputs": {"dino_model": "dino-random-tiny", "clip_model": "clip-random-tiny"}}
    graph["train"]["inputs"]["fidelity_models"] = ["eval", 0]
    result = comfy_client.run(graph, timeout=300)
    assert result.status == "error" and "set sample_every above 0" in result.error["exception_message"]
    assert not [e for e in result.events if e.get("type") == "dreambooth_studio.step"]  # refused before training
