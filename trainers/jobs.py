"""Whole training jobs: check everything, load the base model, train, write the file.

The only orchestration of the engine: the ComfyUI nodes, the command line and the benches all
train through :func:`train_file`, so every rule below holds everywhere:

- Every check that can fail on user input (output name and folder, base model header, prior
  preservation inputs, an existing file, metadata size, free disk space) runs before the base
  model is loaded.
- The output is never one of the job's inputs (base model, class folder), compared by real
  path. Overwrite replaces only a file this pack wrote (its metadata says so), and only if it is
  still the file that was checked when the run started.
- The run fingerprint and provenance are computed here, once, and handed to the save.
- A file that already holds the result of the identical run is reused, not retrained (ComfyUI
  may re-run a node whose cached output it evicted; a sweep may repeat a run). A file holding
  anything else is an error unless overwrite is on.
- Nothing is written unless training finished with finite weights, and a finished run is never
  thrown away: a save that fails for the precision, a name taken meanwhile or a full disk falls
  back (``training.saving``); when nothing can be written, the weights stay in this process and
  the identical job, run again, saves them without training. A file saved in the rescue folder is
  moved into place by the identical job once there is room.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .data.class_images import PriorPlan, plan_prior, read_prior, realize_prior
from .data.subject import SubjectData
from .files.fileio import atomic_copy, content_sha256
from .files.names import validate_output_name
from .sd15 import checkpoint
from .sd15.checkpoint import SD15Components
from .training import parallel
from .training.callbacks import (
    LossHistory,
    NonFiniteLossError,
    SampleRound,
    TrainingCallbacks,
    TrainingStopped,
    WithLossHistory,
)
from .training.config import ConfigError, DreamBoothTrainConfig, LoRATrainConfig, check_device
from .training.determinism import blas_reproducible, request_reproducible_blas
from .training.dreambooth import save_dreambooth, train_dreambooth
from .training.loop import SAVE_DTYPES, LoopState
from .training.lora import save_lora, train_lora
from .training.memory import (
    STATES_PER_WEIGHT,
    check_memory,
    load_dtypes,
    lora_conv_shapes,
    lora_target_shapes,
    magnitude_count,
    release_freed_memory,
)
from .training.record import (
    Provenance,
    TrainConfig,
    check_metadata_size,
    fidelity_json,
    history_from_metadata,
    read_metadata,
)
from .training.residency import Residency
from .training.savepoints import SavePoints, step_file
from .training.saving import (
    FileIdentity,
    Saved,
    SaveFailed,
    check_free_space,
    human_bytes,
    save_safely,
)
from .training.state import newest_state
from .training.watch import WatchConfig, best_round, load_sample_rounds, sample_grid

log = logging.getLogger(__name__)

KINDS = {"lora": "LoRA", "dreambooth": "checkpoint"}


@dataclass
class JobResult(WithLossHistory):
    """A finished job: the file, its loss curves, and whether an identical earlier run made it."""

    path: Path
    history: LossHistory
    reused: bool
    prior: PriorPlan
    notes: list[str] = field(default_factory=list)  # where a save went instead, and why
    # every sample round of the run, oldest first (with those on disk from before a resume; for a
    # reused job, the rounds found in its sample folder)
    samples: list[SampleRound] = field(default_factory=list)
    sample_seconds: float = 0.0  # spent on sample rounds in this process
    validation_seconds: float = 0.0  # spent on the validation loss in this process
    seconds: float = 0.0  # the training loop in this process, samples and validation included
    sample_dir: Path | None = None

    @property
    def class_report(self) -> str:
        return self.prior.report

    def report(self) -> str:
        state = "reused (an identical earlier run made it)" if self.reused else "trained"
        notes = "".join(f"; NOTE {note}" for note in self.notes)
        watched = f"; {self.watch_report()}" if self.watch_report() else ""
        return f"{self.path.name}: {state}; {self.class_report}{watched}{notes}"

    def watch_report(self) -> str:
        """What watching the run cost: sampling's and validation's share of the training time
        (empty when the run did neither in this process)."""
        if self.reused or self.seconds <= 0 or not (self.sample_seconds or self.validation_seconds):
            return ""

        def share(seconds: float) -> str:
            return f"{seconds:.1f} s ({100 * seconds / self.seconds:.0f}% of the run's {self.seconds:.1f} s)"

        parts = []
        if self.sample_seconds:
            parts.append(f"sampling took {share(self.sample_seconds)}")
        if self.validation_seconds:
            parts.append(f"validation took {share(self.validation_seconds)}")
        return ", ".join(parts)

    def best_step(self) -> tuple[SampleRound, Path] | None:
        """The best scored sample round (``watch.best_round``) among the steps that have a model
        file (a step file of this run, or the final file for the last step), with that file; None
        when the run scored no samples or none qualifies."""
        last = len(self.history.losses)
        final = read_metadata(self.path) if self.path.is_file() else None
        run = (final or {}).get("dbs.fingerprint")

        def file_of(step: int) -> Path | None:
            if step == last:
                return self.path
            path = step_file(self.path, step)
            metadata = read_metadata(path) if run and path.is_file() else None
            # only a step file of this very run (an earlier run of the same name may have left others)
            return path if metadata is not None and metadata.get("dbs.run_fingerprint") == run else None

        best = best_round(self.samples, eligible=lambda step: file_of(step) is not None)
        return (best, file_of(best.step)) if best is not None else None

    def sample_grid(self) -> Any:
        """The run's sample rounds as one labelled PIL image (rows = steps, columns = prompts),
        or None without samples."""
        return sample_grid(self.samples)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The saved file's tensors, exactly as a later run that reuses the file would get them."""
        from safetensors.torch import load_file

        return load_file(str(self.path))


def pack_written(metadata: dict[str, str] | None) -> bool:
    """Whether a file's metadata says this pack wrote it (only such files are ever replaced)."""
    return bool(metadata) and metadata.get("dbs.engine", "").startswith(tuple(f"{k}-" for k in KINDS)) \
        and metadata.get("dbs.kind") in KINDS


@dataclass
class ExistingOutput:
    """What is at the output path before training: a file to reuse, one that may be replaced, or nothing."""

    reuse: dict[str, str] | None = None
    replace: FileIdentity | None = None


def vet_existing(path: Path, fingerprint: str, overwrite: bool, shown: Callable[[Path], str] = str) -> ExistingOutput:
    """Decide, from the header only, what happens to a file already at ``path``. A file with the
    run's fingerprint is reused; with overwrite on, a file this pack wrote may be replaced;
    anything else (a downloaded LoRA, a base model, a file that is not safetensors) is refused."""
    if not os.path.lexists(path):
        return ExistingOutput()
    metadata = read_metadata(path) if path.is_file() else None
    if metadata is not None and metadata.get("dbs.fingerprint") == fingerprint and fingerprint:
        log.info("reusing %s: it holds the result of this exact training job", path.name)
        return ExistingOutput(reuse=metadata)
    if not overwrite:
        raise FileExistsError(
            f"{path.name} already exists in {shown(path.parent)} and was trained differently: choose another "
            "output name or enable overwrite")
    if not path.is_file() or path.is_symlink() or not pack_written(metadata):
        raise FileExistsError(
            f"{path.name} in {shown(path.parent)} was not written by DreamBooth Studio (its metadata does not say "
            "so), so overwrite will not replace it: choose another output name, or move or delete that file "
            "yourself if you really want its name")
    return ExistingOutput(replace=FileIdentity.of(path))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output(path: Path, inputs: tuple[Path | None, ...] = ()) -> None:
    """The output is a .safetensors file with a valid name, in an existing folder, and is not one
    of the job's inputs (the base model file or anything in its folder, the class folder)."""
    if path.suffix != ".safetensors":
        raise ValueError(f"output file name must end in .safetensors, got {path.name}")
    stem = validate_output_name(path.name)
    if stem != path.stem:
        raise ValueError(f"output name {path.name!r} is not in NFC form; use {stem}.safetensors")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    real = os.path.realpath(path)
    for source in inputs:
        if source is not None and _inside(real, os.path.realpath(source)):
            what = "folder" if Path(source).is_dir() else "file"
            raise ValueError(
                f"the output {path.name} is the job's own input {what} {Path(source).name}: a run never writes "
                "over what it trains from; choose another output name")


_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
_HEADER_ROOM = 1024 * 1024  # header, metadata, alignment


def estimated_file_bytes(base_model: Path, config: TrainConfig) -> int:
    """About how big the run's file will be, from the base model's header (no weights read)."""
    shapes = checkpoint.weight_shapes(base_model)
    width = _BYTES[config.save_precision]
    if config.method == "lora":
        total = sum(config.rank * (n_in + n_out) * width + 4 for n_in, n_out, part in lora_target_shapes(shapes, config.conv_layers)
                    if part == "unet" or config.train_text_encoder)
        if config.lora_type == "dora":  # and a magnitude per input feature or channel (.dora_scale)
            total += width * magnitude_count(lora_target_shapes(shapes), lora_conv_shapes(shapes) if config.conv_layers
                                             else [], config.train_text_encoder)
        return total + _HEADER_ROOM
    count = sum(_numel(shape) for key, shape in shapes.items() if not key.startswith("model_ema."))
    return count * width + _HEADER_ROOM


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


def estimated_class_bytes(plan: PriorPlan) -> int:
    """Room for class images still to generate (PNG never exceeds the raw pixels by much)."""
    if not plan.enabled or plan.spec is None or plan.cached is not None:
        return 0
    return max(0, plan.spec.count - plan.kept) * (plan.spec.resolution ** 2 * 3 + 4096)


def check_sample_dir(folder: Path, inputs: tuple[Path | None, ...] = ()) -> None:
    """The sample folder is not (inside) one of the job's inputs: samples written among the
    photos or class images would be trained on by the next run."""
    real = os.path.realpath(folder)
    for source in inputs:
        if source is not None and _inside(real, os.path.realpath(source)):
            raise ValueError(f"the sample folder {folder.name} is inside the job's input {Path(source).name}: "
                             "choose another sample folder")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"the sample folder {folder.name} exists and is not a folder: choose another sample folder")


def _existing_parent(folder: Path) -> Path:
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


def estimated_sample_bytes(watch: WatchConfig, steps: int, resolution: int) -> int:
    """At most how much the sample PNGs of a run take (PNG never exceeds the raw pixels by much)."""
    size = watch.image_size(resolution)
    return watch.sample_rounds(steps) * len(watch.prompt_list("x")) * (size * size * 3 + 4096)


@dataclass
class _Unsaved:
    """A finished run whose file could not be written: kept until the identical job saves it."""

    save: Callable[[], Saved]
    history: LossHistory


# At most one (a DreamBooth result holds a whole model): the newest finished, unsaved run.
_UNSAVED: dict[str, _Unsaved] = {}


@dataclass(frozen=True)
class Durability:
    """How a long run survives stops: save points and resume (none of it changes the result).

    ``save_every``: steps between save points (a step file and a training state); 0 = none.
    ``keep_last``: step files kept per run (0 = all). ``resume``: "auto" (continue the identical
    job from its newest complete state), "never", or a state folder to continue from.
    ``save_on_cancel``: a cancel also writes the cancelled step as a step file and a state.
    ``state_root``: where training states live (one folder per job fingerprint).
    """

    save_every: int = 0
    keep_last: int = 2
    resume: str | os.PathLike = "auto"
    save_on_cancel: bool = False
    state_root: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        if isinstance(self.save_every, bool) or not isinstance(self.save_every, int) or self.save_every < 0:
            raise ValueError(f"save_every must be a whole number >= 0 (0 = no save points), got {self.save_every!r}")
        if isinstance(self.keep_last, bool) or not isinstance(self.keep_last, int) or self.keep_last < 0:
            raise ValueError(f"keep_last must be a whole number >= 0 (0 = keep all), got {self.keep_last!r}")

    def state_dir(self, fingerprint: str) -> Path | None:
        return Path(self.state_root) / fingerprint[:32] if self.state_root is not None else None


def _train_lora(base: SD15Components, subject: SubjectData, config: LoRATrainConfig, callbacks: TrainingCallbacks,
                class_data: SubjectData | None, resume: LoopState | None, save_every: int, **options: Any) -> Any:
    return train_lora(base, subject, config, callbacks, class_subject=class_data, resume=resume,
                      save_every=save_every, **options)


def _train_dreambooth(base: SD15Components, subject: SubjectData, config: DreamBoothTrainConfig,
                      callbacks: TrainingCallbacks, class_data: SubjectData | None, resume: LoopState | None,
                      save_every: int, **options: Any) -> Any:
    return train_dreambooth(base, subject, config, callbacks, class_subject=class_data, resume=resume,
                            save_every=save_every, **options)


def _writer(method: str, base: SD15Components, provenance: Provenance,
            residency: Residency) -> Callable[[Any, Path, str, bool], Path]:
    """How a result of ``method`` is written as a model file: write(result, path, precision, overwrite).
    A checkpoint holds the VAE and text encoder too: frozen ones are read back from the base model
    for the write (exact, also when they trained in bf16 or were freed) and freed again after."""
    if method == "lora":
        return lambda result, path, precision, overwrite: save_lora(
            result, path, overwrite=overwrite, dtype=SAVE_DTYPES[precision], provenance=provenance)

    def write_checkpoint(result: Any, path: Path, precision: str, overwrite: bool) -> Path:
        with ExitStack() as parts:
            for name in ("vae", "text_encoder"):
                # frozen parts are written with the base file's own values, whatever dtype they trained in
                parts.enter_context(residency.borrowed(name) if name in result.trained
                                    else residency.as_in_source(name))
            return save_dreambooth(base, result, path, precision, overwrite=overwrite, provenance=provenance)

    return write_checkpoint


_METHODS = {"lora": _train_lora, "dreambooth": _train_dreambooth}


def find_resume_state(durability: Durability, fingerprint: str,
                      shown: Callable[[Path], str]) -> tuple[LoopState, Path] | None:
    """The newest complete training state of the job to continue from, or None."""
    if str(durability.resume) == "never":
        return None
    if str(durability.resume) == "auto":
        folder = durability.state_dir(fingerprint)
        return newest_state(folder, fingerprint) if folder is not None else None
    folder = Path(durability.resume)
    root = folder.parent if folder.name.startswith("step-") else folder
    found = newest_state(root, fingerprint)
    if found is None:
        raise ValueError(f"no complete training state of this job in {shown(folder)}: a state resumes only the "
                         "identical job (same base model, photos and settings)")
    return found


def _state_bytes(config: TrainConfig, file_bytes: int) -> int:
    """About how big a training state is: the trainable weights in fp32, the optimizer's moments
    and the EMA of the weights."""
    width = _BYTES[config.save_precision]
    weights = file_bytes // width * 4
    moments = STATES_PER_WEIGHT.get(config.optimizer, 1)
    return weights * (1 + moments + (1 if config.ema_decay else 0))


def _recover_rescued(rescue_dir: Path | None, output: Path, fingerprint: str,
                     shown: Callable[[Path], str]) -> dict[str, str] | None:
    """Move a file of this exact run that an earlier save put in the rescue folder into place."""
    if rescue_dir is None or not rescue_dir.is_dir():
        return None
    for candidate in sorted(rescue_dir.glob(f"{output.stem}*.safetensors")):
        metadata = read_metadata(candidate)
        if metadata is None or metadata.get("dbs.fingerprint") != fingerprint:
            continue
        atomic_copy(candidate, output)
        candidate.unlink(missing_ok=True)
        log.info("moved %s from %s into %s", candidate.name, shown(rescue_dir), shown(output.parent))
        return metadata
    return None


def train_file(base_model: str | os.PathLike, subject: SubjectData, config: TrainConfig,
               output_path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None, *, overwrite: bool = False,
               callbacks: TrainingCallbacks | None = None, before_load: Callable[[], None] | None = None,
               class_cache_dir: str | os.PathLike | None = None, class_folder: str | os.PathLike | None = None,
               device: str | torch.device | None = None, rescue_dir: str | os.PathLike | None = None,
               keep_unsaved: bool = False, shown: Callable[[Path], str] | None = None,
               durability: Durability | None = None,
               is_cancel: Callable[[BaseException], bool] | None = None,
               watch: WatchConfig | None = None, sample_dir: str | os.PathLike | None = None) -> JobResult:
    """Train ``base_model`` (an SD1.5 single file or diffusers folder) on ``subject`` with
    ``config`` (a LoRA or a DreamBooth config) and save the result at ``output_path``.

    ``tokenizer_dir`` may be None for a diffusers folder (its own ``tokenizer/`` is used).
    ``before_load`` runs after all checks pass and before the base model loads (ComfyUI frees
    its own models there). With prior preservation on, class images come from ``class_folder``
    or are generated into (and reused from) ``class_cache_dir``. ``device`` is where training
    runs (default: where the model loads, the CPU). A save that cannot be written in the output
    folder goes to ``rescue_dir``; with ``keep_unsaved`` a run that could not be written anywhere
    stays in memory for the identical job to save (a long-lived server; not the command line).
    ``shown`` renders folders in messages (the nodes name them relative to ComfyUI's folders).
    ``durability`` sets save points and resume (see :class:`Durability`); ``is_cancel`` tells a
    user's cancel from other errors (for ``save_on_cancel``). ``watch`` makes sample images
    (written to ``sample_dir`` when given) and the validation loss while training; it is not
    part of the run's fingerprint, as it does not change the trained weights.
    """
    train = _METHODS[config.method]
    processes = parallel.current()
    base_model, output = Path(base_model), Path(output_path)
    shown = shown or str
    rescue = Path(rescue_dir) if rescue_dir is not None else None
    check_output(output, (base_model, Path(class_folder) if class_folder is not None else None))
    if watch is not None and not isinstance(watch, WatchConfig):
        raise TypeError(f"watch must be a WatchConfig, got {type(watch).__name__}")
    samples_to = Path(sample_dir) if sample_dir is not None and watch is not None and watch.sample_every else None
    if samples_to is not None:
        check_sample_dir(samples_to, (base_model, Path(class_folder) if class_folder is not None else None))
    check_device(config, device)  # settings this device cannot run (adamw8bit on a CPU, bf16 on an old GPU)
    if config.unmasked_weight != type(config).unmasked_weight and not subject.masks:
        raise ConfigError(f"unmasked_weight={config.unmasked_weight:g} has no effect: the subject has no loss masks; "
                          "load it with loss mask 'face' or 'mask', or leave unmasked_weight at its default")
    request_reproducible_blas()
    if blas_reproducible() is False and torch.get_num_threads() > 1:
        log.warning("MKL started before this pack could ask it for reproducible sums (set MKL_CBWR=AUTO "
                    "in the environment that starts ComfyUI): the same seed may give files that differ in "
                    "their last bits, and a resumed run may not end in the bytes of an uninterrupted one")
    checkpoint.check_sd15(base_model, tokenizer_dir)  # headers and configs only: not SD1.5 is a clear error
    base_fingerprint = content_sha256(base_model)
    plan = plan_prior(config.prior_request, subject, base_fingerprint, class_cache_dir, class_folder, tokenizer_dir)
    provenance = Provenance.of_run(base_model.name, base_fingerprint, subject, config, plan.source, plan.info(),
                                   device=device, processes=processes.world)
    existing = vet_existing(output, provenance.fingerprint, overwrite, shown)
    if not processes.main:
        return _train_beside_main(processes, base_model, subject, config, output, tokenizer_dir, plan, provenance,
                                  train, class_cache_dir, device, durability, shown)

    def earlier_samples() -> list[SampleRound]:
        """The rounds an earlier run of this job left in the sample folder."""
        return load_sample_rounds(sample_dir, provenance.fingerprint) if sample_dir is not None else []

    if existing.reuse is not None:
        processes.from_main("done")
        if plan.enabled:
            plan.report = f"{KINDS[config.method]} reused, no class images needed; {plan.report}"
        return JobResult(output, history_from_metadata(existing.reuse), reused=True, prior=plan,
                         samples=earlier_samples(), sample_dir=samples_to)
    check_metadata_size(config, subject, provenance, config.class_images if plan.enabled else 0)
    size = estimated_file_bytes(base_model, config)
    unsaved = _UNSAVED.get(provenance.fingerprint)
    if unsaved is not None:  # trained before, could not be written: save it now, no training
        processes.from_main("done")
        saved = unsaved.save()
        _UNSAVED.clear()
        notes = ["saved the weights of the identical earlier run, which finished but could not be written",
                 *saved.notes]
        return JobResult(saved.path, unsaved.history, reused=False, prior=plan, notes=notes,
                         samples=earlier_samples(), sample_dir=samples_to)
    if not os.path.lexists(output):
        recovered = _recover_rescued(rescue, output, provenance.fingerprint, shown)
        if recovered is not None:
            processes.from_main("done")
            return JobResult(output, history_from_metadata(recovered), reused=True, prior=plan,
                             notes=[f"moved from {shown(rescue)} (where an earlier save had to put it)"],
                             samples=earlier_samples(), sample_dir=samples_to)
    processes.from_main("train")
    durability = durability or Durability()
    state_dir = durability.state_dir(provenance.fingerprint)
    found = find_resume_state(durability, provenance.fingerprint, shown)
    resume, notes = (found[0], [f"resumed from step {found[0].step} (training state {found[1].name})"]) \
        if found else (None, [])
    needs = [(output.parent, size, f"the {KINDS[config.method]}")]
    if durability.save_every:
        keep = durability.keep_last or max(1, config.steps // durability.save_every)
        needs.append((output.parent, size * keep, f"{keep} step files"))
        if state_dir is not None:
            Path(state_dir).mkdir(parents=True, exist_ok=True)
            needs.append((Path(state_dir), _state_bytes(config, size) * 2, "training states"))
    if samples_to is not None:
        needs.append((_existing_parent(samples_to), estimated_sample_bytes(watch, config.steps, subject.resolution),
                      "sample images"))
    if class_cache_dir is not None and estimated_class_bytes(plan):
        Path(class_cache_dir).mkdir(parents=True, exist_ok=True)
        needs.append((Path(class_cache_dir), estimated_class_bytes(plan), f"{plan.spec.count} class images"))
    check_free_space(needs, shown)
    if before_load is not None:
        before_load()
    release_freed_memory()  # what earlier runs freed counts as free
    # the memory it will need at its peak, against what is free (after before_load freed the host's models)
    # Without class images to generate, the UNet is read only after the VAE and text encoder have
    # done their caching and left memory: the three parts are never in memory together.
    late_unet = not plan.enabled or plan.folder_subject is not None
    check_memory(config, base_model, subject.resolution, device, images=len(subject), unet_last=late_unet,
                 samples=bool(watch is not None and watch.sample_every))
    callbacks = callbacks or TrainingCallbacks()
    base = checkpoint.load_sd15(base_model, tokenizer_dir, load_dtypes(config, device),
                                ("vae", "text_encoder") if late_unet else checkpoint.COMPONENTS)
    callbacks.on_base_loaded()
    try:
        residency = _place(base, base_model, config, device, late_unet)
        class_data = realize_prior(plan, base, class_cache_dir, callbacks.on_generate_step, tokenizer_dir)
        processes.barrier()  # the other processes read the class images now, and what resume found is read
        write_result = _writer(config.method, base, provenance, residency)
        # step files carry no reusable fingerprint: never taken for the finished run
        write_step = _writer(config.method, base, replace(provenance, fingerprint=""), residency)
        points = SavePoints(callbacks, output=output, write=write_step, precision=config.save_precision,
                            fingerprint=provenance.fingerprint, state_dir=state_dir, keep_last=durability.keep_last,
                            save_on_cancel=durability.save_on_cancel, job={"config": config.to_dict()},
                            state_bytes=_state_bytes(config, size), file_bytes=size,
                            is_cancel=is_cancel or (lambda error: isinstance(error, TrainingStopped)),
                            shown=shown, earlier_rounds=earlier_samples)
        try:
            result = train(base, subject, config, points, class_data, resume, durability.save_every, watch=watch,
                           sample_dir=samples_to, run=provenance.fingerprint, residency=residency)
        except NonFiniteLossError as exc:
            if points.last_point is not None:
                exc.args = (str(exc).replace(" Nothing was saved.", "") + f" The step-{points.last_point} file "
                            "and training state (before it went wrong) are kept.",)
            raise
        history = result.history
        scored = [(r.step, r.scores) for r in result.watched.samples if r.scores is not None]
        if scored:  # the subject-fidelity curve of the sample rounds (runs that scored them)
            result.metadata["dbs.fidelity"] = fidelity_json(scored)
        callbacks.on_save_begin()

        def write(path: Path, precision: str, overwrite: bool) -> Path:
            return write_result(result, path, precision, overwrite)

        def save() -> Saved:
            return save_safely(write, output, config.save_precision, replace=existing.replace, rescue=rescue,
                               size_hint=size, shown=shown)

        try:
            saved = save()
        except SaveFailed as exc:
            if not keep_unsaved:
                raise SaveFailed(exc.errno, f"{exc.strerror} The trained weights are lost.") from None
            _UNSAVED.clear()
            _UNSAVED[provenance.fingerprint] = _Unsaved(save, history)
            raise SaveFailed(exc.errno, f"{exc.strerror} The trained weights are kept in memory until ComfyUI "
                                        f"stops: free about {human_bytes(size)} in {shown(output.parent)} and queue "
                                        "the same prompt again to save them without training.") from None
    finally:
        del base
        release_freed_memory()
    if state_dir is not None:  # finished and saved: its training states are no longer needed
        shutil.rmtree(state_dir, ignore_errors=True)
    watched = result.watched
    return JobResult(saved.path, history, reused=False, prior=plan, notes=notes + watched.notes + saved.notes,
                     samples=watched.samples, sample_seconds=watched.sample_seconds,
                     validation_seconds=watched.validation_seconds, seconds=result.seconds, sample_dir=samples_to)


def _place(base: SD15Components, base_model: Path, config: TrainConfig, device: str | torch.device | None,
           late_unet: bool) -> Residency:
    """Move the loaded parts to ``device`` and track where each part lives: frozen parts leave
    memory once their outputs are cached (read back from base_model when needed), and with
    ``late_unet`` the UNet is read only then."""
    if device is not None:
        for model in (base.unet, base.vae, base.text_encoder):
            if not any(parameter.is_meta for parameter in model.parameters()):  # a part read later goes there then
                model.to(device)
    residency = Residency(base, base_model)
    if late_unet:
        residency.not_loaded("unet", device or "cpu", load_dtypes(config, device)["unet"])
    return residency


def _train_beside_main(processes: parallel.Processes, base_model: Path, subject: SubjectData, config: TrainConfig,
                       output: Path, tokenizer_dir: str | os.PathLike | None, plan: PriorPlan, provenance: Provenance,
                       train: Callable[..., Any], class_cache_dir: str | os.PathLike | None,
                       device: str | torch.device | None, durability: Durability | None,
                       shown: Callable[[Path], str]) -> JobResult:
    """A process of a multi-process launch other than the main one: it trains its shard of every
    batch and writes nothing (files, step files, states, samples and class images are the main
    process's). It follows the main process's decision to reuse a file or train, resumes from the
    same training state, and reads the class images once the main process has them."""
    if processes.from_main(None) != "train":
        return JobResult(output, LossHistory(), reused=True, prior=plan)
    durability = durability or Durability()
    found = find_resume_state(durability, provenance.fingerprint, shown)
    late_unet = not plan.enabled or plan.folder_subject is not None
    base = checkpoint.load_sd15(base_model, tokenizer_dir, load_dtypes(config, device),
                                ("vae", "text_encoder") if late_unet else checkpoint.COMPONENTS)
    try:
        residency = _place(base, base_model, config, device, late_unet)
        processes.barrier()  # the main process has its class images and its resume state
        class_data = read_prior(plan, class_cache_dir)
        result = train(base, subject, config, TrainingCallbacks(), class_data, found[0] if found else None,
                       durability.save_every, watch=None, sample_dir=None, run=provenance.fingerprint,
                       residency=residency)
    finally:
        del base
        release_freed_memory()
    return JobResult(output, result.history, reused=False, prior=plan, seconds=result.seconds)
