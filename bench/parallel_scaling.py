"""Data-parallel scaling on this machine: the same LoRA job (global batch 2) trained by one process
(2 torch threads) and by two processes of one thread each under ``accelerate launch``.

    .venv/bin/python bench/parallel_scaling.py [--size 256] [--steps 8]

Reports each run's seconds per step after the first step (from the progress line's elapsed
time at the second and the last step), the speed-up and the scaling efficiency (speed-up /
processes), and that both files hold the same job. On a GPU machine each process has its own GPU;
here the two processes share the two cores the single process uses, so this measures the
engine's overhead (the gradient average, the duplicated caching), not more hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def progress_times(stderr: str) -> dict[int, float]:
    """{step: elapsed seconds} from the progress lines (``N/M loss ... X s/step``: X = elapsed / N)."""
    found = {}
    for step, per_step in re.findall(r"\] (\d+)/\d+ loss \S+ lr \S+ ([\d.]+) s/step", stderr):
        found[int(step)] = float(per_step) * int(step)
    return found


def run(command: list[str], env: dict) -> tuple[float, dict[int, float], str]:
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True)
    err = done.stderr.decode()
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{err[-3000:]}")
    return time.monotonic() - started, progress_times(err), err


def main() -> None:
    from safetensors import safe_open

    from tests.support.models import ensure_test_models
    from tests.test_trainers_lora import write_photos

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    checkpoint = ensure_test_models()["checkpoint"]
    tokenizer = REPO / ".comfyui" / "ComfyUI" / "comfy" / "sd1_tokenizer"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        photos = write_photos(root / "photos", 4, args.size)
        common = ["--checkpoint", str(checkpoint), "--images", str(photos), "--instance-prompt", "a photo of sks toy",
                  "--tokenizer", str(tokenizer), "--resolution", str(args.size), "--steps", str(args.steps),
                  "--rank", "16", "--sample-every", "0", "--validate-every", "0", "--resume", "never",
                  "--state-dir", str(root / "states")]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        results = {}
        one = [sys.executable, "-m", "trainers", "lora", *common, "--batch-size", "2",
               "--output", str(root / "one.safetensors")]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        two = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), "-m", "trainers", "lora", *common, "--batch-size", "1",
               "--output", str(root / "two.safetensors")]
        for name, command in (("1 process x 2 threads, batch 2", one), ("2 processes x 1 thread, batch 1 each", two)):
            wall, times, _ = run(command, env)
            per_step = (times[args.steps] - times[1]) / (args.steps - 1)
            results[name] = {"wall_s": round(wall, 1), "s_per_step": round(per_step, 3)}
            print(f"{name}: {per_step:.3f} s/step after the first step, {wall:.1f} s in all", flush=True)
        fingerprints = set()
        for file in ("one", "two"):
            with safe_open(str(root / f"{file}.safetensors"), "pt") as handle:
                fingerprints.add(handle.metadata()["dbs.fingerprint"])
    (single, double) = (v["s_per_step"] for v in results.values())
    speedup = single / double
    summary = {"size": args.size, "steps": args.steps, "runs": results, "speedup": round(speedup, 3),
               "efficiency": round(speedup / 2, 3), "same_job": len(fingerprints) == 1}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
