"""Reading subject photos (a folder, or decoded images) into a SubjectData, with a report.

What a folder of real photos (or an attacker's uploads) throws at a trainer, and what happens here:

- Decoding, one photo at a time: the size is read from the header and a photo over ``MAX_PIXELS``
  is refused before decoding (decompression bombs); the rest is fully decoded (truncated files
  fail here, not during training) at its own depth (8-bit, 16-bit: 16-bit colour PNGs through
  OpenCV, which keeps all 16 bits where Pillow keeps 8), EXIF orientation applied as a view,
  palette / CMYK / LA / greyscale converted, transparency composited on ``BACKGROUND_RGB``. Only
  the crop at the training resolution is kept: float pixels are made a band of rows at a time,
  never as a full-size copy, with the values (and crops) a whole-image float conversion gives.
- Limits: at most ``max_images_at(resolution)`` images (their crops stay in memory) and
  ``MAX_TOTAL_PIXELS`` decoded pixels per folder, each an error naming the file where it was
  crossed; prompts up to ``MAX_PROMPT_CHARS``, captions up to ``MAX_CAPTION_CHARS`` (a caption
  file too large for that is never read).
- Unusable files (empty, truncated, not an image, undecodable, short side under half the
  resolution, too many pixels, links or names that resolve outside the folder, over-long or
  non-UTF-8 captions) are collected by name. ``on_bad="stop"`` raises one
  :class:`SubjectImageError` listing all of them before anything is trained; ``on_bad="skip"``
  leaves them out and reports them.
- Duplicates (files with the same bytes) are trained on once and reported.
- Crops: ``face`` (OpenCV Haar cascades on the uint8 grey image: frontal face, then profile face,
  then cat face; a square ``face_scale`` times the detection's side, centred on it; centre crop
  when nothing is found, reported per image), ``center`` (largest centred square) or ``pad``
  (whole image letterboxed on ``BACKGROUND_RGB``).
- Captions: the instance prompt for every image, or ``<image stem>.txt`` sidecars matched by
  Unicode-NFC-normalised stem. Instance-token rule: the token is the word(s) of the instance
  prompt that are not in the class prompt (the whole instance prompt when there are none); a
  caption lacking any of those words gets ``"<instance prompt>, "`` prepended. Missing, empty and
  orphan caption files are reported, captions longer than CLIP's 77 tokens warned.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..sd15.checkpoint import load_tokenizer
from . import haar
from .subject import SubjectData, nearest_bucket

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
CAPTION_SUFFIX = ".txt"
CROP_MODES = ("face", "center", "pad", "bucket")
LOSS_MASKS = ("off", "face", "mask")
MASK_FOLDER = "masks"  # <photo folder>/masks/<photo name>.<any image type>: its loss mask (white counts)
CAPTION_MODES = ("instance prompt", "sidecar .txt")
BAD_FILE_MODES = ("stop", "skip")
BACKGROUND_RGB = (255, 255, 255)  # transparency and letterbox padding are composited on white
# Per photo, read from the header before decoding (decompression bombs: a 6 KB PNG can declare
# 7000x7000). Cameras and phones people photograph subjects with top out at 48-61 MP (iPhone 48,
# Canon R5 45, Sony A7R V 61); training uses a 512 px square of it. At 64 MP one photo decodes to
# at most 192 MB (8-bit RGB), and only one is decoded at a time.
MAX_PIXELS = 64_000_000
# 16-bit colour PNGs get a share of it: OpenCV's decoder holds two copies at 8 bytes a pixel
# (at 32 MP: 512 MB). Real ones that large are 100-200 MB files; crafted ones are a few KB.
DEEP_PNG_SHARE = 2
# Per folder: the decoded pixels of all its photos (bounds the decoding time: about 300 phone
# photos of 12 MP, or 60 at the per-photo limit).
MAX_TOTAL_PIXELS = 4_000_000_000
# Per folder or IMAGE batch: the crops are kept as float32 (12 bytes a pixel) until training, so
# the count allowed shrinks with the resolution: 1,000 at 512 px (3 GB), 250 at 1024, 62 at 2048.
MAX_IMAGES = 1000
MAX_CROP_PIXELS = MAX_IMAGES * 512 * 512
# Prompts and captions: CLIP reads 77 tokens (about 300 characters); the text also goes into every
# saved file's metadata. 1,000 characters leaves room for long captions and nothing else.
MAX_PROMPT_CHARS = 1000
MAX_CAPTION_CHARS = 1000
CLIP_MAX_TOKENS = 77  # including the start and end tokens
DETECT_SIDE = 1024  # face search on a preview this long at most: Haar cascades need no more
FACE_SCALE = 2.5  # side of the face crop / side of the detected face box

# (what was found, cascade file, minNeighbors, scaleFactor, also try the mirrored image)
_CASCADES = (
    ("frontal face", "haarcascade_frontalface_default.xml", 5, 1.1, False),
    ("profile face", "haarcascade_profileface.xml", 5, 1.1, True),
    ("cat face", "haarcascade_frontalcatface.xml", 3, 1.05, False),
    ("cat face", "haarcascade_frontalcatface_extended.xml", 3, 1.05, False),
)


class SubjectImageError(ValueError):
    """A subject folder or image that cannot be trained on; the message names it and the fix."""


class BadImageFile(Exception):
    """One file that cannot be used; the message is the reason, without the name."""


@dataclass
class ImageReport:
    """What happened to one image: where its crop and caption came from, and what to look at."""

    name: str
    crop: str = ""
    subject_found: str = ""
    caption_source: str = ""
    caption: str = ""
    warnings: list[str] = field(default_factory=list)
    mask: str = ""  # where its loss mask came from (masked loss)

    def line(self) -> str:
        parts = [f"crop {self.crop}"]
        if self.subject_found:
            parts.append(self.subject_found)
        if self.mask:
            parts.append(f"loss mask {self.mask}")
        parts.append(f"caption from {self.caption_source}")
        parts += [f"WARNING {w}" for w in self.warnings]
        return f"{self.name}: " + "; ".join(parts)


@dataclass
class SubjectLoad:
    """A prepared subject with the per-image report and the folder-level findings."""

    subject: SubjectData
    images: list[ImageReport]
    skipped: list[str] = field(default_factory=list)  # "name: reason" of unusable files left out
    notes: list[str] = field(default_factory=list)  # duplicates, orphan captions, ignored files

    def report(self) -> str:
        lines = [f"{len(self.images)} images at {self.subject.resolution}px"]
        lines += [r.line() for r in self.images]
        lines += [f"SKIPPED {s}" for s in self.skipped]
        lines += [f"NOTE {n}" for n in self.notes]
        return "\n".join(lines)


# -- checks -----------------------------------------------------------------------------------
def check_resolution(resolution: int) -> int:
    if (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 64
            or resolution > 2048 or resolution % 64):
        raise SubjectImageError(f"resolution must be a multiple of 64 between 64 and 2048 (got {resolution!r})")
    return resolution


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise SubjectImageError(f"{name} must be one of {', '.join(map(repr, choices))} (got {value!r})")
    return value


def check_prompt(name: str, text: str | None, required: bool = True) -> str:
    """`text` stripped; raises SubjectImageError naming the prompt when it is empty (if required)
    or over MAX_PROMPT_CHARS (never echoing it)."""
    if text is not None and not isinstance(text, str):
        raise SubjectImageError(f"{name} must be text (got {type(text).__name__})")
    prompt = (text or "").strip()
    if required and not prompt:
        raise SubjectImageError(f"{name} is empty: describe the subject, e.g. 'a photo of sks dog'")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise SubjectImageError(
            f"{name} is {len(prompt):,} characters, over the {MAX_PROMPT_CHARS:,}-character limit "
            f"(CLIP reads only the first {CLIP_MAX_TOKENS} tokens, about 300 characters); shorten it")
    return prompt


def check_prompts(instance_prompt: str, class_prompt: str | None = "") -> tuple[str, str]:
    """(instance prompt, class prompt), stripped and checked."""
    return check_prompt("instance prompt", instance_prompt), check_prompt("class prompt", class_prompt, required=False)


def max_images_at(resolution: int) -> int:
    """How many images a subject may have at `resolution` (their crops stay in memory)."""
    return max(1, min(MAX_IMAGES, MAX_CROP_PIXELS // (resolution * resolution)))


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


# -- the folder ---------------------------------------------------------------------------------
@dataclass
class FolderScan:
    images: list[Path]
    captions: dict[str, Path]  # NFC stem -> caption file
    problems: list[str]  # "name: reason"
    ignored: list[str]


def scan_folder(folder: str | os.PathLike) -> FolderScan:
    """Image and caption files directly in `folder`, sorted by name. Entries that resolve outside
    the folder (links, odd names) are problems, never read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SubjectImageError(f"subject folder {folder.name!r} does not exist")
    root = os.path.realpath(folder)
    scan = FolderScan([], {}, [], [])
    for entry in sorted(folder.iterdir(), key=lambda p: nfc(p.name)):
        if entry.name.startswith("."):
            continue
        suffix = entry.suffix.lower()
        if suffix not in IMAGE_SUFFIXES and suffix != CAPTION_SUFFIX:
            if not entry.is_dir():
                scan.ignored.append(entry.name)
            continue
        real = os.path.realpath(entry)
        if not real.startswith(root + os.sep):
            scan.problems.append(f"{entry.name}: resolves outside the subject folder; remove the link")
            continue
        if not entry.is_file():
            continue
        if suffix == CAPTION_SUFFIX:
            scan.captions[nfc(entry.stem)] = entry
        else:
            scan.images.append(entry)
    return scan


# -- decoding -----------------------------------------------------------------------------------
@dataclass
class Photo:
    """One decoded photo at its own bit depth, as stored in the file (EXIF orientation not applied).

    ``pixels`` is HxWxC with C = 1 (grey), 2 (grey + alpha), 3 (colour) or 4 (colour + alpha), in
    uint8, uint16, or float32 (ComfyUI IMAGE batches, Pillow's 32-bit float mode); ``peak`` is the
    value of full intensity. Float pixels are only ever made a band of rows at a time, so a photo
    never exists as a full-size float copy; the values are exactly those of a whole-image float
    conversion (0-1, transparency composited on BACKGROUND_RGB), and so are the resized crops.
    """

    pixels: np.ndarray
    peak: float
    orientation: int = 1
    bgr: bool = False  # colour channels in OpenCV's order
    clip: bool = False  # float sources whose values may leave 0-1 after scaling
    notes: list[str] = field(default_factory=list)

    @property
    def has_alpha(self) -> bool:
        return self.pixels.shape[2] in (2, 4)

    @property
    def height(self) -> int:
        return self.pixels.shape[1 if self.orientation in (5, 6, 7, 8) else 0]

    @property
    def width(self) -> int:
        return self.pixels.shape[0 if self.orientation in (5, 6, 7, 8) else 1]

    def upright(self) -> np.ndarray:
        """The pixels turned upright (a view: nothing is copied)."""
        return _UPRIGHT.get(self.orientation, lambda a: a)(self.pixels)

    def bands(self, top: int, left: int, height: int, width: int):
        """(first row, HxWxC' float32 in [0, 1]) for the upright rectangle at (top, left), a band
        of about _BAND_PIXELS at a time; C' is 1 (grey) or 3 (colour, in the stored order)."""
        view = self.upright()[top:top + height, left:left + width]
        rows = max(1, _BAND_PIXELS // max(1, width))
        background = np.asarray(BACKGROUND_RGB[::-1] if self.bgr else BACKGROUND_RGB, dtype=np.float32) / 255.0
        if self.pixels.shape[2] == 2:
            background = background[:1]
        for row in range(0, height, rows):
            band = view[row:row + rows].astype(np.float32) / np.float32(self.peak)
            if self.clip:
                np.clip(band, 0.0, 1.0, out=band)
            if self.has_alpha:  # colour * alpha + background * (1 - alpha), in place, a channel at a time
                see_through = 1.0 - band[..., -1]
                colour = band[..., :-1]
                colour *= band[..., -1:]
                for channel, value in enumerate(background):
                    colour[..., channel] += value * see_through
                band = colour
            yield row, band

    def _rgb(self, array: np.ndarray) -> np.ndarray:
        if array.shape[2] == 1:
            return np.repeat(array, 3, axis=2)
        return np.ascontiguousarray(array[..., ::-1]) if self.bgr else array

    def region(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """The upright rectangle as HxWx3 float32 RGB in [0, 1] (for small rectangles)."""
        out = np.empty((height, width, 1 if self.pixels.shape[2] <= 2 else 3), dtype=np.float32)
        for row, band in self.bands(top, left, height, width):
            out[row:row + band.shape[0]] = band
        return self._rgb(out)

    def resized(self, top: int, left: int, height: int, width: int, size: tuple[int, int]) -> torch.Tensor:
        """The upright rectangle resized to `size` (height, width) as HxWx3 float32 RGB, bit for bit
        what antialiased bicubic interpolation of the whole float rectangle gives (it is
        separable: rows are resized a band at a time, then the columns of the narrow result)."""
        new_h, new_w = size
        interpolate = functools.partial(torch.nn.functional.interpolate, mode="bicubic", antialias=True,
                                        align_corners=False)
        if height * width <= _BAND_PIXELS:
            chw = torch.from_numpy(self.region(top, left, height, width)).permute(2, 0, 1).unsqueeze(0)
            return interpolate(chw, size=(new_h, new_w))[0].permute(1, 2, 0)
        narrow = None
        for row, band in self.bands(top, left, height, width):
            if narrow is None:
                narrow = torch.empty((1, band.shape[2], height, new_w), dtype=torch.float32)
            chw = torch.from_numpy(band).permute(2, 0, 1).unsqueeze(0)
            narrow[:, :, row:row + band.shape[0]] = interpolate(chw, size=(band.shape[0], new_w))
        out = interpolate(narrow, size=(new_h, new_w))[0].permute(1, 2, 0).numpy()
        return torch.from_numpy(self._rgb(out))

    def grey(self) -> np.ndarray:
        """The upright photo as HxW uint8 grey (what the face search looks at)."""
        import cv2

        out = np.empty((self.height, self.width), dtype=np.uint8)
        for row, band in self.bands(0, 0, self.height, self.width):
            levels = (np.clip(band, 0, 1) * 255).round().astype(np.uint8)
            if levels.shape[2] == 1:
                out[row:row + band.shape[0]] = levels[..., 0]
            else:
                code = cv2.COLOR_BGR2GRAY if self.bgr else cv2.COLOR_RGB2GRAY
                out[row:row + band.shape[0]] = cv2.cvtColor(levels, code)
        return out


_BAND_PIXELS = 1 << 22  # pixels converted to float at a time: 16-64 MB


_SIGNATURES = ((b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"BM", "BMP"), (b"II*\0", "TIFF"),
               (b"MM\0*", "TIFF"), (b"GIF8", "GIF"))


def _signature(path: Path) -> str:
    """The image format a file's first bytes announce, or ''."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(12)
    except OSError:
        return ""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((kind for magic, kind in _SIGNATURES if head.startswith(magic)), "")


# EXIF orientation -> what makes the pixel array upright (as Pillow's exif_transpose does).
_UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def _png_header(path: Path) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, colour type) from a PNG's IHDR, or None."""
    with open(path, "rb") as handle:
        head = handle.read(26)
    if len(head) < 26 or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"), head[24], head[25]


def _over_limit(width: int, height: int, max_pixels: int, deep: bool = False) -> BadImageFile:
    if deep:
        return BadImageFile(f"{width}x{height} is over the {max_pixels:,}-pixel limit for 16-bit colour PNGs "
                            "(they take 8 bytes a pixel, twice, to decode); save it with 8 bits or downscale it")
    return BadImageFile(f"{width}x{height} is over the {max_pixels:,}-pixel limit for one photo "
                        "(decompression-bomb guard); downscale it")


def _deep_colour_png(path: Path, max_pixels: int) -> np.ndarray:
    """A 16-bit RGB(A) PNG at full depth (OpenCV reads all 16 bits), BGR(A) as OpenCV stores it."""
    import cv2

    header = _png_header(path)
    if header is None:
        raise BadImageFile("damaged PNG (no image header)")
    width, height = header[:2]
    if width * height > max_pixels:  # checked here, right before decoding: the file may have changed
        raise _over_limit(width, height, max_pixels, deep=True)
    decoded = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.dtype != np.uint16 or decoded.ndim != 3:
        raise BadImageFile("damaged PNG (16-bit colour data cannot be read)")
    return decoded


def _pillow_pixels(im) -> tuple[np.ndarray, float, list[str]]:
    """(HxWxC array at the image's own depth, peak, notes) for any Pillow mode."""
    mode = im.mode
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16, copy=False)[..., None], 65535.0, ["16-bit greyscale scaled to 0-1"]
    if mode == "I":
        grey = np.clip(np.asarray(im), 0, 65535).astype(np.uint16)
        return grey[..., None], 65535.0, ["16-bit greyscale scaled to 0-1"]
    if mode == "F":
        grey = np.asarray(im, dtype=np.float32)
        top = float(grey.max()) if grey.size else 0.0
        peak = 1.0 if top <= 1.0 else (255.0 if top <= 255.0 else 65535.0)
        return grey[..., None], peak, ["16-bit greyscale scaled to 0-1"]
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        keep = (mode == "RGBA" or (mode == "LA" and len(set(BACKGROUND_RGB)) == 1)) and "transparency" not in im.info
        return np.asarray(im if keep else im.convert("RGBA")), 255.0, []
    if mode == "1":  # one byte a pixel, True = white: no 8-bit copy needed
        return np.asarray(im)[..., None], 1.0, ["converted from 1 to RGB"]
    if mode == "L":
        return np.asarray(im)[..., None], 255.0, ["converted from L to RGB"]
    notes = [] if mode == "RGB" else [f"converted from {mode} to RGB"]
    return np.asarray(im if mode == "RGB" else im.convert("RGB")), 255.0, notes


def read_photo(path: str | os.PathLike, max_pixels: int = MAX_PIXELS,
               before_decoding: Callable[[int, int], None] | None = None) -> Photo:
    """One photo fully decoded (truncated files fail here, not during training) at its own depth.

    The size is read from the header and checked against `max_pixels` (and passed to
    `before_decoding`, which may raise) before any pixel is decoded. Raises BadImageFile with the
    reason (never a server path) when the file cannot be used.
    """
    from PIL import Image, ImageFile, UnidentifiedImageError

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BadImageFile(f"cannot be read ({exc.strerror})") from None
    if size == 0:
        raise BadImageFile("empty file (0 bytes)")
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # ComfyUI may have switched it on: a truncated photo must fail
    try:
        with Image.open(path) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise _over_limit(width, height, max_pixels)
            if before_decoding is not None:
                before_decoding(width, height)
            notes = []
            if getattr(im, "n_frames", 1) > 1:
                notes.append(f"has {im.n_frames} frames; used the first")
            header = _png_header(path) if im.format == "PNG" else None
            deep = header is not None and header[2] == 16 and header[3] in (2, 6)
            if deep:  # OpenCV decodes it below, at full depth; Pillow decodes nothing
                exif = Image.Exif()
                if im.info.get("exif"):
                    exif.load(im.info["exif"])
                orientation = exif.get(0x0112, 1)
                pixels, peak, more = None, 65535.0, ["16-bit colour scaled to 0-1"]
            else:
                im.load()
                orientation = im.getexif().get(0x0112, 1)
                pixels, peak, more = _pillow_pixels(im)
            if orientation not in (None, 1):
                notes.append(f"turned upright from EXIF orientation {orientation}")
        if deep:
            pixels = _deep_colour_png(path, max_pixels // DEEP_PNG_SHARE)
        photo = Photo(pixels, peak, orientation if orientation in _UPRIGHT else 1, bgr=deep,
                      clip=pixels.dtype.kind == "f", notes=notes + more)
        if photo.has_alpha:
            if int(photo.pixels[..., -1].min()) < photo.peak:
                photo.notes.append(f"transparent pixels composited on RGB{BACKGROUND_RGB}")
            else:  # opaque: nothing to composite
                photo.pixels = photo.pixels[..., :-1]
        return photo
    except (BadImageFile, SubjectImageError):
        raise
    except UnidentifiedImageError:
        kind = _signature(path)
        if kind:
            raise BadImageFile(f"damaged {kind} (starts like one but cannot be read: truncated or corrupt)") from None
        raise BadImageFile("not an image (no image format recognises its contents)") from None
    except Image.DecompressionBombError as exc:
        raise BadImageFile(f"too many pixels (decompression-bomb guard): {exc}") from None
    except OSError as exc:
        if "truncated" in str(exc).lower():
            raise BadImageFile("truncated (the file ends before the image does); re-export or re-copy it") from None
        raise BadImageFile(f"cannot be decoded ({_without_paths(exc, path)})") from None
    except Exception as exc:  # Pillow raises SyntaxError, ValueError, ... for broken files
        raise BadImageFile(f"cannot be decoded ({type(exc).__name__}: {_without_paths(exc, path)})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _without_paths(exc: BaseException, path: Path) -> str:
    """An exception's text with the file's server path replaced by its name."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    for full in {str(path), os.path.abspath(path), os.path.realpath(path)}:
        text = text.replace(full, path.name)
    return text


def photo_from_tensor(image: torch.Tensor) -> Photo:
    """A decoded HxWxC float image (a ComfyUI IMAGE item) as a Photo (RGB, alpha dropped)."""
    pixels = image.detach().cpu()[..., :3]
    if pixels.dtype != torch.float32:
        pixels = pixels.float()
    return Photo(pixels.numpy(), 1.0)  # not clipped: as ComfyUI's own nodes see it


# -- cropping -----------------------------------------------------------------------------------
@functools.cache
def _cascade(filename: str) -> Callable[..., list[tuple[int, int, int, int]]]:
    """``detectMultiScale`` of one of the cascades the pack ships (``haar.CASCADE_DIR``): OpenCV's own
    classifier where the installed build has one (OpenCV 4), else the same detector in NumPy
    (OpenCV 5 moved it out of the main module)."""
    import cv2

    if hasattr(cv2, "CascadeClassifier"):
        storage = cv2.FileStorage(haar.cascade_xml(filename), cv2.FILE_STORAGE_READ | cv2.FILE_STORAGE_MEMORY)
        classifier = cv2.CascadeClassifier()
        if not classifier.read(storage.getFirstTopLevelNode()) or classifier.empty():
            raise SubjectImageError(f"OpenCV {cv2.__version__} could not read the cascade {filename}; "
                                    "reinstall the pack (its trainers/data/cascades folder is damaged)")

        def opencv(grey, scale_factor, min_neighbours, min_size):
            return [tuple(int(v) for v in box) for box in classifier.detectMultiScale(
                grey, scaleFactor=scale_factor, minNeighbors=min_neighbours, minSize=min_size)]

        return opencv
    cascade = haar.load_cascade(filename)

    def numpy(grey, scale_factor, min_neighbours, min_size):
        return haar.detect_multi_scale(cascade, grey, scale_factor, min_neighbours, min_size)

    if not _cascade.cache_info().currsize:  # said once, with the first cascade
        log.info("OpenCV %s has no cascade classifier: faces are found by the pack's own (slower) detector",
                 cv2.__version__)
    return numpy


def face_detector() -> str:
    """Which face detector this OpenCV build gets (for reports and the README's check)."""
    import cv2

    kind = "OpenCV's cascade classifier" if hasattr(cv2, "CascadeClassifier") else "the pack's NumPy cascade detector"
    return f"{kind} (OpenCV {cv2.__version__})"


OPENCV_DISTRIBUTIONS = ("opencv-python", "opencv-python-headless", "opencv-contrib-python",
                        "opencv-contrib-python-headless")


def opencv_distributions() -> dict[str, str]:
    """The OpenCV distributions installed in this environment: {name: version}."""
    from importlib import metadata

    found = {}
    for name in OPENCV_DISTRIBUTIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def opencv_problem(installed: dict[str, str] | None = None) -> str | None:
    """What is wrong with this environment's OpenCV for the pack, with the fix; None when nothing.

    Several OpenCV distributions all write the one ``cv2`` folder; at one version they are
    interchangeable for the pack (it uses no GUI function), at different versions ``cv2`` is a mix
    of files from both and which one a pip command leaves behind is an accident."""
    installed = opencv_distributions() if installed is None else installed
    if not installed:
        return ("OpenCV is not installed: face crop and Canny edges need it. Install it into ComfyUI's "
                "Python: pip install opencv-python-headless")
    if len(set(installed.values())) > 1:
        listed = ", ".join(f"{name} {version}" for name, version in sorted(installed.items()))
        newest = max(installed.values(), key=_version_key)
        return (f"several OpenCV distributions at different versions share one cv2 folder ({listed}); keep "
                f"one version of all of them, e.g. pip install --force-reinstall --no-deps "
                + " ".join(f"{name}=={newest}" for name in sorted(installed)))
    return None


def _version_key(version: str) -> tuple:
    return tuple(int(part) if part.isdigit() else 0 for part in re.split(r"[.+-]", version))


def detect_subject(image: np.ndarray) -> tuple[str, tuple[int, int, int, int], int] | None:
    """(what was found, (x, y, w, h) of the largest detection, number of detections) or None, for an
    HxW uint8 grey image (or HxWx3 uint8 RGB).

    Frontal faces first, then profile faces (both directions), then cat faces.
    """
    import cv2

    grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    scale = 1.0
    longest = max(grey.shape)
    if longest > DETECT_SIDE:  # Haar cascades need no more; keeps big photos fast
        scale = DETECT_SIDE / longest
        grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    grey = cv2.equalizeHist(grey)
    width = grey.shape[1]
    for kind, filename, neighbours, factor, mirrored in _CASCADES:
        min_side = 24 if kind == "cat face" else max(24, min(grey.shape) // 12)
        detect = _cascade(filename)
        boxes = detect(grey, factor, neighbours, (min_side, min_side))
        if mirrored:
            flipped = detect(np.ascontiguousarray(grey[:, ::-1]), factor, neighbours, (min_side, min_side))
            boxes += [(width - x - w, y, w, h) for x, y, w, h in flipped]
        if boxes:
            x, y, w, h = max(boxes, key=lambda b: b[2] * b[3])
            return kind, tuple(int(round(v / scale)) for v in (x, y, w, h)), len(boxes)
    return None


def find_subject(photo: Photo) -> tuple[str, tuple[int, int, int, int], int] | None:
    """detect_subject on the photo's uint8 grey image."""
    return detect_subject(photo.grey())


def square_around(box: tuple[int, int, int, int], height: int, width: int,
                  face_scale: float = FACE_SCALE) -> tuple[int, int, int]:
    """(top, left, side) of a square `face_scale` times the box, centred on it, kept in the image."""
    x, y, w, h = box
    side = int(round(max(w, h) * face_scale))
    side = max(1, min(side, height, width))
    cx, cy = x + w / 2, y + h / 2
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return top, left, side


@dataclass(frozen=True)
class CropGeometry:
    """Where a crop comes from: the upright rectangle (top, left, height, width) of the photo,
    resized to (out_h, out_w) and placed at (row, col) of a canvas of (canvas_h, canvas_w)."""

    top: int
    left: int
    height: int
    width: int
    out_h: int
    out_w: int
    canvas_h: int
    canvas_w: int
    row: int = 0
    col: int = 0

    def box_in_crop(self, box: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
        """A photo box (x, y, w, h) in crop pixels."""
        sx, sy = self.out_w / self.width, self.out_h / self.height
        x, y, w, h = box
        return self.col + (x - self.left) * sx, self.row + (y - self.top) * sy, w * sx, h * sy


def _square_geometry(top: int, left: int, side: int, resolution: int) -> CropGeometry:
    return CropGeometry(top, left, side, side, resolution, resolution, resolution, resolution)


def apply_crop(photo: Photo, geometry: CropGeometry, fill: tuple[float, float, float] | None = None) -> torch.Tensor:
    """The crop ``geometry`` describes, as HxWx3 float32 (a region taken as it is when it needs no
    resizing, else antialiased bicubic, as center_crop_resize makes it from a float image).
    ``fill``: the canvas colour around a letterboxed photo (default BACKGROUND_RGB)."""
    g = geometry
    letterboxed = (g.canvas_h, g.canvas_w) != (g.out_h, g.out_w)
    if (g.out_h, g.out_w) == (g.height, g.width) and not letterboxed:
        crop = torch.from_numpy(photo.region(g.top, g.left, g.height, g.width))
    else:
        crop = photo.resized(g.top, g.left, g.height, g.width, (g.out_h, g.out_w)).clamp(0.0, 1.0).contiguous()
    if not letterboxed:
        return crop
    colour = torch.tensor(fill if fill is not None else [c / 255 for c in BACKGROUND_RGB], dtype=torch.float32)
    canvas = colour.expand(g.canvas_h, g.canvas_w, 3).clone()
    canvas[g.row:g.row + g.out_h, g.col:g.col + g.out_w] = crop
    return canvas


def pad_geometry(height: int, width: int, resolution: int) -> CropGeometry:
    """The whole photo, longest side scaled to `resolution`, centred on a square canvas."""
    scale = resolution / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    return CropGeometry(0, 0, height, width, new_h, new_w, resolution, resolution,
                        (resolution - new_h) // 2, (resolution - new_w) // 2)


def bucket_geometry(height: int, width: int, resolution: int) -> CropGeometry:
    """The photo scaled to cover its nearest aspect-ratio bucket, the overflow cut off evenly on
    both sides (none when the photo has the bucket's aspect ratio)."""
    out_h, out_w = nearest_bucket(height, width, resolution)
    scale = max(out_h / height, out_w / width)
    crop_h, crop_w = min(height, round(out_h / scale)), min(width, round(out_w / scale))
    return CropGeometry((height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w, out_h, out_w, out_h, out_w)


@dataclass
class Crop:
    """One photo's crop: the pixels, how it was made and what the face search found."""

    image: torch.Tensor
    geometry: CropGeometry
    description: str
    found: str
    warnings: list[str]
    face: tuple[int, int, int, int] | None = None  # the detected box (x, y, w, h) in photo pixels


def crop_photo(photo: Photo, mode: str, resolution: int, face_scale: float = FACE_SCALE,
               find_face: bool = False) -> Crop:
    """One photo cropped as ``mode`` says (``find_face``: search for the face in every mode, for a
    face loss mask)."""
    height, width = photo.height, photo.width
    found = find_subject(photo) if mode == "face" or find_face else None
    face = found[1] if found is not None else None
    found_text = ""
    if found is not None:
        kind, box, count = found
        found_text = f"{kind} found at x={box[0]} y={box[1]} size={box[2]}x{box[3]}"
        if count > 1:
            found_text += f" (largest of {count} detections)"
    side = min(height, width)
    center = _square_geometry((height - side) // 2, (width - side) // 2, side, resolution)
    if mode == "pad":
        geometry = pad_geometry(height, width, resolution)
        return Crop(apply_crop(photo, geometry), geometry, f"pad (whole {width}x{height} image letterboxed)",
                    found_text, [], face)
    if mode == "bucket":
        g = bucket_geometry(height, width, resolution)
        cut = f"{g.width}x{g.height} of it" if (g.height, g.width) != (height, width) else "whole image, not cropped"
        return Crop(apply_crop(photo, g), g, f"bucket {g.out_w}x{g.out_h} ({cut})", found_text, [], face)
    if mode == "center":
        return Crop(apply_crop(photo, center), center, "center", found_text, [], face)
    if found is None:
        return Crop(apply_crop(photo, center), center, "center (fallback)", "no face found, fell back to centre crop",
                    ["no face found: centre crop used; check the crop"])
    top, left, side = square_around(found[1], height, width, face_scale)
    geometry = _square_geometry(top, left, side, resolution)
    return Crop(apply_crop(photo, geometry), geometry, f"face ({side}x{side} at x={left} y={top})", found_text, [],
                face)


# -- loss masks ---------------------------------------------------------------------------------
FACE_MASK_SCALE = 1.6  # the face mask's box / the detected face box (hair, ears, chin)
FACE_MASK_FEATHER = 0.25  # soft edge width / the mask box's side


def face_mask(crop: Crop) -> tuple[torch.Tensor, str | None]:
    """A soft-edged box around the detected face, in crop pixels: 1 inside a box FACE_MASK_SCALE
    times the face's, falling linearly to 0 over FACE_MASK_FEATHER of its side. Without a face,
    all ones (the whole image counts) and a warning."""
    g = crop.geometry
    if crop.face is None:
        return torch.ones(g.canvas_h, g.canvas_w), "no face found: the whole image counts in the loss"
    x, y, w, h = crop.geometry.box_in_crop(crop.face)
    cx, cy = x + w / 2, y + h / 2
    half_w, half_h = w * FACE_MASK_SCALE / 2, h * FACE_MASK_SCALE / 2
    feather = max(1.0, FACE_MASK_FEATHER * max(w, h) * FACE_MASK_SCALE)
    cols = torch.arange(g.canvas_w, dtype=torch.float32) + 0.5
    rows = torch.arange(g.canvas_h, dtype=torch.float32) + 0.5
    outside_x = ((cols - cx).abs() - half_w).clamp(min=0)
    outside_y = ((rows - cy).abs() - half_h).clamp(min=0)
    distance = torch.sqrt(outside_y[:, None] ** 2 + outside_x[None, :] ** 2)
    return (1 - distance / feather).clamp(0, 1), None


def mask_photo(mask: torch.Tensor | np.ndarray) -> Photo:
    """An HxW float mask in [0, 1] as a one-channel Photo (to be cropped like its image)."""
    values = mask.detach().cpu().float().numpy() if isinstance(mask, torch.Tensor) else mask.astype(np.float32)
    return Photo(np.ascontiguousarray(values[..., None]), 1.0, clip=True)


def crop_mask(mask: Photo, crop: Crop, photo_height: int, photo_width: int, name: str) -> torch.Tensor:
    """A mask covering the whole photo (any size of the same aspect ratio), cropped as the photo was;
    letterboxing counts 0."""
    ratio = (mask.width / mask.height) / (photo_width / photo_height)
    if abs(ratio - 1) > 0.02:
        raise SubjectImageError(
            f"the loss mask of {name} is {mask.width}x{mask.height} but the photo is {photo_width}x{photo_height}; "
            "a mask must have its photo's aspect ratio (paint it on the photo itself)")
    g, sy, sx = crop.geometry, mask.height / photo_height, mask.width / photo_width
    top, left = min(mask.height - 1, round(g.top * sy)), min(mask.width - 1, round(g.left * sx))
    height = max(1, min(mask.height - top, round(g.height * sy)))
    width = max(1, min(mask.width - left, round(g.width * sx)))
    scaled = CropGeometry(top, left, height, width, g.out_h, g.out_w, g.canvas_h, g.canvas_w, g.row, g.col)
    return apply_crop(mask, scaled, fill=(0.0, 0.0, 0.0))[..., 0].clamp(0, 1).contiguous()


# -- captions -----------------------------------------------------------------------------------
_WORD = re.compile(r"[\w<>]+", re.UNICODE)


def _words(text: str) -> list[str]:
    return [w.casefold() for w in _WORD.findall(nfc(text))]


def instance_token(instance_prompt: str, class_prompt: str = "") -> str:
    """The words of the instance prompt that are not in the class prompt ('sks' for 'a photo of
    sks dog' / 'a photo of dog'); the whole instance prompt when there are none."""
    class_words = set(_words(class_prompt))
    token = [w for w in _WORD.findall(nfc(instance_prompt)) if w.casefold() not in class_words]
    return " ".join(token) if token else instance_prompt.strip()


def caption_with_token(caption: str, instance_prompt: str, class_prompt: str = "") -> tuple[str, bool]:
    """(caption, whether the instance prompt was prepended): a caption that lacks any word of the
    instance token becomes '<instance prompt>, <caption>'."""
    caption = " ".join(nfc(caption).split())
    words = set(_words(caption))
    if all(w in words for w in _words(instance_token(instance_prompt, class_prompt))):
        return caption, False
    return f"{instance_prompt.strip()}, {caption}", True


@functools.lru_cache(maxsize=4)
def _tokenizer(tokenizer_dir: str):
    return load_tokenizer(tokenizer_dir)


def count_clip_tokens(text: str, tokenizer_dir: str | os.PathLike | None = None) -> tuple[int, bool]:
    """(token count including start/end, exact?). Exact with a CLIP tokenizer folder; otherwise
    an estimate of one token per word or punctuation mark."""
    if tokenizer_dir is not None:
        try:
            tokenizer = _tokenizer(str(tokenizer_dir))
            return len(tokenizer(text, truncation=False)["input_ids"]), True
        except Exception as exc:  # a missing/broken tokenizer only degrades the warning
            log.warning("CLIP tokenizer %s unusable (%s); estimating caption lengths", tokenizer_dir, exc)
    return len(re.findall(r"\w+|[^\w\s]", text)) + 2, False


def read_caption(path: Path, max_chars: int = MAX_CAPTION_CHARS) -> str:
    """Text of a caption file (UTF-8, BOM allowed). Raises BadImageFile when it is not UTF-8 text
    or is longer than `max_chars` (a file too big to hold that many characters is never read)."""
    most_bytes = 3 + 4 * max_chars  # a BOM, then characters of up to 4 bytes
    try:
        size = path.stat().st_size
        if size <= most_bytes:
            with open(path, "rb") as handle:
                data = handle.read(most_bytes + 1)
            size = len(data)
    except OSError as exc:
        raise BadImageFile(f"caption cannot be read ({exc.strerror})") from None
    if size > most_bytes:
        raise BadImageFile(f"caption file is {size:,} bytes, too long for the {max_chars:,}-character caption "
                           f"limit (CLIP reads only the first {CLIP_MAX_TOKENS} tokens); shorten it")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadImageFile("caption is not UTF-8 text; re-save it as UTF-8") from None
    length = len(" ".join(text.split()))
    if length > max_chars:
        raise BadImageFile(f"caption is {length:,} characters, over the {max_chars:,}-character limit "
                           f"(CLIP reads only the first {CLIP_MAX_TOKENS} tokens); shorten it")
    return text


# -- building the subject -----------------------------------------------------------------------
def prepare_subject(images: list[torch.Tensor], names: list[str], instance_prompt: str,
                    class_prompt: str = "", resolution: int = 512, crop_mode: str = "center",
                    flip: bool = False, captions: list[str | None] | None = None,
                    caption_sources: list[str] | None = None, reports: list[ImageReport] | None = None,
                    tokenizer_dir: str | os.PathLike | None = None,
                    face_scale: float = FACE_SCALE, loss_mask: str = "off",
                    masks: list[torch.Tensor] | None = None) -> SubjectLoad:
    """Crop decoded HxWx3 images and caption them. A caption of None means the instance prompt.
    ``loss_mask`` "face" makes a soft box around each face, "mask" crops ``masks`` (one HxW mask
    per image, of its aspect ratio) as the images are cropped."""
    check_resolution(resolution)
    _check_choice("crop mode", crop_mode, CROP_MODES)
    _check_choice("loss mask", loss_mask, LOSS_MASKS)
    check_prompts(instance_prompt, class_prompt)
    if not images:
        raise SubjectImageError("no subject images: give 3-20 photos of the subject")
    _check_count(names, resolution, "the image batch", "set max_images to {limit} or fewer")
    if loss_mask == "mask" and (masks is None or len(masks) != len(images)):
        raise SubjectImageError(
            f"loss mask 'mask' needs one mask per image: {len(images)} images but "
            f"{'no' if masks is None else len(masks)} masks; connect a MASK batch of the same count")
    reports = reports or [ImageReport(name) for name in names]
    crops, crop_masks = [], []
    for i, (image, report) in enumerate(zip(images, reports, strict=True)):
        photo = photo_from_tensor(image)
        crop = crop_photo(photo, crop_mode, resolution, face_scale, find_face=loss_mask == "face")
        report.crop, report.subject_found, report.warnings = crop.description, crop.found, report.warnings + crop.warnings
        crops.append(crop.image)
        if loss_mask != "off":
            crop_masks.append(_loss_mask(crop, loss_mask, masks[i] if masks is not None else None, photo, report))
    return _caption_subject(crops, names, instance_prompt, class_prompt, resolution, flip, captions,
                            caption_sources, reports, tokenizer_dir, crop_mode == "bucket", crop_masks)


def _loss_mask(crop: Crop, loss_mask: str, mask: torch.Tensor | Photo | None, photo: Photo,
               report: ImageReport) -> torch.Tensor:
    """The loss mask of one crop (``loss_mask`` "face" or "mask"); reported."""
    if loss_mask == "face":
        made, warning = face_mask(crop)
        report.mask = "face box" if warning is None else "whole image (no face)"
        if warning:
            report.warnings.append(warning)
        return made
    assert mask is not None
    source = mask if isinstance(mask, Photo) else mask_photo(mask)
    made = crop_mask(source, crop, photo.height, photo.width, report.name)
    report.mask = f"mask ({float(made.mean()):.0%} of the crop)"
    if float(made.max()) <= 0:
        raise SubjectImageError(f"the loss mask of {report.name} is empty where the photo is cropped; paint the "
                                "subject white (or set loss mask to off)")
    return made


def _check_count(names: list[str], resolution: int, where: str, fix: str) -> None:
    limit = max_images_at(resolution)
    if len(names) > limit:
        raise SubjectImageError(
            f"{where} has {len(names):,} images, over the limit of {limit:,} at {resolution} px (crossed at "
            f"{names[limit]}; the crops stay in memory until training); {fix.format(limit=limit)}")


def _caption_subject(crops: list[torch.Tensor], names: list[str], instance_prompt: str, class_prompt: str,
                     resolution: int, flip: bool, captions: list[str | None] | None,
                     caption_sources: list[str] | None, reports: list[ImageReport],
                     tokenizer_dir: str | os.PathLike | None, bucketed: bool = False,
                     masks: list[torch.Tensor] | None = None) -> SubjectLoad:
    """The SubjectData of finished crops: captions (or the instance prompt) with the token rule."""
    prompt, class_prompt = check_prompts(instance_prompt, class_prompt)
    final_captions = []
    for i, report in enumerate(reports):
        caption = captions[i] if captions else None
        if caption is None or not caption.strip():
            caption, report.caption_source = prompt, (caption_sources[i] if caption_sources else "instance prompt")
        else:
            report.caption_source = caption_sources[i] if caption_sources else "caption"
            length = len(" ".join(caption.split()))
            if length > MAX_CAPTION_CHARS:
                raise SubjectImageError(f"the caption of {names[i]} is {length:,} characters, over the "
                                        f"{MAX_CAPTION_CHARS:,}-character limit; shorten it")
            caption, inserted = caption_with_token(caption, prompt, class_prompt)
            if inserted:
                report.warnings.append("caption lacked the instance token: instance prompt prepended")
        tokens, exact = count_clip_tokens(caption, tokenizer_dir)
        if tokens > CLIP_MAX_TOKENS:
            report.warnings.append(f"caption is {'' if exact else 'about '}{tokens} CLIP tokens; "
                                   f"only the first {CLIP_MAX_TOKENS} are used")
        report.caption = caption
        final_captions.append(caption)
    subject = SubjectData(images=tuple(crops), captions=tuple(final_captions), instance_prompt=prompt,
                          class_prompt=class_prompt, resolution=resolution, source_names=tuple(names),
                          flip=flip, bucketed=bucketed, masks=tuple(masks or ()))
    for report in reports:
        for warning in report.warnings:
            log.info("%s: %s", report.name, warning)
    return SubjectLoad(subject=subject, images=reports)


@dataclass
class _Cropped:
    """One usable photo of a folder, already cropped (its full-size pixels are gone)."""

    path: Path
    crop: torch.Tensor
    description: str
    found: str
    notes: list[str]  # from decoding
    warnings: list[str]  # from cropping
    mask: torch.Tensor | None = None  # its loss mask, cropped
    mask_source: str = ""


def load_subject(folder: str | os.PathLike, instance_prompt: str, class_prompt: str = "",
                 resolution: int = 512, max_images: int = 0, flip: bool = False,
                 crop_mode: str = "center", caption_mode: str = "instance prompt", on_bad: str = "stop",
                 tokenizer_dir: str | os.PathLike | None = None, max_pixels: int = MAX_PIXELS,
                 face_scale: float = FACE_SCALE, max_total_pixels: int = MAX_TOTAL_PIXELS,
                 loss_mask: str = "off", masks: list[torch.Tensor] | None = None) -> SubjectLoad:
    """The photos of `folder` (sorted by name, the first `max_images` if > 0) as a SubjectLoad.

    ``loss_mask`` "face": a soft box around each face; "mask": ``masks`` (one per image file of
    the folder, in name order, each of its photo's aspect ratio) or, without them, the files of
    the folder's ``masks/`` subfolder named as the photos (white counts, black does not).

    Photos are decoded, cropped and resized one at a time; only the crops are kept. Every unusable
    file is found before anything is returned; with `on_bad="stop"` they raise one
    SubjectImageError naming each of them, with `on_bad="skip"` they are left out and reported.
    Too many images, or more than `max_total_pixels` decoded pixels in all, is an error naming the
    file where the limit was crossed.
    """
    check_resolution(resolution)
    _check_choice("crop mode", crop_mode, CROP_MODES)
    _check_choice("caption mode", caption_mode, CAPTION_MODES)
    _check_choice("bad files", on_bad, BAD_FILE_MODES)
    _check_choice("loss mask", loss_mask, LOSS_MASKS)
    check_prompts(instance_prompt, class_prompt)
    name = Path(folder).name
    scan = scan_folder(folder)
    files = scan.images[:max_images] if max_images > 0 else scan.images
    if not files and not scan.problems:
        raise SubjectImageError(
            f"no images in {name!r}: put 3-20 photos (.png/.jpg/.webp) of the subject there")
    mask_files = _mask_files(Path(folder), files, masks) if loss_mask == "mask" else {}
    _check_count([p.name for p in files], resolution, f"subject folder {name!r}",
                 "set max images (class images, for a class folder) to {limit} or fewer, or move photos to "
                 "another folder")
    problems = list(scan.problems)
    notes = [f"{n}: ignored (not an image or .txt caption)" for n in scan.ignored]
    cropped: list[_Cropped] = []
    seen: dict[bytes, str] = {}  # file contents digest -> the usable photo with those bytes
    decoded_pixels = 0
    min_side = resolution // 2
    for path in files:

        def within_budget(width: int, height: int, path: Path = path, so_far: int = decoded_pixels) -> None:
            if so_far + width * height > max_total_pixels:
                raise SubjectImageError(
                    f"the photos of subject folder {name!r} up to {path.name} add up to "
                    f"{so_far + width * height:,} pixels, over the {max_total_pixels:,}-pixel limit "
                    "for one folder; set max images lower, or use fewer or smaller photos")

        try:
            digest = _file_digest(path)
        except OSError as exc:
            problems.append(f"{path.name}: cannot be read ({exc.strerror})")
            continue
        if digest in seen:
            notes.append(f"{path.name}: duplicate of {seen[digest]} (same file contents); used once")
            continue
        try:
            photo = read_photo(path, max_pixels, within_budget)
        except BadImageFile as exc:
            problems.append(f"{path.name}: {exc}")
            continue
        height, width = photo.height, photo.width
        decoded_pixels += height * width
        if min(height, width) < min_side:
            problems.append(f"{path.name}: {width}x{height} is smaller than half the resolution "
                            f"(short side must be at least {min_side}px); use a larger photo or a lower resolution")
            continue
        crop = crop_photo(photo, crop_mode, resolution, face_scale, find_face=loss_mask == "face")
        report = ImageReport(path.name)
        mask = None
        if loss_mask != "off":
            source = mask_files.get(path)
            if isinstance(source, Path):
                try:
                    source = mask_photo(read_photo(source, max_pixels).grey().astype(np.float32) / 255.0)
                except BadImageFile as exc:
                    raise SubjectImageError(f"the loss mask {MASK_FOLDER}/{source.name} of {path.name}: {exc}; "
                                            "fix or replace it") from None
            mask = _loss_mask(crop, loss_mask, source, photo, report)
        cropped.append(_Cropped(path, crop.image, crop.description, crop.found, photo.notes, crop.warnings + report.warnings,
                                mask, report.mask))
        seen[digest] = path.name
        del photo

    captions: list[str | None] = []
    sources: list[str] = []
    caption_warnings: dict[str, list[str]] = {}
    for item in cropped:
        path = item.path
        warnings = caption_warnings.setdefault(path.name, [])
        if caption_mode == "sidecar .txt":
            caption_path = scan.captions.get(nfc(path.stem))
            if caption_path is None:
                captions.append(None)
                sources.append("instance prompt (no caption file)")
                warnings.append(f"no {path.stem}.txt caption: instance prompt used")
            else:
                try:
                    text = read_caption(caption_path)
                except BadImageFile as exc:
                    problems.append(f"{caption_path.name}: {exc}")
                    warnings.append(f"{caption_path.name} unreadable: instance prompt used")
                    captions.append(None)
                    sources.append("instance prompt (caption unreadable)")
                else:
                    if text.strip():
                        captions.append(text)
                        sources.append(caption_path.name)
                    else:
                        captions.append(None)
                        sources.append("instance prompt (caption file empty)")
                        warnings.append(f"{caption_path.name} is empty: instance prompt used")
        else:
            captions.append(None)
            sources.append("instance prompt")

    if caption_mode == "sidecar .txt":
        image_stems = {nfc(p.stem) for p in scan.images}
        notes += [f"{p.name}: caption file with no image of that name (orphan)"
                  for stem, p in sorted(scan.captions.items()) if stem not in image_stems]

    if problems and on_bad == "stop":
        raise SubjectImageError(
            f"{len(problems)} unusable file(s) in subject folder {name!r}; remove or fix them, or set "
            f"bad files to 'skip' to train without them: " + "; ".join(problems))
    if not cropped:
        raise SubjectImageError(f"no usable images in subject folder {name!r}: " + "; ".join(problems))

    reports = [ImageReport(item.path.name, crop=item.description, subject_found=item.found,
                           warnings=item.notes + caption_warnings.get(item.path.name, []) + item.warnings,
                           mask=item.mask_source)
               for item in cropped]
    load = _caption_subject([item.crop for item in cropped], [item.path.name for item in cropped],
                            instance_prompt, class_prompt, resolution, flip, captions, sources, reports,
                            tokenizer_dir, crop_mode == "bucket",
                            [item.mask for item in cropped if item.mask is not None])
    load.skipped = problems
    load.notes = notes
    for line in problems:
        log.warning("skipped %s", line)
    return load


def _mask_files(folder: Path, files: list[Path], masks: list[torch.Tensor] | None) -> dict[Path, Any]:
    """Each photo's loss mask: the MASK batch's item of the same position, or the file of the
    ``masks/`` subfolder with the photo's name (any image type); every photo must have one."""
    if masks is not None:
        if len(masks) != len(files):
            raise SubjectImageError(
                f"loss mask 'mask' needs one mask per photo: the folder has {len(files)} photos (in name order"
                f"{', after max images' if files else ''}) but the MASK batch has {len(masks)}; connect one "
                "of the same count, or leave it unconnected to use the masks/ subfolder")
        return dict(zip(files, masks, strict=True))
    where = folder / MASK_FOLDER
    scan = scan_folder(where) if where.is_dir() else FolderScan([], {}, [], [])
    if scan.problems:
        raise SubjectImageError(f"{MASK_FOLDER}/ of {folder.name!r}: " + "; ".join(scan.problems))
    by_stem = {nfc(p.stem): p for p in scan.images}
    missing = [p.name for p in files if nfc(p.stem) not in by_stem]
    if missing:
        raise SubjectImageError(
            f"loss mask 'mask': no mask for {len(missing)} photo(s) of {folder.name!r} ({', '.join(missing[:5])}); "
            f"put <photo name>.png (white = the subject) in {folder.name}/{MASK_FOLDER}/, or connect a MASK batch")
    return {p: by_stem[nfc(p.stem)] for p in files}


_DIGESTS: dict[tuple, bytes] = {}  # (path, inode, size, mtime) -> content digest; skips re-reading


def _file_digest(path: Path) -> bytes:
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        if len(_DIGESTS) > 10_000:
            _DIGESTS.clear()
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[key] = digest.digest()
    return _DIGESTS[key]


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """Changes when an image or caption file of the folder is added, removed, renamed or edited
    (by content, so touching a file or re-saving identical bytes does not re-run anything).
    Files are only re-read when their size, time or inode changed."""
    digest = hashlib.sha256()
    folder = Path(folder)
    if not folder.is_dir():
        return ""
    root = os.path.realpath(folder)
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        digest.update(entry.name.encode("utf-8", "surrogateescape") + b"\0")
        if not os.path.realpath(entry).startswith(root + os.sep):
            digest.update(b"<outside>")  # never read what a link points to outside the folder
        elif entry.is_file() and (entry.suffix.lower() in IMAGE_SUFFIXES or entry.suffix.lower() == CAPTION_SUFFIX):
            try:
                digest.update(_file_digest(entry))
            except OSError:
                digest.update(b"<unreadable>")
        digest.update(b"\n")
    return digest.hexdigest()
