"""LoadSubjectImages through a real ComfyUI: folders uploaded with ComfyUI's own /upload/image,
face crops, sidecar captions, the report, re-runs on file changes, and errors that name the file."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

pytestmark = pytest.mark.server

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
def client(comfy_server):
    from scripts.comfyclient import ComfyClient

    return ComfyClient(comfy_server.url)


@pytest.fixture
def portraits(client, tmp_path, request):
    """A folder of this test's own: a portrait with a caption, a photo without a face (and no
    caption), and a mirrored duplicate of the portrait."""
    folder = f"subject_upload/{request.node.name}/portraits"
    astronaut = cv2.resize(data.astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
    upload(client, tmp_path, "astronaut.png", astronaut, folder)
    upload(client, tmp_path, "astronaut.txt", "sks woman in a space suit", folder)
    upload(client, tmp_path, "coffee.png", cv2.resize(data.coffee(), (192, 128)), folder)
    upload(client, tmp_path, "astronaut_again.png", astronaut[:, ::-1].copy(), folder)
    return folder


@pytest.fixture
def broken(client, tmp_path, request):
    """A folder of this test's own with one good photo and one truncated JPEG."""
    folder = f"subject_upload/{request.node.name}/broken"
    upload(client, tmp_path, "good.png", cv2.resize(data.astronaut(), (256, 256)), folder)
    upload(client, tmp_path, "half.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF", folder)
    return folder


def report_text(result):
    return result.outputs["report"]["text"][0]


def test_uploaded_subfolder_appears_in_the_folder_combo(client, portraits, broken):
    options = client.object_info()["LoadSubjectImages"]["input"]["required"]["folder"]
    choices = options[1]["options"] if len(options) > 1 and "options" in options[1] else options[0]
    assert portraits in choices and broken in choices


def test_node_crops_captions_and_reports_through_the_server(comfy_server, client, portraits):
    result = client.run(subject_graph(portraits), timeout=300).raise_for_status()
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


def test_node_reruns_only_when_a_file_changes(client, portraits, tmp_path):
    graph = subject_graph(portraits, prefix="subject_rerun")
    first = client.run(graph, timeout=300).raise_for_status()
    assert "no coffee.txt caption: instance prompt used" in report_text(first)
    again = client.run(graph, timeout=300).raise_for_status()
    cached = [n for e in again.events if e.get("type") == "execution_cached" for n in e["data"]["nodes"]]
    assert "subject" in cached
    upload(client, tmp_path, "coffee.txt", "sks woman holding a coffee", portraits)
    changed = client.run(graph, timeout=300).raise_for_status()
    cached = [n for e in changed.events if e.get("type") == "execution_cached" for n in e["data"]["nodes"]]
    assert "subject" not in cached
    assert "coffee.png: crop center (fallback); no face found, fell back to centre crop; caption from coffee.txt" \
        in report_text(changed)


def test_bad_file_is_an_execution_error_naming_it(client, broken):
    result = client.run(subject_graph(broken, prefix="never_saved"), timeout=300)
    assert result.status == "error"
    assert result.error["node_id"] == "subject"
    message = result.error["exception_message"]
    assert "half.jpg: truncated" in message
    assert "1 unusable file(s) in subject folder 'broken'" in message
    assert not result.files("save")


def test_bad_file_skipped_on_request(client, broken):
    result = client.run(subject_graph(broken, bad_files="skip", prefix="skipped"), timeout=300).raise_for_status()
    assert len(result.files("save")) == 1
    assert "SKIPPED half.jpg: truncated" in report_text(result)


# -- hostile uploads and prompts -------------------------------------------------------------------
BOMBS, OVER_LIMIT = 20, 3


@pytest.fixture
def bombs(client, tmp_path, request):
    """A folder of this test's own: 20 different one-bit PNGs of 7999x7999 (64 MP each once
    decoded, about 8 KB each uploaded) and 3 of 8001x8000, just over the per-photo limit."""
    from tests.test_trainers_images import bomb_png

    folder = f"subject_upload/{request.node.name}/bombs"
    for i in range(BOMBS):
        upload(client, tmp_path, f"bomb{i:02d}.png", bomb_png(7999, 7999, mark=i), folder)
    for i in range(OVER_LIMIT):
        upload(client, tmp_path, f"over{i}.png", bomb_png(8001, 8000, mark=i), folder)
    return folder


def test_uploaded_bomb_photos_load_in_bounded_memory(comfy_server, client, bombs):
    """Before, each such photo stayed in memory as 768 MB of float32 until cropping (20 of them:
    about 16 GB, enough to kill the server); now one is decoded at a time and only crops are kept."""
    from tests.test_trainers_images import peak_rss_above_baseline

    graph = subject_graph(bombs, crop_mode="face", caption_mode="instance prompt", bad_files="skip",
                          prefix="bomb_crops")
    runs = []
    added = peak_rss_above_baseline(lambda: runs.append(client.run(graph, timeout=600)), pid=comfy_server.proc.pid)
    result = runs[0].raise_for_status()
    report = report_text(result)
    assert report.startswith(f"{BOMBS} images at 128px")
    for i in range(OVER_LIMIT):
        assert f"SKIPPED over{i}.png: 8001x8000 is over the 64,000,000-pixel limit for one photo" in report
    assert len(result.files("save")) == BOMBS
    assert added < 1024, f"the server gained {added:.0f} MB loading {BOMBS} bomb photos"


@pytest.mark.parametrize("field,length", [("instance_prompt", 35 << 20), ("class_prompt", 1001)])
def test_over_long_prompt_is_refused_at_post_prompt(client, field, length):
    """A 35 MB instance prompt (before: 168 s, 4.2 GB and an unloadable LoRA) is refused by
    validation, with an error naming the input and the limit, and without echoing the prompt."""
    from scripts.comfyclient import PromptRejected

    graph = subject_graph("subject_upload/no_such_folder", prefix="never_saved_prompt")
    text = ("a photo of sks woman " * (length // 21 + 1))[:length]
    graph["subject"]["inputs"][field] = text
    try:
        prompt_id = client.queue(graph)
    except PromptRejected as exc:
        rejected = exc
    else:
        client.cancel(prompt_id)
        pytest.fail(f"a {length:,}-character {field} was queued")
    assert rejected.node_ids == {"subject"}
    expected = (f"{field} - {field} is {len(text.strip()):,} characters, over the 1,000-character limit "
                "(CLIP reads only the first 77 tokens, about 300 characters); shorten it")
    assert expected in rejected.details("subject")
    assert len(json.dumps(rejected.payload)) < 20_000  # the prompt is not sent back
