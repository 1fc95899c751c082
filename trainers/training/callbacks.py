"""How training reports progress and how it stops.

The trainers call a :class:`TrainingCallbacks` object; the ComfyUI nodes adapt it to progress
bars, the cancel check and the live loss curve, the CLI to a terminal progress line. Whatever a
callback raises (including ``BaseException`` subclasses such as ComfyUI's
``InterruptProcessingException``) propagates out of the trainer unchanged, after the trainer has
put the base models back as they were; nothing is saved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class StepState:
    """What happened in one optimizer step."""

    step: int  # 1-based number of the optimizer step just taken
    total_steps: int
    loss: float  # total loss of the step (instance + weighted prior)
    lr: float  # learning rate of the UNet parameters used for this step
    elapsed: float  # seconds since training began (after caching)
    phase: str = "train"
    instance_loss: float | None = None
    prior_loss: float | None = None
    validation_loss: float | None = None  # set on the steps where the validation loss was computed


@dataclass
class LossHistory:
    """The per-step losses of a run: the total, and its subject (instance) and class (prior) parts.

    ``prior_losses`` is empty without prior preservation; ``instance_losses`` may then equal
    ``losses`` (the loop records it) or be empty (a file that did not record it).
    ``validation`` holds (step, validation loss) pairs, step 0 being the base model before
    training (empty when the run computed none; see ``training.watch``).
    """

    losses: list[float] = field(default_factory=list)
    instance_losses: list[float] = field(default_factory=list)
    prior_losses: list[float] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)

    def copy(self) -> LossHistory:
        return LossHistory(list(self.losses), list(self.instance_losses), list(self.prior_losses),
                           list(self.validation))

    def add(self, state: StepState) -> None:
        self.losses.append(state.loss)
        if state.instance_loss is not None:
            self.instance_losses.append(state.instance_loss)
        if state.prior_loss is not None:
            self.prior_losses.append(state.prior_loss)

    def extra_curves(self) -> dict[str, list[float]]:
        """The subject and class parts to plot beside the total (nothing without prior preservation)."""
        if not self.prior_losses:
            return {}
        return {"instance": self.instance_losses, "prior": self.prior_losses}


@dataclass
class SampleRound:
    """The sample images of one step: one image per prompt, made with the weights of that step
    (step 0: the base model) from the same initial noise every round, so rounds compare."""

    step: int
    prompts: list[str]
    images: list[Any]  # PIL.Image.Image, one per prompt
    paths: list[Path] = field(default_factory=list)  # the PNGs written (empty without a sample folder)
    seconds: float = 0.0  # how long the round took
    # {"dino", "clip_i", "clip_t"}: the round's subject-fidelity means, when the run scores its samples
    scores: dict[str, float] | None = None


class WithLossHistory:
    """Results that carry a ``history``: its curves read as attributes of the result."""

    history: LossHistory

    @property
    def losses(self) -> list[float]:
        return self.history.losses

    @property
    def instance_losses(self) -> list[float]:
        return self.history.instance_losses

    @property
    def prior_losses(self) -> list[float]:
        return self.history.prior_losses

    def extra_curves(self) -> dict[str, list[float]]:
        return self.history.extra_curves()


class TrainingCallbacks:
    """No-op base; override what you need."""

    def on_base_loaded(self) -> None:
        """Called by a job once the base model is loaded (before class images and caching)."""

    def on_generate_step(self, done: int, total: int) -> None:
        """Called after every denoising step while class images are generated (before training).
        Raise to stop; the partial class-image set is removed."""

    def on_resume(self, step: int, history: LossHistory) -> None:
        """Called before ``on_train_begin`` when a run continues from a training state taken
        after ``step``; ``history`` holds the losses (and validation points) of steps 1..step."""

    def on_train_begin(self, total_steps: int) -> None:
        """Called once the data is cached, right before the first step."""

    def on_step_end(self, state: StepState) -> None:
        """Called after every optimizer step. Raise to stop training (nothing is saved)."""

    def check_cancel(self) -> None:
        """Called several times within every training step's forward pass (before each block of
        the UNet; one process only). Raise to stop at once: nothing of that step is applied, and
        the run stops as if ``on_step_end`` of the step before had raised (``on_stop`` gets that
        step, unless it is the run's first)."""

    def on_validation(self, step: int, loss: float) -> None:
        """Called when the validation loss of ``step`` is computed: step 0 (the base model) right
        after ``on_train_begin``, then every ``validate_every`` steps and at the last step, always
        before ``on_step_end`` of that step. Raise to stop, as in ``on_step_end``."""

    def on_sample_step(self, done: int, total: int) -> None:
        """Called after every denoising step of a sample round (``done`` of ``total`` for the
        whole round). Raise to stop at once: the round's images are not written."""

    def score_samples(self, samples: SampleRound) -> dict[str, float] | None:
        """Called when a sample round's images are made, before they are written: return the
        round's scores (``{"dino", "clip_i", "clip_t"}``, see ``eval.fidelity``) to record them
        with the round, or None (the default) for a run that does not score its samples."""
        return None

    def on_samples(self, samples: SampleRound) -> None:
        """Called when a sample round is done (and written): step 0 right after
        ``on_train_begin``, then every ``sample_every`` steps and at the last step, after
        ``on_validation`` and before ``on_step_end`` of that step. Raise to stop."""

    def on_save_point(self, step: int, capture: Callable[[], Any], snapshot: Callable[[], Any]) -> None:
        """Called every ``save_every`` steps (not after the last one). ``capture()`` returns the
        loop's complete state (a ``loop.LoopState``), ``snapshot()`` the trainer's result so far
        (what it returns at the end, to save as a model file of this step). Both copy weights:
        call them only when a save point is written."""

    def on_stop(self, step: int, capture: Callable[[], Any], snapshot: Callable[[], Any],
                error: BaseException) -> None:
        """Called when ``on_step_end`` of ``step`` raised ``error`` (a cancel), or anything called
        for that step before it (validation, a sample round, their callbacks): the weights are
        those after ``step``. ``error`` propagates afterwards. Not called for a stop before the
        first step of a run (during the step-0 samples or validation): nothing was trained yet."""

    def on_train_end(self, losses: list[float]) -> None:
        """Called after the last step, before the result is assembled."""

    def on_save_begin(self) -> None:
        """Called by a job when training is done and its memory released, right before the file is written."""


class TrainingStopped(Exception):
    """Raise from a callback to stop training early on purpose; the trainer re-raises it after cleanup."""


class NonFiniteLossError(RuntimeError):
    """The loss (or a trained weight) became NaN or infinite; training stopped and nothing was saved."""

    def __init__(self, step: int, what: str = "loss", lr: float | None = None) -> None:
        self.step = step
        self.what = what
        at = f" (learning rate {lr:g})" if lr is not None else ""
        super().__init__(
            f"training diverged: the {what} became NaN or infinite at step {step}{at}. Nothing was saved. "
            f"Lower the learning rate (e.g. by 10x), keep gradient clipping on (max_grad_norm 1.0), or use "
            f"fp32 precision."
        )
