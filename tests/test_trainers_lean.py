"""Lean runs (tiny models): checkpoints stream into the models in each part's dtype, and the frozen
VAE and text encoder leave memory once their outputs are cached, coming back only to decode a
sample or to be written into a checkpoint."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.paths import tokenizer_dir
from tests.test_trainers_lora import make_subject
from trainers import jobs
from trainers.jobs import train_file
from trainers.sd15 import checkpoint
from trainers.sd15.checkpoint import CheckpointError, load_sd15, stream_tensors
from trainers.training import memory
from trainers.training.callbacks import TrainingCallbacks
from trainers.training.config import ConfigError, DreamBoothTrainConfig, LoRATrainConfig
from trainers.training.residency import Residency, parameters_freed
from trainers.training.watch import WatchConfig

pytestmark = [pytest.mark.trainers, pytest.mark.usefixtures("one_thread")]


# ---------------------------------------------------------------------------------------------
# Streaming loads
# ---------------------------------------------------------------------------------------------


def test_streamed_tensors_are_the_files_tensors_and_a_cut_file_names_the_tensor(base_file, tmp_path):
    expected = load_file(str(base_file))
    streamed = dict(stream_tensors(base_file))
    assert streamed.keys() == expected.keys()
    assert all(torch.equal(streamed[key], expected[key]) and streamed[key].dtype == expected[key].dtype
               for key in expected)
    as_bf16 = dict(stream_tensors(base_file, list(expected)[:3], torch.bfloat16))
    assert {t.dtype for t in as_bf16.values() if t.is_floating_point()} == {torch.bfloat16}

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(base_file.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        list(stream_tensors(cut))


def test_each_part_loads_in_its_own_dtype_with_the_files_values(base_file):
    dtypes = {"unet": torch.bfloat16, "vae": torch.float32, "text_encoder": torch.float16}
    mixed = load_sd15(base_file, tokenizer_dir(), dtypes)
    plain = load_sd15(base_file, tokenizer_dir())
    for name, dtype in dtypes.items():
        ours, reference = getattr(mixed, name).state_dict(), getattr(plain, name).state_dict()
        assert {t.dtype for t in ours.values() if t.is_floating_point()} == {dtype}
        assert all(torch.equal(ours[key].float(), reference[key].to(dtype).float()) for key in reference)
    with pytest.raises(ValueError, match="unknown model part"):
        load_sd15(base_file, tokenizer_dir(), {"unet": torch.float32, "clip": torch.float32})


# ---------------------------------------------------------------------------------------------
# What stays resident while training
# ---------------------------------------------------------------------------------------------


class Resident(TrainingCallbacks):
    """Records, at every step and every sample round, whether the VAE / text encoder hold memory."""

    def __init__(self, base_box: list) -> None:
        self.base_box = base_box
        self.steps: list[tuple[bool, bool]] = []

    def on_step_end(self, state) -> None:
        base = self.base_box[0]
        self.steps.append((parameters_freed(base.vae), parameters_freed(base.text_encoder)))


@pytest.fixture
def loaded(monkeypatch) -> list:
    """The job's base models, caught as train_file loads them."""
    box: list = []
    original = checkpoint.load_sd15

    def catching(*args, **kwargs):
        box.append(original(*args, **kwargs))
        box[-1].extra["unet_loaded_with_the_others"] = not parameters_freed(box[-1].unet)
        return box[-1]

    monkeypatch.setattr(jobs.checkpoint, "load_sd15", catching)
    return box


def test_a_checkpoint_run_frees_vae_and_text_encoder_while_training_and_writes_them_intact(base_file, tmp_path,
                                                                                           loaded):
    # bf16: the VAE and text encoder train in bf16, yet the file gets the base model's own values
    config = DreamBoothTrainConfig(steps=4, unet_lr=1e-4, class_images=0, precision="bf16")
    callbacks = Resident(loaded)
    watch = WatchConfig(sample_every=2, validate_every=2, sample_steps=2)
    result = train_file(base_file, make_subject(count=3), config, tmp_path / "db.safetensors", tokenizer_dir(),
                        callbacks=callbacks, watch=watch, sample_dir=tmp_path / "samples", device="cpu")
    # the UNet is read only after the VAE and text encoder cached and left: never all three at once
    assert loaded[0].extra["unet_loaded_with_the_others"] is False
    # gone from memory at every step, also after each sample round brought the VAE back to decode
    assert callbacks.steps == [(True, True)] * 4
    assert [r.step for r in result.samples] == [0, 2, 4]
    assert all(image.getextrema() != ((0, 0), (0, 0), (0, 0)) for r in result.samples for image in r.images)
    assert len(result.history.validation) == 3
    # the written checkpoint holds the base file's VAE and text encoder exactly, and a trained UNet
    written, base = load_file(str(result.path)), load_file(str(base_file))
    frozen = [key for key in base if key.startswith(("first_stage_model.", "cond_stage_model."))
              and key in written]
    assert len(frozen) > 50 and all(torch.equal(written[key], base[key]) for key in frozen)
    unet = [key for key in base if key.startswith("model.diffusion_model.") and key.endswith(".weight")]
    assert any(not torch.equal(written[key], base[key]) for key in unet)


@pytest.mark.parametrize(("config", "stays"), [
    (LoRATrainConfig(steps=2, rank=2, text_encoder_lr=1e-4), (True, False)),  # the text encoder trains
    (LoRATrainConfig(steps=2, rank=2, cache_latents=False), (False, True)),  # the VAE encodes every step
], ids=["trained-text-encoder", "latents-not-cached"])
def test_a_part_still_needed_stays(base_file, tmp_path, loaded, config, stays):
    callbacks = Resident(loaded)
    train_file(base_file, make_subject(count=2), config, tmp_path / "l.safetensors", tokenizer_dir(),
               callbacks=callbacks)
    assert callbacks.steps == [stays] * 2


def test_a_released_part_comes_back_with_the_same_weights_and_without_a_file_it_stays(base_file):
    base = load_sd15(base_file, tokenizer_dir(), {"text_encoder": torch.bfloat16})
    for model in (base.unet, base.vae, base.text_encoder):
        model.requires_grad_(False)
    before = {key: tensor.clone() for key, tensor in base.text_encoder.state_dict().items()}
    residency = Residency(base)
    assert residency.release("text_encoder") and parameters_freed(base.text_encoder)
    with residency.borrowed("text_encoder") as text_encoder:
        assert not parameters_freed(text_encoder)
        after = text_encoder.state_dict()
        assert all(torch.equal(after[key], before[key]) for key in before)
    assert parameters_freed(base.text_encoder)
    residency.restore_all()
    assert all(torch.equal(base.text_encoder.state_dict()[key], before[key]) for key in before)

    built = checkpoint.SD15Components(unet=base.unet, vae=base.vae, text_encoder=base.text_encoder,
                                      tokenizer=None, noise_scheduler=None, source="")
    assert not Residency(built).release("vae") and not parameters_freed(base.vae)  # nothing to read it back from
    with pytest.raises(ValueError, match="only the VAE and the text encoder"):
        Residency(base).release("unet")
    base.vae.requires_grad_(True)
    with pytest.raises(RuntimeError, match="vae is being trained"):
        Residency(base).release("vae")


# ---------------------------------------------------------------------------------------------
# The memory plan
# ---------------------------------------------------------------------------------------------

GB = 1024**3
LEAN = {"optimizer": "adafactor", "fused_backward": True, "weight_precision": "bf16", "precision": "bf16",
        "gradient_checkpointing": True}


@pytest.fixture(scope="module")
def full_size() -> Path:
    from tests.support.models import ensure_test_models

    return ensure_test_models()["checkpoint"]  # only its header is read here


def test_the_plan_grows_with_what_a_run_keeps_and_the_leanest_full_fine_tune_fits_8_gb_at_512_px(full_size):
    def peak(config, resolution=512, device="cuda"):
        return memory.plan_memory(config, full_size, resolution, device).peak

    adamw = DreamBoothTrainConfig(class_images=0, precision="bf16")
    assert peak(adamw) > 12.8 * GB  # fp32 weights, gradients and two AdamW states: 16 bytes x 860M weights
    fused = replace(adamw, fused_backward=True)
    assert 2.2 * GB < peak(adamw) - peak(fused) < 3.3 * GB  # the UNet's fp32 gradients (3.2 GB) are never all held
    assert peak(replace(adamw, optimizer="adafactor")) < peak(adamw) - 3.5 * GB  # factored states
    assert peak(DreamBoothTrainConfig(class_images=0, **LEAN)) < 8 * GB
    lora = LoRATrainConfig(rank=4, precision="bf16")
    assert peak(lora) < 4.5 * GB and peak(replace(lora, precision="fp32")) > peak(lora) + 1.5 * GB  # a 6 GB card
    def train(config, resolution):
        return memory.plan_memory(config, full_size, resolution, "cuda").phases["train"]

    assert train(lora, 1024) > train(lora, 512) > train(lora, 256)
    assert train(replace(lora, gradient_checkpointing=True), 1024) < train(lora, 1024)
    with_prior = DreamBoothTrainConfig(class_images=10, precision="bf16")  # class images double the batch
    assert peak(with_prior) > peak(adamw)


def test_dora_adds_its_magnitudes_and_a_copy_of_each_adapted_input_to_the_plan_and_the_file(full_size):
    from trainers.jobs import estimated_file_bytes

    def parts(config) -> dict[str, int]:
        return dict(memory.plan_memory(config, full_size, 512, "cuda").parts)

    lora = LoRATrainConfig(rank=16, precision="bf16")
    dora = replace(lora, lora_type="dora")
    # one magnitude per input feature of SD1.5's 128 attention projections (6 x 320 + 2 x 768 in a
    # 320-wide block, and so on): 99,456, 398 KB in fp32
    magnitudes = 6 * (5 * 320 + 5 * 640 + 6 * 1280) + 16 * 2 * 768
    assert estimated_file_bytes(full_size, dora) - estimated_file_bytes(full_size, lora) == 2 * magnitudes  # fp16
    plain, more = parts(lora), parts(dora)
    assert more["LoRA weights"] - plain["LoRA weights"] == more["gradients"] - plain["gradients"] == 4 * magnitudes
    assert more["adamw states"] - plain["adamw states"] == 2 * 4 * magnitudes
    assert more["DoRA norm buffer"] == 4 * 1280 * 1280  # an fp32 copy of the widest bf16 weight
    # a bf16 copy of each adapted layer's scaled input: 16,920 per latent pixel (64 x 64 at 512 px) and
    # the text context of the cross-attention's to_k/to_v; 142 MB
    added = 2 * (16_920 * 64 * 64 + 32 * 77 * 768)
    assert more["activations"] - plain["activations"] == added
    conv = parts(replace(dora, conv_layers=True))["activations"] - parts(replace(lora, conv_layers=True))["activations"]
    assert conv == added + 2 * 9_460 * 64 * 64  # and of each adapted convolution's
    checkpointed = replace(dora, gradient_checkpointing=True)
    assert parts(checkpointed)["activations"] - parts(replace(lora, gradient_checkpointing=True))["activations"] == \
        int(0.2 * added)  # recomputed in the backward like the rest


def test_a_run_that_cannot_fit_is_refused_before_loading_with_settings_that_would(full_size, base_file, tmp_path,
                                                                                  monkeypatch):
    with pytest.raises(memory.MemoryPlanError) as refused:
        memory.check_memory(DreamBoothTrainConfig(class_images=0), full_size, 512, available=8 * GB)
    message = str(refused.value)
    assert "needs about" in message and "only 8.0 GB of RAM is free" in message
    assert "which fits" in message and "optimizer adafactor" in message and memory.SKIP_ENV in message

    def no_loading(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(jobs.checkpoint, "load_sd15", no_loading)
    output = tmp_path / "lora.safetensors"
    with pytest.raises(ConfigError, match="adamw8bit.*CUDA GPUs only"):  # what the device cannot run, too
        train_file(base_file, make_subject(count=2), DreamBoothTrainConfig(steps=2, class_images=0,
                                                                           optimizer="adamw8bit"),
                   tmp_path / "db.safetensors", tokenizer_dir())
    monkeypatch.setattr(memory, "available_memory", lambda device=None: 100 * 1024**2)
    with pytest.raises(memory.MemoryPlanError, match="only 0.1 GB of RAM is free"):
        train_file(base_file, make_subject(count=2), LoRATrainConfig(steps=2, rank=2), output, tokenizer_dir())
    assert not output.exists()
    monkeypatch.setenv(memory.SKIP_ENV, "1")  # the user's way past a wrong estimate
    with pytest.raises(AssertionError, match="was loaded"):
        train_file(base_file, make_subject(count=2), LoRATrainConfig(steps=2, rank=2), output, tokenizer_dir())


# ---------------------------------------------------------------------------------------------
# Adafactor: transformers' arithmetic, with a lean step
# ---------------------------------------------------------------------------------------------

ADAFACTOR_SHAPES = [(7,), (6, 5), (12, 10), (4, 3, 3, 3), (2, 3, 8)]  # a bias, two linears, a conv, a 3-D tensor


def _adafactor_pair(weight_decay: float, dtype: torch.dtype = torch.float32):
    from transformers.optimization import Adafactor as Reference

    from trainers.training.adafactor import Adafactor

    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(shape, generator=generator).to(dtype) for shape in ADAFACTOR_SHAPES]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    return (Adafactor(ours, lr=1e-2, weight_decay=weight_decay),
            Reference(theirs, lr=1e-2, scale_parameter=False, relative_step=False, warmup_init=False,
                      weight_decay=weight_decay), ours, theirs, generator)


def _step_both(pair, steps: int, generator: torch.Generator, scale: float = 1.0) -> None:
    ours, theirs = pair[0], pair[1]
    for _ in range(steps):
        for mine, reference in zip(ours.param_groups[0]["params"], theirs.param_groups[0]["params"], strict=True):
            grad = (torch.randn(mine.shape, generator=generator) * scale).to(mine.dtype)
            mine.grad, reference.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adafactor_steps_like_transformers_adafactor(weight_decay):
    pair = _adafactor_pair(weight_decay)
    ours, theirs, mine, reference, generator = pair
    starts = [p.detach().clone() for p in mine]
    # small gradients (the update's RMS clip scales them up) and large ones, over 6 steps
    _step_both(pair, 3, generator, scale=1e-3)
    _step_both(pair, 3, generator, scale=10.0)
    for a, b, start in zip(mine, reference, starts, strict=True):
        moved = float((b.detach() - start).abs().max())
        assert moved > 1e-3  # the weights really moved
        torch.testing.assert_close(a.detach(), b.detach(), rtol=3e-7, atol=1e-5 * moved)  # a few ulp of the weight
    for a, b in zip(mine, reference, strict=True):
        for key in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
            if key in theirs.state[b]:
                torch.testing.assert_close(ours.state[a][key], theirs.state[b][key], rtol=1e-5, atol=0)
        assert ours.state[a]["step"] == theirs.state[b]["step"] == 6


def test_adafactor_resumes_from_a_state_saved_by_transformers_adafactor():
    pair = _adafactor_pair(0.0)
    ours, theirs, mine, reference, generator = pair
    _step_both(pair, 2, generator, scale=1e-3)
    with torch.no_grad():
        for a, b in zip(mine, reference, strict=True):
            a.copy_(b)
    # a training state written to disk before this class existed
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    _step_both(pair, 2, generator, scale=1e-3)
    for a, b in zip(mine, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert ours.state[mine[0]]["step"] == 4


def test_adafactor_steps_bf16_weights_in_fp32():
    pair = _adafactor_pair(0.0, torch.bfloat16)
    ours, theirs, mine, reference, generator = pair
    _step_both(pair, 2, generator, scale=1e-3)
    for a, b in zip(mine, reference, strict=True):
        assert a.dtype == torch.bfloat16
        assert float((a - b).detach().float().abs().max()) <= float(b.detach().float().abs().max()) * 2**-7  # one bf16 step
    assert all(s["exp_avg_sq_row"].dtype == torch.float32 for s in ours.state.values() if "exp_avg_sq_row" in s)
