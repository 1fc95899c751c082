"""Subject photo loading: decoding, face/centre/pad crops, captions, a catalogue of bad inputs, and
hostile ones (bomb photos, huge folders, prompts and captions)."""

from __future__ import annotations

import io
import os
import re
import struct
import threading
import time
import unicodedata
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from tests.support.paths import tokenizer_dir
from trainers.data import images
from trainers.data.images import (
    BACKGROUND_RGB,
    FACE_SCALE,
    MAX_CAPTION_CHARS,
    MAX_PIXELS,
    MAX_PROMPT_CHARS,
    MAX_TOTAL_PIXELS,
    SubjectImageError,
    caption_with_token,
    folder_fingerprint,
    instance_token,
    load_subject,
    max_images_at,
    prepare_subject,
    read_photo,
)
from trainers.data.subject import center_crop_resize

pytestmark = pytest.mark.trainers

PROMPT, CLASS = "a photo of sks toy", "a photo of toy"
RES = 64


def photo(seed: int, size=(96, 80), mode="RGB") -> Image.Image:
    """A distinct small photo-like image (smooth gradient + colour per seed)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    base = rng.integers(30, 220, size=3)
    arr = np.stack([(base[c] + (xx * (c + 1) + yy * (3 - c)) % 35) for c in range(3)], -1)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8)).convert(mode)


def good_folder(folder, count=2):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo(i).save(folder / f"good{i}.png")
    return folder


def decode_image(path):
    """The whole photo as float RGB (small test images only), with its notes."""
    photo = read_photo(path)
    return photo.region(0, 0, photo.height, photo.width), photo.notes


def load(folder, **kw):
    kw.setdefault("resolution", RES)
    return load_subject(folder, PROMPT, CLASS, **kw)


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


# -- the catalogue of bad files: each is named in the error (stop) and left out (skip) -------------
def _outside_link(folder, tmp):
    target = tmp / "outside.png"
    photo(9).save(target)
    os.symlink(target, folder / "link.png")
    return "link.png"


def _link_to_system_file(folder, tmp):
    os.symlink("/etc/hostname", folder / "hostname.png")
    return "hostname.png"


def _corrupt_png_data(folder, tmp):
    data = bytearray(png_bytes(photo(5)))
    start = data.index(b"IDAT") + 8
    data[start:start + 40] = b"\xff" * 40
    (folder / "corrupt.png").write_bytes(bytes(data))
    return "corrupt.png"


BAD_FILES = {
    "zero_bytes": (lambda f, t: (f / "empty.png").write_bytes(b"") and "empty.png" or "empty.png",
                   "empty.png: empty file (0 bytes)"),
    "truncated_jpeg": (lambda f, t: (f / "cut.jpg").write_bytes(jpeg_bytes(photo(3))[:400]) and "cut.jpg",
                       "cut.jpg: truncated"),
    "truncated_png": (lambda f, t: (f / "cut.png").write_bytes(png_bytes(photo(4))[:300]) and "cut.png",
                      "cut.png: truncated"),
    "text_named_png": (lambda f, t: (f / "notes.png").write_text("shopping list\n") and "notes.png",
                       "notes.png: not an image"),
    "random_bytes_jpg": (lambda f, t: (f / "noise.jpg").write_bytes(os.urandom(2000)) and "noise.jpg",
                         "noise.jpg: not an image"),
    "jpeg_header_only": (lambda f, t: (f / "stub.jpg").write_bytes(b"\xff\xd8\xff\xe0") and "stub.jpg",
                         "stub.jpg: damaged JPEG"),
    "html_named_webp": (lambda f, t: (f / "page.webp").write_text("<html><body>404</body></html>") and "page.webp",
                        "page.webp: not an image"),
    "png_header_only": (lambda f, t: (f / "header.png").write_bytes(png_bytes(photo(6))[:33]) and "header.png",
                        "header.png: damaged PNG (starts like one but cannot be read"),
    "corrupt_png_data": (_corrupt_png_data, "corrupt.png: cannot be decoded (broken data stream"),
    "too_small": (lambda f, t: photo(7, size=(20, 20)).save(f / "tiny.png") or "tiny.png",
                  "tiny.png: 20x20 is smaller than half the resolution (short side must be at least 32px)"),
    "too_narrow": (lambda f, t: photo(8, size=(300, 20)).save(f / "strip.png") or "strip.png",
                   "strip.png: 300x20 is smaller than half the resolution"),
    "link_outside_folder": (_outside_link, "link.png: resolves outside the subject folder"),
    "link_to_system_file": (_link_to_system_file, "hostname.png: resolves outside the subject folder"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_stops_with_an_error_naming_it(tmp_path, case):
    folder = good_folder(tmp_path / "subject")
    make, expected = BAD_FILES[case]
    make(folder, tmp_path)
    with pytest.raises(SubjectImageError) as info:
        load(folder)
    message = str(info.value)
    assert expected in message
    assert "1 unusable file(s) in subject folder 'subject'" in message
    assert "good0.png" not in message and "good1.png" not in message


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_skipped_and_reported_on_request(tmp_path, case):
    folder = good_folder(tmp_path / "subject")
    make, expected = BAD_FILES[case]
    name = make(folder, tmp_path)
    result = load(folder, on_bad="skip")
    assert result.subject.source_names == ("good0.png", "good1.png")
    assert len(result.skipped) == 1 and result.skipped[0].startswith(expected)
    assert f"SKIPPED {name}: " in result.report()


def test_too_many_pixels_is_refused_before_decoding(tmp_path):
    folder = good_folder(tmp_path / "subject")
    photo(1, size=(400, 300)).save(folder / "big.png")
    with pytest.raises(SubjectImageError, match=r"big.png: 400x300 is over the 100,000-pixel limit"):
        load(folder, max_pixels=100_000)


def test_every_bad_file_is_listed_in_one_error(tmp_path):
    folder = good_folder(tmp_path / "subject")
    (folder / "a.png").write_bytes(b"")
    (folder / "b.jpg").write_text("not a photo")
    photo(3, size=(10, 10)).save(folder / "c.png")
    with pytest.raises(SubjectImageError) as info:
        load(folder)
    message = str(info.value)
    assert message.startswith("3 unusable file(s)")
    for part in ("a.png: empty", "b.jpg: not an image", "c.png: 10x10"):
        assert part in message
    assert "'skip'" in message  # says how to go on without them


def test_caption_that_is_not_utf8_is_named(tmp_path):
    folder = good_folder(tmp_path / "subject")
    (folder / "good0.txt").write_bytes("a photo of sks toy, caf\xe9".encode("latin-1"))
    with pytest.raises(SubjectImageError, match=r"good0.txt: caption is not UTF-8 text"):
        load(folder, caption_mode="sidecar .txt")
    result = load(folder, caption_mode="sidecar .txt", on_bad="skip")
    assert result.subject.captions[0] == PROMPT
    assert "good0.txt unreadable" in result.report()


def test_all_files_bad_with_skip_is_still_an_error(tmp_path):
    folder = tmp_path / "subject"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    with pytest.raises(SubjectImageError, match=r"no usable images in subject folder 'subject': a.png: empty"):
        load(folder, on_bad="skip")


def test_empty_folder_says_what_to_put_there(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SubjectImageError, match=r"no images in 'empty': put 3-20 photos"):
        load(tmp_path / "empty")


def test_missing_folder(tmp_path):
    with pytest.raises(SubjectImageError, match="does not exist"):
        load(tmp_path / "nope")


@pytest.mark.parametrize("kwargs,expected", [
    ({"resolution": 100}, "resolution must be a multiple of 64"),
    ({"resolution": 0}, "resolution must be a multiple of 64"),
    ({"crop_mode": "smart"}, "crop mode must be one of"),
    ({"caption_mode": "blip"}, "caption mode must be one of"),
    ({"on_bad": "ignore"}, "bad files must be one of"),
])
def test_bad_settings_are_named(tmp_path, kwargs, expected):
    with pytest.raises(SubjectImageError, match=expected):
        load(good_folder(tmp_path / "s"), **kwargs)


def test_empty_instance_prompt(tmp_path):
    with pytest.raises(SubjectImageError, match="instance prompt is empty"):
        load_subject(good_folder(tmp_path / "s"), "  ", CLASS, RES)


def test_duplicates_are_used_once_and_reported(tmp_path):
    folder = good_folder(tmp_path / "subject")
    (folder / "copy.png").write_bytes((folder / "good0.png").read_bytes())  # the same file twice
    result = load(folder)
    assert result.subject.source_names == ("copy.png", "good1.png")
    assert "good0.png: duplicate of copy.png (same file contents); used once" in result.notes


def test_other_files_hidden_files_and_subfolders_are_ignored(tmp_path):
    folder = good_folder(tmp_path / "subject")
    (folder / "readme.md").write_text("my cat")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "old").mkdir()
    photo(4).save(folder / "old" / "x.png")
    result = load(folder)
    assert result.subject.source_names == ("good0.png", "good1.png")
    assert result.notes == ["readme.md: ignored (not an image or .txt caption)"]


def test_uppercase_suffix_and_max_images(tmp_path):
    folder = good_folder(tmp_path / "subject", count=3)
    photo(7).save(folder / "a.JPG", "JPEG")
    assert load(folder).subject.source_names == ("a.JPG", "good0.png", "good1.png", "good2.png")
    assert load(folder, max_images=2).subject.source_names == ("a.JPG", "good0.png")


def test_multi_frame_tiff_uses_the_first_frame(tmp_path):
    folder = good_folder(tmp_path / "subject")
    frames = [photo(10), photo(11)]
    frames[0].save(folder / "stack.tif", save_all=True, append_images=frames[1:])
    result = load(folder)
    report = result.images[result.subject.source_names.index("stack.tif")]
    assert "has 2 frames; used the first" in report.warnings
    rgb, _ = decode_image(folder / "stack.tif")
    first, second = (np.asarray(frame, dtype=np.float32) / 255 for frame in frames)
    assert np.array_equal(rgb, first) and not np.array_equal(rgb, second)


# -- modes and bit depths ------------------------------------------------------------------------
def test_exif_rotated_photo_comes_out_upright(tmp_path):
    upright = Image.new("RGB", (80, 120), (220, 30, 30))
    upright.paste((30, 30, 220), (0, 60, 80, 120))  # top red, bottom blue
    stored = upright.rotate(90, expand=True)  # what a phone writes with orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    rgb, notes = decode_image(tmp_path / "phone.jpg")
    assert rgb.shape == (120, 80, 3)
    assert rgb[:50, :, 0].mean() > 0.8 and rgb[70:, :, 2].mean() > 0.8
    assert "turned upright from EXIF orientation 6" in notes


@pytest.mark.parametrize("writer", ["pillow_grey16", "opencv_rgb48", "opencv_rgba64", "opencv_rgba64_transparent"])
def test_16_bit_png_keeps_its_tones(tmp_path, writer):
    """Ramps whose values are not multiples of 257 and differ per channel: 8-bit truncation,
    a wrong scale or swapped channels all show up pixel by pixel."""
    import cv2

    ramp = (np.arange(96 * 96, dtype=np.int64).reshape(96, 96) * 613 + 5) % 65536
    if writer == "pillow_grey16":
        Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / "deep.png")
        expected = np.repeat(ramp[..., None], 3, axis=2) / 65535
    else:
        rgb16 = np.stack([ramp, 65535 - ramp, (ramp * 7 + 1000) % 65536], axis=-1)
        alpha = np.full_like(ramp, 65535)
        if writer == "opencv_rgba64_transparent":  # the left half fades out: composited on the background
            alpha[:, :48] = (np.arange(48) * 1365)[None, :]
        if writer.startswith("opencv_rgba64"):
            rgb16 = np.concatenate([rgb16, alpha[..., None]], axis=-1)
        order = [2, 1, 0, 3][: rgb16.shape[-1]]  # OpenCV writes BGR(A)
        cv2.imwrite(str(tmp_path / "deep.png"), rgb16[..., order].astype(np.uint16))
        a = alpha[..., None] / 65535
        expected = rgb16[..., :3] / 65535 * a + np.array(BACKGROUND_RGB) / 255 * (1 - a)
    rgb, _ = decode_image(tmp_path / "deep.png")
    assert rgb.shape == (96, 96, 3)
    assert np.abs(rgb - expected).max() < 1e-6  # 8 bits would be off by up to 1/255


def test_rgba_png_composites_on_the_fixed_background(tmp_path):
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    rgba.paste((200, 0, 0, 255), (16, 16, 48, 48))
    rgba.save(tmp_path / "cutout.png")
    rgb, notes = decode_image(tmp_path / "cutout.png")
    assert np.allclose(rgb[0, 0], np.array(BACKGROUND_RGB) / 255)
    assert np.allclose(rgb[32, 32], [200 / 255, 0, 0])
    assert any("composited" in n for n in notes)


@pytest.mark.parametrize("mode,expected_pixel", [
    ("L", None), ("1", None), ("CMYK", None), ("P", None), ("LA", BACKGROUND_RGB), ("PA", BACKGROUND_RGB),
])
def test_other_modes_convert_to_rgb(tmp_path, mode, expected_pixel):
    img = photo(3, size=(64, 64))
    if mode in ("LA", "PA"):
        rgba = img.convert("RGBA")
        rgba.putpixel((0, 0), (10, 10, 10, 0))
        img = rgba.convert("LA") if mode == "LA" else rgba.convert("P").convert("PA")
        if mode == "PA":
            img.putpixel((0, 0), (img.getpixel((0, 0))[0], 0))
    else:
        img = img.convert(mode)
    suffix = "jpg" if mode == "CMYK" else ("tif" if mode == "PA" else "png")
    img.save(tmp_path / f"m.{suffix}")
    rgb, _ = decode_image(tmp_path / f"m.{suffix}")
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.float32
    # pixel for pixel what Pillow's own conversion gives (transparency composited on the background)
    with Image.open(tmp_path / f"m.{suffix}") as saved:
        rgba = np.asarray(saved.convert("RGBA"), dtype=np.float32) / 255
    alpha = rgba[..., 3:]
    expected = rgba[..., :3] * alpha + np.array(BACKGROUND_RGB, dtype=np.float32) / 255 * (1 - alpha)
    assert np.abs(rgb - expected).max() < 1e-6
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 1  # the photo, not a flat fill
    if expected_pixel:
        assert np.allclose(rgb[0, 0], np.array(expected_pixel) / 255)


def test_palette_png_with_transparent_index(tmp_path):
    img = Image.new("P", (64, 64), 0)
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    img.paste(1, (0, 0, 32, 64))
    img.save(tmp_path / "pal.png", transparency=0)
    rgb, _ = decode_image(tmp_path / "pal.png")
    assert np.allclose(rgb[10, 10], [0, 200 / 255, 0]) and np.allclose(rgb[10, 50], np.array(BACKGROUND_RGB) / 255)


# -- crops -----------------------------------------------------------------------------------
def _astronaut():
    from skimage import data

    return data.astronaut()


def _grace_hopper():
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        return np.asarray(Image.open(handle).convert("RGB"))


def _chelsea():
    from skimage import data

    return data.chelsea()


@pytest.mark.parametrize("source,kind,face_box", [
    # face boxes by eye on each photo (x0, y0, x1, y1)
    (_astronaut, "frontal face", (180, 70, 270, 160)),
    (_grace_hopper, "frontal face", (160, 110, 370, 330)),
    (_chelsea, "cat face", (270, 207, 337, 274)),
])
def test_face_crop_contains_the_face_on_real_photos(tmp_path, source, kind, face_box):
    image = source()
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(image).save(folder / "portrait.png")
    result = load_subject(folder, PROMPT, CLASS, 128, crop_mode="face")
    report = result.images[0]
    assert report.subject_found.startswith(f"{kind} found")
    # "... found at x=X y=Y size=WxH": the detection covers the face seen by eye
    found = re.search(r"at x=(\d+) y=(\d+) size=(\d+)x(\d+)", report.subject_found)
    x, y, w, h = (int(v) for v in found.groups())
    x0, y0, x1, y1 = face_box
    assert x <= (x0 + x1) / 2 <= x + w and y <= (y0 + y1) / 2 <= y + h
    # crop "face (SxS at x=L y=T)": FACE_SCALE times the detection, centred on it, kept in the image
    side, left, top = (int(v) for v in re.search(r"\((\d+)x\d+ at x=(\d+) y=(\d+)\)", report.crop).groups())
    height, width = image.shape[:2]
    wanted = round(max(w, h) * FACE_SCALE)
    assert side == min(wanted, height, width)
    if wanted < min(height, width):
        assert side < min(height, width)  # a real crop, not the whole short side
    for start, size, centre, limit in ((left, side, x + w / 2, width), (top, side, y + h / 2, height)):
        if 0 < start < limit - size:  # not pushed against an edge: centred on the face
            assert abs(start + size / 2 - centre) <= 1
        else:
            assert start in (0, limit - size) and start <= centre <= start + size
    assert left <= x0 and top <= y0 and left + side >= x1 and top + side >= y1
    # the trained pixels are exactly that square, resized
    square = torch.from_numpy(image[top:top + side, left:left + side].astype(np.float32) / 255)
    assert torch.equal(result.subject.images[0], center_crop_resize(square, 128))


def test_photo_without_a_face_falls_back_to_centre_and_says_so(tmp_path):
    from skimage import data

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(data.coffee()).save(folder / "coffee.png")
    result = load_subject(folder, PROMPT, CLASS, 128, crop_mode="face")
    assert result.images[0].crop == "center (fallback)"
    assert "coffee.png: crop center (fallback); no face found, fell back to centre crop" in result.report()
    centre = load_subject(folder, PROMPT, CLASS, 128, crop_mode="center").subject.images[0]
    assert torch.equal(result.subject.images[0], centre)


def test_pad_keeps_the_whole_image(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (128, 64), (0, 0, 255)).save(folder / "wide.png")
    crop = load(folder, crop_mode="pad").subject.images[0]
    assert crop.shape == (64, 64, 3)
    assert torch.allclose(crop[32, 32], torch.tensor([0.0, 0.0, 1.0]), atol=1e-3)
    assert torch.allclose(crop[2, 32], torch.tensor(BACKGROUND_RGB) / 255, atol=1e-3)


# -- captions -----------------------------------------------------------------------------------
def test_instance_token_rule():
    assert instance_token("a photo of sks woman face", "a photo of woman face") == "sks"
    assert instance_token("a photo of sks dog", "") == "a photo of sks dog"
    assert caption_with_token("sks dog on a beach", PROMPT, CLASS) == ("sks dog on a beach", False)
    assert caption_with_token("a dog on a beach", PROMPT, CLASS) == (f"{PROMPT}, a dog on a beach", True)
    assert caption_with_token("SKS toy,\n  red", PROMPT, CLASS) == ("SKS toy, red", False)


def test_sidecar_captions_matched_missing_empty_and_orphan(tmp_path):
    folder = good_folder(tmp_path / "subject", count=4)
    (folder / "good0.txt").write_text("sks toy on a table", encoding="utf-8")
    (folder / "good1.txt").write_text("a red toy in the grass", encoding="utf-8")
    (folder / "good2.txt").write_text("  \n", encoding="utf-8")
    (folder / "lost.txt").write_text("sks toy", encoding="utf-8")
    result = load(folder, caption_mode="sidecar .txt")
    assert result.subject.captions == ("sks toy on a table", f"{PROMPT}, a red toy in the grass", PROMPT, PROMPT)
    text = result.report()
    assert "good0.png: crop center; caption from good0.txt" in text
    assert "good1.png: crop center; caption from good1.txt; WARNING caption lacked the instance token" in text
    assert "good2.txt is empty: instance prompt used" in text
    assert "no good3.txt caption: instance prompt used" in text
    assert "NOTE lost.txt: caption file with no image of that name (orphan)" in text


def test_caption_names_match_after_unicode_normalisation(tmp_path):
    folder = tmp_path / "subject"
    folder.mkdir()
    photo(1).save(folder / (unicodedata.normalize("NFC", "café") + ".png"))
    (folder / (unicodedata.normalize("NFD", "café") + ".txt")).write_text("\ufeffsks toy in Paris", encoding="utf-8")
    result = load(folder, caption_mode="sidecar .txt")
    assert result.subject.captions == ("sks toy in Paris",)  # matched, BOM dropped
    assert result.notes == []


def test_long_caption_is_warned_with_the_clip_tokenizer(tmp_path):
    folder = good_folder(tmp_path / "subject", count=1)
    (folder / "good0.txt").write_text("sks toy " + "very " * 90, encoding="utf-8")
    result = load(folder, caption_mode="sidecar .txt", tokenizer_dir=tokenizer_dir())
    assert any(w.startswith("caption is 94 CLIP tokens; only the first 77 are used") for w in result.images[0].warnings)
    estimate = load(folder, caption_mode="sidecar .txt")
    assert any("about 94 CLIP tokens" in w for w in estimate.images[0].warnings)


# -- existing callers and IMAGE batches -----------------------------------------------------------
def test_the_folder_way_and_the_decoded_images_way_build_a_subject(tmp_path):
    folder = good_folder(tmp_path / "subject", count=2)
    (folder / "good0.txt").write_text("sks toy, side view", encoding="utf-8")
    subject = load_subject(folder, PROMPT, CLASS, RES, flip=True, caption_mode="sidecar .txt").subject
    assert subject.captions == ("sks toy, side view", PROMPT) and subject.flip
    raw = [torch.rand(80, 96, 3), torch.rand(70, 50, 3)]
    built = prepare_subject(raw, ["a", "b"], PROMPT, CLASS, RES).subject
    assert len(built) == 2 and built.images[1].shape == (RES, RES, 3)


def test_image_batch_gets_face_crops_and_a_report():
    image = torch.from_numpy(_astronaut().astype(np.float32) / 255)
    result = prepare_subject([image], ["batch[0]"], PROMPT, CLASS, 128, crop_mode="face")
    assert result.images[0].subject_found.startswith("frontal face found")
    assert result.report().splitlines()[1].startswith("batch[0]: crop face (")


# -- re-run detection -----------------------------------------------------------------------------
def test_fingerprint_changes_with_images_and_captions_only(tmp_path):
    folder = good_folder(tmp_path / "subject")
    (folder / "good0.txt").write_text("sks toy", encoding="utf-8")
    first = folder_fingerprint(folder)
    assert folder_fingerprint(folder) == first
    os.utime(folder / "good0.png", (time.time() + 5, time.time() + 5))  # touched, same bytes
    assert folder_fingerprint(folder) == first
    (folder / "good0.txt").write_text("sks toy, smiling", encoding="utf-8")
    after_caption = folder_fingerprint(folder)
    assert after_caption != first
    photo(5).save(folder / "good1.png")
    after_image = folder_fingerprint(folder)
    assert after_image != after_caption
    (folder / "good2.png").write_bytes((folder / "good1.png").read_bytes())
    assert folder_fingerprint(folder) != after_image


# -- hostile and unlucky inputs: bounded memory, counts, pixels, prompts and captions --------------
def bomb_png(width: int, height: int, mark: int = 0) -> bytes:
    """A black 1-bit PNG of width x height with one white dash in row `mark` (so every mark makes
    a different file): a few KB on disk, width x height pixels once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)
    marked = b"\0\xff" + row[2:]
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(marked if y == mark else row) for y in range(height)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _rss_mb(pid: int | str = "self", field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith(field + ":"))


def peak_rss_above_baseline(work, pid: int | str = "self") -> float:
    """MB of resident memory that process `pid` gained at its peak while `work()` ran (VmRSS
    sampled every 10 ms, and the kernel's high-water mark when it can be reset)."""
    baseline = _rss_mb(pid)
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS
        hwm_reset = True
    except OSError:
        hwm_reset = False
    peak, done = [baseline], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb(pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        work()
    finally:
        done.set()
        sampler.join()
    if hwm_reset:
        peak[0] = max(peak[0], _rss_mb(pid, "VmHWM"))
    return peak[0] - baseline


def test_photo_over_the_pixel_limit_is_refused_from_its_header(tmp_path):
    """An 8001x8000 one-bit PNG (a few KB) is refused by its declared size alone: its pixel data
    here is garbage, which a decoder would have reported as damaged instead."""
    folder = good_folder(tmp_path / "subject")
    bomb = bomb_png(8001, 8000)
    start = bomb.index(b"IDAT") + 4
    (folder / "bomb.png").write_bytes(bomb[:start] + b"\x55" * 64 + bomb[start + 64:])
    with pytest.raises(SubjectImageError) as info:
        load(folder)
    assert "bomb.png: 8001x8000 is over the 64,000,000-pixel limit for one photo" in str(info.value)
    assert "downscale it" in str(info.value)
    skipped = load(folder, on_bad="skip")
    assert skipped.subject.source_names == ("good0.png", "good1.png")


def test_bomb_photos_under_the_limit_load_one_at_a_time(tmp_path):
    """Three distinct 7999x7999 one-bit PNGs (64 MP each, 24 KB in all) load with the working
    memory of about one of them: before, each was kept as 768 MB of float32 until cropping."""
    folder = tmp_path / "bombs"
    folder.mkdir()
    for i in range(3):
        (folder / f"bomb{i}.png").write_bytes(bomb_png(7999, 7999, mark=i))
    result = {}
    added = peak_rss_above_baseline(lambda: result.update(load=load(folder, resolution=512, crop_mode="center")))
    assert result["load"].subject.source_names == ("bomb0.png", "bomb1.png", "bomb2.png")
    assert result["load"].subject.images[0].shape == (512, 512, 3)
    assert added < 600, f"loading 3 bomb photos added {added:.0f} MB"


def test_total_decoded_pixels_of_a_folder_are_capped(tmp_path):
    """The third 96x80 photo would take the folder past 20,000 pixels: the error names it and the
    limit before it is decoded (its data is garbage, so decoding it would have said so)."""
    folder = good_folder(tmp_path / "subject", count=2)
    data = bytearray(png_bytes(photo(2)))
    start = data.index(b"IDAT") + 4
    data[start:start + 40] = b"\xff" * 40
    (folder / "good2.png").write_bytes(bytes(data))
    with pytest.raises(SubjectImageError) as info:
        load(folder, max_total_pixels=20_000, on_bad="skip")
    message = str(info.value)
    assert "the photos of subject folder 'subject' up to good2.png add up to 23,040 pixels" in message
    assert "over the 20,000-pixel limit for one folder" in message and "max images" in message
    assert len(load(folder, max_total_pixels=20_000, max_images=2).subject) == 2
    assert MAX_TOTAL_PIXELS >= 20 * MAX_PIXELS  # a folder of 20 photos at the per-photo limit still loads


@pytest.mark.parametrize("resolution,limit", [(64, 1000), (512, 1000), (1024, 250), (2048, 62)])
def test_image_count_is_capped_by_what_the_crops_take(tmp_path, resolution, limit):
    folder = tmp_path / "many"
    folder.mkdir()
    tiny = png_bytes(photo(1, size=(8, 8)))  # never decoded: the count is checked first
    for i in range(limit + 1):
        (folder / f"img{i:04d}.png").write_bytes(tiny)
    with pytest.raises(SubjectImageError) as info:
        load(folder, resolution=resolution)
    assert str(info.value) == (
        f"subject folder 'many' has {limit + 1:,} images, over the limit of {limit:,} at {resolution} px "
        f"(crossed at img{limit:04d}.png; the crops stay in memory until training); set max images (class "
        f"images, for a class folder) to {limit} or fewer, or move photos to another folder")
    assert max_images_at(resolution) == limit


def test_image_batch_count_is_capped():
    batch = [torch.zeros(64, 64, 3)] * 1001
    with pytest.raises(SubjectImageError, match=re.escape(
            "the image batch has 1,001 images, over the limit of 1,000 at 64 px (crossed at b1000;")):
        prepare_subject(batch, [f"b{i}" for i in range(1001)], PROMPT, CLASS, RES)
    assert len(prepare_subject(batch[:1000], [f"b{i}" for i in range(1000)], PROMPT, CLASS, RES).subject) == 1000


def test_duplicates_are_files_with_the_same_bytes(tmp_path):
    folder = tmp_path / "subject"
    folder.mkdir()
    photo(0).save(folder / "a.png")
    (folder / "b.png").write_bytes((folder / "a.png").read_bytes())
    photo(0).save(folder / "c.bmp")  # the same pixels in another file: a photo of its own
    result = load(folder)
    assert result.subject.source_names == ("a.png", "c.bmp")
    assert result.notes == ["b.png: duplicate of a.png (same file contents); used once"]


def test_duplicate_of_a_bad_file_is_reported_as_bad_too(tmp_path):
    folder = good_folder(tmp_path / "subject")
    (folder / "x.png").write_bytes(b"not a png")
    (folder / "y.png").write_bytes(b"not a png")
    result = load(folder, on_bad="skip")
    assert [s.split(":")[0] for s in result.skipped] == ["x.png", "y.png"]


@pytest.mark.parametrize("which", ["instance", "class"])
def test_over_long_prompts_are_refused_without_echoing_them(tmp_path, which):
    folder = good_folder(tmp_path / "subject")
    huge = "a photo of sks toy " * 1_900_000  # 36 MB
    prompts = (huge, CLASS) if which == "instance" else (PROMPT, huge)
    with pytest.raises(SubjectImageError) as info:
        load_subject(folder, *prompts, RES)
    message = str(info.value)
    assert message.startswith(f"{which} prompt is {len(huge.strip()):,} characters, over the "
                              f"{MAX_PROMPT_CHARS:,}-character limit")
    assert len(message) < 300
    with pytest.raises(SubjectImageError, match=f"{which} prompt is 1,001 characters"):
        prepare_subject([torch.rand(80, 80, 3)], ["a"], *(("x" * 1001, CLASS) if which == "instance"
                                                          else (PROMPT, "x" * 1001)), RES)
    at_limit = "sks " + "y" * (MAX_PROMPT_CHARS - 4)
    assert load_subject(folder, at_limit, "", RES).subject.instance_prompt == at_limit


def test_caption_file_too_big_to_hold_the_limit_is_not_read(tmp_path, monkeypatch):
    folder = good_folder(tmp_path / "subject")
    with open(folder / "good0.txt", "wb") as handle:
        handle.write(b"sks toy ")
        handle.truncate(1 << 20)  # 1 MB
    opened = []
    real_open = open

    def spy(file, *args, **kwargs):
        opened.append(os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    with pytest.raises(SubjectImageError) as info:
        load(folder, caption_mode="sidecar .txt")
    assert ("good0.txt: caption file is 1,048,576 bytes, too long for the 1,000-character caption limit "
            "(CLIP reads only the first 77 tokens); shorten it") in str(info.value)
    assert not any(name.endswith("good0.txt") for name in opened)
    result = load(folder, caption_mode="sidecar .txt", on_bad="skip")
    assert result.subject.captions == (PROMPT, PROMPT)
    assert "good0.txt unreadable: instance prompt used" in result.report()


def test_over_long_caption_is_a_bad_file(tmp_path):
    folder = good_folder(tmp_path / "subject")
    (folder / "good0.txt").write_text("sks toy " + "é" * (MAX_CAPTION_CHARS - 7), encoding="utf-8")
    (folder / "good1.txt").write_text("sks toy " + "é" * (MAX_CAPTION_CHARS - 8), encoding="utf-8")
    with pytest.raises(SubjectImageError) as info:
        load(folder, caption_mode="sidecar .txt")
    assert str(info.value).endswith("good0.txt: caption is 1,001 characters, over the 1,000-character limit "
                                    "(CLIP reads only the first 77 tokens); shorten it")
    result = load(folder, caption_mode="sidecar .txt", on_bad="skip")
    assert result.subject.captions[0] == PROMPT and len(result.subject.captions[1]) == MAX_CAPTION_CHARS
    with pytest.raises(SubjectImageError, match="the caption of a is 1,001 characters"):
        prepare_subject([torch.rand(80, 80, 3)], ["a"], PROMPT, CLASS, RES, captions=["sks " + "z" * 997])


# -- crops of normal photos are what they were: bit for bit a whole-image float conversion ---------
def _old_style_crop(path, mode, resolution, box=None):
    """What the loader made before photos were handled in bands: the whole photo as float32 in
    [0, 1] (upright, transparency on the background), then the crop resized from that."""
    if path.name.endswith("64.png"):  # 16-bit colour: OpenCV's BGRA, scaled from 0-65535
        import cv2

        rgba = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[..., [2, 1, 0, 3]].astype(np.float32) / 65535.0
    else:
        with Image.open(path) as im:
            rgba = np.asarray(ImageOps.exif_transpose(im).convert("RGBA"), dtype=np.float32) / 255
    alpha = rgba[..., 3:]
    whole = rgba[..., :3] * alpha + np.array(BACKGROUND_RGB, dtype=np.float32) / 255 * (1 - alpha)
    image = torch.from_numpy(np.ascontiguousarray(whole, dtype=np.float32))
    height, width = image.shape[:2]
    if mode == "pad":
        scale = resolution / max(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        chw = image.permute(2, 0, 1).unsqueeze(0)
        resized = torch.nn.functional.interpolate(chw, size=size, mode="bicubic", antialias=True,
                                                  align_corners=False)[0].permute(1, 2, 0).clamp(0, 1)
        canvas = torch.tensor(BACKGROUND_RGB, dtype=torch.float32).div(255).expand(resolution, resolution, 3).clone()
        top, left = (resolution - size[0]) // 2, (resolution - size[1]) // 2
        canvas[top:top + size[0], left:left + size[1]] = resized
        return canvas
    top, left, side = box
    return center_crop_resize(image[top:top + side, left:left + side], resolution)


@pytest.mark.parametrize("band_pixels", [1 << 22, 3000])  # one band, and many bands of a few rows
@pytest.mark.parametrize("kind", ["rgb", "rgba", "exif6", "grey", "rgba64"])
@pytest.mark.parametrize("mode", ["center", "face", "pad"])
def test_crops_are_bit_for_bit_what_they_were(tmp_path, monkeypatch, band_pixels, kind, mode):
    from skimage import data

    monkeypatch.setattr(images, "_BAND_PIXELS", band_pixels)
    portrait = np.asarray(Image.fromarray(data.astronaut()).resize((700, 620), Image.BICUBIC))
    folder = tmp_path / "photos"
    folder.mkdir()
    path = folder / {"exif6": "p.jpg", "rgba64": "p64.png"}.get(kind, "p.png")
    alpha = np.full(portrait.shape[:2], 255, dtype=np.uint8)
    alpha[:, :150] = np.linspace(0, 255, 150, dtype=np.uint8)[None, :]
    if kind == "rgb":
        Image.fromarray(portrait).save(path)
    elif kind == "grey":
        Image.fromarray(portrait).convert("L").save(path)
    elif kind == "rgba":
        Image.fromarray(np.dstack([portrait, alpha])).save(path)
    elif kind == "rgba64":  # values that are not multiples of 257: 8 bits would not reproduce them
        import cv2

        deep = np.minimum(np.dstack([portrait, alpha]).astype(np.int64) * 257 + 97, 65535).astype(np.uint16)
        cv2.imwrite(str(path), deep[..., [2, 1, 0, 3]])
    else:
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(portrait).rotate(90, expand=True).save(path, exif=exif, quality=95)
    result = load_subject(folder, PROMPT, CLASS, 128, crop_mode=mode)
    report = result.images[0]
    box = None
    if mode == "face":
        assert report.subject_found.startswith("frontal face found")
        side, left, top = (int(v) for v in re.search(r"\((\d+)x\d+ at x=(\d+) y=(\d+)\)", report.crop).groups())
        box = (top, left, side)
    elif mode == "center":
        with Image.open(path) as im:
            width, height = ImageOps.exif_transpose(im).size
        side = min(width, height)
        box = ((height - side) // 2, (width - side) // 2, side)
    assert torch.equal(result.subject.images[0], _old_style_crop(path, mode, 128, box)), report.crop


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_turned_upright_like_pillow_does(tmp_path, orientation):
    arr = np.arange(40 * 60 * 3, dtype=np.uint32).reshape(40, 60, 3) % 251
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr.astype(np.uint8)).save(tmp_path / "o.png", exif=exif)
    rgb, notes = decode_image(tmp_path / "o.png")
    with Image.open(tmp_path / "o.png") as im:
        expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.float32) / 255
    assert np.array_equal(rgb, expected)
    assert ("turned upright from EXIF orientation 6" in notes) == (orientation == 6)


def _png(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes, extra: bytes = b"") -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0))
            + extra + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_16_bit_colour_png_has_its_own_share_of_the_pixel_limit(tmp_path):
    """A 16-bit RGBA PNG takes 8 bytes a pixel and OpenCV's decoder holds it twice: one that
    declares 6000x6000 (36 MP: under the photo limit, over half of it) is refused from its header
    (its data is garbage, which decoding would have reported instead)."""
    folder = good_folder(tmp_path / "subject")
    (folder / "deep.png").write_bytes(_png(6000, 6000, 16, 6, zlib.compress(b"\x55" * 1000)))
    with pytest.raises(SubjectImageError) as info:
        load(folder)
    assert ("deep.png: 6000x6000 is over the 32,000,000-pixel limit for 16-bit colour PNGs (they take 8 bytes "
            "a pixel, twice, to decode); save it with 8 bits or downscale it") in str(info.value)
    (folder / "deep.png").write_bytes(_png(6000, 6000, 8, 6, zlib.compress(b"\x55" * 1000)))
    with pytest.raises(SubjectImageError, match="deep.png: truncated"):  # 8 bits: decoded, and found broken
        load(folder)


def test_16_bit_colour_png_keeps_its_exif_orientation(tmp_path):
    """16-bit colour PNGs are decoded by OpenCV alone; the orientation still comes from their eXIf."""
    import cv2

    ramp = (np.arange(40 * 60 * 3, dtype=np.int64).reshape(40, 60, 3) * 613 + 5) % 65536
    cv2.imwrite(str(tmp_path / "flat.png"), ramp[..., ::-1].astype(np.uint16))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = (tmp_path / "flat.png").read_bytes()
    payload = exif.tobytes()[6:]  # the TIFF structure, without the "Exif\0\0" prefix (as PNG stores it)
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload + struct.pack(">I", zlib.crc32(b"eXIf" + payload))
    (tmp_path / "turned.png").write_bytes(data[:33] + chunk + data[33:])  # right after IHDR
    rgb, notes = decode_image(tmp_path / "turned.png")
    assert "turned upright from EXIF orientation 6" in notes and "16-bit colour scaled to 0-1" in notes
    assert np.array_equal(rgb, np.rot90(ramp, -1).astype(np.float32) / np.float32(65535))
