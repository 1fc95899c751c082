"""What every node of the pack needs from ComfyUI: folders, widgets built from the engine's
config metadata, progress/cancel adapted to trainer callbacks, and freeing memory."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
import traceback
from dataclasses import fields
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..trainers.callbacks import TrainingCallbacks

log = logging.getLogger(__name__)

CATEGORY = "DreamBooth"
SUBJECT = io.Custom("SUBJECT")


# -- folders ----------------------------------------------------------------------------------
def pack_root() -> Path:
    return Path(__file__).resolve().parents[1]


def tokenizer_dir() -> Path:
    """CLIP tokenizer files shipped with ComfyUI (SD1.5 uses the ViT-L/14 tokenizer)."""
    return Path(next(iter(comfy.__path__))).resolve() / "sd1_tokenizer"


def contained(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return real == root or real.startswith(root + os.sep)


def model_path(kind: str, name: str) -> Path:
    """Full path of a model file by its combo name. Only names ComfyUI itself lists for the folder
    are accepted (a model file placed there as a link is fine: that is the user's choice), so a
    crafted name such as '../../x' cannot reach anything else."""
    if name not in folder_paths.get_filename_list(kind):
        raise ValueError(f"{kind} file {name!r} not found in models/{kind}: put it there and refresh the page")
    path = folder_paths.get_full_path(kind, name)
    if path is None or not any(os.path.abspath(path).startswith(os.path.abspath(root) + os.sep)
                               for root in folder_paths.get_folder_paths(kind)):
        raise ValueError(f"{kind} file {name!r} is not inside models/{kind}")
    return Path(path)


def output_model_path(kind: str, stem: str) -> Path:
    """Where a new model file `<stem>.safetensors` goes: the first folder ComfyUI lists for `kind`."""
    folder = Path(folder_paths.get_folder_paths(kind)[0])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.safetensors"
    if not contained(path, folder):
        raise ValueError(f"output name {stem!r} would be written outside models/{kind}")
    return path


# -- widgets from the engine's dataclass metadata ------------------------------------------------
def config_input(config_cls, name: str, tooltip: str | None = None, optional: bool = False,
                 **overrides) -> io.Input:
    """One widget for field `name` of a trainers config dataclass: default, bounds, choices and
    help text all come from the dataclass, so the node and the engine can't disagree."""
    spec = {f.name: f for f in fields(config_cls)}[name]
    meta = dict(spec.metadata)
    meta.update(overrides)
    default = overrides.get("default", spec.default)
    common = {"tooltip": tooltip or meta.get("help", ""), "optional": optional}
    if "zero_means" in meta and (meta.get("min") or 0) > 0:
        meta["min"] = 0  # 0 is allowed too ("off"); the config says what it means
    if meta.get("choices"):
        return io.Combo.Input(name, options=list(meta["choices"]), default=default, **common)
    if isinstance(default, bool):
        return io.Boolean.Input(name, default=default, **common)
    if isinstance(default, int):
        # A training seed must not change by itself after each run (the frontend would add a
        # "randomize" control to any input named seed), or every run would retrain.
        return io.Int.Input(name, default=default, min=meta.get("min"), max=meta.get("max"),
                            step=meta.get("step", 1), control_after_generate=False if "seed" in name else None,
                            **common)
    if isinstance(default, float):
        return io.Float.Input(name, default=default, min=meta.get("min"), max=meta.get("max"),
                              step=meta.get("step", 1e-6), round=False, **common)
    return io.String.Input(name, default=default, **common)


def config_kwargs(config_cls, values: dict) -> dict:
    names = {f.name for f in fields(config_cls)}
    return {k: v for k, v in values.items() if k in names}


# -- progress, cancel, memory --------------------------------------------------------------------
class ComfyProgress(TrainingCallbacks):
    """Trainer callbacks -> ComfyUI progress bar (websocket `progress` events) and cancel check.

    Cancel is checked explicitly every step: newest ComfyUI throttles the progress hook that
    would otherwise do it. `preview` (optional) makes a PIL image of the run so far from this
    object (`losses`, `instance_losses`, `prior_losses`); it is sent as the node's live preview
    at most every `preview_every` seconds. Class-image generation, when a run has it, reports
    its denoising steps on the same bar before training starts.
    """

    def __init__(self, total: int, preview=None, preview_every: float = 2.0):
        super().__init__()
        self.bar = comfy.utils.ProgressBar(total)
        self.preview = preview
        self.preview_every = preview_every
        self._last_preview = 0.0
        self.losses: list[float] = []
        self.instance_losses: list[float] = []
        self.prior_losses: list[float] = []

    def on_generate_step(self, done: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.bar.update_absolute(done, total)

    def on_train_begin(self, total_steps: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()

    def on_step_end(self, state) -> None:
        self.losses.append(state.loss)
        if state.prior_loss is not None:
            self.instance_losses.append(state.instance_loss)
            self.prior_losses.append(state.prior_loss)
        comfy.model_management.throw_exception_if_processing_interrupted()
        image = None
        now = time.monotonic()
        if self.preview is not None and (now - self._last_preview >= self.preview_every
                                         or state.step == state.total_steps):
            self._last_preview = now
            image = ("PNG", self.preview(self), 512)
        self.bar.update_absolute(state.step, state.total_steps, image)

    def extra_curves(self) -> dict[str, list[float]]:
        if not self.prior_losses:
            return {}
        return {"instance": self.instance_losses, "prior": self.prior_losses}



def class_image_cache() -> Path:
    """Generated class images live in input/class_images/<prompt>-<res>px-<count>-<key>/: visible,
    reusable as a class folder, and found again by every run of a sweep."""
    return Path(folder_paths.get_input_directory()) / "class_images"


def free_comfy_models() -> None:
    """Unload ComfyUI's models before a trainer loads its own (one SD1.5 in memory, not two)."""
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()
    gc.collect()


def release_memory() -> None:
    """Give the trainer's memory back after a run, a cancel or an error."""
    gc.collect()
    comfy.model_management.soft_empty_cache()
    _trim_malloc()


def _trim_malloc() -> None:
    # glibc keeps freed blocks of a finished training in its arenas; hand them back to the OS.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def training_scope():
    """Grad mode on (ComfyUI runs nodes under inference_mode), and on any exit, including a
    cancel, drop the frames that still reference the trainer's models, then free memory."""
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    except BaseException as exc:  # InterruptProcessingException is a BaseException on newest ComfyUI
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        release_memory()
