"""Applying a LoRA with ComfyUI's own patching: which modules match, separate UNet and
text-encoder scales, and a LoRA picked by file name or connected. Shared by ApplyLoRAScaled and
LoRAScaleGrid; not a node itself."""

from __future__ import annotations

import logging
import re

import comfy.lora
import comfy.lora_convert
import comfy.utils

from .bridge import model_path, user_facing_errors

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
    with user_facing_errors():  # a damaged file's error would name its absolute server path
        path = model_path("loras", lora_name)
        return comfy.utils.load_torch_file(str(path), safe_load=True), lora_name
