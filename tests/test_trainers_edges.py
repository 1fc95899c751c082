"""Canny edge maps: OpenCV's own output, in OpenCV's threshold units."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data

from trainers.control.edges import (
    AUTO_SIGMA,
    CannySettings,
    EdgeSettingsError,
    auto_thresholds,
    canny_edges,
    to_uint8,
)

pytestmark = pytest.mark.trainers


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    return np.stack([data.astronaut(), cv2.resize(data.chelsea(), (512, 512))])


@pytest.mark.parametrize("low,high", [(100, 200), (50, 150), (0, 0), (200, 255), (30, 30)])
def test_edges_equal_cv2_canny_pixel_for_pixel(photos, low, high):
    edges, used = canny_edges(photos, CannySettings(low_threshold=low, high_threshold=high))
    assert edges.shape == photos.shape[:3] and edges.dtype == np.uint8
    for rgb, edge in zip(photos, edges, strict=True):
        assert np.array_equal(edge, cv2.Canny(rgb, low, high))
    assert used == [(low, high)] * 2
    assert set(np.unique(edges)) <= {0, 255}


def test_comfy_float_images_round_trip_to_the_same_8_bit_image(photos):
    floats = photos.astype(np.float32) / 255.0  # what ComfyUI's LoadImage gives
    assert np.array_equal(to_uint8(floats), photos)


def test_higher_thresholds_give_fewer_edges(photos):
    few = canny_edges(photos, CannySettings(low_threshold=200, high_threshold=250))[0]
    many = canny_edges(photos, CannySettings(low_threshold=20, high_threshold=60))[0]
    assert (few > 0).sum() < (many > 0).sum()


def test_blur_is_a_gaussian_before_canny(photos):
    edges, _ = canny_edges(photos[:1], CannySettings(blur=5))
    expected = cv2.Canny(cv2.GaussianBlur(photos[0], (5, 5), 0), 100, 200)
    assert np.array_equal(edges[0], expected)
    assert (edges > 0).sum() < (canny_edges(photos[:1], CannySettings())[0] > 0).sum()


def test_auto_threshold_follows_the_documented_median_rule(photos):
    edges, used = canny_edges(photos, CannySettings(auto_threshold=True))
    for rgb, edge, (low, high) in zip(photos, edges, used, strict=True):
        median = float(np.median(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)))
        assert (low, high) == (round(max(0, (1 - AUTO_SIGMA) * median)), round(min(255, (1 + AUTO_SIGMA) * median)))
        assert np.array_equal(edge, cv2.Canny(rgb, low, high))
    assert auto_thresholds(photos[0]) == used[0]


@pytest.mark.parametrize("kwargs,message", [
    ({"low_threshold": 201, "high_threshold": 200}, "above high_threshold"),
    ({"low_threshold": -1}, "low_threshold must be a whole number from 0 to 255"),
    ({"high_threshold": 256}, "high_threshold must be a whole number from 0 to 255"),
    ({"low_threshold": 10.5}, "low_threshold"),
    ({"blur": 4}, "odd kernel size"),
    ({"blur": 33}, "odd kernel size"),
])
def test_bad_settings_name_the_input(kwargs, message):
    with pytest.raises(EdgeSettingsError, match=message):
        CannySettings(**kwargs)


@pytest.mark.parametrize("shape", [(0, 64, 64, 3), (1, 0, 64, 3), (1, 64, 0, 3)])
def test_empty_image_is_an_error(shape):
    with pytest.raises(EdgeSettingsError, match="empty"):
        canny_edges(np.zeros(shape, dtype=np.uint8), CannySettings())
