"""LoadSubjectImages: a folder of subject photos (or an IMAGE batch) -> SUBJECT, preview crops, report."""

from __future__ import annotations

from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io

from ..trainers.data.images import (
    BAD_FILE_MODES,
    CAPTION_MODES,
    CROP_MODES,
    LOSS_MASKS,
    MASK_FOLDER,
    MAX_IMAGES,
    MAX_PIXELS,
    MAX_PROMPT_CHARS,
    check_prompt,
    check_resolution,
    folder_fingerprint,
    load_subject,
    prepare_subject,
)
from .bridge import (
    CATEGORY,
    NO_FOLDER,
    SUBJECT,
    contained,
    input_subfolders,
    resolve_input_folder,
    tokenizer_dir,
)


class LoadSubjectImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadSubjectImages",
            display_name="Load Subject Images",
            category=CATEGORY,
            description="Loads 3-20 photos of one subject from a subfolder of ComfyUI's input directory "
                        "(or an IMAGE batch), crops them square to the training resolution (around the face, "
                        "centred, or letterboxed) and captions them. Unusable files are named in an error "
                        "(or skipped and reported). Outputs the training set, a preview of the exact crops "
                        "and a per-image report.",
            inputs=[
                io.Combo.Input("folder", options=input_subfolders(),
                               tooltip="Subfolder of ComfyUI's input directory holding the subject photos."),
                io.String.Input("instance_prompt", default="a photo of sks dog",
                                tooltip="Prompt with the rare token that names your subject, e.g. "
                                        f"'a photo of sks woman face' (at most {MAX_PROMPT_CHARS:,} "
                                        "characters; CLIP reads 77 tokens)."),
                io.String.Input("class_prompt", default="a photo of dog",
                                tooltip="The same prompt without the token (the subject's class); used "
                                        f"for prior preservation (at most {MAX_PROMPT_CHARS:,} characters)."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64,
                             tooltip="Square training resolution in pixels (multiple of 64; SD1.5: 512)."),
                io.Int.Input("max_images", default=0, min=0, max=MAX_IMAGES,
                             tooltip="Use at most this many images (sorted by file name); 0 = all. A folder "
                                     f"may hold at most {MAX_IMAGES:,} at 512 px (fewer at higher "
                                     "resolutions: the crops stay in memory)."),
                io.Boolean.Input("flip", default=False,
                                 tooltip="Random horizontal flips during training (doubles the views "
                                         "of a symmetric subject)."),
                io.Image.Input("images", optional=True,
                               tooltip="Optional IMAGE batch to train on instead of the folder."),
                io.Combo.Input("crop_mode", optional=True, options=list(CROP_MODES), default="face",
                               tooltip="face: square around the detected face (people, profiles, cats; centre "
                                       "crop when none is found, said in the report). center: largest centred "
                                       "square. pad: whole image letterboxed on white. bucket: each photo to the "
                                       "nearest aspect-ratio bucket of about the square's area (sides multiples of "
                                       "64; at 512: 512x512, 448x576, 384x576 (2:3), 384x640 and their turns), "
                                       "cutting off at most a sliver: portraits keep the whole figure. Batches "
                                       "are drawn within one bucket."),
                io.Combo.Input("caption_mode", optional=True, options=list(CAPTION_MODES), default="instance prompt",
                               tooltip="instance prompt: every image gets it. sidecar .txt: <image name>.txt "
                                       "next to each photo; the instance prompt is prepended where a caption "
                                       "lacks the token (the instance prompt's words missing from the class "
                                       "prompt)."),
                io.Combo.Input("bad_files", optional=True, options=list(BAD_FILE_MODES), default="stop",
                               tooltip="stop: an error lists every unusable file (empty, truncated, not an "
                                       f"image, too small, over {MAX_PIXELS // 1_000_000} megapixels, an over-long "
                                       "caption...) before anything is trained. skip: leave them out and list "
                                       "them in the report."),
                io.Combo.Input("loss_mask", optional=True, options=list(LOSS_MASKS), default="off",
                               tooltip="Masked loss: train on the subject, not the background. face: a soft-edged "
                                       "box around each detected face (the whole image where none is found, said in "
                                       "the report). mask: the loss_masks input (one per photo, white = subject; "
                                       f"paint them in the mask editor) or, unconnected, <folder>/{MASK_FOLDER}/"
                                       "<photo name>.png. The training node's unmasked_weight sets how much the "
                                       "rest counts. off: every pixel counts."),
                io.Mask.Input("loss_masks", optional=True,
                              tooltip="With loss_mask 'mask': one mask per photo (in file-name order, or per "
                                      "image of the images input), each of its photo's aspect ratio; cropped as "
                                      "the photo is."),
                # The inputs above from crop_mode on are optional (with defaults) so API prompts written
                # before they existed still validate.
            ],
            outputs=[
                SUBJECT.Output(display_name="SUBJECT", tooltip="Prepared training set: crops, captions, prompts."),
                io.Image.Output(display_name="crops", tooltip="The exact crops that will be trained on (with "
                                "buckets, each centred on a white canvas of the largest one's size)."),
                io.String.Output(display_name="report",
                                 tooltip="One line per image (crop used, face found or not, caption source, "
                                         "warnings), then skipped files and notes."),
                io.Mask.Output(display_name="loss_masks",
                               tooltip="How much each pixel of each crop counts in the loss (1 everywhere "
                                       "with loss_mask off), placed as the crops are."),
            ],
        )

    @classmethod
    def validate_inputs(cls, resolution, instance_prompt, class_prompt) -> bool | str:
        # Naming an input here turns off ComfyUI's own checks for it: re-check fully. A linked
        # input arrives as None (its value exists only at run time; the engine checks it then).
        try:
            if resolution is not None:
                check_resolution(resolution)
            if instance_prompt is not None:
                check_prompt("instance_prompt", instance_prompt)
            if class_prompt is not None:
                check_prompt("class_prompt", class_prompt, required=False)
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
    def execute(cls, folder, instance_prompt, class_prompt, resolution, max_images, flip, images=None,
                crop_mode="face", caption_mode="instance prompt", bad_files="stop", loss_mask="off",
                loss_masks=None) -> io.NodeOutput:
        tokenizer = tokenizer_dir()
        tokenizer = tokenizer if tokenizer.is_dir() else None
        if loss_masks is not None and loss_mask != "mask":
            raise ValueError(f"the loss_masks input is connected but loss_mask is {loss_mask!r}; set loss_mask to "
                             "'mask' to train with them, or disconnect them")
        masks = list(loss_masks if loss_masks.ndim == 3 else loss_masks[None]) if loss_masks is not None else None
        if images is not None:
            batch = images[:max_images] if max_images > 0 else images
            load = prepare_subject(list(batch), [f"batch[{i}]" for i in range(len(batch))], instance_prompt,
                                   class_prompt, resolution, crop_mode, flip, tokenizer_dir=tokenizer,
                                   loss_mask=loss_mask, masks=masks[:len(batch)] if masks is not None and
                                   max_images > 0 else masks)
        else:
            load = load_subject(resolve_input_folder(folder), instance_prompt, class_prompt, resolution,
                                max_images, flip, crop_mode=crop_mode, caption_mode=caption_mode,
                                on_bad=bad_files, tokenizer_dir=tokenizer, loss_mask=loss_mask,
                                masks=masks)
        subject = load.subject
        crops = _on_canvas(list(subject.images), 1.0)
        shown_masks = _on_canvas([m[..., None] for m in subject.masks] if subject.masks else
                                 [torch.ones(*image.shape[:2], 1) for image in subject.images], 0.0)[..., 0]
        return io.NodeOutput(subject, crops, load.report(), shown_masks)


def _on_canvas(images: list[torch.Tensor], fill: float) -> torch.Tensor:
    """HxWxC images of several sizes (buckets) as one batch: each centred on a canvas of the
    largest height and width, filled with ``fill``; one size: just stacked."""
    height, width = max(i.shape[0] for i in images), max(i.shape[1] for i in images)
    if all(i.shape[:2] == (height, width) for i in images):
        return torch.stack(images)
    batch = torch.full((len(images), height, width, images[0].shape[2]), fill, dtype=torch.float32)
    for k, image in enumerate(images):
        top, left = (height - image.shape[0]) // 2, (width - image.shape[1]) // 2
        batch[k, top:top + image.shape[0], left:left + image.shape[1]] = image
    return batch
