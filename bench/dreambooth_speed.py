"""DreamBooth training speed and memory on the full-size SD1.5 architecture.

Each configuration runs in a fresh Python process, strictly one after the other (AdamW on the
fp32 UNet alone needs about 14 GB), so its peak memory is its own. Training configurations run
a whole job through trainers.jobs.train_file, like the nodes and the CLI: load the checkpoint,
train the whole UNet at 64x64 pixels for N steps, write the fp16 single-file checkpoint into a
temporary folder (deleted right away); the bench reports the time and memory of each phase. Usage::

    .venv/bin/python bench/dreambooth_speed.py [--checkpoint CKPT] [--steps 6] [--resolution 64]
        [--configs adamw,adamw-gc,adafactor,adafactor-gc,adafactor-te,classgen,prior]

Without ``--checkpoint`` the cached random-weight full-size test checkpoint is used (generated
on first use). Configurations (all: batch 1, 4 subject images, cached latents, fp32 on the CPU):

- ``adamw``, ``adamw-gc``: AdamW, without / with gradient checkpointing;
- ``adafactor``, ``adafactor-gc``: Adafactor, without / with gradient checkpointing;
- ``adafactor-te``: Adafactor with the text encoder trained too (text_encoder_lr 1e-6);
- ``classgen``: class-image generation (``--class-images`` images, ``--class-steps`` DPM-Solver++
  steps, guidance 7.5, batches of 4) into a temporary class cache: seconds per class image;
- ``prior``: ``--prior-optimizer`` with prior preservation on (class_images = ``--class-images``,
  reused from that cache; generated inside the job, and counted in ``prepare``, if ``classgen``
  did not run before it).

Columns: ``s/step`` is the median over steps 2..N (step 1 pays for warm-up and is shown on its
own), ``prepare`` the latent/text caching before step 1, ``load`` the checkpoint read into fp32
models, ``save`` the fp16 checkpoint write. ``peak RSS`` is the process maximum (getrusage:
loading, training and saving), ``train peak`` the highest RSS sampled every 10 ms from the
first step to the last, ``save peak`` the same while the checkpoint was written. Below the table, each
training configuration lists its step times and the user/system CPU seconds and minor page
faults of its training phase. Run it on an otherwise idle machine: on 2 cores, another process's
load shows up directly in s/step (and AdamW needs ~15 GB of RAM to itself).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GB = 1024**3
SUBJECT_IMAGES = 4
INSTANCE_PROMPT = "a photo of sks toy"
CLASS_PROMPT = "a photo of toy"

CONFIGS: dict[str, dict[str, object]] = {
    "adamw": {"label": "adamw", "optimizer": "adamw"},
    "adamw-gc": {"label": "adamw + grad ckpt", "optimizer": "adamw", "gradient_checkpointing": True},
    "adafactor": {"label": "adafactor", "optimizer": "adafactor"},
    "adafactor-gc": {"label": "adafactor + grad ckpt", "optimizer": "adafactor", "gradient_checkpointing": True},
    "adafactor-te": {"label": "adafactor + text encoder 1e-6", "optimizer": "adafactor", "text_encoder_lr": 1e-6},
    "classgen": {"label": "class-image generation", "kind": "classgen"},
    "prior": {"label": "prior preservation", "prior": True},
}


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def _cpu() -> tuple[float, float, int]:
    """(user s, system s, minor page faults) of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime, usage.ru_minflt


def _cpu_since(start: tuple[float, float, int]) -> dict[str, float]:
    user, system, faults = (b - a for a, b in zip(start, _cpu(), strict=True))
    return {"user_s": user, "sys_s": system, "minflt": faults}


def _class_spec(args: argparse.Namespace) -> object:
    """The class images a 'prior' job asks for (same key: the job finds what 'classgen' made)."""
    from trainers.data.class_images import ClassImageSpec
    from trainers.files.fileio import content_sha256

    return ClassImageSpec(base_fingerprint=content_sha256(args.checkpoint), prompt=CLASS_PROMPT,
                          count=args.class_images, resolution=args.resolution, seed=0, steps=args.class_steps,
                          guidance=7.5)


def _load(args: argparse.Namespace) -> tuple[object, float]:
    from trainers.sd15.checkpoint import load_sd15_single_file

    started = time.monotonic()
    base = load_sd15_single_file(args.checkpoint, args.tokenizer)
    return base, time.monotonic() - started


def worker_classgen(args: argparse.Namespace, options: dict[str, object]) -> dict[str, object]:
    """Generate the class images into the (temporary) cache; time each batch (the component alone:
    a training job reuses them from that cache)."""
    from bench.harness import PhaseRss
    from trainers.data.class_images import GENERATE_BATCH, generate_class_images

    base, load_seconds = _load(args)
    spec = _class_spec(args)
    marks = [time.monotonic()]

    def on_step(done: int, total: int) -> None:
        if done % spec.steps == 0:  # a batch finished its last denoising step
            marks.append(time.monotonic())

    with PhaseRss() as rss:
        made = generate_class_images(base, spec, args.class_cache, on_step=on_step)
    batches = [b - a for a, b in itertools.pairwise(marks)]
    sizes = [min(GENERATE_BATCH, spec.count - i) for i in range(0, spec.count, GENERATE_BATCH)]
    later = sum(batches[1:]) / sum(sizes[1:]) if len(batches) > 1 else None
    return {
        **options,
        "generated": made.generated,
        "load_s": load_seconds,
        "gen_s": marks[-1] - marks[0],
        "s_per_image": (marks[-1] - marks[0]) / spec.count,
        "s_per_image_after_first_batch": later,
        "train_peak_gb": rss.peaks["start"] / GB,
    }


def worker_train(args: argparse.Namespace, options: dict[str, object]) -> dict[str, object]:
    """Run one training job (checkpoint saved into a temporary folder, then deleted) and return
    the measurements of its phases."""
    import torch

    from bench.harness import PhaseRss, phase_clock
    from trainers.data.subject import SubjectData
    from trainers.jobs import train_file
    from trainers.training.config import DreamBoothTrainConfig

    generator = torch.Generator().manual_seed(0)
    images = tuple(
        torch.rand(args.resolution, args.resolution, 3, generator=generator) for _ in range(SUBJECT_IMAGES)
    )
    subject = SubjectData(
        images=images,
        captions=(INSTANCE_PROMPT,) * SUBJECT_IMAGES,
        instance_prompt=INSTANCE_PROMPT,
        class_prompt=CLASS_PROMPT,
        resolution=args.resolution,
        source_names=tuple(f"img{i}" for i in range(SUBJECT_IMAGES)),
    )
    prior = bool(options.get("prior"))
    optimizer = str(options.get("optimizer") or args.prior_optimizer)
    config = DreamBoothTrainConfig(
        steps=args.steps,
        unet_lr=2e-6,
        text_encoder_lr=float(options.get("text_encoder_lr", 0.0)),  # type: ignore[arg-type]
        optimizer=optimizer,
        gradient_checkpointing=bool(options.get("gradient_checkpointing", False)),
        cache_latents=True,
        class_images=args.class_images if prior else 0,
        class_steps=args.class_steps,
        save_precision="fp16",
    )
    out_dir = Path(tempfile.mkdtemp(prefix="save-", dir=args.workdir))
    try:
        with PhaseRss() as rss:
            clock = phase_clock(rss)
            cpu_start = _cpu()
            job = train_file(args.checkpoint, subject, config, out_dir / "bench.safetensors", args.tokenizer,
                             callbacks=clock, before_load=clock.before_load, class_cache_dir=args.class_cache)
            clock.stamp("end")
        size_gb = job.path.stat().st_size / GB
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    marks, steps = clock.marks, clock.step_seconds()
    after_warmup = steps[1:] or steps
    class_reused = (job.prior.generated == 0) if prior else None
    return {
        **options,
        "optimizer": optimizer,
        "class_reused": class_reused,
        "load_s": marks["prepare"] - marks["load"],
        "prepare_s": marks["train"] - marks["prepare"],
        "first_step_s": steps[0],
        "s_per_step": statistics.median(after_warmup),
        "steps_s": steps,
        "final_loss": job.losses[-1],
        "save_s": marks["end"] - marks["save"],
        "save_gb": size_gb,
        "before_train_gb": clock.rss_before_training / GB,
        "train_peak_gb": rss.peaks["train"] / GB,
        "save_peak_gb": rss.peaks["save"] / GB,
        "threads": torch.get_num_threads(),
        "train_cpu": _cpu_since(cpu_start),
    }


def worker(args: argparse.Namespace) -> int:
    options = json.loads(args.worker)
    run = worker_classgen if options.get("kind") == "classgen" else worker_train
    row = run(args, options)
    row["peak_rss_gb"] = _peak_rss_gb()
    print(json.dumps(row), flush=True)
    return 0


def _label(row: dict[str, object], args: argparse.Namespace) -> str:
    if row.get("kind") == "classgen":
        return f"class images: {args.class_images} x {args.class_steps} steps, CFG 7.5"
    if row.get("prior"):
        cached = "cached" if row.get("class_reused") else "generated in the job: counted in prepare"
        return f"{row['optimizer']} + prior ({args.class_images} class images, {cached})"
    return str(row["label"])


def _fmt(value: object, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table_row(row: dict[str, object], args: argparse.Namespace) -> str:
    if row.get("kind") == "classgen":
        per_image = f"{_fmt(row['s_per_image'])} s/image"
        if row.get("s_per_image_after_first_batch") is not None:
            per_image += f" ({_fmt(row['s_per_image_after_first_batch'])} after batch 1)"
        cells = [_label(row, args), per_image, "-", "-", _fmt(row["load_s"], 1), "-",
                 _fmt(row["peak_rss_gb"]), _fmt(row["train_peak_gb"]), "-"]  # fmt: skip
    else:
        cells = [_label(row, args), _fmt(row["s_per_step"]), _fmt(row["first_step_s"]), _fmt(row["prepare_s"]),
                 _fmt(row["load_s"], 1), _fmt(row["save_s"], 1), _fmt(row["peak_rss_gb"]),
                 _fmt(row["train_peak_gb"]), _fmt(row["save_peak_gb"])]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="SD1.5 .safetensors (default: the random test checkpoint)")
    parser.add_argument("--tokenizer", type=Path, help="CLIP tokenizer folder (default: ComfyUI's sd1_tokenizer)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per configuration (default 6)")
    parser.add_argument("--resolution", type=int, default=64, help="image size in pixels, a multiple of 64 (default 64)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated, run in this order (default: all): {', '.join(CONFIGS)}")
    parser.add_argument("--class-images", type=int, default=8, help="class images generated / used (default 8)")
    parser.add_argument("--class-steps", type=int, default=25, help="denoising steps per class image (default 25)")
    parser.add_argument("--prior-optimizer", choices=("adamw", "adafactor"), default="adamw",
                        help="optimizer of the 'prior' configuration (default adamw)")
    parser.add_argument("--workdir", type=Path, help="where checkpoints and class images are written "
                        "temporarily (default: a new folder in <repo>/.cache, removed at the end)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--class-cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from bench.harness import bench_workdir, chosen_configs, default_inputs

    default_inputs(args)
    if args.worker:
        return worker(args)

    names = chosen_configs(parser, args.configs, CONFIGS)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (step 1 is warm-up)")

    own_workdir = bench_workdir(args, REPO, "bench-dreambooth-")
    class_cache = args.workdir / "class-cache"

    started = time.monotonic()
    print(f"checkpoint {args.checkpoint.name}, {args.resolution}px, batch 1, {SUBJECT_IMAGES} subject images, "
          f"{args.steps} steps, {os.cpu_count()} CPUs, each configuration in its own process, one at a time\n")
    print("| configuration | s/step | 1st step s | prepare s | load s | save s | peak RSS GB | train peak GB "
          "| save peak GB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    details = []
    try:
        for name in names:
            options = {"name": name, **CONFIGS[name]}
            command = [
                sys.executable, __file__, "--worker", json.dumps(options), "--checkpoint", str(args.checkpoint),
                "--tokenizer", str(args.tokenizer), "--steps", str(args.steps),
                "--resolution", str(args.resolution), "--class-images", str(args.class_images),
                "--class-steps", str(args.class_steps), "--prior-optimizer", args.prior_optimizer,
                "--workdir", str(args.workdir), "--class-cache", str(class_cache),
            ]  # fmt: skip
            run_started = time.monotonic()
            done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
            wall = time.monotonic() - run_started
            if done.returncode != 0:
                print(f"| {CONFIGS[name]['label']} | failed (exit {done.returncode}) | | | | | | | |", flush=True)
                sys.stderr.write(f"{name} failed:\n{done.stderr[-3000:]}\n")
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["wall_s"] = wall
            details.append(row)
            print(_table_row(row, args), flush=True)
    finally:
        if own_workdir:
            shutil.rmtree(args.workdir, ignore_errors=True)

    print("\ns/step: median over steps 2..N; 1st step includes warm-up; prepare: latent/text caching before "
          "step 1; load: checkpoint to fp32 models; save: fp16 single-file checkpoint write (then deleted)")
    for row in details:
        if row.get("kind") == "classgen":
            extra = f"generated {row['generated']} images in {row['gen_s']:.1f} s"
        else:
            steps = ", ".join(f"{s:.2f}" for s in row["steps_s"])
            cpu = row["train_cpu"]
            extra = (f"steps [{steps}] s, loss {row['final_loss']:.4f}, RSS before training "
                     f"{row['before_train_gb']:.2f} GB, checkpoint {row['save_gb']:.2f} GB, {row['threads']} threads; "
                     f"training CPU user {cpu['user_s']:.0f} s, sys {cpu['sys_s']:.0f} s, "
                     f"{cpu['minflt'] / 1e6:.1f}M minor page faults")
        print(f"- {row['name']}: process wall {row['wall_s']:.0f} s; {extra}")
    print(f"total wall time {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
