"""What a trained file says about itself: the run fingerprint, provenance and training metadata,
written the same way for LoRA and DreamBooth files and read back (loss curves, reuse checks).

- :func:`run_fingerprint`: SHA-256 of everything that decides what a run produces (engine
  version, base-model content, subject, training identity of the config on the device it trains
  on, class images). Stored as ``dbs.fingerprint``; a file holding the fingerprint of a requested
  run is reused. The identity holds the precision as resolved on the device: ``auto`` on a CPU is
  the same run as ``fp32`` (and files trained with ``fp32`` before ``auto`` existed are reused).
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
from .parallel import launched_world

TrainConfig = LoRATrainConfig | DreamBoothTrainConfig

# Bump a method's version when a change to its engine changes what identical inputs train to:
# every file of the old version then stops being reused.
ENGINES = {"lora": "lora-1", "dreambooth": "dreambooth-1"}
_COMMENTS = {"lora": "DreamBooth Studio LoRA", "dreambooth": "DreamBooth Studio"}


def run_fingerprint(base_fingerprint: str, subject: SubjectData, config: TrainConfig, class_source: str = "",
                    device: torch.device | str | None = None, processes: int = 1) -> str:
    """SHA-256 of a run: same engine, base model, subject, config and class images -> same file.

    ``class_source`` identifies the class images (a generated set's key, or a folder's subject
    fingerprint); it is ignored when prior preservation is off. ``device`` is where the run
    trains (None: the CPU); it resolves precision ``auto``. ``processes`` data-parallel
    processes multiply the batch: the identity holds the global batch, so a run split over
    processes or accumulation steps differently is the same job.
    """
    payload = {
        "engine": ENGINES[config.method],
        "base": base_fingerprint,
        "subject": subject.fingerprint(),
        "config": config.training_identity(device, processes),
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
               class_source: str = "", prior_info: Mapping[str, str] | None = None,
               device: torch.device | str | None = None, processes: int = 1) -> Provenance:
        """The provenance of a run that trains on ``device`` (None: the CPU) in ``processes`` processes."""
        return cls(base_model=base_model, base_fingerprint=base_fingerprint,
                   fingerprint=run_fingerprint(base_fingerprint, subject, config, class_source, device, processes),
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


# ComfyUI's /view_metadata reads headers up to 1 MiB and model viewers choke on more: a file's
# metadata stays under METADATA_LIMIT bytes (checked before training), loss curves included.
METADATA_LIMIT = 256 * 1024
# Loss curves longer than this are stored as means of equal runs of steps ("dbs.loss_stride").
MAX_CURVE_POINTS = 2000
# Validation curves longer than this keep this many points (the first, the last, evenly between).
MAX_VALIDATION_POINTS = 200
_WORST_LOSS = -1.2345e-10  # the longest number a stored loss can print as


def _bucket_info(subject: SubjectData) -> str:
    """kohya's ss_bucket_info: {"buckets": {"0": {"resolution": [w, h], "count": n}, ...}}."""
    counts: dict[tuple[int, int], int] = {}
    for height, width in subject.sizes():
        counts[(width, height)] = counts.get((width, height), 0) + 1
    buckets = {str(i): {"resolution": list(size), "count": n} for i, (size, n) in enumerate(sorted(counts.items()))}
    return json.dumps({"buckets": buckets})  # kohya's mean_img_ar_error left out: the photos' own ratios are gone


def _curve_stride(steps: int) -> int:
    return max(1, -(-steps // MAX_CURVE_POINTS))


def _rounded(values: list[float], stride: int = 1) -> str:
    if stride > 1:
        values = [sum(chunk) / len(chunk) for chunk in (values[i:i + stride] for i in range(0, len(values), stride))]
    return json.dumps([float(f"{v:.5g}") for v in values])


def _thinned(points: list) -> list:
    """At most MAX_VALIDATION_POINTS of ``points``: the first, the last, evenly between."""
    if len(points) <= MAX_VALIDATION_POINTS:
        return points
    last = len(points) - 1
    keep = sorted({round(i * last / (MAX_VALIDATION_POINTS - 1)) for i in range(MAX_VALIDATION_POINTS)})
    return [points[i] for i in keep]


def _validation_json(points: list[tuple[int, float]]) -> str:
    """``[[step, loss], ...]`` with at most MAX_VALIDATION_POINTS points, losses to 5 digits."""
    return json.dumps([[int(step), float(f"{loss:.5g}")] for step, loss in _thinned(points)])


def fidelity_json(points: list[tuple[int, dict[str, float]]]) -> str:
    """``dbs.fidelity``: the scored sample rounds as ``[[step, DINO, CLIP-I, CLIP-T], ...]``, at
    most MAX_VALIDATION_POINTS of them (the first, the last, evenly between)."""
    points = _thinned(points)
    return json.dumps([[int(step), *(float(f"{scores[k]:.6g}") for k in ("dino", "clip_i", "clip_t"))]
                       for step, scores in points], separators=(",", ":"))


def _source_metadata(subject: SubjectData, record_sources: bool) -> dict[str, str]:
    """Photo names and captions only when the user asked for them; otherwise their count and a
    hash (which tells whether two files were trained on the same data, and nothing else)."""
    if record_sources:
        return {"dbs.captions": json.dumps(sorted(set(subject.captions))),
                "dbs.source_names": json.dumps(list(subject.source_names))}
    return {"dbs.captions": json.dumps({"count": len(set(subject.captions)), "recorded": False}),
            "dbs.source_names": json.dumps({"count": len(subject.source_names), "recorded": False})}


def training_metadata(config: TrainConfig, subject: SubjectData, history: LossHistory, device: torch.device,
                      autocast_dtype: torch.dtype | None, class_count: int,
                      extra: Mapping[str, str] | None = None, processes: int | None = None) -> dict[str, str]:
    """The metadata every trained file carries; ``extra`` adds the method's own keys. ``processes``:
    the data-parallel processes of the run (default: of this launch)."""
    if processes is None:
        processes = launched_world()
    losses = history.losses
    stride = _curve_stride(len(losses))
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
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation),
        "ss_total_batch_size": str(config.global_batch(processes)),
        "dbs.processes": str(processes),
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
        # kohya's caption options, when on
        **({"ss_caption_dropout_rate": f"{config.caption_dropout:g}"} if config.caption_dropout else {}),
        **({"ss_shuffle_caption": "True", "ss_keep_tokens": str(config.keep_tags)} if config.shuffle_tags else {}),
        # aspect-ratio buckets and masked loss, when on (kohya's keys, and the images per bucket)
        **({"ss_enable_bucket": "True", "ss_bucket_info": _bucket_info(subject)} if subject.bucketed else {}),
        **({"ss_masked_loss": "True", "dbs.unmasked_weight": f"{config.unmasked_weight:g}"} if subject.masks else {}),
        "ss_clip_skip": "1",
        # ours
        "dbs.kind": config.method,
        "dbs.engine": ENGINES[config.method],
        "dbs.config": config.to_json(),
        "dbs.subject_fingerprint": subject.fingerprint(),
        "dbs.instance_prompt": subject.instance_prompt,
        "dbs.class_prompt": subject.class_prompt,
        **_source_metadata(subject, getattr(config, "record_sources", False)),
        "dbs.steps_done": str(len(losses)),
        "dbs.losses": _rounded(losses, stride),
        "dbs.instance_losses": _rounded(history.instance_losses, stride),
        "dbs.prior_losses": _rounded(history.prior_losses, stride),
        "dbs.final_loss": f"{losses[-1]:.6g}" if losses else "",
        "dbs.device": device.type,
        **Provenance().metadata(),
    }
    if stride > 1:
        metadata["dbs.loss_stride"] = str(stride)
    if history.validation:  # only runs that computed it: other files stay as they were
        metadata["dbs.validation_loss"] = _validation_json(history.validation)
    metadata.update(extra or {})
    return metadata


def check_metadata_size(config: TrainConfig, subject: SubjectData, provenance: Provenance,
                        class_count: int = 0) -> int:
    """The most metadata bytes the run's file can carry (its loss curves at their longest);
    raises ValueError before training when that is over METADATA_LIMIT."""
    worst = [_WORST_LOSS] * config.steps
    validation = [(config.steps, _WORST_LOSS)] * min(config.steps + 1, MAX_VALIDATION_POINTS)
    history = LossHistory(worst, worst, worst if config.with_prior else [], validation)
    fidelity = [(config.steps, {"dino": _WORST_LOSS, "clip_i": _WORST_LOSS, "clip_t": _WORST_LOSS})]
    metadata = training_metadata(config, subject, history, torch.device("cpu"), torch.bfloat16, class_count,
                                 {"dbs.method_keys": "x" * 4096,  # room for each method's own keys
                                  "dbs.fidelity": fidelity_json(fidelity * MAX_VALIDATION_POINTS)})
    metadata.update(provenance.metadata())
    size = len(json.dumps(metadata, ensure_ascii=False).encode("utf-8"))
    if size > METADATA_LIMIT:
        biggest = max(metadata, key=lambda key: len(metadata[key]))
        hint = ("turn off record_sources (it writes every caption and file name) or shorten the captions"
                if biggest in ("dbs.captions", "dbs.source_names") else "shorten the prompts and captions")
        raise ValueError(
            f"the trained file's metadata would be {size / 1024:.0f} KiB ({biggest} is the largest part); files "
            f"carry at most {METADATA_LIMIT // 1024} KiB so that ComfyUI and model viewers can read them: {hint}")
    return size


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
    try:
        stride = max(1, int(metadata.get("dbs.loss_stride") or 1))
    except ValueError:
        stride = 1
    for key in ("dbs.losses", "dbs.instance_losses", "dbs.prior_losses"):
        try:
            stored = [float(v) for v in json.loads(metadata.get(key) or "[]")]
        except (ValueError, TypeError):
            stored = []
        curves.append([v for v in stored for _ in range(stride)])  # one value per step again (a step curve)
    if stride > 1:
        steps = metadata.get("dbs.steps_done", "")
        if steps.isdigit():
            curves = [curve[:int(steps)] for curve in curves]
    return LossHistory(*curves, validation=_validation_points(metadata.get("dbs.validation_loss")))


def _validation_points(text: str | None) -> list[tuple[int, float]]:
    """The (step, loss) pairs of ``dbs.validation_loss``; malformed entries are left out."""
    try:
        stored = json.loads(text or "[]")
    except ValueError:
        return []
    points = []
    for entry in stored if isinstance(stored, list) else []:
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int) \
                and isinstance(entry[1], (int, float)) and not isinstance(entry[1], bool):
            points.append((entry[0], float(entry[1])))
    return points
