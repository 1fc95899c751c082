"""The memory plan against measured memory: peak RSS of real runs on the CPU next to the plan's estimate.

Each case trains the random full-size SD1.5 checkpoint for a few steps through
trainers.jobs.train_file (as the nodes and the CLI do) in a fresh process, sampling its RSS every
10 ms per phase (load, caching, training, save), and prints the plan's estimate for each phase and
for the whole run, with the error of the peak. Usage::

    .venv/bin/python bench/memory_plan.py [--sizes 64,128,256] [--cases lora,full,lean] [--steps 2]
    .venv/bin/python bench/memory_plan.py --table 512   # the plan's GPU estimates, for the README

Cases: ``lora`` (rank 4, fp32), ``lora-bf16`` (rank 4, bf16 compute and frozen weights), ``full``
(full fine-tune, AdamW, fp32), ``lean`` (full fine-tune, Adafactor, fused_backward, bf16 weights,
gradient checkpointing). Columns: ``plan`` the estimated peak, ``measured`` the process's peak RSS
(getrusage), ``error`` (plan - measured) / measured, then the measured and planned peak of each
phase in GB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CASES = {
    "lora": ("lora", {"rank": 4, "alpha": 4.0, "precision": "fp32"}),
    "lora-bf16": ("lora", {"rank": 4, "alpha": 4.0, "precision": "bf16"}),
    "full": ("dreambooth", {"class_images": 0, "precision": "fp32"}),
    "lean": ("dreambooth", {"class_images": 0, "optimizer": "adafactor", "fused_backward": True,
                            "weight_precision": "bf16", "precision": "bf16", "gradient_checkpointing": True}),
}


def worker(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO))
    import torch

    from bench.harness import GB, PhaseRss, default_inputs, phase_clock
    from trainers.data.subject import SubjectData
    from trainers.jobs import train_file
    from trainers.training.config import DreamBoothTrainConfig, LoRATrainConfig
    from trainers.training.memory import plan_memory

    default_inputs(args)
    method, options = CASES[args.case]
    cls = LoRATrainConfig if method == "lora" else DreamBoothTrainConfig
    config = cls(steps=args.steps, **options)
    generator = torch.Generator().manual_seed(0)
    size = args.size
    subject = SubjectData(images=tuple(torch.rand(size, size, 3, generator=generator) for _ in range(4)),
                          captions=("a photo of sks toy",) * 4, instance_prompt="a photo of sks toy",
                          class_prompt="", resolution=size, source_names=tuple(f"img{i}" for i in range(4)))
    plan = plan_memory(config, args.checkpoint, size)
    with tempfile.TemporaryDirectory(prefix="bench-memory-", dir=REPO / ".cache") as out, PhaseRss() as rss:
        clock = phase_clock(rss)
        train_file(args.checkpoint, subject, config, Path(out) / "bench.safetensors", args.tokenizer,
                   callbacks=clock, before_load=clock.before_load)
    measured = {phase: rss.peaks.get(phase, 0) / GB for phase in ("load", "prepare", "train", "release", "save")}
    measured["cache"] = measured.pop("prepare")
    print(json.dumps({
        "case": args.case, "size": size,
        "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB,
        "plan": plan.peak / GB, "plan_phases": {k: v / GB for k, v in plan.phases.items()},
        "plan_parts": {k: v / GB for k, v in plan.parts}, "measured": measured,
    }))
    return 0


TABLE = [
    ("LoRA rank 16", "lora", {"precision": "fp32"}, "fp32"),
    ("LoRA rank 16", "lora", {"precision": "bf16"}, "bf16 (auto on a recent GPU)"),
    ("LoRA rank 16", "lora", {"precision": "bf16", "gradient_checkpointing": True}, "bf16 + gradient checkpointing"),
    ("LoRA rank 16", "lora", {"precision": "bf16", "text_encoder_lr": 5e-5}, "bf16 + text encoder LoRA"),
    ("full fine-tune", "dreambooth", {"precision": "fp32"}, "AdamW, fp32"),
    ("full fine-tune", "dreambooth", {"precision": "bf16"}, "AdamW, bf16 autocast (fp32 weights)"),
    ("full fine-tune", "dreambooth", {"precision": "bf16", "gradient_checkpointing": True}, "+ gradient checkpointing"),
    ("full fine-tune", "dreambooth", {"precision": "bf16", "gradient_checkpointing": True, "fused_backward": True},
     "+ fused_backward"),
    ("full fine-tune", "dreambooth", {"precision": "bf16", "gradient_checkpointing": True, "optimizer": "adafactor"},
     "Adafactor + gradient checkpointing"),
    ("full fine-tune", "dreambooth", {"precision": "bf16", "gradient_checkpointing": True, "optimizer": "adafactor",
                                      "fused_backward": True}, "Adafactor + checkpointing + fused_backward"),
    ("full fine-tune", "dreambooth", {"precision": "bf16", "gradient_checkpointing": True, "optimizer": "adamw8bit",
                                      "fused_backward": True}, "8-bit AdamW + checkpointing + fused_backward"),
    ("full fine-tune", "dreambooth", {"precision": "bf16", "gradient_checkpointing": True, "optimizer": "adafactor",
                                      "fused_backward": True, "weight_precision": "bf16"},
     "Adafactor + checkpointing + fused_backward + bf16 weights"),
    ("full fine-tune", "dreambooth", {"precision": "bf16", "gradient_checkpointing": True, "optimizer": "adamw8bit",
                                      "fused_backward": True, "weight_precision": "bf16"},
     "8-bit AdamW + checkpointing + fused_backward + bf16 weights"),
    ("full fine-tune", "dreambooth", {"precision": "bf16", "class_images": 100}, "AdamW bf16 + prior preservation"),
]


def table(args: argparse.Namespace) -> int:
    """The plan's estimates on a GPU for common settings (batch 1, 4 photos, no samples)."""
    sys.path.insert(0, str(REPO))
    from bench.harness import GB, default_inputs
    from trainers.training.config import DreamBoothTrainConfig, LoRATrainConfig
    from trainers.training.memory import plan_memory

    default_inputs(args)
    print(f"| method | settings | peak at {args.table} px (GB) | largest phase |")
    print("|---|---|---|---|")
    for method, kind, options, label in TABLE:
        cls = LoRATrainConfig if kind == "lora" else DreamBoothTrainConfig
        values = dict(options)
        if kind == "dreambooth":
            values.setdefault("class_images", 0)
        plan = plan_memory(cls(**values), args.checkpoint, args.table, "cuda")
        print(f"| {method} | {label} | {plan.peak / GB:.1f} | {plan.peak_phase} |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,128,256")
    parser.add_argument("--cases", default="lora,lora-bf16,full,lean")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write every result to this file")
    parser.add_argument("--table", type=int, default=0, metavar="PX",
                        help="print the plan's GPU estimates at PX pixels as a Markdown table (no training)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", default="lora", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.table:
        return table(args)
    (REPO / ".cache").mkdir(exist_ok=True)
    rows = []
    print(f"{'case':<10} {'px':>4} {'plan':>6} {'measured':>9} {'error':>7}   phases measured / plan (GB)")
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        if case not in CASES:
            parser.error(f"unknown case {case}; choose from {', '.join(CASES)}")
        for size in [int(s) for s in args.sizes.split(",")]:
            command = [sys.executable, __file__, "--worker", "--case", case, "--size", str(size),
                       "--steps", str(args.steps)]
            for flag in ("checkpoint", "tokenizer"):
                if getattr(args, flag) is not None:
                    command += [f"--{flag}", str(getattr(args, flag))]
            done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
            if done.returncode != 0:
                print(f"{case:<10} {size:>4} failed: {done.stderr.strip().splitlines()[-3:]}")
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            error = (row["plan"] - row["peak"]) / row["peak"]
            phases = "  ".join(f"{name} {row['measured'].get(name, 0):.2f}/{row['plan_phases'].get(name, 0):.2f}"
                               for name in ("load", "cache", "train", "save") if name in row["plan_phases"])
            print(f"{case:<10} {size:>4} {row['plan']:>6.2f} {row['peak']:>9.2f} {error:>+7.1%}   {phases}",
                  flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
