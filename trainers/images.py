"""Reading a folder of subject photos into a SubjectData (first version: centre crop)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from .subject import SubjectData, center_crop_resize

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


class SubjectImageError(ValueError):
    """A subject folder or image that cannot be trained on; the message names it and the fix."""


def check_resolution(resolution: int) -> int:
    if not isinstance(resolution, int) or resolution < 64 or resolution > 2048 or resolution % 64:
        raise SubjectImageError(f"resolution must be a multiple of 64 between 64 and 2048 (got {resolution!r})")
    return resolution


def list_subject_files(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in `folder`, sorted by name; links that leave the folder are refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SubjectImageError(f"subject folder {str(folder)!r} does not exist")
    root = os.path.realpath(folder)
    files = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith(".") or entry.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        real = os.path.realpath(entry)
        if not real.startswith(root + os.sep):
            raise SubjectImageError(f"{entry.name}: resolves outside the subject folder; remove the link")
        if entry.is_file():
            files.append(entry)
    return files


def read_image(path: Path) -> torch.Tensor:
    """Fully decoded RGB image, EXIF orientation applied, as HxWx3 float32 in [0, 1]."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.load()  # full decode: truncated files fail here, not later
        im = ImageOps.exif_transpose(im).convert("RGB")
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)


def build_subject(images: list[torch.Tensor], names: list[str], instance_prompt: str,
                  class_prompt: str = "", resolution: int = 512, flip: bool = False,
                  captions: list[str] | None = None) -> SubjectData:
    """Centre-crop decoded HxWx3 images to `resolution`; captions default to the instance prompt."""
    check_resolution(resolution)
    prompt = instance_prompt.strip()
    if not prompt:
        raise SubjectImageError("instance prompt is empty: describe the subject, e.g. 'a photo of sks dog'")
    if not images:
        raise SubjectImageError("no subject images: give 3-20 photos of the subject")
    crops = tuple(center_crop_resize(img.float().cpu(), resolution) for img in images)
    captions = [c.strip() or prompt for c in captions] if captions else [prompt] * len(crops)
    return SubjectData(images=crops, captions=tuple(captions), instance_prompt=prompt,
                       class_prompt=class_prompt.strip(), resolution=resolution,
                       source_names=tuple(names), flip=flip)


def load_subject_folder(folder: str | os.PathLike, instance_prompt: str, class_prompt: str = "",
                        resolution: int = 512, max_images: int = 0, flip: bool = False,
                        sidecar_captions: bool = False) -> SubjectData:
    """All images of `folder`, centre-cropped to `resolution`, captioned with the instance prompt
    (or, with `sidecar_captions`, the text of `<image stem>.txt` where that file exists).

    Unreadable files stop the load with an error that lists each of them by name.
    """
    check_resolution(resolution)
    if not instance_prompt.strip():
        raise SubjectImageError("instance prompt is empty: describe the subject, e.g. 'a photo of sks dog'")
    files = list_subject_files(folder)
    if max_images > 0:
        files = files[:max_images]
    if not files:
        raise SubjectImageError(
            f"no images in {str(folder)!r}: put 3-20 photos (.png/.jpg/.webp) of the subject there")
    images, bad = [], []
    for path in files:
        try:
            images.append(read_image(path))
        except Exception as exc:  # PIL raises many types for broken files
            bad.append(f"{path.name} ({type(exc).__name__}: {exc})")
    if bad:
        raise SubjectImageError("unreadable image files in the subject folder, remove or replace them: "
                                + "; ".join(bad))
    captions = None
    if sidecar_captions:
        captions = [p.with_suffix(".txt").read_text(encoding="utf-8") if p.with_suffix(".txt").is_file()
                    else "" for p in files]
    return build_subject(images, [p.name for p in files], instance_prompt, class_prompt, resolution, flip,
                         captions)


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """Changes when a file in the folder is added, removed or modified."""
    import hashlib

    digest = hashlib.sha256()
    for entry in sorted(Path(folder).iterdir(), key=lambda p: p.name) if Path(folder).is_dir() else []:
        try:
            st = entry.stat()
        except OSError:
            continue
        digest.update(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()
