"""ApplyLoRAScaled: a LoRA on MODEL and CLIP with separate UNet and text-encoder scales."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from .bridge import CATEGORY
from .lora_patch import FROM_INPUT, apply_lora, resolve_lora


class ApplyLoRAScaled(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ApplyLoRAScaled",
            display_name="Apply LoRA (UNet / Text-Encoder Scales)",
            category=CATEGORY,
            description="Applies a LoRA with separate UNet and text-encoder scales, using ComfyUI's own LoRA "
                        "patching (the result samples with any ComfyUI sampler). A LoRA that matches nothing "
                        "is an error; partly matching LoRAs are reported in the log.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5 model (UNet) to patch."),
                io.Clip.Input("clip", tooltip="The SD1.5 text encoder to patch."),
                io.Combo.Input("lora_name", options=[FROM_INPUT, *folder_paths.get_filename_list("loras")],
                               tooltip="LoRA file from models/loras, or use the lora input."),
                io.Float.Input("unet_scale", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="Strength on the UNet (image). 0 leaves the model unchanged."),
                io.Float.Input("text_encoder_scale", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="Strength on the text encoder (prompt). 0 leaves the CLIP unchanged."),
                io.LoraModel.Input("lora", optional=True,
                                   tooltip="A LoRA from LoRA Train (used when lora_name is "
                                           f"'{FROM_INPUT}')."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The patched model."),
                io.Clip.Output(display_name="CLIP", tooltip="The patched text encoder."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, lora_name, unet_scale, text_encoder_scale, lora=None) -> io.NodeOutput:
        lora, name = resolve_lora(lora_name, lora)
        new_model, new_clip, _ = apply_lora(model, clip, lora, unet_scale, text_encoder_scale, name)
        return io.NodeOutput(new_model, new_clip)
