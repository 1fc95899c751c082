"""Where one training step's time goes, on the full-size random SD1.5, LoRA or the full fine-tune.

Runs the engine's own pieces (the loop's batch, loss, backward, clipping and optimizer step) on
the CPU with a timer around each part, after a warm-up step, and prints the mean seconds per part
and their shares. Options that may speed a step up can be switched on to compare, one process
per setting::

    .venv/bin/python bench/step_profile.py --method lora --size 64 [--precision bf16] \
        [--channels-last] [--compile] [--steps 4] [--profile 25] [--lora-type dora] [--conv-layers]
    .venv/bin/python bench/step_profile.py --method full --size 64 [--fused-backward]

Parts: ``batch`` (draw latents, noise and timesteps), ``forward`` (UNet and loss), ``backward``,
``clip`` (gradient norm), ``optimizer`` (optimizer and LR schedule step, with zeroing the
gradients). With ``--fused-backward`` the optimizer runs inside ``backward`` (the engine's
weight-by-weight path, timed as one part).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--channels-last", action="store_true", help="UNet in channels-last memory format")
    parser.add_argument("--compile", action="store_true", help="UNet compiled with torch.compile (inductor)")
    parser.add_argument("--fused-backward", action="store_true", help="full fine-tune: optimizer in the backward")
    parser.add_argument("--optimizer", choices=("adamw", "adafactor"), default="adamw")
    parser.add_argument("--lora-type", choices=("lora", "dora"), default="lora")
    parser.add_argument("--conv-layers", action="store_true", help="LoRA: the 3x3 convolutions too")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after the timed steps, one more step under torch.profiler: its N costliest ops")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--tokenizer", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import torch

    from bench.harness import default_inputs
    from trainers.data.subject import SubjectData
    from trainers.sd15.checkpoint import load_sd15
    from trainers.training import loop
    from trainers.training.config import DreamBoothTrainConfig, LoRATrainConfig
    from trainers.training.lora import inject_lora, lora_parameters, unet_lora_targets
    from trainers.training.memory import load_dtypes

    default_inputs(args)
    if args.method == "lora":
        config = LoRATrainConfig(rank=4, steps=args.steps + 1, precision=args.precision, lora_type=args.lora_type,
                                 conv_layers=args.conv_layers)
    else:
        config = DreamBoothTrainConfig(class_images=0, steps=args.steps + 1, precision=args.precision,
                                       optimizer=args.optimizer, fused_backward=args.fused_backward)
    base = load_sd15(args.checkpoint, args.tokenizer, load_dtypes(config))
    generator = torch.Generator().manual_seed(0)
    size = args.size
    subject = SubjectData(images=tuple(torch.rand(size, size, 3, generator=generator) for _ in range(4)),
                          captions=("a photo of sks toy",) * 4, instance_prompt="a photo of sks toy",
                          class_prompt="", resolution=size, source_names=tuple(f"img{i}" for i in range(4)))
    for model in (base.unet, base.vae, base.text_encoder):
        model.requires_grad_(False)
    instance, _ = loop.prepare_training_sets(base, subject, None, cache_latents=True, cache_text=True)
    if args.method == "lora":
        inject_lora(base.unet, unet_lora_targets(base.unet, args.conv_layers), 4, 4.0, 0,
                    dora=args.lora_type == "dora")
        params = lora_parameters(base.unet)
        for parameter in params:
            parameter.data = parameter.data.float()
    else:
        params = list(base.unet.parameters())
    for parameter in params:
        parameter.requires_grad_(True)
    if args.channels_last:
        base.unet.to(memory_format=torch.channels_last)
    base.unet.train()
    if args.compile:
        base.unet.compile()
    autocast = torch.bfloat16 if args.precision == "bf16" else None
    optimization = loop.build_optimization(config, params, [], autocast, keep_grad_buffers=args.method == "full")
    settings = loop.LoopSettings.of(config, autocast)
    models = loop.LoopModels(base.unet, base.vae, base.text_encoder, base.noise_scheduler)
    streams = [loop.IndexStream(instance.count, generator)]
    times: dict[str, list[float]] = {name: [] for name in ("batch+forward", "backward", "clip", "optimizer")}
    optimizer = optimization.optimizer
    for step in range(args.steps + 1):
        marks = [time.perf_counter()]
        loss, _ = loop.compute_step_loss(models, [instance], streams, settings, generator)
        marks.append(time.perf_counter())
        if optimization.weight_steps is not None:  # the engine's own weight-by-weight path, timed whole
            loop.apply_gradients(loss, optimization, 1.0, step + 1)
            marks += [time.perf_counter()] * 3
        else:
            optimizer.zero_grad(set_to_none=not optimization.keep_grad_buffers)
            loss.backward()
            marks.append(time.perf_counter())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            marks.append(time.perf_counter())
            optimizer.step()
            optimization.lr_scheduler.step()
            marks.append(time.perf_counter())
        if step:  # the first step warms up
            for name, start, end in zip(times, marks, marks[1:], strict=False):
                times[name].append(end - start)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as trace:
            loss, _ = loop.compute_step_loss(models, [instance], streams, settings, generator)
            optimizer.zero_grad(set_to_none=not optimization.keep_grad_buffers)
            loss.backward()
        print(trace.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile), flush=True)
    total = sum(statistics.mean(values) for values in times.values())
    label = (f"{args.method if args.method == 'full' else args.lora_type} {size}px {args.precision}"
             + (" conv" if args.conv_layers else "") + (" channels-last" if args.channels_last else "")
             + (" compiled" if args.compile else "")
             + (f" {args.optimizer}" if args.method == "full" else ""))
    print(f"{label}: {total:.3f} s/step, " + ", ".join(
        f"{name} {statistics.mean(values):.3f} s ({100 * statistics.mean(values) / total:.0f}%)"
        for name, values in times.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
