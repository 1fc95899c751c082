"""A memory plan before loading: how much a run will need at its peak, and whether it fits.

:func:`plan_memory` estimates, from the base model's header alone (no weights read), the peak of
each phase of a run on a device:

- ``load``: the VAE and text encoder in the dtype they are loaded in (and the UNet, when class
  images are generated first), plus the largest tensor being read;
- ``cache``: the same, plus the VAE encoding the photos for the latent cache;
- ``train``: the UNet (and what else stays resident after caching, see ``training.residency``),
  the trained weights' gradients (only the largest with ``fused_backward``), the optimizer states,
  the activations kept for the backward pass, and a sample round's VAE when samples are on;
- ``save`` (a checkpoint): every part, plus one tensor being written.

The activation term is fitted to peak RSS measured on the CPU at 64, 128 and 256 px
(``bench/memory_plan.py`` checks the whole estimate against measurements); on a GPU the same
terms are an estimate that no GPU here has measured. :func:`check_memory` refuses a run that will
not fit the free memory, before the base model loads, and names settings that would fit.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..sd15 import checkpoint, convert
from .config import check_device

log = logging.getLogger(__name__)

GB = 1024**3
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# What the process holds besides the models: Python, torch, diffusers and transformers, the
# tokenizer, the cached latents and what the allocator keeps of freed memory (measured on the
# CPU); a CUDA context on a GPU.
RUNTIME_BYTES = {"cpu": int(0.85 * GB), "cuda": int(0.6 * GB)}
# Activations kept for the backward pass of a batch of one in fp32 (bf16/fp16 halve them): a part
# that does not grow with the image, and a part per latent pixel (a 64 px image has 8 x 8).
# Fitted to peak RSS at 64, 128 and 256 px (bench/memory_plan.py). Gradient checkpointing keeps
# about a fifth of the growing part.
ACTIVATION_BASE_BYTES = int(0.35 * GB)
ACTIVATION_BYTES_PER_LATENT_PIXEL = 0.6 * 1024**2
CHECKPOINTING_SHARE = 0.2
# Weight-by-weight optimizer steps (fused_backward, bf16 weights, Adafactor) hold about this many
# fp32 temporaries of the largest weight at once.
UPDATE_BUFFERS = 4.5
# Encoding images for the latent cache (up to 4 at a time): bytes per image pixel in fp32.
ENCODE_BYTES_PER_PIXEL = 2500
SKIP_ENV = "DBS_SKIP_MEMORY_CHECK"
# DoRA keeps one more copy of each adapted layer's input for the backward pass (the input scaled by
# its magnitudes), counted with forward hooks on SD1.5's UNet at 64 and 128 px: elements per latent
# pixel of a batch image for the attention projections and for the 3x3 convolutions (conv_layers),
# and the 77 x 768 text context that the 32 cross-attention to_k/to_v read, whatever the size.
DORA_ATTENTION_INPUTS_PER_LATENT_PIXEL = 16_920
DORA_CONV_INPUTS_PER_LATENT_PIXEL = 9_460
DORA_CONTEXT_INPUTS = 32 * 77 * 768
TEXT_TOKENS = 77
# and computes each weight's column norms every forward from up^T @ W, which takes an fp32 copy of
# W when the frozen weights are bf16/fp16 (one weight at a time)
DORA_NORM_BUFFERS = 1


class MemoryPlanError(MemoryError):
    """The run will not fit; the message says how much it needs, what is free and what would fit."""


@dataclass(frozen=True)
class MemoryPlan:
    device: str  # "cpu" or "cuda"
    phases: dict[str, int]  # peak bytes of each phase
    parts: list[tuple[str, int]] = field(default_factory=list)  # what the training peak is made of

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.__getitem__)

    def describe(self) -> str:
        inside = ", ".join(f"{name} {human(size)}" for name, size in self.parts if size >= 0.05 * GB)
        return f"about {human(self.peak)} at its peak ({self.peak_phase}; training: {inside})"


def human(size: float) -> str:
    return f"{size / GB:.1f} GB"


@dataclass(frozen=True)
class _Sizes:
    """Element counts of the base model's parts and the largest tensor, from the header."""

    numel: dict[str, int]
    largest: int  # elements of the largest tensor
    unet_tensors: list[tuple[int, ...]]  # shapes of the UNet's tensors (for Adafactor's factored states)
    text_tensors: list[tuple[int, ...]]
    lora_pairs: list[tuple[int, int, str]]  # (in, out, part) of every LoRA target
    conv_pairs: list[tuple[int, int, str]]  # and of the convolutions conv_layers adds


# The weights a LoRA adapts, as named in a single file (LDM) or a diffusers folder.
LORA_UNET_TARGET = re.compile(r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$")
LORA_TEXT_TARGET = re.compile(r"encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.weight$")


# The UNet's 3x3 convolutions but conv_in/conv_out (LDM: input_blocks.0.0, out.2), which
# conv_layers adapts; a single file's and a diffusers folder's UNet keys
_UNET_KEY = re.compile(r"^(model\.diffusion_model\.|unet\.)")
_UNET_CONV_EDGES = re.compile(r"(input_blocks\.0\.0|\.out\.2|conv_in|conv_out)\.weight$")


def lora_conv_shapes(shapes: dict[str, tuple[int, ...]]) -> list[tuple[int, int, str]]:
    """(in x kh x kw, out, "unet") of every convolution ``conv_layers`` adapts."""
    return [(shape[1] * 9, shape[0], "unet") for key, shape in shapes.items()
            if len(shape) == 4 and shape[2:] == (3, 3) and _UNET_KEY.search(key) and not _UNET_CONV_EDGES.search(key)]


def lora_target_shapes(shapes: dict[str, tuple[int, ...]],
                       conv_layers: bool = False) -> list[tuple[int, int, str]]:
    """(in, out, "unet" or "text_encoder") of every weight a LoRA adapts (with ``conv_layers``
    the convolutions too: :func:`lora_conv_shapes`)."""
    found = lora_conv_shapes(shapes) if conv_layers else []
    for key, shape in shapes.items():
        if len(shape) != 2:
            continue
        if LORA_UNET_TARGET.search(key):
            found.append((shape[1], shape[0], "unet"))
        elif LORA_TEXT_TARGET.search(key):
            found.append((shape[1], shape[0], "text_encoder"))
    return found


def _sizes(base_model: Path) -> _Sizes:
    shapes = checkpoint.weight_shapes(base_model)
    numel = dict.fromkeys(checkpoint.COMPONENTS, 0)
    unet, text = [], []
    if base_model.is_dir():
        owners = {key: key.split(".", 1)[0] for key in shapes}
    else:
        parts, _, _ = convert.split_ldm_keys(shapes)
        owners = {key: name for name, keys in parts.items() for key in keys}
    for key, owner in owners.items():
        if owner not in numel:
            continue
        numel[owner] += math.prod(shapes[key])
        (unet if owner == "unet" else text if owner == "text_encoder" else []).append(shapes[key])
    largest = max((math.prod(shape) for key, shape in shapes.items() if key in owners), default=0)
    return _Sizes(numel, largest, unet, text, lora_target_shapes(shapes), lora_conv_shapes(shapes))


# fp32 states per trained weight (Adafactor's are factored: see _adafactor_states; AdamW8bit's are bytes)
STATES_PER_WEIGHT = {"adamw": 2, "prodigy": 4}


def _adafactor_states(shapes: Iterable[tuple[int, ...]]) -> int:
    """Elements of Adafactor's states without momentum: a tensor of 2+ dimensions keeps the mean
    square over its last dimension and over its second-to-last (a 3x3 convolution's states are
    2/3 of its size, a linear layer's one row and one column); a vector keeps one per element."""
    total = 0
    for shape in shapes:
        if len(shape) >= 2:
            total += math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]
        else:
            total += math.prod(shape)
    return total


def load_dtypes(config: Any, device: torch.device | str | None = None) -> dict[str, torch.dtype]:
    """The dtype each part is loaded and kept in for ``config`` on ``device``: frozen parts in the
    compute precision, trained weights in fp32 (or bf16 with ``weight_precision`` bf16)."""
    compute = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        config.compute_precision(device)]
    trained = torch.bfloat16 if getattr(config, "weight_precision", "fp32") == "bf16" else torch.float32
    if config.method == "lora":  # base weights stay frozen; the LoRA weights are fp32
        return {"unet": compute, "vae": compute, "text_encoder": compute}
    return {"unet": trained, "vae": compute, "text_encoder": trained if config.train_text_encoder else compute}


def activation_bytes(config: Any, resolution: int, batch: int, compute: str) -> int:
    latent_pixels = (resolution // 8) ** 2
    share = CHECKPOINTING_SHARE if config.gradient_checkpointing else 1.0
    width = _BYTES[compute] / 4
    return int((ACTIVATION_BASE_BYTES + ACTIVATION_BYTES_PER_LATENT_PIXEL * latent_pixels * batch * share) * width)


def magnitude_count(pairs: Iterable[tuple[int, int, str]], conv_pairs: Iterable[tuple[int, int, str]],
                    train_text: bool) -> int:
    """DoRA's magnitudes: one per input feature of each adapted linear layer and per input channel of
    each adapted convolution (``conv_pairs`` hold in x 3 x 3)."""
    linear = sum(n_in for n_in, _, part in pairs if part == "unet" or train_text)
    return linear + sum(n_in // 9 for n_in, _, _ in conv_pairs)


def dora_input_bytes(config: Any, resolution: int, batch: int, compute: str, text_inputs: int) -> int:
    """The activations DoRA adds: a copy of each adapted layer's scaled input (see the constants);
    ``text_inputs``: the summed input widths of the adapted text-encoder layers."""
    latent_pixels = (resolution // 8) ** 2
    share = CHECKPOINTING_SHARE if config.gradient_checkpointing else 1.0
    per_pixel = DORA_ATTENTION_INPUTS_PER_LATENT_PIXEL + (DORA_CONV_INPUTS_PER_LATENT_PIXEL if config.conv_layers else 0)
    unet = (per_pixel * latent_pixels + DORA_CONTEXT_INPUTS) * share
    text = text_inputs * TEXT_TOKENS if config.train_text_encoder else 0
    return int((unet + text) * batch * _BYTES[compute])


def encode_bytes(resolution: int, images: int, compute: str) -> int:
    """What encoding the images for the latent cache adds (the VAE encodes up to 4 at a time)."""
    return int(ENCODE_BYTES_PER_PIXEL * resolution**2 * min(images, 4) * _BYTES[compute] / 4)


def plan_memory(config: Any, base_model: str | os.PathLike, resolution: int,
                device: torch.device | str | None = None, *, samples: bool = False, images: int = 4,
                unet_last: bool | None = None) -> MemoryPlan:
    """The memory plan of training ``config`` on ``base_model`` at ``resolution`` px on ``device``
    (``images``: how many photos are encoded for the cache; ``samples``: sample rounds are on;
    ``unet_last``: the UNet is read after caching, as a job does without class images to
    generate; None: when prior preservation is off)."""
    device = torch.device("cpu" if device is None else device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    sizes = _sizes(Path(base_model))
    dtypes = load_dtypes(config, device)
    width = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in dtypes.items()}
    weights = {name: sizes.numel[name] * width[name] for name in sizes.numel}
    compute = config.compute_precision(device)
    runtime = RUNTIME_BYTES[kind]
    if unet_last is None:
        unet_last = not config.with_prior
    # the UNet is read after caching (no class images to generate), or with the other two parts
    first = sum(weights.values()) - (weights["unet"] if unet_last else 0)
    load = runtime + first + sizes.largest * 4
    cache = runtime + first + encode_bytes(resolution, images, compute)

    train_text = config.train_text_encoder
    # training holds the runtime, what stays resident after caching and what training adds
    parts: list[tuple[str, int]] = [("runtime", runtime), ("UNet", weights["unet"])]
    if not config.cache_latents:
        parts.append(("VAE", weights["vae"]))
    if not config.cache_text:  # trained, or encoding shuffled captions every step
        parts.append(("text encoder", weights["text_encoder"]))
    if config.method == "lora":
        pairs = sizes.lora_pairs + (sizes.conv_pairs if config.conv_layers else [])
        lora = sum(config.rank * (n_in + n_out) for n_in, n_out, part in pairs if part == "unet" or train_text)
        dora = config.lora_type == "dora"
        if dora:  # the magnitudes: weights, gradients, states and EMA like the rest
            lora += magnitude_count(sizes.lora_pairs, sizes.conv_pairs if config.conv_layers else [], train_text)
        trained, grads = lora * 4, lora * 4
        states = STATES_PER_WEIGHT.get(config.optimizer, 1) * lora * 4
        parts += [("LoRA weights", trained), ("gradients", grads), (f"{config.optimizer} states", states)]
        if dora:
            widest = max(n_in * n_out for n_in, n_out, part in pairs if part == "unet" or train_text)
            parts.append(("DoRA norm buffer", DORA_NORM_BUFFERS * widest * 4 if compute != "fp32" else 0))
    else:
        count = sizes.numel["unet"] + (sizes.numel["text_encoder"] if train_text else 0)
        trained_width = 2 if getattr(config, "weight_precision", "fp32") == "bf16" else 4
        grads = sizes.largest * trained_width if getattr(config, "fused_backward", False) else count * trained_width
        if config.optimizer == "adafactor":
            shapes = sizes.unet_tensors + (sizes.text_tensors if train_text else [])
            states = _adafactor_states(shapes) * 4
        elif config.optimizer == "adamw8bit":
            states = 2 * count
        else:
            states = STATES_PER_WEIGHT[config.optimizer] * count * 4
        parts += [("gradients", grads), (f"{config.optimizer} states", states)]
        if (getattr(config, "fused_backward", False) or getattr(config, "weight_precision", "fp32") == "bf16"
                or config.optimizer != "adamw"):
            # stepped weight by weight: fp32 copies of one weight and its gradient, the optimizer's
            # and the rounding's temporaries (about 4 fp32 tensors of the largest weight, measured)
            parts.append(("update buffers", UPDATE_BUFFERS * sizes.largest * 4))
    if config.ema_decay and not (config.ema_on_cpu and kind == "cuda"):  # fp32, where training runs
        trained_count = lora if config.method == "lora" else count
        parts.append(("EMA weights", trained_count * 4))
    batch = config.batch_size * (2 if config.with_prior else 1)
    activations = activation_bytes(config, resolution, batch, compute)
    if not config.cache_latents:  # the VAE encodes the batch every step
        activations += encode_bytes(resolution, batch, compute)
    if config.method == "lora" and config.lora_type == "dora":
        text_inputs = sum(n_in for n_in, _, part in sizes.lora_pairs if part == "text_encoder")
        activations += dora_input_bytes(config, resolution, batch, compute, text_inputs)
    parts.append(("activations", activations))
    train = sum(size for _, size in parts)
    if samples and config.cache_latents:  # the VAE comes back to decode each sample
        train += weights["vae"]
        parts.append(("VAE for samples", weights["vae"]))
    phases = {"load": load, "cache": cache, "train": train}
    if config.method == "dreambooth":
        phases["save"] = runtime + sum(weights.values()) + sizes.largest * 4
    return MemoryPlan(kind, phases, parts)


def release_freed_memory() -> None:
    """Give memory this process freed back to the system: collect garbage, then (glibc) trim the
    C heap. Freed tensors of a run otherwise stay in the process's heap (2.7 GB of 5.2 GB after
    loading and freeing the full-size model here, 0.9 GB after the trim): the next run's memory
    plan would see them as used, and other programs could not have them."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to trim
        return
    trim(0)


def available_memory(device: torch.device | str | None = None) -> int | None:
    """Free memory on ``device`` in bytes (RAM available to this process on the CPU), or None if unknown."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# Settings tried, in order, when a run does not fit: each applies to the config it can.
_LEANER: list[tuple[str, dict[str, Any]]] = [
    ("gradient_checkpointing on", {"gradient_checkpointing": True}),
    ("optimizer adafactor", {"optimizer": "adafactor"}),
    ("fused_backward on", {"fused_backward": True}),
    ("weight_precision bf16", {"weight_precision": "bf16", "precision": "bf16"}),
    ("precision bf16", {"precision": "bf16"}),
    ("batch_size 1", {"batch_size": 1}),
]


def leaner_settings(config: Any, base_model: str | os.PathLike, resolution: int, device: Any, budget: int,
                    samples: bool = False, images: int = 4,
                    unet_last: bool | None = None) -> list[tuple[str, MemoryPlan]]:
    """Changes (cumulative, leanest last) that bring the plan under ``budget``: the first that fits,
    or all of them when none does."""
    found: list[tuple[str, MemoryPlan]] = []
    names: list[str] = []
    current = config
    for name, change in _LEANER:
        fields = {item.name for item in dataclasses.fields(current)}
        usable = {key: value for key, value in change.items() if key in fields}
        if len(usable) != len(change) or all(getattr(current, key) == value for key, value in usable.items()):
            continue
        try:
            candidate = replace(current, **usable)
            check_device(candidate, device)
        except ValueError:
            continue
        current = candidate
        names.append(name)
        plan = plan_memory(current, base_model, resolution, device, samples=samples, images=images,
                           unet_last=unet_last)
        found.append((" + ".join(names), plan))
        if plan.peak <= budget:
            return found[-1:]
    return found[-1:]


def check_memory(config: Any, base_model: str | os.PathLike, resolution: int,
                 device: torch.device | str | None = None, *, samples: bool = False, images: int = 4,
                 unet_last: bool | None = None, available: int | None = None) -> MemoryPlan:
    """The run's plan; raises MemoryPlanError, before any model loads, when it will not fit in the
    free memory of ``device`` (``available`` overrides what the system reports). Setting the
    environment variable DBS_SKIP_MEMORY_CHECK=1 skips the refusal (the plan is still logged)."""
    plan = plan_memory(config, base_model, resolution, device, samples=samples, images=images, unet_last=unet_last)
    free = available if available is not None else available_memory(device)
    log.info("memory plan: %s%s", plan.describe(), f", {human(free)} free" if free is not None else "")
    if free is None or plan.peak <= free or os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return plan
    where = "on the GPU" if plan.device == "cuda" else "of RAM"
    message = (f"This run needs {plan.describe()}, but only {human(free)} {where} is free. ")
    leaner = leaner_settings(config, base_model, resolution, device, free, samples, images, unet_last)
    if leaner and leaner[0][1].peak <= free:
        message += f"With {leaner[0][0]} it needs about {human(leaner[0][1].peak)}, which fits. "
    elif leaner:
        message += (f"Even with {leaner[0][0]} it needs about {human(leaner[0][1].peak)}: train a LoRA or at "
                    f"a lower resolution, or free memory. ")
    else:
        message += "Train at a lower resolution or free memory. "
    message += f"(If the estimate is wrong for your system, set {SKIP_ENV}=1 to train anyway.)"
    raise MemoryPlanError(message)
