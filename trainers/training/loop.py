"""The diffusion training loop shared by the LoRA and DreamBooth trainers.

Objective: SD1.5's epsilon-prediction MSE on the DDPM schedule (``v_prediction`` schedulers are
handled too), uniform random timesteps, optional min-SNR-gamma weighting and offset noise.

Data, prepared once by :func:`prepare_training_set`:

- Latents: the VAE encodes every image once (and its mirror image when flip augmentation is on)
  and the mean and standard deviation of its latent distribution are cached, scaled by the VAE's
  scaling factor (0.18215). Each step draws a fresh sample ``mean + std * eps`` with the training
  generator, as encoding every step would. Without ``cache_latents`` the VAE encodes the batch
  every step and the sample is drawn the same way, so both paths train on the same distribution.
- Text: captions are tokenized once; with a frozen text encoder their embeddings (CLIP's last
  hidden state, as SD1.5 uses) are computed once too.
- Batches: image indices come from a stream of random permutations (every image once per epoch),
  each image is mirrored with probability 1/2 when flip is on. Every random draw (indices, flips,
  latent samples, noise, timesteps) comes from one CPU generator seeded from the config seed, so
  the same seed gives the same LoRA on the same hardware.

A second :class:`TrainingSet` (class images for prior preservation) can ride along: its samples
are appended to each batch and its loss, weighted by ``prior_loss_weight``, is added and reported
separately.

What the loop steps with is built here too, so a setting means the same in LoRA and DreamBooth:
AdamW with torch's defaults (which the diffusers and kohya recipes also use; its fused kernel
where the weights allow it), Adafactor used like Adam, or bitsandbytes' 8-bit AdamW on CUDA; a
diffusers LR schedule with warmup; bf16/fp16 autocast on any device (with a grad scaler for
fp16). Two lean ways to step (:class:`WeightSteps`): the optimizer step of each weight inside the
backward pass (``fused_backward``: full-size gradients are never all held), and bf16 weights
whose update is computed in fp32 and written back with :func:`stochastic_round_to_bf16`.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data.subject import SubjectData
from ..sd15.checkpoint import SD15Components
from . import parallel
from .adafactor import Adafactor
from .callbacks import LossHistory, NonFiniteLossError, StepState, TrainingCallbacks, WithLossHistory
from .config import OPTIMIZERS, ConfigError, DreamBoothTrainConfig, LoRATrainConfig, check_device
from .parallel import SINGLE, Processes
from .prodigy import Prodigy

logger = logging.getLogger(__name__)

# Images per VAE / text-encoder call while caching.
ENCODE_BATCH = 4


def derive_seed(seed: int, purpose: str) -> int:
    """An independent 63-bit seed for one use (data order, weight init) of the config seed."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model: Any) -> torch.dtype:
    return next(model.parameters()).dtype


def cast_frozen(model: torch.nn.Module, dtype: torch.dtype, keep: Sequence[torch.Tensor] = ()) -> None:
    """Store ``model``'s floating-point weights in ``dtype``, one tensor at a time (no second copy
    of the model), except those in ``keep`` (the trained ones). Freed (meta) weights are left alone."""
    kept = {id(t) for t in keep}
    for parameter in model.parameters():
        if id(parameter) not in kept and parameter.is_floating_point() and parameter.dtype != dtype \
                and not parameter.is_meta:
            parameter.data = parameter.data.to(dtype)


def check_trainable(base: SD15Components, subject: SubjectData, class_subject: SubjectData | None, with_prior: bool,
                    train_text_encoder: bool) -> None:
    """What both trainers need before they touch a model: a subject, a tokenizer, class images
    at the subject's resolution when prior preservation is on, and models that can take gradients."""
    if with_prior and class_subject is None:
        raise ValueError(
            "prior preservation is on (class_images > 0 and prior_loss_weight > 0) but no class images were "
            "given; generate them with trainers.data.class_images or set class_images to 0"
        )
    if with_prior and class_subject is not None and class_subject.resolution != subject.resolution:
        raise ValueError(
            f"class images are {class_subject.resolution} px but the subject is {subject.resolution} px; use "
            f"class images of the training resolution"
        )
    if not isinstance(subject, SubjectData):
        raise TypeError(f"subject must be a SubjectData, got {type(subject).__name__}")
    if base.tokenizer is None:
        raise ValueError("the base model has no tokenizer; load it with a tokenizer folder")
    trained = [("UNet", base.unet)] + ([("text encoder", base.text_encoder)] if train_text_encoder else [])
    for name, model in trained:
        if any(p.is_inference() for p in model.parameters()):
            raise RuntimeError(
                f"the {name} was loaded under torch.inference_mode(); load the base model inside "
                f"torch.inference_mode(False) so it can be trained"
            )


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainingSet:
    """Images of one concept, prepared for the loop by :func:`prepare_training_set`."""

    count: int
    flip: bool
    caption_index: torch.Tensor  # (N,) index into input_ids / embeddings
    input_ids: torch.Tensor  # (P, 77) token ids of the distinct captions
    embeddings: torch.Tensor | None = None  # (P, 77, D) when the text encoder is frozen
    # (V, N, 4, h, w), V = 2 with flip (index 1 mirrored); with images of several sizes (buckets)
    # a list of one (V, 4, h, w) per image
    latent_mean: torch.Tensor | list[torch.Tensor] | None = None
    latent_std: torch.Tensor | list[torch.Tensor] | None = None
    # (N, 3, H, W) in [-1, 1] when latents are not cached (buckets: a list of (3, H, W))
    pixels: torch.Tensor | list[torch.Tensor] | None = None
    captions: list[str] = field(default_factory=list)  # (P,) the distinct captions, as input_ids holds them
    tokenizer: Any = None  # for captions made while training (shuffle_tags)
    empty_row: int | None = None  # the row of the empty caption in input_ids/embeddings (caption_dropout)
    # masked loss: how much each latent cell counts, (V, N, 1, h, w) (buckets: a list of (V, 1, h, w))
    loss_weights: torch.Tensor | list[torch.Tensor] | None = None
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (H, W) pixels of each image
    factor: int = 8  # pixels per latent cell

    @property
    def cached_latents(self) -> bool:
        return self.latent_mean is not None

    @property
    def uniform(self) -> bool:
        """Whether every image has one size (stacked tensors); else they are kept per image."""
        return len(set(self.sizes)) <= 1

    def buckets(self) -> list[list[int]]:
        """The image indices of each size, in order of first appearance."""
        groups: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(self.sizes):
            groups.setdefault(size, []).append(index)
        return list(groups.values())

    def latent_shape(self, index: int, channels: int) -> tuple[int, int, int]:
        height, width = self.sizes[index]
        return (channels, height // self.factor, width // self.factor)

    def latent_rows(self, flips: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the cached latents of ``indices`` (all of one size), mirrored where ``flips``."""
        assert self.latent_mean is not None and self.latent_std is not None
        return _views(self.latent_mean, flips, indices), _views(self.latent_std, flips, indices)

    def pixel_rows(self, indices: torch.Tensor) -> torch.Tensor:
        assert self.pixels is not None
        if isinstance(self.pixels, torch.Tensor):
            return self.pixels[indices]
        return torch.stack([self.pixels[i] for i in indices.tolist()])

    def weight_rows(self, flips: torch.Tensor, indices: torch.Tensor) -> torch.Tensor | None:
        """The loss weights of ``indices`` (n, 1, h, w), or None without masked loss."""
        return _views(self.loss_weights, flips, indices) if self.loss_weights is not None else None


def _views(store: torch.Tensor | list[torch.Tensor], flips: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` in view ``flips`` of a (V, N, ...) tensor or of a list of (V, ...) per image."""
    if isinstance(store, torch.Tensor):
        return store[flips, indices]
    return torch.stack([store[i][f] for f, i in zip(flips.tolist(), indices.tolist(), strict=True)])


def tokenize(tokenizer: Any, captions: Sequence[str], warn: bool = True) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's length (77 for SD1.5); warns about truncation
    (unless ``warn`` is off: captions already warned about)."""
    length = tokenizer.model_max_length
    full = tokenizer(list(captions), padding=False, truncation=False)["input_ids"] if warn else []
    for caption, ids in zip(captions, full, strict=False):
        if len(ids) > length:
            logger.warning(
                "caption is %d tokens long and is cut to %d: %r", len(ids), length, caption[:120]
            )
    batch = tokenizer(
        list(captions), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    )
    return batch["input_ids"]


def encode_text(text_encoder: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """CLIP's last hidden state, the conditioning SD1.5 was trained with (no clip skip)."""
    output = text_encoder(input_ids.to(model_device(text_encoder)))
    return output[0]


@torch.no_grad()
def encode_latent_stats(vae: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled mean and std of the VAE's latent distribution for images in [-1, 1]."""
    device, dtype = model_device(vae), model_dtype(vae)
    scale = float(vae.config.scaling_factor)
    means, stds = [], []
    for start in range(0, len(pixels), ENCODE_BATCH):
        chunk = pixels[start : start + ENCODE_BATCH].to(device, dtype)
        dist = vae.encode(chunk).latent_dist
        means.append((dist.mean.float() * scale).cpu())
        stds.append((dist.std.float() * scale).cpu())
    return torch.cat(means), torch.cat(stds)


def latent_weights(mask: torch.Tensor, factor: int, unmasked_weight: float) -> torch.Tensor:
    """A pixel mask (H, W) in [0, 1] as latent-cell loss weights (1, H/f, W/f): the mask's mean
    over each cell, ``unmasked_weight`` where it is 0 and 1 where it is 1."""
    cells = torch.nn.functional.avg_pool2d(mask.float()[None, None], factor)[0]
    return unmasked_weight + (1.0 - unmasked_weight) * cells


@torch.no_grad()
def prepare_training_set(
    pixels: torch.Tensor | Sequence[torch.Tensor],
    captions: Sequence[str],
    *,
    vae: Any,
    text_encoder: Any,
    tokenizer: Any,
    flip: bool,
    cache_latents: bool,
    cache_text: bool,
    caption_dropout: bool = False,
    masks: Sequence[torch.Tensor] = (),
    unmasked_weight: float = 0.0,
) -> TrainingSet:
    """Tokenize captions and, as asked, encode latents and text embeddings once (with
    ``caption_dropout`` the empty caption's too).

    ``pixels`` is N x 3 x H x W in [0, 1] on the CPU, or a list of 3 x H x W images of several
    sizes (buckets). ``masks`` (H x W in [0, 1], one per image, or none) weight the loss.
    Cached tensors stay on the CPU in fp32.
    """
    if len(captions) != len(pixels):
        raise ValueError(f"{len(pixels)} images but {len(captions)} captions")
    distinct = sorted(set(captions))
    caption_index = torch.tensor([distinct.index(c) for c in captions], dtype=torch.long)
    if caption_dropout and "" not in distinct:
        distinct.append("")
    input_ids = tokenize(tokenizer, distinct)
    embeddings = None
    if cache_text:
        embeddings = torch.cat(
            [
                encode_text(text_encoder, input_ids[i : i + ENCODE_BATCH]).float().cpu()
                for i in range(0, len(input_ids), ENCODE_BATCH)
            ]
        )
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    training_set = TrainingSet(
        count=len(pixels), flip=flip, caption_index=caption_index, input_ids=input_ids, embeddings=embeddings,
        captions=distinct, tokenizer=tokenizer, empty_row=distinct.index("") if caption_dropout else None,
        sizes=[(int(image.shape[-2]), int(image.shape[-1])) for image in pixels], factor=factor,
    )
    if masks:
        weights = [latent_weights(mask, factor, unmasked_weight) for mask in masks]
        views = [torch.stack([w, w.flip(-1)] if flip else [w]) for w in weights]
        training_set.loss_weights = torch.stack(views, dim=1) if training_set.uniform else views
    if training_set.uniform:
        signed = torch.stack(list(pixels)).float().clamp(0, 1) * 2 - 1 if not isinstance(pixels, torch.Tensor) \
            else pixels.float().clamp(0, 1) * 2 - 1
        if cache_latents:
            training_set.latent_mean, training_set.latent_std = _encode_views(vae, signed, flip)
        else:
            training_set.pixels = signed
        return training_set
    images = [image.float().clamp(0, 1) * 2 - 1 for image in pixels]
    if not cache_latents:
        training_set.pixels = images
        return training_set
    means: list[torch.Tensor] = [torch.empty(0)] * len(images)
    stds: list[torch.Tensor] = [torch.empty(0)] * len(images)
    for members in training_set.buckets():  # encoded a size at a time
        mean, std = _encode_views(vae, torch.stack([images[i] for i in members]), flip)
        for row, index in enumerate(members):
            means[index], stds[index] = mean[:, row], std[:, row]
    training_set.latent_mean, training_set.latent_std = means, stds
    return training_set


def _encode_views(vae: Any, signed: torch.Tensor, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent (mean, std) of images in [-1, 1], (V, n, 4, h, w): V = 2 with flip (index 1 mirrored)."""
    stats = [encode_latent_stats(vae, variant) for variant in ([signed, signed.flip(-1)] if flip else [signed])]
    return torch.stack([mean for mean, _ in stats]), torch.stack([std for _, std in stats])


def prepare_training_sets(base: SD15Components, subject: SubjectData, class_subject: SubjectData | None, *,
                          cache_latents: bool, cache_text: bool, caption_dropout: bool = False,
                          unmasked_weight: float = 0.0) -> tuple[TrainingSet, TrainingSet | None]:
    """The subject's training set and, with prior preservation, the class images' one (whose
    captions are never dropped and which has no loss masks)."""
    sets = [
        prepare_training_set(data.pixels() if data.uniform() else [image.permute(2, 0, 1) for image in data.images],
                             data.captions, vae=base.vae, text_encoder=base.text_encoder,
                             tokenizer=base.tokenizer, flip=data.flip, cache_latents=cache_latents,
                             cache_text=cache_text, caption_dropout=caption_dropout and data is subject,
                             masks=data.masks if data is subject else (), unmasked_weight=unmasked_weight)
        for data in ([subject] if class_subject is None else [subject, class_subject])
    ]
    return sets[0], (sets[1] if len(sets) > 1 else None)


class IndexStream:
    """Image indices from consecutive random permutations: each image once per epoch."""

    def __init__(self, count: int, generator: torch.Generator) -> None:
        self.count = count
        self.generator = generator
        self._pending: list[int] = []

    def take(self, n: int) -> torch.Tensor:
        while len(self._pending) < n:
            self._pending += torch.randperm(self.count, generator=self.generator).tolist()
        taken, self._pending = self._pending[:n], self._pending[n:]
        return torch.tensor(taken, dtype=torch.long)


class BucketStream(IndexStream):
    """Image indices for a set of several image sizes: every ``take(n)`` is n images of one size.
    Each epoch shuffles every size's images, cuts them into runs of n (the last run of a size
    filled up with other images of that size drawn at random) and shuffles the order of the runs;
    the images of a size each come once per epoch (plus the fill)."""

    def __init__(self, buckets: list[list[int]], generator: torch.Generator) -> None:
        super().__init__(sum(len(b) for b in buckets), generator)
        self.buckets = buckets

    def take(self, n: int) -> torch.Tensor:
        if len(self._pending) < n:  # runs of exactly n: the pending ones are whole runs
            runs: list[list[int]] = []
            for members in self.buckets:
                order = [members[i] for i in torch.randperm(len(members), generator=self.generator).tolist()]
                short = -len(order) % n
                if short:
                    order += [members[i] for i in torch.randint(0, len(members), (short,),
                                                                generator=self.generator).tolist()]
                runs += [order[i:i + n] for i in range(0, len(order), n)]
            self._pending = [index for r in torch.randperm(len(runs), generator=self.generator).tolist()
                             for index in runs[r]]
        taken, self._pending = self._pending[:n], self._pending[n:]
        return torch.tensor(taken, dtype=torch.long)


def index_stream(training_set: TrainingSet, generator: torch.Generator) -> IndexStream:
    """The stream a set draws its images from (by size when it has several)."""
    if training_set.uniform:
        return IndexStream(training_set.count, generator)
    return BucketStream(training_set.buckets(), generator)


def draw_flips(training_set: TrainingSet, n: int, generator: torch.Generator) -> torch.Tensor:
    if not training_set.flip:
        return torch.zeros(n, dtype=torch.long)
    return torch.randint(0, 2, (n,), generator=generator)


def shuffled_caption(caption: str, keep: int, generator: torch.Generator) -> str | None:
    """``caption``'s comma-separated tags after the first ``keep`` in a random order (joined by
    ", "), or None when there are fewer than two tags to shuffle (nothing is drawn then)."""
    tags = [tag.strip() for tag in caption.split(",")]
    rest = tags[keep:]
    if len(rest) < 2:
        return None
    order = torch.randperm(len(rest), generator=generator).tolist()
    return ", ".join(tags[:keep] + [rest[i] for i in order])


def batch_conditioning(
    training_set: TrainingSet, indices: torch.Tensor, text_encoder: Any,
    dropped: torch.Tensor | None = None, texts: Sequence[str | None] | None = None,
) -> torch.Tensor:
    """Text embeddings of the chosen images' captions: cached, or through the (trained) text
    encoder. ``dropped`` rows take the empty caption; ``texts`` replace the captions of the rows
    where they are not None (shuffled tags: encoded now, so the set caches no embeddings)."""
    rows = training_set.caption_index[indices]
    if dropped is not None:
        assert training_set.empty_row is not None
        rows = torch.where(dropped, training_set.empty_row, rows)
    input_ids = training_set.input_ids[rows]
    changed = [j for j, text in enumerate(texts or []) if text is not None
               and not (dropped is not None and bool(dropped[j]))]
    if changed:
        assert texts is not None
        input_ids = input_ids.clone()
        # in one call, and not warned about again: a shuffle has its caption's tags and tokens,
        # whose length was checked when the set was prepared
        input_ids[changed] = tokenize(training_set.tokenizer, [texts[j] for j in changed], warn=False)
        return encode_text(text_encoder, input_ids)
    if training_set.embeddings is not None:
        return training_set.embeddings[rows]
    return encode_text(text_encoder, input_ids)


# ---------------------------------------------------------------------------------------------
# Objective
# ---------------------------------------------------------------------------------------------


def training_target(
    noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {kind!r}; SD1.5 uses 'epsilon'")


def snr(noise_scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(torch.float64)[timesteps.cpu()]
    return (alphas_cumprod / (1.0 - alphas_cumprod)).float()


def min_snr_weights(noise_scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon."""
    ratio = snr(noise_scheduler, timesteps)
    clipped = torch.minimum(ratio, torch.full_like(ratio, gamma))
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (ratio + 1.0)
    return clipped / ratio


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample, in fp32."""
    error = prediction.float() - target.float()
    return error.pow(2).flatten(1).mean(dim=1)


@torch.no_grad()
def fixed_noise_loss(
    unet: Any,
    latents: torch.Tensor,
    conditioning: torch.Tensor,
    noise_scheduler: Any,
    timesteps: Sequence[int],
    seed: int = 0,
) -> float:
    """Mean denoising loss over every latent x timestep pair with noise fixed by ``seed``.

    A repeatable measure of how well ``unet`` fits the given latents (e.g. before vs after
    training); ``conditioning`` has one row per latent.
    """
    generator = torch.Generator().manual_seed(seed)
    device, dtype = model_device(unet), model_dtype(unet)
    losses = []
    for step in timesteps:
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.full((len(latents),), int(step), dtype=torch.long)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        prediction = unet(
            noisy.to(device, dtype), t.to(device), encoder_hidden_states=conditioning.to(device, dtype)
        ).sample
        target = training_target(noise_scheduler, latents, noise, t)
        losses.append(per_sample_mse(prediction.cpu(), target).mean())
    return float(torch.stack(losses).mean())


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclass
class LoopModels:
    unet: Any
    vae: Any
    text_encoder: Any
    noise_scheduler: Any


@dataclass
class LoopSettings:
    steps: int
    batch_size: int
    seed: int
    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0
    max_grad_norm: float = 1.0
    prior_loss_weight: float = 1.0
    autocast_dtype: torch.dtype | None = None  # mixed precision (any device); None = no autocast
    save_every: int = 0  # steps between save points (callbacks.on_save_point); 0 = none
    accumulation: int = 1  # backward passes per optimizer step, each on batch_size rows
    processes: Processes = SINGLE  # data-parallel processes; batch_size is per process
    caption_dropout: float = 0.0  # share of subject rows trained with the empty caption
    keep_tags: int | None = None  # shuffle the subject captions' tags after this many (None: off)

    @classmethod
    def of(cls, config: LoRATrainConfig | DreamBoothTrainConfig, autocast_dtype: torch.dtype | None) -> LoopSettings:
        return cls(steps=config.steps, batch_size=config.batch_size, seed=config.seed,
                   noise_offset=config.noise_offset, min_snr_gamma=config.min_snr_gamma,
                   max_grad_norm=config.max_grad_norm, prior_loss_weight=config.prior_loss_weight,
                   autocast_dtype=autocast_dtype, accumulation=config.gradient_accumulation,
                   processes=parallel.current(), caption_dropout=config.caption_dropout,
                   keep_tags=config.keep_tags if config.shuffle_tags else None)


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    parameters: list[torch.nn.Parameter]
    grad_scaler: Any = None  # torch.amp.GradScaler for fp16
    # Zero gradients in place instead of freeing them: for a full fine-tune the 3.4 GB of UNet
    # gradients would otherwise be unmapped and faulted in again every step.
    keep_grad_buffers: bool = False
    # Steps weight by weight (fused_backward, bf16 weights); None: optimizer.step() on all at once.
    weight_steps: WeightSteps | None = None
    # Several processes with --shard-gradients: each keeps its share of the gradients (ZeRO-2)
    gradient_shards: parallel.GradientShards | None = None
    # ema_decay: the moving average of the trained weights, updated after every step
    average: WeightAverage | None = None

    def close(self) -> None:
        """Remove the backward hooks of fused_backward and --shard-gradients (the models outlive
        the run)."""
        for hooks in (self.weight_steps, self.gradient_shards):
            if hooks is not None:
                hooks.close()


@dataclass
class LoopState:
    """Everything the loop needs to continue exactly where it stopped: a resumed run then gives
    the same bytes as one that never stopped (same device and precision)."""

    step: int  # optimizer steps done
    parameters: list[torch.Tensor]  # the trainable weights, in the optimizer's order
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    grad_scaler: dict[str, Any] | None
    generator: torch.Tensor  # the data generator's state
    pending: list[list[int]]  # each stream's image indices not yet used in this epoch
    history: LossHistory
    average: list[torch.Tensor] | None = None  # the EMA of the trainable weights (ema_decay), same order


def capture_state(step: int, optimization: Optimization, generator: torch.Generator,
                  streams: Sequence[IndexStream], history: LossHistory) -> LoopState:
    """The loop's state after ``step``. The weights and optimizer moments are the live tensors,
    not copies (a full fine-tune's state is as large as 3 UNets): write it before the next step."""
    scaler = optimization.grad_scaler
    position = data_position(generator, streams)
    return LoopState(
        step=step,
        parameters=[p.detach() for p in optimization.parameters],
        optimizer=optimization.optimizer.state_dict(),
        lr_scheduler=copy.deepcopy(optimization.lr_scheduler.state_dict()),
        grad_scaler=copy.deepcopy(scaler.state_dict()) if scaler is not None else None,
        generator=position[0],
        pending=position[1],
        history=history.copy(),
        average=list(optimization.average.average) if optimization.average is not None else None,
    )


def data_position(generator: torch.Generator,
                  streams: Sequence[IndexStream]) -> tuple[torch.Tensor, list[list[int]]]:
    """Where the run's data draws stand: the generator's state and each stream's pending indices."""
    return generator.get_state().clone(), [list(stream._pending) for stream in streams]


def set_data_position(generator: torch.Generator, streams: Sequence[IndexStream],
                      position: tuple[torch.Tensor, Sequence[Sequence[int]]]) -> None:
    """Put the data draws back where :func:`data_position` found them."""
    generator.set_state(position[0])
    for stream, pending in zip(streams, position[1], strict=True):
        stream._pending = list(pending)


def restore_state(state: LoopState, optimization: Optimization, generator: torch.Generator,
                  streams: Sequence[IndexStream]) -> LossHistory:
    """Put the loop back where ``state`` was taken; returns the loss history so far."""
    if len(state.parameters) != len(optimization.parameters) or any(
            saved.shape != param.shape for saved, param in zip(state.parameters, optimization.parameters, strict=False)):
        raise ValueError("the saved training state does not fit this run's trainable weights")
    if len(state.pending) != len(streams):
        raise ValueError("the saved training state has another number of image sets than this run")
    if (state.average is None) != (optimization.average is None):
        raise ValueError("the saved training state and this run differ in keeping an EMA of the weights")
    with torch.no_grad():
        for saved, param in zip(state.parameters, optimization.parameters, strict=True):
            param.copy_(saved.to(param.device, param.dtype))
    optimization.optimizer.load_state_dict(state.optimizer)
    optimization.lr_scheduler.load_state_dict(state.lr_scheduler)
    if optimization.grad_scaler is not None and state.grad_scaler is not None:
        optimization.grad_scaler.load_state_dict(state.grad_scaler)
    if optimization.average is not None:
        optimization.average.load(state.average)
    set_data_position(generator, streams, (state.generator, state.pending))
    return state.history.copy()


class LoopWatch:
    """Work the loop does beside training at chosen steps without drawing from its random
    streams: the sample images and validation loss of ``training.watch``. This base does
    nothing, and the loop trains exactly as it would without it."""

    def before_training(self, step: int, history: LossHistory, callbacks: TrainingCallbacks) -> None:
        """Right after ``on_train_begin``: ``step`` is 0, or the step a resumed run continues after."""

    def after_step(self, state: StepState, history: LossHistory, callbacks: TrainingCallbacks) -> None:
        """After optimizer step ``state.step`` (already in ``history``), before ``on_step_end``.
        Whatever it raises goes through ``on_stop`` like an error of ``on_step_end``."""


@dataclass
class LoopResult(WithLossHistory):
    history: LossHistory = field(default_factory=LossHistory)
    seconds: float = 0.0  # training time, after caching


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class DrawnBatch:
    """The random draws of one optimizer step's global batch (CPU tensors): for each set its
    image indices, flips and latent-sample noise; for all rows (set after set) the timesteps, and
    per group of sets the training noise. Every process draws the same; each computes its own rows."""

    count: int  # rows per set
    indices: list[torch.Tensor]
    flips: list[torch.Tensor]
    latent_eps: list[torch.Tensor]
    # the sets that go through the UNet together (all, or each alone when their sizes differ) and
    # the noise of each group, its sets' rows in order
    groups: list[list[int]]
    noise: list[torch.Tensor]
    timesteps: torch.Tensor
    # the subject set's rows trained with the empty caption (caption_dropout), and their
    # captions with shuffled tags (shuffle_tags; None: unchanged)
    dropped: torch.Tensor | None = None
    texts: list[str | None] | None = None


def latent_shape(training_set: TrainingSet, vae: Any, index: int = 0) -> tuple[int, ...]:
    """(channels, h, w) of the latent of image ``index`` of ``training_set``."""
    return training_set.latent_shape(index, int(vae.config.latent_channels))


def draw_batch(models: LoopModels, sets: Sequence[TrainingSet], streams: Sequence[IndexStream], count: int,
               generator: torch.Generator, noise_offset: float = 0.0, caption_dropout: float = 0.0,
               keep_tags: int | None = None) -> DrawnBatch:
    """Draw ``count`` rows of every set, in the order one process training on all of them draws
    (``keep_tags``: shuffle the subject captions' tags after that many; None: no shuffling). The
    rows of a set are of one image size; when the sets' sizes differ, each set has its own noise."""
    indices, flips, eps = [], [], []
    for training_set, stream in zip(sets, streams, strict=True):
        indices.append(stream.take(count))
        flips.append(draw_flips(training_set, count, generator))
        eps.append(torch.randn((count, *latent_shape(training_set, models.vae, int(indices[-1][0]))),
                               generator=generator))
    shapes = [e.shape[1:] for e in eps]
    groups = [list(range(len(sets)))] if all(shape == shapes[0] for shape in shapes) else [[i] for i in range(len(sets))]
    noise = []
    for group in groups:  # one draw for all rows when the sets share a size (as always before buckets)
        shape = (count * len(group), *shapes[group[0]])
        part = torch.randn(shape, generator=generator)
        if noise_offset:
            part = part + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
        noise.append(part)
    timesteps = torch.randint(0, int(models.noise_scheduler.config.num_train_timesteps), (count * len(sets),),
                              generator=generator, dtype=torch.long)
    # drawn last, and only when on: a run without them draws what it always drew
    dropped = torch.rand(count, generator=generator) < caption_dropout if caption_dropout > 0 else None
    texts = None
    if keep_tags is not None:
        subject = sets[0]
        texts = [shuffled_caption(subject.captions[int(subject.caption_index[i])], keep_tags, generator)
                 for i in indices[0]]
    return DrawnBatch(count, indices, flips, eps, groups, noise, timesteps, dropped, texts)


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each sample's squared error weighted by its loss weights (n, 1, h, w), divided by their
    sum: the mean error of what counts, whatever its area. A cell of weight 0 adds nothing, not
    even a gradient."""
    error = (prediction.float() - target.float()).pow(2) * weights
    return error.flatten(1).mean(dim=1) / weights.expand_as(error).flatten(1).mean(dim=1)


def shard_loss(models: LoopModels, sets: Sequence[TrainingSet], drawn: DrawnBatch, rows: range,
               settings: LoopSettings) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the UNet on ``rows`` of every set of a drawn batch (once, or once per set when their
    image sizes differ); (total loss, loss per set), each set's loss the mean over its rows."""
    device, dtype = model_device(models.unet), model_dtype(models.unet)
    chosen = torch.arange(rows.start, rows.stop)
    per_sample_parts, outputs = [], []
    with autocast_context(device, settings.autocast_dtype):
        latents, conditioning, batch_rows, masks = [], [], [], []
        for i, training_set in enumerate(sets):
            indices, flips = drawn.indices[i][chosen], drawn.flips[i][chosen]
            if training_set.cached_latents:
                mean, std = training_set.latent_rows(flips, indices)
            else:
                pixels = training_set.pixel_rows(indices)
                pixels = torch.where(flips.view(-1, 1, 1, 1).bool(), pixels.flip(-1), pixels)
                mean, std = encode_latent_stats(models.vae, pixels)
            latents.append(mean + std * drawn.latent_eps[i][chosen])
            dropped = drawn.dropped[chosen] if i == 0 and drawn.dropped is not None else None
            texts = [drawn.texts[j] for j in chosen.tolist()] if i == 0 and drawn.texts is not None else None
            conditioning.append(batch_conditioning(training_set, indices, models.text_encoder, dropped, texts)
                                .to(device))
            batch_rows.append(chosen + i * drawn.count)
            masks.append(training_set.weight_rows(flips, indices))
        for group, group_noise in zip(drawn.groups, drawn.noise, strict=True):
            clean = torch.cat([latents[i] for i in group])
            noise = group_noise[torch.cat([chosen + place * drawn.count for place in range(len(group))])]
            timesteps = drawn.timesteps[torch.cat([batch_rows[i] for i in group])]
            noisy = models.noise_scheduler.add_noise(clean, noise, timesteps)
            target = training_target(models.noise_scheduler, clean, noise, timesteps)
            weights = (
                min_snr_weights(models.noise_scheduler, timesteps, settings.min_snr_gamma)
                if settings.min_snr_gamma > 0
                else torch.ones(len(clean))
            )
            context = torch.cat([conditioning[i] for i in group])
            if settings.autocast_dtype is None:
                context = context.to(dtype)
            prediction = models.unet(
                noisy.to(device, dtype), timesteps.to(device), encoder_hidden_states=context
            ).sample
            cells = None
            if any(masks[i] is not None for i in group):
                cells = torch.cat([masks[i] if masks[i] is not None else torch.ones(len(latents[i]), 1, *clean.shape[2:])
                                   for i in group])
            outputs.append((prediction, target, weights, cells))
    for prediction, target, weights, cells in outputs:  # in fp32, outside autocast
        errors = (per_sample_mse(prediction, target.to(device)) if cells is None
                  else masked_mse(prediction, target.to(device), cells.to(device)))
        per_sample_parts.append(errors * weights.to(device))
    per_sample = torch.cat(per_sample_parts)
    parts = [chunk.mean() for chunk in per_sample.split([len(rows)] * len(sets))]
    total = parts[0]
    for part in parts[1:]:
        total = total + settings.prior_loss_weight * part
    return total, parts


def compute_step_loss(
    models: LoopModels,
    sets: Sequence[TrainingSet],
    streams: Sequence[IndexStream],
    settings: LoopSettings,
    generator: torch.Generator,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Draw one batch from every set, run the UNet once on all of it; (total loss, loss per set)."""
    drawn = draw_batch(models, sets, streams, settings.batch_size, generator, settings.noise_offset,
                       settings.caption_dropout, settings.keep_tags)
    return shard_loss(models, sets, drawn, range(settings.batch_size), settings)


def begin_gradients(optimization: Optimization, step: int) -> None:
    """Before the first backward pass of optimizer step ``step``: clear the last step's gradients."""
    steps = optimization.weight_steps
    if steps is not None and steps.in_backward:
        steps.begin(step)
    elif steps is not None:  # its optimizer holds fp32 stand-ins of bf16 weights: free the weights' own gradients
        for parameter in optimization.parameters:
            parameter.grad = None
    else:
        optimization.optimizer.zero_grad(set_to_none=not optimization.keep_grad_buffers)


def backward(loss: torch.Tensor, optimization: Optimization) -> None:
    scaler = optimization.grad_scaler
    (scaler.scale(loss) if scaler is not None else loss).backward()


def finish_step(optimization: Optimization, max_grad_norm: float, step: int,
                processes: Processes = SINGLE) -> float:
    """After the backward pass(es): average the gradients over the processes, clip, optimizer and
    scheduler step; returns the gradient norm before clipping.

    Raises NonFiniteLossError before the optimizer step if an fp32 gradient is not finite (with
    fp16 the grad scaler skips such steps itself). With fused_backward the weights were stepped
    during the backward pass, each with its own clipped gradient; a non-finite gradient is found
    after that pass (the run stops the same way, its weights no longer usable).
    """
    optimizer, scaler = optimization.optimizer, optimization.grad_scaler
    steps = optimization.weight_steps
    if steps is not None and steps.in_backward:
        norm = steps.end()
        if not math.isfinite(norm):
            raise NonFiniteLossError(step, "gradient", float(optimizer.param_groups[0]["lr"]))
        optimization.lr_scheduler.step()
        return norm
    limit = max_grad_norm if max_grad_norm > 0 else math.inf
    if optimization.gradient_shards is not None:  # each process has the sums of its share only
        norm = optimization.gradient_shards.finish(limit)
    else:
        processes.average_gradients(optimization.parameters)
        if scaler is not None:
            scaler.unscale_(optimizer)
        norm = float(torch.nn.utils.clip_grad_norm_(optimization.parameters, limit))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        if not math.isfinite(norm):
            raise NonFiniteLossError(step, "gradient", float(optimizer.param_groups[0]["lr"]))
        if steps is not None:
            steps.begin(step)
            steps.step_all()
        else:
            optimizer.step()
    optimization.lr_scheduler.step()
    return norm


def apply_gradients(loss: torch.Tensor, optimization: Optimization, max_grad_norm: float, step: int) -> float:
    """One process, one batch: backward of ``loss``, then :func:`finish_step`."""
    begin_gradients(optimization, step)
    backward(loss, optimization)
    return finish_step(optimization, max_grad_norm, step)


class StepCancelled(BaseException):
    """A cancel found inside a step's forward pass (``TrainingCallbacks.check_cancel`` raised
    ``error``): no weight has changed in that step."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class CancelChecks:
    """``callbacks.check_cancel()`` before each of the UNet's down, mid and up blocks while a
    training step's forward pass runs (not in its backward pass, where fused_backward steps
    weights, nor in sample rounds, which check every denoising step): a cancel stops within the
    step instead of after it."""

    def __init__(self, unet: Any, callbacks: TrainingCallbacks) -> None:
        self.callbacks = callbacks
        self.active = False
        blocks = [*getattr(unet, "down_blocks", []), *([unet.mid_block] if getattr(unet, "mid_block", None) else []),
                  *getattr(unet, "up_blocks", [])]
        self._handles = [block.register_forward_pre_hook(self._check) for block in blocks]

    def _check(self, module: Any, args: Any) -> None:
        if self.active:
            try:
                self.callbacks.check_cancel()
            except BaseException as error:
                traceback.clear_frames(error.__traceback__)
                raise StepCancelled(error.with_traceback(None)) from None

    def forward(self) -> Any:
        """The context of a forward pass that may be cancelled."""
        return _Active(self)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class _Active:
    def __init__(self, checks: CancelChecks) -> None:
        self.checks = checks

    def __enter__(self) -> None:
        self.checks.active = True

    def __exit__(self, *exc: Any) -> None:
        self.checks.active = False


def train_step(models: LoopModels, sets: Sequence[TrainingSet], streams: Sequence[IndexStream],
               settings: LoopSettings, generator: torch.Generator, optimization: Optimization,
               step: int, checks: CancelChecks | None = None) -> tuple[float, list[float]]:
    """One optimizer step on the global batch (``batch_size`` x processes x ``accumulation`` rows
    of every set): this process's rows in ``accumulation`` backward passes, gradients averaged
    over the processes. Returns the global batch's loss and loss per set (the same in every
    process). Raises NonFiniteLossError before the optimizer step at a non-finite loss."""
    processes, accumulation = settings.processes, settings.accumulation
    lr = float(optimization.optimizer.param_groups[0]["lr"])
    count = settings.batch_size * processes.world * accumulation
    drawn = draw_batch(models, sets, streams, count, generator, settings.noise_offset, settings.caption_dropout,
                       settings.keep_tags)
    begin_gradients(optimization, step)
    total, parts_total = 0.0, [0.0] * len(sets)
    for rows in processes.shard(count, accumulation):
        with checks.forward() if checks is not None else nullcontext():
            loss, parts = shard_loss(models, sets, drawn, rows, settings)
        # every process sees the global values, so all stop at the same non-finite loss
        values = processes.mean([float(loss.detach()), *(float(p.detach()) for p in parts)])
        if not math.isfinite(values[0]):
            raise NonFiniteLossError(step, "loss", lr)
        total += values[0] / accumulation
        parts_total = [s + v / accumulation for s, v in zip(parts_total, values[1:], strict=True)]
        backward(loss / accumulation if accumulation > 1 else loss, optimization)
    finish_step(optimization, settings.max_grad_norm, step, processes)
    if optimization.average is not None:
        optimization.average.update(step)
    return total, parts_total


def run_training_loop(
    models: LoopModels,
    instance: TrainingSet,
    optimization: Optimization,
    settings: LoopSettings,
    callbacks: TrainingCallbacks,
    prior: TrainingSet | None = None,
    resume: LoopState | None = None,
    snapshot: Callable[[LossHistory], Any] | None = None,
    watch: LoopWatch | None = None,
) -> LoopResult:
    """Train for ``settings.steps`` optimizer steps, calling ``callbacks.on_step_end`` after each
    (and ``on_save_point`` every ``settings.save_every``). With ``resume`` the loop continues
    after the step that state was captured at. ``snapshot(history)`` makes the trainer's result
    so far, for the save-point and stop callbacks. ``watch`` samples images and computes the
    validation loss before the first step and after chosen ones (``training.watch``).

    Raises NonFiniteLossError at the first non-finite loss or gradient, before the optimizer
    applies it; anything a callback raises propagates unchanged. The caller owns model setup and
    cleanup (adapters, requires_grad, train mode).
    """
    generator = torch.Generator().manual_seed(derive_seed(settings.seed, "data"))
    sets = [instance] if prior is None else [instance, prior]
    streams = [index_stream(s, generator) for s in sets]
    result = LoopResult()
    first = 1
    if resume is not None:
        result.history = restore_state(resume, optimization, generator, streams)
        first = resume.step + 1
        logger.info("resuming at step %d of %d", first, settings.steps)
        callbacks.on_resume(resume.step, result.history.copy())
    watch = watch or LoopWatch()
    callbacks.on_train_begin(settings.steps)
    started = time.monotonic()
    watch.before_training(first - 1, result.history, callbacks)
    # one process only: the others would wait for its gradients at the average
    checks = CancelChecks(models.unet, callbacks) if settings.processes.world == 1 else None

    def capture_at(done: int) -> Callable[[], LoopState]:
        return lambda: capture_state(done, optimization, generator, streams, result.history)

    def current() -> Any:
        return snapshot(result.history) if snapshot is not None else None

    try:
        for step in range(first, settings.steps + 1):
            lr = step_lr(optimization.optimizer)
            drawn_from = data_position(generator, streams)
            error: BaseException | None = None
            try:
                loss, parts = train_step(models, sets, streams, settings, generator, optimization, step, checks)
            except StepCancelled as cancelled:
                # the forward pass's frames hold its activations: let them go with the step
                traceback.clear_frames(cancelled.__traceback__)
                error = cancelled.error
            if error is not None:  # raised outside the except: no context chain back to those frames
                # nothing of this step was applied: the loop is as it was after the last one, draws included
                set_data_position(generator, streams, drawn_from)
                if step > first:  # a step was trained in this run: what a cancel after it would have kept
                    callbacks.on_stop(step - 1, capture_at(step - 1), current, error)
                raise error
            state = StepState(
                step=step,
                total_steps=settings.steps,
                loss=loss,
                lr=lr,
                elapsed=time.monotonic() - started,
                instance_loss=parts[0],
                prior_loss=parts[1] if prior is not None else None,
            )
            result.history.add(state)
            try:
                watch.after_step(state, result.history, callbacks)
                callbacks.on_step_end(state)
            except BaseException as stop:
                callbacks.on_stop(step, capture_at(step), current, stop)
                raise
            if settings.save_every and step % settings.save_every == 0 and step < settings.steps:
                if is_sharded(optimization.optimizer):  # every process sends its share of the states to the main one
                    optimization.optimizer.consolidate_state_dict(to=0)
                callbacks.on_save_point(step, capture_at(step), current)
    finally:
        if checks is not None:
            checks.remove()
    if optimization.average is not None:  # the final weights are the average
        optimization.average.copy_to_weights()
    result.seconds = time.monotonic() - started
    callbacks.on_train_end(list(result.losses))
    return result


# ---------------------------------------------------------------------------------------------
# What the loop steps with: precision (autocast), optimizer, LR schedule
# ---------------------------------------------------------------------------------------------

ADAMW_BETAS = (0.9, 0.999)
ADAMW_WEIGHT_DECAY = 1e-2
ADAMW_EPS = 1e-8
ADAMW_DESCRIPTION = f"torch.optim.AdamW(betas={ADAMW_BETAS},weight_decay={ADAMW_WEIGHT_DECAY},eps={ADAMW_EPS})"
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


COMPUTE_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype_for(config: LoRATrainConfig | DreamBoothTrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``config`` on ``device`` (``auto`` resolved there); None means plain fp32.

    Raises ConfigError for settings the device cannot run (:func:`config.check_device`).
    """
    check_device(config, device)
    return COMPUTE_DTYPES[config.compute_precision(device)]


def mixed_precision_name(autocast_dtype: torch.dtype | None) -> str:
    """kohya's ``ss_mixed_precision`` value for an autocast dtype."""
    return {None: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype]


def optimizer_recipe(groups: list[dict[str, Any]], name: str) -> tuple[type, dict[str, Any]]:
    """(optimizer class, its settings) for ``name``: AdamW (torch's fused kernel where every weight
    allows it), Adafactor used like Adam (absolute learning rate, no relative steps, no momentum),
    or bitsandbytes' AdamW8bit (CUDA)."""
    if name == "adamw":
        return torch.optim.AdamW, dict(betas=ADAMW_BETAS, weight_decay=ADAMW_WEIGHT_DECAY, eps=ADAMW_EPS,
                                       fused=_fused_adamw_fits(groups) or None)
    if name == "adafactor":
        return Adafactor, dict(lr=groups[0]["lr"], weight_decay=0.0)
    if name == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit, dict(betas=ADAMW_BETAS, weight_decay=ADAMW_WEIGHT_DECAY, eps=ADAMW_EPS)
    if name == "prodigy":
        return Prodigy, dict(PRODIGY_SETTINGS)
    raise ConfigError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))} (got {name!r})")


# Prodigy as its authors advise for diffusion models: Adam's bias correction, the warm-up safeguard
PRODIGY_SETTINGS = {"betas": ADAMW_BETAS, "weight_decay": ADAMW_WEIGHT_DECAY, "eps": ADAMW_EPS,
                    "use_bias_correction": True, "safeguard_warmup": True, "d0": 1e-6}
OPTIMIZER_DESCRIPTIONS = {
    "adamw": ADAMW_DESCRIPTION,
    "adafactor": "Adafactor(relative_step=False,scale_parameter=False,beta1=None)",
    "adamw8bit": f"bitsandbytes.optim.AdamW8bit(betas={ADAMW_BETAS},weight_decay={ADAMW_WEIGHT_DECAY})",
    "prodigy": "Prodigy(" + ",".join(f"{k}={v}" for k, v in PRODIGY_SETTINGS.items()) + ")",
}


def step_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate the next step applies to the first group: its ``lr``, times the step
    size Prodigy estimated (``d``) for Prodigy."""
    group = optimizer.param_groups[0]
    return float(group["lr"]) * float(group.get("d", 1.0))


def make_optimizer(groups: list[dict[str, Any]], name: str, shard: bool = False) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``groups``; with ``shard`` (several processes) each process
    keeps the states of its share of the weights only and steps those (ZeRO stage 1, torch's
    ZeroRedundancyOptimizer): the same update, the states' memory divided by the processes."""
    cls, settings = optimizer_recipe(groups, name)
    if not shard:
        return cls(groups, **settings)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    settings.pop("fused", None)  # each process's share may mix devices/dtypes less than the whole: plain kernel
    settings.setdefault("lr", groups[0]["lr"])
    optimizer = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=cls, **settings)
    for group in groups[1:]:
        optimizer.add_param_group(group)
    return optimizer


def is_sharded(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer).__name__ == "ZeroRedundancyOptimizer"


def _fused_adamw_fits(groups: list[dict[str, Any]]) -> bool:
    """torch's fused AdamW runs one kernel over all weights: they must be floating point, on one
    CPU or CUDA device. Same update as the default loop within fp32 rounding, and faster."""
    params = [p for group in groups for p in group["params"]]
    devices = {p.device for p in params}
    return bool(params) and len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda") \
        and all(p.is_floating_point() for p in params)


def stochastic_round_to_bf16(values: torch.Tensor, generator: torch.Generator | None = None,
                             inplace: bool = False) -> torch.Tensor:
    """``values`` (fp32) in bf16, each rounded up or down at random with odds given by its distance
    to the two neighbours: unbiased, so updates far below bf16's resolution still add up over steps
    where round-to-nearest would drop every one of them.

    bf16 is the top 16 bits of an fp32: adding uniform random bits below them and cutting them off
    carries into the kept bits with exactly that probability. ``inplace`` may overwrite ``values``.
    """
    bits = (values if inplace and values.dtype == torch.float32 else values.to(torch.float32, copy=True))
    bits = bits.contiguous().view(torch.int32)
    bits.add_(torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator))
    bits.bitwise_and_(-(1 << 16))
    return bits.view(torch.float32).to(torch.bfloat16)


class WeightSteps:
    """Steps the optimizer one weight at a time, for two lean ways to train:

    - inside the backward pass (``in_backward``, the fused_backward option): a hook on each weight
      clips that tensor's gradient, steps it and frees the gradient as soon as it is accumulated,
      so the gradients of the whole model are never held at once;
    - for bf16 weights: the optimizer holds an fp32 stand-in per weight (empty between steps, so
      it costs no memory), the update is computed in fp32 on a temporary fp32 copy of the weight
      (its states are fp32), and written back with :func:`stochastic_round_to_bf16`, its random
      bits drawn from the run's seed, the step and the weight's index (a resumed run repeats them).

    The optimizer's ``param_groups`` and ``state_dict`` look as if it stepped all weights at once,
    so the LR schedule and training states (resume) are the same as the ordinary path's.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter],
                 stand_ins: list[torch.Tensor] | None, *, in_backward: bool, max_grad_norm: float, seed: int,
                 processes: Processes = SINGLE) -> None:
        self.optimizer = optimizer
        self.processes = processes  # in_backward: each gradient is averaged over them in its hook
        self.parameters = parameters
        self.stand_ins = stand_ins
        self.in_backward = in_backward
        self.max_grad_norm = max_grad_norm
        self.seed = seed
        stepped = stand_ins if stand_ins is not None else parameters
        where = {id(t): (g, group) for g, group in enumerate(optimizer.param_groups) for t in group["params"]}
        self._group = [where[id(t)][1] for t in stepped]
        self._index = {id(p): i for i, p in enumerate(parameters)}
        self._step = 0
        self._squares: torch.Tensor | None = None
        self._generator: torch.Generator | None = None
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_gradient) for p in parameters] \
            if in_backward else []

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def begin(self, step: int) -> None:
        """Before the backward pass (or step_all) of optimizer step ``step``."""
        self._step = step
        self._squares = None

    def end(self) -> float:
        """After the backward pass: the norm of all gradients before clipping."""
        for parameter in self.parameters:
            if parameter.grad is not None:  # its hook did not run (not expected of autograd's leaves): step it now
                self._on_gradient(parameter)
        return math.sqrt(float(self._squares)) if self._squares is not None else 0.0

    def step_all(self) -> None:
        """The ordinary path with bf16 weights: gradients already clipped together; step each weight."""
        for parameter in self.parameters:
            if parameter.grad is not None:
                self.step_one(parameter)
                parameter.grad = None

    def _on_gradient(self, parameter: torch.Tensor) -> None:
        grad = parameter.grad
        assert grad is not None
        with torch.no_grad():
            self.processes.average_([grad])  # hooks run in the same order in every process
            norm = torch.linalg.vector_norm(grad.detach(), dtype=torch.float32)
            squares = norm.square()
            self._squares = squares if self._squares is None else self._squares + squares.to(self._squares.device)
            if self.max_grad_norm > 0:
                grad.mul_(torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0).to(grad.dtype))
        self.step_one(parameter)
        parameter.grad = None

    def step_one(self, parameter: torch.Tensor) -> None:
        """One optimizer step of ``parameter`` alone (its gradient is set), with its group's settings."""
        index = self._index[id(parameter)]
        group = self._group[index]
        stand_in = self.stand_ins[index] if self.stand_ins is not None else None
        if stand_in is not None:
            assert parameter.grad is not None
            stand_in.data = parameter.detach().float()
            stand_in.grad = parameter.grad.detach().float()
            stepped = stand_in
        else:
            stepped = parameter
        groups, params = self.optimizer.param_groups, group["params"]
        self.optimizer.param_groups, group["params"] = [group], [stepped]
        try:
            self.optimizer.step()
        finally:
            self.optimizer.param_groups, group["params"] = groups, params
        if stand_in is not None:
            with torch.no_grad():
                parameter.copy_(stochastic_round_to_bf16(stand_in.data, self._rounding(parameter, index),
                                                         inplace=True))
            stand_in.grad = None
            stand_in.data = stand_in.data.new_empty(0)

    def _rounding(self, parameter: torch.Tensor, index: int) -> torch.Generator:
        if self._generator is None or self._generator.device != parameter.device:
            self._generator = torch.Generator(device=parameter.device)
        return self._generator.manual_seed(derive_seed(self.seed, f"rounding:{self._step}:{index}"))


class WeightAverage:
    """The exponential moving average (EMA) of the trained weights, in fp32 on ``device``: it
    starts as the weights before training; after optimizer step k it becomes
    ``d * average + (1 - d) * weights`` with ``d = min(decay, k / (k + 9))`` (diffusers' EMA
    warm-up: the first steps' weights count more, the average is not stuck at the start)."""

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float, device: torch.device) -> None:
        self.parameters = parameters
        self.decay = decay
        self.average = [p.detach().to(device=device, dtype=torch.float32, copy=True) for p in parameters]

    def factor(self, step: int) -> float:
        return min(self.decay, step / (step + 9))

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = self.factor(step)
        for average, parameter in zip(self.average, self.parameters, strict=True):
            average.mul_(d).add_(parameter.detach().to(average.device, torch.float32), alpha=1 - d)

    @torch.no_grad()
    def load(self, saved: Sequence[torch.Tensor] | None) -> None:
        if saved is None or len(saved) != len(self.average) or any(
                a.shape != b.shape for a, b in zip(saved, self.average, strict=True)):
            raise ValueError("the saved training state's EMA does not fit this run's trainable weights")
        for average, tensor in zip(self.average, saved, strict=True):
            average.copy_(tensor)

    @torch.no_grad()
    def copy_to_weights(self) -> None:
        """Make the average the weights (bf16 weights take it rounded to the nearest)."""
        for average, parameter in zip(self.average, self.parameters, strict=True):
            parameter.copy_(average)


def build_optimization(
    config: LoRATrainConfig | DreamBoothTrainConfig,
    unet_params: list[torch.nn.Parameter],
    text_params: list[torch.nn.Parameter],
    autocast_dtype: torch.dtype | None,
    keep_grad_buffers: bool = False,
    device: torch.device | None = None,
) -> Optimization:
    """Optimizer (one parameter group per model, each with its own lr), schedule and grad scaler,
    and for DreamBooth's ``fused_backward`` / ``weight_precision`` bf16 the weight-by-weight steps."""
    from diffusers.optimization import get_scheduler

    parameters = unet_params + text_params
    in_backward = bool(getattr(config, "fused_backward", False))
    low_weights = any(p.dtype == torch.bfloat16 for p in parameters)
    # bf16 weights: the optimizer steps fp32 stand-ins (empty between steps) so its states are fp32.
    stand_ins = [torch.empty(0, dtype=torch.float32, device=p.device) for p in parameters] if low_weights else None
    stepped = stand_ins if stand_ins is not None else parameters
    groups: list[dict[str, Any]] = [{"params": stepped[:len(unet_params)], "lr": config.unet_lr}]
    if text_params:
        groups.append({"params": stepped[len(unet_params):], "lr": config.text_encoder_lr})
    processes = parallel.current()
    shard = processes.several and processes.shard_optimizer
    flag = "--shard-gradients" if processes.shard_gradients else "--shard-optimizer"
    if shard and config.optimizer == "prodigy":
        raise ConfigError(f"{flag} steps each process's share of the weights with its own optimizer, but 'prodigy' "
                          "estimates one step size from all of them: leave the optimizer states unsharded, or use "
                          "optimizer 'adamw' or 'adafactor'")
    if config.optimizer == "prodigy" and config.unet_lr < 0.1:
        logger.warning("optimizer 'prodigy' multiplies its estimated step size by the learning rate: unet_lr %g "
                       "shrinks every step by that factor (1.0 is the usual setting)", config.unet_lr)
    if shard and (in_backward or stand_ins is not None):
        raise ConfigError(f"{flag} steps each process's share of the weights at the end of a step: it "
                          "cannot run with fused_backward or weight_precision 'bf16'; turn those off or leave the "
                          "optimizer states unsharded")
    if shard and processes.shard_gradients and autocast_dtype == torch.float16:
        raise ConfigError("--shard-gradients cannot run with fp16 gradient scaling (each process sees only its share "
                          "of the gradients when the scaler checks them): set precision to 'bf16' or 'fp32', or use "
                          "--shard-optimizer")
    optimizer = make_optimizer(groups, config.optimizer, shard)
    scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps,
                              num_training_steps=config.steps)
    device = device if device is not None else (parameters[0].device if parameters else torch.device("cpu"))
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None
    gradient_shards = parallel.GradientShards(parameters, optimizer._param_to_rank, processes) \
        if shard and processes.shard_gradients else None
    weight_steps = None
    if in_backward or stand_ins is not None:
        if scaler is not None:
            raise ConfigError("fused_backward and weight_precision 'bf16' cannot run with fp16 gradient scaling: "
                              "set precision to 'bf16' or 'fp32'")
        weight_steps = WeightSteps(optimizer, parameters, stand_ins, in_backward=in_backward,
                                   max_grad_norm=config.max_grad_norm, seed=config.seed,
                                   processes=parallel.current())
    average = None
    if config.ema_decay:
        average = WeightAverage(parameters, config.ema_decay, torch.device("cpu") if config.ema_on_cpu else device)
    return Optimization(optimizer, scheduler, parameters, scaler, keep_grad_buffers=keep_grad_buffers,
                        weight_steps=weight_steps, gradient_shards=gradient_shards, average=average)
