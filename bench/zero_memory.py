"""Memory per process of a full DreamBooth fine-tune on two processes, by how much is sharded:
``--shard-optimizer`` (ZeRO stage 1: optimizer states split) against ``--shard-gradients``
(stage 2: optimizer states and gradients split), on the full-size random SD1.5.

    .venv/bin/python bench/zero_memory.py [--size 256] [--steps 2] [--runs zero1-adafactor,zero2-adafactor,zero2-adamw]

Each run is ``accelerate launch --multi_gpu --num_processes 2 -m trainers dreambooth ...`` on the
CPU (gloo). The peak resident memory of each process (VmHWM) is read from /proc while it runs.
Both processes load the whole model and cache the photos' latents before training, so the peak
is the training peak only once the UNet's weights, gradients and optimizer states are larger
than the loading peak (they are, for the full fine-tune). Expected per process for the SD1.5 UNet
(860 M weights, fp32): weights 3.4 GB + gradients 3.4 GB (stage 1) or 1.7 GB (stage 2, of 2) +
AdamW states 6.9 / 2 GB (Adafactor: a few MB), plus activations and the frozen parts.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RUNS = {
    "zero1-adafactor": ["--shard-optimizer", "--optimizer", "adafactor"],
    "zero2-adafactor": ["--shard-gradients", "--optimizer", "adafactor"],
    "zero1-adamw": ["--shard-optimizer", "--optimizer", "adamw"],
    "zero2-adamw": ["--shard-gradients", "--optimizer", "adamw"],
}


def rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in environ:
        if entry.startswith(b"RANK="):
            return int(entry[5:])
    return None


def peak_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def launch(argv: list[str]) -> tuple[dict[int, float], float, str]:
    """Run the launch; ({rank: peak GB}, seconds, stderr)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), "-m", "trainers", "dreambooth", *argv]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    with tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        peaks: dict[int, int] = {}
        while process.poll() is None:
            for pid in descendants(process.pid):
                rank, peak = rank_of(pid), peak_kib(pid)
                if rank is not None and peak is not None:
                    peaks[rank] = max(peaks.get(rank, 0), peak)
            time.sleep(0.25)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if process.returncode != 0:
        raise SystemExit(f"failed ({process.returncode}): {' '.join(command)}\n{stderr[-3000:]}")
    return {rank: round(kib / 2**20, 2) for rank, kib in sorted(peaks.items())}, time.monotonic() - started, stderr


def main() -> None:
    from tests.support.models import ensure_test_models
    from tests.test_trainers_lora import write_photos

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--runs", default="zero1-adafactor,zero2-adafactor,zero2-adamw",
                        help=f"comma-separated, of {', '.join(RUNS)}")
    args = parser.parse_args()
    checkpoint = ensure_test_models()["checkpoint"]
    tokenizer = REPO / ".comfyui" / "ComfyUI" / "comfy" / "sd1_tokenizer"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        photos = write_photos(root / "photos", 2, args.size)
        for name in args.runs.split(","):
            common = ["--checkpoint", str(checkpoint), "--images", str(photos), "--instance-prompt",
                      "a photo of sks toy", "--tokenizer", str(tokenizer), "--resolution", str(args.size),
                      "--steps", str(args.steps), "--batch-size", "1", "--class-images", "0",
                      "--sample-every", "0", "--validate-every", "0", "--resume", "never",
                      "--state-dir", str(root / "states"), "--output", str(root / f"{name}.safetensors")]
            peaks, seconds, _ = launch(common + RUNS[name])
            results[name] = {"peak_gb_per_process": peaks, "seconds": round(seconds, 1)}
            print(f"{name}: peak resident memory per process {peaks} GB, {seconds:.0f} s", flush=True)
            (root / f"{name}.safetensors").unlink()
    print(json.dumps({"size": args.size, "steps": args.steps, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
