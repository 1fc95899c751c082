"""The optimizer step alone on the full-size SD1.5 UNet's weights: which AdamW implementation, and
the engine's Adafactor against transformers'.

    .venv/bin/python bench/optimizer_step.py [--steps 3] [--only fused,default,...] [--tiny-check]

Makes fp32 weights and gradients of the UNet's 686 tensor shapes (859.5M parameters, read from
the cached random full-size test checkpoint's header), then times ``optimizer.step()`` of torch
AdamW (the trainers' settings) as the default for-loop, foreach (multi-tensor) and the fused
kernel, and the fused kernel stepped one tensor at a time as ``fused_backward`` does; then
Adafactor with the trainers' settings, transformers' class (``adafactor-transformers``) and the
engine's (``adafactor``, trainers/training/adafactor.py). The first
step (which allocates the states) is not timed; the median of the next ``--steps`` is shown. Each
variant holds weights, gradients and two states: ~14 GB; they run one after the other.

``--tiny-check`` trains the tiny test model for 1 and 10 DreamBooth steps with the fused kernel
and with the default loop and prints how far the weights are apart: after 1 step the optimizers
alone (fp32 rounding); after 10 the forward passes have amplified those last-bit differences.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainers.training.loop import ADAMW_BETAS, ADAMW_EPS, ADAMW_WEIGHT_DECAY  # noqa: E402

VARIANTS = {
    "default": {"foreach": False, "fused": False},
    "foreach": {"foreach": True, "fused": False},
    "fused": {"fused": True},
    "fused-per-tensor": {"fused": True},
    "adafactor-transformers": {},
    "adafactor": {},
}


def unet_shapes() -> list[tuple[int, ...]]:
    from tests.support.models import ensure_test_models
    from trainers.sd15.checkpoint import read_safetensors_header

    shapes, _, _ = read_safetensors_header(ensure_test_models()["checkpoint"])
    return [tuple(shape) for key, shape in shapes.items() if key.startswith("model.diffusion_model.")]


def time_variant(name: str, shapes: list[tuple[int, ...]], steps: int) -> list[float]:
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator) * 0.02) for shape in shapes]
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator) * 1e-3
    if name == "adafactor-transformers":
        from transformers.optimization import Adafactor as Reference

        optimizers = [Reference(params, lr=2e-6, scale_parameter=False, relative_step=False, warmup_init=False)]
    elif name == "adafactor":
        from trainers.training.adafactor import Adafactor

        optimizers = [Adafactor(params, lr=2e-6)]
    else:
        optimizers = [torch.optim.AdamW(params, lr=2e-6, betas=ADAMW_BETAS, weight_decay=ADAMW_WEIGHT_DECAY,
                                        eps=ADAMW_EPS, **VARIANTS[name])]
    if name == "fused-per-tensor":
        optimizers = [torch.optim.AdamW([p], lr=2e-6, betas=ADAMW_BETAS, weight_decay=ADAMW_WEIGHT_DECAY,
                                        eps=ADAMW_EPS, fused=True) for p in params]
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        for optimizer in optimizers:
            optimizer.step()
        if step:
            times.append(time.perf_counter() - started)
    del optimizers, params
    gc.collect()
    return times


def tiny_check() -> None:
    import copy
    import dataclasses

    from tests.support.paths import tokenizer_dir
    from tests.test_trainers_lora import make_subject
    from trainers.sd15 import placeholder
    from trainers.training import loop
    from trainers.training.config import DreamBoothTrainConfig
    from trainers.training.dreambooth import train_dreambooth

    tiny = placeholder.tiny_sd15(seed=0, tokenizer_dir=tokenizer_dir())
    fits = loop._fused_adamw_fits
    original = tiny.unet.state_dict()
    for steps in (1, 10):
        unets = []
        for fused in (True, False):
            loop._fused_adamw_fits = fits if fused else (lambda groups: False)
            base = dataclasses.replace(tiny, unet=copy.deepcopy(tiny.unet))
            train_dreambooth(base, make_subject(), DreamBoothTrainConfig(steps=steps, unet_lr=1e-4, class_images=0))
            unets.append(base.unet.state_dict())
        loop._fused_adamw_fits = fits
        diff = max(float((unets[0][k] - unets[1][k]).abs().max()) for k in unets[0])
        moved = max(float((unets[1][k] - original[k]).abs().max()) for k in unets[1])
        print(f"tiny DreamBooth, {steps} AdamW steps: fused vs default max |difference| {diff:.3g} "
              f"(largest weight change {moved:.3g})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", default=",".join(VARIANTS))
    parser.add_argument("--tiny-check", action="store_true")
    args = parser.parse_args()
    if args.tiny_check:
        tiny_check()
    shapes = unet_shapes()
    count = sum(torch.Size(s).numel() for s in shapes)
    print(f"UNet: {len(shapes)} tensors, {count / 1e6:.1f}M parameters, {torch.get_num_threads()} threads")
    for name in args.only.split(","):
        times = time_variant(name, shapes, args.steps)
        print(f"{name:>18}: {statistics.median(times):6.2f} s/step  ({', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
