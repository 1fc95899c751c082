"""DINO, CLIP-I and CLIP-T (trainers/eval/fidelity.py) with tiny random DINO and CLIP models built from
transformers configs: the paper's means, a hand-written reference, the reference preprocessing pixel
for pixel, and clear errors for folders that cannot be used."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.paths import tokenizer_dir
from trainers.eval import fidelity
from trainers.eval.placeholder import write_random_fidelity_models

pytestmark = [pytest.mark.trainers, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_random_fidelity_models(tmp_path_factory.mktemp("subject_eval"), tokenizer_dir())


@pytest.fixture(scope="module")
def models(folders):
    return fidelity.load_fidelity_models(folders["dino"], folders["clip"])


def _images(count, height, width, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, height, width, 3, generator=generator)


def _astronaut():
    from skimage import data

    return data.astronaut()


def _grace_hopper():
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        return np.asarray(Image.open(handle).convert("RGB"))


def test_identical_images_score_one(models):
    photo = torch.from_numpy(_astronaut().astype(np.float32) / 255)[None]
    scores = fidelity.score(models, photo.repeat(3, 1, 1, 1), photo.repeat(2, 1, 1, 1), "an astronaut")
    assert scores.dino == pytest.approx(1.0, abs=1e-6)
    assert scores.clip_i == pytest.approx(1.0, abs=1e-6)
    assert all(d == pytest.approx(1.0, abs=1e-6) and c == pytest.approx(1.0, abs=1e-6)
               for d, c, _ in scores.per_image)
    # Two different images against the same two: every pair counts, so the cross pairs pull it below 1.
    pair = torch.cat([photo, torch.from_numpy(
        np.asarray(Image.fromarray(_grace_hopper()).resize((512, 512))).astype(np.float32) / 255)[None]])
    both = fidelity.score(models, pair, pair, "a person")
    assert both.dino < 1.0 - 1e-4 and both.clip_i < 1.0 - 1e-4


def _cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def test_scores_equal_a_hand_written_reference(folders, models):
    """Reference: transformers' own classes and forward (CLIPModel's forward returns normalised
    image_embeds and text_embeds), a loop over the pairs, images rounded to 8 bits by hand."""
    import transformers

    generated, real = _images(3, 72, 88, seed=1), _images(2, 96, 64, seed=2)
    prompts = ["a photo of a dog", "a dog on the beach", "a dog in a bucket"]
    to_pil = [Image.fromarray((img.numpy() * 255).round().astype(np.uint8)) for img in [*generated, *real]]

    vit = transformers.ViTModel.from_pretrained(folders["dino"], add_pooling_layer=False).eval()
    vit_processor = transformers.AutoImageProcessor.from_pretrained(folders["dino"])
    with torch.no_grad():
        cls = vit(pixel_values=vit_processor(images=to_pil, return_tensors="pt")["pixel_values"]).last_hidden_state[:, 0]
    dino_pairs = [_cosine(cls[g], cls[3 + r]) for g in range(3) for r in range(2)]

    clip = transformers.CLIPModel.from_pretrained(folders["clip"]).eval()
    clip_processor = transformers.AutoImageProcessor.from_pretrained(folders["clip"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(folders["clip"])
    with torch.no_grad():
        tokens = tokenizer(prompts + prompts[:2], padding=True, return_tensors="pt")
        out = clip(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                   pixel_values=clip_processor(images=to_pil, return_tensors="pt")["pixel_values"])
    image_embeds, text_embeds = out.image_embeds, out.text_embeds
    clip_pairs = [_cosine(image_embeds[g], image_embeds[3 + r]) for g in range(3) for r in range(2)]
    clip_t = [_cosine(image_embeds[g], text_embeds[g]) for g in range(3)]

    scores = fidelity.score(models, generated, list(real), "\n".join(prompts))
    assert scores.dino == pytest.approx(sum(dino_pairs) / 6, abs=1e-6)
    assert scores.clip_i == pytest.approx(sum(clip_pairs) / 6, abs=1e-6)
    assert scores.clip_t == pytest.approx(sum(clip_t) / 3, abs=1e-6)
    for g, (d, c, t) in enumerate(scores.per_image):
        assert d == pytest.approx(sum(dino_pairs[2 * g:2 * g + 2]) / 2, abs=1e-6)
        assert c == pytest.approx(sum(clip_pairs[2 * g:2 * g + 2]) / 2, abs=1e-6)
        assert t == pytest.approx(clip_t[g], abs=1e-6)
    assert scores.prompts == tuple(prompts)


def test_pairwise_means_match_the_paper_on_a_2x3_example(models, monkeypatch):
    """2 generated and 3 real images with embeddings chosen so every cosine is known by hand:
    generated (1,0), (0,1); real (1,0), (0,1), (-1,0). Pair cosines [[1, 0, -1], [0, 1, 0]]:
    DINO = (1 + 0 - 1 + 0 + 1 + 0) / 6 = 1/6, per generated image 0 and 1/3."""
    generated = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    real = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    texts = torch.tensor([[0.6, 0.8], [0.6, 0.8]], dtype=torch.float64)  # CLIP-T: 0.6 and 0.8, mean 0.7

    def embeddings(_models, pictures):
        return generated if len(pictures) == 2 else real

    monkeypatch.setattr(fidelity, "dino_embeddings", embeddings)
    monkeypatch.setattr(fidelity, "clip_image_embeddings", embeddings)
    monkeypatch.setattr(fidelity, "clip_text_embeddings", lambda _models, prompts: texts[:len(prompts)])
    scores = fidelity.score(models, _images(2, 32, 32, 0), _images(3, 32, 32, 1), "a dog")
    assert scores.dino == pytest.approx(1 / 6, abs=1e-12)
    assert scores.clip_i == pytest.approx(1 / 6, abs=1e-12)
    assert scores.clip_t == pytest.approx(0.7, abs=1e-12)
    assert [round(p[0], 12) for p in scores.per_image] == [0.0, round(1 / 3, 12)]
    assert [round(p[2], 12) for p in scores.per_image] == [0.6, 0.8]


@pytest.mark.parametrize("photo", [_astronaut, _grace_hopper])
def test_preprocessing_equals_the_processor_pixel_for_pixel(folders, models, tmp_path, photo):
    """A photo saved as PNG and loaded as ComfyUI's LoadImage does (8-bit / 255 as float32) gives
    exactly the pixel values the model's processor makes from the file itself."""
    import transformers

    path = tmp_path / "photo.png"
    Image.fromarray(photo()).save(path)
    image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).astype(np.float32) / 255.0)[None]
    ours = fidelity.to_pil_images(image)
    assert np.array_equal(np.asarray(ours[0]), np.asarray(Image.open(path).convert("RGB")))
    for folder, processor in ((folders["dino"], models.dino_processor), (folders["clip"], models.clip_processor)):
        reference = transformers.AutoImageProcessor.from_pretrained(folder)
        expected = reference(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
        got = fidelity._pixels(processor, ours, torch.device("cpu"))
        assert got.shape == expected.shape and torch.equal(got, expected.float())


def test_prompts_one_for_all_or_one_per_image():
    assert fidelity.prompts_for("a dog", 3) == ["a dog"] * 3
    assert fidelity.prompts_for("a\n\nb\nc\n", 3) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="2 lines for 3 generated images"):
        fidelity.prompts_for("a\nb", 3)
    with pytest.raises(ValueError, match="prompts is empty"):
        fidelity.prompts_for("  \n ", 3)


def test_table_names_the_scores_and_the_yardstick(models):
    scores = fidelity.score(models, _images(2, 64, 64, 3), _images(2, 64, 64, 4), "a dog\na cat")
    lines = fidelity.table_lines(scores)
    assert lines[2].split()[1:] == [f"{scores.dino:.3f}", f"{scores.clip_i:.3f}", f"{scores.clip_t:.3f}"]
    assert lines[3].endswith("a dog") and lines[4].endswith("a cat")
    assert "0.668" in lines[-2] and "dino-random-tiny" in lines[-1]
    picture = fidelity.table_image(scores)
    pixels = np.asarray(picture)
    assert picture.height > 20 * len(lines) * 0.8 and (pixels > 200).any()  # text drawn on the dark ground


def _copy(folder, tmp_path, name):
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def test_unusable_folders_are_clear_errors(folders, tmp_path):
    with pytest.raises(fidelity.FidelityModelError, match="does not exist: put facebook/dino-vits16"):
        fidelity.check_model_folder(tmp_path / "nothing", "dino")
    # a CLIP in the DINO slot, and the other way round
    with pytest.raises(fidelity.FidelityModelError, match="holds a 'clip' model, not a DINO model"):
        fidelity.check_model_folder(folders["clip"], "dino")
    with pytest.raises(fidelity.FidelityModelError, match="holds a 'vit' model, not a CLIP model"):
        fidelity.check_model_folder(folders["dino"], "clip")
    # pickle weights only: refused, never loaded
    pickled = _copy(folders["dino"], tmp_path, "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(fidelity.FidelityModelError, match="only pickle weights .pytorch_model.bin."):
        fidelity.load_fidelity_models(pickled, folders["clip"])
    no_processor = _copy(folders["clip"], tmp_path, "no_processor")
    (no_processor / "preprocessor_config.json").unlink()
    with pytest.raises(fidelity.FidelityModelError, match="no preprocessor_config.json"):
        fidelity.check_model_folder(no_processor, "clip")
    no_tokenizer = _copy(folders["clip"], tmp_path, "no_tokenizer")
    (no_tokenizer / "vocab.json").unlink()
    with pytest.raises(fidelity.FidelityModelError, match="no tokenizer"):
        fidelity.check_model_folder(no_tokenizer, "clip")
    broken = _copy(folders["dino"], tmp_path, "broken")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(fidelity.FidelityModelError, match="not readable JSON"):
        fidelity.check_model_folder(broken, "dino")
    # weights of another model under a matching config: named, not a traceback
    wrong = _copy(folders["dino"], tmp_path, "wrong")
    config = json.loads((wrong / "config.json").read_text())
    config["hidden_size"] = 48
    config["intermediate_size"] = 96
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(fidelity.FidelityModelError, match="wrong.* (do not match its config.json|does not load)"):
        fidelity.load_fidelity_models(wrong, folders["clip"])


def test_images_that_are_not_images_are_refused(models):
    with pytest.raises(ValueError, match="NaN or infinite"):
        fidelity.score(models, torch.full((1, 32, 32, 3), float("nan")), _images(1, 32, 32, 0), "a dog")
    with pytest.raises(ValueError, match="IMAGE batch"):
        fidelity.score(models, torch.rand(32, 32), _images(1, 32, 32, 0), "a dog")
