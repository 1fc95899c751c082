"""Training configs as typed, validated data: one source of truth for nodes, CLI and file metadata.

Each trainer has a frozen dataclass whose fields carry ``metadata`` (help text, bounds, choices).
:func:`field_spec` hands that metadata to the ComfyUI nodes, which build their widgets from it;
:func:`add_config_arguments` builds the CLI's argparse options from it; ``__post_init__``
validates against it, so a bad value is refused with the same bounds everywhere, before any model
is loaded.

Bounds in metadata:

- ``min`` / ``max``: inclusive limits; ``min_exclusive=True`` makes ``min`` exclusive.
- ``zero_means``: 0 is also allowed and means what the text says ("off", "same as rank").
- ``choices``: allowed strings.

Other metadata: ``omit_at_default`` marks a field added after files were shipped; at its default
it is left out of :meth:`training_identity`, so files trained before it existed stay reusable.

Precision ``auto`` is resolved for the device a run trains on (:func:`resolved_precision`) before
anything else: the run's identity holds the resolved value, so ``auto`` on a CPU is the same run
as an explicit ``fp32``. :func:`check_device` refuses settings the device cannot run, before any
model loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, get_type_hints

import torch

from ..data.class_images import PriorRequest

LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SAVE_PRECISIONS = ("fp16", "bf16", "fp32")
WEIGHT_PRECISIONS = ("fp32", "bf16")
# adamw: torch AdamW (2 fp32 states per weight: ~14 GB for the SD1.5 UNet with its gradients).
# adafactor: factored second moments, no first moment (~7 GB for the UNet with its gradients).
# adamw8bit: bitsandbytes' AdamW8bit, CUDA only (2 one-byte states per weight).
# prodigy: Adam with an estimated step size (training/prodigy.py; 4 fp32 states per weight).
OPTIMIZERS = ("adamw", "adafactor", "adamw8bit", "prodigy")
PRODIGY_HELP = ("prodigy: Adam that estimates its own step size while training, popular for LoRA when the right "
                "learning rate is not known: set the learning rates to 1.0 (they multiply its estimate; 0.5 on the "
                "text encoder steps it half as far)")
# lora: the low-rank update alone. dora: DoRA with one learned magnitude per input channel of each
# adapted weight (LyCORIS' dora_wd, the axis ComfyUI's loader normalises correctly; training/lora.py)
LORA_TYPES = ("lora", "dora")
MAX_SEED = 2**32 - 1


class ConfigError(ValueError):
    """A config value is out of range; the message names the field, the value and what is allowed."""


def resolved_precision(precision: str, device: torch.device | str | None = None) -> str:
    """The compute precision ``precision`` means on ``device`` (None: the CPU): "fp32", "bf16" or "fp16".

    ``auto`` is bf16 on a CUDA GPU that supports it, fp16 (with gradient scaling) on other CUDA
    GPUs, and fp32 anywhere else; the other choices mean themselves.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(map(repr, PRECISIONS))} (got {precision!r})")
    if precision != "auto":
        return precision
    device = torch.device("cpu" if device is None else device)
    if device.type != "cuda":
        return "fp32"
    return "bf16" if _cuda_bf16() else "fp16"


def _cuda_bf16() -> bool:
    return bool(torch.cuda.is_bf16_supported())  # of the current CUDA device, as autocast uses it


def check_device(config: Any, device: torch.device | str | None = None) -> None:
    """Refuse, before any model loads, settings that ``device`` (None: the CPU) cannot run; the
    message names the field and what to use instead."""
    device = torch.device("cpu" if device is None else device)
    precision = config.compute_precision(device)
    if precision == "bf16" and device.type == "cuda" and not _cuda_bf16():
        field_name = "weight_precision" if getattr(config, "weight_precision", "fp32") == "bf16" else "precision"
        raise ConfigError(f"{field_name} 'bf16' is not supported by this GPU; use precision 'fp16' (or 'auto') "
                          f"with weight_precision 'fp32'")
    if getattr(config, "fused_backward", False) and precision == "fp16":
        raise ConfigError("fused_backward cannot run with fp16 gradient scaling (a step whose gradients overflow "
                          "must be skipped whole, but fused_backward applies each weight's update as its gradient "
                          "arrives): set precision to 'bf16' or 'fp32', or turn fused_backward off")
    if getattr(config, "optimizer", "adamw") == "adamw8bit":
        if device.type != "cuda":
            raise ConfigError(f"optimizer 'adamw8bit' (bitsandbytes) runs on CUDA GPUs only and this run trains "
                              f"on {device.type}: use optimizer 'adafactor' (about half of adamw's memory) or "
                              f"'adamw' on this device")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("optimizer 'adamw8bit' needs bitsandbytes, which is not installed: pip install "
                              "bitsandbytes (CUDA), or use optimizer 'adafactor' or 'adamw'")


def _spec(default: Any, help: str, **bounds: Any) -> Any:  # noqa: A002 - mirrors argparse's name
    return field(default=default, metadata={"help": help, **bounds})


def field_spec(cls: type, name: str) -> dict[str, Any]:
    """The widget/CLI description of one config field.

    Keys: ``name``, ``type`` ("int", "float", "bool" or "str"), ``default``, ``help`` and, where
    they apply, ``min``, ``max``, ``min_exclusive``, ``zero_means``, ``choices``, ``step``.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise KeyError(f"{cls.__name__} has no field {name!r}; fields: {', '.join(fields)}")
    spec = dict(fields[name].metadata)
    spec["name"] = name
    spec["type"] = _type_name(cls, name)
    spec["default"] = fields[name].default
    if "choices" in spec:
        spec["choices"] = list(spec["choices"])
    return spec


def field_specs(cls: type) -> list[dict[str, Any]]:
    """:func:`field_spec` of every field, in declaration order."""
    return [field_spec(cls, f.name) for f in dataclasses.fields(cls)]


def _type_name(cls: type, name: str) -> str:
    hint = get_type_hints(cls)[name]
    return {int: "int", float: "float", bool: "bool", str: "str"}[hint]


def _allowed_text(spec: dict[str, Any], kind: str) -> str:
    if "choices" in spec:
        return "one of " + ", ".join(repr(c) for c in spec["choices"])
    if kind == "str":
        return "text"
    noun = "a whole number" if kind == "int" else "a finite number"
    low = spec.get("min")
    high = spec.get("max")
    parts = []
    if low is not None:
        parts.append(f"{'>' if spec.get('min_exclusive') else '>='} {low}")
    if high is not None:
        parts.append(f"<= {high}")
    text = f"{noun} {' and '.join(parts)}".strip()
    if "zero_means" in spec:
        text = f"0 ({spec['zero_means']}) or {text}"
    return text


def _check_field(cls_name: str, name: str, kind: str, spec: dict[str, Any], value: Any) -> Any:
    """Return ``value`` coerced to the field's type, or raise ConfigError."""

    given = value

    def fail() -> ConfigError:
        return ConfigError(f"{name} must be {_allowed_text(spec, kind)} (got {given!r})")

    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false (got {value!r})")
        return value
    if kind == "str":
        if not isinstance(value, str) or value not in spec.get("choices", (value,)):
            raise fail()
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail()
    if kind == "int":
        if isinstance(value, float):
            if not math.isfinite(value) or not value.is_integer():
                raise fail()
            value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise fail()
    if "zero_means" in spec and value == 0:
        return value
    low, high = spec.get("min"), spec.get("max")
    if low is not None and (value < low or (spec.get("min_exclusive") and value == low)):
        raise fail()
    if high is not None and value > high:
        raise fail()
    return value


class _ValidatedConfig:
    """Mixin: field validation from metadata, dict round trip. Subclasses are frozen dataclasses."""

    def __post_init__(self) -> None:
        for spec in field_specs(type(self)):
            name = spec["name"]
            value = _check_field(type(self).__name__, name, spec["type"], spec, getattr(self, name))
            object.__setattr__(self, name, value)
        self._check_together()

    def _check_together(self) -> None:
        """Checks that involve several fields; subclasses extend."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Any:
        """Build from a dict such as ``to_dict()`` wrote; unknown keys are an error, missing ones default."""
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown {cls.__name__} field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}"
            )
        return cls(**values)


# -- prior preservation: the same fields in every trainer's config -------------------------------


def _class_images(default: int) -> Any:
    return _spec(
        default,
        "Class images for prior preservation: generated once from the base model with the class "
        "prompt and cached (or taken from a class folder). 0 turns prior preservation off. About "
        "100-200 for 10-20 subject photos.",
        min=1, max=1_000, zero_means="prior preservation off",
    )


def _prior_loss_weight() -> Any:
    return _spec(
        1.0, "Weight of the class (prior) loss added to the subject loss. 0 turns prior preservation off.",
        min=0, max=100, step=0.05,
    )


def _class_steps() -> Any:
    return _spec(25, "Sampling steps per generated class image (DPM-Solver++).", min=1, max=200)


def _class_guidance() -> Any:
    return _spec(7.5, "Guidance scale (CFG) for generated class images.", min=1.0, max=30.0, step=0.5)


def _class_seed() -> Any:
    return _spec(
        0, "Seed of the generated class images: keep it fixed so every run of a sweep reuses them.",
        min=0, max=MAX_SEED,
    )


CLASS_IMAGE_FIELDS = ("class_images", "prior_loss_weight", "class_steps", "class_guidance", "class_seed")


class _PriorFields:
    """Properties of the prior-preservation fields; mixed into configs that have them."""

    class_images: int
    prior_loss_weight: float
    class_seed: int
    class_steps: int
    class_guidance: float

    @property
    def with_prior(self) -> bool:
        return self.prior_request.enabled

    @property
    def cache_text(self) -> bool:
        """Whether the captions' embeddings are computed once: the text encoder is frozen and the
        captions do not change from step to step (shuffle_tags)."""
        return not self.train_text_encoder and not self.shuffle_tags  # type: ignore[attr-defined]

    @property
    def prior_request(self) -> PriorRequest:
        return PriorRequest(count=self.class_images, loss_weight=self.prior_loss_weight, seed=self.class_seed,
                            steps=self.class_steps, guidance=self.class_guidance)

    def compute_precision(self, device: torch.device | str | None = None) -> str:
        """The precision this run computes in on ``device`` (None: the CPU): "fp32", "bf16" or "fp16"."""
        if getattr(self, "weight_precision", "fp32") == "bf16":
            return "bf16"  # bf16 weights compute in bf16 (precision is auto or bf16, checked together)
        return resolved_precision(self.precision, device)  # type: ignore[attr-defined]

    def global_batch(self, processes: int = 1) -> int:
        """Images (of each set) one optimizer step learns from, over ``processes`` data-parallel processes."""
        return self.batch_size * self.gradient_accumulation * processes  # type: ignore[attr-defined]

    def training_identity(self, device: torch.device | str | None = None, processes: int = 1) -> dict[str, Any]:
        """The settings that decide what training produces on ``device`` (None: the CPU) with
        ``processes`` data-parallel processes: the precision as resolved there (``auto`` on a CPU
        is ``fp32``), and the global batch as ``batch_size`` (how it is split over processes and
        accumulation steps changes only the order of float sums); without prior preservation the
        class-image settings change nothing, so they are left out (as are ``omit_at_default``
        fields at their default)."""
        values = self.to_dict()  # type: ignore[attr-defined]
        values["precision"] = self.compute_precision(device)
        values["batch_size"] = self.global_batch(processes)
        values.pop("gradient_accumulation", None)
        if not self.with_prior:
            for name in CLASS_IMAGE_FIELDS:
                values.pop(name, None)
        for spec in field_specs(type(self)):
            if spec.get("omit_at_default") and values.get(spec["name"]) == spec["default"]:
                values.pop(spec["name"])
        return values


# -- fields every trainer has, with the same bounds and help -------------------------------------


def _lr_scheduler() -> Any:
    return _spec("constant", "How the learning rate changes over the steps (after the warmup).", choices=LR_SCHEDULERS)


def _lr_warmup_steps() -> Any:
    return _spec(
        0, "Steps over which the learning rate ramps up from 0 (not used by 'constant').", min=0, max=100_000
    )


def _precision(frozen: str, trained: str) -> Any:
    return _spec(
        "auto",
        f"Compute precision (autocast). auto: bf16 on a GPU that has it, fp16 with gradient scaling on "
        f"older GPUs, fp32 on the CPU. With bf16/fp16 the frozen weights ({frozen}) are stored in that "
        f"precision, half of fp32's memory; {trained} stay fp32. bf16/fp16 also run on the CPU (slower "
        f"there than fp32 unless the CPU has bf16 instructions).",
        choices=PRECISIONS,
    )


def _gradient_checkpointing() -> Any:
    return _spec(False, "Recompute activations in the backward pass: less memory, about 30% slower.")


def _cache_latents() -> Any:
    return _spec(True, "Encode the images with the VAE once instead of every step (faster, same result).")


def _max_grad_norm() -> Any:
    return _spec(
        1.0, "Clip the gradient norm to this value; 0 turns clipping off.",
        min=0, max=1000, min_exclusive=True, zero_means="no clipping", step=0.1,
    )


def _noise_offset() -> Any:
    return _spec(
        0.0, "Offset noise strength (helps very dark/bright images); 0 is off, 0.05-0.1 is typical.",
        min=0, max=1.0, step=0.01,
    )


def _min_snr_gamma() -> Any:
    return _spec(
        0.0, "Min-SNR loss weighting gamma (5 is typical); 0 is off.",
        min=0, max=100, min_exclusive=True, zero_means="off", step=0.5,
    )


def _save_precision(**extra: Any) -> Any:
    return _spec(
        "fp16", "Precision of the saved file: fp16 (what most SD1.5 files use), bf16, or fp32 (twice the size).",
        choices=SAVE_PRECISIONS, **extra,
    )


def _gradient_accumulation() -> Any:
    return _spec(
        1, "Backward passes per optimizer step, each on batch_size images: the step then learns from "
        "batch_size x gradient_accumulation images (x the processes of a multi-GPU launch) for the memory of "
        "batch_size. Same training as that larger batch up to float rounding. 1 = off.",
        min=1, max=64, omit_at_default=True,
    )


def _record_sources() -> Any:
    return _spec(
        False, "Write the photos' file names and captions into the saved file's metadata. Anyone who gets the "
        "file (or can reach ComfyUI's /view_metadata) can read them. Off: only their number and a hash.",
        omit_at_default=True,
    )


def _ema_decay() -> Any:
    return _spec(
        0.0, "Keep an exponential moving average (EMA) of the trained weights and save it as the final weights: "
        "smoother, often better final results. Use it for long runs: 0.999 for 1000+ steps, 0.99-0.995 for a few "
        "hundred (the average remembers about 1 / (1 - decay) steps). After step k the average becomes "
        "d x average + (1 - d) x weights with d = min(ema_decay, k / (k + 9)), diffusers' warm-up. Step files and "
        "samples show the weights as trained. 0 = off.",
        min=0.5, max=0.99999, zero_means="off", step=0.001, omit_at_default=True,
    )


def _ema_on_cpu(trained: str) -> Any:
    return _spec(
        False, f"Keep the EMA weights in CPU memory instead of on the GPU ({trained}); each step then copies the "
        "weights to the CPU. Only with ema_decay.", omit_at_default=True,
    )


def _caption_dropout() -> Any:
    return _spec(
        0.0, "Share of subject images trained with an empty caption instead of theirs (drawn each step): the "
        "standard guard against a LoRA or model that only works with its exact caption, and what lets it "
        "help unconditional guidance. 0.05-0.1 is typical. Class images keep their prompt. 0 = off.",
        min=0, max=1.0, min_exclusive=True, zero_means="off", step=0.01, omit_at_default=True,
    )


def _unmasked_weight() -> Any:
    return _spec(
        0.1, "Masked loss (a subject loaded with a loss mask: face box or painted MASK): how much the area "
        "outside the mask counts in the loss, 0-1. 0: only the subject is learned, the background not at all "
        "(a LoRA that leaves backgrounds to the prompt); 0.1 (OneTrainer's default): mostly the subject, with "
        "enough of the surroundings to keep them coherent; 1: the mask has no effect. The loss of each image is "
        "its weighted mean, so its size does not change with the mask's area.",
        min=0.0, max=1.0, step=0.05, omit_at_default=True,
    )


def _shuffle_tags() -> Any:
    return _spec(
        False, "Shuffle the comma-separated tags of each subject caption every step, keeping the first keep_tags "
        "in place: for tag-style captions ('sks dog, sitting, grass, sunny'), so the model does not learn their "
        "order. The text encoder then stays in memory and encodes the captions every step.",
        omit_at_default=True,
    )


def _keep_tags() -> Any:
    return _spec(
        1, "With shuffle_tags: how many leading tags stay where they are (the trigger words, e.g. 'sks dog').",
        min=0, max=32, omit_at_default=True,
    )


def _check_captions(config: Any) -> None:
    if config.keep_tags != 1 and not config.shuffle_tags:
        raise ConfigError(f"keep_tags={config.keep_tags} has no effect without shuffle_tags: turn shuffle_tags on "
                          "or leave keep_tags at 1")


def _check_ema(config: Any) -> None:
    if config.ema_on_cpu and not config.ema_decay:
        raise ConfigError("ema_on_cpu has no effect with ema_decay 0 (no EMA): set ema_decay (e.g. 0.999) or turn "
                          "ema_on_cpu off")


def _check_warmup(config: Any) -> None:
    if config.lr_warmup_steps > config.steps:
        raise ConfigError(
            f"lr_warmup_steps must be between 0 and steps ({config.steps}) (got {config.lr_warmup_steps})"
        )
    if config.lr_warmup_steps and config.lr_scheduler == "constant":
        raise ConfigError(
            f"lr_warmup_steps={config.lr_warmup_steps} has no effect with lr_scheduler 'constant'; "
            f"use 'constant_with_warmup' or set lr_warmup_steps to 0"
        )


@dataclass(frozen=True)
class LoRATrainConfig(_PriorFields, _ValidatedConfig):
    """Hyper-parameters of LoRA training on SD1.5 (UNet attention, optionally the text encoder)."""

    method: ClassVar[str] = "lora"

    rank: int = _spec(16, "LoRA rank (dimension of the low-rank update). 4-32 is typical for a subject.", min=1, max=128)
    alpha: float = _spec(
        0.0,
        "LoRA alpha; the update is scaled by alpha/rank. 0 means alpha = rank (scale 1).",
        min=0, max=1024, min_exclusive=True, zero_means="same as rank", step=1.0,
    )
    steps: int = _spec(500, "Optimizer steps to train.", min=1, max=100_000)
    unet_lr: float = _spec(
        1e-4, "Learning rate of the UNet LoRA (AdamW). 1e-4 is a good start.",
        min=0, max=1.0, min_exclusive=True, step=1e-6,
    )
    text_encoder_lr: float = _spec(
        0.0,
        "Learning rate of the text-encoder LoRA. 0 keeps the text encoder frozen (faster; its "
        "embeddings are computed once). 1e-5 to 5e-5 is typical when trained.",
        min=0, max=1.0, min_exclusive=True, zero_means="frozen text encoder", step=1e-6,
    )
    lr_scheduler: str = _lr_scheduler()
    lr_warmup_steps: int = _lr_warmup_steps()
    batch_size: int = _spec(1, "Images per optimizer step (per process and accumulation step: see "
                                "gradient_accumulation).", min=1, max=64)
    gradient_accumulation: int = _gradient_accumulation()
    seed: int = _spec(0, "Random seed: the same seed, data and settings give the same LoRA.", min=0, max=MAX_SEED)
    precision: str = _precision("UNet, VAE and a frozen text encoder", "the LoRA weights")
    gradient_checkpointing: bool = _gradient_checkpointing()
    cache_latents: bool = _cache_latents()
    max_grad_norm: float = _max_grad_norm()
    noise_offset: float = _noise_offset()
    min_snr_gamma: float = _min_snr_gamma()
    class_images: int = _class_images(0)
    prior_loss_weight: float = _prior_loss_weight()
    class_steps: int = _class_steps()
    class_guidance: float = _class_guidance()
    class_seed: int = _class_seed()
    save_precision: str = _save_precision(omit_at_default=True)
    record_sources: bool = _record_sources()
    optimizer: str = _spec(
        "adamw",
        "adamw: the LoRA recipe of diffusers and kohya, when you know a good learning rate (1e-4). " + PRODIGY_HELP
        + ". adafactor: less memory for the states (small for a LoRA anyway). adamw8bit: bitsandbytes' 8-bit "
        "AdamW, CUDA GPUs only (pip install bitsandbytes).",
        choices=OPTIMIZERS, omit_at_default=True,
    )
    conv_layers: bool = _spec(
        False, "Also put LoRA layers (with the same rank and alpha) on the UNet's 3x3 convolutions, in its ResNet "
        "blocks and down/upsamplers (LoCon, kohya's conv_dim): they learn textures and fine detail the attention "
        "layers alone miss, for a larger file (the UNet part 3.7x: 6.4 -> 23.8 MB at rank 16, fp16). Loads in ComfyUI, A1111/Forge.",
        omit_at_default=True,
    )
    lora_type: str = _spec(
        "lora",
        "lora: the plain low-rank update. dora: DoRA (weight-decomposed LoRA) also learns a magnitude for each "
        "input channel of every adapted layer: closer to full fine-tuning quality at the same rank, for a somewhat "
        "slower step (SD1.5 at 64 px on a CPU: +13%, +40% with conv_layers) and +0.2 MB per file. Try it when a LoRA misses the "
        "subject's detail and a higher rank does not help. DoRA files load in ComfyUI's LoRA loader as trained; "
        "diffusers' load_lora_weights drops the magnitudes (with a warning) and applies only the low-rank part.",
        choices=LORA_TYPES, omit_at_default=True,
    )
    ema_decay: float = _ema_decay()
    ema_on_cpu: bool = _ema_on_cpu("a LoRA's are small: rarely worth it")
    caption_dropout: float = _caption_dropout()
    shuffle_tags: bool = _shuffle_tags()
    keep_tags: int = _keep_tags()
    unmasked_weight: float = _unmasked_weight()

    def _check_together(self) -> None:
        _check_warmup(self)
        _check_ema(self)
        _check_captions(self)

    @property
    def effective_alpha(self) -> float:
        return float(self.rank) if self.alpha == 0 else float(self.alpha)

    @property
    def train_text_encoder(self) -> bool:
        return self.text_encoder_lr > 0


@dataclass(frozen=True)
class DreamBoothTrainConfig(_PriorFields, _ValidatedConfig):
    """Hyper-parameters of DreamBooth: the whole SD1.5 UNet (optionally the text encoder) fine-tuned."""

    method: ClassVar[str] = "dreambooth"

    steps: int = _spec(800, "Optimizer steps to train (about 80-100 per subject photo).", min=1, max=100_000)
    unet_lr: float = _spec(
        2e-6,
        "Learning rate of the UNet. 2e-6 to 5e-6 is typical; too low does not learn the subject, too high "
        "gives artefacts and several copies of the subject per image.",
        min=0, max=1.0, min_exclusive=True, step=1e-7,
    )
    text_encoder_lr: float = _spec(
        0.0,
        "Learning rate of the whole text encoder. 0 keeps it frozen (its embeddings are computed once); "
        "1e-6 to 5e-6 when trained.",
        min=0, max=1.0, min_exclusive=True, zero_means="frozen text encoder", step=1e-7,
    )
    lr_scheduler: str = _lr_scheduler()
    lr_warmup_steps: int = _lr_warmup_steps()
    batch_size: int = _spec(1, "Subject images per optimizer step (as many class images ride along); per "
                                "process and accumulation step: see gradient_accumulation.", min=1, max=64)
    gradient_accumulation: int = _gradient_accumulation()
    seed: int = _spec(0, "Random seed: the same seed, data and settings give the same model.", min=0, max=MAX_SEED)
    optimizer: str = _spec(
        "adamw",
        "adamw: the DreamBooth recipe, about 14 GB for the SD1.5 UNet in fp32 (weights, gradients and 2 "
        "states). adafactor: factored second moments and no momentum, about half that (same learning "
        "rates work as a start). adamw8bit: bitsandbytes' 8-bit AdamW on CUDA GPUs only, its 2 states "
        "take 1.7 GB instead of 6.9 GB (pip install bitsandbytes). " + PRODIGY_HELP + "; it keeps 4 states per "
        "weight (13.8 GB for the UNet). Not with fused_backward or weight_precision bf16.",
        choices=OPTIMIZERS,
    )
    precision: str = _precision("VAE and a frozen text encoder", "the UNet's weights")
    fused_backward: bool = _spec(
        False,
        "Step the optimizer for each weight inside the backward pass, as soon as its gradient is ready, and "
        "free that gradient at once: the full set of gradients is never held (saves 3.4 GB with fp32 "
        "weights, 1.7 GB with bf16 weights; same speed). Gradient clipping then limits each tensor's "
        "gradient norm instead of the norm of all of them. Not with fp16 precision.",
        omit_at_default=True,
    )
    weight_precision: str = _spec(
        "fp32",
        "How the trained weights (UNet, and the text encoder when trained) are stored. bf16 halves them "
        "and their gradients (3.4 -> 1.7 GB each for the UNet) and computes in bf16; each update is "
        "computed in fp32 (optimizer states stay fp32) and written back with stochastic rounding, so "
        "small updates are not lost. Needs precision auto or bf16.",
        choices=WEIGHT_PRECISIONS, omit_at_default=True,
    )
    gradient_checkpointing: bool = _gradient_checkpointing()
    cache_latents: bool = _cache_latents()
    max_grad_norm: float = _max_grad_norm()
    noise_offset: float = _noise_offset()
    min_snr_gamma: float = _min_snr_gamma()
    class_images: int = _class_images(100)
    prior_loss_weight: float = _prior_loss_weight()
    class_steps: int = _class_steps()
    class_guidance: float = _class_guidance()
    class_seed: int = _class_seed()
    save_precision: str = _save_precision()
    record_sources: bool = _record_sources()
    ema_decay: float = _ema_decay()
    ema_on_cpu: bool = _ema_on_cpu("3.4 GB for the SD1.5 UNet in fp32")
    caption_dropout: float = _caption_dropout()
    shuffle_tags: bool = _shuffle_tags()
    keep_tags: int = _keep_tags()
    unmasked_weight: float = _unmasked_weight()

    def _check_together(self) -> None:
        _check_warmup(self)
        _check_ema(self)
        _check_captions(self)
        if self.fused_backward and self.gradient_accumulation > 1:
            raise ConfigError(f"fused_backward applies each weight's update as soon as its gradient is ready, so it "
                              f"cannot add up gradients over gradient_accumulation={self.gradient_accumulation} "
                              f"passes: set gradient_accumulation to 1 (use a larger batch_size or more "
                              f"processes), or turn fused_backward off")
        if self.optimizer == "prodigy" and (self.fused_backward or self.weight_precision == "bf16"):
            raise ConfigError("optimizer 'prodigy' estimates one step size from all the weights' gradients at once, "
                              "but fused_backward and weight_precision 'bf16' step the weights one by one: turn "
                              "them off, or use optimizer 'adamw' or 'adafactor'")
        if self.weight_precision == "bf16" and self.precision not in ("auto", "bf16"):
            raise ConfigError(f"weight_precision 'bf16' computes in bf16 but precision is {self.precision!r}: set "
                              f"precision to 'auto' or 'bf16', or weight_precision to 'fp32'")

    @property
    def train_text_encoder(self) -> bool:
        return self.text_encoder_lr > 0


# ---------------------------------------------------------------------------------------------
# argparse from the same metadata
# ---------------------------------------------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, title: str | None = None) -> None:
    """Add one ``--field-name`` option per config field, with the field's help, default and choices."""
    group = parser.add_argument_group(title or f"{cls.__name__} options")
    for spec in field_specs(cls):
        flag = "--" + spec["name"].replace("_", "-")
        text = spec["help"].replace("%", "%%")
        allowed = ""
        if spec["type"] in ("int", "float") and "min" in spec:
            allowed = f" Allowed: {_allowed_text(spec, spec['type'])}."
        default = repr(spec["default"]) if spec["type"] == "str" and "choices" not in spec else spec["default"]
        help_text = f"{text}{allowed} Default: {default}."
        if spec["type"] == "bool":
            group.add_argument(
                flag, dest=spec["name"], action=argparse.BooleanOptionalAction, default=spec["default"],
                help=help_text,
            )
        elif "choices" in spec:
            group.add_argument(
                flag, dest=spec["name"], choices=spec["choices"], default=spec["default"], help=help_text
            )
        elif spec["type"] == "str":
            group.add_argument(flag, dest=spec["name"], default=spec["default"], metavar="TEXT", help=help_text)
        else:
            group.add_argument(
                flag, dest=spec["name"], type=int if spec["type"] == "int" else float, default=spec["default"],
                metavar=spec["type"].upper(), help=help_text,
            )


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The config built from parsed options added by :func:`add_config_arguments`."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
