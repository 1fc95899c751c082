"""LoadSubjectImages: a folder of subject photos (or an IMAGE batch) -> SUBJECT + preview crops."""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io

from ..trainers.images import build_subject, check_resolution, folder_fingerprint, load_subject_folder
from .bridge import CATEGORY, SUBJECT, contained

NO_FOLDER = "(no subfolder in input/)"


def input_subfolders(max_depth: int = 3) -> list[str]:
    """Subfolders of ComfyUI's input directory, as relative posix paths (e.g. 'subjects/cat')."""
    root = Path(folder_paths.get_input_directory())
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if len(rel.parts) >= max_depth:
            dirnames[:] = []
        if rel.parts:
            found.append(rel.as_posix())
    return found or [NO_FOLDER]


def resolve_input_folder(name: str) -> Path:
    root = folder_paths.get_input_directory()
    if name == NO_FOLDER:
        raise ValueError("no subject folder: create input/<name>/ with 3-20 photos, or connect an IMAGE batch")
    path = Path(root) / name
    if not contained(path, root):
        raise ValueError(f"folder {name!r} is outside ComfyUI's input directory")
    if not path.is_dir():
        raise ValueError(f"folder {name!r} not found in ComfyUI's input directory: refresh the page")
    return path


class LoadSubjectImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadSubjectImages",
            display_name="Load Subject Images",
            category=CATEGORY,
            description="Loads 3-20 photos of one subject from a subfolder of ComfyUI's input directory "
                        "(or an IMAGE batch), crops them square to the training resolution and pairs them "
                        "with the instance prompt. Outputs the training set and a preview of the exact crops.",
            inputs=[
                io.Combo.Input("folder", options=input_subfolders(),
                               tooltip="Subfolder of ComfyUI's input directory holding the subject photos."),
                io.String.Input("instance_prompt", default="a photo of sks dog",
                                tooltip="Prompt with the rare token that names your subject, e.g. "
                                        "'a photo of sks woman face'."),
                io.String.Input("class_prompt", default="a photo of dog",
                                tooltip="The same prompt without the token (the subject's class); used "
                                        "for prior preservation."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64,
                             tooltip="Square training resolution in pixels (multiple of 64; SD1.5: 512)."),
                io.Int.Input("max_images", default=0, min=0, max=1000,
                             tooltip="Use at most this many images (sorted by file name); 0 = all."),
                io.Boolean.Input("flip", default=False,
                                 tooltip="Random horizontal flips during training (doubles the views "
                                         "of a symmetric subject)."),
                io.Image.Input("images", optional=True,
                               tooltip="Optional IMAGE batch to train on instead of the folder."),
            ],
            outputs=[
                SUBJECT.Output(display_name="SUBJECT", tooltip="Prepared training set: crops, captions, prompts."),
                io.Image.Output(display_name="crops", tooltip="The exact crops that will be trained on."),
            ],
        )

    @classmethod
    def validate_inputs(cls, resolution) -> bool | str:
        # Naming an input here turns off ComfyUI's own min/max check for it: re-check fully.
        try:
            check_resolution(resolution)
        except ValueError as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, folder, **kwargs):
        # Re-run when a file in the folder changes (ComfyUI caches on inputs otherwise).
        if folder == NO_FOLDER or kwargs.get("images") is not None:
            return ""
        root = folder_paths.get_input_directory()
        path = Path(root) / folder
        return folder_fingerprint(path) if contained(path, root) else ""

    @classmethod
    def execute(cls, folder, instance_prompt, class_prompt, resolution, max_images, flip,
                images=None) -> io.NodeOutput:
        if images is not None:
            batch = images[:max_images] if max_images > 0 else images
            subject = build_subject(list(batch), [f"batch[{i}]" for i in range(len(batch))],
                                    instance_prompt, class_prompt, resolution, flip)
        else:
            subject = load_subject_folder(resolve_input_folder(folder), instance_prompt, class_prompt,
                                          resolution, max_images, flip)
        return io.NodeOutput(subject, torch.stack(subject.images))
