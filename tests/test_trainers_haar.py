"""The pack's NumPy cascade detector (face crop on OpenCV 5 builds, which have no cascade
classifier) against OpenCV 4's own ``CascadeClassifier`` on the real test photos: the same raw
hits window for window, and the same grouping."""

from __future__ import annotations

import gzip

import cv2
import numpy as np
import pytest

from tests.test_trainers_images import _astronaut, _chelsea, _grace_hopper
from trainers.data import haar
from trainers.data.images import _CASCADES, DETECT_SIDE

pytestmark = pytest.mark.trainers


def grey_of(rgb: np.ndarray) -> np.ndarray:
    """The preview detect_subject searches: grey, at most DETECT_SIDE long, histogram-equalised."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    assert max(grey.shape) <= DETECT_SIDE
    return cv2.equalizeHist(grey)


def opencv(filename: str) -> cv2.CascadeClassifier:
    classifier = cv2.CascadeClassifier(cv2.data.haarcascades + filename)
    assert not classifier.empty()
    return classifier


def test_the_shipped_cascades_are_opencvs_own_files():
    for _, filename, *_ in _CASCADES:
        shipped = gzip.decompress((haar.CASCADE_DIR / f"{filename}.gz").read_bytes())
        with open(cv2.data.haarcascades + filename, "rb") as handle:
            assert shipped == handle.read(), filename
        assert b"License" in shipped[:4000]  # each keeps its licence header


@pytest.mark.parametrize("photo,filename,scale_factor,neighbours,box", [
    (_astronaut, "haarcascade_frontalface_default.xml", 1.1, 5, (177, 67, 93, 93)),
    (_grace_hopper, "haarcascade_profileface.xml", 1.1, 5, None),  # her face is frontal: no profile
    (_chelsea, "haarcascade_frontalcatface.xml", 1.05, 3, (270, 207, 67, 67)),
    (_chelsea, "haarcascade_frontalcatface_extended.xml", 1.05, 3, None),  # 45-degree (tilted) features
])
def test_every_raw_hit_and_the_detection_equal_opencvs(photo, filename, scale_factor, neighbours, box):
    grey = grey_of(photo())
    side = max(24, min(grey.shape) // 12)
    classifier = opencv(filename)
    # minNeighbors 0: OpenCV returns its hits ungrouped, one per accepted window
    expected = sorted(tuple(int(v) for v in box) for box in
                      classifier.detectMultiScale(grey, scaleFactor=scale_factor, minNeighbors=0,
                                                  minSize=(side, side)))
    found = haar.detect_all(haar.load_cascade(filename), grey, scale_factor, (side, side))
    assert len(expected) > 0 and sorted(found) == expected
    # what detect_subject gets: the hits grouped with its minNeighbors
    reference = [tuple(int(v) for v in b) for b in
                 classifier.detectMultiScale(grey, scaleFactor=scale_factor, minNeighbors=neighbours,
                                             minSize=(side, side))]
    assert haar.group_rectangles(found, neighbours) == reference == ([box] if box else [])


def test_grouping_equals_opencvs_on_random_boxes():
    rng = np.random.default_rng(0)
    for trial in range(200):
        centres = rng.integers(20, 200, size=(rng.integers(1, 5), 2))
        boxes = []
        for cx, cy in centres:
            size = int(rng.integers(20, 80))
            for _ in range(int(rng.integers(1, 9))):
                jitter = rng.integers(-4, 5, size=3)
                side = size + int(jitter[2])
                boxes.append((int(cx + jitter[0]), int(cy + jitter[1]), side, side))
        for neighbours in (1, 2, 3, 5):
            expected, _ = cv2.groupRectangles([list(b) for b in boxes], neighbours, haar.GROUP_EPS)
            expected = sorted(tuple(int(v) for v in box) for box in expected)
            assert sorted(haar.group_rectangles(boxes, neighbours)) == expected, (trial, neighbours)


def test_bad_input_is_refused():
    cascade = haar.load_cascade("haarcascade_frontalface_default.xml")
    with pytest.raises(ValueError, match="2-D uint8"):
        haar.detect_multi_scale(cascade, np.zeros((64, 64), np.float32))
    with pytest.raises(ValueError, match="scale_factor"):
        haar.detect_multi_scale(cascade, np.zeros((64, 64), np.uint8), scale_factor=1.0)
    with pytest.raises(ValueError, match="Haar cascade"):
        haar.parse_cascade("<opencv_storage><cascade><stageType>BOOST</stageType>"
                           "<featureType>LBP</featureType></cascade></opencv_storage>")
    assert haar.detect_multi_scale(cascade, np.zeros((10, 10), np.uint8)) == []  # smaller than the window


def test_face_crop_takes_the_numpy_detector_when_opencv_has_no_cascade_classifier(monkeypatch, caplog):
    from trainers.data import images

    photo = _grace_hopper()
    images._cascade.cache_clear()
    with_opencv = images.detect_subject(photo)
    monkeypatch.delattr(cv2, "CascadeClassifier")  # as on an OpenCV 5 build
    images._cascade.cache_clear()
    try:
        with caplog.at_level("INFO"):
            assert images.detect_subject(photo) == with_opencv == ("frontal face", (149, 100, 231, 231), 1)
        assert "has no cascade classifier: faces are found by the pack's own" in caplog.text
        assert images.face_detector().startswith("the pack's NumPy cascade detector (OpenCV 4.")
    finally:
        images._cascade.cache_clear()


def test_the_opencv_environment_check_names_the_problem_and_the_fix():
    from trainers.data.images import opencv_distributions, opencv_problem

    assert opencv_problem({"opencv-python-headless": "5.1.0.95"}) is None
    assert opencv_problem({"opencv-python": "4.14.0.94", "opencv-python-headless": "4.14.0.94"}) is None
    mixed = opencv_problem({"opencv-python": "4.10.0.84", "opencv-python-headless": "5.1.0.95"})
    assert "opencv-python 4.10.0.84, opencv-python-headless 5.1.0.95" in mixed
    assert mixed.endswith("opencv-python==5.1.0.95 opencv-python-headless==5.1.0.95")
    assert "pip install opencv-python-headless" in opencv_problem({})
    assert opencv_problem() is None and opencv_distributions()  # this environment is fine
