"""LoadFidelityModels and SubjectFidelity inside an imported ComfyUI, with tiny random DINO and CLIP
folders in models/subject_eval (no SD checkpoint needed)."""

from __future__ import annotations

import importlib
import shutil

import pytest
import torch

from tests.support.comfy_inprocess import import_comfyui, import_pack
from tests.support.paths import tokenizer_dir

pytestmark = [pytest.mark.nodes, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy-fidelity")
    folder_paths = import_comfyui(base, {})
    import_pack()
    placeholder = importlib.import_module("dreambooth_studio.trainers.eval.placeholder")
    node = importlib.import_module("dreambooth_studio.nodes.fidelity")
    scoring = importlib.import_module("dreambooth_studio.nodes.scoring")
    # the folder ComfyUI would use: the models dir of this base (import_comfyui leaves models_dir as is)
    folder_paths.folder_names_and_paths.pop(scoring.MODEL_FOLDER, None)
    folder_paths.add_model_folder_path(scoring.MODEL_FOLDER, str(base / "models" / scoring.MODEL_FOLDER))
    root = base / "models" / scoring.MODEL_FOLDER
    paths = placeholder.write_random_fidelity_models(root, tokenizer_dir())
    return {"base": base, "root": root, "paths": paths, "node": node, "scoring": scoring}


def _subject(count=2, seed=0):
    images = importlib.import_module("dreambooth_studio.trainers.data.images")
    gen = torch.Generator().manual_seed(seed)
    raw = [torch.rand(80, 96, 3, generator=gen) for _ in range(count)]
    return images.prepare_subject(raw, [f"img{i}.png" for i in range(count)], "a photo of sks toy",
                                  "a photo of toy", 64).subject


def test_combos_list_each_kind_in_its_slot(env):
    node = env["scoring"]
    assert node.options("dino") == ["dino-random-tiny"]
    assert node.options("clip") == ["clip-random-tiny"]
    # one level deeper (a user's "facebook/dino-vits16") is found too
    nested = env["root"] / "facebook" / "dino-vits16"
    shutil.copytree(env["paths"]["dino"], nested)
    try:
        assert node.options("dino") == ["dino-random-tiny", "facebook/dino-vits16"]
    finally:
        shutil.rmtree(env["root"] / "facebook")


def test_loader_refuses_missing_and_crafted_names_at_prompt_time(env):
    loader = env["node"].LoadFidelityModels
    assert loader.validate_inputs("dino-random-tiny", "clip-random-tiny") is True
    message = loader.validate_inputs("../../../etc", "clip-random-tiny")
    assert "'../../../etc' not found in models/subject_eval" in message and "dino-random-tiny" in message
    # a CLIP folder is not offered as DINO, and asking for it by name is refused
    assert "not found" in loader.validate_inputs("clip-random-tiny", "clip-random-tiny")
    assert "not found" in loader.validate_inputs("dino-random-tiny", "dino-random-tiny")
    # a folder that lost its weights: named, with what to put there
    weights = env["paths"]["clip"] / "model.safetensors"
    weights.rename(weights.with_suffix(".moved"))
    try:
        message = loader.validate_inputs("dino-random-tiny", "clip-random-tiny")
        assert "has no model.safetensors" in message and "clip-random-tiny" in message
        assert str(env["base"]) not in message  # server paths are not shown
    finally:
        weights.with_suffix(".moved").rename(weights)


def test_loader_says_where_to_put_models_when_there_are_none(env, tmp_path):
    scoring = env["scoring"]
    import folder_paths

    saved = folder_paths.folder_names_and_paths.pop(scoring.MODEL_FOLDER)
    folder_paths.add_model_folder_path(scoring.MODEL_FOLDER, str(tmp_path / "empty"))
    try:
        assert scoring.options("dino") == [scoring.NONE_FOUND["dino"]]
        message = env["node"].LoadFidelityModels.validate_inputs(scoring.NONE_FOUND["dino"],
                                                                 scoring.NONE_FOUND["clip"])
        assert "no DINO model in models/subject_eval: put facebook/dino-vits16" in message
    finally:
        folder_paths.folder_names_and_paths[scoring.MODEL_FOLDER] = saved


def test_scores_from_the_subject_or_an_image_batch(env):
    node = env["node"]
    models = node.LoadFidelityModels.execute("dino-random-tiny", "clip-random-tiny").result[0]
    subject = _subject()
    generated = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    out = node.SubjectFidelity.execute(generated, models, "a toy\na toy on a table\na toy in the snow",
                                       subject=subject)
    dino, clip_i, clip_t, table, table_image = out.result
    assert all(isinstance(v, float) and -1.0 <= v <= 1.0 for v in (dino, clip_i, clip_t))
    assert table.splitlines()[2].split()[1:] == [f"{dino:.3f}", f"{clip_i:.3f}", f"{clip_t:.3f}"]
    assert "a toy in the snow" in table
    assert table_image.ndim == 4 and table_image.shape[-1] == 3
    assert out.ui["text"] == [table] and out.ui["images"]
    # the subject's images as an IMAGE batch give the same scores
    real = torch.stack(list(subject.images))
    again = node.SubjectFidelity.execute(generated, models, "a toy\na toy on a table\na toy in the snow",
                                         real_images=real).result
    assert again[:3] == (dino, clip_i, clip_t)
    assert next(models.clip.parameters()).device.type == "cpu"  # back off the device after scoring


def test_bad_wiring_is_a_clear_error(env):
    node = env["node"]
    models = node.LoadFidelityModels.execute("dino-random-tiny", "clip-random-tiny").result[0]
    generated = torch.rand(2, 64, 64, 3)
    with pytest.raises(ValueError, match="connect the subject .* or real_images"):
        node.SubjectFidelity.execute(generated, models, "a toy")
    with pytest.raises(ValueError, match="either subject or real_images, not both"):
        node.SubjectFidelity.execute(generated, models, "a toy", subject=_subject(), real_images=generated)
    with pytest.raises(ValueError, match="3 lines for 2 generated images"):
        node.SubjectFidelity.execute(generated, models, "a\nb\nc", real_images=generated)
    with pytest.raises(ValueError, match="must come from Load Fidelity Models"):
        node.SubjectFidelity.execute(generated, "not models", "a toy", real_images=generated)
