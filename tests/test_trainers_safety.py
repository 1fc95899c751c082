"""Unlucky and hostile cases of a training job: outputs that are inputs, files the pack did not
write, names that fail at save time, oversized metadata, a full disk before and after training,
a name taken during training, weights that overflow fp16, and temporary files of killed saves."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.support.disk import fill_disk, small_tmpfs
from tests.support.paths import repo_root, tokenizer_dir
from trainers import jobs
from trainers.data.subject import SubjectData
from trainers.files.fileio import (
    atomic_save_safetensors,
    sha256_file,
    stale_temp,
    sweep_stale_temps,
    temp_path,
)
from trainers.jobs import train_file
from trainers.sd15 import placeholder
from trainers.training.callbacks import LossHistory, TrainingCallbacks
from trainers.training.config import DreamBoothTrainConfig, LoRATrainConfig
from trainers.training.dreambooth import save_dreambooth, train_dreambooth
from trainers.training.lora import save_lora, train_lora
from trainers.training.record import (
    METADATA_LIMIT,
    check_metadata_size,
    history_from_metadata,
    training_metadata,
)
from trainers.training.saving import NotEnoughSpace, SaveFailed, save_safely

pytestmark = pytest.mark.trainers

PROMPT = "a photo of sks toy"
CONFIG = LoRATrainConfig(steps=2, rank=4, unet_lr=1e-3)


def toy_subject(captions: tuple[str, ...] | None = None) -> SubjectData:
    images = []
    for i in range(3):
        image = torch.full((64, 64, 3), 0.9)
        image[12:52, 4 + 6 * i: 36 + 6 * i] = torch.tensor([0.8, 0.1, 0.1])
        images.append(image)
    return SubjectData(images=tuple(images), captions=captions or (PROMPT,) * 3, instance_prompt=PROMPT,
                       class_prompt="a photo of toy", resolution=64,
                       source_names=("IMG_holiday_0.png", "IMG_holiday_1.png", "IMG_holiday_2.png"))


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> Path:
    return placeholder.write_random_sd15_checkpoint(tmp_path_factory.mktemp("base") / "tiny.safetensors", size="tiny")


class Recorder(TrainingCallbacks):
    """Counts steps; runs ``at_save`` when the file is about to be written."""

    def __init__(self, at_save=None):
        super().__init__()
        self.steps = 0
        self.at_save = at_save

    def on_step_end(self, state) -> None:
        self.steps += 1

    def on_save_begin(self) -> None:
        if self.at_save is not None:
            self.at_save()


def must_not_load():
    raise AssertionError("the base model was about to load: the check must come first")


def run(base: Path, output: Path, **kwargs):
    kwargs.setdefault("callbacks", Recorder())
    return train_file(base, toy_subject(), CONFIG, output, tokenizer_dir(), **kwargs)


# -- outputs that are inputs, files the pack did not write ---------------------------------------
def test_output_that_is_the_base_checkpoint_is_refused_and_the_base_is_untouched(base_file):
    before = sha256_file(base_file)
    with pytest.raises(ValueError, match="is the job's own input file tiny.safetensors"):
        run(base_file, base_file, overwrite=True, before_load=must_not_load)
    class_folder = base_file.parent / "class_photos"
    class_folder.mkdir(exist_ok=True)
    with pytest.raises(ValueError, match="own input folder class_photos"):  # nor into the class folder
        run(base_file, class_folder / "x.safetensors", overwrite=True, before_load=must_not_load,
            class_folder=class_folder)
    assert sha256_file(base_file) == before


def test_overwrite_replaces_only_files_this_pack_wrote(base_file, tmp_path):
    third_party = tmp_path / "someone_elses_lora.safetensors"
    save_file({"lora_unet_down.lora_up.weight": torch.ones(4, 4)}, str(third_party),
              metadata={"ss_network_module": "networks.lora", "ss_output_name": "someone_elses_lora"})
    before = sha256_file(third_party)
    with pytest.raises(FileExistsError, match="not written by DreamBooth Studio.*move or delete that file yourself"):
        run(base_file, third_party, overwrite=True, before_load=must_not_load)
    assert sha256_file(third_party) == before

    ours = tmp_path / "ours.safetensors"
    run(base_file, ours)
    fingerprint = _metadata(ours)["dbs.fingerprint"]
    with pytest.raises(FileExistsError, match="trained differently"):  # overwrite off: refused
        train_file(base_file, toy_subject(), LoRATrainConfig(steps=2, rank=4, unet_lr=1e-3, seed=1), ours,
                   tokenizer_dir(), before_load=must_not_load)
    second = train_file(base_file, toy_subject(), LoRATrainConfig(steps=2, rank=4, unet_lr=1e-3, seed=1), ours,
                        tokenizer_dir(), overwrite=True)
    assert not second.reused and _metadata(ours)["dbs.fingerprint"] != fingerprint


def test_a_name_too_long_in_bytes_is_refused_before_training(base_file, tmp_path):
    with pytest.raises(ValueError, match="240 bytes"):
        run(base_file, tmp_path / ("犬" * 80 + ".safetensors"), before_load=must_not_load)
    with pytest.raises(ValueError, match="direction-changing"):
        run(base_file, tmp_path / "lora\u202egnp.safetensors", before_load=must_not_load)


# -- metadata: size and privacy ------------------------------------------------------------------
def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def test_metadata_that_would_be_too_big_is_refused_before_training(base_file, tmp_path):
    captions = tuple(f"{PROMPT}, " + f"detail {i} " * 12_000 for i in range(3))  # ~110 KB each
    subject = toy_subject(captions)
    config = LoRATrainConfig(steps=2, rank=4, unet_lr=1e-3, record_sources=True)
    with pytest.raises(ValueError, match=r"metadata would be \d+ KiB \(dbs.captions.*turn off record_sources"):
        train_file(base_file, subject, config, tmp_path / "big.safetensors", tokenizer_dir(),
                   before_load=must_not_load)
    # the longest run the config allows still fits: long loss curves are stored as step means
    longest = LoRATrainConfig(steps=100_000, rank=4, unet_lr=1e-3)
    assert check_metadata_size(longest, toy_subject(), jobs.Provenance()) < METADATA_LIMIT


def test_long_loss_curves_are_stored_as_means_and_read_back_per_step():
    losses = [1.0 / (1 + i) for i in range(5000)]
    metadata = training_metadata(LoRATrainConfig(steps=5000), toy_subject(), LossHistory(losses, losses, []),
                                 torch.device("cpu"), None, 0)
    stored = json.loads(metadata["dbs.losses"])
    assert metadata["dbs.loss_stride"] == "3" and len(stored) == 1667
    assert stored[0] == pytest.approx(sum(losses[:3]) / 3, rel=1e-4)
    back = history_from_metadata(metadata)
    assert len(back.losses) == 5000 and back.losses[4999] == pytest.approx(losses[-1], rel=1e-3)


def test_photo_names_and_captions_are_private_unless_asked(base_file, tmp_path):
    private = run(base_file, tmp_path / "private.safetensors")
    text = json.dumps(_metadata(private.path))
    assert "IMG_holiday" not in text
    assert json.loads(_metadata(private.path)["dbs.source_names"]) == {"count": 3, "recorded": False}
    shared = train_file(base_file, toy_subject(), LoRATrainConfig(steps=2, rank=4, unet_lr=1e-3, record_sources=True),
                        tmp_path / "shared.safetensors", tokenizer_dir())
    assert json.loads(_metadata(shared.path)["dbs.source_names"])[0] == "IMG_holiday_0.png"


# -- disk space ----------------------------------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path):
    """Mount small tmpfs folders (a disk that can really fill up); unmounted afterwards."""
    with contextlib.ExitStack() as mounts:
        yield lambda name, size: mounts.enter_context(small_tmpfs(tmp_path / name, size))


def test_not_enough_space_is_said_before_training_with_the_size_needed(base_file, tmpfs):
    small = tmpfs("small", "256k")
    with pytest.raises(NotEnoughSpace, match=r"not enough free space in .*small: .* free, this run needs about "
                                             r"1\.\d MB for the LoRA"):
        run(base_file, small / "lora.safetensors", before_load=must_not_load)
    assert list(small.iterdir()) == []


def test_disk_full_at_save_keeps_the_weights_in_the_rescue_folder_and_the_next_run_moves_them(
        base_file, tmpfs, tmp_path):
    models = tmpfs("loras", "4m")
    rescue = tmp_path / "rescued"
    recorder = Recorder(at_save=lambda: fill_disk(models))  # something else filled the disk during training
    job = run(base_file, models / "lora.safetensors", rescue_dir=rescue, callbacks=recorder)
    assert recorder.steps == 2 and job.path == rescue / "lora.safetensors"
    assert "could not be written" in job.notes[0] and "No space left" in job.notes[0]
    assert "move it into" in job.notes[0] and str(rescue) in job.notes[0]
    rescued = load_file(str(job.path))
    assert [p for p in models.iterdir() if p.name != "filler.bin"] == []  # nothing partial left behind
    # space freed: the identical job moves the rescued file into place instead of training again
    (models / "filler.bin").unlink()
    again = run(base_file, models / "lora.safetensors", rescue_dir=rescue, before_load=must_not_load)
    assert again.reused and again.path == models / "lora.safetensors" and "moved from" in again.notes[0]
    assert not (rescue / "lora.safetensors").exists()
    moved = load_file(str(again.path))
    assert moved.keys() == rescued.keys() and all(torch.equal(moved[k], rescued[k]) for k in moved)


def test_when_nothing_can_be_written_the_weights_wait_in_memory_for_the_same_job(base_file, tmpfs, tmp_path):
    models, rescue = tmpfs("loras", "4m"), tmpfs("rescue", "64k")
    fill_disk(rescue)
    with pytest.raises(SaveFailed, match="kept in memory.*queue the same prompt again"):
        run(base_file, models / "lora.safetensors", rescue_dir=rescue, keep_unsaved=True,
            callbacks=Recorder(at_save=lambda: fill_disk(models)))
    (models / "filler.bin").unlink()
    recorder = Recorder()
    job = run(base_file, models / "lora.safetensors", rescue_dir=rescue, keep_unsaved=True, callbacks=recorder,
              before_load=must_not_load)
    assert recorder.steps == 0 and "could not be written" in job.notes[0]
    reference = run(base_file, tmp_path / "reference.safetensors")  # an uninterrupted run of the same job
    assert job.path.read_bytes() == reference.path.read_bytes()


# -- name taken during training, precision overflow ---------------------------------------------
def test_a_name_taken_during_training_keeps_both_files(base_file, tmp_path):
    output = tmp_path / "lora.safetensors"

    def someone_else_writes():
        output.write_bytes(b"another program's file")

    job = run(base_file, output, callbacks=Recorder(at_save=someone_else_writes))
    assert output.read_bytes() == b"another program's file"
    assert job.path == tmp_path / "lora-1.safetensors" and "was taken by another file" in job.notes[0]
    assert len(load_file(str(job.path))) > 0


def test_weights_that_overflow_fp16_are_saved_in_bf16(tmp_path):
    tiny = placeholder.tiny_sd15(seed=0, tokenizer_dir=tokenizer_dir())
    result = train_lora(tiny, toy_subject(), CONFIG)
    key = next(k for k in result.state_dict if k.endswith("lora_up.weight"))
    result.state_dict[key] = result.state_dict[key] + 1e6  # finite in fp32, not in fp16

    def write(path, precision, overwrite):
        return save_lora(result, path, overwrite=overwrite, dtype=jobs.SAVE_DTYPES[precision])

    saved = save_safely(write, tmp_path / "big.safetensors", "fp16")
    assert saved.precision == "bf16" and "do not fit fp16" in saved.notes[0]
    tensor = load_file(str(saved.path))[key]
    assert tensor.dtype == torch.bfloat16 and bool(torch.isfinite(tensor).all())


def test_a_dreambooth_checkpoint_that_overflows_fp16_is_saved_in_bf16_not_refused(tmp_path):
    tiny = placeholder.tiny_sd15(seed=0, tokenizer_dir=tokenizer_dir())
    config = DreamBoothTrainConfig(steps=1, unet_lr=1e-5, class_images=0)
    result = train_dreambooth(tiny, toy_subject(), config)
    with torch.no_grad():
        tiny.unet.conv_in.weight[0, 0, 0, 0] = 1e6  # a trained weight beyond fp16's 65504

    def write(path, precision, overwrite):
        return save_dreambooth(tiny, result, path, precision, overwrite=overwrite)

    saved = save_safely(write, tmp_path / "db.safetensors", config.save_precision)
    assert saved.precision == "bf16" and "do not fit fp16" in saved.notes[0]
    assert _metadata(saved.path)["dbs.save_precision"] == "bf16"
    tensor = load_file(str(saved.path))["model.diffusion_model.input_blocks.0.0.weight"]
    assert tensor.dtype == torch.bfloat16 and float(tensor[0, 0, 0, 0]) == pytest.approx(1e6, rel=1e-2)


# -- temporary files of killed saves -------------------------------------------------------------
_SLOW_SAVE = """
import sys, torch
from trainers.files.fileio import atomic_save_safetensors
tensors = {f"t{i}": torch.zeros(8 * 1024 * 1024) for i in range(64)}  # 2 GB: slow enough to be caught
atomic_save_safetensors(tensors, sys.argv[1])
"""


def test_a_save_killed_midway_leaves_only_a_temporary_file_that_the_sweep_removes(tmp_path):
    output = tmp_path / "model.safetensors"
    child = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(output)], cwd=repo_root())
    deadline = time.monotonic() + 120
    temps: list[Path] = []
    while time.monotonic() < deadline and not temps:
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".model.safetensors.dbs-")
                 and p.stat().st_size > 0]
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert temps and not output.exists()  # killed while writing: no partial model, one hidden temp
    mine = temp_path(tmp_path / "live.safetensors")  # a save of a process that still runs: kept
    mine.write_bytes(b"x")
    os.rename(mine, tmp_path / mine.name.replace(f"-{os.getpid()}-", "-1-"))  # pid 1 is always alive
    foreign = tmp_path / ".other.safetensors.tmp"  # someone else's temporary file: never touched
    foreign.write_bytes(b"x")
    removed = sweep_stale_temps(tmp_path)
    assert removed == temps and not temps[0].exists()
    assert foreign.exists() and sum(1 for p in tmp_path.iterdir() if "-1-" in p.name) == 1
    assert stale_temp(temps[0].name) and not stale_temp(foreign.name)
    assert atomic_save_safetensors({"x": torch.ones(1)}, output) == output  # the name is free
