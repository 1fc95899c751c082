"""What a trained file says about itself: the run fingerprint, provenance and training metadata,
written the same way for LoRA and DreamBooth files and read back (loss curves, reuse checks).

- :func:`run_fingerprint`: SHA-256 of everything that decides what a run produces (engine
  version, base-model content, subject, training identity of the config, class images). Stored
  as ``dbs.fingerprint``; a file holding the fingerprint of a requested run is reused.
- :class:`Provenance`: where a run came from (base model, its hash, the fingerprint, where the
  class images came from). Computed once by the job and handed to the save functions.
- :func:`training_metadata`: the kohya ``ss_*`` keys that model viewers show and our ``dbs.*``
  keys, from the config, the subject and the loss history. Deterministic: no timing, so the same
  seed gives a byte-identical file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.subject import SubjectData
from ..sd15.checkpoint import CheckpointError, read_safetensors_header
from .callbacks import LossHistory
from .config import DreamBoothTrainConfig, LoRATrainConfig
from .loop import mixed_precision_name

TrainConfig = LoRATrainConfig | DreamBoothTrainConfig

# Bump a method's version when a change to its engine changes what identical inputs train to:
# every file of the old version then stops being reused.
ENGINES = {"lora": "lora-1", "dreambooth": "dreambooth-1"}
_COMMENTS = {"lora": "DreamBooth Studio LoRA", "dreambooth": "DreamBooth Studio"}


def run_fingerprint(base_fingerprint: str, subject: SubjectData, config: TrainConfig, class_source: str = "") -> str:
    """SHA-256 of a run: same engine, base model, subject, config and class images -> same file.

    ``class_source`` identifies the class images (a generated set's key, or a folder's subject
    fingerprint); it is ignored when prior preservation is off.
    """
    payload = {
        "engine": ENGINES[config.method],
        "base": base_fingerprint,
        "subject": subject.fingerprint(),
        "config": config.training_identity(),
        "class_source": class_source if config.with_prior else "",
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Provenance:
    """Where a run came from. Empty for a run made outside a job (nothing to reuse it by)."""

    base_model: str = ""  # file or folder name of the base model
    base_fingerprint: str = ""
    fingerprint: str = ""  # run_fingerprint(...); "" = not reusable
    prior_info: dict[str, str] = field(default_factory=dict)  # where the class images came from

    @classmethod
    def of_run(cls, base_model: str, base_fingerprint: str, subject: SubjectData, config: TrainConfig,
               class_source: str = "", prior_info: Mapping[str, str] | None = None) -> Provenance:
        return cls(base_model=base_model, base_fingerprint=base_fingerprint,
                   fingerprint=run_fingerprint(base_fingerprint, subject, config, class_source),
                   prior_info=dict(prior_info or {}))

    def metadata(self) -> dict[str, str]:
        metadata = {
            "ss_sd_model_name": self.base_model,
            "dbs.base_model": self.base_model,
            "dbs.base_fingerprint": self.base_fingerprint,
            "dbs.prior": json.dumps(self.prior_info, sort_keys=True) if self.prior_info else "",
        }
        if self.fingerprint:
            metadata["dbs.fingerprint"] = self.fingerprint
        return metadata


def _rounded(values: list[float]) -> str:
    return json.dumps([float(f"{v:.5g}") for v in values])


def training_metadata(config: TrainConfig, subject: SubjectData, history: LossHistory, device: torch.device,
                      autocast_dtype: torch.dtype | None, class_count: int,
                      extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The metadata every trained file carries; ``extra`` adds the method's own keys."""
    losses = history.losses
    metadata = {
        # kohya sd-scripts keys, read by A1111/Forge's and ComfyUI-side metadata viewers
        "ss_training_comment": f"{_COMMENTS[config.method]}; instance prompt: {subject.instance_prompt}",
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_resolution": f"({subject.resolution}, {subject.resolution})",
        "ss_num_train_images": str(len(subject)),
        "ss_num_reg_images": str(class_count),
        "ss_prior_loss_weight": f"{config.prior_loss_weight:g}" if class_count else "0",
        "ss_max_train_steps": str(config.steps),
        "ss_steps": str(len(losses)),
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_learning_rate": f"{config.unet_lr:g}",
        "ss_unet_lr": f"{config.unet_lr:g}",
        "ss_text_encoder_lr": f"{config.text_encoder_lr:g}",
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_seed": str(config.seed),
        "ss_mixed_precision": mixed_precision_name(autocast_dtype),
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_cache_latents": str(config.cache_latents),
        "ss_max_grad_norm": f"{config.max_grad_norm:g}",
        "ss_noise_offset": f"{config.noise_offset:g}",
        "ss_min_snr_gamma": f"{config.min_snr_gamma:g}",
        "ss_flip_aug": str(subject.flip),
        "ss_clip_skip": "1",
        # ours
        "dbs.kind": config.method,
        "dbs.engine": ENGINES[config.method],
        "dbs.config": config.to_json(),
        "dbs.subject_fingerprint": subject.fingerprint(),
        "dbs.instance_prompt": subject.instance_prompt,
        "dbs.class_prompt": subject.class_prompt,
        "dbs.captions": json.dumps(sorted(set(subject.captions))),
        "dbs.source_names": json.dumps(list(subject.source_names)),
        "dbs.steps_done": str(len(losses)),
        "dbs.losses": _rounded(losses),
        "dbs.instance_losses": _rounded(history.instance_losses),
        "dbs.prior_losses": _rounded(history.prior_losses),
        "dbs.final_loss": f"{losses[-1]:.6g}" if losses else "",
        "dbs.device": device.type,
        **Provenance().metadata(),
    }
    metadata.update(extra or {})
    return metadata


def read_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    """The metadata of a safetensors file (header only), or None when it cannot be read as one."""
    try:
        _, metadata, _ = read_safetensors_header(Path(path))
    except (CheckpointError, OSError, ValueError):
        return None
    return metadata


def history_from_metadata(metadata: Mapping[str, str]) -> LossHistory:
    """The loss curves a file recorded (empty lists where it recorded none)."""
    curves = []
    for key in ("dbs.losses", "dbs.instance_losses", "dbs.prior_losses"):
        try:
            curves.append([float(v) for v in json.loads(metadata.get(key) or "[]")])
        except (ValueError, TypeError):
            curves.append([])
    return LossHistory(*curves)
