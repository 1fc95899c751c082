"""Atomic, no-clobber writing of safetensors files.

Every model file of the pack is written to a temporary name in the destination folder and then
moved into place, so a crash, a cancel or a full disk never leaves a partial model where ComfyUI
would list it. Existing files are kept unless the caller asks to overwrite them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Every temporary file or folder the pack writes is named ".<final name>.dbs-<pid>-<random>.tmp"
# (hidden, never listed by ComfyUI). The writing process's id in the name tells a later sweep
# which leftovers are stale (their process is gone) without touching anyone else's files.
TEMP_MARK = ".dbs-"
TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\..+\.dbs-(\d+)-[0-9a-z_]{8}\.tmp$", re.DOTALL)


def temp_path(final: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``final``, recognisable by :func:`stale_temp` (not created)."""
    final = Path(final)
    token = "".join(secrets.choice("0123456789abcdefghijklmnopqrstuvwxyz") for _ in range(8))
    return final.with_name(f".{final.name}{TEMP_MARK}{os.getpid()}-{token}{TEMP_SUFFIX}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists (someone else's process), or cannot tell: keep its files
    return True


def writer_gone(pid: int) -> bool:
    """Whether the process that wrote a temporary file is gone: it no longer runs, or it is this
    very process (asked at start-up, before this process wrote anything)."""
    return pid == os.getpid() or not _process_alive(pid)


def stale_temp(name: str) -> bool:
    """True for a temporary name of this pack whose writer is gone (see :func:`writer_gone`)."""
    match = _TEMP_NAME.match(name)
    return bool(match) and writer_gone(int(match.group(1)))


def sweep_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove this pack's stale temporary files and folders directly in ``folder`` (nothing
    else); returns what was removed. Call at start-up, before this process writes anything."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not stale_temp(entry.name):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as exc:
            logger.warning("could not remove stale temporary %s: %s", entry.name, exc.strerror)
            continue
        removed.append(entry)
    return removed


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


_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _describe(tensors: Mapping[str, torch.Tensor], name: str) -> tuple[torch.dtype, tuple[int, ...]]:
    """A tensor's dtype and shape; a mapping that makes its tensors when read (a cast view of a
    model) tells them without making one."""
    if hasattr(tensors, "dtype_of") and hasattr(tensors, "shape_of"):
        return tensors.dtype_of(name), tuple(tensors.shape_of(name))
    tensor = tensors[name]
    return tensor.dtype, tuple(tensor.shape)


def write_safetensors(tensors: Mapping[str, torch.Tensor], handle, metadata: Mapping[str, str] | None) -> None:
    """Serialise in the safetensors format with keys, metadata and data in sorted order, so the
    same tensors and metadata always give the same bytes (the reference writer orders metadata
    at random). Tensors are streamed one by one: no second copy of a 2 GB checkpoint in memory."""
    names = sorted(tensors)
    header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name in names:
        dtype, shape = _describe(tensors, name)
        if dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {name} has dtype {dtype}, which this writer does not store")
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format aligns the data start to 8 bytes
    handle.write(struct.pack("<Q", len(raw)))
    handle.write(raw)
    for name in names:
        flat = tensors[name].detach().to("cpu").contiguous().reshape(-1)
        handle.write(memoryview(flat.view(torch.uint8).numpy()))


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
    path = Path(path)
    metadata = check_metadata(metadata)
    refuse_existing(path, overwrite)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")

    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as handle:
            write_safetensors(tensors, handle, metadata)
            handle.flush()
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
    fsync_dir(path.parent)
    logger.debug("wrote %s (%d tensors)", path, len(tensors))
    return path


def atomic_copy(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Copy ``source`` to ``path`` (which must not exist) through a temporary name, fsynced, so
    ``path`` is never seen half-written; raises FileExistsError if it is taken meanwhile."""
    path = Path(path)
    refuse_existing(path, False)
    tmp = temp_path(path)
    try:
        with open(source, "rb") as reader, open(tmp, "xb") as handle:
            shutil.copyfileobj(reader, handle, 16 * 1024 * 1024)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary name, fsynced and renamed into place
    (replacing what was there): ``path`` is never seen half-written. For small files the pack
    owns (sample images, their index), not models."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def fsync_dir(folder: Path) -> None:
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
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def content_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a base model's content: a file's bytes, or for a folder (a diffusers model) its
    files' relative names and hashes, in name order (hidden files left out). Each file's hash is
    remembered per (path, size, mtime) for this process, so a sweep hashes a model once."""
    path = Path(path)
    if not path.is_dir():
        return _memo_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts):
            continue
        digest.update(f"{relative.as_posix()}\0{_memo_sha256(file)}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _memo_sha256(path: Path) -> str:
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASH_MEMO:
        _HASH_MEMO[key] = sha256_file(path)
    return _HASH_MEMO[key]
