"""Canny edge maps with OpenCV, in OpenCV's own threshold units (0-255).

The edges are those of `cv2.Canny` on the 8-bit RGB image, as ControlNet's Canny annotator
computes them (gradients on all three channels, the strongest wins). White edges on black.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Automatic thresholds: the classic "median +- 33 %" rule. With m the median of the grey image,
# low = max(0, (1 - 0.33) * m) and high = min(255, (1 + 0.33) * m), rounded to whole numbers.
AUTO_SIGMA = 0.33


class EdgeSettingsError(ValueError):
    """Thresholds, blur or image that Canny cannot work with; the message names the input."""


@dataclass(frozen=True)
class CannySettings:
    low_threshold: int = 100
    high_threshold: int = 200
    blur: int = 0  # Gaussian pre-blur kernel size: 0 = off, else odd 3-31
    auto_threshold: bool = False

    def __post_init__(self) -> None:
        for name in ("low_threshold", "high_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not 0 <= value <= 255:
                raise EdgeSettingsError(f"{name} must be a whole number from 0 to 255 (got {value!r})")
        if self.low_threshold > self.high_threshold and not self.auto_threshold:
            raise EdgeSettingsError(
                f"low_threshold ({self.low_threshold}) is above high_threshold ({self.high_threshold}): "
                "set low below high (OpenCV's usual ratio is 1:2, e.g. 100 / 200)")
        if self.blur != 0 and (not 3 <= self.blur <= 31 or self.blur % 2 == 0):
            raise EdgeSettingsError(f"blur must be 0 (off) or an odd kernel size from 3 to 31 (got {self.blur!r})")


def auto_thresholds(rgb: np.ndarray) -> tuple[int, int]:
    import cv2

    median = float(np.median(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)))
    return int(round(max(0.0, (1.0 - AUTO_SIGMA) * median))), int(round(min(255.0, (1.0 + AUTO_SIGMA) * median)))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] (ComfyUI's IMAGE) to 8-bit, exactly inverting x / 255."""
    return np.clip(np.rint(np.asarray(images, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def canny_edges(images: np.ndarray, settings: CannySettings) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Edge maps of a batch of 8-bit RGB images (B x H x W x 3) -> (B x H x W uint8 0/255, thresholds
    used per image)."""
    import cv2

    if images.ndim != 4 or images.shape[-1] != 3:
        raise EdgeSettingsError(f"image must be a batch of RGB images (B x H x W x 3), got shape {images.shape}")
    if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise EdgeSettingsError(f"image is empty (shape {images.shape}): connect an image with pixels")
    edges, used = [], []
    for rgb in images:
        rgb = np.ascontiguousarray(rgb)
        if settings.blur:
            rgb = cv2.GaussianBlur(rgb, (settings.blur, settings.blur), 0)
        low, high = auto_thresholds(rgb) if settings.auto_threshold else (settings.low_threshold,
                                                                          settings.high_threshold)
        edges.append(cv2.Canny(rgb, low, high))
        used.append((low, high))
    return np.stack(edges), used
