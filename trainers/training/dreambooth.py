"""DreamBooth: the whole SD1.5 UNet (optionally the text encoder) fine-tuned on a subject, with
the class-specific prior-preservation loss, saved as a single-file checkpoint ComfyUI loads.

What is trained: every UNet weight, fp32 master weights under bf16/fp16 autocast (AdamW,
Adafactor for about half the memory, or 8-bit AdamW on CUDA); the text encoder too when
``text_encoder_lr > 0`` (its own parameter group); the VAE never. The frozen VAE and text encoder
are stored in the compute precision. Lean options for small GPUs: ``fused_backward`` (each weight
is stepped inside the backward pass, so the UNet's gradients are never all held) and
``weight_precision`` bf16 (weights and gradients in bf16, fp32 updates written back with
stochastic rounding; the models are left in bf16). With prior preservation a batch of class images
rides along with every subject batch and their loss, weighted by ``prior_loss_weight``, is added
to the subject loss and reported on its own.

Unlike LoRA, training changes the base models it is given (there is no adapter to remove): load
a fresh copy per run. :func:`save_dreambooth` writes the LDM single-file layout
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``), fp16
by default, with the training config and losses as metadata.

Whole runs (checks, base model, class images, reuse, provenance) go through :mod:`trainers.jobs`;
the command line is ``python -m trainers dreambooth``.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..data.subject import SubjectData
from ..sd15.checkpoint import SD15Components, save_sd15_single_file
from .callbacks import LossHistory, NonFiniteLossError, TrainingCallbacks, WithLossHistory
from .config import DreamBoothTrainConfig
from .loop import (
    SAVE_DTYPES,
    LoopModels,
    LoopSettings,
    LoopState,
    Optimization,
    autocast_dtype_for,
    build_optimization,
    cast_frozen,
    check_trainable,
    model_device,
    model_dtype,
    prepare_training_sets,
    run_training_loop,
)
from .record import Provenance, training_metadata
from .residency import Residency, after_caching
from .saving import PrecisionOverflow
from .watch import WatchConfig, WatchOutcome, watcher_for

logger = logging.getLogger(__name__)


@dataclass
class DreamBoothResult(WithLossHistory):
    """A finished run; the trained weights are in the models that were passed in."""

    history: LossHistory
    metadata: dict[str, str]  # training_metadata(...) with the DreamBooth keys; provenance is added on save
    seconds: float = 0.0  # training time (with samples and validation), without model setup and caching
    trained: tuple[str, ...] = ()  # "unet", and "text_encoder" when it was trained
    watched: WatchOutcome = field(default_factory=WatchOutcome)  # sample rounds and their cost


def _check_inputs(base: SD15Components, subject: SubjectData, config: DreamBoothTrainConfig,
                  class_subject: SubjectData | None) -> None:
    if not isinstance(config, DreamBoothTrainConfig):
        raise TypeError(f"config must be a DreamBoothTrainConfig, got {type(config).__name__}")
    check_trainable(base, subject, class_subject, config.with_prior, config.train_text_encoder)


def _text_checkpointing(text_encoder: Any, on: bool) -> None:
    # transformers 5 renamed gradient_checkpointing_enable/disable (the old names warn).
    name = "activation_checkpointing_enable" if on else "activation_checkpointing_disable"
    if not hasattr(text_encoder, name):
        name = "gradient_checkpointing_enable" if on else "gradient_checkpointing_disable"
    getattr(text_encoder, name)()


def train_dreambooth(
    base: SD15Components,
    subject: SubjectData,
    config: DreamBoothTrainConfig,
    callbacks: TrainingCallbacks | None = None,
    class_subject: SubjectData | None = None,
    resume: LoopState | None = None,
    save_every: int = 0,
    watch: WatchConfig | None = None,
    sample_dir: str | os.PathLike | None = None,
    run: str = "",
    residency: Residency | None = None,
) -> DreamBoothResult:
    """Fine-tune ``base.unet`` (and ``base.text_encoder`` if its lr > 0) IN PLACE on ``subject``.

    ``class_subject`` holds the class images when ``config.with_prior``; it is ignored (with a
    log line) otherwise. ``watch`` adds sample images (written to ``sample_dir`` when given, for
    the job ``run``) and the validation loss; they do not change the trained weights. Raises NonFiniteLossError when training diverges (the models then hold
    partly trained weights: do not save them). On return the models are in eval mode with
    ``requires_grad`` off, the VAE and a frozen text encoder in their dtype again (their values
    rounded to the compute precision when it was bf16/fp16), the trained weights in fp32 or, with
    ``weight_precision`` bf16, in bf16.
    """
    _check_inputs(base, subject, config, class_subject)
    if class_subject is not None and not config.with_prior:
        logger.info("prior preservation is off (class_images 0 or prior_loss_weight 0): class images not used")
        class_subject = None
    callbacks = callbacks or TrainingCallbacks()
    unet, vae, text_encoder = base.unet, base.vae, base.text_encoder
    device = residency.device_of("unet") if residency is not None else model_device(unet)
    autocast_dtype = autocast_dtype_for(config, device)
    frozen_dtype = autocast_dtype or torch.float32
    weight_dtype = torch.bfloat16 if config.weight_precision == "bf16" else torch.float32
    frozen_dtypes = {name: model_dtype(getattr(base, name)) for name in ("vae", "text_encoder")}
    train_text = config.train_text_encoder
    logger.info(
        "DreamBooth: %d images at %dpx, %d steps, unet lr %g, text encoder %s, %s, prior %s, on %s",
        len(subject), subject.resolution, config.steps, config.unet_lr,
        f"lr {config.text_encoder_lr:g}" if train_text else "frozen",
        config.optimizer + (", weights bf16" if config.weight_precision == "bf16" else "")
        + (", optimizer step in the backward pass" if config.fused_backward else ""),
        f"{len(class_subject)} class images x {config.prior_loss_weight:g}" if class_subject else "off", device,
    )  # fmt: skip
    trained = ("unet", "text_encoder") if train_text else ("unet",)
    class_count = len(class_subject) if class_subject is not None else 0

    def result_so_far(history: LossHistory, seconds: float = 0.0) -> DreamBoothResult:
        """The run after the steps ``history`` recorded (its weights are in ``base``'s models)."""
        for name in trained:
            if not all(bool(torch.isfinite(p).all()) for p in getattr(base, name).parameters()):
                raise NonFiniteLossError(len(history.losses), f"{name} weight")
        metadata = training_metadata(config, subject, history, device, autocast_dtype, class_count,
                                     extra={"ss_optimizer": config.optimizer, "dbs.trained": "+".join(trained)})
        return DreamBoothResult(history=history, metadata=metadata, seconds=seconds, trained=trained)

    optimization: Optimization | None = None
    checkpointing = False
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for model in (unet, vae, text_encoder):
                model.requires_grad_(False)
                model.eval()
            cast_frozen(vae, frozen_dtype)
            if not train_text:
                cast_frozen(text_encoder, frozen_dtype)
            instance, prior = prepare_training_sets(base, subject, class_subject, cache_latents=config.cache_latents,
                                                    cache_text=config.cache_text,
                                                    caption_dropout=config.caption_dropout > 0,
                                                    unmasked_weight=config.unmasked_weight)
            models = LoopModels(unet, vae, text_encoder, base.noise_scheduler)
            settings = replace(LoopSettings.of(config, autocast_dtype), save_every=save_every)
            watcher = watcher_for(watch, models=models, tokenizer=base.tokenizer, instance=instance, prior=prior,
                                  settings=settings, subject=subject, sample_dir=sample_dir, run=run,
                                  residency=residency, text_trained=train_text)
            after_caching(residency, cached_latents=instance.cached_latents, frozen_text=config.cache_text)
            unet_params = list(unet.parameters())
            text_params = list(text_encoder.parameters()) if train_text else []
            for parameter in unet_params + text_params:
                if parameter.dtype != weight_dtype:
                    parameter.data = parameter.data.to(weight_dtype)
                parameter.requires_grad_(True)
            if config.gradient_checkpointing:
                checkpointing = True
                unet.enable_gradient_checkpointing()
                if train_text:
                    _text_checkpointing(text_encoder, True)
            unet.train()
            if train_text:
                text_encoder.train()
            # Zero gradients in place: the 3.4 GB of UNet gradients are not re-allocated every step.
            optimization = build_optimization(config, unet_params, text_params, autocast_dtype,
                                              keep_grad_buffers=True)
            loop = run_training_loop(models, instance, optimization, settings, callbacks, prior=prior, resume=resume,
                                     snapshot=result_so_far, watch=watcher)
    finally:
        # Optimizer states and gradients are as large as the UNet (or twice): give them back now.
        if optimization is not None:
            optimization.close()
        optimization = None
        for model in (unet, text_encoder):
            model.zero_grad(set_to_none=True)
            model.requires_grad_(False)
            model.eval()
        if checkpointing:
            unet.disable_gradient_checkpointing()
            if train_text:
                _text_checkpointing(text_encoder, False)
        cast_frozen(vae, frozen_dtypes["vae"])
        if not train_text:
            cast_frozen(text_encoder, frozen_dtypes["text_encoder"])
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    result = result_so_far(loop.history, loop.seconds)
    if watcher is not None:
        result.watched = watcher.outcome
    logger.info("DreamBooth trained %s in %.1f s: loss %.4f -> %.4f", "+".join(result.trained), loop.seconds,
                loop.losses[0], loop.losses[-1])
    return result


def save_dreambooth(base: SD15Components, result: DreamBoothResult, path: str | os.PathLike,
                    save_precision: str = "fp16", overwrite: bool = False,
                    provenance: Provenance | None = None) -> Path:
    """Write the trained models as an SD1.5 single-file checkpoint (atomic, no clobber by default).

    ``provenance`` (from the job) names the base model and the run fingerprint. Refuses weights
    that are not finite in the saved precision (fp16 overflows above 65504): save in fp32 then.
    """
    dtype = SAVE_DTYPES[save_precision]
    # Checked on the live weights, one tensor at a time: casting the whole checkpoint first would
    # hold a second 2 GB copy at every save point. fp16 tops out at 65504; bf16 has fp32's range.
    limit = torch.finfo(dtype).max
    bad = next((f"{name}.{key}" for name in ("unet", "vae", "text_encoder")
                for key, tensor in getattr(base, name).state_dict().items()
                if tensor.is_floating_point() and not bool((tensor.detach().abs() <= limit).all())), None)
    if bad is not None:
        raise PrecisionOverflow(f"checkpoint tensor {bad} is not finite in {save_precision}; save in fp32 or retrain "
                                f"with a lower learning rate", save_precision)
    metadata = {**result.metadata, **(provenance or Provenance()).metadata(), "dbs.save_precision": save_precision}
    return save_sd15_single_file(path, base.unet, base.vae, base.text_encoder, dtype=dtype, metadata=metadata,
                                 overwrite=overwrite)
