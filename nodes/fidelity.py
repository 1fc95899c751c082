"""LoadFidelityModels and SubjectFidelity: the DreamBooth paper's DINO, CLIP-I and CLIP-T scores of
generated images against the subject's photos, from evaluation models in models/subject_eval/."""

from __future__ import annotations

import json
import os
from pathlib import Path

import comfy.model_management
import folder_paths
from comfy_api.latest import io, ui

from ..trainers.eval import fidelity
from .bridge import CATEGORY, SUBJECT, shown, user_facing_errors
from .training_shared import to_image

MODEL_FOLDER = "subject_eval"  # models/subject_eval/, movable with extra_model_paths.yaml
FIDELITY_MODELS = io.Custom("FIDELITY_MODELS")
NONE_FOUND = {"dino": "(none: put DINO ViT-S/16 in models/subject_eval)",
              "clip": "(none: put a CLIP model in models/subject_eval)"}


def register_model_folder() -> None:
    """models/subject_eval/ as a ComfyUI model folder (a path that extra_model_paths.yaml gives under
    ``subject_eval`` is kept, and searched first)."""
    folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER))


def model_folders(slot: str) -> dict[str, Path]:
    """Model folders (one or two levels deep, holding a config.json) of the right kind for ``slot``
    ("dino" or "clip"), by the name the combo shows."""
    register_model_folder()
    types = fidelity.DINO_TYPES if slot == "dino" else fidelity.CLIP_TYPES
    found: dict[str, Path] = {}
    for root in folder_paths.get_folder_paths(MODEL_FOLDER):
        root = Path(root)
        if not root.is_dir():
            continue
        candidates = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        candidates += [q for p in candidates for q in sorted(p.iterdir()) if q.is_dir() and not q.name.startswith(".")]
        for folder in candidates:
            try:
                model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
            except (OSError, ValueError, AttributeError):
                continue
            if model_type in types:
                found.setdefault(folder.relative_to(root).as_posix(), folder)
    return found


def options(slot: str) -> list[str]:
    return sorted(model_folders(slot)) or [NONE_FOUND[slot]]


def resolve(slot: str, name: str) -> Path:
    """The folder of a combo value, only among the folders the combo lists (a crafted name cannot
    reach anything else), checked for everything loading needs."""
    folders = model_folders(slot)
    label = "DINO" if slot == "dino" else "CLIP"
    if name not in folders:
        if not folders:
            raise ValueError(f"no {label} model in models/{MODEL_FOLDER}: put {fidelity.SUGGESTED[slot]} there "
                             "(a transformers folder with config.json, model.safetensors and "
                             "preprocessor_config.json) and refresh the page")
        raise ValueError(f"{label} model {name!r} not found in models/{MODEL_FOLDER} (there: "
                         f"{', '.join(sorted(folders))}): choose one of those and refresh the page")
    fidelity.check_model_folder(folders[name], slot, shown)
    return folders[name]


class LoadFidelityModels(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadFidelityModels",
            display_name="Load Fidelity Models (DINO, CLIP)",
            category=CATEGORY,
            description="Loads the evaluation models of the DreamBooth paper from models/subject_eval/: a DINO "
                        "ViT (facebook/dino-vits16) and a CLIP model with both towers. Offline, safetensors "
                        "only.",
            inputs=[
                io.Combo.Input("dino_model", options=options("dino"),
                               tooltip="DINO ViT folder in models/subject_eval (config.json, model.safetensors, "
                                       "preprocessor_config.json), e.g. facebook/dino-vits16."),
                io.Combo.Input("clip_model", options=options("clip"),
                               tooltip="CLIP folder in models/subject_eval (both towers, projections, tokenizer "
                                       "and preprocessor files), e.g. openai/clip-vit-base-patch32."),
            ],
            outputs=[FIDELITY_MODELS.Output(display_name="FIDELITY_MODELS",
                                            tooltip="For Subject Fidelity.")],
        )

    @classmethod
    def validate_inputs(cls, dino_model, clip_model) -> bool | str:
        # Runs at /prompt: a missing or wrong folder is refused before anything is queued.
        try:
            resolve("dino", dino_model)
            resolve("clip", clip_model)
        except ValueError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, dino_model, clip_model) -> io.NodeOutput:
        with user_facing_errors():
            dino_dir, clip_dir = resolve("dino", dino_model), resolve("clip", clip_model)
            # Kept on the CPU between uses: Subject Fidelity moves them to the device while it scores.
            return io.NodeOutput(fidelity.load_fidelity_models(dino_dir, clip_dir, "cpu", shown))


class SubjectFidelity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SubjectFidelity",
            display_name="Subject Fidelity (DINO, CLIP-I, CLIP-T)",
            category=CATEGORY,
            is_output_node=True,  # its table is the result a graph may end with
            description="Scores generated images as the DreamBooth paper does. DINO and CLIP-I: mean similarity "
                        "of every generated-real pair (identity: higher is closer to the subject). CLIP-T: mean "
                        "similarity of each image with its prompt (falls when the model ignores the prompt). "
                        "Paper, Stable Diffusion DreamBooth: 0.668 / 0.803 / 0.305; real photos 0.774 / 0.885.",
            inputs=[
                io.Image.Input("images", tooltip="The generated images (a batch)."),
                FIDELITY_MODELS.Input("fidelity_models", tooltip="From Load Fidelity Models."),
                io.String.Input("prompts", multiline=True, default="a photo of a dog",
                                tooltip="The prompt the images were made with: one line for all, or one line per "
                                        "image in batch order. Write the class noun where the prompt has the "
                                        "rare token (as the paper scores CLIP-T), e.g. 'a dog on the beach'."),
                SUBJECT.Input("subject", optional=True,
                              tooltip="The real subject photos (from Load Subject Images), or use real_images."),
                io.Image.Input("real_images", optional=True,
                               tooltip="The real subject photos as an IMAGE batch (instead of subject)."),
            ],
            outputs=[
                io.Float.Output(display_name="DINO", tooltip="Mean DINO similarity, generated vs real."),
                io.Float.Output(display_name="CLIP-I", tooltip="Mean CLIP image similarity, generated vs real."),
                io.Float.Output(display_name="CLIP-T", tooltip="Mean CLIP similarity of each image with its prompt."),
                io.String.Output(display_name="table", tooltip="Means, each image's scores, the paper's yardstick."),
                io.Image.Output(display_name="table_image", tooltip="The same table as an image."),
            ],
        )

    @classmethod
    def execute(cls, images, fidelity_models, prompts, subject=None, real_images=None) -> io.NodeOutput:
        with user_facing_errors():
            if subject is not None and real_images is not None:
                raise ValueError("connect either subject or real_images, not both")
            if subject is None and real_images is None:
                raise ValueError("no real images: connect the subject (Load Subject Images) or real_images")
            real = list(subject.images) if subject is not None else real_images
            if not isinstance(fidelity_models, fidelity.FidelityModels):
                raise ValueError("fidelity_models must come from Load Fidelity Models")
            fidelity.prompts_for(prompts, len(images))  # a wrong prompt count fails before any model runs
            device = comfy.model_management.get_torch_device()
            try:
                scores = fidelity.score(fidelity_models.to(device), images, real, prompts)
            finally:
                fidelity_models.to("cpu")
                comfy.model_management.soft_empty_cache()
        lines = fidelity.table_lines(scores)
        table = to_image(fidelity.table_image(scores))
        previews = ui.PreviewImage(table, cls=cls).values
        return io.NodeOutput(scores.dino, scores.clip_i, scores.clip_t, "\n".join(lines), table,
                             ui={"images": previews, "text": ["\n".join(lines)]})
