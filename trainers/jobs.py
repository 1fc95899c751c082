"""Whole training jobs: check everything, load the base model, train, write the file.

The only orchestration of the engine: the ComfyUI nodes, the command line and the benches all
train through :func:`train_file`, so every rule below holds everywhere:

- Every check that can fail on user input (output name and folder, base model header, prior
  preservation inputs, an existing file) runs before the base model is loaded.
- The run fingerprint and provenance are computed here, once, and handed to the save.
- A file that already holds the result of the identical run is reused, not retrained (ComfyUI
  may re-run a node whose cached output it evicted; a sweep may repeat a run). A file holding
  anything else is an error unless overwrite is on.
- Nothing is written unless training finished with finite weights.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .data.class_images import PriorPlan, plan_prior, realize_prior
from .data.subject import SubjectData
from .files.fileio import content_sha256
from .sd15 import checkpoint
from .sd15.checkpoint import SD15Components
from .training.callbacks import LossHistory, TrainingCallbacks, WithLossHistory
from .training.config import DreamBoothTrainConfig, LoRATrainConfig
from .training.dreambooth import save_dreambooth, train_dreambooth
from .training.loop import SAVE_DTYPES
from .training.lora import save_lora, train_lora
from .training.record import Provenance, TrainConfig, history_from_metadata, read_metadata

log = logging.getLogger(__name__)

KINDS = {"lora": "LoRA", "dreambooth": "checkpoint"}


@dataclass
class JobResult(WithLossHistory):
    """A finished job: the file, its loss curves, and whether an identical earlier run made it."""

    path: Path
    history: LossHistory
    reused: bool
    prior: PriorPlan

    @property
    def class_report(self) -> str:
        return self.prior.report

    def report(self) -> str:
        state = "reused (an identical earlier run made it)" if self.reused else "trained"
        return f"{self.path.name}: {state}; {self.class_report}"

    def tensors(self) -> dict[str, torch.Tensor]:
        """The saved file's tensors, exactly as a later run that reuses the file would get them."""
        from safetensors.torch import load_file

        return load_file(str(self.path))


def reusable_metadata(path: Path, fingerprint: str, overwrite: bool) -> dict[str, str] | None:
    """The metadata of the file at ``path`` when it holds the run with ``fingerprint``; None when
    there is nothing to reuse; FileExistsError when it holds something else and overwrite is off.
    Reads only the header; an unreadable file is never reused."""
    if not path.exists():
        return None
    metadata = read_metadata(path)
    if metadata is not None and metadata.get("dbs.fingerprint") == fingerprint:
        log.info("reusing %s: it holds the result of this exact training job", path.name)
        return metadata
    if overwrite:
        return None
    raise FileExistsError(
        f"{path.name} already exists in {path.parent} and was trained differently: choose another "
        "output name or enable overwrite")


def check_output(path: Path) -> None:
    if path.suffix != ".safetensors":
        raise ValueError(f"output file name must end in .safetensors, got {path.name}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")


def _lora(base: SD15Components, subject: SubjectData, config: LoRATrainConfig, callbacks: TrainingCallbacks,
          class_data: SubjectData | None, output: Path, provenance: Provenance, overwrite: bool) -> LossHistory:
    result = train_lora(base, subject, config, callbacks, class_subject=class_data)
    callbacks.on_save_begin()
    save_lora(result, output, overwrite=overwrite, dtype=SAVE_DTYPES[config.save_precision], provenance=provenance)
    return result.history


def _dreambooth(base: SD15Components, subject: SubjectData, config: DreamBoothTrainConfig,
                callbacks: TrainingCallbacks, class_data: SubjectData | None, output: Path, provenance: Provenance,
                overwrite: bool) -> LossHistory:
    result = train_dreambooth(base, subject, config, callbacks, class_subject=class_data)
    callbacks.on_save_begin()
    save_dreambooth(base, result, output, config.save_precision, overwrite=overwrite, provenance=provenance)
    return result.history


_METHODS = {"lora": _lora, "dreambooth": _dreambooth}


def train_file(base_model: str | os.PathLike, subject: SubjectData, config: TrainConfig,
               output_path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None, *, overwrite: bool = False,
               callbacks: TrainingCallbacks | None = None, before_load: Callable[[], None] | None = None,
               class_cache_dir: str | os.PathLike | None = None, class_folder: str | os.PathLike | None = None,
               device: str | torch.device | None = None) -> JobResult:
    """Train ``base_model`` (an SD1.5 single file or diffusers folder) on ``subject`` with
    ``config`` (a LoRA or a DreamBooth config) and save the result at ``output_path``.

    ``tokenizer_dir`` may be None for a diffusers folder (its own ``tokenizer/`` is used).
    ``before_load`` runs after all checks pass and before the base model loads (ComfyUI frees
    its own models there). With prior preservation on, class images come from ``class_folder``
    or are generated into (and reused from) ``class_cache_dir``. ``device`` is where training
    runs (default: where the model loads, the CPU).
    """
    train = _METHODS[config.method]
    base_model, output = Path(base_model), Path(output_path)
    check_output(output)
    checkpoint.check_sd15(base_model, tokenizer_dir)  # headers and configs only: not SD1.5 is a clear error
    base_fingerprint = content_sha256(base_model)
    plan = plan_prior(config.prior_request, subject, base_fingerprint, class_cache_dir, class_folder, tokenizer_dir)
    provenance = Provenance.of_run(base_model.name, base_fingerprint, subject, config, plan.source, plan.info())
    metadata = reusable_metadata(output, provenance.fingerprint, overwrite)
    if metadata is not None:
        if plan.enabled:
            plan.report = f"{KINDS[config.method]} reused, no class images needed; {plan.report}"
        return JobResult(output, history_from_metadata(metadata), reused=True, prior=plan)
    if before_load is not None:
        before_load()
    callbacks = callbacks or TrainingCallbacks()
    base = checkpoint.load_sd15(base_model, tokenizer_dir)
    callbacks.on_base_loaded()
    try:
        if device is not None:
            for model in (base.unet, base.vae, base.text_encoder):
                model.to(device)
        class_data = realize_prior(plan, base, class_cache_dir, callbacks.on_generate_step, tokenizer_dir)
        history = train(base, subject, config, callbacks, class_data, output, provenance, overwrite)
    finally:
        del base
        gc.collect()
    return JobResult(output, history, reused=False, prior=plan)

