"""What LoRATrain and DreamBoothTrain share: their common inputs, and one helper that runs a
training node (config from the widgets, checked names and paths, progress with a live loss
curve, memory scope, the job, the loss-curve image). Not a node itself."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import comfy.model_management
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..trainers.files.names import validate_output_name
from ..trainers.jobs import Durability, JobResult, check_output, pack_written, train_file
from ..trainers.runfile import MAX_PROCESSES, split_batch, write_run
from ..trainers.training.callbacks import LossHistory
from ..trainers.training.config import CLASS_IMAGE_FIELDS, field_spec
from ..trainers.training.plot import loss_curve_image
from ..trainers.training.record import read_metadata
from ..trainers.training.watch import WatchConfig
from .bridge import (
    NO_FOLDER,
    class_image_cache,
    config_input,
    config_kwargs,
    contained,
    free_comfy_models,
    input_subfolders,
    model_path,
    output_model_path,
    rescue_dir,
    resolve_input_folder,
    shown,
    state_root,
    tokenizer_dir,
    training_scope,
    user_facing_errors,
    without_server_paths,
)
from .live import LiveProgress
from .scoring import FIDELITY_MODELS, sample_scorer, scoring_inputs

log = logging.getLogger(__name__)

PRIOR_FIELDS = CLASS_IMAGE_FIELDS
# the moving average of the trained weights: optional inputs of both training nodes
EMA_FIELDS = ("ema_decay", "ema_on_cpu")
# caption dropout, shuffled tags and the masked loss's weight: optional inputs of both training nodes
CAPTION_FIELDS = ("caption_dropout", "shuffle_tags", "keep_tags", "unmasked_weight")
GENERATE = "(generate from the base model)"
# Where each method's files go, and the title of its loss curve.
MODEL_FOLDERS = {"lora": "loras", "dreambooth": "checkpoints"}
TITLES = {"lora": "LoRA loss", "dreambooth": "DreamBooth loss"}


class SavedElsewhere(RuntimeError):
    """Training finished and its file is safe, but not in the models folder the workflow reads."""


def checkpoint_input() -> io.Input:
    return io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints"),
                          tooltip="SD1.5 base model from models/checkpoints (single-file .safetensors).")


def output_name_input(default: str) -> io.Input:
    return io.String.Input("output_name", default=default,
                           tooltip="File name (without extension) for the trained model. Letters, digits, "
                                   "'-', '_' and '.'; no folders.")


def overwrite_input() -> io.Input:
    return io.Boolean.Input("overwrite", default=False,
                            tooltip="Replace an existing file of that name that this pack wrote (a file from "
                                    "anywhere else is never replaced). Off: a file from an identical earlier run "
                                    "is reused, any other file is an error.")


def class_folder_input() -> io.Input:
    return io.Combo.Input("class_folder", optional=True, options=[GENERATE, *input_subfolders()], default=GENERATE,
                          tooltip="Class images for prior preservation: generated from the base model with the "
                                  "class prompt (cached in models/dreambooth_studio/class_images/, reused by every run with the same "
                                  "model, prompt, count, resolution and seed), or your own folder in input/ (at "
                                  "most class_images of them, centre-cropped).")


RESUME_CHOICES = ("auto", "never")


def durability_inputs() -> list[io.Input]:
    """Save points and resume: optional (API prompts written before they existed still validate),
    and not part of what a run trains (changing them never retrains a finished job)."""
    return [
        io.Int.Input("save_every", optional=True, default=0, min=0, max=100_000,
                     tooltip="Every N steps write a step file (models/<loras or checkpoints>/<output_name>/"
                             "<output_name>-stepNNNNNN.safetensors) and a training state to resume from; 0 = off. "
                             "A full checkpoint step file is 2-4 GB, its state about 10 GB."),
        io.Int.Input("keep_last", optional=True, default=2, min=0, max=1000,
                     tooltip="Step files kept per run (older ones are deleted); 0 = keep all."),
        io.Combo.Input("resume", optional=True, options=list(RESUME_CHOICES), default="auto",
                       tooltip="auto: queueing the identical job again (after a cancel, a crash or a restart) "
                               "continues from its newest complete training state, to the same result as an "
                               "uninterrupted run. never: start over."),
        io.Boolean.Input("save_on_cancel", optional=True, default=False,
                         tooltip="On cancel, also write the current step as a step file and a training state "
                                 "(otherwise the last save point is kept)."),
    ]


def scale_out_inputs(config_cls) -> list[io.Input]:
    """Gradient accumulation and the export for a multi-GPU launch: optional (older API prompts
    still validate); the export is not part of what a run trains."""
    return [
        config_input(config_cls, "gradient_accumulation", optional=True),
        io.Int.Input("export_processes", optional=True, default=0, min=0, max=MAX_PROCESSES,
                     tooltip="0: train here. N: do not train; write this run (training crops, captions, settings) "
                             "to output/dreambooth_studio/runs/<output_name>/ and give the command that trains it on "
                             "N GPUs with accelerate launch (launch_command output). The global batch stays "
                             "batch_size x gradient_accumulation, shared by the N processes; the file it makes, put "
                             "in this models folder, is reused here instead of trained again."),
    ]


def launch_command_output() -> io.Output:
    return io.String.Output(display_name="launch_command",
                            tooltip="With export_processes N: the shell command that trains the exported run (empty "
                                    "when the node trains here).")


RUNS_FOLDER = ("dreambooth_studio", "runs")


def export_processes_of(settings: dict) -> int:
    """The export_processes input (popped from ``settings``), checked."""
    value = settings.pop("export_processes", 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PROCESSES:
        raise ValueError(f"export_processes must be a whole number from 0 (train here) to {MAX_PROCESSES} "
                         f"(got {value!r})")
    return value


def export_training_node(node_cls, config_cls, subject, ckpt_name: str, output_name: str, class_folder,
                         settings: dict, processes: int) -> tuple[str, dict]:
    """Write the run a training node would do as a run folder for the command line; nothing is
    trained or loaded. Returns (the command, the node's UI output)."""
    with user_facing_errors():
        node = NodeInputs.of(config_cls, ckpt_name, output_name, class_folder, settings)
        config, durability, stem = node.config, node.durability, node.stem
        split_batch(config, processes)  # a global batch the processes cannot share is an error here
        runs = Path(folder_paths.get_output_directory()).joinpath(*RUNS_FOLDER)
        target = runs / stem
        if not contained(target, runs):
            raise ValueError(f"output name {stem!r} would be written outside output/{'/'.join(RUNS_FOLDER)}")
        kept = {"save_every": durability.save_every, "keep_last": durability.keep_last,
                "resume": str(durability.resume), "save_on_cancel": durability.save_on_cancel}
        exported = write_run(target, command=config.method, processes=processes, checkpoint=node.checkpoint,
                             tokenizer=tokenizer_dir(), subject=subject, config=config, output_name=stem,
                             watch=node.watch, class_folder=node.class_folder, durability=kept)
    log.info("exported run %s for %d process(es): %s", exported.run_file, processes, exported.command)
    text = (f"Run written to output/{'/'.join(RUNS_FOLDER)}/{stem}/ (nothing trained). Train it with:\n"
            f"{exported.command}\nThen copy {stem}.safetensors from that folder into models/"
            f"{MODEL_FOLDERS[config.method]}/: queueing this node (export_processes 0) reuses it.")
    return exported.command, {"text": (text,)}


def durability_of(settings: dict) -> Durability:
    """The save-point inputs of a training node (popped from ``settings``), checked: combo values
    are not checked by ComfyUI for V3 nodes."""
    resume = settings.pop("resume", "auto")
    if resume not in RESUME_CHOICES:
        raise ValueError(f"resume must be one of {', '.join(RESUME_CHOICES)} (got {resume!r})")
    save_on_cancel = settings.pop("save_on_cancel", False)
    if not isinstance(save_on_cancel, bool):
        raise ValueError(f"save_on_cancel must be true or false (got {save_on_cancel!r})")
    return Durability(save_every=settings.pop("save_every", 0), keep_last=settings.pop("keep_last", 2),
                      resume=resume, save_on_cancel=save_on_cancel, state_root=state_root())


WATCH_FIELDS = ("sample_every", "sample_prompts", "sample_seed", "sample_steps", "sample_cfg", "sample_size",
                "validate_every")


def watch_inputs() -> list[io.Input]:
    """Samples and validation while training: optional (older API prompts still validate), and
    not part of what a run trains (changing them never retrains a finished job)."""
    inputs = []
    for name in WATCH_FIELDS:
        if name == "sample_prompts":
            spec = field_spec(WatchConfig, name)
            inputs.append(io.String.Input(name, optional=True, default=spec["default"], multiline=True,
                                          tooltip=spec["help"]))
        else:
            inputs.append(config_input(WatchConfig, name, optional=True))
    return inputs


def fidelity_input() -> io.Input:
    return FIDELITY_MODELS.Input(
        "fidelity_models", optional=True,
        tooltip="From Load Fidelity Models: score every sample round (DINO and CLIP-I against the subject's photos, "
                "CLIP-T against the sample prompt with the class prompt in place of the instance prompt), show the "
                "scores on the live chart, and name the best step (highest DINO while CLIP-T stays within 0.02 of "
                "the base model's). Needs sample_every; keep save_every a divisor of sample_every so the best step "
                "has a file.")


@dataclass(frozen=True)
class NodeInputs:
    """A training node's inputs, checked, as training and exporting both read them."""

    config: object  # the config_cls instance
    durability: Durability
    watch: WatchConfig
    checkpoint: Path
    stem: str  # the output name, validated
    class_folder: Path | None
    fidelity_models: object  # the fidelity_models input (None when not connected)

    @classmethod
    def of(cls, config_cls, ckpt_name: str, output_name: str, class_folder, settings: dict) -> NodeInputs:
        settings = dict(settings)
        durability = durability_of(settings)
        watch = watch_of(settings)
        fidelity_models = settings.pop("fidelity_models", None)
        return cls(config=config_cls(**config_kwargs(config_cls, settings)), durability=durability, watch=watch,
                   checkpoint=model_path("checkpoints", ckpt_name), stem=validate_output_name(output_name),
                   class_folder=resolve_class_folder(class_folder), fidelity_models=fidelity_models)


def scorer_of(models, subject, watch: WatchConfig):
    """The sample scorer of a training node whose fidelity_models input is connected (``models``),
    or None; a wiring mistake is an error before anything loads."""
    if scoring_inputs(models, subject, None) is None:
        return None
    if not watch.sample_every:
        raise ValueError("fidelity_models scores the sample rounds: set sample_every above 0 (and save_every to "
                         "a divisor of it, so that the best step has a file)")
    return sample_scorer(models, subject)


def best_of(job: JobResult) -> tuple[dict | None, str, Path]:
    """The best scored step of a finished run: ({"step", "file", scores} or None, its file's name
    as ComfyUI lists it in the run's models folder, its path). Without scores: the final file."""
    found = job.best_step()
    if found is None:
        return None, job.path.name, job.path
    round_, path = found
    name = Path(os.path.relpath(path, job.path.parent)).as_posix()
    return {"step": round_.step, "file": name, **round_.scores}, name, path


def watch_of(settings: dict) -> WatchConfig:
    """The sample/validation inputs of a training node (popped from ``settings``), checked."""
    return WatchConfig(**{name: settings.pop(name) for name in WATCH_FIELDS if name in settings})


def samples_dir(method: str, stem: str) -> Path:
    """output/dreambooth_studio/<method>-<output name>/: the sample PNGs of a run, found by /view."""
    return Path(folder_paths.get_output_directory()) / "dreambooth_studio" / f"{method}-{stem}"


def is_cancel(error: BaseException) -> bool:
    return isinstance(error, comfy.model_management.InterruptProcessingException)


def resolve_class_folder(name):
    if name in (None, "", GENERATE, NO_FOLDER):
        return None
    return resolve_input_folder(name)


def check_inputs(output_name: str, config_cls, ckpt_name=None, sample_prompts: str = "", **fields) -> bool | str:
    """For validate_inputs (runs at /prompt, before anything is queued): the output name, that
    the output is neither the base checkpoint nor a file this pack did not write (which no run
    may reuse or replace), the sample prompts (no widget limits them) and the config fields
    ComfyUI no longer checks."""
    try:
        stem = validate_output_name(output_name)
        WatchConfig(sample_prompts=sample_prompts)
        config_cls(**fields)
        if ckpt_name is not None:
            kind = MODEL_FOLDERS[config_cls.method]
            output = Path(folder_paths.get_folder_paths(kind)[0]) / f"{stem}.safetensors"
            if output.parent.is_dir():
                check_output(output, (model_path("checkpoints", ckpt_name),))
                output_model_path(kind, stem, create=False)
                if output.exists() and not pack_written(read_metadata(output)):
                    raise ValueError(
                        f"{output.name} in {shown(output.parent)} was not written by DreamBooth Studio, so no run "
                        "may reuse or replace it: choose another output name")
    except ValueError as exc:
        return without_server_paths(str(exc))
    return True


def curve_image(history: LossHistory, title: str) -> torch.Tensor:
    return loss_curve_image(history.losses, title=title, extra_curves=history.extra_curves() or None,
                            validation=history.validation or None)


def to_pil(image: torch.Tensor):
    from PIL import Image

    array = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(array)


def to_image(picture) -> torch.Tensor:
    """A PIL image as a 1-image ComfyUI IMAGE batch."""
    import numpy as np

    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)[None]


def no_samples_image(reason: str) -> torch.Tensor:
    """What the samples output holds when a run made none (an IMAGE must be an image)."""
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (512, 64), (32, 32, 32))
    ImageDraw.Draw(picture).text((12, 24), reason, fill=(220, 220, 220))
    return to_image(picture)


@dataclass
class TrainedRun:
    job: JobResult
    curve: torch.Tensor  # loss curve IMAGE
    samples: torch.Tensor  # labelled sample grid IMAGE (or a note saying why there is none)
    ui: dict  # the node's UI output: previews and the run for the live chart
    best_name: str  # the best scored step's file as ComfyUI lists it (the final file without scores)
    best_path: Path


def run_training_node(node_cls, config_cls, subject, ckpt_name: str, output_name: str, overwrite: bool,
                      class_folder, settings: dict) -> TrainedRun:
    """Train (or reuse) the file a training node asks for, reporting to the canvas as it goes."""
    with user_facing_errors():
        node = NodeInputs.of(config_cls, ckpt_name, output_name, class_folder, settings)
        config, durability, watch, checkpoint, stem, folder = (node.config, node.durability, node.watch,
                                                               node.checkpoint, node.stem, node.class_folder)
        scorer = scorer_of(node.fidelity_models, subject, watch)
        output = output_model_path(MODEL_FOLDERS[config.method], stem)
        title = TITLES[config.method]
    hidden = getattr(node_cls, "hidden", None)  # None when execute is called outside ComfyUI's executor
    sample_dir = samples_dir(config.method, stem)
    progress = LiveProgress(config.steps, getattr(hidden, "unique_id", None), config.method, output.name,
                            preview=lambda history: to_pil(curve_image(history, title)), sample_dir=sample_dir,
                            scorer=scorer)
    try:
        with user_facing_errors(), training_scope():
            job = train_file(checkpoint, subject, config, output, tokenizer_dir(), overwrite=bool(overwrite),
                             callbacks=progress, before_load=free_comfy_models, class_cache_dir=class_image_cache(),
                             class_folder=folder, rescue_dir=rescue_dir(), keep_unsaved=True, shown=shown,
                             durability=durability, is_cancel=is_cancel, watch=watch,
                             sample_dir=sample_dir, device=comfy.model_management.get_torch_device())
    except BaseException as error:
        progress.finish("cancelled" if is_cancel(error) else "failed")
        raise
    if job.path.parent != output.parent:  # the models folder could not take it: nothing downstream finds it
        progress.finish("failed")
        raise SavedElsewhere(" ".join(job.notes) + ". Queue the same prompt again once there is room: the file is "
                             "moved into place without training.")
    if job.reused:
        progress.bar.update_absolute(config.steps, config.steps)
    best, best_name, best_path = best_of(job)
    if best is not None:
        log.info("best scored step: %d (%s): DINO %.3f, CLIP-I %.3f, CLIP-T %.3f", best["step"], best_name,
                 best["dino"], best["clip_i"], best["clip_t"])
    progress.finish("reused" if job.reused else "finished", history=job.history, samples=job.samples, best=best)
    for note in job.notes:
        log.warning(note)
    log.info(job.report())
    curve = curve_image(job.history, f"{title} ({job.path.name})")
    grid = job.sample_grid()
    samples = to_image(grid) if grid is not None else no_samples_image(
        "no samples: set sample_every above 0" if not watch.sample_every else "no samples were kept for this file")
    previews = ui.PreviewImage(curve, cls=node_cls).values
    if grid is not None:
        previews = previews + ui.PreviewImage(samples, cls=node_cls).values
    return TrainedRun(job, curve, samples, {"images": previews, "dreambooth_studio": [progress.run.as_json()]},
                      best_name, best_path)
