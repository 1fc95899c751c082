"""Loss curves drawn with PIL (matplotlib is not a dependency of the pack).

One chart per run: the raw per-step training loss (faint: every step draws a new timestep and
noise, so it jumps), its moving average (bold; the legend says over how many steps), the
subject and class parts with prior preservation, and the validation loss (points joined by a
line, on its own axis at the right: its scale differs and its trend is what matters).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

_BACKGROUND = (255, 255, 255)
_AXES = (60, 60, 60)
_GRID = (228, 228, 228)
_TEXT = (30, 30, 30)
# (raw line, averaged line) colours per curve; the first curve is the main loss.
_PALETTE = [
    ((170, 196, 230), (31, 100, 200)),
    ((245, 200, 160), (220, 110, 20)),
    ((170, 220, 170), (40, 150, 40)),
    ((225, 170, 200), (170, 40, 120)),
]
_VALIDATION = (200, 30, 40)
_FONT_SIZE = 12


def moving_average_window(steps: int) -> int:
    """Steps averaged by the bold curve: a tenth of the run, 1 to 100."""
    return max(1, min(100, steps // 10))


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Mean of each value and the ``window - 1`` before it (fewer at the start)."""
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
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


def _tick_labels(ticks: list[float]) -> list[str]:
    """Labels that tell neighbouring ticks apart, however close they are (1.1132, 1.1134)."""
    labels = [_label(t) for t in ticks]
    if len(ticks) < 2 or len(set(labels)) == len(labels):
        return labels
    spacing = min(abs(b - a) for a, b in zip(ticks, ticks[1:], strict=False))
    decimals = min(12, max(0, -math.floor(math.log10(spacing))) + 1)
    return [f"{t:.{decimals}f}".rstrip("0").rstrip(".") if "." in f"{t:.{decimals}f}" else f"{t:.{decimals}f}"
            for t in ticks]


def text_font(size: int = _FONT_SIZE) -> Any:
    """Pillow's default font at ``size`` pixels (the pack ships no font file)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _padded(low: float, high: float) -> tuple[float, float]:
    if high - low < 1e-12:
        pad = abs(high) * 0.1 or 0.1
    else:
        pad = (high - low) * 0.05
    return low - pad, high + pad


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def loss_curve_image(
    losses: Sequence[float],
    title: str = "training loss",
    extra_curves: dict[str, Sequence[float]] | None = None,
    width: int = 512,
    height: int = 320,
    validation: Sequence[tuple[int, float]] | None = None,
) -> torch.Tensor:
    """A 1 x height x width x 3 float image in [0, 1] (ComfyUI IMAGE) of per-step losses.

    ``losses[i]`` is the loss of step i + 1; ``extra_curves`` are more per-step curves (the
    subject and class parts); ``validation`` holds (step, loss) points, step 0 being before
    training. Each per-step curve is drawn raw (faint) and as its moving average (bold; the
    legend names the window); validation as points joined by a line on a right-hand axis. The
    left axis leaves out the highest 2% of raw values (spikes are drawn to the top edge) so the
    trend stays readable. Non-finite values are skipped; one step is drawn as a dot; a chart
    with nothing to draw says so.
    """
    from PIL import Image, ImageDraw

    width, height = max(int(width), 160), max(int(height), 120)
    curves: dict[str, list[float]] = {"loss": [float(v) for v in losses]}
    for name, values in (extra_curves or {}).items():
        curves[name] = [float(v) for v in values]
    points = [(int(s), float(v)) for s, v in (validation or []) if math.isfinite(float(v))]

    image = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = text_font()
    line = int(math.ceil(font.getbbox("Ag")[3])) + 2
    steps = max((len(values) for values in curves.values()), default=0)
    window = moving_average_window(steps)

    # legend entries: (colour, bold, text)
    legend: list[tuple[tuple[int, int, int], bool, str]] = []
    if steps:
        legend.append((_PALETTE[0][0], False, "loss per step"))
        legend.append((_PALETTE[0][1], True, f"mean of {window} steps" if window > 1 else "loss"))
        for number, name in enumerate(list(curves)[1:], start=1):
            legend.append((_PALETTE[number % len(_PALETTE)][1], True, name))
    if points:
        legend.append((_VALIDATION, True, "validation (right axis)"))
    rows, x, right_limit = 1, 8.0, width - 8
    placed: list[tuple[float, int, tuple[int, int, int], bool, str]] = []
    for colour, bold, text in legend:
        entry = 22 + draw.textlength(text, font=font) + 14
        if x + entry > right_limit and x > 8:
            rows, x = rows + 1, 8.0
        placed.append((x, rows - 1, colour, bold, text))
        x += entry
    summary = _summary(curves, points, window)
    header_rows = 1 if draw.textlength(f"{title}    {summary}", font=font) <= width - 16 else 2
    legend_top = header_rows * line + 6
    left = 58
    right = width - (58 if points else 14)
    top = legend_top + (rows * line if legend else 0) + 6
    bottom = height - 34

    draw.text((8, 4), title, fill=_TEXT, font=font)
    finite = {name: [v for v in values if math.isfinite(v)] for name, values in curves.items()}
    everything = [v for values in finite.values() for v in values]
    if not everything and not points:
        draw.rectangle([left, top, right, bottom], outline=_AXES)
        draw.text((left + 10, (top + bottom) // 2), "no steps yet", fill=_TEXT, font=font)
        return _to_tensor(image)

    for x0, row, colour, bold, text in placed:
        y = legend_top + row * line + line // 2
        draw.line([x0, y, x0 + 18, y], fill=colour, width=3 if bold else 1)
        draw.text((x0 + 22, y - line // 2), text, fill=_TEXT, font=font)

    x_max = max(steps, max((s for s, _ in points), default=0), 1)

    def to_x(step: float) -> float:
        return left + (right - left) * step / x_max

    averaged = {name: moving_average(values, window) for name, values in finite.items() if values}
    if everything:
        low = min(everything)
        high = max(_quantile(everything, 0.98), *(max(a) for a in averaged.values()))
        low, high = _padded(low, high)
    else:
        low, high = 0.0, 1.0

    def to_y(value: float) -> float:
        return min(bottom, max(top, bottom - (bottom - top) * (value - low) / (high - low)))

    if everything:
        ticks = _nice_ticks(low, high)
        for tick, text in zip(ticks, _tick_labels(ticks), strict=True):
            y = to_y(tick)
            draw.line([left, y, right, y], fill=_GRID)
            draw.text((4, y - line // 2), text, fill=_TEXT, font=font)
    step_ticks = [t for t in _nice_ticks(0, x_max) if float(t).is_integer()] or [0]
    for tick in step_ticks:
        x = to_x(tick)
        draw.line([x, bottom, x, bottom + 4], fill=_AXES)
        text = str(int(tick))
        draw.text((x - draw.textlength(text, font=font) / 2, bottom + 6), text, fill=_TEXT, font=font)
    draw.rectangle([left, top, right, bottom], outline=_AXES)
    draw.text(((left + right) // 2 - 12, height - line - 2), "step", fill=_TEXT, font=font)

    for number, values in enumerate(curves.values()):
        raw_colour, bold_colour = _PALETTE[number % len(_PALETTE)]
        series = [(i + 1, v) for i, v in enumerate(values) if math.isfinite(v)]
        if not series:
            continue
        if len(series) == 1:
            x, y = to_x(series[0][0]), to_y(series[0][1])
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=bold_colour)
            continue
        if number == 0 or window == 1:  # the parts' raw lines would bury the total's
            draw.line([(to_x(s), to_y(v)) for s, v in series], fill=raw_colour, width=1)
        mean = moving_average([v for _, v in series], window)
        draw.line([(to_x(s), to_y(a)) for (s, _), a in zip(series, mean, strict=True)], fill=bold_colour, width=2)

    if points:
        v_low, v_high = _padded(min(v for _, v in points), max(v for _, v in points))

        def to_vy(value: float) -> float:
            return bottom - (bottom - top) * (value - v_low) / (v_high - v_low)

        ticks = _nice_ticks(v_low, v_high, 4)
        for tick, text in zip(ticks, _tick_labels(ticks), strict=True):
            y = to_vy(tick)
            draw.line([right, y, right + 4, y], fill=_VALIDATION)
            draw.text((right + 6, y - line // 2), text, fill=_VALIDATION, font=font)
        xy = [(to_x(s), to_vy(v)) for s, v in points]
        if len(xy) > 1:
            draw.line(xy, fill=_VALIDATION, width=2)
        for x, y in xy:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=_VALIDATION)

    draw.text((width - 8 - draw.textlength(summary, font=font), 4 + (header_rows - 1) * line), summary,
              fill=_TEXT, font=font)
    return _to_tensor(image)


def _summary(curves: dict[str, list[float]], points: list[tuple[int, float]], window: int) -> str:
    """"500 steps, loss 0.1975 (mean of 50), validation 0.1007": the newest values."""
    parts = []
    losses = [v for v in curves["loss"] if math.isfinite(v)]
    if curves["loss"]:
        parts.append(f"{len(curves['loss'])} steps")
    if losses:
        window = min(window, len(losses))
        mean = sum(losses[-window:]) / window
        parts.append(f"loss {_label(mean)}" + (f" (mean of {window})" if window > 1 else ""))
    if points:
        parts.append(f"validation {_label(points[-1][1])}")
    return ", ".join(parts)


def _to_tensor(image: object) -> torch.Tensor:
    import numpy as np

    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).unsqueeze(0)
