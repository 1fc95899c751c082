"""Full-size random-weight SD1.5 test models, generated once and cached on disk.

The cache folder is $DBS_TEST_MODELS, else <repo>/.cache/test-models. Generation (about 30 s
and 6 GB of RAM, 2.9 GB on disk) happens under an exclusive file lock, so parallel test
sessions and server fixtures can call :func:`ensure_test_models` at the same time; files are
written atomically and regenerated when the generator's version changes.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from .paths import repo_root

logger = logging.getLogger(__name__)


def test_models_dir() -> Path:
    override = os.environ.get("DBS_TEST_MODELS")
    return Path(override).resolve() if override else repo_root() / ".cache" / "test-models"


def _is_current(path: Path, version: str) -> bool:
    from trainers.checkpoint import CheckpointError, read_safetensors_header

    if not path.is_file():
        return False
    try:
        _, metadata, _ = read_safetensors_header(path)
    except (CheckpointError, OSError):
        return False
    return metadata.get("dbs.placeholder_version") == version


def ensure_test_models() -> dict[str, Path]:
    """Paths of the cached random SD1.5 checkpoint and ControlNet, generating them if needed.

    Returns ``{"dir", "checkpoint", "controlnet"}``.
    """
    from trainers import placeholder

    folder = test_models_dir()
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "checkpoint": folder / placeholder.CHECKPOINT_NAME,
        "controlnet": folder / placeholder.CONTROLNET_NAME,
    }
    writers = {
        "checkpoint": placeholder.write_random_sd15_checkpoint,
        "controlnet": placeholder.write_random_controlnet,
    }
    with open(folder / ".generate.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for kind, path in paths.items():
                if _is_current(path, placeholder.PLACEHOLDER_VERSION):
                    continue
                logger.info("generating %s (random full-size SD1.5 %s)", path, kind)
                writers[kind](path, seed=0, size="full", overwrite=path.exists())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return {"dir": folder, **paths}
