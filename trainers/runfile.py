"""Run files: a training job written down so the command line runs it elsewhere, unchanged.

A training node (or anyone) exports a run as a folder::

    <run folder>/run.json       {"format": RUN_FORMAT, "command": "lora" | "dreambooth",
                                 "processes": N, "options": {<CLI option dest>: value, ...}}
    <run folder>/images/NNN.png the subject's training crops (8-bit, at the training resolution)
    <run folder>/images/NNN.txt their captions
    <run folder>/launch.sh      the command that trains it

and ``python -m trainers <command> --config run.json`` (under ``accelerate launch`` for several
processes) trains the same job: the crops load back unchanged (a crop of the training size is
taken as it is), the captions are the ones the node trained with, and the settings are the
node's. The run's fingerprint is therefore the node's, so the file it writes, copied into
ComfyUI's models folder, is reused by the node instead of trained again.

The global batch (``batch_size`` x ``gradient_accumulation`` x processes) is what a job is; for
N processes :func:`split_batch` keeps it by giving each process a share of it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data.images import MASK_FOLDER
from .data.subject import SubjectData
from .files.fileio import atomic_write_bytes
from .training.config import ConfigError

RUN_FORMAT = "dreambooth-studio-run/1"
RUN_FILE = "run.json"
LAUNCH_FILE = "launch.sh"  # the command, beside the run file
IMAGES = "images"
MAX_PROCESSES = 1024
# where `-m trainers` runs from: the folder that holds the trainers package
PACK_DIR = Path(__file__).resolve().parent.parent


def split_batch(config: Any, processes: int) -> Any:
    """``config`` for ``processes`` data-parallel processes with the same global batch: each
    process keeps ``batch_size`` and the accumulation steps are shared out when they divide, else
    the batch is; ConfigError when the global batch cannot be shared evenly."""
    if isinstance(processes, bool) or not isinstance(processes, int) or not 1 <= processes <= MAX_PROCESSES:
        raise ConfigError(f"processes must be a whole number from 1 to {MAX_PROCESSES} (got {processes!r})")
    batch, steps = config.batch_size, config.gradient_accumulation
    if steps % processes == 0:
        return dataclasses.replace(config, gradient_accumulation=steps // processes)
    if (batch * steps) % processes == 0 and batch * steps // processes <= batch:
        return dataclasses.replace(config, batch_size=batch * steps // processes, gradient_accumulation=1)
    raise ConfigError(
        f"the global batch batch_size x gradient_accumulation = {batch} x {steps} = {batch * steps} images cannot be "
        f"shared evenly by {processes} processes: make it a multiple of {processes} (e.g. gradient_accumulation "
        f"{processes * -(-steps // processes)}), or export for a process count that divides it")


@dataclass(frozen=True)
class ExportedRun:
    folder: Path
    run_file: Path
    command: str  # the shell command that trains it


def write_run(folder: str | os.PathLike, *, command: str, processes: int, checkpoint: str | os.PathLike,
              tokenizer: str | os.PathLike | None, subject: SubjectData, config: Any, output_name: str,
              watch: Any = None, class_folder: str | os.PathLike | None = None,
              durability: dict[str, Any] | None = None) -> ExportedRun:
    """Write the run folder (``folder`` must not hold another run's images) and return it with
    the command line that trains it on ``processes`` processes."""
    from PIL import Image

    split = split_batch(config, processes)
    folder = Path(folder)
    images = folder / IMAGES
    images.mkdir(parents=True, exist_ok=True)
    masks = images / MASK_FOLDER
    for stale in [*images.iterdir(), *(masks.iterdir() if masks.is_dir() else [])]:
        if stale.is_file() and stale.suffix in (".png", ".txt"):  # an earlier export of the same name: replaced whole
            stale.unlink()
    if subject.masks:
        masks.mkdir(exist_ok=True)
    digits = max(3, len(str(len(subject))))
    seen: dict[bytes, int] = {}
    for index, (image, caption) in enumerate(zip(subject.images, subject.captions, strict=True)):
        pixels = (image.detach().float().clamp(0, 1) * 255).round().to("cpu").byte().numpy()
        content = pixels.tobytes()
        if content in seen:
            raise ValueError(f"training images {seen[content] + 1} and {index + 1} are identical: the "
                             "command line uses identical photos once; remove the duplicate before exporting")
        seen[content] = index
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        stem = f"{index + 1:0{digits}d}"
        atomic_write_bytes(images / f"{stem}.png", buffer.getvalue())
        atomic_write_bytes(images / f"{stem}.txt", caption.encode("utf-8"))
        if subject.masks:  # the loss masks as 8-bit grey, as the subject's fingerprint counts them
            buffer = io.BytesIO()
            mask = (subject.masks[index].detach().float().clamp(0, 1) * 255).round().to("cpu").byte().numpy()
            Image.fromarray(mask).save(buffer, format="PNG")
            atomic_write_bytes(masks / f"{stem}.png", buffer.getvalue())
    options: dict[str, Any] = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "images": IMAGES,
        "captions": True,
        "instance_prompt": subject.instance_prompt,
        "class_prompt": subject.class_prompt,
        "resolution": subject.resolution,
        # the crops are at the training size (or their bucket's): taken as they are
        "crop_mode": "bucket" if subject.bucketed else "center",
        **({"loss_mask": "mask"} if subject.masks else {}),
        "flip": subject.flip,
        "output": f"{output_name}.safetensors",
    }
    if tokenizer is not None:
        options["tokenizer"] = str(Path(tokenizer).resolve())
    if class_folder is not None:
        options["class_folder"] = str(Path(class_folder).resolve())
    options.update(split.to_dict())
    if watch is not None:
        options.update(watch.to_dict())
    options.update(durability or {})
    run = {"format": RUN_FORMAT, "command": command, "processes": processes, "options": options}
    run_file = folder / RUN_FILE
    atomic_write_bytes(run_file, (json.dumps(run, indent=2, sort_keys=False) + "\n").encode("utf-8"))
    shell = launch_command(run_file, command, processes)
    atomic_write_bytes(folder / LAUNCH_FILE, f"#!/bin/sh\n# trains {run_file.name} ({processes} process(es))\n"
                                              f"{shell}\n".encode())
    return ExportedRun(folder, run_file, shell)


def launch_command(run_file: Path, command: str, processes: int) -> str:
    """The shell command that trains ``run_file``: ``python -m trainers`` for one process,
    ``accelerate launch`` on this machine's GPUs for several (torchrun underneath; it also runs
    on CPUs, with gloo)."""
    where = f"cd {shlex.quote(str(PACK_DIR))} && "
    tail = f"-m trainers {command} --config {shlex.quote(str(run_file))}"
    if processes == 1:
        return where + f"python {tail}"
    return where + f"accelerate launch --multi_gpu --num_processes {processes} {tail}"
