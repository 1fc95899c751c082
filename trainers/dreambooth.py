"""DreamBooth: the whole SD1.5 UNet (optionally the text encoder) fine-tuned on a subject, with
the class-specific prior-preservation loss, saved as a single-file checkpoint ComfyUI loads.

What is trained: every UNet weight in fp32 (AdamW, or Adafactor for about half the memory); the
text encoder too when ``text_encoder_lr > 0`` (its own parameter group); the VAE never. With
prior preservation a batch of class images rides along with every subject batch and their loss,
weighted by ``prior_loss_weight``, is added to the subject loss and reported on its own.

Unlike LoRA, training changes the base models it is given (there is no adapter to remove): load
a fresh copy per run. :func:`save_dreambooth` writes the LDM single-file layout
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``), fp16
by default, with the training config and losses as metadata.

CLI::

    python -m trainers.dreambooth --checkpoint sd15.safetensors --images photos/ \
        --instance-prompt "a photo of sks woman face" --class-prompt "a photo of woman face" \
        --output sks_woman.safetensors [--class-images 100 --unet-lr 2e-6 ...]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .callbacks import NonFiniteLossError, TrainingCallbacks
from .checkpoint import SD15Components, save_sd15_single_file, sd15_state_dict
from .config import ConfigError, DreamBoothTrainConfig, add_config_arguments, config_from_args
from .loop import (
    LoopModels,
    LoopSettings,
    Optimization,
    model_device,
    prepare_training_set,
    run_training_loop,
)
from .lora import add_run_arguments, resolve_precision
from .subject import SubjectData

logger = logging.getLogger("trainers.dreambooth")

# Bump when a change to the engine changes what identical inputs train to (invalidates reuse).
DREAMBOOTH_ENGINE_VERSION = "1"
ADAMW_BETAS = (0.9, 0.999)
ADAMW_WEIGHT_DECAY = 1e-2
ADAMW_EPS = 1e-8
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class DreamBoothResult:
    """A finished run; the trained weights are in the models that were passed in."""

    losses: list[float]
    instance_losses: list[float]
    prior_losses: list[float]
    metadata: dict[str, str]
    fingerprint: str = ""
    seconds: float = 0.0
    trained: tuple[str, ...] = ()  # "unet", and "text_encoder" when it was trained


def dreambooth_fingerprint(
    base_fingerprint: str, subject: SubjectData, config: DreamBoothTrainConfig, class_source: str = ""
) -> str:
    """SHA-256 of a run: same base, subject, config and class images -> same checkpoint.

    ``class_source`` identifies the class images (a generated set's key, or a folder's subject
    fingerprint); it is ignored when prior preservation is off.
    """
    payload = {
        "engine": f"dreambooth-{DREAMBOOTH_ENGINE_VERSION}",
        "base": base_fingerprint,
        "subject": subject.fingerprint(),
        "config": config.training_identity(),
        "class_source": class_source if config.with_prior else "",
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def _check_inputs(base: SD15Components, subject: SubjectData, config: DreamBoothTrainConfig,
                  class_subject: SubjectData | None) -> None:
    if not isinstance(config, DreamBoothTrainConfig):
        raise TypeError(f"config must be a DreamBoothTrainConfig, got {type(config).__name__}")
    if not isinstance(subject, SubjectData):
        raise TypeError(f"subject must be a SubjectData, got {type(subject).__name__}")
    if base.tokenizer is None:
        raise ValueError("the base model has no tokenizer; load it with a tokenizer folder")
    if config.with_prior:
        if class_subject is None:
            raise ValueError(
                "prior preservation is on (class_images > 0 and prior_loss_weight > 0) but no class images "
                "were given; generate them with trainers.prior or set class_images to 0"
            )
        if class_subject.resolution != subject.resolution:
            raise ValueError(
                f"class images are {class_subject.resolution} px but the subject is {subject.resolution} px; "
                f"use class images of the training resolution"
            )
    trained = [("UNet", base.unet)] + ([("text encoder", base.text_encoder)] if config.train_text_encoder else [])
    for name, model in trained:
        if any(p.is_inference() for p in model.parameters()):
            raise RuntimeError(
                f"the {name} was loaded under torch.inference_mode(); load the base model inside "
                f"torch.inference_mode(False) so it can be trained"
            )


def make_optimizer(groups: list[dict[str, Any]], name: str) -> torch.optim.Optimizer:
    """AdamW, or Adafactor used like Adam (absolute learning rate, no relative steps, no momentum)."""
    if name == "adamw":
        return torch.optim.AdamW(groups, betas=ADAMW_BETAS, weight_decay=ADAMW_WEIGHT_DECAY, eps=ADAMW_EPS)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=0.0)
    raise ConfigError(f"optimizer must be one of 'adamw', 'adafactor' (got {name!r})")


def _optimization(unet_params: list[torch.nn.Parameter], text_params: list[torch.nn.Parameter],
                  config: DreamBoothTrainConfig, autocast_dtype: torch.dtype | None) -> Optimization:
    from diffusers.optimization import get_scheduler

    groups: list[dict[str, Any]] = [{"params": unet_params, "lr": config.unet_lr}]
    if text_params:
        groups.append({"params": text_params, "lr": config.text_encoder_lr})
    optimizer = make_optimizer(groups, config.optimizer)
    scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps,
                              num_training_steps=config.steps)
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
    return Optimization(optimizer, scheduler, unet_params + text_params, scaler, keep_grad_buffers=True)


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
    base_model_name: str = "",
    base_fingerprint: str = "",
    class_source: str = "",
    class_info: Mapping[str, str] | None = None,
) -> DreamBoothResult:
    """Fine-tune ``base.unet`` (and ``base.text_encoder`` if its lr > 0) IN PLACE on ``subject``.

    ``class_subject`` holds the class images when ``config.with_prior``; it is ignored (with a
    log line) otherwise. Raises NonFiniteLossError when training diverges (the models then hold
    partly trained weights: do not save them). On return the models are in eval mode with
    ``requires_grad`` off.
    """
    _check_inputs(base, subject, config, class_subject)
    if class_subject is not None and not config.with_prior:
        logger.info("prior preservation is off (class_images 0 or prior_loss_weight 0): class images not used")
        class_subject = None
    callbacks = callbacks or TrainingCallbacks()
    unet, vae, text_encoder = base.unet, base.vae, base.text_encoder
    device = model_device(unet)
    autocast_dtype = resolve_precision(config.precision, device)
    train_text = config.train_text_encoder
    logger.info(
        "DreamBooth: %d images at %dpx, %d steps, unet lr %g, text encoder %s, %s, prior %s, on %s",
        len(subject), subject.resolution, config.steps, config.unet_lr,
        f"lr {config.text_encoder_lr:g}" if train_text else "frozen", config.optimizer,
        f"{len(class_subject)} class images x {config.prior_loss_weight:g}" if class_subject else "off", device,
    )  # fmt: skip
    optimization: Optimization | None = None
    checkpointing = False
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for model in (unet, vae, text_encoder):
                model.requires_grad_(False)
                model.eval()
            sets = [
                prepare_training_set(
                    data.pixels(), data.captions, vae=vae, text_encoder=text_encoder, tokenizer=base.tokenizer,
                    flip=data.flip, cache_latents=config.cache_latents, cache_text=not train_text,
                )  # fmt: skip
                for data in ([subject] + ([class_subject] if class_subject is not None else []))
            ]
            unet_params = list(unet.parameters())
            text_params = list(text_encoder.parameters()) if train_text else []
            for parameter in unet_params + text_params:
                if parameter.dtype != torch.float32:
                    parameter.data = parameter.data.float()
                parameter.requires_grad_(True)
            if config.gradient_checkpointing:
                checkpointing = True
                unet.enable_gradient_checkpointing()
                if train_text:
                    _text_checkpointing(text_encoder, True)
            unet.train()
            if train_text:
                text_encoder.train()
            optimization = _optimization(unet_params, text_params, config, autocast_dtype)
            loop = run_training_loop(
                LoopModels(unet, vae, text_encoder, base.noise_scheduler),
                sets[0],
                optimization,
                LoopSettings(
                    steps=config.steps, batch_size=config.batch_size, seed=config.seed,
                    noise_offset=config.noise_offset, min_snr_gamma=config.min_snr_gamma,
                    max_grad_norm=config.max_grad_norm, prior_loss_weight=config.prior_loss_weight,
                    autocast_dtype=autocast_dtype,
                ),  # fmt: skip
                callbacks,
                prior=sets[1] if len(sets) > 1 else None,
            )
    finally:
        # Optimizer states and gradients are as large as the UNet (or twice): give them back now.
        optimization = None
        for model in (unet, text_encoder):
            model.zero_grad(set_to_none=True)
            model.requires_grad_(False)
            model.eval()
        if checkpointing:
            unet.disable_gradient_checkpointing()
            if train_text:
                _text_checkpointing(text_encoder, False)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    trained = ("unet", "text_encoder") if train_text else ("unet",)
    for name in trained:
        model = getattr(base, name)
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise NonFiniteLossError(config.steps, f"{name} weight")
    fingerprint = dreambooth_fingerprint(base_fingerprint, subject, config, class_source) if base_fingerprint else ""
    metadata = _metadata(config, subject, base_model_name, base_fingerprint, fingerprint, loop.losses,
                         loop.instance_losses, loop.prior_losses, device, autocast_dtype, loop.seconds,
                         class_subject, class_info)
    logger.info("DreamBooth trained %s in %.1f s: loss %.4f -> %.4f", "+".join(trained), loop.seconds,
                loop.losses[0], loop.losses[-1])
    return DreamBoothResult(
        losses=loop.losses, instance_losses=loop.instance_losses, prior_losses=loop.prior_losses,
        metadata=metadata, fingerprint=fingerprint, seconds=loop.seconds, trained=trained,
    )  # fmt: skip


def _rounded(values: list[float]) -> str:
    return json.dumps([float(f"{v:.5g}") for v in values])


def _metadata(config: DreamBoothTrainConfig, subject: SubjectData, base_model_name: str, base_fingerprint: str,
              fingerprint: str, losses: list[float], instance_losses: list[float], prior_losses: list[float],
              device: torch.device, autocast_dtype: torch.dtype | None, seconds: float,
              class_subject: SubjectData | None, class_info: Mapping[str, str] | None) -> dict[str, str]:
    mixed = {None: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype]
    metadata = {
        # kohya sd-scripts style keys, shown by model-info viewers
        "ss_training_comment": f"DreamBooth Studio; instance prompt: {subject.instance_prompt}",
        "ss_sd_model_name": base_model_name,
        "ss_base_model_version": "sd_v1",
        "ss_resolution": f"({subject.resolution}, {subject.resolution})",
        "ss_num_train_images": str(len(subject)),
        "ss_num_reg_images": str(len(class_subject) if class_subject is not None else 0),
        "ss_max_train_steps": str(config.steps),
        "ss_learning_rate": f"{config.unet_lr:g}",
        "ss_text_encoder_lr": f"{config.text_encoder_lr:g}",
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_optimizer": config.optimizer,
        "ss_seed": str(config.seed),
        "ss_mixed_precision": mixed,
        "ss_prior_loss_weight": f"{config.prior_loss_weight:g}",
        # ours
        "dbs.kind": "dreambooth",
        "dbs.engine": f"dreambooth-{DREAMBOOTH_ENGINE_VERSION}",
        "dbs.config": config.to_json(),
        "dbs.base_model": base_model_name,
        "dbs.base_fingerprint": base_fingerprint,
        "dbs.subject_fingerprint": subject.fingerprint(),
        "dbs.instance_prompt": subject.instance_prompt,
        "dbs.class_prompt": subject.class_prompt,
        "dbs.captions": json.dumps(sorted(set(subject.captions))),
        "dbs.source_names": json.dumps(list(subject.source_names)),
        "dbs.trained": "unet+text_encoder" if config.train_text_encoder else "unet",
        "dbs.steps_done": str(len(losses)),
        "dbs.losses": _rounded(losses),
        "dbs.instance_losses": _rounded(instance_losses),
        "dbs.prior_losses": _rounded(prior_losses),
        "dbs.final_loss": f"{losses[-1]:.6g}" if losses else "",
        "dbs.train_seconds": f"{seconds:.1f}",
        "dbs.device": device.type,
        "dbs.prior": json.dumps(dict(class_info or {}), sort_keys=True) if class_subject is not None else "",
    }
    if fingerprint:
        metadata["dbs.fingerprint"] = fingerprint
    return metadata


def curves_from_metadata(metadata: Mapping[str, str]) -> dict[str, list[float]]:
    """The loss curves a checkpoint recorded: ``loss``, ``instance``, ``prior`` (empty when absent)."""
    curves = {}
    for name, key in (("loss", "dbs.losses"), ("instance", "dbs.instance_losses"), ("prior", "dbs.prior_losses")):
        try:
            curves[name] = [float(v) for v in json.loads(metadata.get(key) or "[]")]
        except (ValueError, TypeError):
            curves[name] = []
    return curves


def save_dreambooth(base: SD15Components, result: DreamBoothResult, path: str | os.PathLike,
                    save_precision: str = "fp16", overwrite: bool = False) -> Path:
    """Write the trained models as an SD1.5 single-file checkpoint (atomic, no clobber by default).

    Refuses weights that are not finite in the saved precision (fp16 overflows above 65504):
    save in fp32 then.
    """
    dtype = SAVE_DTYPES[save_precision]
    state = sd15_state_dict(base.unet, base.vae, base.text_encoder, dtype)
    bad = next((key for key, tensor in state.items() if tensor.is_floating_point()
                and not bool(torch.isfinite(tensor).all())), None)
    del state
    if bad is not None:
        raise ValueError(f"checkpoint tensor {bad} is not finite in {save_precision}; save in fp32 or retrain with "
                         f"a lower learning rate")
    metadata = {**result.metadata, "dbs.save_precision": save_precision}
    return save_sd15_single_file(path, base.unet, base.vae, base.text_encoder, dtype=dtype, metadata=metadata,
                                 overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def default_class_cache() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "dreambooth_studio" / "class_images"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainers.dreambooth",
        description="DreamBooth: fine-tune the whole SD1.5 UNet on photos of a subject with prior preservation, "
                    "and save a single-file checkpoint.",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="SD1.5 single-file .safetensors")
    add_run_arguments(parser, "checkpoint file to write (.safetensors)")
    parser.add_argument("--crop-mode", choices=("face", "center", "pad"), default="center",
                        help="how photos are cropped square (default center)")
    add_config_arguments(parser, DreamBoothTrainConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .lora import TerminalProgress, _default_tokenizer_dir

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(DreamBoothTrainConfig, args)
    except ConfigError as error:
        parser.error(str(error))
    tokenizer = args.tokenizer or _default_tokenizer_dir()
    if tokenizer is None:
        parser.error("no tokenizer folder: pass --tokenizer (e.g. ComfyUI/comfy/sd1_tokenizer)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else torch.device(args.device)

    from .images import load_subject

    try:
        subject = load_subject(args.images, args.instance_prompt, args.class_prompt, args.resolution, 0, args.flip,
                               crop_mode=args.crop_mode,
                               caption_mode="sidecar .txt" if args.captions else "instance prompt",
                               tokenizer_dir=tokenizer).subject
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))

    from .jobs import train_dreambooth_file

    progress = TerminalProgress()
    try:
        job = train_dreambooth_file(
            args.checkpoint, subject, config, args.output, tokenizer, overwrite=args.overwrite, callbacks=progress,
            class_cache_dir=args.class_cache or default_class_cache(), class_folder=args.class_folder,
            device=device,
        )  # fmt: skip
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    state = "reused (identical earlier run)" if job.reused else "saved"
    print(f"{state} {job.path}; {job.class_report}; final loss {job.losses[-1]:.4f}" if job.losses else
          f"{state} {job.path}")
    if args.loss_curve is not None:
        from PIL import Image

        from .plot import loss_curve_image

        curve = loss_curve_image(job.losses, title=f"DreamBooth loss: {args.output.stem}",
                                 extra_curves=job.extra_curves())
        Image.fromarray((curve[0].numpy() * 255).round().astype("uint8")).save(args.loss_curve)
        print(f"loss curve: {args.loss_curve}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
