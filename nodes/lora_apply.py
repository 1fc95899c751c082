"""ApplyLoRAScaled: a LoRA on MODEL and CLIP with separate UNet and text-encoder scales."""

from __future__ import annotations

import logging
import re

import comfy.lora
import comfy.lora_convert
import comfy.utils
import folder_paths
from comfy_api.latest import io

from .bridge import CATEGORY, model_path

log = logging.getLogger(__name__)

FROM_INPUT = "(use the lora input)"
_MODULE_SUFFIX = re.compile(r"\.(lora_up|lora_down|lora_mid|lora_A|lora_B|alpha|dora_scale|diff|diff_b|"
                            r"hada_\w+|lokr_\w+|a1|a2|b1|b2|on_input|w_norm|b_norm)(\.weight)?$")


class LoRAMatch:
    """Which modules of a LoRA state dict ComfyUI's key map finds in the model and the CLIP."""

    def __init__(self, lora: dict, model, clip):
        unet_map = comfy.lora.model_lora_keys_unet(model.model, {}) if model is not None else {}
        clip_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}) if clip is not None else {}
        modules = {_MODULE_SUFFIX.sub("", k) for k in lora}
        self.unet = sorted(m for m in modules if m in unet_map)
        self.clip = sorted(m for m in modules if m in clip_map and m not in unet_map)
        self.unmatched = sorted(modules - set(self.unet) - set(self.clip))
        self.total = len(modules)

    def report(self, name: str) -> str:
        return (f"{name}: {len(self.unet)} UNet and {len(self.clip)} text-encoder modules matched of "
                f"{self.total}; {len(self.unmatched)} unmatched")


def apply_lora(model, clip, lora: dict, unet_scale: float, te_scale: float, name: str = "LoRA"):
    """Clone-and-patch with ComfyUI's own LoRA loading. A side whose scale is 0 is left untouched
    (so scales (0, 0) give exactly the input model and CLIP)."""
    lora = comfy.lora_convert.convert_lora(lora)
    match = LoRAMatch(lora, model, clip)
    if not match.unet and not match.clip:
        sample = ", ".join(match.unmatched[:3])
        raise ValueError(f"{name} matches no UNet or text-encoder module of this model (e.g. {sample}): it "
                         "is not an SD1.5 LoRA, or its key names are in a format ComfyUI does not read")
    if match.unmatched:
        log.warning("%s; unmatched modules: %s", match.report(name), ", ".join(match.unmatched[:20]))
    else:
        log.info(match.report(name))
    new_model, new_clip = model, clip
    if unet_scale != 0 and match.unet:
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        new_model = model.clone()
        new_model.add_patches(comfy.lora.load_lora(lora, key_map, log_missing=False), unet_scale)
    if te_scale != 0 and match.clip:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
        new_clip = clip.clone()
        new_clip.add_patches(comfy.lora.load_lora(lora, key_map, log_missing=False), te_scale)
    return new_model, new_clip, match


def resolve_lora(lora_name: str, lora: dict | None) -> tuple[dict, str]:
    """(state dict, display name) of a LoRA picked by file name or connected as LORA_MODEL."""
    if lora_name == FROM_INPUT:
        if lora is None:
            raise ValueError(f"lora_name is '{FROM_INPUT}' but nothing is connected to the lora input: "
                             "connect LoRA Train's LORA_MODEL or pick a file")
        return lora, "the connected LoRA"
    path = model_path("loras", lora_name)
    return comfy.utils.load_torch_file(str(path), safe_load=True), lora_name


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
