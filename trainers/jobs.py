"""Whole training jobs: check everything, load the base model, train, write the file.

Shared by the ComfyUI nodes and the command line. Every check that can fail on user input runs
before the base model is loaded, and nothing is written unless training finished with finite
weights. A file that already holds the result of the identical job is reused, not retrained
(ComfyUI may re-run a node whose cached output it evicted).
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """Content hash of a (large) file, remembered per (path, size, mtime) for this process."""
    from .fileio import sha256_file

    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASH_MEMO:
        _HASH_MEMO[key] = sha256_file(path)
    return _HASH_MEMO[key]


@dataclass
class LoRAJobResult:
    path: Path
    state_dict: dict
    losses: list[float]
    reused: bool
    prior: PriorPlan | None = None
    instance_losses: list[float] = field(default_factory=list)
    prior_losses: list[float] = field(default_factory=list)

    def extra_curves(self) -> dict[str, list[float]]:
        if not self.prior_losses:
            return {}
        return {"instance": self.instance_losses, "prior": self.prior_losses}


def read_lora_file(path: Path) -> tuple[dict, dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    return load_file(str(path)), metadata


def existing_result(path: Path, fingerprint: str, overwrite: bool) -> LoRAJobResult | None:
    """The reusable result at `path`, None when there is nothing to reuse, or an error when
    `path` holds something else and overwrite is off."""
    if not path.exists():
        return None
    try:
        tensors, metadata = read_lora_file(path)
    except Exception:  # an unreadable file is never reused
        tensors, metadata = None, {}
    if tensors is not None and metadata.get("dbs.fingerprint") == fingerprint:
        from .dreambooth import curves_from_metadata

        curves = curves_from_metadata(metadata)
        log.info("reusing %s: it holds the result of this exact training job", path.name)
        return LoRAJobResult(path=path, state_dict=tensors, losses=curves["loss"], reused=True,
                             instance_losses=curves["instance"], prior_losses=curves["prior"])
    if overwrite:
        return None
    raise FileExistsError(
        f"{path.name} already exists in {path.parent} and was trained differently: choose another "
        "output name or enable overwrite")


# -- prior preservation: which class images, decided before any model loads -----------------------


@dataclass
class PriorPlan:
    """The class images a job will train with (nothing when prior preservation is off)."""

    enabled: bool
    source: str = ""  # identity for the job fingerprint: generated set key or folder fingerprint
    folder_subject: object = None  # SubjectData of a user's class folder, loaded up front
    spec: object = None  # ClassImageSpec to generate (or reuse from the cache)
    cached: object = None  # ClassImageSet already in the cache
    report: str = "prior preservation off"
    weight: float = 0.0  # prior_loss_weight
    generated: int = 0
    folder: Path | None = None

    def info(self) -> dict[str, str]:
        if not self.enabled:
            return {}
        if self.spec is not None:
            spec = self.spec
            return {"source": "generated", "prompt": spec.prompt, "count": str(spec.count),
                    "resolution": str(spec.resolution), "seed": str(spec.seed), "steps": str(spec.steps),
                    "guidance": f"{spec.guidance:g}", "folder": self.folder.name if self.folder else ""}
        return {"source": "folder", "folder": str(self.folder.name if self.folder else ""),
                "count": str(len(self.folder_subject))}


def plan_prior(config, subject, base_fingerprint: str, class_cache_dir, class_folder,
               tokenizer_dir=None) -> PriorPlan:
    """Check the prior-preservation inputs and find cached class images, without loading a model."""
    from .prior import ClassImageSpec, class_subject, find_class_images

    if not config.with_prior:
        if class_folder is not None:
            log.info("class folder %s not used: prior preservation is off (class_images 0 or prior_loss_weight 0)",
                     Path(class_folder).name)
        return PriorPlan(enabled=False)
    if not subject.class_prompt.strip():
        raise ValueError(
            "prior preservation needs a class prompt (e.g. 'a photo of woman face'): set class_prompt on Load "
            "Subject Images, or set class_images to 0 to train without class images")
    if class_folder is not None:
        folder = Path(class_folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"class image folder {folder} not found")
        data = class_subject(folder, subject.class_prompt, subject.resolution, max_images=config.class_images,
                             tokenizer_dir=tokenizer_dir)
        return PriorPlan(enabled=True, source="folder:" + data.fingerprint(), folder_subject=data, folder=folder,
                         weight=config.prior_loss_weight,
                         report=f"prior preservation: {len(data)} class images from folder {folder.name} "
                                f"(captioned {subject.class_prompt!r}), loss weight {config.prior_loss_weight:g}")
    if class_cache_dir is None:
        raise ValueError("prior preservation needs a class image cache folder or a class image folder")
    spec = ClassImageSpec(base_fingerprint=base_fingerprint, prompt=subject.class_prompt, count=config.class_images,
                          resolution=subject.resolution, seed=config.class_seed, steps=config.class_steps,
                          guidance=config.class_guidance)
    cached = find_class_images(class_cache_dir, spec)
    return PriorPlan(enabled=True, source="generated:" + spec.key(), spec=spec, cached=cached,
                     folder=Path(class_cache_dir) / spec.folder_name(), weight=config.prior_loss_weight,
                     report=f"prior preservation: {spec.count} class images of {spec.prompt!r} at "
                            f"{spec.resolution} px, {'in the cache' if cached else 'not generated yet'} "
                            f"({spec.folder_name()}), loss weight {config.prior_loss_weight:g}")


def realize_prior(plan: PriorPlan, base, class_cache_dir, callbacks, tokenizer_dir=None):
    """The class images as a SubjectData (generating them with `base` if not cached), or None."""
    from .prior import class_subject, generate_class_images

    if not plan.enabled:
        return None
    if plan.folder_subject is not None:
        return plan.folder_subject
    spec = plan.spec
    on_step = getattr(callbacks, "on_generate_step", None) if callbacks is not None else None
    made = plan.cached or generate_class_images(base, spec, class_cache_dir, on_step=on_step)
    plan.generated = made.generated
    plan.folder = made.folder
    plan.report = (f"prior preservation: {spec.count} class images of {spec.prompt!r} at {spec.resolution} px, "
                   f"{'reused from the cache' if made.reused else 'generated now'} ({made.folder.name}), "
                   f"loss weight {plan.weight:g}")
    return class_subject(made.folder, spec.prompt, spec.resolution, tokenizer_dir=tokenizer_dir)


def train_lora_file(checkpoint: str | os.PathLike, subject, config, output_path: str | os.PathLike,
                    tokenizer_dir: str | os.PathLike, overwrite: bool = False, callbacks=None,
                    before_load=None, class_cache_dir=None, class_folder=None) -> LoRAJobResult:
    """Train a LoRA of `checkpoint` on `subject` and write it to `output_path` (kohya format).

    `before_load` runs after all checks pass and before the base model loads (ComfyUI frees its
    own models there). With prior preservation on, class images come from `class_folder` or are
    generated into (and reused from) `class_cache_dir`.
    """
    from .checkpoint import describe_checkpoint, load_sd15_single_file
    from .lora import lora_fingerprint, save_lora, train_lora

    checkpoint, output_path = Path(checkpoint), Path(output_path)
    describe_checkpoint(checkpoint)  # cheap header check: SD1.5 or a clear error
    if not subject.images:
        raise ValueError("the subject has no images")
    base_fingerprint = file_sha256(checkpoint)
    plan = plan_prior(config, subject, base_fingerprint, class_cache_dir, class_folder, tokenizer_dir)
    fingerprint = lora_fingerprint(base_fingerprint, subject, config, plan.source)
    reused = existing_result(output_path, fingerprint, overwrite)
    if reused is not None:
        reused.prior = plan
        return reused
    if before_load is not None:
        before_load()
    base = load_sd15_single_file(checkpoint, tokenizer_dir)
    try:
        class_data = realize_prior(plan, base, class_cache_dir, callbacks, tokenizer_dir)
        result = train_lora(base, subject, config, callbacks=callbacks, base_model_name=checkpoint.name,
                            base_fingerprint=base_fingerprint, class_subject=class_data,
                            class_source=plan.source, class_info=plan.info())
    finally:
        del base
        gc.collect()
    path = save_lora(result, output_path, overwrite=overwrite)
    # Hand on exactly what the file holds (fp16), so a later run that reuses the file is identical.
    tensors, _ = read_lora_file(Path(path))
    return LoRAJobResult(path=Path(path), state_dict=tensors, losses=result.losses, reused=False, prior=plan,
                         instance_losses=result.instance_losses, prior_losses=result.prior_losses)


# -- DreamBooth ------------------------------------------------------------------------------------


@dataclass
class DreamBoothJobResult:
    path: Path
    losses: list[float]
    instance_losses: list[float]
    prior_losses: list[float]
    reused: bool
    prior: PriorPlan

    @property
    def class_report(self) -> str:
        return self.prior.report

    def extra_curves(self) -> dict[str, list[float]]:
        if not self.prior_losses:
            return {}
        return {"instance": self.instance_losses, "prior": self.prior_losses}


def existing_checkpoint(path: Path, fingerprint: str, overwrite: bool) -> dict[str, str] | None:
    """The metadata of a checkpoint at `path` holding this exact job's result, None when there is
    nothing to reuse, or FileExistsError when `path` holds something else and overwrite is off."""
    from .checkpoint import CheckpointError, read_safetensors_header

    if not path.exists():
        return None
    try:
        _, metadata, _ = read_safetensors_header(path)
    except (CheckpointError, OSError, ValueError):
        metadata = {}
    if metadata.get("dbs.fingerprint") == fingerprint:
        log.info("reusing %s: it holds the result of this exact training job", path.name)
        return metadata
    if overwrite:
        return None
    raise FileExistsError(
        f"{path.name} already exists in {path.parent} and was trained differently: choose another "
        "output name or enable overwrite")


def train_dreambooth_file(checkpoint: str | os.PathLike, subject, config, output_path: str | os.PathLike,
                          tokenizer_dir: str | os.PathLike, overwrite: bool = False, callbacks=None,
                          before_load=None, class_cache_dir=None, class_folder=None,
                          device=None) -> DreamBoothJobResult:
    """DreamBooth-train `checkpoint` on `subject` and save a single-file checkpoint at `output_path`.

    Every input check runs before the base model loads; nothing is written unless training ends
    with finite weights; a file holding this exact job's result is reused.
    """
    from .checkpoint import describe_checkpoint, load_sd15_single_file
    from .dreambooth import curves_from_metadata, dreambooth_fingerprint, save_dreambooth, train_dreambooth

    checkpoint, output_path = Path(checkpoint), Path(output_path)
    if output_path.suffix != ".safetensors":
        raise ValueError(f"checkpoint file name must end in .safetensors, got {output_path.name}")
    if not output_path.parent.is_dir():
        raise FileNotFoundError(f"output folder {output_path.parent} does not exist")
    describe_checkpoint(checkpoint)
    if not subject.images:
        raise ValueError("the subject has no images")
    base_fingerprint = file_sha256(checkpoint)
    plan = plan_prior(config, subject, base_fingerprint, class_cache_dir, class_folder, tokenizer_dir)
    fingerprint = dreambooth_fingerprint(base_fingerprint, subject, config, plan.source)
    metadata = existing_checkpoint(output_path, fingerprint, overwrite)
    if metadata is not None:
        curves = curves_from_metadata(metadata)
        plan.report = f"checkpoint reused, no class images needed; {plan.report}" if plan.enabled else plan.report
        return DreamBoothJobResult(path=output_path, losses=curves["loss"], instance_losses=curves["instance"],
                                   prior_losses=curves["prior"], reused=True, prior=plan)
    if before_load is not None:
        before_load()
    base = load_sd15_single_file(checkpoint, tokenizer_dir)
    try:
        if device is not None:
            for model in (base.unet, base.vae, base.text_encoder):
                model.to(device)
        class_data = realize_prior(plan, base, class_cache_dir, callbacks, tokenizer_dir)
        result = train_dreambooth(base, subject, config, callbacks=callbacks, class_subject=class_data,
                                  base_model_name=checkpoint.name, base_fingerprint=base_fingerprint,
                                  class_source=plan.source, class_info=plan.info())
        path = save_dreambooth(base, result, output_path, config.save_precision, overwrite=overwrite)
    finally:
        del base
        gc.collect()
    return DreamBoothJobResult(path=Path(path), losses=result.losses, instance_losses=result.instance_losses,
                               prior_losses=result.prior_losses, reused=False, prior=plan)
