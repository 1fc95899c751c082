"""API-format graphs (what `POST /prompt` takes), shared by the demo and the server tests."""

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


LORA_TRAIN_DEFAULTS = {
    "overwrite": False, "rank": 4, "alpha": 4.0, "steps": 3, "unet_lr": 1e-4, "text_encoder_lr": 1e-5,
    "lr_scheduler": "constant", "lr_warmup_steps": 0, "batch_size": 1, "seed": 0, "precision": "fp32",
    "gradient_checkpointing": False, "cache_latents": True,
    # Samples and validation while training are on by default in the node; the tests of other
    # things keep them off (tests/test_server_live.py turns them on).
    "sample_every": 0, "validate_every": 0,
}


def lora_loop(ckpt_name: str, lora_name: str, subject_folder: str, positive: str, negative: str = "blurry",
              instance_prompt: str = "a photo of sks robot", class_prompt: str = "a photo of robot",
              resolution: int = 64, unet_scale: float = 1.0, te_scale: float = 1.0, image_seed: int = 123,
              image_steps: int = 2, size: int = 64, prefix: str = "dbs_lora", loss_prefix: str | None = None,
              **train_inputs) -> dict:
    """The main job: LoadSubjectImages -> LoRATrain -> ApplyLoRAScaled on the checkpoint's MODEL
    and CLIP -> the txt2img graph above. `train_inputs` override LORA_TRAIN_DEFAULTS; with
    `loss_prefix` the loss curve is saved too."""
    graph = txt2img(ckpt_name, positive=positive, negative=negative, seed=image_seed, steps=image_steps,
                    size=size, prefix=prefix)
    graph["subject"] = {"class_type": "LoadSubjectImages", "inputs": {
        "folder": subject_folder, "instance_prompt": instance_prompt, "class_prompt": class_prompt,
        "resolution": resolution, "max_images": 0, "flip": False}}
    graph["train"] = {"class_type": "LoRATrain", "inputs": {
        "subject": ["subject", 0], "ckpt_name": ckpt_name, "output_name": lora_name,
        **LORA_TRAIN_DEFAULTS, **train_inputs}}
    graph["apply"] = {"class_type": "ApplyLoRAScaled", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": "(use the lora input)",
        "unet_scale": unet_scale, "text_encoder_scale": te_scale, "lora": ["train", 0]}}
    graph["pos"]["inputs"]["clip"] = graph["neg"]["inputs"]["clip"] = ["apply", 1]
    graph["sampler"]["inputs"]["model"] = ["apply", 0]
    if loss_prefix:
        graph["save_loss"] = {"class_type": "SaveImage",
                              "inputs": {"images": ["train", 2], "filename_prefix": loss_prefix}}
    return graph


DREAMBOOTH_TRAIN_DEFAULTS = {
    "overwrite": False, "steps": 2, "unet_lr": 2e-6, "text_encoder_lr": 0.0, "lr_scheduler": "constant",
    "lr_warmup_steps": 0, "batch_size": 1, "seed": 0, "optimizer": "adafactor", "precision": "fp32",
    "gradient_checkpointing": False, "cache_latents": True, "class_images": 2, "prior_loss_weight": 1.0,
    "class_steps": 2, "class_guidance": 7.5, "class_seed": 0, "save_precision": "fp16",
    "sample_every": 0, "validate_every": 0,
}


def dreambooth_loop(ckpt_name: str, output_name: str, subject_folder: str, positive: str,
                    negative: str = "blurry", instance_prompt: str = "a photo of sks robot",
                    class_prompt: str = "a photo of robot", resolution: int = 64, image_seed: int = 123,
                    image_steps: int = 2, size: int = 64, prefix: str = "dbs_dreambooth",
                    loss_prefix: str | None = None, **train_inputs) -> dict:
    """LoadSubjectImages -> DreamBoothTrain -> (its MODEL, CLIP, VAE) -> KSampler -> SaveImage.
    `train_inputs` override DREAMBOOTH_TRAIN_DEFAULTS (sized for the random test model on a CPU)."""
    graph = txt2img(ckpt_name, positive=positive, negative=negative, seed=image_seed, steps=image_steps,
                    size=size, prefix=prefix)
    del graph["ckpt"]
    graph["subject"] = {"class_type": "LoadSubjectImages", "inputs": {
        "folder": subject_folder, "instance_prompt": instance_prompt, "class_prompt": class_prompt,
        "resolution": resolution, "max_images": 0, "flip": False}}
    graph["train"] = {"class_type": "DreamBoothTrain", "inputs": {
        "subject": ["subject", 0], "ckpt_name": ckpt_name, "output_name": output_name,
        **DREAMBOOTH_TRAIN_DEFAULTS, **train_inputs}}
    graph["pos"]["inputs"]["clip"] = graph["neg"]["inputs"]["clip"] = ["train", 1]
    graph["sampler"]["inputs"]["model"] = ["train", 0]
    graph["decode"]["inputs"]["vae"] = ["train", 2]
    if loss_prefix:
        graph["save_loss"] = {"class_type": "SaveImage",
                              "inputs": {"images": ["train", 4], "filename_prefix": loss_prefix}}
    return graph


def train_alone(class_type: str, ckpt_name: str, output_name: str, subject_folder: str,
                instance_prompt: str = "a photo of sks robot", class_prompt: str = "a photo of robot",
                resolution: int = 64, **train_inputs) -> dict:
    """LoadSubjectImages -> LoRATrain or DreamBoothTrain and nothing else (a training node is an
    output node). `train_inputs` override LORA_TRAIN_DEFAULTS / DREAMBOOTH_TRAIN_DEFAULTS."""
    defaults = {"LoRATrain": LORA_TRAIN_DEFAULTS, "DreamBoothTrain": DREAMBOOTH_TRAIN_DEFAULTS}[class_type]
    return {
        "subject": {"class_type": "LoadSubjectImages", "inputs": {
            "folder": subject_folder, "instance_prompt": instance_prompt, "class_prompt": class_prompt,
            "resolution": resolution, "max_images": 0, "flip": False}},
        "train": {"class_type": class_type, "inputs": {
            "subject": ["subject", 0], "ckpt_name": ckpt_name, "output_name": output_name,
            **defaults, **train_inputs}},
    }
