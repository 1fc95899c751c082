"""LoRA training of SD1.5 on a subject, exported in the kohya format every SD1.5 tool reads.

What is trained (peft LoRA layers, base weights frozen, LoRA weights fp32):

- UNet: ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of both attentions (self ``attn1`` and cross
  ``attn2``) of every transformer block: 128 modules in SD1.5 (16 blocks x 2 x 4).
- Text encoder, when ``text_encoder_lr > 0``: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` of
  every CLIP self-attention (48 modules in SD1.5), as the diffusers DreamBooth-LoRA recipe does.
  The MLPs (fc1/fc2) are left alone: fewer weights to overfit on 5-20 photos.

Export (:func:`kohya_state_dict`): ``lora_unet_<diffusers module path, . -> _>`` and
``lora_te_text_model_encoder_layers_<i>_self_attn_<q|k|v|out>_proj``, each with
``.lora_down.weight`` (rank x in), ``.lora_up.weight`` (out x rank) and ``.alpha`` (a scalar;
the update is ``up @ down * alpha / rank``, the same scale peft used in training). These are the
names ComfyUI's LoraLoader, A1111/Forge and diffusers' kohya converter map. peft/diffusers key
names are never written (ComfyUI does not load them).

The base models passed in are left as they came: adapters are injected for training and removed
afterwards (no copy of the 860M-parameter UNet), and ``requires_grad``, train/eval mode and
gradient checkpointing are restored, also when training fails or a callback raises.

CLI::

    python -m trainers.lora --checkpoint sd15.safetensors --images photos/ \
        --instance-prompt "a photo of sks dog" --output sks_dog.safetensors [--rank 16 ...]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .callbacks import NonFiniteLossError, StepState, TrainingCallbacks, TrainingStopped
from .checkpoint import SD15Components
from .config import ConfigError, LoRATrainConfig, add_config_arguments, config_from_args
from .fileio import atomic_save_safetensors, check_metadata, refuse_existing
from .loop import (
    LoopModels,
    LoopSettings,
    Optimization,
    derive_seed,
    model_device,
    prepare_training_set,
    run_training_loop,
)
from .plot import loss_curve_image
from .subject import SubjectData

logger = logging.getLogger("trainers.lora")

__all__ = [
    "ConfigError",
    "LoRAResult",
    "LoRATrainConfig",
    "NonFiniteLossError",
    "TrainingCallbacks",
    "TrainingStopped",
    "apply_lora",
    "expected_kohya_keys",
    "kohya_state_dict",
    "lora_fingerprint",
    "losses_from_metadata",
    "loss_curve_image",
    "save_lora",
    "train_lora",
]

# Bump when a change to the engine changes what identical inputs train to (invalidates reuse).
LORA_ENGINE_VERSION = "1"
ADAPTER_NAME = "dbs_lora"
UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"
# AdamW settings (torch defaults, which the diffusers and kohya recipes also use).
ADAMW_BETAS = (0.9, 0.999)
ADAMW_WEIGHT_DECAY = 1e-2
ADAMW_EPS = 1e-8

_UNET_TARGET = re.compile(r"(^|\.)transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_TEXT_TARGET = re.compile(r"(^|\.)encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$")
# transformers 4 nests CLIP's modules under ``text_model``; 5 does not. Kohya names always have it.
_TEXT_MODEL = "text_model."


# ---------------------------------------------------------------------------------------------
# Which modules, and their kohya names
# ---------------------------------------------------------------------------------------------


def unet_lora_targets(unet: torch.nn.Module) -> list[str]:
    """Module paths of the UNet attention projections that get LoRA layers."""
    return [
        name
        for name, module in unet.named_modules()
        if _UNET_TARGET.search(name) and isinstance(module, torch.nn.Linear)
    ]


def text_encoder_lora_targets(text_encoder: torch.nn.Module) -> list[str]:
    """Module paths of the CLIP self-attention projections that get LoRA layers."""
    return [
        name
        for name, module in text_encoder.named_modules()
        if _TEXT_TARGET.search(name) and isinstance(module, torch.nn.Linear)
    ]


def kohya_unet_name(module_path: str) -> str:
    return UNET_PREFIX + module_path.replace(".", "_")


def kohya_text_encoder_name(module_path: str) -> str:
    if module_path.startswith(_TEXT_MODEL):
        module_path = module_path[len(_TEXT_MODEL) :]
    return TEXT_ENCODER_PREFIX + (_TEXT_MODEL + module_path).replace(".", "_")


def expected_kohya_keys(unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None) -> list[str]:
    """Every tensor name a LoRA of these models holds (text encoder ones only if it is given)."""
    modules = [kohya_unet_name(n) for n in unet_lora_targets(unet)]
    if text_encoder is not None:
        modules += [kohya_text_encoder_name(n) for n in text_encoder_lora_targets(text_encoder)]
    return sorted(f"{m}.{suffix}" for m in modules for suffix in ("lora_down.weight", "lora_up.weight", "alpha"))


def _module_table(unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> dict[str, torch.nn.Linear]:
    table = {kohya_unet_name(n): unet.get_submodule(n) for n in unet_lora_targets(unet)}
    if text_encoder is not None:
        table.update(
            {kohya_text_encoder_name(n): text_encoder.get_submodule(n) for n in text_encoder_lora_targets(text_encoder)}
        )
    return table  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Injecting and removing peft adapters
# ---------------------------------------------------------------------------------------------


def _has_lora_layers(model: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def inject_lora(model: torch.nn.Module, targets: list[str], rank: int, alpha: float, seed: int) -> Any:
    """Add LoRA layers (peft) to ``targets`` in place; returns the peft tuner that removes them again.

    The down weights are initialised from ``seed`` (Kaiming-uniform, peft's default), the up
    weights are zero, so the model's output is unchanged until training moves them.
    """
    from peft import LoraConfig, LoraModel

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LoraModel(model, config, ADAPTER_NAME)


def remove_lora(tuner: Any) -> None:
    """Replace every LoRA layer by the original module it wrapped (no merging)."""
    tuner.unload()


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for name, p in model.named_parameters() if f".{ADAPTER_NAME}." in name]


def _lora_layers(model: torch.nn.Module) -> Iterator[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            yield name, module


def kohya_state_dict(
    unet: torch.nn.Module, text_encoder: torch.nn.Module | None, rank: int, alpha: float
) -> dict[str, torch.Tensor]:
    """The trained LoRA layers of models with injected adapters, as kohya tensors (fp32, CPU copies)."""
    state: dict[str, torch.Tensor] = {}
    parts: list[tuple[torch.nn.Module, Any]] = [(unet, kohya_unet_name)]
    if text_encoder is not None:
        parts.append((text_encoder, kohya_text_encoder_name))
    for model, namer in parts:
        for path, layer in _lora_layers(model):
            name = namer(path)
            state[f"{name}.lora_down.weight"] = layer.lora_A[ADAPTER_NAME].weight.detach().float().cpu().clone()
            state[f"{name}.lora_up.weight"] = layer.lora_B[ADAPTER_NAME].weight.detach().float().cpu().clone()
            state[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return state


@torch.no_grad()
def apply_lora(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    state_dict: Mapping[str, torch.Tensor],
    unet_scale: float = 1.0,
    text_encoder_scale: float = 1.0,
) -> dict[str, int]:
    """Merge a kohya LoRA into the weights of ``unet`` / ``text_encoder`` IN PLACE (pass copies).

    ``W += scale * alpha / rank * up @ down``. Returns ``{"unet": n, "text_encoder": m}`` modules
    patched; raises ValueError listing keys that match no module of these models.
    """
    table = _module_table(unet, text_encoder)
    modules = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in state_dict}
    unknown = sorted(m for m in modules if m not in table)
    if unknown:
        raise ValueError(f"{len(unknown)} LoRA modules match no layer of the models: {unknown[:5]}")
    counts = {"unet": 0, "text_encoder": 0}
    for name in sorted(modules):
        down = state_dict[f"{name}.lora_down.weight"].float()
        up = state_dict[f"{name}.lora_up.weight"].float()
        rank = down.shape[0]
        alpha_key = f"{name}.alpha"
        alpha = float(state_dict[alpha_key]) if alpha_key in state_dict else float(rank)
        is_unet = name.startswith(UNET_PREFIX)
        scale = (unet_scale if is_unet else text_encoder_scale) * alpha / rank
        layer = table[name]
        layer.weight += (scale * (up @ down)).to(layer.weight.device, layer.weight.dtype)
        counts["unet" if is_unet else "text_encoder"] += 1
    return counts


# ---------------------------------------------------------------------------------------------
# Keeping the base models as they came
# ---------------------------------------------------------------------------------------------


@dataclass
class _ModelState:
    requires_grad: dict[str, bool]
    training: dict[str, bool]
    checkpointing: bool | None


def _snapshot(model: torch.nn.Module) -> _ModelState:
    checkpointing = getattr(model, "is_gradient_checkpointing", None) if hasattr(model, "enable_gradient_checkpointing") else None
    return _ModelState(
        requires_grad={name: p.requires_grad for name, p in model.named_parameters()},
        training={name: m.training for name, m in model.named_modules()},
        checkpointing=checkpointing,
    )


def _restore(model: torch.nn.Module, state: _ModelState) -> None:
    if state.checkpointing is not None and model.is_gradient_checkpointing != state.checkpointing:
        if state.checkpointing:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()
    for name, parameter in model.named_parameters():
        if name in state.requires_grad:
            parameter.requires_grad_(state.requires_grad[name])
    for name, module in model.named_modules():
        if name in state.training:
            module.training = state.training[name]


@contextmanager
def _restored_afterwards(*models: torch.nn.Module) -> Iterator[None]:
    states = [(model, _snapshot(model)) for model in models]
    try:
        yield
    finally:
        for model, state in states:
            _restore(model, state)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass
class LoRAResult:
    """A trained LoRA, not yet saved."""

    state_dict: dict[str, torch.Tensor]  # kohya keys, fp32, CPU
    losses: list[float]  # one per optimizer step
    metadata: dict[str, str]  # safetensors metadata: ss_* keys, dbs.* keys (dbs.config is JSON)
    unet_modules: int
    text_encoder_modules: int
    fingerprint: str = ""  # lora_fingerprint(...) when a base fingerprint was given
    seconds: float = 0.0  # training time, without model setup and caching
    instance_losses: list[float] = field(default_factory=list)  # subject part of each step's loss
    prior_losses: list[float] = field(default_factory=list)  # class part (empty without prior preservation)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32.

    bf16/fp16 autocast runs only on CUDA. On other devices training falls back to fp32 with a
    warning (a workflow made on a GPU still runs on a CPU-only machine).
    """
    if precision == "fp32":
        return None
    if device.type != "cuda":
        logger.warning("precision %s needs a CUDA GPU; training on %s in fp32 instead", precision, device.type)
        return None
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision 'bf16' is not supported by this GPU; use 'fp16' or 'fp32'")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def lora_fingerprint(
    base_fingerprint: str, subject: SubjectData, config: LoRATrainConfig, class_source: str = ""
) -> str:
    """SHA-256 identifying a training run: same base model, subject, config (and class images,
    with prior preservation) -> same LoRA.

    Stored as ``dbs.fingerprint`` so a node can reuse an existing file instead of training again.
    """
    payload = {
        "engine": f"lora-{LORA_ENGINE_VERSION}",
        "base": base_fingerprint,
        "subject": subject.fingerprint(),
        "config": config.training_identity(),
        "class_source": class_source if config.with_prior else "",
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def _check_inputs(
    base: SD15Components, subject: SubjectData, config: LoRATrainConfig, class_subject: SubjectData | None = None
) -> None:
    if config.with_prior and class_subject is None:
        raise ValueError(
            "prior preservation is on (class_images > 0 and prior_loss_weight > 0) but no class images were "
            "given; generate them with trainers.prior or set class_images to 0"
        )
    if class_subject is not None and config.with_prior and class_subject.resolution != subject.resolution:
        raise ValueError(
            f"class images are {class_subject.resolution} px but the subject is {subject.resolution} px; use "
            f"class images of the training resolution"
        )
    if not isinstance(config, LoRATrainConfig):
        raise TypeError(f"config must be a LoRATrainConfig, got {type(config).__name__}")
    if not isinstance(subject, SubjectData):
        raise TypeError(f"subject must be a SubjectData, got {type(subject).__name__}")
    if base.tokenizer is None:
        raise ValueError("the base model has no tokenizer; load it with a tokenizer folder")
    for name in ("unet", "text_encoder"):
        model = getattr(base, name)
        if _has_lora_layers(model):
            raise ValueError(f"the {name} already has LoRA layers injected; pass a clean base model")
    trained = [("UNet", base.unet)] + ([("text encoder", base.text_encoder)] if config.train_text_encoder else [])
    for name, model in trained:
        if any(p.is_inference() for p in model.parameters()):
            raise RuntimeError(
                f"the {name} was loaded under torch.inference_mode(); load the base model inside "
                f"torch.inference_mode(False) so it can be trained"
            )


def _metadata(
    config: LoRATrainConfig,
    subject: SubjectData,
    base_model_name: str,
    base_fingerprint: str,
    fingerprint: str,
    losses: list[float],
    counts: tuple[int, int],
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    seconds: float,
    instance_losses: list[float] | None = None,
    prior_losses: list[float] | None = None,
    class_count: int = 0,
    class_info: Mapping[str, str] | None = None,
) -> dict[str, str]:
    mixed = {None: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype]
    distinct_captions = sorted(set(subject.captions))
    metadata = {
        # kohya sd-scripts keys, read by A1111/Forge's and ComfyUI-side metadata viewers
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": f"{config.effective_alpha:g}",
        "ss_network_train_unet_only": str(not config.train_text_encoder),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_sd_model_name": base_model_name,
        "ss_resolution": f"({subject.resolution}, {subject.resolution})",
        "ss_num_train_images": str(len(subject)),
        "ss_num_reg_images": str(class_count),
        "ss_prior_loss_weight": f"{config.prior_loss_weight:g}" if class_count else "0",
        "ss_max_train_steps": str(config.steps),
        "ss_steps": str(len(losses)),
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_learning_rate": f"{config.unet_lr:g}",
        "ss_unet_lr": f"{config.unet_lr:g}",
        "ss_text_encoder_lr": f"{config.text_encoder_lr:g}",
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_optimizer": f"torch.optim.AdamW(betas={ADAMW_BETAS},weight_decay={ADAMW_WEIGHT_DECAY},eps={ADAMW_EPS})",
        "ss_seed": str(config.seed),
        "ss_mixed_precision": mixed,
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_cache_latents": str(config.cache_latents),
        "ss_max_grad_norm": f"{config.max_grad_norm:g}",
        "ss_noise_offset": f"{config.noise_offset:g}",
        "ss_min_snr_gamma": f"{config.min_snr_gamma:g}",
        "ss_flip_aug": str(subject.flip),
        "ss_clip_skip": "1",
        "ss_training_comment": f"DreamBooth Studio LoRA; instance prompt: {subject.instance_prompt}",
        # ours
        "dbs.kind": "lora",
        "dbs.engine": f"lora-{LORA_ENGINE_VERSION}",
        "dbs.config": config.to_json(),
        "dbs.base_model": base_model_name,
        "dbs.base_fingerprint": base_fingerprint,
        "dbs.subject_fingerprint": subject.fingerprint(),
        "dbs.instance_prompt": subject.instance_prompt,
        "dbs.class_prompt": subject.class_prompt,
        "dbs.captions": json.dumps(distinct_captions),
        "dbs.source_names": json.dumps(list(subject.source_names)),
        "dbs.steps_done": str(len(losses)),
        "dbs.losses": json.dumps([float(f"{v:.5g}") for v in losses]),
        "dbs.instance_losses": json.dumps([float(f"{v:.5g}") for v in (instance_losses or [])]),
        "dbs.prior_losses": json.dumps([float(f"{v:.5g}") for v in (prior_losses or [])]),
        "dbs.prior": json.dumps(dict(class_info or {}), sort_keys=True) if class_count else "",
        "dbs.final_loss": f"{losses[-1]:.6g}" if losses else "",
        "dbs.unet_modules": str(counts[0]),
        "dbs.text_encoder_modules": str(counts[1]),
        "dbs.lora_targets": json.dumps(
            {
                "unet": "transformer_blocks.*.attn1/attn2.to_q,to_k,to_v,to_out.0",
                "text_encoder": "encoder.layers.*.self_attn.q_proj,k_proj,v_proj,out_proj"
                if config.train_text_encoder
                else "",
            }
        ),
        "dbs.device": device.type,
    }
    if fingerprint:
        metadata["dbs.fingerprint"] = fingerprint
    return metadata


def losses_from_metadata(metadata: Mapping[str, str]) -> list[float]:
    """The per-step losses a LoRA file recorded (``dbs.losses``), e.g. to redraw its loss curve."""
    try:
        values = json.loads(metadata.get("dbs.losses", "[]"))
        return [float(v) for v in values]
    except (ValueError, TypeError):
        return []


def _optimization(
    unet_params: list[torch.nn.Parameter],
    text_params: list[torch.nn.Parameter],
    config: LoRATrainConfig,
    autocast_dtype: torch.dtype | None,
) -> Optimization:
    from diffusers.optimization import get_scheduler

    groups = [{"params": unet_params, "lr": config.unet_lr}]
    if text_params:
        groups.append({"params": text_params, "lr": config.text_encoder_lr})
    optimizer = torch.optim.AdamW(groups, betas=ADAMW_BETAS, weight_decay=ADAMW_WEIGHT_DECAY, eps=ADAMW_EPS)
    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.steps,
    )
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
    return Optimization(optimizer, scheduler, unet_params + text_params, scaler)


def train_lora(
    base: SD15Components,
    subject: SubjectData,
    config: LoRATrainConfig,
    callbacks: TrainingCallbacks | None = None,
    base_model_name: str = "",
    base_fingerprint: str = "",
    class_subject: SubjectData | None = None,
    class_source: str = "",
    class_info: Mapping[str, str] | None = None,
) -> LoRAResult:
    """Train a LoRA of ``base`` on ``subject``; returns the kohya tensors, losses and metadata.

    Training runs where ``base.unet`` is (the VAE and text encoder run where they are). The
    models are returned unchanged. ``base_fingerprint`` (e.g. :func:`trainers.fileio.sha256_file`
    of the checkpoint) makes the result carry ``dbs.fingerprint``. Raises NonFiniteLossError if
    training diverges; whatever a callback raises propagates after cleanup.
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
    alpha = config.effective_alpha
    started = time.monotonic()
    logger.info(
        "LoRA training: %d images at %dpx, rank %d, alpha %g, %d steps, unet lr %g, text encoder %s, on %s",
        len(subject), subject.resolution, config.rank, alpha, config.steps, config.unet_lr,
        f"lr {config.text_encoder_lr:g}" if train_text else "frozen", device,
    )  # fmt: skip

    tuners: list[Any] = []
    optimization: Optimization | None = None
    try:
        with torch.inference_mode(False), torch.enable_grad(), _restored_afterwards(unet, vae, text_encoder):
            for model in (unet, vae, text_encoder):
                model.requires_grad_(False)
            vae.eval()
            text_encoder.eval()
            instance = prepare_training_set(
                subject.pixels(),
                subject.captions,
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=base.tokenizer,
                flip=subject.flip,
                cache_latents=config.cache_latents,
                cache_text=not train_text,
            )
            prior = None
            if class_subject is not None:
                prior = prepare_training_set(
                    class_subject.pixels(), class_subject.captions, vae=vae, text_encoder=text_encoder,
                    tokenizer=base.tokenizer, flip=class_subject.flip, cache_latents=config.cache_latents,
                    cache_text=not train_text,
                )  # fmt: skip
            try:
                tuners.append(
                    inject_lora(unet, unet_lora_targets(unet), config.rank, alpha, derive_seed(config.seed, "unet"))
                )
                if train_text:
                    tuners.append(
                        inject_lora(
                            text_encoder,
                            text_encoder_lora_targets(text_encoder),
                            config.rank,
                            alpha,
                            derive_seed(config.seed, "text_encoder"),
                        )
                    )
                unet_params = lora_parameters(unet)
                text_params = lora_parameters(text_encoder) if train_text else []
                for parameter in unet_params + text_params:
                    parameter.data = parameter.data.float()
                    parameter.requires_grad_(True)
                if config.gradient_checkpointing:
                    unet.enable_gradient_checkpointing()
                unet.train()
                if train_text:
                    text_encoder.train()
                optimization = _optimization(unet_params, text_params, config, autocast_dtype)
                loop = run_training_loop(
                    LoopModels(unet, vae, text_encoder, base.noise_scheduler),
                    instance,
                    optimization,
                    LoopSettings(
                        steps=config.steps,
                        batch_size=config.batch_size,
                        seed=config.seed,
                        noise_offset=config.noise_offset,
                        min_snr_gamma=config.min_snr_gamma,
                        max_grad_norm=config.max_grad_norm,
                        prior_loss_weight=config.prior_loss_weight,
                        autocast_dtype=autocast_dtype,
                    ),
                    callbacks,
                    prior=prior,
                )
                state = kohya_state_dict(unet, text_encoder if train_text else None, config.rank, alpha)
            finally:
                optimization = None
                for tuner in reversed(tuners):
                    remove_lora(tuner)
                tuners.clear()
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    bad = [key for key, tensor in state.items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise NonFiniteLossError(config.steps, f"LoRA weight {bad[0]}")
    counts = (
        sum(1 for k in state if k.startswith(UNET_PREFIX) and k.endswith(".alpha")),
        sum(1 for k in state if k.startswith(TEXT_ENCODER_PREFIX) and k.endswith(".alpha")),
    )
    fingerprint = lora_fingerprint(base_fingerprint, subject, config, class_source) if base_fingerprint else ""
    metadata = _metadata(
        config, subject, base_model_name, base_fingerprint, fingerprint, loop.losses, counts, device,
        autocast_dtype, loop.seconds, loop.instance_losses, loop.prior_losses,
        len(class_subject) if class_subject is not None else 0, class_info,
    )  # fmt: skip
    logger.info(
        "LoRA trained in %.1f s (%.1f s with caching): %d UNet + %d text-encoder modules, loss %.4f -> %.4f",
        loop.seconds, time.monotonic() - started, counts[0], counts[1], loop.losses[0], loop.losses[-1],
    )  # fmt: skip
    return LoRAResult(
        state_dict=state,
        losses=loop.losses,
        metadata=metadata,
        unet_modules=counts[0],
        text_encoder_modules=counts[1],
        fingerprint=fingerprint,
        seconds=loop.seconds,
        instance_losses=loop.instance_losses,
        prior_losses=loop.prior_losses,
    )


_SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def save_lora(
    result: LoRAResult,
    path: str | os.PathLike,
    overwrite: bool = False,
    dtype: torch.dtype | None = torch.float16,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``result`` as a kohya LoRA ``.safetensors`` file, atomically; returns the path.

    Up/down weights are cast to ``dtype`` (fp16 by default, like most shared LoRAs; None keeps
    fp32); ``.alpha`` stays fp32 so its value is exact. Refuses to replace an existing file
    unless ``overwrite``, and refuses weights that do not fit ``dtype`` (use fp32 then).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA file name must end in .safetensors, got {path.name}")
    refuse_existing(path, overwrite)
    metadata = check_metadata({**result.metadata, **(extra_metadata or {})})
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in result.state_dict.items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and not key.endswith(".alpha"):
            tensor = tensor.to(dtype)
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"LoRA tensor {key} is not finite in {dtype}; save with dtype=torch.float32 or retrain with a "
                f"lower learning rate"
            )
        tensors[key] = tensor.contiguous()
    metadata["dbs.save_dtype"] = str(dtype).replace("torch.", "") if dtype is not None else "float32"
    return atomic_save_safetensors(tensors, path, metadata=metadata, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


class TerminalProgress(TrainingCallbacks):
    """A one-line progress bar on a terminal stream, redrawn with carriage returns."""

    def __init__(self, stream: Any = None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.total = 0

    def on_generate_step(self, done: int, total: int) -> None:
        filled = int(self.width * done / max(total, 1))
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] class images: step {done}/{total}")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()

    def on_train_begin(self, total_steps: int) -> None:
        self.total = total_steps

    def on_step_end(self, state: StepState) -> None:
        done = state.step / max(state.total_steps, 1)
        filled = int(self.width * done)
        per_step = state.elapsed / state.step
        eta = per_step * (state.total_steps - state.step)
        line = (
            f"\r[{'#' * filled}{'.' * (self.width - filled)}] {state.step}/{state.total_steps} "
            f"loss {state.loss:.4f} lr {state.lr:.2e} {per_step:.2f} s/step eta {_duration(eta)}"
        )
        self.stream.write(line)
        self.stream.flush()

    def on_train_end(self, losses: list[float]) -> None:
        self.stream.write("\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _default_tokenizer_dir() -> Path | None:
    for candidate in (os.environ.get("DBS_TOKENIZER"), os.environ.get("COMFYUI_PATH")):
        if candidate:
            path = Path(candidate)
            for folder in (path, path / "comfy" / "sd1_tokenizer"):
                if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
                    return folder
    return None


def add_run_arguments(parser: argparse.ArgumentParser, output_help: str) -> None:
    """The options every training command shares: photos, prompts, output, tokenizer, device,
    prior-preservation class images (the config fields are added by add_config_arguments)."""
    parser.add_argument("--images", required=True, type=Path, help="folder with 3-20 photos of the subject")
    parser.add_argument("--instance-prompt", required=True, help="prompt naming the subject, e.g. 'a photo of sks dog'")
    parser.add_argument("--class-prompt", default="",
                        help="prompt of the subject's class, e.g. 'a photo of dog' (needed for prior preservation)")
    parser.add_argument("--output", required=True, type=Path, help=output_help)
    parser.add_argument(
        "--tokenizer", type=Path, default=None,
        help="CLIP tokenizer folder (ComfyUI's comfy/sd1_tokenizer); default: $DBS_TOKENIZER, "
        "$COMFYUI_PATH/comfy/sd1_tokenizer, or a diffusers folder's tokenizer/",
    )  # fmt: skip
    parser.add_argument("--resolution", type=int, default=512, help="training resolution, a multiple of 64 (default 512)")
    parser.add_argument("--flip", action="store_true", help="random horizontal flip augmentation")
    parser.add_argument("--captions", action="store_true", help="use <image>.txt next to each image as its caption")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--loss-curve", type=Path, default=None, help="also write the loss curve as a PNG")
    parser.add_argument("--class-folder", type=Path, default=None,
                        help="prior preservation: use these class images (at most --class-images) instead of "
                             "generating them")
    parser.add_argument("--class-cache", type=Path, default=None,
                        help="prior preservation: where generated class images are kept "
                             "(default ~/.cache/dreambooth_studio/class_images)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainers.lora",
        description="Train an SD1.5 LoRA on photos of a subject and save it in kohya format.",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="SD1.5 single-file .safetensors (or diffusers folder)")
    add_run_arguments(parser, "LoRA file to write (.safetensors)")
    parser.add_argument("--save-dtype", choices=sorted(_SAVE_DTYPES), default="fp16", help="dtype of the saved weights")
    add_config_arguments(parser, LoRATrainConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(LoRATrainConfig, args)
    except ConfigError as error:
        parser.error(str(error))
    output = args.output
    if output.suffix != ".safetensors":
        parser.error(f"--output must end in .safetensors, got {output.name}")
    if output.exists() and not args.overwrite:
        parser.error(f"{output} exists; pass --overwrite or choose another name")
    if not output.parent.is_dir():
        parser.error(f"output folder {output.parent} does not exist")

    from .checkpoint import (
        CheckpointError,
        describe_checkpoint,
        load_sd15_diffusers_folder,
        load_sd15_single_file,
    )
    from .fileio import sha256_file
    from .images import load_subject_folder

    try:
        subject = load_subject_folder(
            args.images, args.instance_prompt, args.class_prompt, args.resolution, flip=args.flip,
            sidecar_captions=args.captions,
        )
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    tokenizer = args.tokenizer or _default_tokenizer_dir()
    base_fingerprint = ""
    if not args.checkpoint.is_dir():
        if tokenizer is None:
            parser.error("no tokenizer folder: pass --tokenizer (e.g. ComfyUI/comfy/sd1_tokenizer)")
        try:
            describe_checkpoint(args.checkpoint)  # header only: not SD1.5 is an error, not a traceback
        except CheckpointError as error:
            parser.error(str(error))
        logger.info("hashing %s", args.checkpoint.name)
        base_fingerprint = sha256_file(args.checkpoint)
    from .dreambooth import default_class_cache
    from .jobs import plan_prior, realize_prior

    # Check the prior-preservation inputs (class prompt, class folder) before loading the base model.
    class_cache = args.class_cache or default_class_cache()
    try:
        plan = plan_prior(config, subject, base_fingerprint or f"folder:{args.checkpoint.resolve()}", class_cache,
                          args.class_folder, tokenizer)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    if args.checkpoint.is_dir():
        base = load_sd15_diffusers_folder(args.checkpoint, tokenizer)
    else:
        base = load_sd15_single_file(args.checkpoint, tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else torch.device(args.device)
    for model in (base.unet, base.vae, base.text_encoder):
        model.to(device)
    progress = TerminalProgress()
    class_data = realize_prior(plan, base, class_cache, progress, tokenizer)
    if plan.enabled:
        print(plan.report)
    result = train_lora(
        base, subject, config, progress, base_model_name=args.checkpoint.name,
        base_fingerprint=base_fingerprint, class_subject=class_data, class_source=plan.source,
        class_info=plan.info(),
    )  # fmt: skip
    path = save_lora(result, output, overwrite=args.overwrite, dtype=_SAVE_DTYPES[args.save_dtype])
    print(f"saved {path} ({result.unet_modules} UNet + {result.text_encoder_modules} text-encoder modules, "
          f"final loss {result.losses[-1]:.4f})")  # fmt: skip
    if args.loss_curve is not None:
        from PIL import Image

        extra = {"instance": result.instance_losses, "prior": result.prior_losses} if result.prior_losses else None
        curve = loss_curve_image(result.losses, title=f"LoRA loss: {output.stem}", extra_curves=extra)
        Image.fromarray((curve[0].numpy() * 255).round().astype("uint8")).save(args.loss_curve)
        print(f"loss curve: {args.loss_curve}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
