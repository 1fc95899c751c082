"""Reading what a prompt run left in the server's output folder."""

from __future__ import annotations

import numpy as np
from PIL import Image


def saved_image(comfy_server, result, node: str = "save") -> np.ndarray:
    """The one image that SaveImage node `node` wrote in this run, as an array."""
    files = result.files(node)
    assert len(files) == 1, result.outputs
    path = comfy_server.output_dir / files[0]["subfolder"] / files[0]["filename"]
    assert path.is_file() and path.suffix == ".png", path
    return np.asarray(Image.open(path).convert("RGB"))
