"""Loss curves drawn with PIL (matplotlib is not a dependency of the pack)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_BACKGROUND = (255, 255, 255)
_AXES = (60, 60, 60)
_GRID = (228, 228, 228)
_TEXT = (30, 30, 30)
# (raw line, smoothed line) colours per curve; the first curve is the main loss.
_PALETTE = [
    ((170, 196, 230), (31, 100, 200)),
    ((245, 200, 160), (220, 110, 20)),
    ((170, 220, 170), (40, 150, 40)),
    ((225, 170, 200), (170, 40, 120)),
]


def smooth(values: Sequence[float], weight: float | None = None) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard-style); weight from the length."""
    if weight is None:
        weight = min(0.98, max(0.0, 1.0 - 10.0 / max(len(values), 1)))
    out, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**count) if weight < 1 else value)
    return out


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    if not math.isfinite(low) or not math.isfinite(high):
        return []
    if high <= low:
        return [low]
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.001:
        return f"{value:.1e}"
    return f"{value:.4g}"


def loss_curve_image(
    losses: Sequence[float],
    title: str = "training loss",
    extra_curves: dict[str, Sequence[float]] | None = None,
    width: int = 512,
    height: int = 320,
) -> torch.Tensor:
    """A 1 x height x width x 3 float image in [0, 1] (ComfyUI IMAGE) of per-step losses.

    Draws each curve's raw values faintly and its moving average boldly, with axes, ticks, a
    title and a legend when there are several curves. Non-finite values are skipped; one step
    is drawn as a dot; no steps gives an empty chart saying so.
    """
    from PIL import Image, ImageDraw, ImageFont

    width, height = max(int(width), 160), max(int(height), 120)
    curves: dict[str, list[float]] = {"loss": [float(v) for v in losses]}
    for name, values in (extra_curves or {}).items():
        curves[name] = [float(v) for v in values]

    image = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, right, top, bottom = 58, width - 12, 26, height - 34

    draw.text((left, 6), title, fill=_TEXT, font=font)
    finite = [v for values in curves.values() for v in values if math.isfinite(v)]
    steps = max((len(values) for values in curves.values()), default=0)
    if not finite or steps == 0:
        draw.rectangle([left, top, right, bottom], outline=_AXES)
        draw.text((left + 10, (top + bottom) // 2), "no steps yet", fill=_TEXT, font=font)
        return _to_tensor(image)

    low, high = min(finite), max(finite)
    if high - low < 1e-12:
        pad = abs(high) * 0.1 or 0.1
        low, high = low - pad, high + pad
    else:
        pad = (high - low) * 0.05
        low, high = low - pad, high + pad
    x_max = max(steps, 2)

    def to_xy(index: int, value: float) -> tuple[float, float]:
        x = left + (right - left) * (index) / (x_max - 1) if x_max > 1 else left
        y = bottom - (bottom - top) * (value - low) / (high - low)
        return x, y

    for tick in _nice_ticks(low, high):
        _, y = to_xy(0, tick)
        draw.line([left, y, right, y], fill=_GRID)
        draw.text((4, y - 6), _label(tick), fill=_TEXT, font=font)
    step_ticks = [t for t in _nice_ticks(1, steps) if float(t).is_integer() and 1 <= t <= steps] or [1]
    for tick in step_ticks:
        x, _ = to_xy(int(tick) - 1, low)
        draw.line([x, bottom, x, bottom + 4], fill=_AXES)
        text = str(int(tick))
        draw.text((x - 3 * len(text), bottom + 6), text, fill=_TEXT, font=font)
    draw.rectangle([left, top, right, bottom], outline=_AXES)
    draw.text(((left + right) // 2 - 12, height - 14), "step", fill=_TEXT, font=font)

    for number, (name, values) in enumerate(curves.items()):
        raw_colour, smooth_colour = _PALETTE[number % len(_PALETTE)]
        points = [(i, v) for i, v in enumerate(values) if math.isfinite(v)]
        if not points:
            continue
        if len(points) == 1:
            x, y = to_xy(*points[0])
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=smooth_colour)
        else:
            draw.line([to_xy(i, v) for i, v in points], fill=raw_colour, width=1)
            averaged = smooth([v for _, v in points])
            draw.line([to_xy(i, a) for (i, _), a in zip(points, averaged, strict=True)], fill=smooth_colour, width=2)
        if len(curves) > 1:
            y = top + 4 + 12 * number
            draw.line([right - 110, y + 6, right - 96, y + 6], fill=smooth_colour, width=2)
            draw.text((right - 92, y), name, fill=_TEXT, font=font)
    last = next((v for v in reversed(curves["loss"]) if math.isfinite(v)), None)
    if last is not None:
        summary = f"{steps} steps, last {_label(last)}"
        draw.text((right - 6 * len(summary) - 4, 6), summary, fill=_TEXT, font=font)
    return _to_tensor(image)


def _to_tensor(image: object) -> torch.Tensor:
    import numpy as np

    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).unsqueeze(0)
