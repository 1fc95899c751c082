"""Load a checkpoint (and a ControlNet) with ComfyUI's own loaders and report what it logged.

Run as a subprocess with ComfyUI's folder as the working directory; this script puts that folder
first on sys.path and never imports this repository (our ``nodes/`` package would shadow
ComfyUI's ``nodes.py``)::

    python tests/support/comfy_load_check.py --checkpoint CKPT [--controlnet CNET] [--sample]

Prints one JSON object on stdout (everything else goes to stderr)::

    {model_type, prediction, unet_missing, unet_unexpected, clip_missing, clip_missing_ignored,
     clip_unexpected, vae_missing, vae_unexpected, left_over, controlnet_loaded,
     controlnet_missing, controlnet_unexpected, controlnet_leftover, sample, warnings}

``clip_missing_ignored`` holds the missing CLIP keys ComfyUI itself ignores for SD1.5 files
(``logit_scale`` and ``text_projection``, which the SD1.5 single-file format has no slot for).
``sample`` (with ``--sample``) samples 2 steps at 8x8 latents with and without the ControlNet and
decodes: finiteness and whether the ControlNet changed the result.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import re
import sys

# (field, regex): ComfyUI's log lines (comfy/sd.py, comfy/model_base.py, comfy/controlnet.py).
_PATTERNS = [
    ("unet_missing", re.compile(r"^unet missing: (.*)$", re.S)),
    ("unet_unexpected", re.compile(r"^unet unexpected: (.*)$", re.S)),
    ("clip_missing", re.compile(r"^clip missing: (.*)$", re.S)),
    ("clip_unexpected", re.compile(r"^clip unexpected:? (.*?):?$", re.S)),
    ("vae_missing", re.compile(r"^Missing VAE keys (.*)$", re.S)),
    ("vae_unexpected", re.compile(r"^Leftover VAE keys (.*)$", re.S)),
    ("left_over", re.compile(r"^left over keys: (.*)$", re.S)),
    ("controlnet_missing", re.compile(r"^missing controlnet keys: (.*)$", re.S)),
    ("controlnet_unexpected", re.compile(r"^unexpected controlnet keys: (.*)$", re.S)),
    ("controlnet_leftover", re.compile(r"^leftover keys: (.*)$", re.S)),
]
_CLIP_IGNORABLE = (".logit_scale", ".transformer.text_projection.weight")


def _parse_keys(text: str) -> list[str]:
    text = text.strip()
    match = re.fullmatch(r"(?:dict_keys|odict_keys)\((.*)\)", text, re.S)
    if match:
        text = match.group(1)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return [text]
    return [str(v) for v in value]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--controlnet")
    parser.add_argument("--comfyui", default=os.getcwd(), help="ComfyUI folder (default: cwd)")
    parser.add_argument("--sample", action="store_true", help="also sample a few steps at 8x8 latents")
    args = parser.parse_args()

    comfy_dir = os.path.abspath(args.comfyui)
    script_dir = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") not in (script_dir,)]
    sys.path.insert(0, comfy_dir)
    os.chdir(comfy_dir)

    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # ComfyUI prints; keep stdout for the JSON result
    capture = _Capture()
    root = logging.getLogger()
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)

    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management reads it
    import comfy.controlnet
    import comfy.model_management
    import comfy.sample
    import comfy.sd
    import torch

    result: dict = {field: [] for field, _ in _PATTERNS}
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        args.checkpoint, output_vae=True, output_clip=True
    )
    result["model_type"] = type(model.model.model_config).__name__
    result["prediction"] = model.model.model_type.name
    control = None
    if args.controlnet:
        control = comfy.controlnet.load_controlnet(args.controlnet)
        result["controlnet_loaded"] = control is not None
        result["controlnet_class"] = type(control).__name__ if control is not None else None

    if args.sample:
        result["sample"] = _sample(torch, comfy, model, clip, vae, control)

    for record in capture.records:
        message = record.getMessage()
        for field, pattern in _PATTERNS:
            match = pattern.match(message)
            if match:
                result[field] += _parse_keys(match.group(1))
                break
    missing = result["clip_missing"]
    result["clip_missing_ignored"] = [k for k in missing if any(k.endswith(s) for s in _CLIP_IGNORABLE)]
    result["clip_missing"] = [k for k in missing if k not in result["clip_missing_ignored"]]
    result["warnings"] = [r.getMessage() for r in capture.records if r.levelno >= logging.WARNING]
    real_stdout.write(json.dumps(result) + "\n")
    real_stdout.flush()
    return 0


def _sample(torch, comfy, model, clip, vae, control) -> dict:
    """Two Euler steps at 8x8 latents (64x64 px), with and without ControlNet, then decode."""

    def encode(text: str) -> list:
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]

    positive, negative = encode("a photo of sks dog on the moon"), encode("blurry")
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(123))

    def run(pos: list) -> torch.Tensor:
        return comfy.sample.sample(
            model,
            noise.clone(),
            2,
            7.0,
            "euler",
            "normal",
            pos,
            negative,
            latent,
            seed=123,
            disable_pbar=True,
        )

    plain = run(positive)
    out = {
        "latent_finite": bool(torch.isfinite(plain).all()),
        "latent_std": float(plain.float().std()),
        "cond_std": float(positive[0][0].float().std()),
    }
    image = vae.decode(plain)
    out["image_shape"] = list(image.shape)
    out["image_finite"] = bool(torch.isfinite(image).all())
    if control is not None:
        hint = torch.zeros(1, 64, 64, 3)
        hint[:, 16:48, 16:48, :] = 1.0
        c_net = control.copy().set_cond_hint(hint.movedim(-1, 1), 1.0, (0.0, 1.0), vae=vae)
        controlled = [
            [positive[0][0], {**positive[0][1], "control": c_net, "control_apply_to_uncond": False}]
        ]
        with_control = run(controlled)
        out["controlled_finite"] = bool(torch.isfinite(with_control).all())
        out["control_changed_latent"] = float((with_control - plain).abs().max())
    return out


if __name__ == "__main__":
    sys.exit(main())
