"""The class-image cache on tiny random SD1.5 models: every image checked against a manifest of
hashes (tampered, missing, stray and forged files are never trained on), an interrupted set
resumes byte-identically, two generators of one set end with one complete set, stale temporary
files are swept, and a cache path that cannot work is a clear error before any model loads."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import trainers.sd15.checkpoint
from tests.support.paths import repo_root, tokenizer_dir
from tests.test_trainers_lora import make_subject
from trainers.data.class_images import (
    MANIFEST,
    ClassCacheError,
    ClassImageSpec,
    PriorRequest,
    find_class_images,
    generate_class_images,
    load_class_images,
    plan_prior,
    realize_prior,
    sweep_class_cache,
)
from trainers.data.subject import SubjectData
from trainers.files.fileio import content_sha256
from trainers.jobs import train_file
from trainers.sd15 import placeholder
from trainers.training.config import DreamBoothTrainConfig

pytestmark = [pytest.mark.trainers, pytest.mark.usefixtures("one_thread")]

# 6 images in batches of 4 (0-3 and 4-5), 2 sampling steps each: two batches to interrupt between.
SPEC = ClassImageSpec(base_fingerprint="tiny-sd15-seed-0", prompt="a photo of toy", count=6, resolution=64,
                      steps=2)
SMALL = ClassImageSpec(base_fingerprint="tiny-sd15-seed-0", prompt="a photo of toy", count=2, resolution=64,
                       steps=2)


@pytest.fixture(scope="module")
def tiny():
    return placeholder.tiny_sd15(seed=0, tokenizer_dir=tokenizer_dir())


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> dict[str, bytes]:
    """SPEC generated once, uninterrupted: every other test's bytes must equal these."""
    cache = tmp_path_factory.mktemp("reference")
    made = generate_class_images(tiny, SPEC, cache)
    return {name: (made.folder / name).read_bytes() for name in SPEC.image_names()}


@pytest.fixture(scope="module")
def small_reference(tiny, tmp_path_factory) -> dict[str, bytes]:
    cache = tmp_path_factory.mktemp("small_reference")
    made = generate_class_images(tiny, SMALL, cache)
    return {name: (made.folder / name).read_bytes() for name in SMALL.image_names()}


class Progress:
    """Records on_step calls; optionally raises (a cancel) or runs something at a given call."""

    def __init__(self, stop_at: int | None = None, at_first=None):
        self.calls: list[tuple[int, int]] = []
        self.stop_at, self.at_first = stop_at, at_first

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))
        if len(self.calls) == 1 and self.at_first is not None:
            self.at_first()
        if len(self.calls) == self.stop_at:
            raise KeyboardInterrupt("cancelled")  # a BaseException, like ComfyUI's interrupt on newest


def png(colour: tuple[int, int, int], size: int = 64) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def temporaries(root: Path) -> list[str]:
    return [p.name for p in root.rglob(".*")]


def assert_verified_set(folder: Path, spec: ClassImageSpec, expected: dict[str, bytes]) -> None:
    """The folder holds exactly the expected images and a manifest whose hashes and sizes match them."""
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["key"] == spec.key() and manifest["count"] == spec.count
    listed = {e["name"]: (e["sha256"], e["size"]) for e in manifest["images"]}
    assert listed == {name: (hashlib.sha256(data).hexdigest(), len(data)) for name, data in expected.items()}
    assert files(folder) == {**expected, MANIFEST: (folder / MANIFEST).read_bytes()}
    assert find_class_images(folder.parent, spec) is not None


# ---------------------------------------------------------------------------------------------
# Only files that match the manifest are used
# ---------------------------------------------------------------------------------------------


def test_the_manifest_lists_every_image_with_its_hash_and_size(tiny, tmp_path, small_reference):
    made = generate_class_images(tiny, SMALL, tmp_path)
    assert made.generated == 2 and made.kept == 0
    assert_verified_set(made.folder, SMALL, small_reference)
    assert temporaries(tmp_path) == []
    data = load_class_images(made.folder, SMALL)
    assert len(data) == 2 and data.captions == ("a photo of toy",) * 2
    again = generate_class_images(tiny, SMALL, tmp_path, on_step=Progress(stop_at=1))  # nothing to generate
    assert again.generated == 0 and again.kept == 2


def _forge_old_style_set(folder: Path, spec: ClassImageSpec) -> None:
    """What an upload could plant in the old cache under input/: the expected folder name, a
    manifest with the right key and images that are not the model's."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in spec.image_names():
        (folder / name).write_bytes(png((255, 0, 0)))
    (folder / MANIFEST).write_text(json.dumps({"key": spec.key(), "images": spec.image_names()}))


def _forge_listed_hashes(folder: Path, spec: ClassImageSpec) -> None:
    """A manifest listing hashes of files that are not there (names right, content wrong)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    for entry in manifest["images"]:
        entry["sha256"] = hashlib.sha256(b"forged").hexdigest()
    (folder / MANIFEST).write_text(json.dumps(manifest))


DAMAGE = {  # what happens to a complete set -> how many images the next generation makes
    "changed-image": (lambda folder, spec: (folder / "class_00001.png").write_bytes(png((0, 255, 0))), 1),
    "missing-image": (lambda folder, spec: (folder / "class_00000.png").unlink(), 1),
    "stray-image": (lambda folder, spec: (folder / "class_00002.png").write_bytes(png((0, 0, 255))), 0),
    "linked-image": (lambda folder, spec: ((folder / "class_00001.png").unlink(),
                                           (folder / "class_00001.png").symlink_to(folder / "class_00000.png")), 1),
    "manifest-gone": (lambda folder, spec: (folder / MANIFEST).unlink(), 2),
    "old-style-forgery": (_forge_old_style_set, 2),
    "forged-hashes": (_forge_listed_hashes, 2),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_or_forged_set_is_not_trusted_and_only_what_is_wrong_is_generated_again(
        tiny, tmp_path, small_reference, damage):
    spoil, regenerated = DAMAGE[damage]
    folder = tmp_path / SMALL.folder_name()
    if damage != "old-style-forgery":
        generate_class_images(tiny, SMALL, tmp_path)
    spoil(folder, SMALL)
    assert find_class_images(tmp_path, SMALL) is None  # not trusted as it is
    loaded = load_class_images(folder, SMALL)
    if damage == "stray-image":  # the listed images still verify; the stray one is never read
        assert loaded.source_names == tuple(SMALL.image_names())
    else:
        assert loaded is None
    progress = Progress()
    made = generate_class_images(tiny, SMALL, tmp_path, on_step=progress)
    assert (made.generated, made.kept) == (regenerated, 2 - regenerated)
    assert bool(progress.calls) == bool(regenerated)
    assert_verified_set(folder, SMALL, small_reference)  # the model's own bytes again; stray file gone
    assert temporaries(tmp_path) == []


def test_an_image_changed_after_planning_is_generated_again_not_trained_on(tiny, tmp_path, small_reference):
    cache = tmp_path / "cache"
    generate_class_images(tiny, SMALL, cache)
    request = PriorRequest(count=2, loss_weight=1.0, steps=2)
    plan = plan_prior(request, make_subject(), SMALL.base_fingerprint, cache, None)
    assert plan.spec == SMALL and plan.cached is not None and "in the cache" in plan.report
    (cache / SMALL.folder_name() / "class_00001.png").write_bytes(png((0, 255, 0)))  # after the check
    data = realize_prior(plan, tiny, cache)
    assert plan.generated == 1 and plan.kept == 1
    assert "generated now (1 new, 1 already in the cache)" in plan.report
    clean = load_class_images(cache / SMALL.folder_name(), SMALL)
    assert data.fingerprint() == clean.fingerprint()
    green = torch.tensor([0.0, 1.0, 0.0])
    assert not torch.equal(data.images[1][0, 0], green)  # the model's image, not the planted one
    assert_verified_set(cache / SMALL.folder_name(), SMALL, small_reference)


# ---------------------------------------------------------------------------------------------
# Resume and concurrency
# ---------------------------------------------------------------------------------------------


def test_an_interrupted_generation_resumes_generating_only_the_missing_images(tiny, tmp_path, reference):
    # Cancel at the first sampling step of the second batch: images 0-3 are finished.
    cancel = Progress(stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        generate_class_images(tiny, SPEC, tmp_path, on_step=cancel)
    folder = tmp_path / SPEC.folder_name()
    assert cancel.calls == [(1, 4), (2, 4), (3, 4)]
    assert find_class_images(tmp_path, SPEC) is None  # not a complete set
    assert sorted(files(folder)) == [*SPEC.image_names()[:4], MANIFEST] and temporaries(tmp_path) == []
    plan = plan_prior(PriorRequest(count=6, loss_weight=1.0, steps=2), make_subject(), SPEC.base_fingerprint,
                      tmp_path, None)
    assert "4 in the cache, 2 to generate" in plan.report

    resumed = Progress()
    made = generate_class_images(tiny, SPEC, tmp_path, on_step=resumed)
    assert (made.generated, made.kept) == (2, 4)
    assert resumed.calls == [(1, 2), (2, 2)]  # one batch: images 4 and 5
    assert_verified_set(folder, SPEC, reference)  # byte-identical to the uninterrupted generation


def test_a_generator_keeps_the_images_another_one_finished_meanwhile(tiny, tmp_path, reference):
    """A deterministic interleaving: while A samples its first batch, B generates the whole set."""
    other = {}

    def run_b():
        other["made"] = generate_class_images(tiny, SPEC, tmp_path)

    progress = Progress(at_first=run_b)
    made = generate_class_images(tiny, SPEC, tmp_path, on_step=progress)
    assert other["made"].generated == 6
    assert made.generated == 4  # A wrote its first batch (same bytes) and took B's second batch
    assert progress.calls[-1] == (4, 4) and len(progress.calls) == 3  # the second batch was not sampled
    assert_verified_set(tmp_path / SPEC.folder_name(), SPEC, reference)
    assert temporaries(tmp_path) == []


CHILD = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from tests.support.paths import tokenizer_dir
    from trainers.data.class_images import ClassImageSpec, generate_class_images, load_class_images
    from trainers.sd15 import placeholder

    cache, ready = Path(sys.argv[1]), Path(sys.argv[2])
    spec = ClassImageSpec(**json.loads(sys.argv[3]))
    base = placeholder.tiny_sd15(seed=0, tokenizer_dir=tokenizer_dir())
    waited = []

    def on_step(done, total):
        # Both processes are sampling the first batch before either writes anything.
        if not waited:
            waited.append(True)
            (ready / str(os.getpid())).touch()
            deadline = time.monotonic() + 600
            while len(list(ready.iterdir())) < 2:
                if time.monotonic() > deadline:
                    raise SystemExit("the other generator never started")
                time.sleep(0.02)

    made = generate_class_images(base, spec, cache, on_step=on_step)
    data = load_class_images(made.folder, spec)
    print(json.dumps({"generated": made.generated, "fingerprint": data.fingerprint()}))
""")


def test_two_processes_generating_the_same_set_end_with_one_complete_verified_set(tmp_path, reference):
    cache, ready = tmp_path / "cache", tmp_path / "ready"
    ready.mkdir()
    spec = {"base_fingerprint": SPEC.base_fingerprint, "prompt": SPEC.prompt, "count": SPEC.count,
            "resolution": SPEC.resolution, "steps": SPEC.steps}
    env = {**os.environ, "PYTHONPATH": str(repo_root()), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", CHILD, str(cache), str(ready), json.dumps(spec)]
    children = [subprocess.Popen(command, cwd=repo_root(), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for _ in range(2)]
    outputs = [child.communicate(timeout=900) for child in children]
    for child, (_, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err.decode()[-3000:]
    results = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outputs]
    assert len(list(ready.iterdir())) == 2  # they really overlapped
    folder = cache / SPEC.folder_name()
    assert_verified_set(folder, SPEC, reference)
    # each trained-on set is the complete verified one, whoever wrote which image
    expected = load_class_images(folder, SPEC).fingerprint()
    assert [r["fingerprint"] for r in results] == [expected, expected]
    assert all(0 < r["generated"] <= 6 for r in results)
    assert temporaries(cache) == []


# ---------------------------------------------------------------------------------------------
# Stale temporary files and a cache path that cannot work
# ---------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_sweep_removes_only_this_packs_temporaries_of_dead_processes(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    cache = tmp_path / "class_images"
    folder = cache / SMALL.folder_name()
    folder.mkdir(parents=True)
    stale = [folder / f".class_00000.png.dbs-{dead}-abcd1234.tmp", folder / f".class_images.json.dbs-{dead}-x1y2z3w4.tmp",
             cache / f".whatever.dbs-{dead}-abcd1234.tmp"]
    legacy = cache / f".partial-0123456789ab-{dead}"
    keep = [folder / f".class_00001.png.dbs-{alive}-abcd1234.tmp",  # a live generator's image in progress
            folder / "class_00000.png", folder / MANIFEST, folder / "notes.tmp", cache / "readme.txt",
            folder / f".class_00001.png.dbs-{dead}-abc.tmp"]  # not a name this pack makes
    for path in stale + keep:
        path.write_bytes(b"x")
    legacy.mkdir()
    (legacy / "class_00000.png").write_bytes(b"x")
    live_legacy = cache / f".partial-0123456789ab-{alive}"
    live_legacy.mkdir()

    removed = sweep_class_cache(cache)
    assert sorted(removed) == sorted([*stale, legacy])
    assert not any(p.exists() for p in stale) and not legacy.exists()
    assert all(p.exists() for p in keep) and live_legacy.is_dir()
    assert sweep_class_cache(tmp_path / "missing") == []


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> Path:
    return placeholder.write_random_sd15_checkpoint(tmp_path_factory.mktemp("base") / "tiny.safetensors", size="tiny")


def _file_at_set_folder(models: Path, base_file: Path) -> Path:
    cache = models / "dreambooth_studio" / "class_images"
    spec = plan_prior(PriorRequest(count=2, loss_weight=1.0, steps=2), make_subject(), content_sha256(base_file),
                      cache, None).spec
    cache.mkdir(parents=True)
    return cache / spec.folder_name()


BAD_CACHES = {  # where a file stands -> what the error names
    "cache": (lambda models, base: models / "dreambooth_studio" / "class_images",
              "models/dreambooth_studio/class_images is a file, but the class image cache folder should be there"),
    "parent": (lambda models, base: models / "dreambooth_studio",
               "models/dreambooth_studio is a file, but a folder of the class image cache "
               "models/dreambooth_studio/class_images should be there"),
    "set": (_file_at_set_folder, "models/dreambooth_studio/class_images/a_photo_of_toy-64px-2-"),
}


@pytest.mark.parametrize("where", sorted(BAD_CACHES))
def test_a_file_where_the_cache_folder_should_be_is_a_clear_error_before_the_model_loads(
        base_file, tmp_path, monkeypatch, where):
    monkeypatch.setattr(trainers.sd15.checkpoint, "load_sd15_single_file", lambda *a, **k: pytest.fail("loaded"))
    build, message = BAD_CACHES[where]
    models = tmp_path / "models"
    models.mkdir()
    blocker = build(models, base_file)
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    config = DreamBoothTrainConfig(steps=2, unet_lr=1e-4, class_images=2, class_steps=2)
    with pytest.raises(ClassCacheError) as info:
        train_file(base_file, make_subject(), config, tmp_path / "db.safetensors", tokenizer_dir(),
                   class_cache_dir=models / "dreambooth_studio" / "class_images",
                   before_load=lambda: pytest.fail("got as far as loading"))
    text = str(info.value)
    assert message in text and "move or rename that file" in text
    assert str(tmp_path) not in text  # no absolute server path
    assert {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before


def test_more_class_images_than_fit_in_memory_are_refused_before_anything_loads(tmp_path):
    subject = SubjectData(images=(torch.zeros(2048, 2048, 3),), captions=("a photo of sks toy",),
                          instance_prompt="a photo of sks toy", class_prompt="a photo of toy", resolution=2048,
                          source_names=("a.png",))
    with pytest.raises(ValueError, match="class_images is 100; at 2048 px at most 62 fit in memory"):
        plan_prior(PriorRequest(count=100, loss_weight=1.0, seed=0, steps=2, guidance=7.5), subject, "0" * 64, tmp_path / "cache", None)
    assert not (tmp_path / "cache").exists()
