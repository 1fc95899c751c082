"""Random-weight SD1.5 models for tests and the offline demo (no weights can be downloaded).

The architecture is exact (full SD1.5 shapes, or the tiny layout), the weights are random and
deterministic by seed. Images sampled from them are noise: they exercise plumbing, formats,
shapes and training, not quality.

``python -m trainers placeholder --out DIR [--tiny] [--seed N]`` (:func:`write_placeholder_models`)
writes ``sd15-random.safetensors`` and ``controlnet-sd15-random.safetensors`` (with ``--tiny``:
``sd15-tiny-random.safetensors`` and ``controlnet-sd15-tiny-random.safetensors``) into DIR,
keeping files that already exist.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..files.fileio import atomic_save_safetensors, refuse_existing
from . import architecture, convert
from .checkpoint import (
    CheckpointError,
    SD15Components,
    build_text_encoder,
    build_unet,
    build_vae,
    load_tokenizer,
    make_noise_scheduler,
    read_safetensors_header,
)

logger = logging.getLogger(__name__)

# Bump when the generated weights change, so caches of generated files can tell stale copies.
PLACEHOLDER_VERSION = "2"

CHECKPOINT_NAME = "sd15-random.safetensors"
CONTROLNET_NAME = "controlnet-sd15-random.safetensors"
TINY_CHECKPOINT_NAME = "sd15-tiny-random.safetensors"
TINY_CONTROLNET_NAME = "controlnet-sd15-tiny-random.safetensors"

# Seed offsets so each component gets its own stream and building one never shifts another.
_UNET_SEED, _VAE_SEED, _TEXT_SEED, _CONTROLNET_SEED = 0, 1, 2, 3
# Standard deviation given to the zero-initialised output convs of a ControlNet, so a random
# ControlNet visibly changes the UNet's output (all-zero outputs would make it a no-op).
CONTROLNET_OUTPUT_STD = 0.02


def _seeded(seed: int, offset: int, factory: Any) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 16 + offset)
        return factory()


def random_unet(size: str = "full", seed: int = 0) -> Any:
    return _seeded(seed, _UNET_SEED, lambda: build_unet(architecture.unet_config(size)))


def random_vae(size: str = "full", seed: int = 0) -> Any:
    return _seeded(seed, _VAE_SEED, lambda: build_vae(architecture.vae_config(size)))


def random_text_encoder(size: str = "full", seed: int = 0) -> Any:
    return _seeded(seed, _TEXT_SEED, lambda: build_text_encoder(architecture.text_encoder_config(size)))


def random_controlnet(size: str = "full", seed: int = 0) -> Any:
    """A diffusers ControlNetModel for the SD1.5 UNet, with its zero convs made non-zero."""
    from diffusers import ControlNetModel

    def build() -> Any:
        model = ControlNetModel(**architecture.controlnet_config(size))
        zero_initialised = [
            *model.controlnet_down_blocks,
            model.controlnet_mid_block,
            model.controlnet_cond_embedding.conv_out,
        ]
        with torch.no_grad():
            for module in zero_initialised:
                module.weight.normal_(0.0, CONTROLNET_OUTPUT_STD)
                module.bias.normal_(0.0, CONTROLNET_OUTPUT_STD)
        return model.eval()

    return _seeded(seed, _CONTROLNET_SEED, build)


def tiny_sd15(seed: int = 0, tokenizer_dir: str | os.PathLike | None = None) -> SD15Components:
    """Tiny SD1.5-shaped models in memory, for fast tests; tokenizer None without a folder."""
    return SD15Components(
        unet=random_unet("tiny", seed),
        vae=random_vae("tiny", seed),
        text_encoder=random_text_encoder("tiny", seed),
        tokenizer=load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None,
        noise_scheduler=make_noise_scheduler(),
        size="tiny",
        source=f"random tiny SD1.5, seed {seed}",
    )


def _placeholder_metadata(kind: str, size: str, seed: int) -> dict[str, str]:
    return {
        "format": "pt",
        "dbs.placeholder": f"random-weight {size} SD1.5 {kind} for tests; generates noise",
        "dbs.placeholder_version": PLACEHOLDER_VERSION,
        "dbs.seed": str(seed),
    }


def write_random_sd15_checkpoint(
    path: str | os.PathLike, seed: int = 0, size: str = "full", overwrite: bool = False
) -> Path:
    """Write a random-weight SD1.5 single-file checkpoint (LDM keys, fp16), atomically.

    Components are built in fp32 one at a time and dropped once converted, so peak memory is
    about one fp32 UNet plus the fp16 file contents (~5.5 GB for the full size).
    """
    path = Path(path)
    refuse_existing(path, overwrite)
    started = time.monotonic()
    state: dict[str, torch.Tensor] = {}
    parts = (
        (convert.UNET_PREFIX, random_unet, convert.unet_diffusers_to_ldm, architecture.unet_config),
        (convert.VAE_PREFIX, random_vae, convert.vae_diffusers_to_ldm, architecture.vae_config),
        (
            convert.TEXT_ENCODER_PREFIX,
            random_text_encoder,
            convert.text_encoder_diffusers_to_ldm,
            architecture.text_encoder_config,
        ),
    )
    for prefix, build, to_ldm, config in parts:
        model = build(size, seed)
        for key, tensor in to_ldm(model.state_dict(), config(size)).items():
            state[prefix + key] = tensor.detach().to(torch.float16).contiguous()
        del model
        gc.collect()
    atomic_save_safetensors(state, path, _placeholder_metadata("checkpoint", size, seed), overwrite=overwrite)
    del state
    gc.collect()
    logger.info(
        "wrote %s: random %s SD1.5 checkpoint, %.1f MB, in %.1f s",
        path,
        size,
        path.stat().st_size / 1e6,
        time.monotonic() - started,
    )
    return path


def write_random_controlnet(
    path: str | os.PathLike, seed: int = 0, size: str = "full", overwrite: bool = False
) -> Path:
    """Write a random-weight SD1.5 ControlNet (diffusers keys, fp16, one file), atomically."""
    path = Path(path)
    refuse_existing(path, overwrite)
    started = time.monotonic()
    model = random_controlnet(size, seed)
    state = {
        key: tensor.detach().to(torch.float16).contiguous() for key, tensor in model.state_dict().items()
    }
    del model
    gc.collect()
    atomic_save_safetensors(state, path, _placeholder_metadata("controlnet", size, seed), overwrite=overwrite)
    del state
    logger.info(
        "wrote %s: random %s SD1.5 ControlNet, %.1f MB, in %.1f s",
        path,
        size,
        path.stat().st_size / 1e6,
        time.monotonic() - started,
    )
    return path


def _is_current(path: Path, seed: int) -> bool:
    if not path.is_file():
        return False
    try:
        _, metadata, _ = read_safetensors_header(path)
    except (CheckpointError, OSError):
        return False
    return (metadata.get("dbs.placeholder_version") == PLACEHOLDER_VERSION
            and metadata.get("dbs.seed") == str(seed))


def write_placeholder_models(
    out_dir: str | os.PathLike, tiny: bool = False, seed: int = 0
) -> dict[str, Path]:
    """The checkpoint and ControlNet in ``out_dir``, written unless a current copy is there.

    Safe for concurrent callers (tests, servers, the demo): generation runs under an exclusive
    lock on ``out_dir/.generate.lock``; files of an older generator version are replaced.
    """
    import fcntl

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    size = "tiny" if tiny else "full"
    paths = {
        "checkpoint": folder / (TINY_CHECKPOINT_NAME if tiny else CHECKPOINT_NAME),
        "controlnet": folder / (TINY_CONTROLNET_NAME if tiny else CONTROLNET_NAME),
    }
    writers = {"checkpoint": write_random_sd15_checkpoint, "controlnet": write_random_controlnet}
    with open(folder / ".generate.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for kind, path in paths.items():
                if _is_current(path, seed):
                    logger.info("keeping existing %s", path)
                    continue
                logger.info("generating %s (random %s SD1.5 %s)", path, size, kind)
                writers[kind](path, seed=seed, size=size, overwrite=path.exists())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return paths
