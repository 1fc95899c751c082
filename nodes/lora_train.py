"""LoRATrain: SUBJECT + SD1.5 checkpoint -> LoRA file in models/loras (kohya keys)."""

from __future__ import annotations

import folder_paths
import torch
from comfy_api.latest import io

from ..trainers.config import LoRATrainConfig
from ..trainers.jobs import train_lora_file
from ..trainers.names import validate_output_name
from ..trainers.plot import loss_curve_image
from .bridge import (
    CATEGORY,
    SUBJECT,
    ComfyProgress,
    class_image_cache,
    config_input,
    config_kwargs,
    free_comfy_models,
    model_path,
    output_model_path,
    tokenizer_dir,
    training_scope,
)

TRAIN_FIELDS = ("rank", "alpha", "steps", "unet_lr", "text_encoder_lr", "lr_scheduler", "lr_warmup_steps",
                "batch_size", "seed", "precision", "gradient_checkpointing", "cache_latents")
PRIOR_FIELDS = ("class_images", "prior_loss_weight", "class_steps", "class_guidance", "class_seed")
GENERATE = "(generate from the base model)"


def checkpoint_input() -> io.Input:
    return io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints"),
                          tooltip="SD1.5 base model from models/checkpoints (single-file .safetensors).")


def output_name_input(default: str) -> io.Input:
    return io.String.Input("output_name", default=default,
                           tooltip="File name (without extension) for the trained model. Letters, digits, "
                                   "'-', '_' and '.'; no folders.")


def overwrite_input() -> io.Input:
    return io.Boolean.Input("overwrite", default=False,
                            tooltip="Replace an existing file of that name. Off: a file from an identical "
                                    "earlier run is reused, any other file is an error.")


def class_folder_input() -> io.Input:
    from .subject import input_subfolders

    return io.Combo.Input("class_folder", optional=True, options=[GENERATE, *input_subfolders()], default=GENERATE,
                          tooltip="Class images for prior preservation: generated from the base model with the "
                                  "class prompt (cached in input/class_images/, reused by every run with the same "
                                  "model, prompt, count, resolution and seed), or your own folder in input/ (at "
                                  "most class_images of them, centre-cropped).")


def resolve_class_folder(name):
    from .subject import NO_FOLDER, resolve_input_folder

    if name in (None, "", GENERATE, NO_FOLDER):
        return None
    return resolve_input_folder(name)


def check_inputs(output_name: str, config_cls, **fields) -> bool | str:
    try:
        validate_output_name(output_name)
        config_cls(**fields)
    except ValueError as exc:
        return str(exc)
    return True


def loss_curve(losses: list[float], title: str, extra: dict | None = None) -> torch.Tensor:
    return loss_curve_image(losses, title=title, extra_curves=extra or None)



class LoRATrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRATrain",
            display_name="LoRA Train (SD1.5)",
            category=CATEGORY,
            description="Trains a LoRA on the subject images (UNet attention, and the text encoder when its "
                        "learning rate is above 0) and saves it to models/loras in the kohya format that "
                        "ComfyUI, A1111/Forge and diffusers load. Reports every step; cancel stops within "
                        "one step and writes nothing.",
            inputs=[
                SUBJECT.Input("subject", tooltip="Training set from Load Subject Images."),
                checkpoint_input(),
                output_name_input("subject_lora"),
                overwrite_input(),
                *[config_input(LoRATrainConfig, name) for name in TRAIN_FIELDS],
                # Prior preservation: optional inputs (with defaults) so API prompts written before
                # they existed still validate.
                *[config_input(LoRATrainConfig, name, optional=True) for name in PRIOR_FIELDS],
                class_folder_input(),
            ],
            outputs=[
                io.LoraModel.Output(display_name="LORA_MODEL",
                                    tooltip="The trained LoRA (also accepted by ComfyUI's core LoRA nodes)."),
                io.String.Output(display_name="lora_name", tooltip="File name in models/loras."),
                io.Image.Output(display_name="loss_curve", tooltip="Training loss per step."),
            ],
        )

    @classmethod
    def validate_inputs(cls, output_name, unet_lr, text_encoder_lr, steps, lr_warmup_steps) -> bool | str:
        # Only the inputs named here lose ComfyUI's own min/max check; the config re-checks them
        # (and catches NaN, which passes a min/max comparison).
        return check_inputs(output_name, LoRATrainConfig, unet_lr=unet_lr, text_encoder_lr=text_encoder_lr,
                            steps=steps, lr_warmup_steps=lr_warmup_steps)

    @classmethod
    def execute(cls, subject, ckpt_name, output_name, overwrite, class_folder=None, **settings) -> io.NodeOutput:
        config = LoRATrainConfig(**config_kwargs(LoRATrainConfig, settings))
        checkpoint = model_path("checkpoints", ckpt_name)
        output = output_model_path("loras", validate_output_name(output_name))
        folder = resolve_class_folder(class_folder)
        progress = ComfyProgress(config.steps, preview=lambda p: to_pil(loss_curve(p.losses, "LoRA loss",
                                                                                   p.extra_curves())))
        with training_scope():
            job = train_lora_file(checkpoint, subject, config, output, tokenizer_dir(), overwrite=overwrite,
                                  callbacks=progress, before_load=free_comfy_models,
                                  class_cache_dir=class_image_cache(), class_folder=folder)
        if job.reused:
            progress.bar.update_absolute(config.steps, config.steps)
        curve = loss_curve(job.losses, f"LoRA loss ({output.name})", job.extra_curves())
        return io.NodeOutput(job.state_dict, output.name, curve)


def to_pil(image: torch.Tensor):
    from PIL import Image

    array = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(array)
