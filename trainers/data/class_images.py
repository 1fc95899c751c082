"""Class images for prior preservation: generated once from the base model, cached, reused.

DreamBooth's prior-preservation loss trains on images of the subject's *class* ("a photo of woman
face") made by the base model itself, so fine-tuning on a few photos does not make the model
forget what the class looks like. Generating them is the slow part of a run, and a sweep
(learning rates, ranks, seeds) needs the very same set every time, so:

- :class:`ClassImageSpec` says exactly what a set is: base-model content hash, class prompt,
  count, resolution, seed, sampling steps and guidance. Its :meth:`~ClassImageSpec.key` names the
  set folder ``<cache>/<prompt slug>-<res>px-<count>-<key[:12]>/``.
- The set folder holds ``class_00000.png`` ... and a manifest (``class_images.json``: the spec,
  its key and every image's sha256 and size). Only files that match their manifest entry are
  ever trained on or kept; anything changed, missing or unlisted is generated again (or, for an
  unlisted image file, removed). The cache must live where only the server writes (the nodes
  use ``models/dreambooth_studio/class_images``, never ``input/``, which ``/upload/image``
  fills): the manifest protects against damage and half-done work, not against a writer who
  can forge the manifest too.
- :func:`generate_class_images` runs a diffusers ``StableDiffusionPipeline`` on the components
  already loaded for training (no second copy), in batches of fixed image indices with one
  generator per image, so an image's bytes depend only on the spec and its index. Each image is
  written under a per-process temporary name, fsynced and renamed into place; the manifest is
  rewritten the same way after every batch. A cancelled or killed generation therefore leaves
  whole, listed images that the next run keeps (it generates only what is missing), and two
  processes generating the same set at once write identical bytes over each other and each end
  with the complete set: nobody deletes a folder another process uses.
- :func:`find_class_images` finds a complete, verified cached set; :func:`sweep_class_cache`
  removes temporary files of processes that died while writing.
- :func:`plan_prior` decides, before any model loads, which class images a run trains with
  (a user's folder, a cached set, or a set still to generate) and checks the inputs and that the
  cache folder is usable; :func:`realize_prior` generates what is missing with the loaded base
  model and returns the verified images as a :class:`~trainers.data.subject.SubjectData`
  captioned with the class prompt.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files.fileio import fsync_dir, sweep_stale_temps, temp_path, writer_gone
from ..sd15.checkpoint import SD15Components
from .images import IMAGE_SUFFIXES, load_subject, max_images_at
from .subject import SubjectData

logger = logging.getLogger(__name__)

# Bump when generation changes what an identical spec produces (invalidates every cached set).
CLASS_ENGINE_VERSION = "1"
MANIFEST = "class_images.json"
# 1: image names only (no longer trusted: its images are checked by nothing); 2: sha256 and size.
MANIFEST_FORMAT = 2
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
GENERATE_BATCH = 4
# How often a set is filled again when its files keep changing under us (another process on
# another device writing different bytes for the same image) before giving up with an error.
FILL_ROUNDS = 3
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Temporary set folders of versions before manifest format 2: ".partial-<key[:12]>-<pid>".
_LEGACY_PARTIAL = re.compile(r"^\.partial-[0-9a-f]{12}-(\d+)$")


class ClassCacheError(OSError):
    """The class-image cache cannot be used; the message names the folder as the user knows it
    (``models/dreambooth_studio/class_images/...``) and says what to do."""


def default_class_cache() -> Path:
    """Where the command line keeps generated class images: $XDG_CACHE_HOME or ~/.cache."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "dreambooth_studio" / "class_images"


def shown_in_cache(path: str | os.PathLike, cache_dir: str | os.PathLike) -> str:
    """``path`` named from two folders above the cache (``models/dreambooth_studio/class_images/<set>``
    for the nodes, ``.cache/dreambooth_studio/class_images/<set>`` for the command line): errors
    reach ComfyUI's /history, which anyone can read, so never the absolute server path."""
    cache = Path(os.path.abspath(cache_dir))
    anchor = cache.parents[min(2, len(cache.parents) - 1)] if cache.parents else cache
    try:
        return Path(os.path.abspath(path)).relative_to(anchor).as_posix()
    except ValueError:
        return Path(path).name


@dataclass(frozen=True)
class ClassImageSpec:
    """Everything that determines a generated class-image set."""

    base_fingerprint: str  # sha256 of the base checkpoint file
    prompt: str
    count: int
    resolution: int
    seed: int = 0
    steps: int = 25
    guidance: float = 7.5
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ValueError(
                "the class prompt is empty: prior preservation needs one (e.g. 'a photo of woman face'); set it "
                "on Load Subject Images or turn prior preservation off (class_images 0)"
            )
        if self.count < 1:
            raise ValueError(f"class image count must be at least 1, got {self.count}")
        if self.resolution % 64 or self.resolution < 64:
            raise ValueError(f"class image resolution must be a multiple of 64, got {self.resolution}")

    def key(self) -> str:
        payload = {"engine": CLASS_ENGINE_VERSION, **asdict(self)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()

    def folder_name(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "_", self.prompt.lower()).strip("_")[:40] or "class"
        return f"{slug}-{self.resolution}px-{self.count}-{self.key()[:12]}"

    def image_names(self) -> list[str]:
        return [f"class_{i:05d}.png" for i in range(self.count)]

    def max_image_bytes(self) -> int:
        """More than any 8-bit RGB PNG of this size takes (raw pixels plus zlib and chunk overhead)."""
        return 4 * self.resolution * self.resolution + 65536


@dataclass(frozen=True)
class ClassImageSet:
    folder: Path
    generated: int  # images generated by this call (0 when the cached set was reused)
    spec: ClassImageSpec | None = None  # None for a user's own folder
    kept: int = 0  # images already in the cache (an earlier or interrupted run, another process)

    @property
    def reused(self) -> bool:
        return self.generated == 0


# -- the manifest and checking files against it ---------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    name: str
    sha256: str
    size: int

    @classmethod
    def of(cls, name: str, data: bytes) -> _Entry:
        return cls(name, hashlib.sha256(data).hexdigest(), len(data))


def _matching_bytes(path: Path, entry: _Entry) -> bytes | None:
    """The bytes of ``path`` when it is a regular file (not a link) with exactly the size and
    sha256 of ``entry``; None otherwise. Training decodes these very bytes: what was checked is
    what is used, even if the file changes afterwards."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
            return None
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(entry.size + 1)
    except OSError:
        return None
    if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
        return None
    return data


def _manifest_entries(folder: Path, spec: ClassImageSpec) -> dict[int, _Entry]:
    """The image entries (index -> entry) the manifest of ``folder`` records for ``spec``; {} for
    no manifest, an unreadable one, another spec or an older format. Malformed entries are dropped."""
    path = folder / MANIFEST
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MANIFEST_BYTES:
            return {}
        recorded = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(recorded, dict) or recorded.get("format") != MANIFEST_FORMAT \
            or recorded.get("key") != spec.key() or not isinstance(recorded.get("images"), list):
        return {}
    index = {name: i for i, name in enumerate(spec.image_names())}
    entries = {}
    for item in recorded["images"]:
        if not isinstance(item, dict):
            continue
        name, digest, size = item.get("name"), item.get("sha256"), item.get("size")
        if (isinstance(name, str) and name in index and isinstance(digest, str) and _SHA256.fullmatch(digest)
                and type(size) is int and 0 < size <= spec.max_image_bytes()):
            entries[index[name]] = _Entry(name, digest, size)
    return entries


def _verified(folder: Path, entries: dict[int, _Entry], indices: Iterable[int] | None = None) -> dict[int, _Entry]:
    """The ``entries`` (or those of ``indices``) whose file matches them."""
    wanted = entries if indices is None else {i: entries[i] for i in indices if i in entries}
    return {i: entry for i, entry in wanted.items() if _matching_bytes(folder / entry.name, entry) is not None}


@dataclass
class _Survey:
    """What a set folder holds for a spec."""

    verified: dict[int, _Entry]  # images that match their manifest entry
    unverified: list[str]  # images of the set present but unlisted or not matching their entry
    extras: list[str]  # unlisted image files that are no part of the set (never trained on; removed)

    def complete(self, spec: ClassImageSpec) -> bool:
        return len(self.verified) == spec.count and not self.extras


def _survey(folder: Path, spec: ClassImageSpec) -> _Survey:
    if not folder.is_dir():
        return _Survey({}, [], [])
    verified = _verified(folder, _manifest_entries(folder, spec))
    names = {name: i for i, name in enumerate(spec.image_names())}
    unverified, extras = [], []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        entries = []
    for entry in entries:
        name = entry.name
        if name.startswith(".") or name == MANIFEST:  # temporary files (a writer at work) are hidden
            continue
        if name in names:
            if names[name] not in verified:
                unverified.append(name)
        elif Path(name).suffix.lower() in IMAGE_SUFFIXES and not entry.is_dir(follow_symlinks=False):
            extras.append(name)
    return _Survey(verified, unverified, extras)


def _log_survey(folder: Path, spec: ClassImageSpec, survey: _Survey) -> None:
    if survey.unverified:
        logger.warning("class image set %s: %d of %d images do not match its manifest (%s); generating them "
                       "again", folder.name, len(survey.unverified), spec.count, ", ".join(survey.unverified[:5]))
    if survey.extras:
        logger.warning("class image set %s holds image files that are no part of it (%s); removing them",
                       folder.name, ", ".join(survey.extras[:5]))


def find_class_images(cache_dir: str | os.PathLike, spec: ClassImageSpec) -> ClassImageSet | None:
    """The complete cached set for ``spec`` (every image matches the manifest, no stray image
    files), or None."""
    folder = Path(cache_dir) / spec.folder_name()
    survey = _survey(folder, spec)
    _log_survey(folder, spec, survey)
    if not survey.complete(spec):
        return None
    return ClassImageSet(folder=folder, generated=0, spec=spec, kept=spec.count)


def check_class_cache(cache_dir: str | os.PathLike, spec: ClassImageSpec | None = None,
                      writable: bool = True) -> None:
    """Raise ClassCacheError unless ``cache_dir`` (and the set folder of ``spec``) can hold class
    images: every existing part of the path a folder, the folder to write into writable. Creates
    nothing. Runs before any model loads, so a bad cache costs the user nothing."""
    cache = Path(os.path.abspath(cache_dir))

    def shown(path: Path) -> str:
        return shown_in_cache(path, cache)

    try:
        existing = cache
        while not existing.exists():
            if existing.is_symlink():
                raise ClassCacheError(f"{shown(existing)} is a link to nothing where the class image cache "
                                      f"{shown(cache)} needs a folder: remove the link")
            if existing.parent == existing:
                break
            existing = existing.parent
        if not existing.is_dir():
            where = "the class image cache folder" if existing == cache else \
                f"a folder of the class image cache {shown(cache)}"
            raise ClassCacheError(f"{shown(existing)} is a file, but {where} should be there: move or rename "
                                  "that file (generated class images are kept there)")
        target = existing
        if spec is not None and existing == cache:
            folder = cache / spec.folder_name()
            if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
                raise ClassCacheError(f"{shown(folder)} is a file where the class image set should be a folder: "
                                      "move or rename that file")
            if folder.is_dir():
                target = folder
    except OSError as exc:
        if isinstance(exc, ClassCacheError):
            raise
        raise ClassCacheError(f"the class image cache {shown(cache)} cannot be read ({exc.strerror}); check the "
                              "permissions of its folders") from None
    if writable and not os.access(target, os.W_OK | os.X_OK):
        raise ClassCacheError(f"the class image cache folder {shown(target)} is not writable: give the user "
                              "running the server write permission on it, or use a class image folder instead")


def sweep_class_cache(cache_dir: str | os.PathLike) -> list[Path]:
    """Remove what processes that died while generating class images left in ``cache_dir``: this
    pack's temporary files (in the cache and in each set folder) whose writing process is gone,
    and older versions' ``.partial-<key>-<pid>`` folders of gone processes. Nothing else, and
    nothing of a process still running. Returns what was removed. Call at start-up, before this
    process generates anything."""
    cache = Path(cache_dir)
    removed = sweep_stale_temps(cache)
    try:
        entries = sorted(cache.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if entry.is_symlink() or not entry.is_dir():
            continue
        legacy = _LEGACY_PARTIAL.match(entry.name)
        if legacy:
            # The same liveness rule as the current temporary names, through their parser.
            if writer_gone(int(legacy.group(1))):
                shutil.rmtree(entry, ignore_errors=True)
                if not entry.exists():
                    removed.append(entry)
        elif not entry.name.startswith("."):
            removed += sweep_stale_temps(entry)
    return removed


# -- generating ---------------------------------------------------------------------------------


def _pipeline(base: SD15Components) -> Any:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler.from_config(base.noise_scheduler.config)
    pipe = StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=base.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image_seed(seed: int, index: int) -> int:
    digest = hashlib.sha256(f"{seed}:class:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class _Renderer:
    """Runs the pipeline on one batch of image indices and returns each image as PNG bytes.

    Batches are always the same index groups (0-3, 4-7, ...) and each image's initial noise
    comes from its own generator on the CPU, so an image's bytes depend only on the spec and its
    index (on a given device): a resumed run and a concurrent process write the same bytes."""

    def __init__(self, base: SD15Components, spec: ClassImageSpec, on_step: Callable[[int, int], None] | None):
        self.base, self.spec, self.on_step = base, spec, on_step
        self.pipe: Any = None
        self.done = self.total = 0

    def _step_end(self, _pipe: Any, _step: int, _timestep: Any, kwargs: dict) -> dict:
        self.done += 1
        if self.on_step is not None:
            self.on_step(self.done, self.total)
        return kwargs

    def __call__(self, batch: list[int]) -> list[bytes]:
        from PIL import Image

        spec = self.spec
        if self.pipe is None:
            self.pipe = _pipeline(self.base)
        parameter = next(self.base.unet.parameters())
        generators = [torch.Generator().manual_seed(_image_seed(spec.seed, i)) for i in batch]
        latents = torch.stack(
            [torch.randn((4, spec.resolution // 8, spec.resolution // 8), generator=g) for g in generators]
        ).to(parameter.device, parameter.dtype)
        with torch.no_grad():
            result = self.pipe(
                prompt=[spec.prompt] * len(batch),
                negative_prompt=[spec.negative_prompt] * len(batch) if spec.negative_prompt else None,
                height=spec.resolution,
                width=spec.resolution,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance,
                latents=latents,
                output_type="np",
                callback_on_step_end=self._step_end,
            )
        images = []
        for array in result.images:
            buffer = io.BytesIO()
            Image.fromarray((array.clip(0, 1) * 255).round().astype("uint8")).save(buffer, format="PNG")
            images.append(buffer.getvalue())
        return images


class _SetWriter:
    """Fills one set folder: images and manifest each written under this process's temporary
    name, fsynced and renamed into place. Never removes a file another writer may be using."""

    def __init__(self, cache_dir: Path, spec: ClassImageSpec, verified: dict[int, _Entry]):
        self.cache_dir, self.spec, self.verified = cache_dir, spec, verified
        self.folder = cache_dir / spec.folder_name()

    def shown(self, path: Path) -> str:
        return shown_in_cache(path, self.cache_dir)

    def _write(self, name: str, data: bytes) -> _Entry:
        final = self.folder / name
        try:
            if not self.folder.is_dir():  # made on the first image: a cancel before it leaves nothing
                self.folder.mkdir(parents=True, exist_ok=True)
                fsync_dir(self.folder.parent)
            tmp = temp_path(final)
            try:
                with open(tmp, "xb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                try:
                    os.replace(tmp, final)  # an identical image of a concurrent writer may be replaced: same bytes
                except OSError:
                    # Windows refuses to replace a file another process has open (a concurrent
                    # generator checking it): when it already holds these bytes, nothing is lost.
                    if _matching_bytes(final, _Entry.of(name, data)) is None:
                        raise
                    tmp.unlink(missing_ok=True)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise ClassCacheError(f"could not write {self.shown(final)} ({exc.strerror or exc}); free disk space "
                                  "or fix the folder's permissions, then run again: the images already written "
                                  "are kept and reused") from None
        return _Entry.of(name, data)

    def remove_extras(self, names: list[str]) -> None:
        for name in names:
            try:
                (self.folder / name).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise ClassCacheError(f"{self.shown(self.folder / name)} is no part of the class image set and "
                                      f"cannot be removed ({exc.strerror}); remove it") from None

    def write_manifest(self) -> None:
        """Record every verified image, including those another process listed meanwhile (checked
        against their files first), so no rewrite of the manifest forgets images."""
        self.verified.update(_verified(self.folder, {i: e for i, e in _manifest_entries(self.folder, self.spec)
                                                     .items() if i not in self.verified}))
        payload = {"format": MANIFEST_FORMAT, "engine": CLASS_ENGINE_VERSION, "key": self.spec.key(),
                   **asdict(self.spec), "images": [asdict(self.verified[i]) for i in sorted(self.verified)]}
        self._write(MANIFEST, json.dumps(payload, indent=2, sort_keys=True).encode("utf-8"))
        fsync_dir(self.folder)

    def fill(self, render: _Renderer, batch_size: int) -> int:
        """Generate the images the set lacks, batch by batch; returns how many were written."""
        spec, names = self.spec, self.spec.image_names()
        batches = [list(range(i, min(i + batch_size, spec.count))) for i in range(0, spec.count, batch_size)]
        todo = [batch for batch in batches if any(i not in self.verified for i in batch)]
        render.done, render.total = 0, len(todo) * spec.steps
        written = 0
        for number, batch in enumerate(todo):
            # another process generating this set may have finished these images meanwhile
            self.verified.update(_verified(self.folder, _manifest_entries(self.folder, spec),
                                           [i for i in batch if i not in self.verified]))
            missing = [i for i in batch if i not in self.verified]
            if not missing:
                render.done = (number + 1) * spec.steps
                if render.on_step is not None:
                    render.on_step(render.done, render.total)
                continue
            images = render(batch)
            for index, data in zip(batch, images, strict=True):
                if index in missing:
                    self.verified[index] = self._write(names[index], data)
            written += len(missing)
            fsync_dir(self.folder)  # the images' renames are durable before the manifest lists them
            self.write_manifest()
        return written


def generate_class_images(
    base: SD15Components,
    spec: ClassImageSpec,
    cache_dir: str | os.PathLike,
    on_step: Callable[[int, int], None] | None = None,
    batch_size: int = GENERATE_BATCH,
) -> ClassImageSet:
    """Complete the set for ``spec`` with ``base`` (an :class:`SD15Components`): images already in
    the cache that match the manifest are kept, the others generated (nothing when the set is
    complete). ``on_step(done, total)`` is called after every denoising step (``total`` = batches
    to generate x steps); whatever it raises stops generation, keeping the images finished so
    far for the next run. ``batch_size`` must stay the same for a set to resume byte-identically."""
    cache_dir = Path(cache_dir)
    folder = cache_dir / spec.folder_name()
    check_class_cache(cache_dir, spec, writable=False)
    survey = _survey(folder, spec)
    _log_survey(folder, spec, survey)
    if survey.complete(spec):
        logger.info("reusing %d cached class images in %s", spec.count, folder)
        return ClassImageSet(folder=folder, generated=0, spec=spec, kept=spec.count)
    check_class_cache(cache_dir, spec, writable=True)
    writer = _SetWriter(cache_dir, spec, dict(survey.verified))
    writer.remove_extras(survey.extras)
    logger.info(
        "generating %d of %d class images (%r, %d px, %d steps, guidance %g, seed %d) into %s",
        spec.count - len(writer.verified), spec.count, spec.prompt, spec.resolution, spec.steps, spec.guidance,
        spec.seed, folder,
    )  # fmt: skip
    render = _Renderer(base, spec, on_step)
    generated = 0
    for _ in range(FILL_ROUNDS):
        generated += writer.fill(render, batch_size)
        # Images replaced since they were checked (a concurrent writer whose device makes other
        # bytes): drop them and fill again, so the manifest only lists what is on disk.
        changed = [i for i, entry in writer.verified.items() if _matching_bytes(folder / entry.name, entry) is None]
        for index in changed:
            del writer.verified[index]
        if not changed:
            break
    else:
        raise ClassCacheError(f"the class image set {writer.shown(folder)} kept changing while it was written (another "
                              "process generating it on another device?); run again when that process is done")
    writer.write_manifest()
    return ClassImageSet(folder=folder, generated=generated, spec=spec, kept=max(0, spec.count - generated))


def _decode_class_png(data: bytes, resolution: int) -> torch.Tensor | None:
    """A verified class image as HxWx3 float32 in [0, 1] (what loading the file as a subject photo
    gives), or None when it is not a PNG of the expected size."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "PNG" or im.size != (resolution, resolution):
                return None
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except Exception:  # Pillow raises many types for damaged files
        return None
    return torch.from_numpy(np.ascontiguousarray(rgb))


def load_class_images(folder: str | os.PathLike, spec: ClassImageSpec) -> SubjectData | None:
    """The complete set in ``folder`` as a training set captioned with the class prompt, decoded
    from the very bytes that matched the manifest; None when any image does not match."""
    folder = Path(folder)
    entries = _manifest_entries(folder, spec)
    names = spec.image_names()
    if len(entries) != spec.count:
        return None
    images = []
    for index in range(spec.count):
        data = _matching_bytes(folder / names[index], entries[index])
        image = None if data is None else _decode_class_png(data, spec.resolution)
        if image is None:
            return None
        images.append(image)
    prompt = spec.prompt.strip()
    return SubjectData(images=tuple(images), captions=(prompt,) * spec.count, instance_prompt=prompt,
                       class_prompt=prompt, resolution=spec.resolution, source_names=tuple(names))


def _class_subject(folder: Path, class_prompt: str, resolution: int, max_images: int = 0,
                   tokenizer_dir: str | os.PathLike | None = None) -> SubjectData:
    """A user's own class photos in ``folder`` (centre-cropped) as a training set captioned with
    ``class_prompt``; unusable files are an error naming them."""
    return load_subject(folder, instance_prompt=class_prompt, class_prompt=class_prompt, resolution=resolution,
                        max_images=max_images, crop_mode="center", tokenizer_dir=tokenizer_dir).subject


# -- which class images a run trains with, decided before any model loads -------------------------


@dataclass(frozen=True)
class PriorRequest:
    """The prior-preservation settings of a training config (see ``config.prior_request``)."""

    count: int  # class images; 0 = prior preservation off
    loss_weight: float  # 0 = prior preservation off
    seed: int = 0
    steps: int = 25
    guidance: float = 7.5

    @property
    def enabled(self) -> bool:
        return self.count > 0 and self.loss_weight > 0


@dataclass
class PriorPlan:
    """The class images a run will train with (nothing when prior preservation is off)."""

    enabled: bool
    source: str = ""  # identity for the run fingerprint: generated set key or folder fingerprint
    folder_subject: SubjectData | None = None  # a user's class folder, loaded up front
    spec: ClassImageSpec | None = None  # a set to generate (or reuse from the cache)
    cached: ClassImageSet | None = None  # that set, when it is already complete in the cache
    report: str = "prior preservation off"
    weight: float = 0.0
    generated: int = 0  # class images generated by this run
    folder: Path | None = None
    kept: int = 0  # class images of a generated set already in the cache (checked against the manifest)

    def info(self) -> dict[str, str]:
        """Where the class images came from, for the saved file's metadata."""
        if not self.enabled:
            return {}
        if self.spec is not None:
            spec = self.spec
            return {"source": "generated", "prompt": spec.prompt, "count": str(spec.count),
                    "resolution": str(spec.resolution), "seed": str(spec.seed), "steps": str(spec.steps),
                    "guidance": f"{spec.guidance:g}", "folder": self.folder.name if self.folder else ""}
        count = len(self.folder_subject) if self.folder_subject is not None else 0
        return {"source": "folder", "folder": str(self.folder.name if self.folder else ""), "count": str(count)}


def plan_prior(request: PriorRequest, subject: SubjectData, base_fingerprint: str,
               cache_dir: str | os.PathLike | None, class_folder: str | os.PathLike | None,
               tokenizer_dir: str | os.PathLike | None = None) -> PriorPlan:
    """Check the prior-preservation inputs and the class-image cache and find cached class images,
    without loading a model and without writing anything."""
    if not request.enabled:
        if class_folder is not None:
            logger.info("class folder %s not used: prior preservation is off (class_images 0 or "
                        "prior_loss_weight 0)", Path(class_folder).name)
        return PriorPlan(enabled=False)
    if not subject.class_prompt.strip():
        raise ValueError(
            "prior preservation needs a class prompt (e.g. 'a photo of woman face'): set class_prompt on Load "
            "Subject Images, or set class_images to 0 to train without class images")
    most = max_images_at(subject.resolution)
    if request.count > most:  # their crops stay in memory during training, like the subject's
        raise ValueError(f"class_images is {request.count}; at {subject.resolution} px at most {most} fit in memory "
                         "beside the model: use fewer class images (100-200 are typical)")
    if class_folder is not None:
        folder = Path(class_folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"class image folder {folder.name} not found")
        data = _class_subject(folder, subject.class_prompt, subject.resolution, max_images=request.count,
                              tokenizer_dir=tokenizer_dir)
        return PriorPlan(enabled=True, source="folder:" + data.fingerprint(), folder_subject=data, folder=folder,
                         weight=request.loss_weight,
                         report=f"prior preservation: {len(data)} class images from folder {folder.name} "
                                f"(captioned {subject.class_prompt!r}), loss weight {request.loss_weight:g}")
    if cache_dir is None:
        raise ValueError("prior preservation needs a class image cache folder or a class image folder")
    spec = ClassImageSpec(base_fingerprint=base_fingerprint, prompt=subject.class_prompt, count=request.count,
                          resolution=subject.resolution, seed=request.seed, steps=request.steps,
                          guidance=request.guidance)
    check_class_cache(cache_dir, spec, writable=False)
    folder = Path(cache_dir) / spec.folder_name()
    survey = _survey(folder, spec)
    _log_survey(folder, spec, survey)
    cached = ClassImageSet(folder, 0, spec, kept=spec.count) if survey.complete(spec) else None
    if cached is not None:
        state = "in the cache"
    else:
        check_class_cache(cache_dir, spec, writable=True)
        found = len(survey.verified)
        state = f"{found} in the cache, {spec.count - found} to generate" if found else "not generated yet"
    return PriorPlan(enabled=True, source="generated:" + spec.key(), spec=spec, cached=cached, folder=folder,
                     weight=request.loss_weight, kept=len(survey.verified),
                     report=f"prior preservation: {spec.count} class images of {spec.prompt!r} at "
                            f"{spec.resolution} px, {state} ({spec.folder_name()}), loss weight "
                            f"{request.loss_weight:g}")


def read_prior(plan: PriorPlan, cache_dir: str | os.PathLike | None) -> SubjectData | None:
    """The class images another process has just realized for ``plan`` (the other processes of a
    multi-process launch read them; only the main process generates): nothing is written."""
    if not plan.enabled:
        return None
    if plan.folder_subject is not None:
        return plan.folder_subject
    spec = plan.spec
    assert spec is not None and cache_dir is not None
    folder = Path(cache_dir) / spec.folder_name()
    data = load_class_images(folder, spec)
    if data is None:
        raise ClassCacheError(f"the class image set {shown_in_cache(folder, cache_dir)} the main process made is "
                              "incomplete or changed: run again")
    plan.folder = folder
    return data


def realize_prior(plan: PriorPlan, base: SD15Components, cache_dir: str | os.PathLike | None,
                  on_step: Callable[[int, int], None] | None = None,
                  tokenizer_dir: str | os.PathLike | None = None) -> SubjectData | None:
    """The class images as a SubjectData (generating what the cache lacks with ``base``), or None.
    Images are checked against the manifest again as they are read: a file changed since
    :func:`plan_prior` looked is generated again, never trained on."""
    if not plan.enabled:
        return None
    if plan.folder_subject is not None:
        return plan.folder_subject
    spec = plan.spec
    assert spec is not None and cache_dir is not None  # plan_prior made a spec because there is a cache
    generated = 0
    for _ in range(FILL_ROUNDS):
        made = generate_class_images(base, spec, cache_dir, on_step=on_step)
        generated += made.generated
        data = load_class_images(made.folder, spec)
        if data is not None:
            break
        logger.warning("class image set %s changed while it was read; checking it again", made.folder.name)
    else:
        raise ClassCacheError(f"the class image set {shown_in_cache(made.folder, cache_dir)} kept changing while "
                              "it was read; run again when no other process writes it")
    plan.generated, plan.kept, plan.folder = generated, max(0, spec.count - generated), made.folder
    if generated == 0:
        state = "reused from the cache"
    elif plan.kept:
        state = f"generated now ({generated} new, {plan.kept} already in the cache)"
    else:
        state = "generated now"
    plan.report = (f"prior preservation: {spec.count} class images of {spec.prompt!r} at {spec.resolution} px, "
                   f"{state} ({made.folder.name}), loss weight {plan.weight:g}")
    return data
