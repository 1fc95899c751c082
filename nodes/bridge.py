"""What every node of the pack needs from ComfyUI: folders, widgets built from the engine's
config metadata, progress/cancel adapted to trainer callbacks, and freeing memory."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
import traceback
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..trainers.data.class_images import sweep_class_cache
from ..trainers.files.fileio import sweep_stale_temps
from ..trainers.training.callbacks import LossHistory, TrainingCallbacks
from ..trainers.training.config import field_spec, field_specs
from ..trainers.training.state import sweep_states

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


def output_model_path(kind: str, stem: str, create: bool = True) -> Path:
    """Where a new model file `<stem>.safetensors` goes: the first folder ComfyUI lists for `kind`."""
    folder = Path(folder_paths.get_folder_paths(kind)[0])
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.safetensors"
    if not contained(path, folder):
        raise ValueError(f"output name {stem!r} would be written outside models/{kind}")
    return path


NO_FOLDER = "(no subfolder in input/)"


def input_subfolders(max_depth: int = 3) -> list[str]:
    """Subfolders of ComfyUI's input directory, as relative posix paths (e.g. 'subjects/cat')."""
    root = Path(folder_paths.get_input_directory())
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if len(rel.parts) >= max_depth:
            dirnames[:] = []
        if rel.parts:
            found.append(rel.as_posix())
    return found or [NO_FOLDER]


def resolve_input_folder(name: str) -> Path:
    root = folder_paths.get_input_directory()
    if name == NO_FOLDER:
        raise ValueError("no subject folder: create input/<name>/ with 3-20 photos, or connect an IMAGE batch")
    path = Path(root) / name
    if not contained(path, root):
        raise ValueError(f"folder {name!r} is outside ComfyUI's input directory")
    if not path.is_dir():
        raise ValueError(f"folder {name!r} not found in ComfyUI's input directory: refresh the page")
    return path


# -- widgets from the engine's dataclass metadata ------------------------------------------------
def config_input(config_cls, name: str, tooltip: str | None = None, optional: bool = False,
                 **overrides) -> io.Input:
    """One widget for field `name` of a trainers config dataclass: default, bounds, choices and
    help text all come from `config.field_spec`, so the node and the engine can't disagree."""
    spec = {**field_spec(config_cls, name), **overrides}
    common = {"tooltip": tooltip or spec["help"], "optional": optional}
    low = spec.get("min")
    if "zero_means" in spec and (low or 0) > 0:
        low = 0  # 0 is allowed too ("off"); the config says what it means
    if "choices" in spec:
        return io.Combo.Input(name, options=list(spec["choices"]), default=spec["default"], **common)
    if spec["type"] == "bool":
        return io.Boolean.Input(name, default=spec["default"], **common)
    if spec["type"] == "int":
        # A training seed must not change by itself after each run (the frontend would add a
        # "randomize" control to any input named seed), or every run would retrain.
        return io.Int.Input(name, default=spec["default"], min=low, max=spec.get("max"), step=spec.get("step", 1),
                            control_after_generate=False if "seed" in name else None, **common)
    if spec["type"] == "float":
        return io.Float.Input(name, default=spec["default"], min=low, max=spec.get("max"),
                              step=spec.get("step", 1e-6), round=False, **common)
    return io.String.Input(name, default=spec["default"], **common)


def config_kwargs(config_cls, values: dict) -> dict:
    names = {spec["name"] for spec in field_specs(config_cls)}
    return {k: v for k, v in values.items() if k in names}


# -- progress, cancel, memory --------------------------------------------------------------------
class ComfyProgress(TrainingCallbacks):
    """Trainer callbacks -> ComfyUI progress bar (websocket `progress` events) and cancel check.

    Cancel is checked explicitly before each UNet block of a step's forward pass and after every
    step: newest ComfyUI throttles the progress hook that would otherwise do it. `preview` (optional) makes a PIL image of the run so far from its
    `history` (a LossHistory); it is sent as the node's live preview at most every
    `preview_every` seconds. Class-image generation, when a run has it, reports its denoising
    steps on the same bar before training starts.
    """

    def __init__(self, total: int, preview=None, preview_every: float = 2.0):
        super().__init__()
        self.bar = comfy.utils.ProgressBar(total)
        self.preview = preview
        self.preview_every = preview_every
        self._last_preview = 0.0
        self.history = LossHistory()

    def on_generate_step(self, done: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.bar.update_absolute(done, total)

    def on_train_begin(self, total_steps: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()

    def check_cancel(self) -> None:  # within a step: a cancel stops before the step's next UNet block
        comfy.model_management.throw_exception_if_processing_interrupted()

    def on_step_end(self, state) -> None:
        self.history.add(state)
        comfy.model_management.throw_exception_if_processing_interrupted()
        image = None
        now = time.monotonic()
        if self.preview is not None and (now - self._last_preview >= self.preview_every
                                         or state.step == state.total_steps):
            self._last_preview = now
            image = ("PNG", self.preview(self.history), 512)
        self.bar.update_absolute(state.step, state.total_steps, image)


def pack_data_dir() -> Path:
    """models/dreambooth_studio/: the pack's own server-side data (class images, training states).
    Not a model list, and nothing under it can be written through ComfyUI's HTTP API (unlike
    input/, which /upload/image writes, or user/, which /userdata writes)."""
    return Path(folder_paths.models_dir) / "dreambooth_studio"


def class_image_cache() -> Path:
    """Generated class images: models/dreambooth_studio/class_images/<prompt>-<res>px-<count>-<key>/,
    found again by every run of a sweep and checked file by file against their manifest."""
    return pack_data_dir() / "class_images"


def state_root() -> Path:
    """Training states to resume from, one folder per job fingerprint (not a model list)."""
    return pack_data_dir() / "states"


def rescue_dir() -> Path:
    """Where a finished run goes when its models/ folder cannot take the file (disk full, read-only)."""
    return pack_data_dir() / "rescued"


def shown(path: str | os.PathLike) -> str:
    """A server path as the user knows it: relative to ComfyUI's folders (``models/loras``,
    ``input/cats``), never the absolute path (errors reach /history, readable by anyone)."""
    real = os.path.realpath(path)
    roots = [(folder_paths.models_dir, "models"), (folder_paths.get_input_directory(), "input"),
             (folder_paths.get_output_directory(), "output"), (folder_paths.get_temp_directory(), "temp"),
             (folder_paths.get_user_directory(), "user")]
    for kind in ("checkpoints", "loras"):
        roots += [(root, f"models/{kind}") for root in folder_paths.get_folder_paths(kind)]
    best = None
    for root, name in roots:
        root = os.path.realpath(root)
        if real == root or real.startswith(root + os.sep):
            if best is None or len(root) > len(best[0]):
                best = (root, name)
    if best is None:
        return Path(path).name or "(a folder outside ComfyUI)"
    rest = os.path.relpath(real, best[0])
    return best[1] if rest == "." else f"{best[1]}/{Path(rest).as_posix()}"


def without_server_paths(text: str) -> str:
    """``text`` with every absolute path under ComfyUI's folders replaced by its :func:`shown` form."""
    roots = {folder_paths.models_dir, folder_paths.get_input_directory(), folder_paths.get_output_directory(),
             folder_paths.get_temp_directory(), folder_paths.get_user_directory(), folder_paths.base_path}
    for kind in ("checkpoints", "loras"):
        roots.update(folder_paths.get_folder_paths(kind))
    spellings = {spelling for root in roots for spelling in (root, os.path.realpath(root))}
    base = {folder_paths.base_path, os.path.realpath(folder_paths.base_path)}
    for spelling in sorted(spellings, key=len, reverse=True):  # longest first: models/loras before models
        if spelling and spelling in text:
            text = text.replace(spelling, "ComfyUI" if spelling in base else shown(spelling))
    return text


@contextlib.contextmanager
def user_facing_errors():
    """Re-raise a node's error with ComfyUI's folders named relatively (cancel passes untouched)."""
    try:
        yield
    except Exception as exc:
        if "Interrupt" in type(exc).__name__:
            raise
        text = str(exc.strerror if isinstance(exc, OSError) and exc.strerror and not exc.filename else exc)
        clean = without_server_paths(text)
        if isinstance(exc, OSError) and exc.filename:
            clean = without_server_paths(f"{exc.strerror}: {exc.filename}")
        if clean == str(exc):
            raise
        try:
            replacement = type(exc)(clean)
        except Exception:
            replacement = RuntimeError(clean)
        raise replacement from None


def sweep_stale_files() -> list[Path]:
    """At start-up: remove this pack's temporary files left by a process that died while writing
    (a killed save leaves a hidden 2-4 GB file otherwise). Only names this pack creates."""
    removed = []
    for kind in ("checkpoints", "loras"):
        for folder in folder_paths.get_folder_paths(kind):
            removed += sweep_stale_temps(folder)
    removed += sweep_stale_temps(rescue_dir())
    removed += sweep_class_cache(class_image_cache())
    removed += sweep_states(state_root())
    for kind in ("checkpoints", "loras"):  # step files of each run live in a subfolder
        for folder in folder_paths.get_folder_paths(kind):
            for sub in (entry for entry in Path(folder).glob("*/") if entry.is_dir() and not entry.is_symlink()):
                removed += sweep_stale_temps(sub)
    for path in removed:
        log.info("removed stale temporary file %s/%s", shown(path.parent), path.name)
    return removed


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
