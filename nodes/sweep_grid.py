"""LoRAScaleGrid: one image per (UNet scale, text-encoder scale, CFG) combination, sampled with
ComfyUI's own KSampler code at a fixed seed, plus one labelled grid of them all."""

from __future__ import annotations

import math
import re

import comfy.model_management
import comfy.samplers
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io

from ..trainers.eval import fidelity
from ..trainers.training.plot import text_font
from .bridge import CATEGORY, SUBJECT, user_facing_errors
from .lora_patch import FROM_INPUT, apply_lora, resolve_lora
from .scoring import FIDELITY_MODELS, score_on_device, scoring_inputs

MAX_CELLS = 64
_SPLIT = re.compile(r"[,;\s]+")


def parse_values(text: str, name: str, low: float, high: float) -> list[float]:
    """'0, 0.5, 1' -> [0.0, 0.5, 1.0]; an error names the input and the bad item."""
    items = [item for item in _SPLIT.split(str(text).strip()) if item]
    if not items:
        raise ValueError(f"{name} is empty: give one or more numbers separated by commas, e.g. '0, 0.5, 1'")
    values = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"{name}: {item!r} is not a number; give numbers separated by commas, "
                             "e.g. '0, 0.5, 1'") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise ValueError(f"{name}: {item} is outside {low:g} to {high:g}")
        values.append(value)
    return values


def grid_combinations(unet_scales, te_scales, cfgs) -> list[tuple[float, float, float]]:
    """Rows are (UNet scale, text-encoder scale) pairs, columns CFG values, in the given order."""
    return [(u, t, c) for u in unet_scales for t in te_scales for c in cfgs]


def _label(unet: float, te: float, cfg: float) -> str:
    return f"unet {unet:g} | te {te:g} | cfg {cfg:g}"


def _cell_lines(unet: float, te: float, cfg: float) -> tuple[str, str]:
    return f"U{unet:g} TE{te:g}", f"CFG {cfg:g}"


def _score_line(scores: tuple[float, float, float]) -> str:
    return "D{:.2f} I{:.2f} T{:.2f}".format(*scores)


def label_metrics(cell_width: int, lines: int = 2) -> tuple[int, int, int]:
    """(font size, title band height, label strip height) for cells `cell_width` pixels wide:
    `lines` label lines under each cell, readable from 64 px cells up to 1024 px ones."""
    font_px = max(10, cell_width // 20)
    return font_px, font_px + 10, lines * (font_px + 3) + 4


GRID_PAD = 4


def draw_grid(images: torch.Tensor, cells: list[tuple[float, float, float]], columns: int,
              title: str, scores: list[tuple[float, float, float]] | None = None) -> torch.Tensor:
    """Tile B x H x W x 3 images `columns` wide, each with its settings (and its DINO, CLIP-I and
    CLIP-T when `scores` are given) in a strip under it."""
    from PIL import Image, ImageDraw

    count, height, width = images.shape[0], images.shape[1], images.shape[2]
    rows = math.ceil(count / columns)
    font_px, header, strip = label_metrics(width, 3 if scores else 2)
    font = text_font(font_px)
    pad = GRID_PAD
    canvas = Image.new("RGB", (columns * (width + pad) + pad, header + rows * (height + strip + pad) + pad),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 4), title, fill=(0, 0, 0), font=font)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    for index in range(count):
        row, column = divmod(index, columns)
        x = pad + column * (width + pad)
        y = header + row * (height + strip + pad)
        canvas.paste(Image.fromarray(pixels[index]), (x, y))
        lines = _cell_lines(*cells[index]) + ((_score_line(scores[index]),) if scores else ())
        for line_number, line in enumerate(lines):
            draw.text((x + 2, y + height + 3 + line_number * (font_px + 3)), line, fill=(0, 0, 0), font=font)
    array = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)
    return array.unsqueeze(0)


class LoRAScaleGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRAScaleGrid",
            display_name="LoRA Scale x CFG Grid",
            category=CATEGORY,
            description="Samples the prompt once per combination of UNet scale, text-encoder scale and CFG, "
                        "at one fixed seed, with ComfyUI's own LoRA patching and KSampler, and lays the "
                        "images out as one labelled grid (rows: scale pairs, columns: CFG values).",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5 model (UNet), without the LoRA."),
                io.Clip.Input("clip", tooltip="The SD1.5 text encoder, without the LoRA."),
                io.Vae.Input("vae", tooltip="VAE to decode the images."),
                io.Combo.Input("lora_name", options=[FROM_INPUT, *folder_paths.get_filename_list("loras")],
                               tooltip="LoRA file from models/loras, or use the lora input."),
                io.String.Input("positive", multiline=True, default="a photo of sks dog on the beach",
                                tooltip="Prompt for every cell."),
                io.String.Input("negative", multiline=True, default="blurry, lowres, deformed",
                                tooltip="Negative prompt for every cell."),
                io.Int.Input("seed", default=123, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="One seed for every cell, so only the swept settings differ."),
                io.Int.Input("steps", default=30, min=1, max=10000, tooltip="Sampling steps per image."),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="euler",
                               tooltip="ComfyUI sampler."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal",
                               tooltip="ComfyUI noise schedule."),
                io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="Image width in pixels."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="Image height in pixels."),
                io.String.Input("unet_scales", default="0, 0.5, 1.0",
                                tooltip="UNet strengths to try, separated by commas (-10 to 10)."),
                io.String.Input("text_encoder_scales", default="0, 0.5, 1.0",
                                tooltip="Text-encoder strengths to try, separated by commas (-10 to 10)."),
                io.String.Input("cfg_values", default="5, 7.5, 10",
                                tooltip="Guidance scales to try, separated by commas (0 to 100)."),
                io.LoraModel.Input("lora", optional=True,
                                   tooltip=f"A LoRA from LoRA Train (used when lora_name is '{FROM_INPUT}')."),
                FIDELITY_MODELS.Input("fidelity_models", optional=True,
                                      tooltip="From Load Fidelity Models: score every cell (DINO, CLIP-I against "
                                              "the subject's photos, CLIP-T against the prompt)."),
                SUBJECT.Input("subject", optional=True,
                              tooltip="The real subject photos to score against (or real_images)."),
                io.Image.Input("real_images", optional=True,
                               tooltip="The real subject photos as an IMAGE batch (instead of subject)."),
                io.String.Input("fidelity_prompt", optional=True, default="",
                                tooltip="The prompt CLIP-T scores each cell against; empty: the positive prompt. "
                                        "Write the class noun where the prompt has the rare token, e.g. 'a photo "
                                        "of a dog on the beach'."),
            ],
            outputs=[
                io.Image.Output(display_name="grid", tooltip="All images, one labelled cell per combination."),
                io.Image.Output(display_name="images", tooltip="The images as a batch, in grid order."),
                io.String.Output(display_name="labels", tooltip="One line per image: its scales and CFG."),
                io.String.Output(display_name="scores",
                                 tooltip="With fidelity_models: DINO, CLIP-I and CLIP-T of every cell and their "
                                         "means, as a table (empty without)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, unet_scales, text_encoder_scales, cfg_values) -> bool | str:
        try:
            cls.combinations(unet_scales, text_encoder_scales, cfg_values)
        except ValueError as exc:
            return str(exc)
        return True

    @staticmethod
    def combinations(unet_scales, text_encoder_scales, cfg_values):
        combos = grid_combinations(parse_values(unet_scales, "unet_scales", -10, 10),
                                   parse_values(text_encoder_scales, "text_encoder_scales", -10, 10),
                                   parse_values(cfg_values, "cfg_values", 0, 100))
        if len(combos) > MAX_CELLS:
            raise ValueError(f"{len(combos)} combinations is more than {MAX_CELLS}: use fewer values")
        return combos

    @classmethod
    def execute(cls, model, clip, vae, lora_name, positive, negative, seed, steps, sampler_name, scheduler,
                width, height, unet_scales, text_encoder_scales, cfg_values, lora=None, fidelity_models=None,
                subject=None, real_images=None, fidelity_prompt="") -> io.NodeOutput:
        import nodes as comfy_nodes  # ComfyUI's nodes.py (common_ksampler)

        combos = cls.combinations(unet_scales, text_encoder_scales, cfg_values)
        lora, name = resolve_lora(lora_name, lora)
        with user_facing_errors():  # wiring mistakes fail before the first cell is sampled
            real = scoring_inputs(fidelity_models, subject, real_images)
            score_prompt = str(fidelity_prompt or "").strip() or str(positive)
        cfg_count = len({c for _, _, c in combos})
        bar = comfy.utils.ProgressBar(len(combos))
        latent = {"samples": torch.zeros([1, 4, height // 8, width // 8])}
        images, labels, conditioning = [], [], {}
        for index, (unet, te, cfg) in enumerate(combos):
            comfy.model_management.throw_exception_if_processing_interrupted()
            patched_model, patched_clip, _ = apply_lora(model, clip, lora, unet, te, name)
            if (unet, te) not in conditioning:
                conditioning = {(unet, te): tuple(
                    patched_clip.encode_from_tokens_scheduled(patched_clip.tokenize(text))
                    for text in (positive, negative))}
            pos, neg = conditioning[(unet, te)]
            samples = comfy_nodes.common_ksampler(patched_model, seed, steps, cfg, sampler_name, scheduler, pos, neg,
                                                  latent)[0]["samples"]
            images.append(vae.decode(samples)[:1].float().cpu())
            labels.append(_label(unet, te, cfg))
            bar.update_absolute(index + 1, len(combos))
        batch = torch.cat(images)
        title = f"{name}: seed {seed}, {steps} steps, {sampler_name}/{scheduler}"
        table, cell_scores = "", None
        if real is not None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            scores = score_on_device(fidelity_models, batch, real, [score_prompt] * len(combos))
            cell_scores = list(scores.per_image)
            table = "\n".join(fidelity.table_lines(scores, row_labels=labels))
            title += " | D: DINO, I: CLIP-I, T: CLIP-T"
        grid = draw_grid(batch, combos, columns=cfg_count, title=title, scores=cell_scores)
        return io.NodeOutput(grid, batch, "\n".join(labels), table)
