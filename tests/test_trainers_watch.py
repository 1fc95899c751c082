"""Watching a run learn (tiny models): sample images and the validation loss never change the
trained file, land where and when they should, cancel like training does, and the validation
loss shows fitting where the per-step training loss is too noisy to."""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.support.paths import tokenizer_dir
from tests.test_trainers_lora import PROMPT, make_subject, write_photos
from trainers.cli import main as cli_main
from trainers.jobs import Durability, train_file
from trainers.sd15 import placeholder
from trainers.training.callbacks import SampleRound, TrainingCallbacks, TrainingStopped
from trainers.training.config import ConfigError, DreamBoothTrainConfig, LoRATrainConfig, field_spec
from trainers.training.lora import train_lora
from trainers.training.record import history_from_metadata
from trainers.training.watch import (
    SAMPLES_JSON,
    SampleFolder,
    WatchConfig,
    load_sample_rounds,
    prompt_slug,
    sample_grid,
)

pytestmark = [pytest.mark.trainers, pytest.mark.usefixtures("one_thread")]
logger = logging.getLogger(__name__)

BEACH = f"{PROMPT} on the beach"
# Cheap samples: 2 denoising steps per image at the training resolution (64 px).
QUICK_SAMPLES = {"sample_steps": 2}


def split_file(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (with its metadata) and its tensor bytes."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length]), data[8 + length:]


class Events(TrainingCallbacks):
    """Records the order of callbacks; raises ``stop`` at the given (hook, value)."""

    def __init__(self, stop_at: tuple[str, int] | None = None) -> None:
        self.events: list[tuple] = []
        self.stop_at = stop_at
        self.stopped: list[int] = []

    def _maybe_stop(self, hook: str, value: int) -> None:
        if self.stop_at == (hook, value):
            raise TrainingStopped(f"cancelled in {hook} {value}")

    def on_validation(self, step, loss) -> None:
        self.events.append(("validation", step, loss))

    def on_sample_step(self, done, total) -> None:
        self.events.append(("sample_step", done, total))
        self._maybe_stop("sample_step", len([e for e in self.events if e[0] == "sample_step"]))

    def on_samples(self, samples: SampleRound) -> None:
        self.events.append(("samples", samples.step, samples))

    def on_step_end(self, state) -> None:
        self.events.append(("step", state.step, state.validation_loss))
        self._maybe_stop("step", state.step)

    def on_stop(self, step, capture, snapshot, error) -> None:
        self.stopped.append(step)


def job(base_file: Path, output: Path, config, watch=None, callbacks=None, durability=None, sample_dir=None):
    return train_file(base_file, make_subject(count=3), config, output, tokenizer_dir(), callbacks=callbacks,
                      class_cache_dir=output.parent.parent / "class_cache", durability=durability, watch=watch,
                      sample_dir=sample_dir)


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "fragments"), [
    ({"sample_every": -1}, ["sample_every", "0 (no samples) or a whole number >= 1"]),
    ({"sample_every": 2.5}, ["sample_every", "2.5"]),
    ({"sample_every": "10"}, ["sample_every", "'10'"]),
    ({"validate_every": True}, ["validate_every"]),
    ({"validate_every": 100_001}, ["validate_every", "<= 100000"]),
    ({"sample_steps": 0}, ["sample_steps", ">= 1 and <= 150"]),
    ({"sample_steps": 151}, ["sample_steps"]),
    ({"sample_cfg": 0.5}, ["sample_cfg", ">= 1.0 and <= 30.0"]),
    ({"sample_cfg": float("nan")}, ["sample_cfg"]),
    ({"sample_seed": -1}, ["sample_seed"]),
    ({"sample_seed": 2**32}, ["sample_seed", "<= 4294967295"]),
    ({"sample_size": 100}, ["sample_size", "multiple of 64"]),
    ({"sample_size": 32}, ["sample_size"]),
    ({"sample_size": 1088}, ["sample_size", "<= 1024"]),
    ({"sample_prompts": 5}, ["sample_prompts must be text", "5"]),
    ({"sample_prompts": "\n".join(f"prompt {i}" for i in range(9))}, ["sample_prompts", "9 lines", "at most 8"]),
    ({"sample_prompts": "a dog\n\na cat"}, ["sample_prompts line 2 is empty"]),
    ({"sample_prompts": "a dog\n" + "x" * 1001}, ["sample_prompts line 2", "1001 characters", "at most 1000"]),
])
def test_bad_watch_settings_are_refused_naming_the_field(values, fragments):
    with pytest.raises(ConfigError) as caught:
        WatchConfig(**values)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_watch_settings_defaults_prompts_and_widgets():
    default = WatchConfig()
    assert default.prompt_list(PROMPT) == [PROMPT, BEACH]
    assert WatchConfig(sample_prompts="  a dog \r\n a dog on the moon\n\n").prompt_list(PROMPT) == [
        "a dog", "a dog on the moon"]  # surrounding blank lines and spaces are not prompts
    assert WatchConfig(sample_size=0).image_size(64) == 64 and WatchConfig(sample_size=128).image_size(64) == 128
    assert WatchConfig(sample_every=0, validate_every=0).active is False
    assert WatchConfig(sample_every=3).sample_rounds(7) == 4  # steps 0, 3, 6, 7
    spec = field_spec(WatchConfig, "sample_size")
    assert spec["step"] == 64 and spec["zero_means"] == "the training resolution"
    assert field_spec(WatchConfig, "sample_prompts")["multiline"] is True
    assert prompt_slug("A Photo of SKS dog, on the MOON!!") == "a-photo-of-sks-dog-on-the-moon"
    assert prompt_slug("x" * 30 + " " + "y" * 30) == "x" * 30 + "-" + "y" * 9
    assert prompt_slug("寿司") == "prompt"


# ---------------------------------------------------------------------------------------------
# The trained file does not change
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "dreambooth"])
def test_samples_and_validation_leave_the_trained_file_byte_identical_also_across_a_resume(base_file, tmp_path,
                                                                                          method):
    if method == "lora":  # the text encoder trained too: its embeddings are recomputed every round
        config = LoRATrainConfig(steps=5, rank=4, unet_lr=1e-3, text_encoder_lr=1e-4)
    else:  # prior preservation: validation on the class images too
        config = DreamBoothTrainConfig(steps=5, unet_lr=1e-4, class_images=2, class_steps=2)
    watch = WatchConfig(sample_every=2, validate_every=2, **QUICK_SAMPLES)
    runs = {name: tmp_path / name for name in ("plain", "watched", "resumed", "samples_only")}
    for folder in runs.values():
        folder.mkdir()

    plain = job(base_file, runs["plain"] / "run.safetensors", config)
    watched = job(base_file, runs["watched"] / "run.safetensors", config, watch,
                  sample_dir=runs["watched"] / "samples")
    header_plain, tensors_plain = split_file(plain.path)
    header_watched, tensors_watched = split_file(watched.path)
    assert tensors_watched == tensors_plain  # the same weights, byte for byte
    metadata = header_watched.pop("__metadata__")
    assert [p[0] for p in json.loads(metadata.pop("dbs.validation_loss"))] == [0, 2, 4, 5]
    assert metadata == header_plain.pop("__metadata__") and header_watched == header_plain  # nothing else differs
    assert [r.step for r in watched.samples] == [0, 2, 4, 5]

    if method == "lora":  # samples alone do not even touch the metadata: the whole file is the same
        only = job(base_file, runs["samples_only"] / "run.safetensors", config,
                   WatchConfig(sample_every=2, validate_every=0, **QUICK_SAMPLES))
        assert only.path.read_bytes() == plain.path.read_bytes()

    # Cancelled after step 3 (save point at step 2), then resumed: the same bytes as the
    # uninterrupted watched run, validation curve included; rounds from before the stop are kept.
    states = Durability(save_every=2, state_root=tmp_path / "states")
    output, samples = runs["resumed"] / "run.safetensors", runs["resumed"] / "samples"
    with pytest.raises(TrainingStopped):
        job(base_file, output, config, watch, Events(stop_at=("step", 3)), states, samples)
    assert sorted(p.name for p in samples.glob("*.png")) == [
        f"step00000{s}-p{i}-{prompt_slug(p)}.png" for s in (0, 2) for i, p in enumerate([PROMPT, BEACH])]
    events = Events()
    resumed = job(base_file, output, config, watch, events, states, samples)
    assert output.read_bytes() == watched.path.read_bytes()
    assert resumed.notes and "resumed from step 2" in resumed.notes[0]
    assert [e[1] for e in events.events if e[0] == "samples"] == [4, 5]  # only new rounds were made
    assert [e[1] for e in events.events if e[0] == "validation"] == [4, 5]
    assert [r.step for r in resumed.samples] == [0, 2, 4, 5]  # every round of the run
    assert resumed.history.validation == watched.history.validation
    grid = resumed.sample_grid()
    assert grid is not None and grid.height > 4 * 64 and grid.width > 2 * 64


# ---------------------------------------------------------------------------------------------
# When and where
# ---------------------------------------------------------------------------------------------


def test_validation_and_samples_run_at_step_0_every_n_and_the_last_step_before_its_step_end(tmp_path):
    tiny = placeholder.tiny_sd15(seed=0, tokenizer_dir=tokenizer_dir())
    events = Events()
    watch = WatchConfig(sample_every=3, validate_every=2, sample_prompts="a photo of sks toy\nsks toy in a forest",
                        sample_size=128, **QUICK_SAMPLES)
    global_rng = torch.get_rng_state()
    result = train_lora(tiny, make_subject(count=3), LoRATrainConfig(steps=7, rank=4, unet_lr=1e-3), events,
                        watch=watch, sample_dir=tmp_path / "samples", run="r1")
    assert torch.equal(torch.get_rng_state(), global_rng)  # samples and validation draw from their own generators
    order = [(e[0], e[1]) for e in events.events if e[0] != "sample_step"]
    assert order == [
        ("validation", 0), ("samples", 0),
        ("step", 1), ("validation", 2), ("step", 2), ("samples", 3), ("step", 3), ("validation", 4), ("step", 4),
        ("step", 5), ("validation", 6), ("samples", 6), ("step", 6), ("validation", 7), ("samples", 7), ("step", 7),
    ]
    losses = {e[1]: e[2] for e in events.events if e[0] == "validation"}
    assert result.history.validation == sorted(losses.items())
    assert {e[1]: e[2] for e in events.events if e[0] == "step" and e[2] is not None} == \
        {s: v for s, v in losses.items() if s > 0}  # StepState.validation_loss on those steps only
    assert [e[1:] for e in events.events if e[0] == "sample_step"][:3] == [(1, 4), (2, 4), (3, 4)]

    # the file metadata carries the curve; read back the same
    stored = json.loads(result.metadata["dbs.validation_loss"])
    assert [s for s, _ in stored] == [0, 2, 4, 6, 7]
    back = history_from_metadata(result.metadata).validation
    assert [s for s, _ in back] == [0, 2, 4, 6, 7]
    assert [v for _, v in back] == pytest.approx([v for _, v in result.history.validation], rel=1e-4)

    # PNGs named by step and prompt, at the sample size; samples.json says how they were made
    rounds = result.watched.samples
    assert [r.step for r in rounds] == [0, 3, 6, 7] and rounds[0].prompts == ["a photo of sks toy",
                                                                             "sks toy in a forest"]
    names = sorted(p.name for p in (tmp_path / "samples").glob("*.png"))
    assert names == sorted(f"step{s:06d}-p{i}-{slug}.png" for s in (0, 3, 6, 7)
                           for i, slug in enumerate(["a-photo-of-sks-toy", "sks-toy-in-a-forest"]))
    assert all(Image.open(p).size == (128, 128) for p in rounds[-1].paths)
    record = json.loads((tmp_path / "samples" / SAMPLES_JSON).read_text())
    assert record["prompts"] == rounds[0].prompts and record["run"] == "r1"
    assert {k: record[k] for k in ("seed", "steps", "cfg", "size", "sampler")} == {
        "seed": 0, "steps": 2, "cfg": 7.5, "size": 128, "sampler": "ddim"}
    assert sorted(int(s) for s in record["rounds"]) == [0, 3, 6, 7]
    # read back from the folder as they were made; the images change as the weights do
    first = load_sample_rounds(tmp_path / "samples", "r1")
    assert [r.step for r in first] == [0, 3, 6, 7]
    assert [list(r.images[0].getdata()) for r in first] == [list(r.images[0].getdata()) for r in rounds]
    assert list(rounds[0].images[0].getdata()) != list(rounds[-1].images[0].getdata())


def test_validation_is_the_same_with_latents_encoded_every_step():
    """Without cached latents the validation encodes its images once itself: the same curve."""
    config = LoRATrainConfig(steps=2, rank=4, unet_lr=1e-3)
    watch = WatchConfig(sample_every=0, validate_every=1)
    curves = [train_lora(placeholder.tiny_sd15(seed=0, tokenizer_dir=tokenizer_dir()), make_subject(count=3, flip=True),
                         LoRATrainConfig(**{**config.to_dict(), "cache_latents": cached}), watch=watch).history.validation
              for cached in (True, False)]
    assert [s for s, _ in curves[0]] == [0, 1, 2]
    assert [v for _, v in curves[1]] == pytest.approx([v for _, v in curves[0]], rel=1e-5)


def test_sample_folder_keeps_earlier_rounds_only_for_a_resume_with_the_same_settings(tmp_path):
    def round_(step: int) -> SampleRound:
        return SampleRound(step=step, prompts=["a", "b"], images=[Image.new("RGB", (8, 8), (step, 0, 0))] * 2)

    settings = {"run": "r1", "prompts": ["a", "b"], "seed": 0, "steps": 2, "cfg": 7.5, "size": 8, "sampler": "ddim"}
    folder = SampleFolder(tmp_path, settings)
    assert folder.start(0) == []
    for step in (0, 10, 20, 30):
        folder.write(round_(step))
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "holiday.png").write_bytes(b"not ours")

    kept = SampleFolder(tmp_path, settings).start(20)  # resumed after step 20: later rounds go
    assert [r.step for r in kept] == [0, 10, 20] and kept[1].images[0].getpixel((0, 0)) == (10, 0, 0)
    assert not list(tmp_path.glob("step000030-*"))
    assert [r.step for r in SampleFolder(tmp_path, {**settings, "cfg": 5.0}).start(20)] == []  # other settings
    assert not list(tmp_path.glob("step*.png"))
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "holiday.png").read_bytes() == b"not ours"
    folder = SampleFolder(tmp_path, settings)
    folder.start(0)
    folder.write(round_(0))
    assert [r.step for r in load_sample_rounds(tmp_path, "r1")] == [0]
    assert load_sample_rounds(tmp_path, "another run") == []


def test_sample_grid_has_one_labelled_cell_per_step_and_prompt():
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    rounds = [SampleRound(step=step, prompts=["first prompt", "a second prompt that is rather long " * 4, "3rd"],
                          images=[Image.new("RGB", (64, 64), tuple(c + step for c in colour)) for colour in colours])
              for step in (0, 5, 10)]
    grid = sample_grid(rounds)
    width, height = grid.size
    label, header = width - 3 * 64, height - 3 * 64
    assert label > 20 and header > 20  # a column of step labels, a row of prompt labels
    for row, round_ in enumerate(rounds):
        for column, image in enumerate(round_.images):
            x, y = label + column * 64, header + row * 64
            assert grid.crop((x, y, x + 64, y + 64)).tobytes() == image.tobytes()
    dark = sum(1 for pixel in grid.crop((0, header, label, height)).getdata() if max(pixel) < 100)
    assert dark > 30  # the step labels are drawn
    assert sample_grid([]) is None
    many = [SampleRound(step=s, prompts=["p"], images=[Image.new("RGB", (64, 64))]) for s in range(40)]
    assert sample_grid(many).height - 16 * 64 == sample_grid(many[:1]).height - 64  # at most 16 rows
    big = [SampleRound(step=0, prompts=["p"], images=[Image.new("RGB", (1024, 1024))])]
    assert 384 < sample_grid(big).width < 600 and 384 < sample_grid(big).height < 600  # cells at most 384 px


# ---------------------------------------------------------------------------------------------
# Cancel
# ---------------------------------------------------------------------------------------------


def test_a_cancel_inside_a_sample_round_stops_at_once_and_writes_nothing_of_it(base_file, tmp_path):
    config = LoRATrainConfig(steps=4, rank=4, unet_lr=1e-3)
    watch = WatchConfig(sample_every=2, validate_every=0, sample_steps=3)
    # in the step-0 round (before training): no file, no image
    output, samples = tmp_path / "a" / "run.safetensors", tmp_path / "a" / "samples"
    output.parent.mkdir()
    early = Events(stop_at=("sample_step", 2))
    with pytest.raises(TrainingStopped):
        job(base_file, output, config, watch, early, sample_dir=samples)
    assert not output.exists() and not list(samples.glob("*.png"))
    assert not [e for e in early.events if e[0] in ("samples", "step")] and early.stopped == []

    # in the round of step 2 (6 prompts x steps in): the step-0 round stays, step 2's is not
    # written, and the cancel goes through on_stop like a cancel in on_step_end
    output, samples = tmp_path / "b" / "run.safetensors", tmp_path / "b" / "samples"
    output.parent.mkdir()
    later = Events(stop_at=("sample_step", 6 + 2))
    with pytest.raises(TrainingStopped):
        job(base_file, output, config, watch, later, sample_dir=samples)
    assert not output.exists()
    assert sorted(p.name.split("-")[0] for p in samples.glob("*.png")) == ["step000000", "step000000"]
    assert later.stopped == [2] and [e[1] for e in later.events if e[0] == "step"] == [1]


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def test_cli_prints_the_validation_loss_and_writes_the_sample_grid(tmp_path, capsys):
    checkpoint = placeholder.write_random_sd15_checkpoint(tmp_path / "tiny.safetensors", size="tiny")
    images = write_photos(tmp_path / "photos", 3, 64)
    output = tmp_path / "out.safetensors"
    command = ["lora", "--checkpoint", str(checkpoint), "--images", str(images), "--instance-prompt", PROMPT,
               "--output", str(output), "--tokenizer", str(tokenizer_dir()), "--resolution", "64", "--steps", "4",
               "--rank", "4", "--sample-every", "2", "--validate-every", "2", "--sample-steps", "2",
               "--state-dir", str(tmp_path / "states"), "--class-cache", str(tmp_path / "cache")]
    assert cli_main(command) == 0
    out, err = capsys.readouterr()
    assert "validation loss at step 0: " in err and "validation loss at step 4: " in err
    assert "samples of step 2: 2 images" in err
    assert "validation loss " in out and "(step 0) -> " in out and "(step 4), 3 points" in out
    assert "sampling took " in out and "% of the run's " in out and "validation took " in out
    grid_path = tmp_path / "out-samples.png"
    assert f"grid: {grid_path}" in out
    assert len(list((tmp_path / "out-samples").glob("step*.png"))) == 3 * 2
    with Image.open(grid_path) as grid:
        assert grid.width > 2 * 64 and grid.height > 3 * 64 and grid.text["Software"].endswith("sample grid")

    # The identical command reuses the file and still has its samples; a grid file that this pack
    # did not write is left alone.
    grid_path.write_bytes(b"someone else's file")
    assert cli_main(command) == 0
    out, err = capsys.readouterr()
    assert "reused" in out and "samples: 3 rounds" in out and "is not a sample grid of this pack" in err
    assert grid_path.read_bytes() == b"someone else's file"
    # samples are never written among the photos
    with pytest.raises(SystemExit):
        cli_main(command + ["--sample-dir", str(images / "samples")])
    assert "inside the job's input photos" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# What the validation loss shows
# ---------------------------------------------------------------------------------------------


def test_validation_loss_falls_where_the_training_loss_is_too_noisy_to_show_it():
    tiny = placeholder.tiny_sd15(seed=0, tokenizer_dir=tokenizer_dir())
    result = train_lora(tiny, make_subject(count=4), LoRATrainConfig(steps=40, rank=8, unet_lr=1e-3),
                        watch=WatchConfig(sample_every=0, validate_every=10))
    losses, validation = result.history.losses, result.history.validation
    step_to_step = statistics.median(abs(a - b) for a, b in zip(losses, losses[1:], strict=False))
    drop = validation[0][1] - validation[-1][1]
    logger.warning(
        "training loss: first %.4f last %.4f, mean of steps 1-10 %.4f, of steps 31-40 %.4f, median step-to-step "
        "change %.4f, stdev %.4f; validation loss: %s; its whole drop %.4f",
        losses[0], losses[-1], statistics.mean(losses[:10]), statistics.mean(losses[-10:]), step_to_step,
        statistics.stdev(losses), ", ".join(f"step {s}: {v:.4f}" for s, v in validation), drop)
    assert [s for s, _ in validation] == [0, 10, 20, 30, 40]
    assert validation[-1][1] < validation[0][1]  # the model fits the subject
    assert step_to_step > drop  # one step's noise in the training loss is larger than the whole trend
    # a smooth curve: between checks (10 steps apart) it moves far less than the training loss does in one step
    assert max(abs(b - a) for (_, a), (_, b) in zip(validation, validation[1:], strict=False)) < step_to_step / 8


def test_close_validation_ticks_get_labels_that_tell_them_apart():
    from trainers.training.plot import _nice_ticks, _tick_labels

    ticks = _nice_ticks(1.11267, 1.11347, 4)  # a validation curve that moves in the 4th decimal
    labels = _tick_labels(ticks)
    assert len(set(labels)) == len(labels) == len(ticks), labels
    assert all(abs(float(text) - tick) < (ticks[1] - ticks[0]) / 2 for text, tick in zip(labels, ticks, strict=True))
    assert _tick_labels([0.5, 1.0, 1.5]) == ["0.5", "1", "1.5"]  # wide ticks keep their short labels
