"""Where the tests find the repository, ComfyUI and the CLIP tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def repo_root() -> Path:
    return REPO_ROOT


def comfyui_path() -> Path:
    """The ComfyUI checkout under test: $COMFYUI_PATH if set, else <repo>/.comfyui/ComfyUI."""
    override = os.environ.get("COMFYUI_PATH")
    return Path(override).resolve() if override else REPO_ROOT / ".comfyui" / "ComfyUI"


def tokenizer_dir() -> Path:
    """SD1.5's CLIP tokenizer files as shipped inside ComfyUI."""
    return comfyui_path() / "comfy" / "sd1_tokenizer"
