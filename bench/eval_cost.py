"""What scoring costs per generated image on the CPU: DINO ViT-S/16 and CLIP ViT-B/32-sized random
models (trainers/eval/placeholder.py, size "paper"), the pack's own scoring path.

    .venv/bin/python bench/eval_cost.py [--images 8] [--real 4] [--repeat 3] [--threads N]

Times, after one warm-up call, the median of ``--repeat`` calls of each part on ``--images``
generated 512 x 512 images: preprocessing alone (each model's processor), the DINO embeddings, the
CLIP image embeddings, the CLIP text embeddings of one prompt per image, and the whole score against
``--real`` real images (which embeds the real images too). Prints seconds per generated image and
the peak RSS. Random weights: the scores themselves mean nothing, the cost is that of the real
models (same shapes).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--real", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--models", type=Path, default=None, help="folder for the random models (default: temp)")
    args = parser.parse_args()
    import torch

    from tests.support.paths import tokenizer_dir
    from trainers.eval import fidelity
    from trainers.eval.placeholder import write_random_fidelity_models

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as temp:
        paths = write_random_fidelity_models(args.models or Path(temp), tokenizer_dir(), size="paper")
        models = fidelity.load_fidelity_models(paths["dino"], paths["clip"])
        generator = torch.Generator().manual_seed(0)
        generated = torch.rand(args.images, 512, 512, 3, generator=generator)
        real = torch.rand(args.real, 512, 512, 3, generator=generator)
        prompts = [f"a photo of a dog, variation {i}" for i in range(args.images)]
        pictures = fidelity.to_pil_images(generated)
        cpu = torch.device("cpu")
        parts = {
            "preprocess (both processors)": lambda: (fidelity._pixels(models.dino_processor, pictures, cpu),
                                                     fidelity._pixels(models.clip_processor, pictures, cpu)),
            "DINO ViT-S/16 embeddings": lambda: fidelity.dino_embeddings(models, pictures),
            "CLIP ViT-B/32 image embeddings": lambda: fidelity.clip_image_embeddings(models, pictures),
            "CLIP text embeddings": lambda: fidelity.clip_text_embeddings(models, prompts),
            f"whole score (with {args.real} real images)": lambda: fidelity.score(models, generated, real, prompts),
        }
        dino_params = sum(p.numel() for p in models.dino.parameters()) / 1e6
        clip_params = sum(p.numel() for p in models.clip.parameters()) / 1e6
        print(f"DINO {dino_params:.1f}M parameters, CLIP {clip_params:.1f}M; {args.images} generated images "
              f"512 x 512, {torch.get_num_threads()} threads")
        for name, run in parts.items():
            run()  # warm-up
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            median = statistics.median(times)
            print(f"{name:40s} {median:7.3f} s  {median / args.images * 1000:7.1f} ms per generated image")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"peak RSS {peak / 2**30:.2f} GB (the whole process: torch, both models, the images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
