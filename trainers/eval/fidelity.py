"""Subject fidelity as the DreamBooth paper measures it (Ruiz et al., CVPR 2023, section 4.1).

- DINO: the mean cosine similarity between DINO ViT embeddings (the final, layer-normed CLS token)
  of every pair (generated image, real subject image). It rewards the subject's identity.
- CLIP-I: the same mean over every pair, with CLIP's projected image embeddings.
- CLIP-T: the mean, over the generated images, of the cosine similarity between an image's CLIP
  image embedding and the CLIP text embedding of the prompt it was made with. It falls when a model
  overfits and ignores the prompt.

The paper's Table 1 (Stable Diffusion): DreamBooth DINO 0.668, CLIP-I 0.803, CLIP-T 0.305; real
images DINO 0.774, CLIP-I 0.885.

The models come from folders on disk in the transformers layout (``config.json``,
``model.safetensors``, ``preprocessor_config.json``, and for CLIP the tokenizer files), loaded
offline; pickle weights are never loaded. Each model's images go through the image processor its
``preprocessor_config.json`` describes, as transformers loads it (the reference preprocessing).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..training.plot import text_font

PAPER_SD = {"DINO": 0.668, "CLIP-I": 0.803, "CLIP-T": 0.305}
PAPER_REAL = {"DINO": 0.774, "CLIP-I": 0.885}
METRICS = ("DINO", "CLIP-I", "CLIP-T")
# What each slot takes: the model types transformers writes into config.json, and what to put there.
DINO_TYPES = ("vit", "dinov2")
CLIP_TYPES = ("clip",)
SUGGESTED = {"dino": "facebook/dino-vits16 (DINO ViT-S/16, as in the paper)",
             "clip": "a CLIP model with both towers, e.g. openai/clip-vit-base-patch32"}
BATCH = 16  # images per forward pass


class FidelityModelError(ValueError):
    """A model folder that cannot be used; the message says what is wrong and what to put there."""


def _weights_file(folder: Path) -> Path | None:
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (folder / name).is_file():
            return folder / name
    return None


def check_model_folder(folder: str | Path, slot: str, shown: Callable[[Path], str] = str) -> dict[str, Any]:
    """The config of a DINO (``slot="dino"``) or CLIP (``slot="clip"``) model folder, after checking
    everything loading needs is there, without loading any weights. Raises FidelityModelError."""
    folder = Path(folder)
    types = DINO_TYPES if slot == "dino" else CLIP_TYPES
    label = "DINO" if slot == "dino" else "CLIP"
    where = f"the {label} model folder {shown(folder)}"
    hint = f"put {SUGGESTED[slot]} there as a transformers folder with model.safetensors"
    if not folder.is_dir():
        raise FidelityModelError(f"{where} does not exist: {hint}")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FidelityModelError(f"{where} has no config.json: {hint}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FidelityModelError(f"{where}: config.json is not readable JSON ({exc}): {hint}") from None
    if not isinstance(config, dict):
        raise FidelityModelError(f"{where}: config.json is not a JSON object: {hint}")
    model_type = config.get("model_type")
    if model_type not in types:
        raise FidelityModelError(
            f"{where} holds a {model_type!r} model, not a {label} model (config.json model_type "
            f"{' or '.join(repr(t) for t in types)}): {hint}")
    if _weights_file(folder) is None:
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt*")]
        if pickled:
            raise FidelityModelError(
                f"{where} has only pickle weights ({', '.join(sorted(pickled))}), which this pack never loads "
                f"(they can run code): use the model's model.safetensors")
        raise FidelityModelError(f"{where} has no model.safetensors: {hint}")
    if not (folder / "preprocessor_config.json").is_file():
        raise FidelityModelError(
            f"{where} has no preprocessor_config.json (it says how images are resized and normalised): "
            "copy it from the model's repository")
    if slot == "clip" and not ((folder / "tokenizer.json").is_file()
                               or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())):
        raise FidelityModelError(
            f"{where} has no tokenizer (tokenizer.json, or vocab.json and merges.txt): copy them from the "
            "model's repository")
    return config


@dataclass
class FidelityModels:
    """The loaded evaluation models (ComfyUI custom type ``FIDELITY_MODELS``)."""

    dino: Any  # transformers ViTModel / Dinov2Model
    dino_processor: Any
    clip: Any  # transformers CLIPModel
    clip_processor: Any
    tokenizer: Any
    names: tuple[str, str]  # folder names, for tables and metadata

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    def to(self, device: torch.device | str) -> FidelityModels:
        self.dino.to(device)
        self.clip.to(device)
        return self


def _load_model(folder: Path, slot: str, model_type: str, shown: Callable[[Path], str]):
    import transformers

    cls = transformers.CLIPModel if slot == "clip" else transformers.AutoModel
    # ViTModel adds a pooler that DINO checkpoints do not have (the score uses the CLS token).
    kwargs = {"add_pooling_layer": False} if model_type == "vit" else {}
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                          output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        raise FidelityModelError(f"the {slot.upper()} model in {shown(folder)} does not load: {exc}") from None
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("pooler.")]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        detail = ", ".join([*missing[:4], *[str(m[0]) for m in mismatched[:4]]])
        raise FidelityModelError(
            f"the weights in {shown(folder)} do not match its config.json ({len(missing)} missing, "
            f"{len(mismatched)} of another shape, e.g. {detail}): use the folder exactly as the model's "
            "repository has it")
    return model.float().eval().requires_grad_(False)  # fp32 whatever the file holds


def load_fidelity_models(dino_dir: str | Path, clip_dir: str | Path, device: torch.device | str = "cpu",
                         shown: Callable[[Path], str] = str) -> FidelityModels:
    """Load both models from their folders (checked first), offline, in fp32, on ``device``."""
    import transformers

    dino_dir, clip_dir = Path(dino_dir), Path(clip_dir)
    dino_type = check_model_folder(dino_dir, "dino", shown)["model_type"]
    clip_type = check_model_folder(clip_dir, "clip", shown)["model_type"]
    dino = _load_model(dino_dir, "dino", dino_type, shown)
    clip = _load_model(clip_dir, "clip", clip_type, shown)
    try:
        dino_processor = transformers.AutoImageProcessor.from_pretrained(str(dino_dir), local_files_only=True)
        clip_processor = transformers.AutoImageProcessor.from_pretrained(str(clip_dir), local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(clip_dir), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise FidelityModelError(f"the processor or tokenizer files of {shown(dino_dir)} or {shown(clip_dir)} "
                                 f"do not load ({exc}): copy them from the model's repository") from None
    return FidelityModels(dino, dino_processor, clip, clip_processor, tokenizer,
                          (dino_dir.name, clip_dir.name)).to(device)


# -- images -------------------------------------------------------------------------------------
def to_pil_images(images: torch.Tensor | Sequence[Any]) -> list:
    """ComfyUI IMAGE (B x H x W x C floats in [0, 1], or a list of H x W x C tensors or of PIL
    images) as 8-bit RGB PIL images.

    Rounded, not truncated: an image loaded from an 8-bit file (value k/255) comes back as exactly
    the file's pixels, so it is preprocessed exactly as the file itself would be."""
    from PIL import Image

    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4:
            raise ValueError(f"images must be an IMAGE batch (B, H, W, C), got shape {tuple(images.shape)}")
        images = list(images)
    pictures = []
    for image in images:
        if isinstance(image, Image.Image):
            pictures.append(image.convert("RGB"))
            continue
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:2]) < 1:
            raise ValueError(f"an image has shape {tuple(image.shape)}; expected (H, W, 3)")
        pixels = image.detach().float().cpu()
        pixels = pixels[..., :3] if pixels.shape[-1] >= 3 else pixels.expand(*pixels.shape[:2], 3)
        if not torch.isfinite(pixels).all():
            raise ValueError("an image holds NaN or infinite values")
        array = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        pictures.append(Image.fromarray(array, mode="RGB"))
    return pictures


def _batches(items: Sequence, size: int = BATCH):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _pixels(processor, pictures: Sequence, device: torch.device) -> torch.Tensor:
    return processor(images=list(pictures), return_tensors="pt")["pixel_values"].to(device, torch.float32)


@torch.inference_mode()
def dino_embeddings(models: FidelityModels, pictures: Sequence) -> torch.Tensor:
    """Unit-length DINO embeddings (N x D): the final CLS token, as DINO's own evaluation uses it."""
    out = [models.dino(pixel_values=_pixels(models.dino_processor, batch, models.device)).last_hidden_state[:, 0]
           for batch in _batches(pictures)]
    return F.normalize(torch.cat(out).double(), dim=-1)


@torch.inference_mode()
def clip_image_embeddings(models: FidelityModels, pictures: Sequence) -> torch.Tensor:
    """Unit-length CLIP image embeddings (N x D): pooled vision output through the visual projection."""
    clip = models.clip
    out = [clip.visual_projection(clip.vision_model(pixel_values=_pixels(models.clip_processor, batch,
                                                                          models.device)).pooler_output)
           for batch in _batches(pictures)]
    return F.normalize(torch.cat(out).double(), dim=-1)


@torch.inference_mode()
def clip_text_embeddings(models: FidelityModels, prompts: Sequence[str]) -> torch.Tensor:
    """Unit-length CLIP text embeddings (N x D), prompts cut at the text model's 77 positions."""
    clip = models.clip
    limit = clip.config.text_config.max_position_embeddings
    out = []
    for batch in _batches(list(prompts)):
        tokens = models.tokenizer(list(batch), padding=True, truncation=True, max_length=limit, return_tensors="pt")
        tokens = {k: v.to(models.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        out.append(clip.text_projection(clip.text_model(**tokens).pooler_output))
    return F.normalize(torch.cat(out).double(), dim=-1)


def pairwise_similarity(generated: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every (generated, real) pair: G x R, from unit-length rows."""
    return generated @ real.T


# -- scores -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FidelityScores:
    dino: float
    clip_i: float
    clip_t: float
    per_image: tuple[tuple[float, float, float], ...]  # (DINO, CLIP-I, CLIP-T) of each generated image
    prompts: tuple[str, ...]
    real_count: int
    models: tuple[str, str]

    def as_dict(self) -> dict[str, Any]:
        return {"dino": self.dino, "clip_i": self.clip_i, "clip_t": self.clip_t, "images": len(self.per_image),
                "real_images": self.real_count, "models": list(self.models)}


def prompts_for(prompts: str | Sequence[str], count: int) -> list[str]:
    """One prompt per generated image: a single prompt (or one line) for all, or one line per image."""
    if isinstance(prompts, str):
        lines = [line.strip() for line in prompts.splitlines() if line.strip()]
    else:
        lines = [str(p).strip() for p in prompts]
    if not lines or any(not line for line in lines):
        raise ValueError("prompts is empty: give the prompt the images were made with (one line for all images, "
                         "or one line per image)")
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise ValueError(f"prompts has {len(lines)} lines for {count} generated images: give one line for all "
                         "images, or one line per image in the batch's order")
    return lines


@dataclass(frozen=True)
class RealEmbeddings:
    """The subject's real photos embedded once (DINO and CLIP image, unit length, on the CPU), for
    scoring many batches against the same photos (a training run's sample rounds)."""

    dino: torch.Tensor
    clip: torch.Tensor

    @property
    def count(self) -> int:
        return len(self.dino)


def embed_real(models: FidelityModels, real: torch.Tensor | Sequence[Any]) -> RealEmbeddings:
    """Embed the subject's ``real`` images for :func:`score`."""
    pictures = to_pil_images(real)
    if not pictures:
        raise ValueError("no real subject images to score against")
    return RealEmbeddings(dino_embeddings(models, pictures).cpu(), clip_image_embeddings(models, pictures).cpu())


def score(models: FidelityModels, generated: torch.Tensor | Sequence[Any],
          real: torch.Tensor | Sequence[Any] | RealEmbeddings, prompts: str | Sequence[str]) -> FidelityScores:
    """DINO, CLIP-I and CLIP-T of ``generated`` against the subject's ``real`` images (paper means);
    ``real`` may be embedded already (:func:`embed_real`)."""
    generated_pictures = to_pil_images(generated)
    if not generated_pictures:
        raise ValueError("no generated images to score")
    if not isinstance(real, RealEmbeddings):
        real = embed_real(models, real)
    texts = prompts_for(prompts, len(generated_pictures))
    dino_generated = dino_embeddings(models, generated_pictures)
    dino_pairs = pairwise_similarity(dino_generated, real.dino.to(dino_generated.device))
    clip_generated = clip_image_embeddings(models, generated_pictures)
    clip_pairs = pairwise_similarity(clip_generated, real.clip.to(clip_generated.device))
    clip_t = (clip_generated * clip_text_embeddings(models, texts)).sum(-1)
    per_image = tuple((float(d), float(c), float(t))
                      for d, c, t in zip(dino_pairs.mean(1), clip_pairs.mean(1), clip_t, strict=True))
    return FidelityScores(float(dino_pairs.mean()), float(clip_pairs.mean()), float(clip_t.mean()), per_image,
                          tuple(texts), real.count, models.names)


# -- the table ----------------------------------------------------------------------------------
def _row_texts(scores: FidelityScores, row_labels: Sequence[str] | None) -> tuple[str, list[str]]:
    """(title, text after each image's scores): its prompt, or its label (one prompt then goes in the title)."""
    title = f"Subject fidelity: {len(scores.per_image)} generated vs {scores.real_count} real images"
    if row_labels is None:
        return title, list(scores.prompts)
    if len(row_labels) != len(scores.per_image):
        raise ValueError(f"{len(row_labels)} row labels for {len(scores.per_image)} images")
    if len(set(scores.prompts)) == 1:
        title += f"; CLIP-T prompt: {scores.prompts[0]}"
        return title, list(row_labels)
    return title, [f"{label}: {prompt}" for label, prompt in zip(row_labels, scores.prompts, strict=True)]


def _cut(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def table_lines(scores: FidelityScores, max_rows: int = 64, row_labels: Sequence[str] | None = None) -> list[str]:
    """The scores as fixed-width text: means, each generated image (with its prompt, or its label
    from ``row_labels``), the paper's yardstick."""
    title, texts = _row_texts(scores, row_labels)
    lines = [title,
             f"{'':8}{'DINO':>8}{'CLIP-I':>8}{'CLIP-T':>8}",
             f"{'mean':8}{scores.dino:8.3f}{scores.clip_i:8.3f}{scores.clip_t:8.3f}"]
    for index, ((dino, clip_i, clip_t), text) in enumerate(zip(scores.per_image, texts, strict=True)):
        if index == max_rows:
            lines.append(f"... {len(scores.per_image) - max_rows} more images")
            break
        lines.append(f"{f'#{index + 1}':8}{dino:8.3f}{clip_i:8.3f}{clip_t:8.3f}  {_cut(text)}")
    lines.append("DreamBooth paper, SD: " + ", ".join(f"{k} {v:.3f}" for k, v in PAPER_SD.items())
                 + "; real images: " + ", ".join(f"{k} {v:.3f}" for k, v in PAPER_REAL.items()))
    lines.append(f"models: {scores.models[0]} (DINO), {scores.models[1]} (CLIP)")
    return lines


def table_image(scores: FidelityScores, max_rows: int = 64, row_labels: Sequence[str] | None = None):
    """The table as a PIL image: numbers in aligned columns, text lines as they are."""
    from PIL import Image, ImageDraw

    lines = table_lines(scores, max_rows, row_labels)
    texts = [_cut(text) for text in _row_texts(scores, row_labels)[1][:max_rows]]
    font = text_font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = int(math.ceil(font.getbbox("Ag")[3])) + 6
    column = probe.textlength("0.000", font=font) + 24  # one score column
    label = probe.textlength("#0000", font=font) + 16
    width = max([probe.textlength(line, font=font) for line in (lines[0], *lines[-2:])]
                + [label + 3 * column + probe.textlength(text, font=font) + 8 for text in texts])
    picture = Image.new("RGB", (int(min(width + 24, 4096)), 12 + line_height * len(lines)), (24, 24, 28))
    draw = ImageDraw.Draw(picture)
    white, mean = (225, 225, 225), (255, 214, 120)

    def cells(y: float, first: str, values: Sequence[str], colour, tail: str = "") -> None:
        draw.text((12, y), first, fill=colour, font=font)
        for index, value in enumerate(values):  # right-aligned in its column
            x = 12 + label + (index + 1) * column - 16 - probe.textlength(value, font=font)
            draw.text((x, y), value, fill=colour, font=font)
        if tail:
            draw.text((12 + label + 3 * column, y), tail, fill=colour, font=font)

    draw.text((12, 6), lines[0], fill=white, font=font)
    cells(6 + line_height, "", METRICS, white)
    cells(6 + 2 * line_height, "mean", [f"{v:.3f}" for v in (scores.dino, scores.clip_i, scores.clip_t)], mean)
    for row, values in enumerate(scores.per_image[:max_rows]):
        cells(6 + (3 + row) * line_height, f"#{row + 1}", [f"{v:.3f}" for v in values], white, texts[row])
    if len(scores.per_image) > max_rows:  # the "... more images" line
        draw.text((12, 6 + (len(lines) - 3) * line_height), lines[-3], fill=white, font=font)
    for offset, line in enumerate(lines[-2:]):
        draw.text((12, 6 + (len(lines) - 2 + offset) * line_height), line, fill=(170, 170, 180), font=font)
    return picture
