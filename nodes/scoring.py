"""What the nodes that score images share (not a node): models/subject_eval/ as a ComfyUI model
folder, its combo lists, checked folder names, the FIDELITY_MODELS type and scoring on the device."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import comfy.model_management
import folder_paths
from comfy_api.latest import io

from ..trainers.eval import fidelity
from .bridge import shown

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


def scoring_inputs(fidelity_models, subject, real_images):
    """The real images to score against (a list of H x W x 3 or an IMAGE batch), or None when no
    evaluation models are connected; wiring mistakes are errors that say what to connect."""
    if fidelity_models is None:
        return None  # photos without models: nothing to score, nothing wrong
    if not isinstance(fidelity_models, fidelity.FidelityModels):
        raise ValueError("fidelity_models must come from Load Fidelity Models")
    if subject is not None and real_images is not None:
        raise ValueError("connect either subject or real_images, not both")
    if subject is None and real_images is None:
        raise ValueError("no real images to score against: connect the subject (Load Subject Images) or real_images")
    return list(subject.images) if subject is not None else real_images


@contextlib.contextmanager
def on_device(models: fidelity.FidelityModels):
    """The models on ComfyUI's device while the block runs; back on the CPU afterwards (and the
    device's cache emptied)."""
    try:
        yield models.to(comfy.model_management.get_torch_device())
    finally:
        models.to("cpu")
        comfy.model_management.soft_empty_cache()


def score_on_device(models: fidelity.FidelityModels, images, real, prompts) -> fidelity.FidelityScores:
    """fidelity.score on ComfyUI's device."""
    with on_device(models):
        return fidelity.score(models, images, real, prompts)


def clip_t_prompt(prompt: str, subject) -> str:
    """The prompt CLIP-T scores a sample against: the subject's instance prompt in it replaced by
    its class prompt ("a photo of sks dog on the beach" -> "a photo of dog on the beach"), as the
    paper scores prompt fidelity with the class noun, not the rare token."""
    if subject.class_prompt.strip() and subject.instance_prompt in prompt:
        return prompt.replace(subject.instance_prompt, subject.class_prompt.strip())
    return prompt


def sample_scorer(models: fidelity.FidelityModels, subject):
    """For a training run: the DINO, CLIP-I and CLIP-T means of one sample round against the subject
    (its photos embedded in the first round, and reused by every later one)."""
    embedded: list[fidelity.RealEmbeddings] = []

    def score(round_) -> dict[str, float]:
        prompts = [clip_t_prompt(p, subject) for p in round_.prompts]
        with on_device(models):
            if not embedded:
                embedded.append(fidelity.embed_real(models, list(subject.images)))
            scores = fidelity.score(models, round_.images, embedded[0], prompts)
        return {"dino": scores.dino, "clip_i": scores.clip_i, "clip_t": scores.clip_t}

    return score
