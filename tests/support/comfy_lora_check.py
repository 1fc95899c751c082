"""Apply a LoRA file with ComfyUI's own loader and report which keys it used.

Run as a subprocess with ComfyUI's folder as the working directory; like comfy_load_check.py it
never imports this repository::

    python tests/support/comfy_lora_check.py --checkpoint CKPT --lora LORA [--comfyui DIR]

Prints one JSON object on stdout::

    {model_type, lora_keys, unet_key_map_hits, clip_key_map_hits, not_loaded, unet_patches,
     clip_patches, warnings}

``not_loaded`` are the LoRA tensors ComfyUI logged as "lora key not loaded"; ``unet_patches`` /
``clip_patches`` count the weights ComfyUI's load_lora_for_models patched.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys

_NOT_LOADED = re.compile(r"^lora key not loaded: (.*)$")


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--lora", required=True)
    parser.add_argument("--comfyui", default=os.getcwd(), help="ComfyUI folder (default: cwd)")
    args = parser.parse_args()

    comfy_dir = os.path.abspath(args.comfyui)
    script_dir = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != script_dir]
    sys.path.insert(0, comfy_dir)
    os.chdir(comfy_dir)

    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # ComfyUI prints; keep stdout for the JSON result
    capture = _Capture()
    root = logging.getLogger()
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)

    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.lora
    import comfy.sd
    import comfy.utils

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
        args.checkpoint, output_vae=False, output_clip=True
    )
    lora = comfy.utils.load_torch_file(args.lora, safe_load=True)
    unet_map = comfy.lora.model_lora_keys_unet(model.model, {})
    clip_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    modules = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in lora}
    capture.records.clear()
    new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    result = {
        "model_type": type(model.model.model_config).__name__,
        "lora_keys": len(lora),
        "lora_modules": len(modules),
        "unet_key_map_hits": sorted(m for m in modules if m in unet_map),
        "clip_key_map_hits": sorted(m for m in modules if m in clip_map),
        "unet_patches": len(new_model.patches),
        "clip_patches": len(new_clip.patcher.patches),
        "not_loaded": [],
    }
    for record in capture.records:
        match = _NOT_LOADED.match(record.getMessage())
        if match:
            result["not_loaded"].append(match.group(1))
    result["warnings"] = [r.getMessage() for r in capture.records if r.levelno >= logging.WARNING]
    real_stdout.write(json.dumps(result) + "\n")
    real_stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
