"""The prepared subject photos a trainer learns from (ComfyUI custom type ``SUBJECT``)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# The UNet halves the latent 3 times and the VAE works at 1/8: sides must be multiples of 64.
RESOLUTION_MULTIPLE = 64
# Aspect-ratio buckets (crop mode "bucket"): every (height, width) of multiples of 64 whose area is
# 80-100% of the square's and whose long side is at most twice the short one. At 512 px: 512x512,
# 448x576, 384x576 (2:3), 384x640 and their transposes, 448x512, 512x448.
BUCKET_MIN_AREA = 0.8
BUCKET_MAX_RATIO = 2.0


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """The (height, width) buckets of a training resolution, squarest first."""
    area = resolution * resolution
    sides = range(RESOLUTION_MULTIPLE, 2 * resolution + 1, RESOLUTION_MULTIPLE)
    largest: dict[tuple[int, int], tuple[int, int]] = {}  # per aspect ratio, the largest
    for h in sides:
        for w in sides:
            if BUCKET_MIN_AREA * area <= h * w <= area and max(h, w) <= BUCKET_MAX_RATIO * min(h, w):
                key = (h // math.gcd(h, w), w // math.gcd(h, w))
                if key not in largest or h * w > largest[key][0] * largest[key][1]:
                    largest[key] = (h, w)
    return sorted(largest.values(), key=lambda hw: (abs(math.log(hw[0] / hw[1])), -hw[0] * hw[1], hw))


def nearest_bucket(height: int, width: int, resolution: int) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to height:width (in log ratio; ties: the taller)."""
    aspect = math.log(height / width)
    return min(bucket_sizes(resolution), key=lambda hw: (abs(math.log(hw[0] / hw[1]) - aspect), -hw[0]))


@dataclass(frozen=True, eq=False)
class SubjectData:
    """Crops of one subject with their captions and prompts, ready to train on.

    ``images`` are float32 HxWx3 tensors in [0, 1] (ComfyUI's IMAGE layout without the batch
    dimension), all ``resolution`` x ``resolution``, or with ``bucketed`` each one of the
    :func:`bucket_sizes` of ``resolution``. ``masks`` are empty (no masked loss) or one HxW float
    tensor in [0, 1] per image, of its size: how much each pixel counts in the loss (1 = the
    subject). Compared by identity; use :meth:`fingerprint` to compare contents.
    """

    images: tuple[torch.Tensor, ...]
    captions: tuple[str, ...]
    instance_prompt: str
    class_prompt: str
    resolution: int
    source_names: tuple[str, ...]
    flip: bool = False
    bucketed: bool = False
    masks: tuple[torch.Tensor, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "images", tuple(self.images))
        object.__setattr__(self, "captions", tuple(self.captions))
        object.__setattr__(self, "source_names", tuple(self.source_names))
        object.__setattr__(self, "masks", tuple(self.masks))
        if not self.images:
            raise ValueError("the subject has no images; add 3-20 photos of the subject")
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or self.resolution <= 0:
            raise ValueError(f"resolution must be a positive whole number, got {self.resolution!r}")
        if self.resolution % RESOLUTION_MULTIPLE:
            raise ValueError(
                f"resolution must be a multiple of {RESOLUTION_MULTIPLE} (e.g. 512), got {self.resolution}"
            )
        if len(self.captions) != len(self.images) or len(self.source_names) != len(self.images):
            raise ValueError(
                f"the subject has {len(self.images)} images but {len(self.captions)} captions and "
                f"{len(self.source_names)} source names; give one of each per image"
            )
        if not isinstance(self.instance_prompt, str) or not self.instance_prompt.strip():
            raise ValueError("instance_prompt is empty; describe the subject, e.g. 'a photo of sks dog'")
        if not isinstance(self.class_prompt, str):
            raise ValueError(f"class_prompt must be text, got {type(self.class_prompt).__name__}")
        square = (self.resolution, self.resolution, 3)
        buckets = bucket_sizes(self.resolution) if self.bucketed else []
        for image, name in zip(self.images, self.source_names, strict=True):
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            if self.bucketed and not (len(shape) == 3 and shape[2] == 3 and tuple(shape[:2]) in buckets):
                raise ValueError(f"image {name} has shape {shape}; with buckets every image must be one of the "
                                 f"(H, W) buckets of {self.resolution} px {buckets}, RGB")
            if not self.bucketed and shape != square:
                raise ValueError(f"image {name} has shape {shape}; every image must be {square} (H, W, RGB)")
            if not image.is_floating_point():
                raise ValueError(f"image {name} is {image.dtype}; images must be float in [0, 1]")
            if not bool(torch.isfinite(image).all()):
                raise ValueError(f"image {name} contains NaN or infinite pixels")
        if self.masks and len(self.masks) != len(self.images):
            raise ValueError(f"the subject has {len(self.images)} images but {len(self.masks)} loss masks; "
                             "give one mask per image or none")
        for mask, image, name in zip(self.masks, self.images, self.source_names, strict=False):
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(image.shape[:2]):
                shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"the loss mask of {name} has shape {shape}; it must be its image's "
                                 f"{tuple(image.shape[:2])} (H, W)")
            if not mask.is_floating_point() or not bool(torch.isfinite(mask).all()) or \
                    float(mask.min()) < 0 or float(mask.max()) > 1:
                raise ValueError(f"the loss mask of {name} must be float values in [0, 1]")
        for caption, name in zip(self.captions, self.source_names, strict=True):
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"the caption of {name} is empty; give it a caption or use the instance prompt")

    def __len__(self) -> int:
        return len(self.images)

    def pixels(self) -> torch.Tensor:
        """All images as one float32 Nx3xHxW tensor in [0, 1] on the CPU (all of one size)."""
        return torch.stack([image.detach().to("cpu", torch.float32) for image in self.images]).permute(0, 3, 1, 2)

    def sizes(self) -> list[tuple[int, int]]:
        """(height, width) of each image."""
        return [(int(image.shape[0]), int(image.shape[1])) for image in self.images]

    def uniform(self) -> bool:
        """Whether every image has the same size (always, without buckets)."""
        return len(set(self.sizes())) == 1

    def fingerprint(self) -> str:
        """SHA-256 over what training sees: pixels (as uint8), captions, prompts, resolution, flip."""
        digest = hashlib.sha256()
        header = {
            "captions": list(self.captions),
            "instance_prompt": self.instance_prompt,
            "class_prompt": self.class_prompt,
            "resolution": self.resolution,
            "flip": self.flip,
            "count": len(self.images),
        }
        if self.bucketed:  # only then: a subject without buckets keeps the fingerprint it always had
            header["buckets"] = [list(size) for size in self.sizes()]
        if self.masks:
            header["masks"] = len(self.masks)
        digest.update(json.dumps(header, sort_keys=True).encode("utf-8"))
        for image in (*self.images, *self.masks):
            quantised = (image.detach().to("cpu", torch.float32).clamp(0, 1) * 255).round().to(torch.uint8)
            digest.update(quantised.contiguous().numpy().tobytes())
        return digest.hexdigest()


def center_crop_resize(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """The largest centred square of an HxWx3 float image, resized to ``resolution`` (antialiased bicubic)."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {tuple(image.shape)}")
    height, width = int(image.shape[0]), int(image.shape[1])
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[top : top + side, left : left + side].to(torch.float32)
    if side == resolution:
        return square.clone()
    chw = square.permute(2, 0, 1).unsqueeze(0)
    resized = torch.nn.functional.interpolate(
        chw, size=(resolution, resolution), mode="bicubic", antialias=True, align_corners=False
    )
    return resized[0].permute(1, 2, 0).clamp(0.0, 1.0).contiguous()
