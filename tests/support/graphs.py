"""API-format graphs of core ComfyUI nodes, used by the server tests."""

from __future__ import annotations


def txt2img(
    ckpt_name: str,
    positive: str = "a photo of a cat",
    negative: str = "blurry",
    seed: int = 123,
    steps: int = 2,
    size: int = 64,
    cfg: float = 7.0,
    prefix: str = "dbs_test",
) -> dict:
    """CheckpointLoaderSimple -> CLIPTextEncode x2 -> KSampler -> VAEDecode -> SaveImage."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["ckpt", 1]}},
        "latent": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": size, "height": size, "batch_size": 1},
        },
        "sampler": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["ckpt", 0],
                "positive": ["pos", 0],
                "negative": ["neg", 0],
                "latent_image": ["latent", 0],
                "seed": seed,
                "steps": steps,
                "cfg": cfg,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }


def with_controlnet(
    graph: dict,
    controlnet_name: str,
    control_image: str,
    strength: float = 1.0,
    start: float = 0.0,
    end: float = 1.0,
) -> dict:
    """Insert LoadImage + ControlNetLoader + ControlNetApplyAdvanced in front of the sampler."""
    graph = {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in graph.items()}
    graph["cn_loader"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": controlnet_name}}
    graph["cn_image"] = {"class_type": "LoadImage", "inputs": {"image": control_image}}
    graph["cn_apply"] = {
        "class_type": "ControlNetApplyAdvanced",
        "inputs": {
            "positive": ["pos", 0],
            "negative": ["neg", 0],
            "control_net": ["cn_loader", 0],
            "image": ["cn_image", 0],
            "strength": strength,
            "start_percent": start,
            "end_percent": end,
            "vae": ["ckpt", 2],
        },
    }
    graph["sampler"]["inputs"]["positive"] = ["cn_apply", 0]
    graph["sampler"]["inputs"]["negative"] = ["cn_apply", 1]
    return graph
