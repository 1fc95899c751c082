"""Precision that fits the device and the lean full fine-tune, on the tiny models and the CPU:
``auto`` per device (and the run identity it gives), bf16 and fp16 really running on the CPU
(frozen weights in the compute dtype, the fp16 gradient scaler skipping an overflowing step),
the optimizer step fused into the backward pass, bf16 weights with stochastic rounding, and
8-bit AdamW refused where it cannot run."""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from tests.support.paths import repo_root, tokenizer_dir
from tests.test_trainers_lora import Recorder, make_subject
from tests.test_trainers_resume import FINGERPRINT, SavePoints
from trainers.sd15 import placeholder
from trainers.training import loop
from trainers.training.callbacks import TrainingStopped
from trainers.training.config import (
    ConfigError,
    DreamBoothTrainConfig,
    LoRATrainConfig,
    check_device,
    resolved_precision,
)
from trainers.training.dreambooth import train_dreambooth
from trainers.training.lora import apply_lora, lora_parameters, train_lora
from trainers.training.record import run_fingerprint
from trainers.training.state import newest_state

pytestmark = [pytest.mark.trainers, pytest.mark.usefixtures("one_thread")]

TIMESTEPS = [50, 150, 300, 500, 700, 900]
# Fingerprints of make_subject() with base "base" and precision "fp32", computed by the engine
# before precision "auto" existed: the files of those runs must stay reusable.
OLD_LORA_FP32 = "47bf79d5986983b555749e883b84cc69d8581c9193e1b8f018995f2476674b56"
OLD_DREAMBOOTH_FP32 = "acd5dc784a9b4075584f6c88ab90b46d0b06368be140b3c4d2d43425bdf6dd9b"


@pytest.fixture(scope="module")
def tiny():
    return placeholder.tiny_sd15(seed=0, tokenizer_dir=tokenizer_dir())


@pytest.fixture(scope="module")
def subject():
    return make_subject()


def fresh(tiny):
    """A copy whose weights a run may change (DreamBooth trains in place; bf16 rounds frozen weights)."""
    return dataclasses.replace(tiny, unet=copy.deepcopy(tiny.unet), vae=copy.deepcopy(tiny.vae),
                               text_encoder=copy.deepcopy(tiny.text_encoder))


def fixed_noise_loss(base, unet, subject) -> float:
    prepared = loop.prepare_training_set(subject.pixels(), subject.captions, vae=base.vae,
                                         text_encoder=base.text_encoder, tokenizer=base.tokenizer, flip=False,
                                         cache_latents=True, cache_text=True)
    conditioning = prepared.embeddings[prepared.caption_index]
    return loop.fixed_noise_loss(unet, prepared.latent_mean[0], conditioning, base.noise_scheduler, TIMESTEPS, seed=1)


def dtypes(model, keep=()) -> set[torch.dtype]:
    kept = {id(p) for p in keep}
    return {p.dtype for p in model.parameters() if id(p) not in kept}


# ---------------------------------------------------------------------------------------------
# auto: per device, and the run identity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "bf16_gpu", "expected"), [
    ("cpu", True, "fp32"), ("cuda", True, "bf16"), ("cuda:1", False, "fp16"), (None, False, "fp32"),
])
def test_auto_precision_is_bf16_fp16_or_fp32_by_device(monkeypatch, device, bf16_gpu, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_gpu)
    assert resolved_precision("auto", device) == expected
    assert resolved_precision("fp32", device) == "fp32" and resolved_precision("fp16", device) == "fp16"
    assert LoRATrainConfig().precision == DreamBoothTrainConfig().precision == "auto"
    assert loop.autocast_dtype_for(LoRATrainConfig(), torch.device(device or "cpu")) == \
        loop.COMPUTE_DTYPES[expected]


def test_auto_on_a_cpu_is_the_same_run_as_fp32_was(monkeypatch, subject):
    """A file trained with fp32 before auto existed is reused by the default settings on a CPU;
    on a GPU auto is another run (it trains in bf16 there), the same as asking for bf16."""
    assert run_fingerprint("base", subject, LoRATrainConfig()) == OLD_LORA_FP32
    assert run_fingerprint("base", subject, LoRATrainConfig(precision="fp32"), device="cpu") == OLD_LORA_FP32
    assert run_fingerprint("base", subject, DreamBoothTrainConfig(class_images=0)) == OLD_DREAMBOOTH_FP32
    assert run_fingerprint("base", subject, DreamBoothTrainConfig(class_images=0, fused_backward=False,
                                                                  weight_precision="fp32")) == OLD_DREAMBOOTH_FP32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    on_gpu = run_fingerprint("base", subject, LoRATrainConfig(), device="cuda")
    assert on_gpu != OLD_LORA_FP32
    assert on_gpu == run_fingerprint("base", subject, LoRATrainConfig(precision="bf16"), device="cuda")


def test_settings_a_device_cannot_run_are_refused_before_training(monkeypatch, tiny, subject):
    with pytest.raises(ConfigError, match="optimizer 'adamw8bit' .*CUDA GPUs only.*on cpu: use optimizer "
                                          "'adafactor' .* or 'adamw' on this device"):
        check_device(DreamBoothTrainConfig(optimizer="adamw8bit"), "cpu")
    base = fresh(tiny)
    before = {name: (p.detach().clone(), p.requires_grad) for name, p in base.unet.named_parameters()}
    with pytest.raises(ConfigError, match="adamw8bit"):
        train_dreambooth(base, subject, DreamBoothTrainConfig(optimizer="adamw8bit", steps=2, class_images=0))
    assert all(torch.equal(before[name][0], p) and before[name][1] == p.requires_grad
               for name, p in base.unet.named_parameters())  # refused before the models were touched

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    with pytest.raises(ConfigError, match="precision 'bf16' is not supported by this GPU"):
        check_device(LoRATrainConfig(precision="bf16"), "cuda")
    with pytest.raises(ConfigError, match="weight_precision 'bf16' is not supported by this GPU"):
        check_device(DreamBoothTrainConfig(weight_precision="bf16"), "cuda")
    with pytest.raises(ConfigError, match="fused_backward cannot run with fp16 gradient scaling"):
        check_device(DreamBoothTrainConfig(fused_backward=True), "cuda")  # auto is fp16 on this GPU
    with pytest.raises(ConfigError, match="weight_precision 'bf16' computes in bf16 but precision is 'fp32'"):
        DreamBoothTrainConfig(weight_precision="bf16", precision="fp32")


# ---------------------------------------------------------------------------------------------
# bf16 and fp16 on the CPU
# ---------------------------------------------------------------------------------------------


class DtypeRecorder(Recorder):
    def __init__(self, base) -> None:
        super().__init__()
        self.base, self.seen = base, []

    def on_step_end(self, state) -> None:
        super().on_step_end(state)
        unet_lora = lora_parameters(self.base.unet)
        self.seen.append((dtypes(self.base.unet, unet_lora), {p.dtype for p in unet_lora},
                          dtypes(self.base.vae), dtypes(self.base.text_encoder)))


def test_bf16_lora_on_the_cpu_trains_with_frozen_weights_in_bf16_and_the_loss_falls(tiny, subject):
    base = fresh(tiny)
    before = fixed_noise_loss(base, base.unet, subject)
    recorder = DtypeRecorder(base)
    result = train_lora(base, subject, LoRATrainConfig(steps=20, rank=16, unet_lr=1e-2, batch_size=2,
                                                       precision="bf16"), recorder)
    bf16, fp32 = {torch.bfloat16}, {torch.float32}
    assert recorder.seen == [(bf16, fp32, bf16, bf16)] * 20  # frozen weights bf16, LoRA weights fp32
    assert result.metadata["ss_mixed_precision"] == "bf16"
    assert all(dtypes(getattr(base, name)) == fp32 for name in ("unet", "vae", "text_encoder"))  # cast back

    trained = copy.deepcopy(base.unet)
    apply_lora(trained, None, result.state_dict)
    after = fixed_noise_loss(base, trained, subject)
    assert after < 0.85 * before, (before, after)


def test_fp16_on_the_cpu_trains_with_a_gradient_scaler(tiny, subject):
    base = fresh(tiny)
    recorder = DtypeRecorder(base)
    result = train_lora(base, subject, LoRATrainConfig(steps=3, rank=4, unet_lr=1e-3, precision="fp16"), recorder)
    assert recorder.seen[0][0] == {torch.float16} and recorder.seen[0][1] == {torch.float32}
    assert result.metadata["ss_mixed_precision"] == "fp16" and len(result.losses) == 3


def test_the_gradient_scaler_skips_a_step_whose_gradients_overflow():
    weight = torch.nn.Parameter(torch.ones(4))
    config = LoRATrainConfig(steps=5, unet_lr=0.1)
    optimization = loop.build_optimization(config, [weight], [], torch.float16)
    scaler = optimization.grad_scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    scale = scaler.get_scale()

    # A finite loss whose gradients overflow once scaled (x 65536): the step is skipped, not applied.
    loop.apply_gradients((weight * 1e35).sum(), optimization, max_grad_norm=1.0, step=1)
    assert torch.equal(weight.detach(), torch.ones(4))
    assert scaler.get_scale() == scale / 2
    moments = optimization.optimizer.state_dict()["state"].get(0, {})
    assert float(moments.get("step", 0)) == 0 and not any(bool(v.any()) for k, v in moments.items() if k != "step")

    loop.apply_gradients(weight.sum(), optimization, max_grad_norm=1.0, step=2)
    assert bool((weight.detach() < 1).all())  # an ordinary step goes through


# ---------------------------------------------------------------------------------------------
# The lean full fine-tune
# ---------------------------------------------------------------------------------------------


def test_fused_backward_trains_the_very_weights_of_the_ordinary_path(tiny, subject):
    """AdamW steps each weight on its own: stepping it inside the backward pass changes nothing
    (without clipping, which fused_backward does per tensor), also with the text encoder trained
    and gradient checkpointing on. No gradient is left on the weights."""
    config = dict(steps=3, unet_lr=1e-4, text_encoder_lr=1e-4, class_images=0, max_grad_norm=0,
                  gradient_checkpointing=True, lr_scheduler="linear", lr_warmup_steps=1)
    class Gradients(Recorder):
        def on_step_end(self, state) -> None:
            held.append(sum(p.grad is not None for p in base.unet.parameters()))

    runs, held = [], []
    for fused in (False, True):
        base = fresh(tiny)
        result = train_dreambooth(base, subject, DreamBoothTrainConfig(**config, fused_backward=fused), Gradients())
        runs.append((result, base))
    (plain, plain_base), (fused, fused_base) = runs
    unet_tensors = len(list(tiny.unet.parameters()))
    assert held == [unet_tensors] * 3 + [0] * 3  # the ordinary path holds every gradient between steps
    assert fused.losses == plain.losses
    for name in ("unet", "text_encoder"):
        a, b = getattr(plain_base, name).state_dict(), getattr(fused_base, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert all(p.grad is None for p in getattr(fused_base, name).parameters())
    assert not torch.equal(plain_base.unet.conv_in.weight, tiny.unet.conv_in.weight)


def test_bf16_weights_with_stochastic_rounding_train_and_resume_exactly(tiny, subject, tmp_path):
    """UNet weights in bf16 (with fused_backward and Adafactor, the leanest setting): the loss
    falls, the weights stay bf16, and a run stopped and resumed from its saved state gives the
    same weights as one that never stopped (the rounding's random bits come from the run)."""
    base = fresh(tiny)
    before = fixed_noise_loss(base, base.unet, subject)
    config = DreamBoothTrainConfig(steps=20, unet_lr=3e-4, batch_size=2, class_images=0, weight_precision="bf16",
                                   fused_backward=True, optimizer="adafactor")
    whole = train_dreambooth(base, subject, config)
    assert dtypes(base.unet) == {torch.bfloat16}
    assert dtypes(base.vae) == {torch.float32}  # the frozen VAE is back in its dtype
    assert whole.metadata["ss_mixed_precision"] == "bf16"
    after = fixed_noise_loss(base, base.unet, subject)
    assert after < 0.8 * before, (before, after)

    short = dataclasses.replace(config, steps=4)
    uninterrupted = fresh(tiny)
    train_dreambooth(uninterrupted, subject, short)
    with pytest.raises(TrainingStopped):
        train_dreambooth(fresh(tiny), subject, short, SavePoints(tmp_path, stop_after=3), save_every=2)
    state, _ = newest_state(tmp_path, FINGERPRINT)
    assert state.step == 2
    resumed = fresh(tiny)
    train_dreambooth(resumed, subject, short, resume=state)
    a, b = uninterrupted.unet.state_dict(), resumed.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stochastic_rounding_is_unbiased_where_round_to_nearest_loses_small_updates():
    generator = torch.Generator().manual_seed(0)
    value = 1.0 + 2**-10  # between the bf16 neighbours 1 and 1 + 2**-7, nearer to 1
    rounded = loop.stochastic_round_to_bf16(torch.full((200_000,), value), generator)
    assert rounded.dtype == torch.bfloat16
    assert set(rounded.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert float(rounded.float().mean()) == pytest.approx(value, abs=2e-5)
    assert torch.full((1,), value).to(torch.bfloat16).item() == 1.0

    # 200 updates of 1e-4 to a weight of 1: round-to-nearest keeps 1.0, stochastic rounding adds them up.
    nearest, stochastic = torch.ones(1000, dtype=torch.bfloat16), torch.ones(1000, dtype=torch.bfloat16)
    for _ in range(200):
        nearest = (nearest.float() + 1e-4).to(torch.bfloat16)
        stochastic = loop.stochastic_round_to_bf16(stochastic.float() + 1e-4, generator)
    assert bool((nearest == 1).all())
    assert float(stochastic.float().mean()) == pytest.approx(1.02, abs=2e-3)


# -- reproducible sums with two threads -------------------------------------------------------------

def _mkl_mode_in_a_fresh_process(code: str, env: dict[str, str]) -> str:
    environment = {key: value for key, value in os.environ.items() if key != "MKL_CBWR"} | env
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=environment, cwd=repo_root())
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


ASK = ("from trainers.training.determinism import blas_reproducible, request_reproducible_blas\n"
       "import torch\n")
PRODUCT = "torch.ones(64, 64) @ torch.ones(64, 64)\n"


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch has no MKL here")
def test_the_engine_asks_mkl_for_reproducible_sums_before_its_first_product():
    # asked first (what the CLI and the pack's entry point do): MKL sums reproducibly
    asked = _mkl_mode_in_a_fresh_process(ASK + "request_reproducible_blas()\n" + PRODUCT + "print(blas_reproducible())",
                                         {})
    assert asked == "True"
    # MKL started before the request: too late, and the check says so (train_file then warns)
    late = _mkl_mode_in_a_fresh_process(ASK + PRODUCT + "request_reproducible_blas()\nprint(blas_reproducible())", {})
    assert late == "False"
    # what a user set is kept
    kept = _mkl_mode_in_a_fresh_process(
        ASK + "request_reproducible_blas()\nimport os\nprint(os.environ['MKL_CBWR'])", {"MKL_CBWR": "COMPATIBLE"})
    assert kept == "COMPATIBLE"
    # the command line asks before anything it imports could start MKL
    cli = _mkl_mode_in_a_fresh_process(
        "import runpy, sys\nsys.argv = ['trainers']\ntry:\n    runpy.run_module('trainers', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "from trainers.training.determinism import blas_reproducible\nprint(blas_reproducible())", {})
    assert cli == "True"
