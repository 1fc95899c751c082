"""CannyControl through a real ComfyUI with the random-weight ControlNet."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

from scripts.comfyclient import PromptRejected
from scripts.graphs import txt2img
from tests.support.outputs import saved_image

pytestmark = pytest.mark.server

REFERENCE = "canny_reference.png"


@pytest.fixture(scope="module")
def reference(comfy_server):
    image = cv2.resize(data.astronaut(), (64, 64), interpolation=cv2.INTER_AREA)
    Image.fromarray(image).save(comfy_server.input_dir / REFERENCE)
    return image


def canny_graph(ckpt, controlnet, strength=1.0, start=0.0, end=1.0, low=100, high=200, prefix="canny"):
    graph = txt2img(ckpt, positive="a portrait of sks woman", negative="blurry", steps=4, prefix=prefix)
    graph["reference"] = {"class_type": "LoadImage", "inputs": {"image": REFERENCE}}
    graph["cn_loader"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": controlnet}}
    graph["canny"] = {"class_type": "CannyControl", "inputs": {
        "image": ["reference", 0], "low_threshold": low, "high_threshold": high, "blur": 0, "auto_threshold": False,
        "control_net": ["cn_loader", 0], "positive": ["pos", 0], "negative": ["neg", 0], "strength": strength,
        "start_percent": start, "end_percent": end, "vae": ["ckpt", 2]}}
    graph["sampler"]["inputs"]["positive"] = ["canny", 0]
    graph["sampler"]["inputs"]["negative"] = ["canny", 1]
    graph["save_edges"] = {"class_type": "SaveImage", "inputs": {"images": ["canny", 2],
                                                                   "filename_prefix": f"{prefix}_edges"}}
    return graph


@pytest.fixture(scope="module")
def uncontrolled(comfy_server, test_models):
    from scripts.comfyclient import ComfyClient

    graph = txt2img(test_models["checkpoint"].name, positive="a portrait of sks woman", negative="blurry",
                    steps=4, prefix="canny_none")
    return saved_image(comfy_server, ComfyClient(comfy_server.url).run(graph).raise_for_status(), "save")


def run(comfy_server, comfy_client, test_models, **kwargs):
    graph = canny_graph(test_models["checkpoint"].name, test_models["controlnet"].name, **kwargs)
    result = comfy_client.run(graph).raise_for_status()
    return saved_image(comfy_server, result, "save"), saved_image(comfy_server, result, "save_edges")


def test_edge_map_is_opencv_canny_of_the_reference(comfy_server, comfy_client, test_models, reference):
    _, edges = run(comfy_server, comfy_client, test_models, low=80, high=160, prefix="canny_edges_check")
    assert edges.shape[:2] == reference.shape[:2]
    expected = cv2.Canny(reference, 80, 160)
    assert np.array_equal(edges[..., 0], expected)
    assert np.array_equal(edges[..., 0], edges[..., 2])  # white on black, grey RGB


def test_strength_zero_is_identical_to_no_controlnet(comfy_server, comfy_client, test_models, reference,
                                                      uncontrolled):
    image, _ = run(comfy_server, comfy_client, test_models, strength=0.0, prefix="canny_s0")
    assert np.array_equal(image, uncontrolled)


def test_strength_one_changes_the_image(comfy_server, comfy_client, test_models, reference, uncontrolled):
    image, _ = run(comfy_server, comfy_client, test_models, strength=1.0, prefix="canny_s1")
    assert not np.array_equal(image, uncontrolled)


def test_a_range_excluding_every_step_gives_the_uncontrolled_image(comfy_server, comfy_client, test_models,
                                                                   reference, uncontrolled):
    image, _ = run(comfy_server, comfy_client, test_models, strength=1.0, start=1.0, end=1.0, prefix="canny_none_range")
    assert np.array_equal(image, uncontrolled)
    partial, _ = run(comfy_server, comfy_client, test_models, strength=1.0, start=0.5, end=1.0,
                     prefix="canny_half_range")
    assert not np.array_equal(partial, uncontrolled)


@pytest.mark.parametrize("low,high,message", [(201, 200, "above high_threshold"), (0, 300, "high_threshold")])
def test_bad_thresholds_are_rejected(comfy_client, test_models, reference, low, high, message):
    graph = canny_graph(test_models["checkpoint"].name, test_models["controlnet"].name, low=low, high=high)
    with pytest.raises(PromptRejected, match=message):
        comfy_client.run(graph, timeout=120)
