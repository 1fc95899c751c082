"""LoRA training of SD1.5 on a subject, exported in the kohya format every SD1.5 tool reads.

What is trained (peft LoRA layers, base weights frozen, LoRA weights fp32; the frozen weights
of the UNet, VAE and a frozen text encoder are stored in the compute precision, bf16 or fp16 when
``precision`` resolves to one, as the diffusers and kohya recipes do):

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

DoRA (``lora_type`` "dora", :func:`add_magnitudes`): each adapted weight W becomes
``W' = (W + s·up@down) · m / ||W + s·up@down||``, the norm taken per INPUT column (over the output
axis and the kernel) and ``m`` a learned vector with one magnitude per input feature or channel,
exported as ``.dora_scale`` of shape (1, in) or (1, in, 1, 1): LyCORIS' ``dora_wd`` layout, which
ComfyUI's loader normalises by ``W + ΔW`` as trained (its output-axis branch, peft's layout,
normalises by the base weight alone). Scaling a column of W' by c_j is scaling input j by c_j, so
training keeps peft's LoRA layer and multiplies its input by ``c = m / ||W + s·up@down||`` (the
norm recomputed each forward without gradient, as the DoRA paper does to save memory). The bias
is not scaled.

The base models passed in are left as they came: adapters are injected for training and removed
afterwards (no copy of the 860M-parameter UNet), and ``requires_grad``, train/eval mode, gradient
checkpointing and each weight's dtype are restored, also when training fails or a callback raises.
Frozen weights stored in bf16/fp16 for training are cast back to their dtype without keeping a
copy: their values are then those of that precision (exactly the same for an fp16 checkpoint
trained in fp16; rounded to bf16's 8 bits of mantissa when trained in bf16).

Whole runs (checks, base model, class images, reuse, provenance) go through :mod:`trainers.jobs`;
the command line is ``python -m trainers lora``.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..data.subject import SubjectData
from ..files.fileio import atomic_save_safetensors, check_metadata, refuse_existing
from ..sd15.checkpoint import SD15Components
from .callbacks import LossHistory, NonFiniteLossError, TrainingCallbacks, WithLossHistory
from .config import LoRATrainConfig
from .loop import (
    OPTIMIZER_DESCRIPTIONS,
    LoopModels,
    LoopSettings,
    LoopState,
    Optimization,
    autocast_dtype_for,
    build_optimization,
    cast_frozen,
    check_trainable,
    derive_seed,
    model_device,
    prepare_training_sets,
    run_training_loop,
)
from .record import Provenance, training_metadata
from .residency import Residency, after_caching
from .saving import PrecisionOverflow
from .watch import WatchConfig, WatchOutcome, watcher_for

logger = logging.getLogger(__name__)

ADAPTER_NAME = "dbs_lora"
UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"

_UNET_TARGET = re.compile(r"(^|\.)transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
# conv_layers (LoCon): the 3x3 convolutions of the ResNet blocks and of the down/upsamplers (not
# conv_in/conv_out), as kohya's conv_dim and LyCORIS' LoCon take them
_UNET_CONV_TARGET = re.compile(r"(^|\.)(resnets\.\d+\.(conv1|conv2)|downsamplers\.\d+\.conv|upsamplers\.\d+\.conv)$")
_TEXT_TARGET = re.compile(r"(^|\.)encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$")
# transformers 4 nests CLIP's modules under ``text_model``; 5 does not. Kohya names always have it.
_TEXT_MODEL = "text_model."


# ---------------------------------------------------------------------------------------------
# Which modules, and their kohya names
# ---------------------------------------------------------------------------------------------


def unet_lora_targets(unet: torch.nn.Module, conv_layers: bool = False) -> list[str]:
    """Module paths of the UNet attention projections that get LoRA layers (and with
    ``conv_layers`` the 3x3 convolutions of the ResNet blocks and down/upsamplers)."""
    return [
        name
        for name, module in unet.named_modules()
        if (_UNET_TARGET.search(name) and isinstance(module, torch.nn.Linear))
        or (conv_layers and _UNET_CONV_TARGET.search(name) and isinstance(module, torch.nn.Conv2d))
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


def expected_kohya_keys(unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None,
                        conv_layers: bool = False, dora: bool = False) -> list[str]:
    """Every tensor name a LoRA of these models holds (text encoder ones only if it is given)."""
    modules = [kohya_unet_name(n) for n in unet_lora_targets(unet, conv_layers)]
    if text_encoder is not None:
        modules += [kohya_text_encoder_name(n) for n in text_encoder_lora_targets(text_encoder)]
    suffixes = ("lora_down.weight", "lora_up.weight", "alpha") + (("dora_scale",) if dora else ())
    return sorted(f"{m}.{suffix}" for m in modules for suffix in suffixes)


def _module_table(unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> dict[str, torch.nn.Module]:
    table = {kohya_unet_name(n): unet.get_submodule(n) for n in unet_lora_targets(unet, conv_layers=True)}
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


def inject_lora(model: torch.nn.Module, targets: list[str], rank: int, alpha: float, seed: int,
                dora: bool = False) -> Any:
    """Add LoRA layers (peft) to ``targets`` in place; returns the peft tuner that removes them again
    (:func:`remove_lora`). ``dora``: DoRA layers (:func:`add_magnitudes`).

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
        tuner = LoraModel(model, config, ADAPTER_NAME)
    if dora:
        add_magnitudes(model)
    return tuner


def remove_lora(tuner: Any) -> None:
    """Replace every LoRA layer by the original module it wrapped (no merging)."""
    for _, layer in _lora_layers(tuner.model):
        _remove_magnitude(layer)
    tuner.unload()
    if "peft_config" in vars(tuner.model):  # peft before 0.18 leaves its config on the model
        del tuner.model.peft_config


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for name, p in model.named_parameters() if f".{ADAPTER_NAME}." in name]


def _lora_layers(model: torch.nn.Module) -> Iterator[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            yield name, module


# ---------------------------------------------------------------------------------------------
# DoRA: a magnitude per input column, trained by scaling the LoRA layer's input
# ---------------------------------------------------------------------------------------------

MAGNITUDE = "dora_magnitude"  # the LoRA layer's submodule (a ModuleDict by adapter, like lora_A)
# ComfyUI adds the machine epsilon of the float32 copy of the weight it patches to the norm
DORA_EPS = torch.finfo(torch.float32).eps


class _Magnitude(torch.nn.Module):
    """One magnitude per input feature (Linear) or input channel (Conv2d), fp32, starting at the
    weight's column norms; and those norms squared (the frozen weight's share of ||W + ΔW||²)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        norms = column_norms(weight)
        self.weight = torch.nn.Parameter(norms)
        self.register_buffer("base_squares", norms.square(), persistent=False)

    def reset(self, weight: torch.Tensor) -> None:
        norms = column_norms(weight).to(self.weight.device)
        self.weight.data.copy_(norms)
        self.base_squares = norms.square()


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each input column of ``weight`` (over the output axis and the kernel), fp32."""
    return torch.linalg.vector_norm(weight.float(), dim=[d for d in range(weight.dim()) if d != 1])


def _merged_norms(layer: Any, magnitude: _Magnitude) -> torch.Tensor:
    """:func:`column_norms` of ``W + s·up@down`` without forming it: per column,
    ``||W||² + 2s·(upᵀW)·down + s²·down·(upᵀup)down``, where ``||W||²`` is kept from the start (W is
    frozen) and ``upᵀW`` reads W once (rank rows), instead of an fp32 copy of W written and read."""
    weight = layer.get_base_layer().weight
    down = layer.lora_A[ADAPTER_NAME].weight.float().flatten(1)  # rank x (in x kernel)
    up = layer.lora_B[ADAPTER_NAME].weight.float().flatten(1)  # out x rank
    scale = float(layer.scaling[ADAPTER_NAME])
    cross = (up.t() @ weight.flatten(1).float()).mul_(down).sum(0)
    square = ((up.t() @ up) @ down).mul_(down).sum(0)
    per_element = cross.mul_(2 * scale).add_(square, alpha=scale * scale)
    squares = magnitude.base_squares + per_element.view(weight.shape[1], -1).sum(1)
    return squares.clamp_min_(0).sqrt_()


def _magnitude(layer: Any) -> _Magnitude | None:
    """A DoRA layer's magnitudes (None on a plain LoRA layer)."""
    magnitudes = getattr(layer, MAGNITUDE, None)
    return magnitudes[ADAPTER_NAME] if magnitudes is not None else None


def _scale_input(layer: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: the input times ``m / ||W + ΔW||`` per input feature or channel."""
    x = args[0]
    magnitude = _magnitude(layer)
    assert magnitude is not None  # the hook is on DoRA layers only
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        norms = _merged_norms(layer, magnitude)
    factor = (magnitude.weight / (norms + DORA_EPS)).to(x.dtype)
    if x.dim() == 4 and isinstance(layer.get_base_layer(), torch.nn.Conv2d):
        factor = factor.view(-1, 1, 1)  # (N, C, H, W): per channel, the same over the image
    return (x * factor, *args[1:])


def add_magnitudes(model: torch.nn.Module) -> int:
    """Turn every injected LoRA layer of ``model`` into a DoRA layer; returns how many. Each magnitude
    starts at its weight's column norms, so the model's output is unchanged until training moves it."""
    count = 0
    for _, layer in _lora_layers(model):
        magnitude = _Magnitude(layer.get_base_layer().weight).to(layer.lora_A[ADAPTER_NAME].weight.device)
        layer.add_module(MAGNITUDE, torch.nn.ModuleDict({ADAPTER_NAME: magnitude}))
        layer._dbs_dora_hook = layer.register_forward_pre_hook(_scale_input)
        count += 1
    return count


def reset_magnitudes(model: torch.nn.Module) -> None:
    """Set every magnitude to its weight's column norms again (after the base weights changed dtype)."""
    with torch.no_grad():
        for _, layer in _lora_layers(model):
            magnitude = _magnitude(layer)
            if magnitude is not None:
                magnitude.reset(layer.get_base_layer().weight)


def _remove_magnitude(layer: Any) -> None:
    hook = vars(layer).pop("_dbs_dora_hook", None)
    if hook is not None:
        hook.remove()
    if MAGNITUDE in layer._modules:
        del layer._modules[MAGNITUDE]


def kohya_state_dict(
    unet: torch.nn.Module, text_encoder: torch.nn.Module | None, rank: int, alpha: float
) -> dict[str, torch.Tensor]:
    """The trained LoRA layers of models with injected adapters, as kohya tensors (fp32, CPU copies);
    with DoRA layers, each module's magnitudes as ``.dora_scale`` (1 x in, or 1 x in x 1 x 1)."""
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
            magnitude = _magnitude(layer)
            if magnitude is not None:
                shape = (1, -1) + (1,) * (layer.get_base_layer().weight.dim() - 2)
                state[f"{name}.dora_scale"] = magnitude.weight.detach().float().cpu().reshape(shape).clone()
    return state


def merged_weight(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha: float | None,
                  dora_scale: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
    """``weight`` with one kohya module merged at ``strength``, fp32, computed as ComfyUI's LoRA
    loader does (``comfy/weight_adapter``): ``W + strength · alpha/rank · up @ down``; with a
    ``dora_scale``, ``W' = (W + alpha/rank · up @ down) · dora_scale / (||·|| + eps)`` and then
    ``W + strength · (W' - W)``. The norm is per input column for a (1, in, ...) scale (our files,
    LyCORIS' ``dora_wd``); for a scale with one value per output row ComfyUI divides by the norm of
    the BASE weight's rows, and so does this, so the merge matches what ComfyUI generates."""
    weight = weight.float()
    down, up = down.float(), up.float()
    rank = down.shape[0]
    scale = (float(alpha) if alpha is not None else float(rank)) / rank
    update = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    if dora_scale is None:
        return weight + (strength * scale) * update
    dora_scale = dora_scale.float()
    merged = weight + update * scale
    if dora_scale.shape[0] == merged.shape[0]:  # one magnitude per output row
        norms = weight.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    else:  # ComfyUI's own sequence of operations (the same float sums)
        norms = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (weight.dim() - 2))
    merged = merged * (dora_scale / (norms + DORA_EPS))
    if strength == 1.0:
        return merged
    return weight + strength * (merged - weight)


@torch.no_grad()
def apply_lora(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    state_dict: Mapping[str, torch.Tensor],
    unet_scale: float = 1.0,
    text_encoder_scale: float = 1.0,
) -> dict[str, int]:
    """Merge a kohya LoRA into the weights of ``unet`` / ``text_encoder`` IN PLACE (pass copies).

    ``W += scale * alpha / rank * up @ down`` (for a convolution, its kernel ``down`` as a matrix
    of rank x (in x kh x kw) and ``up`` as out x rank, the product reshaped to the kernel); a
    module with a ``.dora_scale`` (DoRA) is merged as ComfyUI merges it, the scale being its
    strength (:func:`merged_weight`). Returns ``{"unet": n, "text_encoder": m}`` modules
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
        alpha_key = f"{name}.alpha"
        alpha = float(state_dict[alpha_key]) if alpha_key in state_dict else None
        is_unet = name.startswith(UNET_PREFIX)
        strength = unet_scale if is_unet else text_encoder_scale
        layer = table[name]
        dora_scale = state_dict.get(f"{name}.dora_scale")
        if dora_scale is None:  # in the layer's dtype, as before DoRA existed (same merged bits)
            rank = down.shape[0]
            scale = strength * (alpha if alpha is not None else float(rank)) / rank
            delta = up.flatten(1) @ down.flatten(1)
            layer.weight += (scale * delta.reshape(layer.weight.shape)).to(layer.weight.device, layer.weight.dtype)
        else:
            device = layer.weight.device
            merged = merged_weight(layer.weight, down.to(device), up.to(device), alpha, dora_scale.to(device), strength)
            layer.weight.copy_(merged.to(layer.weight.dtype))
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
    dtypes: dict[str, torch.dtype]


def _snapshot(model: torch.nn.Module) -> _ModelState:
    checkpointing = getattr(model, "is_gradient_checkpointing", None) if hasattr(model, "enable_gradient_checkpointing") else None
    return _ModelState(
        requires_grad={name: p.requires_grad for name, p in model.named_parameters()},
        training={name: m.training for name, m in model.named_modules()},
        checkpointing=checkpointing,
        dtypes={name: p.dtype for name, p in model.named_parameters()},
    )


def _restore(model: torch.nn.Module, state: _ModelState) -> None:
    if state.checkpointing is not None and model.is_gradient_checkpointing != state.checkpointing:
        if state.checkpointing:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()
    for name, parameter in model.named_parameters():
        if name in state.dtypes and parameter.dtype != state.dtypes[name] and not parameter.is_meta:
            parameter.data = parameter.data.to(state.dtypes[name])
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
class LoRAResult(WithLossHistory):
    """A trained LoRA, not yet saved."""

    state_dict: dict[str, torch.Tensor]  # kohya keys, fp32, CPU
    history: LossHistory  # one loss per optimizer step (with its subject and class parts)
    metadata: dict[str, str]  # training_metadata(...) with the LoRA keys; provenance is added on save
    unet_modules: int
    text_encoder_modules: int
    seconds: float = 0.0  # training time (with samples and validation), without model setup and caching
    watched: WatchOutcome = field(default_factory=WatchOutcome)  # sample rounds and their cost


def _check_inputs(
    base: SD15Components, subject: SubjectData, config: LoRATrainConfig, class_subject: SubjectData | None
) -> None:
    if not isinstance(config, LoRATrainConfig):
        raise TypeError(f"config must be a LoRATrainConfig, got {type(config).__name__}")
    check_trainable(base, subject, class_subject, config.with_prior, config.train_text_encoder)
    for name in ("unet", "text_encoder"):
        if _has_lora_layers(getattr(base, name)):
            raise ValueError(f"the {name} already has LoRA layers injected; pass a clean base model")


def _network_args(config: LoRATrainConfig) -> dict[str, str]:
    args = {"conv_dim": str(config.rank), "conv_alpha": f"{config.effective_alpha:g}"} if config.conv_layers else {}
    if config.lora_type == "dora":
        args["dora_wd"] = "True"
    return args


def _lora_metadata(config: LoRATrainConfig, counts: tuple[int, int]) -> dict[str, str]:
    """The keys only a LoRA file has (network shape, optimizer, which modules)."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": f"{config.effective_alpha:g}",
        "ss_network_train_unet_only": str(not config.train_text_encoder),
        "ss_optimizer": OPTIMIZER_DESCRIPTIONS[config.optimizer],
        # kohya's LoCon arguments (the convolutions with the same rank and alpha), when on
        # and LyCORIS' DoRA flag (magnitudes per input column, the .dora_scale keys)
        **({"ss_network_args": json.dumps(_network_args(config))} if _network_args(config) else {}),
        **({"dbs.lora_type": config.lora_type} if config.lora_type != "lora" else {}),
        "dbs.unet_modules": str(counts[0]),
        "dbs.text_encoder_modules": str(counts[1]),
        "dbs.lora_targets": json.dumps(
            {
                "unet": "transformer_blocks.*.attn1/attn2.to_q,to_k,to_v,to_out.0"
                + ("; resnets.*.conv1,conv2; downsamplers/upsamplers.*.conv" if config.conv_layers else ""),
                "text_encoder": "encoder.layers.*.self_attn.q_proj,k_proj,v_proj,out_proj"
                if config.train_text_encoder
                else "",
            }
        ),
    }


def train_lora(
    base: SD15Components,
    subject: SubjectData,
    config: LoRATrainConfig,
    callbacks: TrainingCallbacks | None = None,
    class_subject: SubjectData | None = None,
    resume: LoopState | None = None,
    save_every: int = 0,
    watch: WatchConfig | None = None,
    sample_dir: str | os.PathLike | None = None,
    run: str = "",
    residency: Residency | None = None,
) -> LoRAResult:
    """Train a LoRA of ``base`` on ``subject``; returns the kohya tensors, losses and metadata.

    Training runs where ``base.unet`` is (the VAE and text encoder run where they are). The
    models are returned unchanged. ``class_subject`` holds the class images when
    ``config.with_prior``. ``watch`` adds sample images (written to ``sample_dir`` when given,
    for the job ``run``) and the validation loss; they do not change the trained weights.
    Raises NonFiniteLossError if training diverges; whatever a callback raises propagates after
    cleanup.
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
    train_text = config.train_text_encoder
    alpha = config.effective_alpha
    dora = config.lora_type == "dora"
    started = time.monotonic()
    logger.info(
        "%s training: %d images at %dpx, rank %d, alpha %g, %d steps, unet lr %g, text encoder %s, on %s",
        "DoRA" if dora else "LoRA", len(subject), subject.resolution, config.rank, alpha, config.steps, config.unet_lr,
        f"lr {config.text_encoder_lr:g}" if train_text else "frozen", device,
    )  # fmt: skip

    class_count = len(class_subject) if class_subject is not None else 0
    tuners: list[Any] = []
    optimization: Optimization | None = None
    try:
        with torch.inference_mode(False), torch.enable_grad(), _restored_afterwards(unet, vae, text_encoder):
            for model in (unet, vae, text_encoder):
                model.requires_grad_(False)
            vae.eval()
            text_encoder.eval()
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
            try:
                tuners.append(
                    inject_lora(unet, unet_lora_targets(unet, config.conv_layers), config.rank, alpha,
                                derive_seed(config.seed, "unet"), dora=dora)
                )
                if train_text:
                    tuners.append(
                        inject_lora(
                            text_encoder,
                            text_encoder_lora_targets(text_encoder),
                            config.rank,
                            alpha,
                            derive_seed(config.seed, "text_encoder"),
                            dora=dora,
                        )
                    )
                unet_params = lora_parameters(unet)
                text_params = lora_parameters(text_encoder) if train_text else []
                for parameter in unet_params + text_params:
                    parameter.data = parameter.data.float()
                    parameter.requires_grad_(True)
                cast_frozen(unet, frozen_dtype, keep=unet_params)
                if train_text:
                    cast_frozen(text_encoder, frozen_dtype, keep=text_params)
                if dora:  # the magnitudes start at the norms of the weights as they now compute
                    for model in (unet, text_encoder) if train_text else (unet,):
                        reset_magnitudes(model)
                if config.gradient_checkpointing:
                    unet.enable_gradient_checkpointing()
                unet.train()
                if train_text:
                    text_encoder.train()
                optimization = build_optimization(config, unet_params, text_params, autocast_dtype)

                def result_so_far(history: LossHistory, seconds: float = 0.0) -> LoRAResult:
                    state = kohya_state_dict(unet, text_encoder if train_text else None, config.rank, alpha)
                    return _lora_result(state, config, subject, history, device, autocast_dtype, class_count, seconds)

                loop = run_training_loop(models, instance, optimization, settings, callbacks, prior=prior,
                                         resume=resume, snapshot=result_so_far, watch=watcher)
                result = result_so_far(loop.history, loop.seconds)
                if watcher is not None:
                    result.watched = watcher.outcome
            finally:
                optimization = None
                for tuner in reversed(tuners):
                    remove_lora(tuner)
                tuners.clear()
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    logger.info(
        "LoRA trained in %.1f s (%.1f s with caching): %d UNet + %d text-encoder modules, loss %.4f -> %.4f",
        loop.seconds, time.monotonic() - started, result.unet_modules, result.text_encoder_modules,
        loop.losses[0], loop.losses[-1],
    )  # fmt: skip
    return result


def _lora_result(state: dict[str, torch.Tensor], config: LoRATrainConfig, subject: SubjectData,
                 history: LossHistory, device: torch.device, autocast_dtype: torch.dtype | None, class_count: int,
                 seconds: float) -> LoRAResult:
    """The kohya tensors with their metadata, after the steps ``history`` recorded."""
    bad = [key for key, tensor in state.items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise NonFiniteLossError(len(history.losses), f"LoRA weight {bad[0]}")
    counts = (
        sum(1 for k in state if k.startswith(UNET_PREFIX) and k.endswith(".alpha")),
        sum(1 for k in state if k.startswith(TEXT_ENCODER_PREFIX) and k.endswith(".alpha")),
    )
    metadata = training_metadata(config, subject, history, device, autocast_dtype, class_count,
                                 extra=_lora_metadata(config, counts))
    return LoRAResult(state_dict=state, history=history, metadata=metadata, unet_modules=counts[0],
                      text_encoder_modules=counts[1], seconds=seconds)


def save_lora(
    result: LoRAResult,
    path: str | os.PathLike,
    overwrite: bool = False,
    dtype: torch.dtype | None = torch.float16,
    provenance: Provenance | None = None,
) -> Path:
    """Write ``result`` as a kohya LoRA ``.safetensors`` file, atomically; returns the path.

    Up/down weights are cast to ``dtype`` (fp16 by default, like most shared LoRAs; None keeps
    fp32); ``.alpha`` stays fp32 so its value is exact. ``provenance`` (from the job) names the
    base model and the run fingerprint. Refuses to replace an existing file unless
    ``overwrite``, and refuses weights that do not fit ``dtype`` (use fp32 then).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA file name must end in .safetensors, got {path.name}")
    refuse_existing(path, overwrite)
    metadata = check_metadata({**result.metadata, **(provenance or Provenance()).metadata()})
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in result.state_dict.items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and not key.endswith(".alpha"):
            tensor = tensor.to(dtype)
        if not bool(torch.isfinite(tensor).all()):
            raise PrecisionOverflow(
                f"LoRA tensor {key} is not finite in {dtype}; save with dtype=torch.float32 or retrain with a "
                f"lower learning rate", str(dtype).replace("torch.", ""))
        tensors[key] = tensor.contiguous()
    metadata["dbs.save_dtype"] = str(dtype).replace("torch.", "") if dtype is not None else "float32"
    return atomic_save_safetensors(tensors, path, metadata=metadata, overwrite=overwrite)
