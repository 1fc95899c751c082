"""LoadSubjectImages through a real ComfyUI: folders uploaded with ComfyUI's own /upload/image,
face crops, sidecar captions, the report, re-runs on file changes, and errors that name the file."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

pytestmark = pytest.mark.server

PORTRAITS = "subject_upload/portraits"
BROKEN = "subject_upload/broken"


def subject_graph(folder, crop_mode="face", caption_mode="sidecar .txt", bad_files="stop", prefix="subject_crops"):
    return {
        "subject": {"class_type": "LoadSubjectImages", "inputs": {
            "folder": folder, "instance_prompt": "a photo of sks woman", "class_prompt": "a photo of woman",
            "resolution": 128, "max_images": 0, "flip": False, "crop_mode": crop_mode,
            "caption_mode": caption_mode, "bad_files": bad_files}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["subject", 1], "filename_prefix": prefix}},
        "report": {"class_type": "PreviewAny", "inputs": {"source": ["subject", 2]}},
    }


def upload(client, tmp_path, name, content, subfolder):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        Image.fromarray(content).save(path)
    answer = client.upload_image(path, subfolder=subfolder)
    assert answer["subfolder"] == subfolder and answer["name"] == name


@pytest.fixture(scope="module")
def uploaded(comfy_server, tmp_path_factory):
    from scripts.comfyclient import ComfyClient

    client = ComfyClient(comfy_server.url)
    tmp = tmp_path_factory.mktemp("uploads")
    astronaut = cv2.resize(data.astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
    upload(client, tmp, "astronaut.png", astronaut, PORTRAITS)
    upload(client, tmp, "astronaut.txt", "sks woman in a space suit", PORTRAITS)
    upload(client, tmp, "coffee.png", cv2.resize(data.coffee(), (192, 128)), PORTRAITS)
    upload(client, tmp, "astronaut_again.png", astronaut[:, ::-1].copy(), PORTRAITS)
    upload(client, tmp, "good.png", astronaut, BROKEN)
    upload(client, tmp, "half.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF", BROKEN)
    return client


def report_text(result):
    return result.outputs["report"]["text"][0]


def test_uploaded_subfolder_appears_in_the_folder_combo(uploaded):
    options = uploaded.object_info()["LoadSubjectImages"]["input"]["required"]["folder"]
    choices = options[1]["options"] if len(options) > 1 and "options" in options[1] else options[0]
    assert PORTRAITS in choices and BROKEN in choices


def test_node_crops_captions_and_reports_through_the_server(comfy_server, uploaded):
    result = uploaded.run(subject_graph(PORTRAITS), timeout=300).raise_for_status()
    files = result.files("save")
    assert len(files) == 3
    crop = np.asarray(Image.open(comfy_server.output_dir / files[0]["subfolder"] / files[0]["filename"]))
    assert crop.shape == (128, 128, 3)
    report = report_text(result)
    assert report.startswith("3 images at 128px")
    assert "astronaut.png: crop face (" in report and "frontal face found" in report
    assert "caption from astronaut.txt" in report
    assert "coffee.png: crop center (fallback); no face found, fell back to centre crop" in report
    assert "no coffee.txt caption: instance prompt used" in report


def test_node_reruns_only_when_a_file_changes(uploaded, tmp_path):
    graph = subject_graph(PORTRAITS, prefix="subject_rerun")
    uploaded.run(graph, timeout=300).raise_for_status()
    again = uploaded.run(graph, timeout=300).raise_for_status()
    cached = [n for e in again.events if e.get("type") == "execution_cached" for n in e["data"]["nodes"]]
    assert "subject" in cached
    upload(uploaded, tmp_path, "coffee.txt", "sks woman holding a coffee", PORTRAITS)
    changed = uploaded.run(graph, timeout=300).raise_for_status()
    cached = [n for e in changed.events if e.get("type") == "execution_cached" for n in e["data"]["nodes"]]
    assert "subject" not in cached
    assert "coffee.png: crop center (fallback); no face found, fell back to centre crop; caption from coffee.txt" \
        in report_text(changed)


def test_bad_file_is_an_execution_error_naming_it(uploaded):
    result = uploaded.run(subject_graph(BROKEN, prefix="never_saved"), timeout=300)
    assert result.status == "error"
    assert result.error["node_id"] == "subject"
    message = result.error["exception_message"]
    assert "half.jpg: truncated" in message
    assert "1 unusable file(s) in subject folder 'broken'" in message
    assert not result.files("save")


def test_bad_file_skipped_on_request(uploaded):
    result = uploaded.run(subject_graph(BROKEN, bad_files="skip", prefix="skipped"), timeout=300).raise_for_status()
    assert len(result.files("save")) == 1
    assert "SKIPPED half.jpg: truncated" in report_text(result)
