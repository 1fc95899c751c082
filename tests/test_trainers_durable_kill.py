"""Durable runs under hostile luck: ``python -m trainers lora`` killed with SIGKILL at every stage
of a save point, a disk that fills while a training state or a step file is written, and a loss
that goes NaN after a save point. After each, nothing partial is visible, no damaged state is
resumed, and the same command finishes with the very bytes of a run that never stopped.

Each CLI run is a fresh process forked from a server that has already imported torch, diffusers
and transformers (``multiprocessing``'s forkserver; the server itself never computes anything),
so a run costs seconds instead of the ~10 s of imports. The child installs the test's fault (a
monkeypatch that SIGKILLs itself at a chosen moment, fills the disk, or poisons a weight) and then
calls ``trainers.cli.main(argv)``, exactly what ``python -m trainers`` does.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from tests.support.disk import fill_disk, small_tmpfs
from tests.support.paths import tokenizer_dir

pytestmark = pytest.mark.trainers

STEPS, SAVE_EVERY = 6, 2
STEM = "run"
PRELOAD = [
    "trainers.cli", "trainers.jobs", "safetensors.torch", "cv2", "peft",
    "diffusers.models.unets.unet_2d_condition", "diffusers.models.autoencoders.autoencoder_kl",
    "diffusers.schedulers.scheduling_ddpm", "diffusers.optimization",
    "transformers.models.clip.modeling_clip", "transformers.models.clip.tokenization_clip", __name__,
]  # fmt: skip
TEMP_NAME = re.compile(r"^\..+\.dbs-\d+-[0-9a-z_]{8}\.tmp$")


# -- the faults, installed inside the CLI process -------------------------------------------------
def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _install_fault(fault: str, step: int, arg: str | None) -> None:
    import torch

    import trainers.cli as cli
    import trainers.files.fileio as fileio
    import trainers.training.loop as loop
    import trainers.training.state as state

    step_file_name = f"{STEM}-step{step:06d}.safetensors"
    state_folder = f"step-{step:07d}"  # written as ".step-NNNNNNN.dbs-<pid>-<random>.tmp", then renamed

    if fault in ("mid-step", "poison-weights"):
        real_finish = loop.finish_step

        def finish_step(optimization, max_grad_norm, at, processes=loop.SINGLE):
            norm = real_finish(optimization, max_grad_norm, at, processes)
            if at == step:
                if fault == "mid-step":
                    _die()  # the optimizer has stepped; nothing of this step is saved yet
                with torch.no_grad():  # as if the weights had diverged
                    optimization.parameters[0].fill_(float("nan"))
            return norm

        loop.finish_step = finish_step
    elif fault == "step-file-half-written":
        real_write = fileio.write_safetensors

        def write_safetensors(tensors, handle, metadata):
            if step_file_name in str(getattr(handle, "name", "")):
                buffer = io.BytesIO()
                real_write(tensors, buffer, metadata)
                handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                handle.flush()
                _die()
            real_write(tensors, handle, metadata)

        fileio.write_safetensors = write_safetensors
    elif fault in ("step-file-written", "step-file-linked"):
        real_link = os.link

        def link(source, target, *args, **kwargs):
            if Path(target).name != step_file_name:
                return real_link(source, target, *args, **kwargs)
            if fault == "step-file-written":
                _die()  # the temporary file is complete, the step file not yet in place
            real_link(source, target, *args, **kwargs)
            _die()  # in place, its temporary name not yet removed, no state of this step

        os.link = link
    elif fault in ("state-folder-created", "state-tensors-half-written", "state-data-missing",
                   "state-manifest-missing"):
        target = {"state-folder-created": state.TENSORS, "state-tensors-half-written": state.TENSORS,
                  "state-data-missing": state.DATA, "state-manifest-missing": state.MANIFEST}[fault]
        real_write_file = state._write_file

        def write_file(path, write):
            if state_folder in path.parent.name and path.name == target:
                if fault == "state-tensors-half-written":
                    buffer = io.BytesIO()
                    write(buffer)
                    with open(path, "xb") as handle:
                        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                        handle.flush()
                _die()
            return real_write_file(path, write)

        state._write_file = write_file
    elif fault in ("state-before-rename", "state-renamed"):
        real_rename = os.rename

        def rename(source, target, *args, **kwargs):
            if state_folder not in Path(source).name:
                return real_rename(source, target, *args, **kwargs)
            if fault == "state-before-rename":
                _die()  # complete and verified, under its temporary name
            real_rename(source, target, *args, **kwargs)
            _die()  # in place, older states not yet pruned

        os.rename = rename
    elif fault == "fill-disk":
        real_step_end = cli.TerminalProgress.on_step_end

        def on_step_end(self, state_):
            real_step_end(self, state_)
            if state_.step == step:
                fill_disk(arg, "filler")

        cli.TerminalProgress.on_step_end = on_step_end
    else:
        raise ValueError(fault)


def _cli_process(argv: list[str], log: str, fault: tuple[str, int, str | None] | None) -> None:
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    if fault is not None:
        _install_fault(*fault)
    from trainers.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.exit(code)


_CONTEXT = multiprocessing.get_context("forkserver")


def run_cli(argv: list[str], log: Path, fault: tuple[str, int, str | None] | None = None) -> tuple[int, str]:
    """(exit code, negative for a signal; stdout + stderr) of ``python -m trainers <argv>``."""
    process = _CONTEXT.Process(target=_cli_process, args=(argv, str(log), fault))
    # The fork server starts with this process's sys.path. After the in-process ComfyUI tests it
    # holds ComfyUI's folder, whose modules would shadow ours in the children (one of them parses
    # sys.argv as ComfyUI's options and exits): start it without ComfyUI's folders.
    from tests.support.paths import comfyui_path

    comfy = str(comfyui_path())
    saved = list(sys.path)
    sys.path[:] = [entry for entry in sys.path if not entry.startswith(comfy)]
    try:
        process.start()
    finally:
        sys.path[:] = saved
    process.join(600)
    if process.is_alive():
        process.kill()
        process.join()
        pytest.fail(f"the CLI did not finish within 10 minutes: {log.read_text(errors='replace')[-3000:]}")
    return process.exitcode, log.read_text(errors="replace")


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny base checkpoint and three photos (shared by every run; read only)."""

    from trainers.sd15 import placeholder

    # The fork server imports this module by name in each child: the repository must come first on
    # its path (an in-process ComfyUI, imported by the nodes tests, puts its own `tests` package
    # ahead of ours).
    repo = str(Path(__file__).resolve().parents[1])
    if sys.path[0] != repo:
        sys.path.insert(0, repo)
    _CONTEXT.set_forkserver_preload(PRELOAD)
    from tests.test_trainers_lora import write_photos

    root = tmp_path_factory.mktemp("inputs")
    checkpoint = placeholder.write_random_sd15_checkpoint(root / "tiny.safetensors", size="tiny")
    return checkpoint, write_photos(root / "photos", 3, 64)


def command(inputs, output: Path, states: Path) -> list[str]:
    checkpoint, photos = inputs
    return ["lora", "--checkpoint", str(checkpoint), "--images", str(photos), "--instance-prompt",
            "a photo of sks toy", "--output", str(output), "--tokenizer", str(tokenizer_dir()),
            "--resolution", "64", "--steps", str(STEPS), "--rank", "4", "--unet-lr", "1e-3",
            "--save-every", str(SAVE_EVERY), "--keep-last", "2", "--state-dir", str(states),
            "--class-cache", str(output.parent.parent / "class_cache"),
            "--rescue-dir", str(output.parent.parent / "rescued"),
            # sample images and validation stay on (the CLI's default), outside the models folder
            "--sample-dir", str(output.parent.parent / "samples")]  # fmt: skip


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """The uninterrupted run: its final file, its step files and the job's fingerprint."""
    root = tmp_path_factory.mktemp("reference")
    output = root / "models" / f"{STEM}.safetensors"
    output.parent.mkdir()
    code, log = run_cli(command(inputs, output, root / "states"), root / "log.txt")
    assert code == 0, log[-3000:]
    from safetensors import safe_open

    with safe_open(str(output), "pt") as handle:
        fingerprint = handle.metadata()["dbs.fingerprint"]
    steps = {path.name: path.read_bytes() for path in (output.parent / STEM).iterdir()}
    assert sorted(steps) == [f"{STEM}-step000002.safetensors", f"{STEM}-step000004.safetensors"]
    return output.read_bytes(), steps, fingerprint


# -- what a user may see after a crash ------------------------------------------------------------
def visible_files(folder: Path) -> list[str]:
    """Every name under ``folder`` that is not one of the pack's hidden temporaries, relative."""
    names = []
    for path in sorted(folder.rglob("*")):
        if TEMP_NAME.match(path.name) or any(TEMP_NAME.match(part) for part in path.relative_to(folder).parts):
            continue
        if path.is_file():
            names.append(path.relative_to(folder).as_posix())
    return names


def hidden_temporaries(*folders: Path) -> list[str]:
    return [p.name for folder in folders if folder.exists() for p in folder.rglob("*") if TEMP_NAME.match(p.name)]


def assert_complete_model_files(models: Path, names: list[str]) -> None:
    """Only complete step files are visible, each loading with finite weights."""
    import torch
    from safetensors.torch import load_file

    assert visible_files(models) == names
    for name in names:
        tensors = load_file(str(models / name))
        assert tensors and all(bool(torch.isfinite(t.float()).all()) for t in tensors.values()), name


def state_folders(job_states: Path) -> list[int]:
    """Steps of the visible state folders, after checking each is complete by its manifest."""
    steps = []
    for folder in sorted(job_states.iterdir()) if job_states.exists() else []:
        if TEMP_NAME.match(folder.name):
            continue
        match = re.fullmatch(r"step-(\d{7})", folder.name)
        assert match, f"unexpected entry {folder.name} among the training states"
        assert (folder / "manifest.json").is_file(), f"{folder.name} is visible without its manifest"
        manifest = json.loads((folder / "manifest.json").read_text())
        assert sorted(manifest["files"]) == ["state.json", "tensors.safetensors"], manifest
        for name, entry in manifest["files"].items():
            data = (folder / name).read_bytes() if (folder / name).is_file() else b""
            assert len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"], \
                f"{folder.name}/{name} does not match its manifest"
        steps.append(int(match.group(1)))
    return steps


# -- 1. SIGKILL at every stage --------------------------------------------------------------------
# (fault, step it strikes at, step files visible after the kill, states visible, step resumed from)
KILLS = [
    ("mid-step", 3, [2], [2], 2),
    ("step-file-half-written", 4, [2], [2], 2),
    ("step-file-written", 4, [2], [2], 2),
    ("step-file-linked", 4, [2, 4], [2], 2),
    ("state-folder-created", 4, [2, 4], [2], 2),
    ("state-tensors-half-written", 4, [2, 4], [2], 2),
    ("state-data-missing", 4, [2, 4], [2], 2),
    ("state-manifest-missing", 4, [2, 4], [2], 2),
    ("state-before-rename", 4, [2, 4], [2], 2),
    ("state-renamed", 4, [2, 4], [2, 4], 4),
    ("state-before-rename", 2, [2], [], None),
]


@pytest.mark.parametrize(("fault", "at", "files", "states", "resumed"), KILLS,
                         ids=[f"{k[0]}-at-step{k[1]}" for k in KILLS])
def test_a_run_killed_at_any_moment_resumes_to_the_same_bytes(inputs, reference, tmp_path, fault, at, files,
                                                              states, resumed):
    final, reference_steps, fingerprint = reference
    models = tmp_path / "models"
    models.mkdir()
    output, state_root = models / f"{STEM}.safetensors", tmp_path / "states"
    job_states = state_root / fingerprint[:32]
    argv = command(inputs, output, state_root)

    code, log = run_cli(argv, tmp_path / "killed.txt", (fault, at, None))
    assert code == -signal.SIGKILL, log[-3000:]
    printed = re.findall(rf"\] (\d+)/{STEPS} loss", log)
    assert printed and int(printed[-1]) == (at - 1 if fault == "mid-step" else at), log[-2000:]
    assert_complete_model_files(models, [f"{STEM}/{STEM}-step{s:06d}.safetensors" for s in files])
    assert state_folders(job_states) == states
    if fault not in ("mid-step", "state-renamed"):  # its temporary is left behind, hidden, for the next run
        assert hidden_temporaries(models, state_root)

    code, log = run_cli(argv, tmp_path / "rerun.txt")
    assert code == 0, log[-3000:]
    if resumed is None:
        assert "resumed from" not in log and f"] 1/{STEPS} loss" in log
    else:
        assert f"resumed from step {resumed} (training state step-{resumed:07d})" in log
        assert f"] {resumed}/{STEPS} loss" not in log and f"] {resumed + 1}/{STEPS} loss" in log
    assert "incomplete or damaged" not in log
    assert output.read_bytes() == final
    assert {p.name: p.read_bytes() for p in (models / STEM).iterdir()} == reference_steps
    assert hidden_temporaries(models, state_root) == []
    assert not job_states.exists()  # a finished job's states are removed


# -- 2. a disk that fills up during training ------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs: room for the run's checks before training, filled during it."""
    with small_tmpfs(tmp_path / "small", "16m") as mount:
        yield mount


@pytest.mark.parametrize("full", ["training state", "step file"])
def test_a_disk_that_fills_up_stops_the_run_with_the_last_save_point_intact(inputs, reference, tmp_path,
                                                                          small_disk, full):
    final, reference_steps, fingerprint = reference
    models = (small_disk if full == "step file" else tmp_path) / "models"
    models.mkdir()
    state_root = (small_disk if full == "training state" else tmp_path) / "states"
    output, job_states = models / f"{STEM}.safetensors", state_root / fingerprint[:32]
    argv = command(inputs, output, state_root)

    # the disk fills after step 3: the save point of step 4 cannot be written
    code, log = run_cli(argv, tmp_path / "full.txt", ("fill-disk", 3, str(small_disk)))
    assert code == 1, log[-3000:]
    error = log[log.index("error: "):]
    where = job_states if full == "training state" else models / STEM
    what = "the training state of step 4" if full == "training state" else "the step-4 file"
    assert error.startswith(f"error: {what} could not be written in {where} (No space left on device)"), error
    assert re.search(r"it needs about \d+(\.\d)? (KB|MB)\. The state of step 2 is intact", error), error
    assert "Traceback" not in log
    files = [2, 4] if full == "training state" else [2]
    assert_complete_model_files(models, [f"{STEM}/{STEM}-step{s:06d}.safetensors" for s in files])
    step2 = f"{STEM}-step000002.safetensors"
    assert (models / STEM / step2).read_bytes() == reference_steps[step2]
    assert state_folders(job_states) == [2]
    assert hidden_temporaries(models, state_root) == []  # a failed write leaves nothing behind

    for filler in small_disk.glob("filler*"):  # the user frees space and runs the same command
        filler.unlink()
    code, log = run_cli(argv, tmp_path / "rerun.txt")
    assert code == 0, log[-3000:]
    assert "resumed from step 2 (training state step-0000002)" in log
    assert output.read_bytes() == final
    assert {p.name: p.read_bytes() for p in (models / STEM).iterdir()} == reference_steps


# -- 3. a loss that goes NaN after a save point ---------------------------------------------------
@pytest.fixture(scope="module")
def diverged(inputs, tmp_path_factory):
    """A run whose weights go NaN in step 3, after the save point of step 2: step 4's loss is NaN."""
    root = tmp_path_factory.mktemp("diverged")
    models = root / "models"
    models.mkdir()
    output, state_root = models / f"{STEM}.safetensors", root / "states"
    code, log = run_cli(command(inputs, output, state_root), root / "log.txt", ("poison-weights", 3, None))
    return code, log, models, output, state_root


def test_a_run_that_diverges_names_the_step_and_keeps_the_last_finite_save_point(diverged):
    import torch
    from safetensors.torch import load_file

    code, log, models, output, state_root = diverged
    assert code == 1, log[-3000:]
    assert "the loss became NaN or infinite at step 4" in log and "Lower the learning rate" in log, log[-3000:]
    assert "The step-2 file and training state (before it went wrong) are kept." in log
    assert not output.exists()
    assert_complete_model_files(models, [f"{STEM}/{STEM}-step000002.safetensors"])
    (job_states,) = state_root.iterdir()
    assert state_folders(job_states) == [2]
    state = load_file(str(job_states / "step-0000002" / "tensors.safetensors"))
    assert all(bool(torch.isfinite(t.float()).all()) for t in state.values() if t.is_floating_point())
    assert hidden_temporaries(models, state_root) == []


def test_the_command_line_reports_divergence_as_an_error_line(diverged):
    code, log, *_ = diverged
    assert code == 1 and "Traceback" not in log
    assert "error: training diverged: the loss became NaN or infinite at step 4" in log
    assert "Nothing was saved" not in log
