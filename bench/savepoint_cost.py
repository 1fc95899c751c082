"""What one save point costs on the full-size SD1.5 architecture: seconds, MB on disk, memory.

A save point (``save_every``) writes a step file (the model so far, loadable like the final file)
and a training state (trainable weights, optimizer moments, schedule, generators, data position)
to resume from. This bench trains through trainers.jobs.train_file, like the nodes and the CLI,
with ``save_every 1`` and 2 steps (one save point, after step 1), each configuration in a fresh
Python process, strictly one after the other. Usage::

    .venv/bin/python bench/savepoint_cost.py [--checkpoint CKPT] [--steps 2] [--resolution 64]
        [--configs lora,dreambooth-adamw,dreambooth-adafactor] [--workdir DIR]

Hold /tmp/dbs-heavy.lock for the whole run on a shared machine: the AdamW fine-tune needs about
15 GB of RAM and writes a 10 GB state. Each worker asks the kernel to kill it first if RAM runs
out; a configuration that does not fit is reported as failed. Without ``--checkpoint`` the
cached random-weight full-size test checkpoint is used (generated on first use). Configurations (batch 1, 4 subject
images, cached latents, fp32 on the CPU, files saved in fp16):

- ``lora``: rank 16 on the UNet and the text encoder (AdamW);
- ``dreambooth-adamw``: the whole UNet, AdamW (two fp32 moments per weight);
- ``dreambooth-adafactor``: the whole UNet, Adafactor (factored second moments, no momentum).

Columns of the first table (the last save point of the run; with 2 steps the only one):
``s/step`` is the mean over steps 2..N (step 1 pays for warm-up; save points not counted),
``snapshot`` is the trainer's result so far (weights checked finite), ``step file`` the atomic
write of the model file (its MB on disk), ``state`` the training-state folder (its MB; ``est``
is what the job's free-space check assumed), split into writing + fsync of its files and hashing
them for the manifest; ``total`` runs from the save-point callback to the state being in place.
``final file`` is the file written after the last step, for comparison. Second table (RSS
sampled every 10 ms): ``train peak`` is the highest RSS while steps ran (outside the save
point), ``at start`` the RSS when the save point began, ``step-file peak`` / ``state peak`` the
highest while each was written, ``+ over train`` the save point's peak minus the train peak,
``process peak`` the process maximum (getrusage: loading, training, save point, final file).
MB are 2^20 bytes. The working folder (default: a new one in <repo>/.cache) is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MB = 1024**2
SUBJECT_IMAGES = 4
INSTANCE_PROMPT = "a photo of sks toy"

CONFIGS: dict[str, dict[str, Any]] = {
    "lora": {"label": "LoRA rank 16, UNet + text encoder", "method": "lora"},
    "dreambooth-adamw": {"label": "DreamBooth UNet, AdamW", "method": "dreambooth", "optimizer": "adamw"},
    "dreambooth-adafactor": {"label": "DreamBooth UNet, Adafactor", "method": "dreambooth",
                             "optimizer": "adafactor"},
}


def _config(options: dict[str, Any], steps: int) -> Any:
    from trainers.training.config import DreamBoothTrainConfig, LoRATrainConfig

    if options["method"] == "lora":
        return LoRATrainConfig(rank=16, steps=steps, unet_lr=1e-4, text_encoder_lr=5e-5, cache_latents=True)
    return DreamBoothTrainConfig(steps=steps, unet_lr=2e-6, optimizer=options["optimizer"], cache_latents=True,
                                 class_images=0, save_precision="fp16")


def _clock() -> tuple[float, float, float, int]:
    """(monotonic s, user CPU s, system CPU s, minor page faults) of this process now."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.monotonic(), usage.ru_utime, usage.ru_stime, usage.ru_minflt


def _since(start: tuple[float, float, float, int]) -> dict[str, float]:
    return {name: b - a for name, a, b in zip(("s", "user_s", "sys_s", "minflt"), start, _clock(), strict=True)}


class SavePointMeter:
    """Times and sizes the parts of each save point by wrapping what ``SavePoints`` calls (the
    step file's ``save_safely``, ``write_state``) and what ``write_state`` calls (file writes,
    hashing); switches the RSS sampler's phase around each part."""

    def __init__(self, rss: Any) -> None:
        self.rss = rss
        self.points: list[dict[str, Any]] = []
        self.steps: list[dict[str, float]] = []  # per optimizer step: seconds, CPU, page faults
        self.step_start = (0.0, 0.0, 0.0, 0)
        self.marks: dict[str, float] = {}
        self.rss_before_training = 0
        self.final_cpu: dict[str, float] = {}

    def install(self) -> None:
        from trainers import jobs
        from trainers.training import savepoints, state

        save_safely, write_state = savepoints.save_safely, savepoints.write_state
        save_final = jobs.save_safely
        write_file, sha256 = state._write_file, state._sha256

        def timed_save_safely(*args: Any, **kwargs: Any) -> Any:
            point = self.points[-1]
            point["snapshot_s"] = time.monotonic() - point["start"]
            self.rss.enter("step file")
            before = _clock()
            saved = save_safely(*args, **kwargs)
            point["step_file_cpu"] = _since(before)
            point["step_file_s"] = point["step_file_cpu"]["s"]
            point["step_file_mb"] = saved.path.stat().st_size / MB
            point["step_file_end"] = time.monotonic()
            self.rss.enter("capture")
            return saved

        def timed_write_state(*args: Any, **kwargs: Any) -> Path:
            point = self.points[-1]
            started = time.monotonic()
            point["capture_s"] = started - point["step_file_end"]
            self.rss.enter("state")
            before = _clock()
            folder = write_state(*args, **kwargs)
            point["state_cpu"] = _since(before)
            ended = time.monotonic()
            self.rss.enter("train")
            self.step_start = _clock()  # the next step starts after the save point
            point["user_s"], point["sys_s"] = (b - a for a, b in zip(point.pop("cpu_at_start")[1:3],
                                                                     self.step_start[1:3], strict=True))
            point["state_s"] = ended - started
            point["total_s"] = ended - point["start"]
            point["state_mb"] = sum(f.stat().st_size for f in folder.iterdir()) / MB
            point["state_files"] = sorted(f.name for f in folder.iterdir())
            return folder

        def timed_write_file(*args: Any, **kwargs: Any) -> None:
            started = time.monotonic()
            write_file(*args, **kwargs)
            self.points[-1]["state_write_s"] += time.monotonic() - started

        def timed_sha256(*args: Any, **kwargs: Any) -> str:
            started = time.monotonic()
            digest = sha256(*args, **kwargs)
            self.points[-1]["state_hash_s"] += time.monotonic() - started
            return digest

        def timed_save_final(*args: Any, **kwargs: Any) -> Any:
            before = _clock()
            saved = save_final(*args, **kwargs)
            self.final_cpu = _since(before)
            return saved

        savepoints.save_safely, savepoints.write_state = timed_save_safely, timed_write_state
        jobs.save_safely = timed_save_final
        state._write_file, state._sha256 = timed_write_file, timed_sha256

    def callbacks(self) -> Any:
        from bench.harness import rss_bytes
        from trainers.training.callbacks import TrainingCallbacks

        meter = self

        class Clock(TrainingCallbacks):
            def before_load(self) -> None:
                meter.marks["load"] = time.monotonic()
                meter.rss.enter("load")

            def on_train_begin(self, total_steps: int) -> None:
                meter.rss_before_training = rss_bytes()
                meter.marks["train"] = time.monotonic()
                meter.step_start = _clock()
                meter.rss.enter("train")

            def on_step_end(self, state: Any) -> None:
                meter.steps.append(_since(meter.step_start))
                meter.step_start = _clock()

            def on_save_point(self, step: int, capture: Any, snapshot: Any) -> None:
                meter.points.append({"step": step, "start": time.monotonic(), "rss_at_start": rss_bytes(),
                                     "cpu_at_start": _clock(), "state_write_s": 0.0, "state_hash_s": 0.0})
                meter.rss.enter("snapshot")

            def on_train_end(self, losses: list[float]) -> None:
                meter.rss.enter("release")

            def on_save_begin(self) -> None:
                meter.rss.enter("final file")

        return Clock()


def _first_to_go() -> None:
    """If RAM runs out, the kernel kills this worker rather than another process on the machine
    (the report then says the configuration does not fit)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as handle:
            handle.write("1000")
    except OSError:
        pass


def worker(args: argparse.Namespace) -> int:
    """Run one configuration with a save point after every step; print a JSON line."""
    import torch

    from bench.harness import PhaseRss
    from trainers.data.subject import SubjectData
    from trainers.jobs import Durability, _state_bytes, estimated_file_bytes, train_file

    options = json.loads(args.worker)
    config = _config(options, args.steps)
    _first_to_go()
    generator = torch.Generator().manual_seed(0)
    images = tuple(
        torch.rand(args.resolution, args.resolution, 3, generator=generator) for _ in range(SUBJECT_IMAGES)
    )
    subject = SubjectData(images=images, captions=(INSTANCE_PROMPT,) * SUBJECT_IMAGES, instance_prompt=INSTANCE_PROMPT,
                          class_prompt="", resolution=args.resolution,
                          source_names=tuple(f"img{i}" for i in range(SUBJECT_IMAGES)))
    run_dir = Path(tempfile.mkdtemp(prefix=f"{options['name']}-", dir=args.workdir))
    (run_dir / "out").mkdir()
    durability = Durability(save_every=1, keep_last=2, resume="never", state_root=run_dir / "states")
    file_estimate = estimated_file_bytes(args.checkpoint, config)
    try:
        with PhaseRss() as rss:
            meter = SavePointMeter(rss)
            meter.install()
            clock = meter.callbacks()
            job = train_file(args.checkpoint, subject, config, run_dir / "out" / "bench.safetensors", args.tokenizer,
                             callbacks=clock, before_load=clock.before_load, durability=durability)
        final_mb = job.path.stat().st_size / MB
        step_files = sorted(p.name for p in (run_dir / "out" / "bench").iterdir())
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    if not meter.points or "state_s" not in meter.points[-1]:
        raise RuntimeError("no complete save point was measured (is --steps at least 2?)")
    for point in meter.points:
        del point["start"], point["step_file_end"]
    print(json.dumps({
        **options,
        "points": meter.points,
        "steps": meter.steps,
        "load_s": meter.marks["train"] - meter.marks["load"],
        "final_s": meter.final_cpu["s"],
        "final_cpu": meter.final_cpu,
        "final_mb": final_mb,
        "step_files": step_files,
        "file_estimate_mb": file_estimate / MB,
        "state_estimate_mb": _state_bytes(config, file_estimate) / MB,
        "before_train_mb": meter.rss_before_training / MB,
        "peaks_mb": {phase: value / MB for phase, value in rss.peaks.items()},
        "process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB,
        "threads": torch.get_num_threads(),
    }), flush=True)
    return 0


def _memory() -> tuple[float, float]:
    """(MemTotal, MemAvailable) of the machine in MB."""
    values = {}
    with open("/proc/meminfo") as handle:
        for line in handle:
            name, value = line.split(":", 1)
            values[name] = int(value.split()[0]) * 1024 / MB
    return values["MemTotal"], values["MemAvailable"]


def _cpu_text(part: dict[str, float]) -> str:
    return (f"{part['s']:.1f} s (user {part['user_s']:.1f}, sys {part['sys_s']:.1f}, "
            f"{part['minflt'] / 1e3:.0f}k faults)")


def _time_row(row: dict[str, Any]) -> str:
    point = row["points"][-1]
    state = f"{point['state_s']:.1f} ({point['state_write_s']:.1f} + {point['state_hash_s']:.1f})"
    later = row["steps"][1:] or row["steps"]  # step 1 pays for warm-up (and AdamW's moments)
    cells = [row["label"], f"{sum(step['s'] for step in later) / len(later):.1f}", f"{point['snapshot_s']:.2f}",
             f"{point['step_file_s']:.2f}", f"{point['step_file_mb']:.1f}", state,
             f"{point['state_mb']:.1f} ({row['state_estimate_mb']:.0f})", f"{point['total_s']:.1f}",
             f"{row['final_s']:.2f}"]
    return "| " + " | ".join(cells) + " |"


def _memory_row(row: dict[str, Any]) -> str:
    point, peaks = row["points"][-1], row["peaks_mb"]
    train = peaks["train"]
    during = max(peaks.get(phase, 0.0) for phase in ("snapshot", "step file", "capture", "state"))
    cells = [row["label"], f"{train:.0f}", f"{point['rss_at_start'] / MB:.0f}", f"{peaks.get('step file', 0):.0f}",
             f"{peaks.get('state', 0):.0f}", f"{during - train:+.0f}", f"{row['process_peak_mb']:.0f}"]
    return "| " + " | ".join(cells) + " |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="SD1.5 .safetensors (default: the random test checkpoint)")
    parser.add_argument("--tokenizer", type=Path, help="CLIP tokenizer folder (default: ComfyUI's sd1_tokenizer)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps, a save point after each but the "
                        "last (default 2: one save point)")
    parser.add_argument("--resolution", type=int, default=64, help="image size in pixels, a multiple of 64 (default 64)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated, run in this order (default: all): {', '.join(CONFIGS)}")
    parser.add_argument("--workdir", type=Path, help="where step files and states are written (default: a new "
                        "folder in <repo>/.cache, removed at the end)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from bench.harness import bench_workdir, chosen_configs, default_inputs

    default_inputs(args)
    if args.worker:
        return worker(args)

    names = chosen_configs(parser, args.configs, CONFIGS)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the last step has no save point)")
    own_workdir = bench_workdir(args, REPO, "bench-savepoint-")

    total, available = _memory()
    started = time.monotonic()
    print(f"checkpoint {args.checkpoint.name}, {args.resolution}px, batch 1, {SUBJECT_IMAGES} subject images, "
          f"{args.steps} steps, save_every 1, {os.cpu_count()} CPUs, RAM {total / 1024:.1f} GB "
          f"({available / 1024:.1f} GB available at start), each configuration in its own process\n")
    rows, failed = [], []
    try:
        for name in names:
            options = {"name": name, **CONFIGS[name]}
            command = [sys.executable, __file__, "--worker", json.dumps(options), "--checkpoint", str(args.checkpoint),
                       "--tokenizer", str(args.tokenizer), "--steps", str(args.steps),
                       "--resolution", str(args.resolution), "--workdir", str(args.workdir)]
            run_started = time.monotonic()
            done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
            if done.returncode != 0:
                failed.append(f"{CONFIGS[name]['label']}: failed (exit {done.returncode}; -9 is usually the OOM "
                              f"killer)\n{done.stderr[-3000:]}")
                print(f"{name} failed (exit {done.returncode})", file=sys.stderr, flush=True)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["wall_s"] = time.monotonic() - run_started
            rows.append(row)
            print(f"{name} done in {row['wall_s']:.0f} s", file=sys.stderr, flush=True)
    finally:
        if own_workdir:
            shutil.rmtree(args.workdir, ignore_errors=True)

    print("| configuration | s/step | snapshot s | step file s | step file MB | state s (write+fsync + hash) "
          "| state MB (est) | save point total s | final file s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(_time_row(row))
    print("\n| configuration | train peak MB | at start MB | step-file peak MB | state peak MB | + over train MB "
          "| process peak MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(_memory_row(row))
    print()
    for row in rows:
        points = "; ".join(f"step {p['step']}: {p['total_s']:.1f} s (capture {p['capture_s']:.2f} s, CPU user "
                           f"{p['user_s']:.1f} s, sys {p['sys_s']:.1f} s; step file {_cpu_text(p['step_file_cpu'])}; "
                           f"state {_cpu_text(p['state_cpu'])})" for p in row["points"])
        steps = ", ".join(_cpu_text(step) for step in row["steps"])
        print(f"- {row['name']}: save points [{points}]; steps [{steps}]; load+caching {row['load_s']:.0f} s; "
              f"RSS before training {row['before_train_mb']:.0f} MB; final file {row['final_mb']:.1f} MB "
              f"in {_cpu_text(row['final_cpu'])} (peak RSS while written {row['peaks_mb'].get('final file', 0):.0f} MB) "
              f"(estimated {row['file_estimate_mb']:.1f}); step files kept {row['step_files']}; state files "
              f"{row['points'][-1]['state_files']}; {row['threads']} threads; process wall {row['wall_s']:.0f} s")
    for message in failed:
        print(f"- {message}")
    print(f"total wall time {time.monotonic() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
