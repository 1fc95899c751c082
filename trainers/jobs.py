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
from dataclasses import dataclass
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
        from .lora import losses_from_metadata

        losses = losses_from_metadata(metadata)
        log.info("reusing %s: it holds the result of this exact training job", path.name)
        return LoRAJobResult(path=path, state_dict=tensors, losses=losses, reused=True)
    if overwrite:
        return None
    raise FileExistsError(
        f"{path.name} already exists in {path.parent} and was trained differently: choose another "
        "output name or enable overwrite")


def train_lora_file(checkpoint: str | os.PathLike, subject, config, output_path: str | os.PathLike,
                    tokenizer_dir: str | os.PathLike, overwrite: bool = False, callbacks=None,
                    before_load=None) -> LoRAJobResult:
    """Train a LoRA of `checkpoint` on `subject` and write it to `output_path` (kohya format).

    `before_load` runs after all checks pass and before the base model loads (ComfyUI frees its
    own models there).
    """
    from .checkpoint import describe_checkpoint, load_sd15_single_file
    from .lora import lora_fingerprint, save_lora, train_lora

    checkpoint, output_path = Path(checkpoint), Path(output_path)
    describe_checkpoint(checkpoint)  # cheap header check: SD1.5 or a clear error
    if not subject.images:
        raise ValueError("the subject has no images")
    base_fingerprint = file_sha256(checkpoint)
    fingerprint = lora_fingerprint(base_fingerprint, subject, config)
    reused = existing_result(output_path, fingerprint, overwrite)
    if reused is not None:
        return reused
    if before_load is not None:
        before_load()
    base = load_sd15_single_file(checkpoint, tokenizer_dir)
    try:
        result = train_lora(base, subject, config, callbacks=callbacks, base_model_name=checkpoint.name,
                            base_fingerprint=base_fingerprint)
    finally:
        del base
        gc.collect()
    path = save_lora(result, output_path, overwrite=overwrite)
    # Hand on exactly what the file holds (fp16), so a later run that reuses the file is identical.
    tensors, _ = read_lora_file(Path(path))
    return LoRAJobResult(path=Path(path), state_dict=tensors, losses=result.losses, reused=False)
