"""Full-size random-weight SD1.5 test models, generated once and cached on disk.

The cache folder is $DBS_TEST_MODELS, else <repo>/.cache/test-models (the demo uses the same
folder). Generation takes about 30 s and 6 GB of RAM and writes 2.9 GB; it runs under a file
lock, so parallel test sessions, server fixtures and the demo can ask at the same time.
"""

from __future__ import annotations

import os
from pathlib import Path

from .paths import repo_root


def test_models_dir() -> Path:
    override = os.environ.get("DBS_TEST_MODELS")
    return Path(override).resolve() if override else repo_root() / ".cache" / "test-models"


def ensure_test_models() -> dict[str, Path]:
    """``{"dir", "checkpoint", "controlnet"}``: the cached models, generated if missing or stale."""
    from trainers.sd15.placeholder import write_placeholder_models

    folder = test_models_dir()
    return {"dir": folder, **write_placeholder_models(folder)}
