"""Saving a trained model so that a finished run is never thrown away.

Every file a run writes (today the final model; periodic step files use the same path) goes
through :func:`save_safely`. The write itself is atomic (``fileio``): a failure leaves no partial
file. What happens when it fails after training:

- The weights do not fit the save precision (fp16 overflows above 65504): saved in bf16 (same
  size, fp32's range) or, from bf16, in fp32.
- The output name was taken by another file while training: saved under the next free name
  ``<stem>-1.safetensors``, ``-2``, ... beside it. A file this run was allowed to replace is
  replaced only if it is still the very file that was checked before training.
- The folder cannot take the file (disk full, quota, read-only, permissions): saved in the
  ``rescue`` folder instead (the caller picks one on another part of the disk it owns).
- Nothing works: :class:`SaveFailed`, whose message says what was tried and how much space is
  needed. The caller may keep the weights to save them later (the ComfyUI nodes do).

Each fallback adds a note saying where the file went; the job shows it in its report.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

WIDER = {"fp16": "bf16", "bf16": "fp32"}  # a precision with more range, same or double size


class PrecisionOverflow(ValueError):
    """Trained weights that are finite in fp32 but not in the save precision."""

    def __init__(self, message: str, precision: str):
        super().__init__(message)
        self.precision = precision


class SaveFailed(OSError):
    """Training finished but its file could not be written anywhere."""


class NotEnoughSpace(OSError):
    """A folder has less free space than a run will need (checked before training)."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


@dataclass(frozen=True)
class FileIdentity:
    """Which file is at a path (so a replace never hits a file that appeared meanwhile)."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class Saved:
    path: Path
    precision: str
    notes: list[str] = field(default_factory=list)


# write(path, precision, overwrite) -> path; raises PrecisionOverflow, FileExistsError, OSError
Writer = Callable[[Path, str, bool], Path]


def free_name(path: Path) -> Path:
    """``path`` if nothing is there, else the first free ``<stem>-<n><suffix>`` beside it."""
    if not path.exists():
        return path
    for n in range(1, 10_000):
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        if not candidate.exists():
            return candidate
    raise FileExistsError(f"no free name like {path.name} in its folder")


def human_bytes(count: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"


def free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def check_free_space(needs: list[tuple[Path, int, str]], shown: Callable[[Path], str] = str) -> None:
    """Raise NotEnoughSpace when a folder cannot take what a run will write there. ``needs`` is
    (folder, bytes, what) per output; outputs on one file system are added up."""
    per_device: dict[int, tuple[Path, int, list[str]]] = {}
    for folder, size, what in needs:
        try:
            device = os.stat(folder).st_dev
        except OSError:
            continue
        first, total, whats = per_device.get(device, (folder, 0, []))
        per_device[device] = (first, total + size, whats + [f"{what} (about {human_bytes(size)})"])
    for folder, total, whats in per_device.values():
        free = free_bytes(folder)
        if free is not None and free < total:
            raise NotEnoughSpace(
                f"not enough free space in {shown(folder)}: {human_bytes(free)} free, this run needs about "
                f"{human_bytes(total)} for {' and '.join(whats)}. Free some space there (or choose a smaller "
                f"save precision) and run again; nothing was trained.")


def _writable_problem(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                         errno.EIO, errno.ENOENT) or isinstance(exc, (PermissionError, FileNotFoundError))


def save_safely(write: Writer, output: Path, precision: str, *, replace: FileIdentity | None = None,
                rescue: Path | None = None, size_hint: int = 0,
                shown: Callable[[Path], str] = str) -> Saved:
    """Write a trained model at ``output`` in ``precision`` with the fallbacks of the module
    docstring; returns where it went. ``replace`` is the file at ``output`` that may be replaced
    (checked before training); anything else there is kept. ``shown`` renders a folder for
    messages (the nodes name folders relative to ComfyUI's)."""
    notes: list[str] = []
    path, tried_rescue, failures = output, False, []
    for _ in range(8):
        overwrite = replace is not None and path == output and FileIdentity.of(path) == replace
        try:
            written = write(path, precision, overwrite)
            for note in notes:
                log.warning("%s", note)
            return Saved(written, precision, notes)
        except PrecisionOverflow:
            if precision not in WIDER:
                raise
            size = "the same size" if precision == "fp16" else "twice the size"
            notes.append(f"the trained weights do not fit {precision} (some values are beyond its range); saved in "
                         f"{WIDER[precision]} instead ({size}; ComfyUI loads it the same way)")
            precision = WIDER[precision]
        except FileExistsError:
            taken = path
            path = free_name(path.with_name(output.name))
            notes.append(f"{taken.name} in {shown(taken.parent)} was taken by another file during training; "
                         f"saved as {path.name} instead")
        except OSError as exc:
            if not _writable_problem(exc) or tried_rescue:
                failures.append(f"{shown(path.parent)}: {exc.strerror or exc}")
                break
            failures.append(f"{shown(path.parent)}: {exc.strerror or exc}")
            if rescue is None:
                break
            try:
                rescue.mkdir(parents=True, exist_ok=True)
            except OSError as mk:
                failures.append(f"{shown(rescue)}: {mk.strerror or mk}")
                break
            tried_rescue = True
            free = free_bytes(path.parent)
            space = f", {human_bytes(free)} free there" if free is not None and exc.errno == errno.ENOSPC else ""
            path = free_name(rescue / output.name)
            notes.append(f"{output.name} could not be written in {shown(output.parent)} ({exc.strerror or exc}"
                         f"{space}); saved in {shown(rescue)} as {path.name} instead: move it into "
                         f"{shown(output.parent)} when there is room")
    needed = f" It needs about {human_bytes(size_hint)} of free space." if size_hint else ""
    raise SaveFailed(errno.ENOSPC, "training finished but its file could not be written: "
                     + "; ".join(failures) + "." + needed)
