"""Haar-cascade object detection in NumPy, for OpenCV builds without ``cv2.CascadeClassifier``.

OpenCV 5 moved the Viola-Jones cascade classifier out of its main module (and its cascade files
out of the wheels), so ``opencv-python`` / ``-headless`` 5.x cannot run the face search that the
``face`` crop needs. The pack ships the four cascades it uses (``cascades/*.xml.gz``, OpenCV's
own files with their licence headers) and, on such a build, evaluates them here: the same
detector as OpenCV 4's ``detectMultiScale`` (an image pyramid, the window moved 2 pixels at a time
below scale 2 and 1 pixel above, each window's contrast normalised by its standard deviation,
stump stages with early rejection, and the same grouping of neighbouring hits), so a photo gets
the same crop on either build. Only the OpenCV calls that every build keeps are used (resize,
integral images).

Each scale evaluates all of its windows at once: one flat index per window into the integral
images, each rectangle sum four gathers. Stages drop rejected windows, so the later (longer)
stages see only a few hundred windows.
"""

from __future__ import annotations

import functools
import gzip
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CASCADE_DIR = Path(__file__).with_name("cascades")
GROUP_EPS = 0.2  # OpenCV's grouping tolerance for neighbouring hits
STAGE_EPS = np.float32(1e-5)  # stage thresholds are lowered by this, as OpenCV does when it reads them
MIN_STD = 10.0  # windows flatter than this (grey levels) are not searched, as in OpenCV


@dataclass(frozen=True)
class Cascade:
    """A boosted cascade of stumps on Haar features (OpenCV's XML format)."""

    width: int
    height: int
    stage_ends: np.ndarray  # int: index one past each stage's last stump
    stage_thresholds: np.ndarray  # float32, already lowered by STAGE_EPS
    feature: np.ndarray  # int: feature of each stump
    threshold: np.ndarray  # float32: each stump's threshold
    left: np.ndarray  # float32: stump value below the threshold
    right: np.ndarray  # float32: stump value at or above it
    rects: np.ndarray  # int (features, 3, 4): x, y, w, h of up to three rectangles
    weights: np.ndarray  # float32 (features, 3); 0 for an absent rectangle
    tilted: np.ndarray  # bool (features,): rectangles turned by 45 degrees


def _numbers(text: str | None) -> list[float]:
    return [float(v) for v in (text or "").split()]


def parse_cascade(xml: str | bytes) -> Cascade:
    """A cascade from the text of an OpenCV cascade file (new format: ``opencv-cascade-classifier``)."""
    root = ElementTree.fromstring(xml)
    node = root.find("cascade")
    if node is None or node.findtext("stageType", "").strip() != "BOOST" \
            or node.findtext("featureType", "").strip() != "HAAR":
        raise ValueError("not an OpenCV boosted Haar cascade")
    width, height = int(node.findtext("width")), int(node.findtext("height"))
    ends, stage_thresholds, feature, threshold, left, right = [], [], [], [], [], []
    for stage in node.find("stages"):
        for weak in stage.find("weakClassifiers"):
            nodes = _numbers(weak.findtext("internalNodes"))
            leaves = _numbers(weak.findtext("leafValues"))
            if len(nodes) != 4 or len(leaves) != 2:
                raise ValueError("only cascades of stumps are supported")
            feature.append(int(nodes[2]))
            threshold.append(nodes[3])
            left.append(leaves[0])
            right.append(leaves[1])
        ends.append(len(feature))
        stage_thresholds.append(float(stage.findtext("stageThreshold")))
    features = list(node.find("features"))
    rects = np.zeros((len(features), 3, 4), dtype=np.int64)
    weights = np.zeros((len(features), 3), dtype=np.float32)
    tilted = np.zeros(len(features), dtype=bool)
    for index, item in enumerate(features):
        for slot, rect in enumerate(item.find("rects")):
            x, y, w, h, weight = _numbers(rect.text)
            rects[index, slot] = (int(x), int(y), int(w), int(h))
            weights[index, slot] = weight
        tilted[index] = item.findtext("tilted", "0").strip() == "1"
    return Cascade(width, height, np.array(ends), np.float32(stage_thresholds) - STAGE_EPS, np.array(feature),
                   np.float32(threshold), np.float32(left), np.float32(right), rects, weights, tilted)


@functools.cache
def load_cascade(filename: str) -> Cascade:
    """One of the cascades the pack ships (``<filename>.gz`` in ``cascades/``)."""
    return parse_cascade(cascade_xml(filename))


def cascade_xml(filename: str) -> str:
    """The text of a shipped cascade file (for ``cv2.CascadeClassifier`` on builds that have it)."""
    return gzip.decompress((CASCADE_DIR / f"{filename}.gz").read_bytes()).decode("utf-8")


def _corner_offsets(cascade: Cascade, stride: int) -> np.ndarray:
    """Flat offsets (features, 3, 4) of the corners (p0, p1, p2, p3) whose integral values give each
    rectangle's sum as p0 - p1 - p2 + p3; a tilted rectangle's point into the 45-degree integral,
    stored after the upright one (``tilted_base`` added by the caller)."""
    x, y, w, h = (cascade.rects[..., i] for i in range(4))
    upright = np.stack((y * stride + x, y * stride + x + w, (y + h) * stride + x, (y + h) * stride + x + w), -1)
    # the corners (x, y), (x - h, y + h), (x + w, y + w) and (x + w - h, y + w + h) of a turned rectangle
    turned = np.stack((y * stride + x, (y + h) * stride + x - h, (y + w) * stride + x + w,
                       (y + w + h) * stride + x + w - h), -1)
    return np.where(cascade.tilted[:, None, None], turned, upright)


class _Scale:
    """The integral images of one pyramid level (upright then 45-degree, in one flat table) and each
    stump's corner offsets into it."""

    def __init__(self, cascade: Cascade, image: np.ndarray):
        import cv2

        self.rows, self.cols = image.shape
        self.stride = self.cols + 1
        if cascade.tilted.any():
            total, squares, turned = cv2.integral3(image, sdepth=cv2.CV_32S, sqdepth=cv2.CV_64F)
            self.table = np.concatenate((total.ravel(), turned.ravel()))
        else:
            total, squares = cv2.integral2(image, sdepth=cv2.CV_32S, sqdepth=cv2.CV_64F)
            self.table = total.ravel()
        self.total, self.squares = total.ravel(), squares.ravel()
        corners = _corner_offsets(cascade, self.stride) + np.where(cascade.tilted, total.size, 0)[:, None, None]
        self.corners = corners[cascade.feature].astype(np.int32)  # (stumps, 3, 4)
        self.weights = cascade.weights[cascade.feature]  # (stumps, 3)


def _windows(cascade: Cascade, scale: _Scale, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(flat origin, 1 / contrast norm) of the windows worth searching on one level."""
    ys = np.arange(0, scale.rows - cascade.height + 1, step)
    xs = np.arange(0, scale.cols - cascade.width + 1, step)
    origins = (ys[:, None] * scale.stride + xs[None, :]).ravel().astype(np.int32)
    # the contrast is measured inside a one-pixel border of the window
    w, h = cascade.width - 2, cascade.height - 2
    inner = np.array((scale.stride + 1, scale.stride + 1 + w, (1 + h) * scale.stride + 1,
                      (1 + h) * scale.stride + 1 + w))
    a, b, c, d = (scale.total[origins + o].astype(np.int64) for o in inner)
    total = a - b - c + d
    a, b, c, d = (scale.squares[origins + o] for o in inner)
    squares = a - b - c + d
    area = float(w * h)
    spread = area * squares - total.astype(np.float64) ** 2
    keep = spread > 0
    inverse = (1.0 / np.sqrt(np.where(keep, spread, 1.0))).astype(np.float32)
    keep &= area * inverse.astype(np.float64) < 1.0 / MIN_STD
    return origins[keep], inverse[keep]


CHUNK = 1 << 21  # gathered corner values per block (windows x stumps x 12): about 8 MB of int32


def _stage_sums(cascade: Cascade, scale: _Scale, origins: np.ndarray, inverse: np.ndarray, start: int,
                end: int) -> np.ndarray:
    """Each window's sum of stump values over the stumps [start, end) of a stage."""
    corners, weights = scale.corners[start:end], scale.weights[start:end]
    rows = max(1, CHUNK // (12 * (end - start)))
    sums = np.empty(origins.size, dtype=np.float64)
    for first in range(0, origins.size, rows):
        block = origins[first:first + rows]
        values = scale.table[block[:, None, None, None] + corners]  # (windows, stumps, 3, 4)
        rects = values[..., 0] - values[..., 1] - values[..., 2] + values[..., 3]
        weighted = rects.astype(np.float32) * weights
        feature = (weighted[..., 0] + weighted[..., 1]) + weighted[..., 2]  # in OpenCV's order, in float32
        feature *= inverse[first:first + rows, None]
        leaves = np.where(feature < cascade.threshold[start:end], cascade.left[start:end], cascade.right[start:end])
        sums[first:first + rows] = leaves.astype(np.float64).sum(axis=1)
    return sums


def _accepted(cascade: Cascade, scale: _Scale, origins: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """The origins of the windows that pass every stage."""
    start = 0
    for end, stage_threshold in zip(cascade.stage_ends, cascade.stage_thresholds, strict=True):
        if origins.size == 0:
            break
        passed = _stage_sums(cascade, scale, origins, inverse, start, end) >= stage_threshold
        origins, inverse = origins[passed], inverse[passed]
        start = end
    return origins


def detect_all(cascade: Cascade, grey: np.ndarray, scale_factor: float,
               min_size: tuple[int, int] = (0, 0)) -> list[tuple[int, int, int, int]]:
    """Every window (x, y, w, h) the cascade accepts, over the pyramid, before grouping."""
    import cv2

    rows, cols = grey.shape
    found = []
    factor = 1.0
    while True:
        win_w, win_h = int(np.rint(cascade.width * factor)), int(np.rint(cascade.height * factor))
        if win_w > cols or win_h > rows:
            break
        if win_w >= min_size[0] and win_h >= min_size[1]:
            size = (int(np.rint(cols / factor)), int(np.rint(rows / factor)))
            if size[0] >= cascade.width and size[1] >= cascade.height:
                level = cv2.resize(grey, size, interpolation=cv2.INTER_LINEAR_EXACT)
                scale = _Scale(cascade, level)
                step = 1 if factor > 2 else 2
                origins = _accepted(cascade, scale, *_windows(cascade, scale, step))
                ys, xs = np.divmod(origins, scale.stride)
                found += [(int(np.rint(x * factor)), int(np.rint(y * factor)), win_w, win_h)
                          for x, y in zip(xs, ys, strict=True)]
        factor *= scale_factor
    return found


def _similar(a, b, eps: float = GROUP_EPS) -> bool:
    delta = eps * (min(a[2], b[2]) + min(a[3], b[3])) * 0.5
    return (abs(a[0] - b[0]) <= delta and abs(a[1] - b[1]) <= delta
            and abs(a[0] + a[2] - b[0] - b[2]) <= delta and abs(a[1] + a[3] - b[1] - b[3]) <= delta)


def group_rectangles(rects: list[tuple[int, int, int, int]], min_neighbours: int,
                     eps: float = GROUP_EPS) -> list[tuple[int, int, int, int]]:
    """Clusters of similar hits averaged; clusters of ``min_neighbours`` hits or fewer dropped, and
    so are small clusters inside a larger, better supported one (OpenCV's rule)."""
    if min_neighbours <= 0 or not rects:
        return list(rects)
    parent = list(range(len(rects)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(rects)):
        for j in range(i):
            if _similar(rects[i], rects[j], eps):
                a, b = root(i), root(j)
                if a != b:
                    parent[a] = b
    labels, sums, counts = {}, [], []
    for i, rect in enumerate(rects):
        label = labels.setdefault(root(i), len(labels))
        if label == len(sums):
            sums.append(np.zeros(4, dtype=np.int64))
            counts.append(0)
        sums[label] += rect
        counts[label] += 1
    means = [tuple(int(np.rint(np.float32(v) * (np.float32(1) / np.float32(n)))) for v in total)
             for total, n in zip(sums, counts, strict=True)]
    kept = []
    for i, (r1, n1) in enumerate(zip(means, counts, strict=True)):
        if n1 <= min_neighbours:
            continue
        inside = False
        for j, (r2, n2) in enumerate(zip(means, counts, strict=True)):
            if j == i or n2 <= min_neighbours:
                continue
            dx, dy = int(np.rint(np.float32(r2[2] * eps))), int(np.rint(np.float32(r2[3] * eps)))
            if (r1[0] >= r2[0] - dx and r1[1] >= r2[1] - dy and r1[0] + r1[2] <= r2[0] + r2[2] + dx
                    and r1[1] + r1[3] <= r2[1] + r2[3] + dy and (n2 > max(3, n1) or n1 < 3)):
                inside = True
                break
        if not inside:
            kept.append(r1)
    return kept


def detect_multi_scale(cascade: Cascade, grey: np.ndarray, scale_factor: float = 1.1, min_neighbours: int = 3,
                       min_size: tuple[int, int] = (0, 0)) -> list[tuple[int, int, int, int]]:
    """OpenCV's ``CascadeClassifier.detectMultiScale`` for an HxW uint8 grey image: (x, y, w, h) boxes."""
    if grey.dtype != np.uint8 or grey.ndim != 2:
        raise ValueError("a 2-D uint8 grey image is needed")
    if scale_factor <= 1:
        raise ValueError("scale_factor must be > 1")
    return group_rectangles(detect_all(cascade, np.ascontiguousarray(grey), scale_factor, min_size), min_neighbours)
