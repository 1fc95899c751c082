"""The prepared subject photos a trainer learns from (ComfyUI custom type ``SUBJECT``)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# The UNet halves the latent 3 times and the VAE works at 1/8: sides must be multiples of 64.
RESOLUTION_MULTIPLE = 64


@dataclass(frozen=True, eq=False)
class SubjectData:
    """Square crops of one subject with their captions and prompts, ready to train on.

    ``images`` are float32 HxWx3 tensors in [0, 1] (ComfyUI's IMAGE layout without the batch
    dimension), all ``resolution`` x ``resolution``. Compared by identity; use :meth:`fingerprint`
    to compare contents.
    """

    images: tuple[torch.Tensor, ...]
    captions: tuple[str, ...]
    instance_prompt: str
    class_prompt: str
    resolution: int
    source_names: tuple[str, ...]
    flip: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "images", tuple(self.images))
        object.__setattr__(self, "captions", tuple(self.captions))
        object.__setattr__(self, "source_names", tuple(self.source_names))
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
        expected = (self.resolution, self.resolution, 3)
        for image, name in zip(self.images, self.source_names, strict=True):
            if not isinstance(image, torch.Tensor) or tuple(image.shape) != expected:
                shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
                raise ValueError(f"image {name} has shape {shape}; every image must be {expected} (H, W, RGB)")
            if not image.is_floating_point():
                raise ValueError(f"image {name} is {image.dtype}; images must be float in [0, 1]")
            if not bool(torch.isfinite(image).all()):
                raise ValueError(f"image {name} contains NaN or infinite pixels")
        for caption, name in zip(self.captions, self.source_names, strict=True):
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"the caption of {name} is empty; give it a caption or use the instance prompt")

    def __len__(self) -> int:
        return len(self.images)

    def pixels(self) -> torch.Tensor:
        """All images as one float32 Nx3xHxW tensor in [0, 1] on the CPU."""
        return torch.stack([image.detach().to("cpu", torch.float32) for image in self.images]).permute(0, 3, 1, 2)

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
        digest.update(json.dumps(header, sort_keys=True).encode("utf-8"))
        for image in self.images:
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
