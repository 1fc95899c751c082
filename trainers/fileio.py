"""Atomic, no-clobber writing of safetensors files.

Every model file of the pack is written to a temporary name in the destination folder and then
moved into place, so a crash, a cancel or a full disk never leaves a partial model where ComfyUI
would list it. Existing files are kept unless the caller asks to overwrite them.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Return a copy of ``metadata``, raising TypeError unless every key and value is a str."""
    if metadata is None:
        return {}
    bad = [key for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str)]
    if bad:
        raise TypeError(
            f"safetensors metadata must map str to str; convert these entries with str() or json.dumps(): {bad}"
        )
    return dict(metadata)


def refuse_existing(path: Path, overwrite: bool) -> None:
    if not overwrite and path.exists():
        raise FileExistsError(
            f"{path} already exists; choose another output name or pass overwrite=True to replace it"
        )


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``tensors`` to ``path`` atomically; returns the path.

    Raises FileExistsError if ``path`` exists and ``overwrite`` is false (also when another
    process creates it while this one writes). On any error nothing is left behind.
    """
    from safetensors.torch import save_file

    path = Path(path)
    metadata = check_metadata(metadata)
    refuse_existing(path, overwrite)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")

    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(dict(tensors), str(tmp), metadata=metadata or None)
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if the name was taken meanwhile: never clobbers
            except FileExistsError:
                raise FileExistsError(
                    f"{path} was created by someone else while writing; choose another output name"
                ) from None
            except OSError:  # no hard links on this file system
                refuse_existing(path, overwrite)
                os.replace(tmp, path)
            tmp.unlink(missing_ok=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    logger.debug("wrote %s (%d tensors)", path, len(tensors))
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 16 * 1024 * 1024) -> str:
    """SHA-256 hex digest of a file's bytes (a base-model fingerprint; ~2-5 s for an SD1.5 file)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()
