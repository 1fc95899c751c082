"""Training states on disk: what a run needs to continue exactly where it stopped.

A state is a folder ``<root>/step-<NNNNNNN>/`` holding

- ``tensors.safetensors``: the trainable weights, the optimizer's moments, the data generator's
  state (safetensors, never a pickle);
- ``state.json``: everything else (step, optimizer and LR-schedule settings, grad-scaler state,
  the images not yet used in the current epoch, the loss history with its validation points, the
  job's description);
- ``manifest.json``, written last: the job fingerprint, the step and each file's size and sha256.

The folder is built under a temporary name (``fileio.temp_path``: a killed writer's leftovers are
swept later), every file fsynced, and renamed into place in one step; only a folder whose
manifest verifies is ever read back, so a state is either complete or ignored. After a new state
is in place, older ones are removed (``keep`` newest).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..files.fileio import fsync_dir, sweep_stale_temps, temp_path, write_safetensors
from .callbacks import LossHistory
from .loop import LoopState

log = logging.getLogger(__name__)

TENSORS = "tensors.safetensors"
DATA = "state.json"
MANIFEST = "manifest.json"
FORMAT = 1
_STEP_FOLDER = re.compile(r"^step-(\d{7,})$")


def _flatten(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """JSON-able copy of ``value`` with every tensor moved to ``tensors`` (under ``path``)."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().to("cpu").contiguous()
        return {"__tensor__": path}
    if isinstance(value, dict):
        return {"__items__": [[_flatten(k, tensors, f"{path}.k{i}"), _flatten(v, tensors, f"{path}.{i}")]
                              for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, tuple):
        return {"__tuple__": [_flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a training state cannot hold a {type(value).__name__} (at {path})")


def _unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__items__" in value:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in value["__items__"]}
        if "__tuple__" in value:
            return tuple(_unflatten(v, tensors) for v in value["__tuple__"])
        raise ValueError("unknown entry in a training state")
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    return value


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(16 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def _write_file(path: Path, write) -> None:
    with open(path, "xb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def write_state(root: str | os.PathLike, state: LoopState, fingerprint: str, job: dict[str, Any],
                keep: int = 1) -> Path:
    """Write ``state`` of the job with ``fingerprint`` under ``root``; returns its folder. On any
    error nothing half-written stays visible (the temporary folder is removed)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:07d}"
    tmp = temp_path(final)
    tensors: dict[str, torch.Tensor] = {}
    data = {
        "format": FORMAT,
        "step": state.step,
        "parameters": _flatten(state.parameters, tensors, "param"),
        "optimizer": _flatten(state.optimizer, tensors, "optimizer"),
        "lr_scheduler": _flatten(state.lr_scheduler, tensors, "lr_scheduler"),
        "grad_scaler": _flatten(state.grad_scaler, tensors, "grad_scaler"),
        "generator": _flatten(state.generator, tensors, "generator"),
        "pending": state.pending,
        "average": _flatten(state.average, tensors, "average"),
        "history": [state.history.losses, state.history.instance_losses, state.history.prior_losses],
        "validation": [[step, loss] for step, loss in state.history.validation],
        "job": job,
    }
    try:
        tmp.mkdir()
        _write_file(tmp / TENSORS, lambda handle: write_safetensors(tensors, handle, None))
        _write_file(tmp / DATA, lambda handle: handle.write(json.dumps(data, sort_keys=True).encode("utf-8")))
        manifest = {"format": FORMAT, "fingerprint": fingerprint, "step": state.step,
                    "files": {name: {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                              for name in (TENSORS, DATA)}}
        _write_file(tmp / MANIFEST, lambda handle: handle.write(json.dumps(manifest, sort_keys=True).encode("utf-8")))
        fsync_dir(tmp)
        if final.exists():  # the same step written before (a resumed run): replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root)
    for older in complete_steps(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(root / f"step-{older:07d}", ignore_errors=True)
    log.info("training state of step %d written (%.1f MB)", state.step,
             sum(p.stat().st_size for p in final.iterdir()) / 1e6)
    return final


def complete_steps(root: str | os.PathLike) -> list[int]:
    """Steps of the state folders under ``root`` (by name, oldest first; not yet verified)."""
    try:
        names = [entry.name for entry in Path(root).iterdir() if entry.is_dir()]
    except OSError:
        return []
    return sorted(int(m.group(1)) for m in map(_STEP_FOLDER.match, names) if m)


def _verified(folder: Path, fingerprint: str) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT or manifest.get("fingerprint") != fingerprint:
            return False
        for name in (TENSORS, DATA):
            entry = manifest["files"][name]
            path = folder / name
            if path.is_symlink() or path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def newest_state(root: str | os.PathLike, fingerprint: str) -> tuple[LoopState, Path] | None:
    """The newest state under ``root`` whose manifest verifies and names ``fingerprint``, or None."""
    from safetensors.torch import load_file

    root = Path(root)
    for step in reversed(complete_steps(root)):
        folder = root / f"step-{step:07d}"
        if not _verified(folder, fingerprint):
            log.warning("training state %s is incomplete or damaged: not used", folder.name)
            continue
        tensors = load_file(str(folder / TENSORS))
        data = json.loads((folder / DATA).read_text(encoding="utf-8"))
        history = LossHistory(*[[float(v) for v in curve] for curve in data["history"]],
                              validation=[(int(step), float(loss)) for step, loss in data.get("validation", [])])
        return LoopState(
            step=int(data["step"]),
            parameters=_unflatten(data["parameters"], tensors),
            optimizer=_unflatten(data["optimizer"], tensors),
            lr_scheduler=_unflatten(data["lr_scheduler"], tensors),
            grad_scaler=_unflatten(data["grad_scaler"], tensors),
            generator=_unflatten(data["generator"], tensors),
            pending=[[int(i) for i in stream] for stream in data["pending"]],
            history=history,
            average=_unflatten(data.get("average"), tensors),
        ), folder
    return None


def sweep_states(root: str | os.PathLike) -> list[Path]:
    """Remove temporary state folders of processes that died while writing them (in every job's
    folder under ``root``); complete states are kept for resuming."""
    root = Path(root)
    removed: list[Path] = []
    try:
        jobs = [entry for entry in root.iterdir() if entry.is_dir() and not entry.is_symlink()]
    except OSError:
        return removed
    for folder in jobs:
        removed += sweep_stale_temps(folder)
    return removed
