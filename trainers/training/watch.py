"""Watching a run learn: sample images during training and a validation loss.

Both run beside the training loop (a :class:`loop.LoopWatch`) before the first step (step 0: the
base model), every N steps and at the last step. They use the models being trained as they are
(LoRA layers active, or the fine-tuned UNet; the VAE and text encoder already loaded: no reload,
no copy), under ``torch.no_grad`` with every model in eval mode for the round and back after,
with the training's autocast on CUDA, and with generators of their own: they never draw from the
training generator or torch's global RNG. A run with samples and validation therefore trains the
very same weights as one without (the file's tensors are byte-identical; only its metadata gains
the validation curve, ``dbs.validation_loss``).

Samples: DDIM with eta 0 (deterministic: no noise is drawn after the start) built from the
noise scheduler's config, classifier-free guidance against the empty prompt, one prompt at a
time (flat memory), starting latents from a CPU generator seeded with ``sample_seed + prompt
index``: the same noise every round, so the rows of a grid compare. With a sample folder each
round is written as ``step<NNNNNN>-p<i>-<slug>.png`` (``i`` from 0, slug: the prompt in
``[a-z0-9-]``, at most 40 characters) plus ``samples.json`` (prompts, settings, rounds).

Validation loss: the training objective (epsilon MSE, min-SNR weighted when training uses it) at
4 fixed timesteps spread over the schedule (125, 375, 625, 875 of 1000) with fixed noise, on the
cached latent means of up to 8 subject images and, with prior preservation, 8 class images
(weighted and added like in training), each conditioned on its caption through the current text
encoder. The training loss draws a new timestep and noise every step and jumps by an order of
magnitude from step to step; this one changes only when the weights do, so its curve shows the
model fitting the subject (and, flattening or rising on the class images, forgetting the class).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.subject import SubjectData
from ..files.fileio import atomic_write_bytes, sweep_stale_temps
from .callbacks import LossHistory, SampleRound, StepState, TrainingCallbacks
from .config import MAX_SEED, ConfigError, _spec, _ValidatedConfig
from .loop import (
    LoopModels,
    LoopSettings,
    LoopWatch,
    TrainingSet,
    autocast_context,
    derive_seed,
    encode_latent_stats,
    encode_text,
    masked_mse,
    min_snr_weights,
    model_device,
    model_dtype,
    per_sample_mse,
    tokenize,
    training_target,
)
from .plot import text_font
from .residency import Residency

log = logging.getLogger(__name__)

SAMPLER = "ddim"  # eta 0: deterministic after the starting noise
DEFAULT_CONTEXT = "on the beach"  # the default second prompt: the subject in a new scene
MAX_PROMPTS = 8
MAX_PROMPT_CHARS = 1000
VALIDATION_TIMESTEPS = 4
MAX_VALIDATION_IMAGES = 8  # per image set (subject, class)
VALIDATION_BATCH = 8
SAMPLES_JSON = "samples.json"
SAMPLES_FORMAT = 1
SLUG_CHARS = 40
SAMPLE_NAME = re.compile(r"^step(\d{6,})-p(\d+)-([a-z0-9-]*)\.png$")
# The settings that make two rounds comparable: a resumed run keeps earlier rounds only if they match.
_SETTINGS = ("run", "prompts", "seed", "steps", "cfg", "size", "sampler")
SCORE_KEYS = ("dino", "clip_i", "clip_t")
# The best step: highest DINO among the scored rounds whose CLIP-T stays within this margin of the
# first round's (the base model before training): identity gained without losing the prompt.
CLIP_T_MARGIN = 0.02


@dataclass(frozen=True)
class WatchConfig(_ValidatedConfig):
    """What to show while a run trains: sample images and the validation loss. Not part of a
    run's fingerprint: it never changes the trained weights."""

    sample_every: int = _spec(
        250,
        "Make sample images every N steps (and before training and at the last step) to see the subject "
        "being learned. A round costs 2 x sample_steps UNet passes per prompt: at the defaults about as long as "
        "40 LoRA training steps. 0 = no samples. The trained file is the same either way.",
        min=1, max=100_000, zero_means="no samples",
    )
    sample_prompts: str = _spec(
        "",
        f"Prompts of the sample images, one per line (at most {MAX_PROMPTS}, each at most {MAX_PROMPT_CHARS} "
        f"characters). Empty: the instance prompt, and the same prompt '{DEFAULT_CONTEXT}' (does the subject "
        "go to a new scene, or does every image turn into the training photos?).",
        multiline=True,
    )
    sample_seed: int = _spec(
        0, "Seed of the samples' starting noise (prompt i uses seed + i). Every round starts from the same noise, "
        "so the images of different steps compare.", min=0, max=MAX_SEED,
    )
    sample_steps: int = _spec(
        20, "Denoising steps per sample image (DDIM). 20 is enough to judge the subject; more costs time.",
        min=1, max=150,
    )
    sample_cfg: float = _spec(
        7.5, "Guidance scale (CFG) of the samples, against the empty prompt. 1 turns guidance off (half the cost).",
        min=1.0, max=30.0, step=0.5,
    )
    sample_size: int = _spec(
        0, "Size of the sample images in pixels (square, a multiple of 64); 0 = the training resolution.",
        min=64, max=1024, step=64, zero_means="the training resolution",
    )
    validate_every: int = _spec(
        100,
        f"Compute the validation loss every N steps (and before training and at the last step): the loss at "
        f"{VALIDATION_TIMESTEPS} fixed timesteps with fixed noise on up to {MAX_VALIDATION_IMAGES} subject photos "
        f"(and {MAX_VALIDATION_IMAGES} class images). Unlike the noisy training loss it moves only when the "
        f"model learns: falling = fitting the subject. Costs {VALIDATION_TIMESTEPS} UNet passes per image without "
        "gradients (for 8 photos about as long as 10 LoRA training steps). 0 = off.",
        min=1, max=100_000, zero_means="off",
    )

    def _check_together(self) -> None:
        if self.sample_size % 64:
            raise ConfigError(f"sample_size must be 0 (the training resolution) or a multiple of 64 from 64 to "
                              f"1024 (got {self.sample_size})")
        self.prompt_list("a photo")

    def prompt_list(self, instance_prompt: str) -> list[str]:
        """The sample prompts: one per line of ``sample_prompts``, or the default pair."""
        text = self.sample_prompts.strip()
        if not text:
            return [instance_prompt, f"{instance_prompt} {DEFAULT_CONTEXT}"]
        lines = [line.strip() for line in text.splitlines()]
        if len(lines) > MAX_PROMPTS:
            raise ConfigError(f"sample_prompts has {len(lines)} lines; at most {MAX_PROMPTS} prompts, one per line")
        for number, line in enumerate(lines, start=1):
            if not line:
                raise ConfigError(f"sample_prompts line {number} is empty: write one prompt per line, without "
                                  "blank lines")
            if len(line) > MAX_PROMPT_CHARS:
                raise ConfigError(f"sample_prompts line {number} is {len(line)} characters long; at most "
                                  f"{MAX_PROMPT_CHARS} (the text encoder reads only the first 77 tokens anyway)")
        return lines

    def image_size(self, resolution: int) -> int:
        return self.sample_size or int(resolution)

    @property
    def active(self) -> bool:
        return bool(self.sample_every or self.validate_every)

    def sample_rounds(self, steps: int) -> int:
        """How many sample rounds a run of ``steps`` steps makes (step 0, every N, the last)."""
        return _rounds(self.sample_every, steps)

    def validation_points(self, steps: int) -> int:
        return _rounds(self.validate_every, steps)


def _rounds(every: int, steps: int) -> int:
    if not every:
        return 0
    return 1 + steps // every + (1 if steps % every else 0)


def due(every: int, step: int, total: int) -> bool:
    """Whether a check of period ``every`` runs after ``step``: every N steps and at the last."""
    return bool(every) and (step % every == 0 or step == total)


def prompt_slug(prompt: str) -> str:
    """The prompt as a file-name part: lower-case ``[a-z0-9-]``, at most 40 characters."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:SLUG_CHARS].rstrip("-")
    return slug or "prompt"


def sample_file_name(step: int, index: int, prompt: str) -> str:
    return f"step{step:06d}-p{index}-{prompt_slug(prompt)}.png"


@dataclass
class WatchOutcome:
    """What watching a run gave: its sample rounds (also those on disk from before a resume),
    the time spent on them, and notes (a sample folder that could not be written)."""

    samples: list[SampleRound] = field(default_factory=list)
    sample_seconds: float = 0.0
    validation_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# The sample folder
# ---------------------------------------------------------------------------------------------


def _read_record(folder: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((folder / SAMPLES_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != SAMPLES_FORMAT:
        return None
    prompts = record.get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        return None
    for key in ("rounds", "scores"):
        if not isinstance(record.get(key), dict):
            record[key] = {}
    return record


def _sample_files(folder: Path) -> list[tuple[int, int, Path]]:
    """(step, prompt index, path) of every file named like a sample in ``folder``."""
    try:
        names = [entry.name for entry in folder.iterdir()]
    except OSError:
        return []
    found = []
    for name in names:
        match = SAMPLE_NAME.match(name)
        if match:
            found.append((int(match.group(1)), int(match.group(2)), folder / name))
    return sorted(found)


def load_sample_rounds(folder: str | os.PathLike, run: str | None = None) -> list[SampleRound]:
    """The complete sample rounds in ``folder`` (oldest first), read from its PNGs and
    ``samples.json``; only those of ``run`` (a job fingerprint) when it is given."""
    from PIL import Image

    folder = Path(folder)
    record = _read_record(folder)
    if record is None or (run is not None and record.get("run") != run):
        return []
    prompts: list[str] = record["prompts"]
    by_step: dict[int, dict[int, Path]] = {}
    for step, index, path in _sample_files(folder):
        if index < len(prompts) and path.name == sample_file_name(step, index, prompts[index]):
            by_step.setdefault(step, {})[index] = path
    rounds = []
    for step, files in sorted(by_step.items()):
        if len(files) != len(prompts):
            continue  # an incomplete round (stopped while writing it)
        images = []
        try:
            for index in range(len(prompts)):
                with Image.open(files[index]) as image:
                    images.append(image.convert("RGB"))
        except (OSError, ValueError):
            log.warning("sample images of step %d in %s cannot be read: left out", step, folder.name)
            continue
        seconds = record["rounds"].get(str(step), 0.0)
        rounds.append(SampleRound(step=step, prompts=list(prompts), images=images,
                                  paths=[files[i] for i in range(len(prompts))],
                                  seconds=float(seconds) if isinstance(seconds, (int, float)) else 0.0,
                                  scores=checked_scores(record["scores"].get(str(step)))))
    return rounds


def checked_scores(scores: Any) -> dict[str, float] | None:
    """``scores`` as ``{"dino", "clip_i", "clip_t"}`` floats, or None when it is not that (a
    record written by hand, or by a run that did not score)."""
    if not isinstance(scores, dict) or set(scores) != set(SCORE_KEYS):
        return None
    values = {}
    for key in SCORE_KEYS:
        value = scores[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        values[key] = float(value)
    return values


def best_round(rounds: Sequence[SampleRound], margin: float = CLIP_T_MARGIN,
               eligible: Callable[[int], bool] | None = None) -> SampleRound | None:
    """The round with the highest DINO among the scored rounds after step 0 whose CLIP-T is at
    least the first scored round's minus ``margin`` (earliest on a tie), among the steps that
    ``eligible`` accepts (e.g. those with a model file); None without such a round."""
    scored = sorted((r for r in rounds if r.scores is not None), key=lambda r: r.step)
    if not scored:
        return None
    floor = scored[0].scores["clip_t"] - margin
    best = None
    for round_ in scored:
        if round_.step <= 0 or round_.scores["clip_t"] < floor or (eligible is not None and not eligible(round_.step)):
            continue
        if best is None or round_.scores["dino"] > best.scores["dino"]:
            best = round_
    return best


class SampleFolder:
    """One run's sample PNGs and ``samples.json`` in a folder. Only files named like samples are
    ever removed; everything is written under a temporary name and renamed into place."""

    def __init__(self, folder: str | os.PathLike, settings: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.record: dict[str, Any] = {"format": SAMPLES_FORMAT, **settings, "rounds": {}, "scores": {}}

    def start(self, resume_step: int) -> list[SampleRound]:
        """Make the folder ready: a fresh run (``resume_step`` 0) removes every earlier sample;
        a resumed run keeps the rounds up to ``resume_step`` when they were made with the same
        settings (otherwise it starts the folder over). Returns the rounds kept."""
        self.folder.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(self.folder)
        earlier = _read_record(self.folder)
        same = earlier is not None and all(earlier.get(k) == self.record.get(k) for k in _SETTINGS)
        keep_up_to = resume_step if resume_step > 0 and same else -1
        for step, _, path in _sample_files(self.folder):
            if step > keep_up_to:
                path.unlink(missing_ok=True)
        kept = load_sample_rounds(self.folder) if keep_up_to >= 0 else []
        self.record["rounds"] = {str(r.step): r.seconds for r in kept}
        self.record["scores"] = {str(r.step): r.scores for r in kept if r.scores is not None}
        self._write_record()
        if earlier is not None and not same and resume_step > 0:
            log.info("sample settings changed since the run stopped: earlier samples in %s removed", self.folder.name)
        return kept

    def write(self, round_: SampleRound) -> list[Path]:
        paths = []
        for index, (prompt, image) in enumerate(zip(round_.prompts, round_.images, strict=True)):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            path = self.folder / sample_file_name(round_.step, index, prompt)
            atomic_write_bytes(path, buffer.getvalue())
            paths.append(path)
        self.record["rounds"][str(round_.step)] = round(round_.seconds, 3)
        if round_.scores is not None:
            self.record["scores"][str(round_.step)] = round_.scores
        self._write_record()
        return paths

    def _write_record(self) -> None:
        data = json.dumps(self.record, indent=1, sort_keys=True, ensure_ascii=False).encode("utf-8")
        atomic_write_bytes(self.folder / SAMPLES_JSON, data)


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------

MAX_GRID_ROWS = 16
MAX_GRID_CELL = 384
_GRID_BACKGROUND = (255, 255, 255)
_GRID_TEXT = (30, 30, 30)


def _text_width(draw: Any, text: str, font: Any) -> float:
    return draw.textlength(text, font=font)


def _wrapped(draw: Any, text: str, font: Any, width: float, lines: int) -> list[str]:
    """``text`` broken into at most ``lines`` lines of ``width``; cut with an ellipsis if longer."""
    words, out, current = text.split(), [], ""
    for word in words:
        candidate = f"{current} {word}".strip()
        if _text_width(draw, candidate, font) <= width or not current:
            current = candidate
        else:
            out.append(current)
            current = word
    out.append(current)
    out = [line if _text_width(draw, line, font) <= width else _cut(draw, line, font, width) for line in out]
    if len(out) > lines:
        out = out[:lines]
        out[-1] = _cut(draw, out[-1] + " ...", font, width, force=True)
    return out


def _cut(draw: Any, text: str, font: Any, width: float, force: bool = False) -> str:
    if not force and _text_width(draw, text, font) <= width:
        return text
    text = text.removesuffix(" ...")
    while text and _text_width(draw, text + "...", font) > width:
        text = text[:-1]
    return text + "..."


def _spread(count: int, keep: int) -> list[int]:
    """``keep`` indices of ``count`` spread evenly, first and last included."""
    if count <= keep:
        return list(range(count))
    return sorted({round(i * (count - 1) / (keep - 1)) for i in range(keep)})


def sample_grid(rounds: Sequence[SampleRound], max_rows: int = MAX_GRID_ROWS,
                max_cell: int = MAX_GRID_CELL) -> Any:
    """One labelled PIL image of sample rounds: a row per step (labelled ``step N``), a column
    per prompt (labelled with the prompt, wrapped to 3 lines). At most ``max_rows`` rows (the
    first, the last and evenly spread ones between); cells of the images' size up to
    ``max_cell`` pixels. None when there are no images."""
    from PIL import Image, ImageDraw

    rounds = [r for r in rounds if r.images]
    if not rounds:
        return None
    rounds = [rounds[i] for i in _spread(len(rounds), max(1, max_rows))]
    prompts = max((r.prompts for r in rounds), key=len)
    columns = max(len(r.images) for r in rounds)
    cell = min(max_cell, max(max(image.size) for r in rounds for image in r.images))
    font = text_font(max(11, min(18, cell // 12)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = int(math.ceil(font.getbbox("Ag")[3])) + 3
    pad = 6
    label_width = int(_text_width(probe, f"step {max(r.step for r in rounds)}", font)) + 2 * pad
    header = 3 * line_height + 2 * pad
    grid = Image.new("RGB", (label_width + columns * cell, header + len(rounds) * cell), _GRID_BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for column, prompt in enumerate(prompts[:columns]):
        for number, line in enumerate(_wrapped(draw, prompt, font, cell - 2 * pad, 3)):
            draw.text((label_width + column * cell + pad, pad + number * line_height), line, fill=_GRID_TEXT,
                      font=font)
    for row, round_ in enumerate(rounds):
        top = header + row * cell
        draw.text((pad, top + cell // 2 - line_height // 2), f"step {round_.step}", fill=_GRID_TEXT, font=font)
        for column, image in enumerate(round_.images):
            if image.size != (cell, cell):
                image = image.resize((cell, cell), Image.Resampling.LANCZOS)
            grid.paste(image.convert("RGB"), (label_width + column * cell, top))
    return grid


# ---------------------------------------------------------------------------------------------
# Watching the loop
# ---------------------------------------------------------------------------------------------


@contextmanager
def _evaluating(*models: torch.nn.Module) -> Iterator[None]:
    """Every module in eval mode (no dropout) and no gradients; the exact modes back afterwards."""
    modes = [(module, module.training) for model in models for module in model.modules()]
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


@dataclass
class _ValidationSet:
    latents: torch.Tensor  # (n, 4, h, w) latent means, CPU fp32
    input_ids: torch.Tensor  # (n, 77) token ids of each image's caption
    embeddings: torch.Tensor | None  # (n, 77, D) when the text encoder is frozen
    weights: torch.Tensor | None = None  # (n, 1, h, w) loss weights (masked loss)


def validation_timesteps(noise_scheduler: Any, count: int = VALIDATION_TIMESTEPS) -> list[int]:
    """``count`` timesteps at the middles of equal parts of the schedule (125, 375, 625, 875 of 1000)."""
    total = int(noise_scheduler.config.num_train_timesteps)
    return [int((k + 0.5) * total / count) for k in range(count)]


class Watcher(LoopWatch):
    """Sample rounds and validation losses of one run, at the steps its :class:`WatchConfig` sets."""

    def __init__(self, config: WatchConfig, *, models: LoopModels, tokenizer: Any, instance: TrainingSet,
                 prior: TrainingSet | None, settings: LoopSettings, instance_prompt: str, resolution: int,
                 sample_dir: str | os.PathLike | None = None, run: str = "", residency: Residency | None = None,
                 text_trained: bool | None = None) -> None:
        self.config, self.models, self.tokenizer, self.settings = config, models, tokenizer, settings
        self.residency = residency
        self.text_trained = text_trained  # None: whether the text encoder has weights that take gradients
        self.sets = [instance] if prior is None else [instance, prior]
        self.prompts = config.prompt_list(instance_prompt)
        self.size = config.image_size(resolution)
        self.outcome = WatchOutcome()
        self.folder = SampleFolder(sample_dir, {
            "run": run, "prompts": self.prompts, "seed": config.sample_seed, "steps": config.sample_steps,
            "cfg": config.sample_cfg, "size": self.size, "sampler": SAMPLER,
        }) if sample_dir is not None and config.sample_every else None
        self._prompt_ids: torch.Tensor | None = None  # empty prompt first
        self._prompt_embeddings: torch.Tensor | None = None  # cached when the text encoder is frozen
        self._validation: list[list[_ValidationSet]] | None = None
        self._timesteps = validation_timesteps(models.noise_scheduler)
        self._scheduler: Any = None

    @property
    def total(self) -> int:
        return self.settings.steps

    def prepare(self) -> None:
        """Encode now what needs the VAE or a frozen text encoder (the validation images and the
        sample prompts), so both may leave memory while training; only decoding a sample needs the
        VAE back."""
        models = self.models
        with _evaluating(models.text_encoder, models.vae):
            if self.config.validate_every and self._validation is None:
                self._validation = [self._validation_set(s) for s in self.sets]
            if self.config.sample_every and self._text_frozen():
                self._text_embeddings()

    def _text_frozen(self) -> bool:
        if self.text_trained is not None:
            return not self.text_trained
        return not any(p.requires_grad for p in self.models.text_encoder.parameters())

    # -- the loop's hooks --------------------------------------------------------------------
    def before_training(self, step: int, history: LossHistory, callbacks: TrainingCallbacks) -> None:
        config = self.config
        if config.sample_every and self.folder is not None:
            try:
                self.outcome.samples = self.folder.start(step)
            except OSError as exc:
                self._folder_failed(exc)
        if config.validate_every and (not history.validation or (
                due(config.validate_every, step, self.total) and history.validation[-1][0] != step)):
            self._validate(step, history, callbacks)
        rounds = self.outcome.samples
        if config.sample_every and (not rounds or (due(config.sample_every, step, self.total)
                                                   and rounds[-1].step != step)):
            self._sample(step, callbacks)

    def after_step(self, state: StepState, history: LossHistory, callbacks: TrainingCallbacks) -> None:
        if due(self.config.validate_every, state.step, self.total):
            state.validation_loss = self._validate(state.step, history, callbacks)
        if due(self.config.sample_every, state.step, self.total):
            self._sample(state.step, callbacks)

    # -- validation --------------------------------------------------------------------------
    def _validate(self, step: int, history: LossHistory, callbacks: TrainingCallbacks) -> float:
        started = time.monotonic()
        parts = self.validation_losses()
        loss = parts[0] + (self.settings.prior_loss_weight * parts[1] if len(parts) > 1 else 0.0)
        self.outcome.validation_seconds += time.monotonic() - started
        history.validation.append((step, loss))
        log.info("validation loss at step %d: %.5f%s", step, loss,
                 f" (subject {parts[0]:.5f}, class {parts[1]:.5f})" if len(parts) > 1 else "")
        callbacks.on_validation(step, loss)
        return loss

    def validation_losses(self) -> list[float]:
        """The validation loss of each image set (subject, then class images) with the weights as they are now."""
        models = self.models
        unet = models.unet
        device, dtype = model_device(unet), model_dtype(unet)
        with _evaluating(unet, models.text_encoder, models.vae):
            if self._validation is None:
                self._validation = [self._validation_set(s) for s in self.sets]
            generator = torch.Generator().manual_seed(derive_seed(self.settings.seed, "validation"))
            losses = []
            for groups in self._validation:
                errors = []
                for data in groups:  # one per image size (buckets), in a fixed order
                    errors += self._validation_errors(data, generator, device, dtype)
                losses.append(float(torch.cat(errors).mean()))
        return losses

    def _validation_errors(self, data: _ValidationSet, generator: torch.Generator, device: torch.device,
                           dtype: torch.dtype) -> list[torch.Tensor]:
        models, unet = self.models, self.models.unet
        conditioning = data.embeddings if data.embeddings is not None else self._encode(data.input_ids)
        count = len(data.latents)
        noise = torch.randn((len(self._timesteps), *data.latents.shape), generator=generator)
        errors = []
        for row, timestep in enumerate(self._timesteps):
            timesteps = torch.full((count,), timestep, dtype=torch.long)
            noisy = models.noise_scheduler.add_noise(data.latents, noise[row], timesteps)
            target = training_target(models.noise_scheduler, data.latents, noise[row], timesteps)
            weights = (min_snr_weights(models.noise_scheduler, timesteps, self.settings.min_snr_gamma)
                       if self.settings.min_snr_gamma > 0 else torch.ones(count))
            for start in range(0, count, VALIDATION_BATCH):
                chunk = slice(start, start + VALIDATION_BATCH)
                with autocast_context(device, self.settings.autocast_dtype):
                    prediction = unet(noisy[chunk].to(device, dtype), timesteps[chunk].to(device),
                                      encoder_hidden_states=conditioning[chunk].to(device, dtype)).sample
                error = (per_sample_mse(prediction, target[chunk].to(device)) if data.weights is None else
                         masked_mse(prediction, target[chunk].to(device), data.weights[chunk].to(device)))
                errors.append(error.cpu() * weights[chunk])
        return errors

    def _validation_set(self, training_set: TrainingSet) -> list[_ValidationSet]:
        """The images the validation loss is computed on, a group per image size."""
        chosen = torch.tensor(_spread(training_set.count, MAX_VALIDATION_IMAGES), dtype=torch.long)
        sizes = [training_set.sizes[int(i)] for i in chosen]
        groups = []
        for size in dict.fromkeys(sizes):
            members = chosen[[k for k, s in enumerate(sizes) if s == size]]
            unflipped = torch.zeros(len(members), dtype=torch.long)
            if training_set.latent_mean is not None:
                latents = training_set.latent_rows(unflipped, members)[0].float()
            else:
                latents = encode_latent_stats(self.models.vae, training_set.pixel_rows(members))[0]
            rows = training_set.caption_index[members]
            embeddings = training_set.embeddings[rows].float() if training_set.embeddings is not None else None
            groups.append(_ValidationSet(latents=latents, input_ids=training_set.input_ids[rows], embeddings=embeddings,
                                         weights=training_set.weight_rows(unflipped, members)))
        return groups

    def _encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings through the text encoder as it is now (in chunks), CPU fp32."""
        return torch.cat([encode_text(self.models.text_encoder, input_ids[i:i + VALIDATION_BATCH]).float().cpu()
                          for i in range(0, len(input_ids), VALIDATION_BATCH)])

    # -- samples -----------------------------------------------------------------------------
    def _sample(self, step: int, callbacks: TrainingCallbacks) -> SampleRound:
        started = time.monotonic()
        images = self.render(callbacks)
        round_ = SampleRound(step=step, prompts=list(self.prompts), images=images,
                             seconds=time.monotonic() - started)
        scores = callbacks.score_samples(round_)
        if scores is not None:
            round_.scores = checked_scores(scores)
            if round_.scores is None:
                raise ValueError(f"sample scores must be finite numbers named {', '.join(SCORE_KEYS)}, got {scores!r}")
        if self.folder is not None:
            try:
                round_.paths = self.folder.write(round_)
            except OSError as exc:
                self._folder_failed(exc)
        round_.seconds = time.monotonic() - started
        self.outcome.sample_seconds += round_.seconds
        self.outcome.samples.append(round_)
        log.info("sample images of step %d: %d prompts in %.1f s%s", step, len(images), round_.seconds,
                 "" if round_.scores is None else " (DINO {dino:.3f}, CLIP-I {clip_i:.3f}, CLIP-T {clip_t:.3f})"
                 .format(**round_.scores))
        callbacks.on_samples(round_)
        return round_

    def _folder_failed(self, exc: OSError) -> None:
        assert self.folder is not None
        self.outcome.notes.append(f"sample images could not be written in {self.folder.folder.name} "
                                  f"({exc.strerror or exc}); later rounds were kept in memory only")
        log.warning("%s", self.outcome.notes[-1])
        self.folder = None

    def _text_embeddings(self) -> torch.Tensor:
        """(1 + prompts, 77, D): the empty prompt, then each sample prompt. Computed once when the
        text encoder is frozen, every round through the trained one otherwise."""
        if self._prompt_embeddings is not None:
            return self._prompt_embeddings
        if self._prompt_ids is None:
            self._prompt_ids = tokenize(self.tokenizer, ["", *self.prompts])
        embeddings = self._encode(self._prompt_ids)
        if self._text_frozen():
            self._prompt_embeddings = embeddings
        return embeddings

    def _vae(self) -> Any:
        """The VAE for decoding, brought back for the moment when it left memory."""
        return self.residency.borrowed("vae") if self.residency is not None else nullcontext(self.models.vae)

    def render(self, callbacks: TrainingCallbacks | None = None) -> list[Any]:
        """One image per sample prompt with the weights as they are now (PIL images)."""
        from diffusers import DDIMScheduler
        from PIL import Image

        callbacks = callbacks or TrainingCallbacks()
        models, config = self.models, self.config
        unet, vae = models.unet, models.vae
        device, dtype = model_device(unet), model_dtype(unet)
        if self._scheduler is None:
            self._scheduler = DDIMScheduler.from_config(models.noise_scheduler.config)
        scheduler = self._scheduler
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        shape = (1, int(unet.config.in_channels), self.size // factor, self.size // factor)
        guided = config.sample_cfg != 1.0
        total, done, images = len(self.prompts) * config.sample_steps, 0, []
        with _evaluating(unet, models.text_encoder, vae):
            embeddings = self._text_embeddings()
            for index in range(len(self.prompts)):
                prompt = embeddings[index + 1:index + 2]
                context = (torch.cat([embeddings[:1], prompt]) if guided else prompt).to(device, dtype)
                generator = torch.Generator().manual_seed(config.sample_seed + index)
                latents = torch.randn(shape, generator=generator)
                scheduler.set_timesteps(config.sample_steps)
                latents = (latents * scheduler.init_noise_sigma).to(device)
                for timestep in scheduler.timesteps:
                    model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents,
                                                              timestep)
                    with autocast_context(device, self.settings.autocast_dtype):
                        prediction = unet(model_input.to(dtype), timestep.to(device),
                                          encoder_hidden_states=context).sample.float()
                    if guided:
                        unconditional, conditional = prediction.chunk(2)
                        prediction = unconditional + config.sample_cfg * (conditional - unconditional)
                    latents = scheduler.step(prediction, timestep, latents, eta=0.0).prev_sample
                    done += 1
                    callbacks.on_sample_step(done, total)
                with self._vae() as vae, autocast_context(device, self.settings.autocast_dtype):
                    decoded = vae.decode((latents / float(vae.config.scaling_factor)).to(model_dtype(vae))).sample
                pixels = ((decoded[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                images.append(Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy()))
        return images


def watcher_for(config: WatchConfig | None, *, models: LoopModels, tokenizer: Any, instance: TrainingSet,
                prior: TrainingSet | None, settings: LoopSettings, subject: SubjectData,
                sample_dir: str | os.PathLike | None, run: str, residency: Residency | None = None,
                text_trained: bool | None = None) -> Watcher | None:
    """The run's watcher, or None when ``config`` asks for nothing (the loop then trains alone)."""
    if config is None or not config.active:
        return None
    if not isinstance(config, WatchConfig):
        raise TypeError(f"watch must be a WatchConfig, got {type(config).__name__}")
    watcher = Watcher(config, models=models, tokenizer=tokenizer, instance=instance, prior=prior, settings=settings,
                      instance_prompt=subject.instance_prompt, resolution=subject.resolution, sample_dir=sample_dir,
                      run=run, residency=residency, text_trained=text_trained)
    watcher.prepare()
    return watcher
