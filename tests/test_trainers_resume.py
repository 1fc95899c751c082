"""Durable runs: a run stopped at a save point and resumed gives the very bytes of a run that
never stopped (CPU, fp32), for LoRA (UNet + text encoder) and DreamBooth (with prior
preservation); training states on disk are complete or ignored."""

from __future__ import annotations

import json

import pytest
import torch

from tests.support.paths import tokenizer_dir
from tests.test_trainers_lora import make_subject
from trainers.sd15 import placeholder
from trainers.training.callbacks import TrainingCallbacks, TrainingStopped
from trainers.training.config import DreamBoothTrainConfig, LoRATrainConfig
from trainers.training.dreambooth import train_dreambooth
from trainers.training.lora import train_lora
from trainers.training.state import newest_state, write_state

pytestmark = pytest.mark.trainers

FINGERPRINT = "f" * 64


class SavePoints(TrainingCallbacks):
    """Writes a state at every save point; stops the run after ``stop_after`` steps."""

    def __init__(self, root, stop_after: int | None = None):
        super().__init__()
        self.root, self.stop_after, self.written = root, stop_after, []

    def on_save_point(self, step, capture, snapshot) -> None:
        self.written.append(write_state(self.root, capture(), FINGERPRINT, {"step": step}))

    def on_step_end(self, state) -> None:
        if self.stop_after is not None and state.step == self.stop_after:
            raise TrainingStopped(f"stopped at step {state.step}")


def fresh():
    return placeholder.tiny_sd15(seed=0, tokenizer_dir=tokenizer_dir())


def test_a_lora_resumed_from_a_saved_state_equals_the_uninterrupted_run(tmp_path):
    config = LoRATrainConfig(steps=6, rank=4, unet_lr=1e-3, text_encoder_lr=1e-4, lr_scheduler="cosine",
                             lr_warmup_steps=1)
    subject = make_subject(count=3, flip=True)
    whole = train_lora(fresh(), subject, config)

    with pytest.raises(TrainingStopped):
        train_lora(fresh(), subject, config, SavePoints(tmp_path, stop_after=5), save_every=2)
    state, folder = newest_state(tmp_path, FINGERPRINT)
    assert state.step == 4 and folder.name == "step-0000004"
    assert [p.name for p in tmp_path.iterdir()] == ["step-0000004"]  # older states pruned
    resumed = train_lora(fresh(), subject, config, resume=state)

    assert resumed.state_dict.keys() == whole.state_dict.keys()
    assert all(torch.equal(resumed.state_dict[k], whole.state_dict[k]) for k in whole.state_dict)
    assert resumed.history.losses == whole.history.losses
    assert resumed.metadata == whole.metadata


def test_a_dreambooth_run_with_prior_preservation_resumes_exactly(tmp_path):
    config = DreamBoothTrainConfig(steps=4, unet_lr=1e-4, class_images=2, batch_size=1)
    subject = make_subject(count=2)
    classes = make_subject(count=2)
    reference = fresh()
    whole = train_dreambooth(reference, subject, config, class_subject=classes)

    stopped = fresh()
    with pytest.raises(TrainingStopped):
        train_dreambooth(stopped, subject, config, SavePoints(tmp_path, stop_after=3), class_subject=classes,
                         save_every=2)
    state, _ = newest_state(tmp_path, FINGERPRINT)
    resumed_models = fresh()
    resumed = train_dreambooth(resumed_models, subject, config, class_subject=classes, resume=state)
    for name, tensor in reference.unet.state_dict().items():
        assert torch.equal(tensor, resumed_models.unet.state_dict()[name]), name
    assert resumed.history.prior_losses == whole.history.prior_losses and resumed.metadata == whole.metadata


def test_only_a_complete_state_of_the_same_job_is_read_back(tmp_path):
    config = LoRATrainConfig(steps=4, rank=4, unet_lr=1e-3)
    with pytest.raises(TrainingStopped):
        train_lora(fresh(), make_subject(count=2), config, SavePoints(tmp_path, stop_after=3), save_every=1)
    assert newest_state(tmp_path, FINGERPRINT)[0].step == 2
    assert newest_state(tmp_path, "0" * 64) is None  # another job's fingerprint
    tensors = tmp_path / "step-0000002" / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 1
    tensors.write_bytes(bytes(data))  # damaged after writing: never loaded
    assert newest_state(tmp_path, FINGERPRINT) is None


# -- whole jobs: step files, states, resume through train_file ------------------------------------
def tensor_layout(path) -> dict:
    """Each tensor's dtype and shape, from a safetensors header."""
    with open(path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    return {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}


class StopAt(TrainingCallbacks):
    def __init__(self, step: int | None = None):
        super().__init__()
        self.stop, self.steps = step, []

    def on_step_end(self, state) -> None:
        self.steps.append(state.step)
        if state.step == self.stop:
            raise TrainingStopped(f"cancelled at step {state.step}")


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    return placeholder.write_random_sd15_checkpoint(tmp_path_factory.mktemp("base") / "tiny.safetensors", size="tiny")


def job(base_file, output, config, callbacks=None, **durable):
    from trainers.jobs import Durability, train_file

    return train_file(base_file, make_subject(count=3), config, output, tokenizer_dir(), callbacks=callbacks,
                      class_cache_dir=output.parent / "class_cache",
                      durability=Durability(state_root=output.parent / "states", **durable))


@pytest.mark.parametrize("method", ["lora", "dreambooth"])
def test_a_cancelled_job_resumes_to_the_same_bytes_as_an_uninterrupted_one(base_file, tmp_path, method):
    from safetensors import safe_open

    if method == "lora":
        config = LoRATrainConfig(steps=5, rank=4, unet_lr=1e-3, text_encoder_lr=1e-4)
    else:  # with prior preservation: class images generated from the tiny base
        config = DreamBoothTrainConfig(steps=5, unet_lr=1e-4, class_images=2, class_steps=2, save_precision="fp32")
    whole = job(base_file, tmp_path / "whole.safetensors", config)
    assert not (tmp_path / "states").exists() or not any((tmp_path / "states").iterdir())

    output = tmp_path / "run.safetensors"
    with pytest.raises(TrainingStopped):
        job(base_file, output, config, StopAt(4), save_every=2)
    assert not output.exists()  # a cancel writes no final file
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["run-step000002.safetensors"]
    with safe_open(str(tmp_path / "run" / "run-step000002.safetensors"), "pt") as handle:
        step_meta = handle.metadata()
    assert step_meta["dbs.step_file"] == "2" and "dbs.fingerprint" not in step_meta  # never reused as the run

    resumed_steps = StopAt()
    resumed = job(base_file, output, config, resumed_steps, save_every=2)
    assert resumed_steps.steps == [3, 4, 5] and "resumed from step 2" in resumed.report()
    assert output.read_bytes() == whole.path.read_bytes()
    # the step file is the run's file at step 2: the same tensors (names, shapes, dtypes) as the
    # final file, so whatever loads the one (ComfyUI, diffusers) loads the other
    assert tensor_layout(tmp_path / "run" / "run-step000002.safetensors") == tensor_layout(output)
    assert not any((tmp_path / "states").iterdir())  # a finished job's states are removed
    again = job(base_file, output, config, save_every=2)  # the finished job is reused, not resumed
    assert again.reused


def test_keep_last_bounds_the_step_files_and_never_resumes_when_asked(base_file, tmp_path):
    config = LoRATrainConfig(steps=7, rank=4, unet_lr=1e-3)
    output = tmp_path / "lora.safetensors"
    with pytest.raises(TrainingStopped):
        job(base_file, output, config, StopAt(7), save_every=1, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == ["lora-step000005.safetensors",
                                                                    "lora-step000006.safetensors"]
    fresh_steps = StopAt()
    job(base_file, output, config, fresh_steps, resume="never")
    assert fresh_steps.steps == list(range(1, 8))


class CancelInsideStep(TrainingCallbacks):
    """A user's cancel that arrives in the middle of step ``at``'s forward pass (at the UNet's
    third block); the state the stop hands over is written to ``root``."""

    def __init__(self, root, at: int):
        super().__init__()
        self.root, self.at, self.done, self.checks, self.stopped = root, at, 0, 0, []

    def on_step_end(self, state) -> None:
        self.done = state.step

    def check_cancel(self) -> None:
        if self.done == self.at - 1:
            self.checks += 1
            if self.checks == 3:
                raise TrainingStopped("cancelled")

    def on_stop(self, step, capture, snapshot, error) -> None:
        self.stopped.append(step)
        write_state(self.root, capture(), FINGERPRINT, {"step": step})


def test_a_cancel_inside_a_step_stops_there_and_keeps_the_step_before_exactly(tmp_path):
    # the forward pass of step 3 is cut short: the run stops as if cancelled after step 2, with
    # step 3's draws undone, so its state resumes to the uninterrupted run's weights
    config = LoRATrainConfig(steps=4, rank=4, unet_lr=1e-3, lr_scheduler="cosine", seed=7)
    subject = make_subject(count=3, flip=True)
    whole = train_lora(fresh(), subject, config)
    cancel = CancelInsideStep(tmp_path, at=3)
    with pytest.raises(TrainingStopped):
        train_lora(fresh(), subject, config, cancel)
    assert cancel.done == 2 and cancel.checks == 3 and cancel.stopped == [2]
    state, _ = newest_state(tmp_path, FINGERPRINT)
    assert state.step == 2 and state.history.losses == whole.history.losses[:2]
    resumed = train_lora(fresh(), subject, config, resume=state)
    assert all(torch.equal(resumed.state_dict[k], whole.state_dict[k]) for k in whole.state_dict)
    # a cancel inside the first step has nothing to keep
    first = CancelInsideStep(tmp_path / "first", at=1)
    with pytest.raises(TrainingStopped):
        train_lora(fresh(), subject, config, first)
    assert first.checks == 3 and first.stopped == []
