"""LoRA training speed and memory on the full-size SD1.5 architecture.

Each configuration runs in a fresh Python process (so peak memory is its own) and trains through
trainers.jobs.train_file, like the nodes and the CLI: load the checkpoint, train a rank-16 LoRA
at 64x64 pixels for N steps, save it into a temporary folder; report seconds per step (mean over
the steps after the first, which pays for warm-up) and memory. Usage::

    .venv/bin/python bench/lora_speed.py [--checkpoint CKPT] [--steps 5] [--matrix basic|full]

Without ``--checkpoint`` the cached random-weight full-size test checkpoint is used (generated
on first use). ``basic`` varies one option at a time from the default (cache_latents on,
gradient checkpointing off, text encoder frozen); ``full`` runs all 8 combinations.

Memory columns: ``peak RSS`` is the process maximum (getrusage, includes loading the model),
``train peak`` the highest RSS sampled every 10 ms from the first step to the last, ``train +``
that peak minus the RSS right before training.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> int:
    """Train one configuration and print a JSON line with its measurements."""
    sys.path.insert(0, str(REPO))
    import torch

    from bench.harness import MB, PhaseRss, phase_clock
    from trainers.data.subject import SubjectData
    from trainers.jobs import train_file
    from trainers.training.config import LoRATrainConfig

    options = json.loads(args.worker)
    generator = torch.Generator().manual_seed(0)
    images = tuple(torch.rand(args.resolution, args.resolution, 3, generator=generator) for _ in range(4))
    subject = SubjectData(
        images=images,
        captions=("a photo of sks toy",) * 4,
        instance_prompt="a photo of sks toy",
        class_prompt="",
        resolution=args.resolution,
        source_names=tuple(f"img{i}" for i in range(4)),
    )
    config = LoRATrainConfig(
        rank=16,
        steps=args.steps,
        unet_lr=1e-4,
        text_encoder_lr=5e-5 if options["text_encoder"] else 0.0,
        cache_latents=options["cache_latents"],
        gradient_checkpointing=options["gradient_checkpointing"],
    )
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as out, PhaseRss() as rss:
        clock = phase_clock(rss)
        train_file(args.checkpoint, subject, config, Path(out) / "bench.safetensors", args.tokenizer,
                   callbacks=clock, before_load=clock.before_load)
    steps = clock.step_seconds()
    after_warmup = steps[1:] or steps
    print(
        json.dumps(
            {
                **options,
                "load_s": clock.marks["prepare"] - clock.marks["load"],
                "prepare_s": clock.marks["train"] - clock.marks["prepare"],
                "first_step_s": steps[0],
                "s_per_step": sum(after_warmup) / len(after_warmup),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB,
                "train_peak_mb": rss.peaks["train"] / MB,
                "train_extra_mb": (rss.peaks["train"] - clock.rss_before_training) / MB,
                "threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )
    return 0


def _matrix(kind: str) -> list[dict[str, bool]]:
    default = {"cache_latents": True, "gradient_checkpointing": False, "text_encoder": False}
    if kind == "full":
        return [
            {"cache_latents": c, "gradient_checkpointing": g, "text_encoder": t}
            for t, g, c in itertools.product((False, True), repeat=3)
        ]
    variations = [{}, {"cache_latents": False}, {"gradient_checkpointing": True}, {"text_encoder": True}]
    return [{**default, **change} for change in variations]


def _on_off(value: bool) -> str:
    return "on" if value else "off"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="SD1.5 .safetensors (default: the random test checkpoint)")
    parser.add_argument("--tokenizer", type=Path, help="CLIP tokenizer folder (default: ComfyUI's sd1_tokenizer)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per configuration (default 5)")
    parser.add_argument("--resolution", type=int, default=64, help="image size in pixels (default 64)")
    parser.add_argument("--matrix", choices=("basic", "full"), default="basic")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from bench.harness import default_inputs

    default_inputs(args)
    if args.worker:
        return worker(args)

    print(f"checkpoint {args.checkpoint.name}, {args.resolution}px, rank 16, batch 1, {args.steps} steps, "
          f"{os.cpu_count()} CPUs, each configuration in its own process")  # fmt: skip
    header = (
        f"{'cache_latents':>13} {'grad_ckpt':>9} {'text_enc':>8} | {'s/step':>7} {'1st step':>8} "
        f"{'prepare':>7} {'load':>6} | {'peak RSS':>9} {'train peak':>10} {'train +':>8}"
    )
    print(header)
    print("-" * len(header))
    for options in _matrix(args.matrix):
        command = [
            sys.executable, __file__, "--worker", json.dumps(options), "--checkpoint", str(args.checkpoint),
            "--tokenizer", str(args.tokenizer), "--steps", str(args.steps), "--resolution", str(args.resolution),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            print(f"{json.dumps(options)} failed:\n{done.stderr[-2000:]}")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{_on_off(row['cache_latents']):>13} {_on_off(row['gradient_checkpointing']):>9} "
            f"{_on_off(row['text_encoder']):>8} | {row['s_per_step']:>7.2f} {row['first_step_s']:>8.2f} "
            f"{row['prepare_s']:>7.2f} {row['load_s']:>6.1f} | {row['peak_rss_mb']:>7.0f}MB "
            f"{row['train_peak_mb']:>8.0f}MB {row['train_extra_mb']:>6.0f}MB",
            flush=True,
        )
    print("s/step: mean over steps 2..N; 1st step includes warm-up; prepare: caching before step 1; "
          "load: checkpoint to fp32 models")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
