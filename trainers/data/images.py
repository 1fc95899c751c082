"""Reading subject photos (a folder, or decoded images) into a SubjectData, with a report.

What a folder of real photos throws at a trainer, and what happens to it here:

- Decoding: every image is fully decoded (truncated files fail here, not during training), EXIF
  orientation is applied, transparency is composited on ``BACKGROUND_RGB``, 16-bit images are
  scaled from 0-65535 at full depth (16-bit colour PNGs through OpenCV, which keeps all 16 bits
  where Pillow keeps 8), palette / CMYK / LA / greyscale are converted to RGB, and an image over
  ``max_pixels`` is refused before decoding (decompression-bomb guard).
- Unusable files (empty, truncated, not an image, undecodable, short side under half the
  resolution, too many pixels, links or names that resolve outside the folder) are collected by
  name. ``on_bad="stop"`` raises one :class:`SubjectImageError` listing all of them before
  anything is trained; ``on_bad="skip"`` leaves them out and reports them.
- Duplicates (same decoded pixels) are trained on once and reported.
- Crops: ``face`` (OpenCV Haar cascades: frontal face, then profile face, then cat face; a square
  ``face_scale`` times the detection's side, centred on it; centre crop when nothing is found,
  reported per image), ``center`` (largest centred square) or ``pad`` (whole image letterboxed on
  ``BACKGROUND_RGB``).
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..sd15.checkpoint import load_tokenizer
from .subject import SubjectData, center_crop_resize

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
CAPTION_SUFFIX = ".txt"
CROP_MODES = ("face", "center", "pad")
CAPTION_MODES = ("instance prompt", "sidecar .txt")
BAD_FILE_MODES = ("stop", "skip")
BACKGROUND_RGB = (255, 255, 255)  # transparency and letterbox padding are composited on white
MAX_PIXELS = 100_000_000  # larger images are refused before decoding (decompression bombs)
CLIP_MAX_TOKENS = 77  # including the start and end tokens
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

    def line(self) -> str:
        parts = [f"crop {self.crop}"]
        if self.subject_found:
            parts.append(self.subject_found)
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


def _check_prompt(instance_prompt: str) -> str:
    prompt = (instance_prompt or "").strip()
    if not prompt:
        raise SubjectImageError("instance prompt is empty: describe the subject, e.g. 'a photo of sks dog'")
    return prompt


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
        raise SubjectImageError(f"subject folder {str(folder)!r} does not exist")
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
def _on_background(rgba: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """HxWx4 float RGBA in [0, 1] -> RGB, transparency composited on BACKGROUND_RGB (with a note)."""
    alpha = rgba[..., 3:4]
    if float(alpha.min()) < 1.0:
        background = np.asarray(BACKGROUND_RGB, dtype=np.float32) / 255.0
        return rgba[..., :3] * alpha + background * (1.0 - alpha), [
            f"transparent pixels composited on RGB{BACKGROUND_RGB}"]
    return np.ascontiguousarray(rgba[..., :3]), []


def _to_rgb_float(im) -> tuple[np.ndarray, list[str]]:
    """Any Pillow mode -> HxWx3 float32 in [0, 1], with a note for what was converted."""
    notes = []
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im).astype(np.float32)
        if mode == "F" and arr.size and float(arr.max()) <= 1.0:
            scale = 1.0
        elif mode == "F" and arr.size and float(arr.max()) <= 255.0:
            scale = 255.0
        else:
            scale = 65535.0
        grey = np.clip(arr / scale, 0.0, 1.0)
        return np.repeat(grey[..., None], 3, axis=2), ["16-bit greyscale scaled to 0-1"]
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        return _on_background(np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0)
    if mode != "RGB":
        notes.append(f"converted from {mode} to RGB")
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0, notes


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


def _is_deep_colour_png(path: Path) -> bool:
    """A PNG with 16 bits per channel in colour (RGB or RGBA): Pillow would read it at 8 bits."""
    with open(path, "rb") as handle:
        head = handle.read(26)
    return len(head) == 26 and head[12:16] == b"IHDR" and head[24] == 16 and head[25] in (2, 6)


def _deep_colour_png(path: Path, orientation: int) -> tuple[np.ndarray, list[str]]:
    """A 16-bit RGB(A) PNG at full depth (OpenCV reads all 16 bits), upright, alpha on the background."""
    import cv2

    data = np.fromfile(path, dtype=np.uint8)
    decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.dtype != np.uint16 or decoded.ndim != 3:
        raise BadImageFile("damaged PNG (16-bit colour data cannot be read)")
    channels = decoded[..., [2, 1, 0, 3][: decoded.shape[2]]].astype(np.float32) / 65535.0  # BGR(A) -> RGB(A)
    channels = _UPRIGHT.get(orientation, lambda a: a)(channels)
    notes = ["16-bit colour scaled to 0-1"]
    if channels.shape[2] == 4:
        rgb, more = _on_background(channels)
        return np.ascontiguousarray(rgb, dtype=np.float32), notes + more
    return np.ascontiguousarray(channels, dtype=np.float32), notes


def decode_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, list[str]]:
    """Fully decoded RGB image, EXIF orientation applied, as HxWx3 float32 in [0, 1], plus notes.

    Raises BadImageFile with the reason when the file cannot be used.
    """
    from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

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
                raise BadImageFile(f"{width}x{height} is over the {max_pixels:,}-pixel limit "
                                   "(decompression-bomb guard); downscale it")
            notes = []
            if getattr(im, "n_frames", 1) > 1:
                notes.append(f"has {im.n_frames} frames; used the first")
            im.load()
            orientation = im.getexif().get(0x0112, 1)
            if orientation not in (None, 1):
                notes.append(f"turned upright from EXIF orientation {orientation}")
            if im.format == "PNG" and _is_deep_colour_png(path):
                rgb, more = _deep_colour_png(path, orientation)
            else:
                rgb, more = _to_rgb_float(ImageOps.exif_transpose(im))
            return rgb, notes + more
    except BadImageFile:
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
        raise BadImageFile(f"cannot be decoded ({exc})") from None
    except Exception as exc:  # Pillow raises SyntaxError, ValueError, ... for broken files
        raise BadImageFile(f"cannot be decoded ({type(exc).__name__}: {exc})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


# -- cropping -----------------------------------------------------------------------------------
@functools.cache
def _cascade(filename: str):
    import cv2

    classifier = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, filename))
    if classifier.empty():
        raise SubjectImageError(f"OpenCV cascade {filename} not found; install opencv-python 4.x (5.0 lacks it)")
    return classifier


def detect_subject(image: np.ndarray) -> tuple[str, tuple[int, int, int, int], int] | None:
    """(what was found, (x, y, w, h) of the largest detection, number of detections) or None.

    Frontal faces first, then profile faces (both directions), then cat faces.
    """
    import cv2

    grey = cv2.cvtColor((np.clip(image, 0, 1) * 255).round().astype(np.uint8), cv2.COLOR_RGB2GRAY)
    scale = 1.0
    longest = max(grey.shape)
    if longest > 1024:  # Haar cascades need no more; keeps big photos fast
        scale = 1024 / longest
        grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    grey = cv2.equalizeHist(grey)
    width = grey.shape[1]
    for kind, filename, neighbours, factor, mirrored in _CASCADES:
        min_side = 24 if kind == "cat face" else max(24, min(grey.shape) // 12)
        boxes = [tuple(int(v) for v in b) for b in _cascade(filename).detectMultiScale(
            grey, scaleFactor=factor, minNeighbors=neighbours, minSize=(min_side, min_side))]
        if mirrored:
            flipped = _cascade(filename).detectMultiScale(
                np.ascontiguousarray(grey[:, ::-1]), scaleFactor=factor, minNeighbors=neighbours,
                minSize=(min_side, min_side))
            boxes += [(width - int(x) - int(w), int(y), int(w), int(h)) for x, y, w, h in flipped]
        if boxes:
            x, y, w, h = max(boxes, key=lambda b: b[2] * b[3])
            return kind, tuple(int(round(v / scale)) for v in (x, y, w, h)), len(boxes)
    return None


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


def _resize_square(square: torch.Tensor, resolution: int) -> torch.Tensor:
    return center_crop_resize(square.contiguous(), resolution)


def pad_resize(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """The whole image, longest side scaled to `resolution`, centred on a BACKGROUND_RGB square."""
    height, width = int(image.shape[0]), int(image.shape[1])
    scale = resolution / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    chw = image.permute(2, 0, 1).unsqueeze(0).float()
    resized = torch.nn.functional.interpolate(chw, size=(new_h, new_w), mode="bicubic", antialias=True,
                                              align_corners=False)[0].permute(1, 2, 0).clamp(0, 1)
    canvas = torch.tensor(BACKGROUND_RGB, dtype=torch.float32).div(255).expand(resolution, resolution, 3).clone()
    top, left = (resolution - new_h) // 2, (resolution - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = resized
    return canvas


def crop_image(image: torch.Tensor, mode: str, resolution: int,
               face_scale: float = FACE_SCALE) -> tuple[torch.Tensor, str, str, list[str]]:
    """(crop, crop description, what the face search found, warnings) for one HxWx3 image."""
    height, width = int(image.shape[0]), int(image.shape[1])
    if mode == "pad":
        return pad_resize(image, resolution), f"pad (whole {width}x{height} image letterboxed)", "", []
    if mode == "center":
        return center_crop_resize(image, resolution), "center", "", []
    found = detect_subject(image.numpy())
    if found is None:
        return (center_crop_resize(image, resolution), "center (fallback)",
                "no face found, fell back to centre crop", ["no face found: centre crop used; check the crop"])
    kind, box, count = found
    top, left, side = square_around(box, height, width, face_scale)
    crop = _resize_square(image[top:top + side, left:left + side], resolution)
    found_text = f"{kind} found at x={box[0]} y={box[1]} size={box[2]}x{box[3]}"
    if count > 1:
        found_text += f" (largest of {count} detections)"
    return crop, f"face ({side}x{side} at x={left} y={top})", found_text, []


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


def read_caption(path: Path) -> str:
    """Text of a caption file (UTF-8, BOM allowed); raises BadImageFile when it is not UTF-8 text."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadImageFile("caption is not UTF-8 text; re-save it as UTF-8") from None
    except OSError as exc:
        raise BadImageFile(f"caption cannot be read ({exc.strerror})") from None


# -- building the subject -----------------------------------------------------------------------
def prepare_subject(images: list[torch.Tensor], names: list[str], instance_prompt: str,
                    class_prompt: str = "", resolution: int = 512, crop_mode: str = "center",
                    flip: bool = False, captions: list[str | None] | None = None,
                    caption_sources: list[str] | None = None, reports: list[ImageReport] | None = None,
                    tokenizer_dir: str | os.PathLike | None = None,
                    face_scale: float = FACE_SCALE) -> SubjectLoad:
    """Crop decoded HxWx3 images and caption them. A caption of None means the instance prompt."""
    check_resolution(resolution)
    _check_choice("crop mode", crop_mode, CROP_MODES)
    prompt = _check_prompt(instance_prompt)
    class_prompt = (class_prompt or "").strip()
    if not images:
        raise SubjectImageError("no subject images: give 3-20 photos of the subject")
    reports = reports or [ImageReport(name) for name in names]
    crops, final_captions = [], []
    for i, (image, report) in enumerate(zip(images, reports, strict=True)):
        image = image.detach().float().cpu()[..., :3]
        crop, report.crop, report.subject_found, warnings = crop_image(image, crop_mode, resolution, face_scale)
        report.warnings += warnings
        crops.append(crop)
        caption = captions[i] if captions else None
        if caption is None or not caption.strip():
            caption, report.caption_source = prompt, (caption_sources[i] if caption_sources else "instance prompt")
        else:
            report.caption_source = caption_sources[i] if caption_sources else "caption"
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
                          flip=flip)
    for report in reports:
        for warning in report.warnings:
            log.info("%s: %s", report.name, warning)
    return SubjectLoad(subject=subject, images=reports)


def load_subject(folder: str | os.PathLike, instance_prompt: str, class_prompt: str = "",
                 resolution: int = 512, max_images: int = 0, flip: bool = False,
                 crop_mode: str = "center", caption_mode: str = "instance prompt", on_bad: str = "stop",
                 tokenizer_dir: str | os.PathLike | None = None, max_pixels: int = MAX_PIXELS,
                 face_scale: float = FACE_SCALE) -> SubjectLoad:
    """The photos of `folder` (sorted by name, the first `max_images` if > 0) as a SubjectLoad.

    Every unusable file is found before anything is returned; with `on_bad="stop"` they raise one
    SubjectImageError naming each of them, with `on_bad="skip"` they are left out and reported.
    """
    check_resolution(resolution)
    _check_choice("crop mode", crop_mode, CROP_MODES)
    _check_choice("caption mode", caption_mode, CAPTION_MODES)
    _check_choice("bad files", on_bad, BAD_FILE_MODES)
    _check_prompt(instance_prompt)
    name = Path(folder).name
    scan = scan_folder(folder)
    files = scan.images[:max_images] if max_images > 0 else scan.images
    if not files and not scan.problems:
        raise SubjectImageError(
            f"no images in {name!r}: put 3-20 photos (.png/.jpg/.webp) of the subject there")
    problems = list(scan.problems)
    notes = [f"{n}: ignored (not an image or .txt caption)" for n in scan.ignored]
    decoded, seen = [], {}
    min_side = resolution // 2
    for path in files:
        try:
            rgb, file_notes = decode_image(path, max_pixels)
        except BadImageFile as exc:
            problems.append(f"{path.name}: {exc}")
            continue
        height, width = rgb.shape[:2]
        if min(height, width) < min_side:
            problems.append(f"{path.name}: {width}x{height} is smaller than half the resolution "
                            f"(short side must be at least {min_side}px); use a larger photo or a lower resolution")
            continue
        digest = hashlib.sha256((rgb * 255).round().astype(np.uint8).tobytes()
                                + f"{height}x{width}".encode()).hexdigest()
        if digest in seen:
            notes.append(f"{path.name}: duplicate of {seen[digest]} (same pixels); used once")
            continue
        seen[digest] = path.name
        decoded.append((path, rgb, file_notes))

    captions: list[str | None] = []
    sources: list[str] = []
    kept: list[tuple[Path, np.ndarray, list[str]]] = []
    caption_warnings: dict[str, list[str]] = {}
    for path, rgb, file_notes in decoded:
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
        kept.append((path, rgb, file_notes))

    if caption_mode == "sidecar .txt":
        image_stems = {nfc(p.stem) for p in scan.images}
        notes += [f"{p.name}: caption file with no image of that name (orphan)"
                  for stem, p in sorted(scan.captions.items()) if stem not in image_stems]

    if problems:
        if on_bad == "stop":
            raise SubjectImageError(
                f"{len(problems)} unusable file(s) in subject folder {name!r}; remove or fix them, or set "
                f"bad files to 'skip' to train without them: " + "; ".join(problems))
        bad_names = {p.split(": ", 1)[0] for p in problems}
        keep = [i for i, (path, _, _) in enumerate(kept) if path.name not in bad_names]
        kept = [kept[i] for i in keep]
        captions = [captions[i] for i in keep]
        sources = [sources[i] for i in keep]
    if not kept:
        raise SubjectImageError(f"no usable images in subject folder {name!r}: " + "; ".join(problems))

    reports = []
    for path, _, file_notes in kept:
        report = ImageReport(path.name, warnings=list(file_notes) + caption_warnings.get(path.name, []))
        reports.append(report)
    load = prepare_subject([torch.from_numpy(np.ascontiguousarray(rgb)) for _, rgb, _ in kept],
                           [p.name for p, _, _ in kept], instance_prompt, class_prompt, resolution,
                           crop_mode, flip, captions, sources, reports, tokenizer_dir, face_scale)
    load.skipped = problems
    load.notes = notes
    for line in problems:
        log.warning("skipped %s", line)
    return load


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
