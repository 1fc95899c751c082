"""`make demo`: the main job through a real ComfyUI's HTTP API.

Draws a small sample subject, starts the dev ComfyUI headless, and queues
LoadSubjectImages -> LoRATrain -> ApplyLoRAScaled -> KSampler -> SaveImage, with progress on the
terminal. Without SD15_CHECKPOINT the base model is a random-weight SD1.5 placeholder: the run
proves the plumbing in a few minutes on a CPU, and its images are noise.
SD15_CHECKPOINT=/path/model.safetensors uses a real SD1.5 model and real settings (512 px).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.comfyclient import ComfyClient  # noqa: E402
from scripts.comfyserver import ComfyServer, comfyui_path  # noqa: E402
from scripts.graphs import lora_loop  # noqa: E402

SUBJECT_FOLDER = "dreambooth_studio_demo_subject"

# image_steps: the final txt2img; train_sample_*: sample images while training (rows of the grid).
QUICK = dict(resolution=64, steps=12, rank=4, unet_lr=1e-4, text_encoder_lr=1e-5, size=64, image_steps=4,
             sample_every=6, train_sample_steps=4, validate_every=3)
REAL = dict(resolution=512, steps=400, rank=16, unet_lr=1e-4, text_encoder_lr=1e-5, size=512, image_steps=25,
            sample_every=100, train_sample_steps=20, validate_every=50)


def draw_sample_subject(folder: Path, count: int = 6, size: int = 384) -> list[Path]:
    """A toy subject (a red robot with a yellow antenna) on varied backgrounds, from several
    angles and distances: enough to show the pipeline, drawn so no download is needed."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    backgrounds = [(180, 210, 235), (90, 140, 90), (230, 220, 200), (60, 60, 80), (200, 170, 140), (150, 190, 200)]
    paths = []
    for i in range(count):
        img = Image.new("RGB", (size, size + 64 * (i % 2)), backgrounds[i % len(backgrounds)])
        d = ImageDraw.Draw(img)
        scale = 0.7 + 0.1 * (i % 3)
        cx, cy = size // 2 + (i - count // 2) * 12, img.height // 2 + 10
        w, h = int(120 * scale), int(150 * scale)
        d.rectangle([cx - w // 2, cy - h // 2, cx + w // 2, cy + h // 2], fill=(200, 40, 40), outline=(40, 0, 0), width=3)
        head = int(70 * scale)
        d.rectangle([cx - head // 2, cy - h // 2 - head, cx + head // 2, cy - h // 2], fill=(220, 60, 60))
        for ex in (-1, 1):
            d.ellipse([cx + ex * head // 4 - 8, cy - h // 2 - head // 2 - 8,
                       cx + ex * head // 4 + 8, cy - h // 2 - head // 2 + 8], fill=(255, 255, 255))
        d.line([cx, cy - h // 2 - head, cx, cy - h // 2 - head - 30], fill=(240, 200, 0), width=5)
        d.ellipse([cx - 9, cy - h // 2 - head - 42, cx + 9, cy - h // 2 - head - 24], fill=(250, 220, 0))
        path = folder / f"robot_{i + 1:02d}.png"
        img.save(path)
        paths.append(path)
    return paths


def demo_graph(ckpt_name: str, lora_name: str, s: dict, seed: int = 123) -> dict:
    graph = lora_loop(
        ckpt_name, lora_name, SUBJECT_FOLDER, positive="a photo of sks robot on the beach",
        negative="blurry, lowres, deformed", resolution=s["resolution"], image_seed=seed,
        image_steps=s["image_steps"], size=s["size"], prefix="dreambooth_studio_demo",
        loss_prefix="dreambooth_studio_demo_loss", rank=s["rank"], alpha=float(s["rank"]), steps=s["steps"],
        seed=seed, unet_lr=s["unet_lr"], text_encoder_lr=s["text_encoder_lr"],
        sample_every=s["sample_every"], sample_steps=s["train_sample_steps"], validate_every=s["validate_every"],
        # the demo's own file: reused when this exact job made it, replaced when it came from
        # other settings or an older version of the pack
        overwrite=True)
    graph["save_samples"] = {"class_type": "SaveImage", "inputs": {"images": ["train", 3],
                                                                   "filename_prefix": "dreambooth_studio_demo_samples"}}
    return graph


class TerminalProgress:
    def __init__(self, graph: dict):
        self.NAMES = {node_id: f"{node['class_type']} ({node_id})" for node_id, node in graph.items()}
        self.start = time.monotonic()
        self.bar_open = False

    def _line(self, text: str) -> None:
        print(("\n" if self.bar_open else "") + text, flush=True)
        self.bar_open = False

    def __call__(self, event: dict) -> None:
        kind, data = event.get("type"), event.get("data") or {}
        stamp = f"[{time.monotonic() - self.start:6.1f}s]"
        if kind == "executing" and data.get("node"):
            node = data["node"]
            self._line(f"{stamp} running {self.NAMES.get(node, node)}")
        elif kind == "progress":
            node = self.NAMES.get(data.get("node"), data.get("node"))
            value, total = data.get("value", 0), max(1, data.get("max", 1))
            bar = "#" * int(30 * value / total)
            print(f"\r{stamp} {node}: [{bar:<30}] {value}/{total}", end="", flush=True)
            self.bar_open = True
        elif kind == "dreambooth_studio.step":
            for step, loss in data.get("validation") or []:
                shown = f"{loss:.4f}" if loss is not None else "not finite"
                self._line(f"{stamp} validation loss at step {step}: {shown}")
        elif kind == "dreambooth_studio.samples":
            self._line(f"{stamp} sample images of step {data.get('step')} ({len(data.get('images') or [])} "
                       f"prompts, {data.get('seconds') or 0:.1f} s)")
        elif kind == "execution_cached" and data.get("nodes"):
            self._line(f"{stamp} cached: {', '.join(data['nodes'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=os.environ.get("SD15_CHECKPOINT"),
                        help="real SD1.5 .safetensors checkpoint (default: $SD15_CHECKPOINT, else the random placeholder)")
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    comfy = comfyui_path()
    ckpt_dir = comfy / "models" / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if args.checkpoint:
        source = Path(args.checkpoint).expanduser().resolve()
        if not source.is_file():
            print(f"SD15_CHECKPOINT={source} does not exist", file=sys.stderr)
            return 2
        settings, placeholder = REAL, False
    else:
        from trainers.sd15.placeholder import CHECKPOINT_NAME, write_placeholder_models

        cache = Path(os.environ.get("DBS_TEST_MODELS", REPO / ".cache" / "test-models"))
        print("No SD15_CHECKPOINT given: using the random-weight SD1.5 PLACEHOLDER. The run shows the whole "
              "pipeline working; its images are noise. Use SD15_CHECKPOINT=/path/model.safetensors for real images.")
        write_placeholder_models(cache)
        source, settings, placeholder = cache / CHECKPOINT_NAME, QUICK, True
    target = ckpt_dir / source.name
    if not target.exists():
        target.symlink_to(source)
    ckpt_name = target.name

    subject_dir = comfy / "input" / SUBJECT_FOLDER
    if not subject_dir.is_dir():
        draw_sample_subject(subject_dir)
    lora_name = f"demo_{Path(ckpt_name).stem}_lora"

    server = ComfyServer(comfy_dir=comfy, port=args.port, log_path=REPO / "demo-output" / "comfyui-server.log")
    print(f"starting ComfyUI at {comfy} (log: {server.log_path})")
    with server:
        client = ComfyClient(server.url)
        graph = demo_graph(ckpt_name, lora_name, settings)
        result = client.run(graph, timeout=6 * 3600, on_event=TerminalProgress(graph))
        print()
        if result.status != "success":
            err = result.error or {}
            print(f"FAILED in node {err.get('node_id')} ({err.get('node_type')}): {err.get('exception_message')}",
                  file=sys.stderr)
            return 1
        out = REPO / "demo-output"
        out.mkdir(exist_ok=True)
        copied = []
        for node in ("save", "save_loss", "save_samples"):
            for f in result.files(node):
                src = server.output_dir / f["subfolder"] / f["filename"]
                shutil.copy2(src, out / f["filename"])
                copied.append(src)
    lora_path = comfy / "models" / "loras" / f"{lora_name}.safetensors"
    print("\nDone.")
    print(f"  base model:  {source}{'  (random-weight placeholder: images are noise)' if placeholder else ''}")
    print(f"  LoRA:        {lora_path}")
    for src in copied:
        print(f"  image:       {src}")
    print(f"  copies in:   {REPO / 'demo-output'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
