"""Random-weight DINO and CLIP model folders in the layout the fidelity scorer reads.

No real evaluation weights can be downloaded on the development machines: tests and benchmarks
build these from transformers configs. ``size="tiny"`` is for tests (a few MB); ``size="paper"``
has the shapes of DINO ViT-S/16 and CLIP ViT-B/32 (for timing; scores of random models mean
nothing).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

SIZES = {
    "tiny": {"dino": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
             "vision": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            patch_size=32),
             "text": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
             "projection_dim": 16},
    "paper": {"dino": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
              "vision": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                             patch_size=32),
              "text": dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048),
              "projection_dim": 512},
}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def write_random_fidelity_models(folder: str | Path, tokenizer_dir: str | Path, size: str = "tiny",
                                 seed: int = 0) -> dict[str, Path]:
    """Write ``<folder>/dino-random-<size>`` and ``<folder>/clip-random-<size>`` (safetensors weights,
    the reference processors' configs, the CLIP tokenizer copied from ``tokenizer_dir``) unless they
    exist already; returns ``{"dino": path, "clip": path}``."""
    import transformers

    shapes = SIZES[size]
    folder = Path(folder)
    paths = {"dino": folder / f"dino-random-{size}", "clip": folder / f"clip-random-{size}"}
    torch.manual_seed(seed)
    if not (paths["dino"] / "model.safetensors").is_file():
        config = transformers.ViTConfig(image_size=224, patch_size=16, **shapes["dino"])
        transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(paths["dino"], safe_serialization=True)
        # The processor facebook/dino-vits16 ships: 224 x 224 bilinear resize, ImageNet mean and std.
        transformers.ViTImageProcessor(size={"height": 224, "width": 224}, resample=2,
                                       image_mean=[0.485, 0.456, 0.406],
                                       image_std=[0.229, 0.224, 0.225]).save_pretrained(paths["dino"])
    if not (paths["clip"] / "model.safetensors").is_file():
        tokenizer_dir = Path(tokenizer_dir)
        vocab = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        config = transformers.CLIPConfig(
            text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, **shapes["text"]),
            vision_config=dict(image_size=224, **shapes["vision"]), projection_dim=shapes["projection_dim"])
        transformers.CLIPModel(config).save_pretrained(paths["clip"], safe_serialization=True)
        transformers.CLIPImageProcessor().save_pretrained(paths["clip"])  # OpenAI CLIP's preprocessing
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, paths["clip"] / name)
    return paths
