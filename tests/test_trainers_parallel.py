"""Data-parallel training on this CPU: ``accelerate launch --multi_gpu --num_processes 2`` (torchrun
underneath, the gloo backend without GPUs) on the tiny model trains what one process trains with
the same global batch, writes exactly one file from the main process, and a process that fails
or is killed ends the launch with no file; the relaunch resumes from the last training state."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.support.paths import repo_root, tokenizer_dir
from tests.test_trainers_lora import PROMPT, run_cli, write_photos
from trainers.sd15 import placeholder

pytestmark = pytest.mark.trainers

# float32 sums in another order (two shards averaged vs one batch), as a share of a tensor's norm
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    checkpoint = placeholder.write_random_sd15_checkpoint(root / "tiny.safetensors", size="tiny")
    return root, checkpoint, write_photos(root / "photos", 4, 96)


def common(setup, output: Path, command: str = "lora") -> list[str]:
    root, checkpoint, photos = setup
    return [command, "--checkpoint", str(checkpoint), "--images", str(photos), "--instance-prompt", PROMPT,
            "--tokenizer", str(tokenizer_dir()), "--resolution", "64", "--flip", "--save-precision", "fp32",
            "--sample-every", "0", "--validate-every", "0", "--output", str(output),
            "--state-dir", str(root / "states"), "--class-cache", str(root / "class-cache")]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(argv: list[str], processes: int = 2, env: dict | None = None, **popen) -> subprocess.Popen:
    """``accelerate launch --multi_gpu --num_processes N -m trainers ...`` as a user types it."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "trainers", *argv]
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(command, cwd=repo_root(), env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **popen)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out.decode(), err.decode()


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def largest_difference(a: Path, b: Path) -> tuple[float, float]:
    """(the largest difference of two files' tensors as a share of that tensor's norm; the smallest
    tensor norm) of files with the same keys. AdamW's first steps move a weight by about lr
    whatever the size of its gradient, so a weight whose gradient is ~0 moves by float noise:
    whole tensors are compared, not single weights."""
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys()
    norms = {k: float(second[k].float().norm()) for k in first}
    assert all(norms.values()), "a tensor is all zero: nothing was trained"
    diff = max(float((first[k].float() - second[k].float()).norm()) / norms[k] for k in first)
    return diff, min(norms.values())


def test_two_processes_train_what_one_process_trains_with_the_same_global_batch(setup, tmp_path, capsys):
    (tmp_path / "two").mkdir()
    two = tmp_path / "two" / "lora.safetensors"
    settings = ["--steps", "3", "--rank", "4", "--unet-lr", "1e-3", "--text-encoder-lr", "1e-4"]
    done = launch(common(setup, two) + settings + ["--batch-size", "1", "--gradient-accumulation", "2"])
    code, out, err = finish(done)
    assert code == 0, err[-4000:]
    assert f"saved {two}" in out and out.count("saved") == 1  # only the main process reports
    assert sorted(p.name for p in two.parent.iterdir()) == ["lora.safetensors"]  # one file, nothing else

    # --shard-optimizer (ZeRO stage 1): each process steps its share of the weights with its share
    # of the optimizer states; a save point gathers them (its step file and state are written)
    (tmp_path / "sharded").mkdir()
    sharded = tmp_path / "sharded" / "lora.safetensors"
    done = launch(common(setup, sharded) + settings + ["--batch-size", "1", "--gradient-accumulation", "2",
                                                       "--shard-optimizer", "--save-every", "2", "--keep-last", "0"])
    code, out, err = finish(done)
    assert code == 0, err[-4000:]
    assert (tmp_path / "sharded" / "lora" / "lora-step000002.safetensors").is_file()

    # one process, the same global batch of 4: in one pass, and in two accumulated passes
    results = {}
    for name, split in (("batch4", ["--batch-size", "4"]),
                        ("batch2x2", ["--batch-size", "2", "--gradient-accumulation", "2"])):
        (tmp_path / name).mkdir()
        results[name] = tmp_path / name / "lora.safetensors"
        code, _, err = run_cli(common(setup, results[name]) + settings + split, capsys)
        assert code == 0, err[-3000:]

    meta = metadata(two)
    assert (meta["dbs.processes"], meta["ss_batch_size_per_device"], meta["ss_gradient_accumulation_steps"],
            meta["ss_total_batch_size"]) == ("2", "1", "2", "4")
    diff, smallest = largest_difference(sharded, two)
    print(f"sharded optimizer states: largest difference {diff:.3g} of a tensor's norm")
    assert smallest > 1e-4 and diff <= TOLERANCE
    for path in results.values():
        assert metadata(path)["dbs.fingerprint"] == meta["dbs.fingerprint"]  # one job, however it is split
        assert metadata(path)["dbs.processes"] == "1" and metadata(path)["ss_total_batch_size"] == "4"
        diff, smallest = largest_difference(two, path)
        print(f"{path.parent.name}: largest difference {diff:.3g} of a tensor's norm")
        assert smallest > 1e-4 and diff <= TOLERANCE
        losses = [float(x) for x in json.loads(metadata(path)["dbs.losses"])]
        assert losses == pytest.approx([float(x) for x in json.loads(meta["dbs.losses"])], rel=1e-4)


def test_two_process_dreambooth_reads_the_class_images_the_main_process_made(setup, tmp_path, capsys):
    root = setup[0]
    (tmp_path / "two").mkdir()
    two = tmp_path / "two" / "db.safetensors"
    settings = ["--steps", "2", "--unet-lr", "1e-3", "--class-prompt", "a photo of toy", "--class-images", "2",
                "--class-steps", "2"]
    code, out, err = finish(launch(common(setup, two, "dreambooth") + settings + ["--batch-size", "1"]))
    assert code == 0, err[-4000:]
    assert "2 class images" in out and "generated now" in out
    sets = [p for p in (root / "class-cache").iterdir() if p.is_dir()]
    assert len(sets) == 1 and len(list(sets[0].glob("*.png"))) == 2  # made once, by the main process

    # --shard-gradients (ZeRO stage 2): each process keeps the gradients and optimizer states of
    # its share of the weights only; the same training, and its save point gathers the states
    (tmp_path / "zero2").mkdir()
    zero2 = tmp_path / "zero2" / "db.safetensors"
    code, out, err = finish(launch(common(setup, zero2, "dreambooth") + settings
                                   + ["--batch-size", "1", "--shard-gradients", "--save-every", "1", "--keep-last", "0"]))
    assert code == 0, err[-4000:]
    assert (tmp_path / "zero2" / "db" / "db-step000001.safetensors").is_file()

    (tmp_path / "one").mkdir()
    one = tmp_path / "one" / "db.safetensors"
    code, out, err = run_cli(common(setup, one, "dreambooth") + settings + ["--batch-size", "2"], capsys)
    assert code == 0 and "reused from the cache" in out, err[-3000:]
    assert metadata(one)["dbs.fingerprint"] == metadata(two)["dbs.fingerprint"]
    # AdamW's first steps move every weight by about lr whatever the size of its gradient, so a
    # weight whose gradient is ~0 moves by float noise (one process, batch 2 against 1 x 2
    # accumulated, differ as much): compare the whole UNet updates, and against another job
    (tmp_path / "seed1").mkdir()
    seed1 = tmp_path / "seed1" / "db.safetensors"
    code, _, err = run_cli(common(setup, seed1, "dreambooth") + settings + ["--batch-size", "2", "--seed", "1"],
                           capsys)
    assert code == 0, err[-3000:]
    base = load_file(str(setup[1]))
    unet = [k for k in base if k.startswith("model.diffusion_model.")]

    def update(path: Path) -> torch.Tensor:
        trained = load_file(str(path))
        return torch.cat([(trained[k].float() - base[k].float()).flatten() for k in unet])

    parallel, single, other_seed, sharded = update(two), update(one), update(seed1), update(zero2)
    same = float((parallel - single).norm() / single.norm())
    different = float((other_seed - single).norm() / single.norm())
    zero2_same = float((sharded - parallel).norm() / parallel.norm())
    print(f"dreambooth: UNet update norm {float(single.norm()):.4g}; 2 processes differ from 1 by {same:.3g} of it, "
          f"--shard-gradients from unsharded by {zero2_same:.3g}, another seed by {different:.3g}")
    assert float(single.norm()) > 0.1 and same < 1e-2 and zero2_same < 1e-2 and different > 0.3


def rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the launch's process of ``rank`` (a descendant with RANK=<rank> in its environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == launcher.pid:
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"trainers" in cmdline and \
                b"MASTER_PORT=" in b"\0".join(environ) and _descends(int(entry.name), launcher.pid):
            return int(entry.name)
    return None


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


def test_a_killed_process_ends_the_launch_without_a_file_and_the_relaunch_resumes(setup, tmp_path, capsys):
    output = tmp_path / "lora.safetensors"
    argv = common(setup, output) + ["--steps", "60", "--rank", "4", "--unet-lr", "1e-3", "--batch-size", "1",
                                    "--save-every", "10", "--keep-last", "1"]
    launcher = launch(argv)
    step_files = output.parent / output.stem
    deadline = time.monotonic() + 240
    while not (step_files.is_dir() and any(step_files.glob("*-step*.safetensors"))):
        assert launcher.poll() is None, finish(launcher)[2][-3000:]
        assert time.monotonic() < deadline, "no save point was written"
        time.sleep(0.05)
    victim = rank_pid(launcher, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    code, out, err = finish(launcher)
    assert code != 0 and not output.exists()  # the launch failed, and wrote no final file
    assert "SIGKILL" in err or "Signal 9" in err, err[-3000:]  # the launcher names the killed process

    code, out, err = finish(launch(argv))  # the same command again
    assert code == 0, err[-4000:]
    assert "resumed from step" in err and output.exists()
    resumed_at = int(err.split("resumed from step ")[1].split()[0])
    assert 10 <= resumed_at < 60 and metadata(output)["dbs.steps_done"] == "60"

    # the resumed two-process run is the one-process run of the same global batch
    (tmp_path / "one").mkdir()
    one = tmp_path / "one" / "lora.safetensors"
    code, _, err = run_cli(common(setup, one) + ["--steps", "60", "--rank", "4", "--unet-lr", "1e-3",
                                                 "--batch-size", "2", "--resume", "never"], capsys)
    assert code == 0, err[-3000:]
    diff, _ = largest_difference(output, one)
    print(f"resumed after a kill: largest difference {diff:.3g} of a tensor's norm")
    assert diff <= 10 * TOLERANCE  # 60 steps of float-order differences


FAIL_IN_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    import trainers.training.loop as loop

    real = loop.finish_step

    def finish_step(optimization, max_grad_norm, step, processes=loop.SINGLE):
        if step == 2:
            raise RuntimeError("injected failure in process 1 at step 2")
        return real(optimization, max_grad_norm, step, processes)

    loop.finish_step = finish_step
"""


def test_an_error_in_one_process_ends_the_launch_with_that_error_and_no_file(setup, tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    # a module run in every process at start: it breaks step 2 of process 1 only (its own import
    # of the engine, as a failing GPU or node would fail there)
    (hooks / "sitecustomize.py").write_text(FAIL_IN_RANK_1)
    output = tmp_path / "lora.safetensors"
    argv = common(setup, output) + ["--steps", "6", "--rank", "4", "--batch-size", "1"]
    path = os.pathsep.join([str(hooks), str(repo_root()), os.environ.get("PYTHONPATH", "")])
    code, out, err = finish(launch(argv, env={"PYTHONPATH": path}))
    assert code != 0 and not output.exists()
    assert "injected failure in process 1 at step 2" in err
    assert not list(tmp_path.glob("*.safetensors")) and not (tmp_path / output.stem).exists()


@pytest.mark.parametrize(("content", "message"), [
    ("not json", "cannot read the run file"),
    ('{"format": "other", "command": "lora", "options": {}}', "is not a run file"),
    ('{"format": "dreambooth-studio-run/1", "command": "dreambooth", "options": {}}', "is a 'dreambooth' run"),
    ('{"format": "dreambooth-studio-run/1", "command": "lora", "options": {"no_such": 1}}', "unknown option 'no_such'"),
    ('{"format": "dreambooth-studio-run/1", "command": "lora", "options": {"flip": "yes"}}', "must be true or false"),
    ('{"format": "dreambooth-studio-run/1", "command": "lora", "processes": 0, "options": {}}', "whole number >= 1"),
    ('{"format": "dreambooth-studio-run/1", "command": "lora", "processes": 2, "options": {}}',
     "exported for 2 process(es) but this launch has 1"),
])
def test_a_bad_run_file_is_refused_with_what_to_fix(tmp_path, capsys, content, message):
    run = tmp_path / "run.json"
    run.write_text(content)
    code, _, err = run_cli(["lora", "--config", str(run)], capsys)
    assert code == 2 and message in err, err[-2000:]


def test_a_run_file_is_the_command_line_it_stands_for_and_the_command_line_wins(setup, tmp_path, capsys):
    root, checkpoint, photos = setup
    options = {"checkpoint": str(checkpoint), "images": "../" + photos.name, "instance_prompt": PROMPT,
               "tokenizer": str(tokenizer_dir()), "resolution": 64, "steps": 2, "rank": 4, "flip": True,
               "sample_every": 0, "validate_every": 0, "output": "from_file.safetensors"}
    folder = root / "runs"
    folder.mkdir(exist_ok=True)
    (folder / "run.json").write_text(json.dumps({"format": "dreambooth-studio-run/1", "command": "lora",
                                                 "processes": 1, "options": options}))
    code, out, err = run_cli(["lora", "--config", str(folder / "run.json"), "--rank", "8"], capsys)
    assert code == 0, err[-3000:]
    written = folder / "from_file.safetensors"  # relative to the run file
    assert f"saved {written}" in out
    config = json.loads(metadata(written)["dbs.config"])
    assert config["rank"] == 8 and config["steps"] == 2  # the command line overrode the file's rank
    assert metadata(written)["ss_flip_aug"] == "True"


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"])
def test_a_launch_asking_for_deepspeed_or_fsdp_is_refused_not_silently_ignored(setup, tmp_path, capsys,
                                                                              monkeypatch, variable):
    monkeypatch.setenv(variable, "true")  # what `accelerate launch --use_deepspeed / --use_fsdp` sets
    output = tmp_path / "lora.safetensors"
    code, _, err = run_cli(common(setup, output) + ["--steps", "1"], capsys)
    assert code == 2 and "which the engine does not run" in err and "--shard-gradients" in err
    assert not output.exists()


def _gradient_shards_process(rank: int, store: str, out: str) -> None:
    """One of two processes: a small model, two accumulated backward passes on this process's
    own rows, then GradientShards.finish; writes what this process holds."""
    from trainers.training import parallel

    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same starting weights in both processes
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        params = list(model.parameters())
        shards = parallel.GradientShards(params, {p: i % 2 for i, p in enumerate(params)},
                                         parallel.Processes(rank=rank, world=2))
        rows = torch.Generator().manual_seed(100 + rank)
        for _ in range(2):
            (model(torch.randn(4, 6, generator=rows)).square().mean() / 2).backward()
        held = [p.grad is not None for p in params]
        norm = shards.finish(0.5)
        shards.close()
        torch.save({"held": held, "norm": norm, "grads": {i: p.grad for i, p in enumerate(params) if p.grad is not None}},
                   Path(out) / f"{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_shard_gradients_keeps_each_process_s_share_only_and_gives_the_averaged_clipped_gradients(tmp_path,
                                                                                                   monkeypatch):
    # --shard-gradients (ZeRO stage 2): after the backward passes a process holds the gradients
    # of its own share of the weights, and they are what averaging all of them over the
    # processes and clip_grad_norm_ give. The spawned processes start from this one's sys.path:
    # without ComfyUI's folder (which the in-process node tests put first), whose main.py and
    # tests/ package would shadow pytest's and this suite's.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not (Path(p) / "comfy").is_dir()])
    torch.multiprocessing.spawn(_gradient_shards_process, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    held = [torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1)]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    params = list(model.parameters())
    for rank in (0, 1):  # the same rows, all in one process: the mean of the two processes' gradients
        rows = torch.Generator().manual_seed(100 + rank)
        for _ in range(2):
            (model(torch.randn(4, 6, generator=rows)).square().mean() / 4).backward()
    norm = float(torch.nn.utils.clip_grad_norm_(params, 0.5))
    assert norm > 0.5  # the clipping is exercised
    for rank, result in enumerate(held):
        assert result["held"] == [i % 2 == rank for i in range(len(params))]  # its share, nothing else
        assert result["norm"] == pytest.approx(norm, rel=1e-5)  # the norm over both shares
        for i, grad in result["grads"].items():
            torch.testing.assert_close(grad, params[i].grad, rtol=1e-5, atol=1e-7)
