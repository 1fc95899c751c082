"""DreamBooth engine on tiny SD1.5 models: export, what training changes, class images generated
once, prior preservation, reuse, input checks before loading, divergence, optimizers, CLI, LoRA
with prior preservation and diffusers' single-file loader."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import trainers.data.class_images
import trainers.sd15.checkpoint
from tests.support.paths import repo_root, tokenizer_dir
from tests.test_trainers_lora import PROMPT, Recorder, make_subject, run_cli, write_photos
from trainers.data.class_images import MANIFEST
from trainers.data.images import SubjectImageError
from trainers.jobs import train_file
from trainers.sd15 import placeholder
from trainers.sd15.checkpoint import CheckpointError, describe_checkpoint, load_sd15_single_file
from trainers.training import loop
from trainers.training.callbacks import LossHistory, NonFiniteLossError
from trainers.training.config import ConfigError, DreamBoothTrainConfig, LoRATrainConfig
from trainers.training.dreambooth import DreamBoothResult, save_dreambooth, train_dreambooth
from trainers.training.record import history_from_metadata

pytestmark = [pytest.mark.trainers, pytest.mark.usefixtures("one_thread")]

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
# A few steps with 2 class images of 2 sampling steps: about a second per job on the tiny models.
QUICK = {"steps": 2, "unet_lr": 1e-4, "class_images": 0}
PRIOR = {"steps": 2, "unet_lr": 1e-4, "class_images": 2, "class_steps": 2}


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_tensors(base_file) -> dict[str, torch.Tensor]:
    return load_file(str(base_file))


@pytest.fixture(scope="module")
def tiny():
    return placeholder.tiny_sd15(seed=0, tokenizer_dir=tokenizer_dir())


@pytest.fixture(scope="module")
def subject():
    return make_subject()


def fresh(tiny):
    """A copy whose UNet and text encoder may be trained (DreamBooth trains in place)."""
    return dataclasses.replace(tiny, unet=copy.deepcopy(tiny.unet), text_encoder=copy.deepcopy(tiny.text_encoder))


class Cancelled(BaseException):
    """Like ComfyUI's InterruptProcessingException on newest ComfyUI: not an Exception."""


class Counter(Recorder):
    """Records training steps (Recorder) and class-image generation steps; can cancel generation."""

    def __init__(self, cancel_generation_at: int | None = None) -> None:
        super().__init__()
        self.generated: list[tuple[int, int]] = []
        self.cancel_generation_at = cancel_generation_at

    def on_generate_step(self, done: int, total: int) -> None:
        self.generated.append((done, total))
        if done == self.cancel_generation_at:
            raise Cancelled("user pressed cancel")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.flatten().view(torch.uint8),
                                                                      b.flatten().view(torch.uint8))


def part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert set(a) == set(b)
    return [k for k in a if not same_bits(a[k], b[k])]


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return dict(handle.metadata() or {})



def dreambooth_job(base_file, out_dir: Path, name: str = "db.safetensors", subject=None, callbacks=None,
                   cache: Path | None = None, **config):
    return train_file(
        base_file, subject or make_subject(), DreamBoothTrainConfig(**config), out_dir / name, tokenizer_dir(),
        callbacks=callbacks, class_cache_dir=cache,
    )  # fmt: skip


def class_sets(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir()) if cache.exists() else []


# ---------------------------------------------------------------------------------------------
# Export: loading a checkpoint and saving it untrained changes nothing
# ---------------------------------------------------------------------------------------------


def test_untrained_export_through_save_dreambooth_is_bit_identical(base_file, base_tensors, tmp_path):
    base = load_sd15_single_file(base_file, tokenizer_dir())
    untrained = DreamBoothResult(history=LossHistory(), metadata={"dbs.kind": "dreambooth"})
    path = save_dreambooth(base, untrained, tmp_path / "export.safetensors", "fp16")
    exported = load_file(str(path))
    assert set(exported) == set(base_tensors)
    assert not changed(exported, base_tensors)
    assert all(k.startswith((UNET, VAE, TEXT)) for k in exported)
    assert metadata_of(path)["dbs.save_precision"] == "fp16"
    assert describe_checkpoint(path).size == "tiny"


def test_weights_that_overflow_fp16_are_refused_and_nothing_is_written(tiny, tmp_path):
    base = fresh(tiny)
    with torch.no_grad():
        base.unet.conv_in.weight[0, 0, 0, 0] = 1e6  # fine in fp32, inf in fp16
    result = DreamBoothResult(history=LossHistory([1.0], [1.0]), metadata={})
    with pytest.raises(ValueError, match=r"unet\.conv_in\.weight is not finite in fp16; save in fp32"):
        save_dreambooth(base, result, tmp_path / "big.safetensors", "fp16")
    assert list(tmp_path.iterdir()) == []
    path = save_dreambooth(base, result, tmp_path / "big.safetensors", "fp32")
    assert float(load_file(str(path))["model.diffusion_model.input_blocks.0.0.weight"].flatten()[0]) == 1e6


# ---------------------------------------------------------------------------------------------
# What training changes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text_encoder_lr", [0.0, 1e-4], ids=["frozen-text-encoder", "trained-text-encoder"])
def test_training_changes_the_unet_never_the_vae_and_the_text_encoder_only_when_asked(
    base_file, base_tensors, tmp_path, text_encoder_lr
):
    job = dreambooth_job(base_file, tmp_path, steps=3, unet_lr=1e-4, text_encoder_lr=text_encoder_lr, class_images=0)
    assert job.path == tmp_path / "db.safetensors" and not job.reused
    assert len(job.losses) == 3 and all(math.isfinite(v) for v in job.losses)
    trained = load_file(str(job.path))
    assert set(trained) == set(base_tensors)
    assert {t.dtype for t in trained.values()} == {torch.float16}

    # Every UNet tensor moved (even through the fp16 rounding), no VAE tensor did.
    unet_kept = set(part(base_tensors, UNET)) - set(changed(part(trained, UNET), part(base_tensors, UNET)))
    assert unet_kept == set(), sorted(unet_kept)[:5]
    assert changed(part(trained, VAE), part(base_tensors, VAE)) == []
    text_changed = changed(part(trained, TEXT), part(base_tensors, TEXT))
    if text_encoder_lr:
        assert len(text_changed) == len(part(base_tensors, TEXT)) > 0
    else:
        assert text_changed == []
    metadata = metadata_of(job.path)
    assert metadata["dbs.trained"] == ("unet+text_encoder" if text_encoder_lr else "unet")
    assert metadata["dbs.kind"] == "dreambooth" and metadata["ss_base_model_version"] == "sd_v1"
    assert DreamBoothTrainConfig.from_dict(json.loads(metadata["dbs.config"])) == DreamBoothTrainConfig(
        steps=3, unet_lr=1e-4, text_encoder_lr=text_encoder_lr, class_images=0)
    assert history_from_metadata(metadata).losses == pytest.approx(job.losses, rel=1e-4)
    assert describe_checkpoint(job.path).size == "tiny"  # loads as an SD1.5 checkpoint again


# ---------------------------------------------------------------------------------------------
# Class images: generated once per (base, prompt, count, resolution, seed, ...), then reused
# ---------------------------------------------------------------------------------------------


def test_class_images_are_generated_once_and_reused_across_runs(base_file, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    first = Counter()
    job = dreambooth_job(base_file, out, "a.safetensors", callbacks=first, cache=cache, **PRIOR)
    assert first.generated and first.generated[-1] == (2, 2)  # one batch of 2 images x 2 sampling steps
    [folder] = class_sets(cache)
    assert sorted(p.name for p in folder.iterdir()) == ["class_00000.png", "class_00001.png", MANIFEST]
    assert list(cache.iterdir()) == [folder]  # no partial folder left
    manifest = json.loads((folder / MANIFEST).read_text())
    assert (manifest["prompt"], manifest["count"], manifest["resolution"]) == ("a photo of toy", 2, 64)
    assert "generated now" in job.class_report and job.prior.generated == 2
    assert len(job.prior_losses) == 2
    images = {p.name: p.read_bytes() for p in folder.iterdir()}

    # Another run of a sweep (other lr, other output name), same base, prompt, count, size, seed.
    second = Counter()
    job = dreambooth_job(base_file, out, "b.safetensors", callbacks=second, cache=cache, **{**PRIOR, "unet_lr": 2e-4})
    assert second.generated == []
    assert len(second.states) == 2  # it did train
    assert "reused from the cache" in job.class_report and job.prior.generated == 0
    assert class_sets(cache) == [folder] and {p.name: p.read_bytes() for p in folder.iterdir()} == images
    assert json.loads(metadata_of(out / "b.safetensors")["dbs.prior"])["folder"] == folder.name

    # Another class seed or count is another set.
    reseeded = Counter()
    dreambooth_job(base_file, out, "c.safetensors", callbacks=reseeded, cache=cache, **{**PRIOR, "class_seed": 1})
    assert reseeded.generated
    assert len(class_sets(cache)) == 2
    [other] = [p for p in class_sets(cache) if p != folder]
    assert (other / "class_00000.png").read_bytes() != images["class_00000.png"]
    more = Counter()
    dreambooth_job(base_file, out, "d.safetensors", callbacks=more, cache=cache, **{**PRIOR, "class_images": 3})
    assert more.generated
    assert len(class_sets(cache)) == 3
    assert sorted(p.name for p in out.iterdir()) == ["a.safetensors", "b.safetensors", "c.safetensors",
                                                     "d.safetensors"]


def test_cancel_during_class_generation_leaves_no_set_and_no_checkpoint(base_file, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    cancel = Counter(cancel_generation_at=1)
    with pytest.raises(Cancelled):
        dreambooth_job(base_file, out, callbacks=cancel, cache=cache, **PRIOR)
    assert cancel.generated == [(1, 2)] and cancel.states == []
    assert not cache.exists() or list(cache.iterdir()) == []  # neither a set nor a partial folder
    assert list(out.iterdir()) == []
    # The next run generates the whole set: the cancelled one left nothing that looks complete.
    again = Counter()
    dreambooth_job(base_file, out, callbacks=again, cache=cache, **PRIOR)
    assert again.generated[-1] == (2, 2)
    [folder] = class_sets(cache)
    assert len(list(folder.glob("*.png"))) == 2 and (folder / MANIFEST).is_file()


# ---------------------------------------------------------------------------------------------
# Prior preservation
# ---------------------------------------------------------------------------------------------


def test_prior_loss_weight_zero_trains_exactly_like_no_class_images(base_file, tmp_path, monkeypatch):
    monkeypatch.setattr(trainers.data.class_images, "generate_class_images", lambda *a, **k: pytest.fail("generated class images"))
    cache = tmp_path / "cache"
    weightless, plain = Counter(), Counter()
    a = dreambooth_job(base_file, tmp_path, "zero.safetensors", callbacks=weightless, cache=cache,
                       **{**PRIOR, "prior_loss_weight": 0.0})
    b = dreambooth_job(base_file, tmp_path, "none.safetensors", callbacks=plain, cache=cache, **QUICK)
    assert weightless.generated == [] and not cache.exists()
    assert len(weightless.states) == len(plain.states) == 2
    assert a.prior_losses == [] and a.losses == b.losses
    zero, none = load_file(str(a.path)), load_file(str(b.path))
    assert changed(zero, none) == []
    assert metadata_of(a.path)["ss_num_reg_images"] == "0" and metadata_of(a.path)["dbs.prior"] == ""


def test_prior_loss_is_reported_separately_and_added_with_its_weight(base_file, tmp_path):
    classes = write_photos(tmp_path / "class_photos", 2, start=4)  # the user's own class images
    recorder = Counter()
    job = train_file(
        base_file, make_subject(), DreamBoothTrainConfig(steps=3, unet_lr=1e-4, class_images=2, prior_loss_weight=0.5),
        tmp_path / "prior.safetensors", tokenizer_dir(), callbacks=recorder, class_folder=classes,
    )  # fmt: skip
    assert recorder.generated == []
    assert len(job.prior_losses) == len(job.instance_losses) == len(job.losses) == 3
    for total, instance, prior in zip(job.losses, job.instance_losses, job.prior_losses, strict=True):
        assert total == pytest.approx(instance + 0.5 * prior, rel=1e-5)
        assert prior > 0 and instance > 0
    assert [s.prior_loss for s in recorder.states] == job.prior_losses
    assert job.extra_curves() == {"instance": job.instance_losses, "prior": job.prior_losses}
    metadata = metadata_of(job.path)
    assert metadata["ss_num_reg_images"] == "2" and metadata["ss_prior_loss_weight"] == "0.5"
    assert json.loads(metadata["dbs.prior"]) == {"source": "folder", "folder": "class_photos", "count": "2"}
    curves = history_from_metadata(metadata)
    assert curves.prior_losses == pytest.approx(job.prior_losses, rel=1e-4)
    assert curves.instance_losses == pytest.approx(job.instance_losses, rel=1e-4)
    assert "2 class images from folder class_photos" in job.class_report


# ---------------------------------------------------------------------------------------------
# Reuse and overwrite
# ---------------------------------------------------------------------------------------------


def test_identical_job_reuses_the_file_and_a_different_one_refuses_to_overwrite(base_file, tmp_path, monkeypatch):
    first = dreambooth_job(base_file, tmp_path, **QUICK)
    content, stamp = first.path.read_bytes(), first.path.stat().st_mtime_ns

    with monkeypatch.context() as patched:
        patched.setattr(trainers.sd15.checkpoint, "load_sd15_single_file", lambda *a, **k: pytest.fail("loaded the base"))
        recorder = Counter()
        again = dreambooth_job(base_file, tmp_path, callbacks=recorder, **QUICK)
        assert again.reused and again.path == first.path
        assert recorder.states == [] and recorder.begin == [] and recorder.generated == []
        assert again.losses == pytest.approx(first.losses, rel=1e-4) and len(again.losses) == 2

        with pytest.raises(FileExistsError, match=r"db\.safetensors already exists .* trained differently"):
            dreambooth_job(base_file, tmp_path, **{**QUICK, "unet_lr": 3e-4})
    assert first.path.read_bytes() == content and first.path.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db.safetensors"]

    replaced = train_file(base_file, make_subject(), DreamBoothTrainConfig(**{**QUICK, "unet_lr": 3e-4}),
                                     first.path, tokenizer_dir(), overwrite=True)
    assert not replaced.reused and first.path.read_bytes() != content
    assert json.loads(metadata_of(first.path)["dbs.config"])["unet_lr"] == 3e-4


def test_same_seed_gives_a_byte_identical_checkpoint(base_file, tmp_path):
    for name in "abc":
        (tmp_path / name).mkdir()
    first = dreambooth_job(base_file, tmp_path / "a", **{**QUICK, "text_encoder_lr": 1e-5})
    second = dreambooth_job(base_file, tmp_path / "b", **{**QUICK, "text_encoder_lr": 1e-5})
    assert first.path.read_bytes() == second.path.read_bytes()  # metadata included: no timing in it
    other = dreambooth_job(base_file, tmp_path / "c", **{**QUICK, "text_encoder_lr": 1e-5, "seed": 1})
    assert changed(load_file(str(first.path)), load_file(str(other.path)))


def diffusers_folder_of(base_file: Path, folder: Path) -> Path:
    """The base checkpoint as a diffusers folder (fp32 safetensors, its own tokenizer)."""
    base = load_sd15_single_file(base_file, tokenizer_dir())
    for name in ("unet", "vae", "text_encoder"):
        getattr(base, name).save_pretrained(folder / name, safe_serialization=True)
    base.tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


@pytest.mark.parametrize("method", ["lora", "dreambooth"])
def test_a_diffusers_folder_trains_like_its_single_file_and_is_reused(base_file, tmp_path, monkeypatch, method):
    folder = diffusers_folder_of(base_file, tmp_path / "sd15-diffusers")
    config = (LoRATrainConfig(steps=2, rank=4, unet_lr=1e-3) if method == "lora"
              else DreamBoothTrainConfig(**QUICK))
    from_file = train_file(base_file, make_subject(), config, tmp_path / "from_file.safetensors", tokenizer_dir())
    from_folder = train_file(folder, make_subject(), config, tmp_path / "from_folder.safetensors", None)
    # Same weights, same training; only kernel rounding may differ (the folder's weights are laid
    # out contiguously, the single file's converted ones are not always).
    a, b = load_file(str(from_file.path)), load_file(str(from_folder.path))
    assert set(a) == set(b) and all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-2, atol=1e-4) for k in a)
    assert from_folder.losses == pytest.approx(from_file.losses, rel=1e-4)
    metadata = metadata_of(from_folder.path)
    assert metadata["dbs.base_model"] == "sd15-diffusers" and len(metadata["dbs.base_fingerprint"]) == 64
    monkeypatch.setattr(trainers.sd15.checkpoint, "load_sd15_diffusers_folder",
                        lambda *a, **k: pytest.fail("loaded the base"))
    again = train_file(folder, make_subject(), config, tmp_path / "from_folder.safetensors", None)
    assert again.reused and again.losses == pytest.approx(from_folder.losses, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Bad input: refused before any model loads, nothing written
# ---------------------------------------------------------------------------------------------


def _broken_class_folder(tmp_path: Path) -> Path:
    folder = write_photos(tmp_path / "classes", 2)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


BAD_INPUTS = {
    "not-a-checkpoint": (lambda tmp: {"checkpoint": (tmp / "notes.safetensors", "just some notes\n" * 10)},
                         CheckpointError, r"notes\.safetensors is not a safetensors file"),
    "empty-class-prompt": (lambda tmp: {"subject": dataclasses.replace(make_subject(), class_prompt=" "),
                                        "config": PRIOR},
                           ValueError, "prior preservation needs a class prompt"),
    "missing-class-folder": (lambda tmp: {"config": PRIOR, "class_folder": tmp / "nowhere"},
                             FileNotFoundError, "class image folder .*nowhere not found"),
    "broken-class-image": (lambda tmp: {"config": PRIOR, "class_folder": _broken_class_folder(tmp)},
                           SubjectImageError, r"broken\.png"),
    "wrong-suffix": (lambda tmp: {"output": "db.ckpt"}, ValueError, r"must end in \.safetensors, got db\.ckpt"),
    "missing-output-folder": (lambda tmp: {"output": "sub/db.safetensors"}, FileNotFoundError,
                              "output folder .*sub does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_before_the_model_loads(base_file, tmp_path, monkeypatch, case):
    monkeypatch.setattr(trainers.sd15.checkpoint, "load_sd15_single_file", lambda *a, **k: pytest.fail("loaded the base"))
    monkeypatch.setattr(trainers.data.class_images, "generate_class_images", lambda *a, **k: pytest.fail("generated images"))
    build, error, message = BAD_INPUTS[case]
    inputs = build(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    checkpoint = base_file
    if "checkpoint" in inputs:
        checkpoint, text = inputs["checkpoint"]
        checkpoint.write_text(text)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(error, match=message):
        train_file(
            checkpoint, inputs.get("subject", make_subject()), DreamBoothTrainConfig(**inputs.get("config", QUICK)),
            out / inputs.get("output", "db.safetensors"), tokenizer_dir(), class_cache_dir=tmp_path / "cache",
            class_folder=inputs.get("class_folder"), before_load=lambda: pytest.fail("got as far as loading"),
        )  # fmt: skip
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, no cache folder made


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"unet_lr": float("nan")}, "unet_lr must be a finite number > 0 and <= 1.0 (got nan)"),
        ({"text_encoder_lr": -1e-6}, "text_encoder_lr must be 0 (frozen text encoder) or a finite number > 0"),
        ({"optimizer": "sgd"}, "optimizer must be one of 'adamw', 'adafactor', 'adamw8bit', 'prodigy' (got 'sgd')"),
        ({"class_images": -1}, "class_images must be 0 (prior preservation off) or a whole number >= 1"),
        ({"prior_loss_weight": float("inf")}, "prior_loss_weight must be a finite number >= 0"),
        ({"save_precision": "fp8"}, "save_precision must be one of 'fp16', 'bf16', 'fp32' (got 'fp8')"),
    ],
)
def test_config_refuses_bad_values_naming_the_field(values, fragment):
    with pytest.raises(ConfigError) as caught:
        DreamBoothTrainConfig(**values)
    assert fragment in str(caught.value)


# ---------------------------------------------------------------------------------------------
# Divergence
# ---------------------------------------------------------------------------------------------


def test_non_finite_loss_stops_training_and_writes_nothing(base_file, tmp_path, monkeypatch):
    real, calls = loop.per_sample_mse, []

    def poisoned(prediction, target):
        calls.append(1)
        out = real(prediction, target)
        return out * float("nan") if len(calls) == 2 else out

    monkeypatch.setattr(loop, "per_sample_mse", poisoned)
    recorder = Counter()
    with pytest.raises(NonFiniteLossError, match=r"loss became NaN or infinite at step 2 .*Nothing was saved\. "
                                                 r"Lower the learning rate") as caught:
        dreambooth_job(base_file, tmp_path, callbacks=recorder, **{**QUICK, "steps": 5})
    assert caught.value.step == 2 and [s.step for s in recorder.states] == [1]
    assert list(tmp_path.iterdir()) == []


def test_huge_learning_rate_diverges_with_a_clear_error(base_file, tmp_path):
    config = {"steps": 30, "unet_lr": 1.0, "max_grad_norm": 0.0, "class_images": 0}
    with pytest.raises(NonFiniteLossError, match="became NaN or infinite at step .*Lower the learning rate"):
        dreambooth_job(base_file, tmp_path, **config)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Optimizers and gradient checkpointing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_both_optimizers_lower_the_loss_on_the_subject(tiny, subject, optimizer):
    """Loss over fixed timesteps and noise on the subject's images, before vs after training."""
    base = fresh(tiny)
    prepared = loop.prepare_training_set(
        subject.pixels(), subject.captions, vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
        flip=False, cache_latents=True, cache_text=True,
    )  # fmt: skip
    latents, conditioning = prepared.latent_mean[0], prepared.embeddings[prepared.caption_index]
    timesteps = [50, 150, 300, 500, 700, 900]
    before = loop.fixed_noise_loss(base.unet, latents, conditioning, base.noise_scheduler, timesteps, seed=1)
    result = train_dreambooth(base, subject, DreamBoothTrainConfig(
        steps=20, unet_lr=3e-4, optimizer=optimizer, batch_size=2, class_images=0))
    after = loop.fixed_noise_loss(base.unet, latents, conditioning, base.noise_scheduler, timesteps, seed=1)
    assert after < 0.8 * before, (before, after)
    assert result.metadata["ss_optimizer"] == optimizer and result.trained == ("unet",)
    assert all(not p.requires_grad for p in base.unet.parameters()) and not base.unet.training


def test_gradient_checkpointing_trains_the_same_weights(tiny, subject):
    seen = []

    class Watch(Recorder):
        def on_step_end(self, state):
            seen.append(model.unet.is_gradient_checkpointing)

    runs = []
    for checkpointing in (False, True):
        model = fresh(tiny)
        config = DreamBoothTrainConfig(steps=3, unet_lr=1e-4, text_encoder_lr=1e-4, class_images=0,
                                       gradient_checkpointing=checkpointing)
        runs.append((train_dreambooth(model, subject, config, callbacks=Watch()), model))
        assert not model.unet.is_gradient_checkpointing  # switched off again afterwards
    assert seen == [False] * 3 + [True] * 3
    (plain, plain_model), (checkpointed, checkpointed_model) = runs
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)
    for name in ("unet", "text_encoder"):
        a, b = getattr(plain_model, name).state_dict(), getattr(checkpointed_model, name).state_dict()
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name
    untouched = tiny.unet.state_dict()
    assert any(not torch.equal(untouched[k], v) for k, v in plain_model.unet.state_dict().items())


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def test_cli_help_lists_the_config_options(capsys):
    from trainers.cli import main as trainers_main

    with pytest.raises(SystemExit) as caught:
        trainers_main(["dreambooth", "--help"])  # what `python -m trainers dreambooth --help` runs
    assert caught.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert help_text.startswith("usage: python -m trainers dreambooth")
    for option in ("--unet-lr", "--text-encoder-lr", "--optimizer {adamw,adafactor,adamw8bit,prodigy}", "--fused-backward",
                   "--weight-precision {fp32,bf16}", "--precision {auto,fp32,bf16,fp16}", "--class-images",
                   "--prior-loss-weight", "--class-seed", "--class-steps", "--save-precision",
                   "--gradient-checkpointing", "--class-folder", "--class-cache", "--tokenizer"):
        assert option in help_text, option
    assert "Allowed: 0 (prior preservation off) or a whole number >= 1 and <= 1000" in help_text


@pytest.mark.parametrize("command", ["dreambooth", "lora"])
def test_cli_refuses_bad_prior_input_before_loading_the_model(base_file, tmp_path, monkeypatch, capsys, command):
    """No class prompt with prior preservation on, then a text file as the checkpoint: an error
    message and exit status 2, without loading the base model or writing anything."""
    from trainers.cli import main as trainers_main

    monkeypatch.setattr(trainers.sd15.checkpoint, "load_sd15_single_file", lambda *a, **k: pytest.fail("loaded the base"))
    photos = write_photos(tmp_path / "photos", 3)
    def main(argv: list[str]) -> int:
        return trainers_main([command, *argv])

    def run(checkpoint: Path, *extra: str) -> tuple[int, str]:
        argv = ["--checkpoint", str(checkpoint), "--images", str(photos), "--instance-prompt", PROMPT,
                "--output", str(tmp_path / "out.safetensors"), "--tokenizer", str(tokenizer_dir()),
                "--resolution", "64", "--class-cache", str(tmp_path / "cache"), *extra]
        try:
            status = main(argv)
        except SystemExit as exit_:  # argparse's parser.error
            status = exit_.code
        return status, capsys.readouterr().err

    status, err = run(base_file, "--class-images", "2")
    assert status == 2 and "needs a class prompt" in err
    notes = tmp_path / "notes.safetensors"
    notes.write_text("not a model\n" * 10)
    status, err = run(notes, "--class-images", "0")
    assert status == 2 and "notes.safetensors is not a safetensors file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.safetensors", "photos"]


def test_python_m_trainers_lists_dreambooth():
    done = subprocess.run([sys.executable, "-m", "trainers"], cwd=repo_root(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "dreambooth" in done.stdout and "checkpoint" in done.stdout


def test_cli_trains_and_saves_a_checkpoint(base_file, tmp_path, capsys):
    photos = write_photos(tmp_path / "photos", 3, size=96)
    output = tmp_path / "sks toy.safetensors"
    command = [
        sys.executable, "-m", "trainers", "dreambooth", "--checkpoint", str(base_file), "--images", str(photos),
        "--instance-prompt", PROMPT, "--output", str(output), "--tokenizer", str(tokenizer_dir()),
        "--resolution", "64", "--steps", "2", "--class-images", "0", "--unet-lr", "1e-4",
        "--class-cache", str(tmp_path / "cache"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_thread()
    done = subprocess.run(command, cwd=repo_root(), capture_output=True, timeout=300, env=env)
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr[-3000:]
    assert "] 2/2 loss" in stderr
    stdout = done.stdout.decode()
    assert f"saved {output};" in stdout and "prior preservation off" in stdout
    assert describe_checkpoint(output).size == "tiny"
    metadata = metadata_of(output)
    # photo names and captions stay private unless --record-sources asks for them
    assert json.loads(metadata["dbs.source_names"]) == {"count": 3, "recorded": False}
    assert "img0" not in json.dumps(metadata)
    assert json.loads(metadata["dbs.config"])["steps"] == 2
    assert not (tmp_path / "cache").exists()
    # The identical command reuses the checkpoint instead of training again.
    content = output.read_bytes()
    code, out, err = run_cli(command[3:], capsys)  # in this process: it trains nothing
    assert code == 0 and f"reused (identical earlier run) {output};" in out
    assert "] 1/2 loss" not in err and output.read_bytes() == content


# ---------------------------------------------------------------------------------------------
# LoRA with prior preservation
# ---------------------------------------------------------------------------------------------


def test_lora_with_prior_preservation_records_class_images_and_shares_them(base_file, tmp_path):
    cache = tmp_path / "cache"
    recorder = Counter()
    config = LoRATrainConfig(steps=3, rank=4, unet_lr=1e-3, class_images=2, class_steps=2)
    job = train_file(base_file, make_subject(), config, tmp_path / "lora.safetensors", tokenizer_dir(),
                          callbacks=recorder, class_cache_dir=cache)
    assert recorder.generated and len(class_sets(cache)) == 1
    metadata = metadata_of(job.path)
    assert metadata["ss_num_reg_images"] == "2"
    assert len(json.loads(metadata["dbs.prior_losses"])) == 3 and len(job.prior_losses) == 3
    assert json.loads(metadata["dbs.prior"])["source"] == "generated"
    for total, instance, prior in zip(job.losses, job.instance_losses, job.prior_losses, strict=True):
        assert total == pytest.approx(instance + prior, rel=1e-5)
    # The same class images (same base, prompt, count, size, seed) serve a DreamBooth run too.
    shared = Counter()
    dreambooth_job(base_file, tmp_path, callbacks=shared, cache=cache, **PRIOR)
    assert shared.generated == [] and len(class_sets(cache)) == 1


# ---------------------------------------------------------------------------------------------
# diffusers reads the checkpoint offline
# ---------------------------------------------------------------------------------------------


def _diffusers_config_folder(tiny, folder: Path) -> Path:
    """A diffusers pipeline layout with configs and tokenizer only (no weights), from the models' configs."""
    tiny.unet.save_config(folder / "unet")
    tiny.vae.save_config(folder / "vae")
    tiny.text_encoder.config.save_pretrained(folder / "text_encoder")
    tiny.tokenizer.save_pretrained(folder / "tokenizer")
    tiny.noise_scheduler.save_config(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }))  # fmt: skip
    return folder


def test_diffusers_from_single_file_loads_the_trained_checkpoint_offline(tiny, subject, tmp_path):
    from diffusers import StableDiffusionPipeline

    model = fresh(tiny)
    result = train_dreambooth(model, subject, DreamBoothTrainConfig(steps=2, unet_lr=1e-3, text_encoder_lr=1e-4,
                                                                    class_images=0))
    path = save_dreambooth(model, result, tmp_path / "trained.safetensors")
    config = _diffusers_config_folder(tiny, tmp_path / "sd15-config")
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(model, name).state_dict(), getattr(pipe, name).state_dict()
        assert set(theirs) == set(ours), name
        mismatched = [k for k in ours if not torch.equal(theirs[k].half(), ours[k].half())]
        assert mismatched == [], (name, mismatched[:5])
    original = tiny.unet.state_dict()
    assert any(not torch.equal(original[k].half(), v.half()) for k, v in pipe.unet.state_dict().items())
    ids = tiny.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        context = pipe.text_encoder(ids)[0]
        theirs = pipe.unet(latents, 500, encoder_hidden_states=context).sample
        ours = model.unet.half().float()(latents, 500, encoder_hidden_states=model.text_encoder.half().float()(ids)[0]).sample
    assert torch.allclose(theirs, ours, atol=1e-4)
