"""LoRA training engine: config validation, training on tiny SD1.5 models, kohya export and its loaders."""

from __future__ import annotations

import copy
import json
import logging
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.support.paths import repo_root, tokenizer_dir
from trainers.cli import build_parser
from trainers.cli import main as cli_main
from trainers.data.subject import SubjectData, center_crop_resize
from trainers.files.names import validate_output_name
from trainers.sd15 import placeholder
from trainers.training import loop
from trainers.training.callbacks import NonFiniteLossError, StepState, TrainingCallbacks, TrainingStopped
from trainers.training.config import (
    ConfigError,
    DreamBoothTrainConfig,
    LoRATrainConfig,
    field_spec,
    field_specs,
)
from trainers.training.lora import (
    apply_lora,
    column_norms,
    expected_kohya_keys,
    inject_lora,
    kohya_state_dict,
    kohya_text_encoder_name,
    kohya_unet_name,
    lora_parameters,
    merged_weight,
    remove_lora,
    save_lora,
    text_encoder_lora_targets,
    train_lora,
    unet_lora_targets,
)
from trainers.training.plot import loss_curve_image
from trainers.training.record import Provenance, history_from_metadata, run_fingerprint

pytestmark = pytest.mark.trainers
logger = logging.getLogger(__name__)

PROMPT = "a photo of sks toy"
FAST = {"steps": 6, "rank": 4, "unet_lr": 1e-3}


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


def synthetic_images(count: int = 4, size: int = 64) -> tuple[torch.Tensor, ...]:
    """A red toy with a blue patch on a light background, shifted a little per photo."""
    images = []
    for i in range(count):
        image = torch.full((size, size, 3), 0.9)
        x = 4 + i * 6
        image[12:52, x : x + 32] = torch.tensor([0.8, 0.1, 0.1])
        image[20:28, x + 6 : x + 16] = torch.tensor([0.1, 0.1, 0.9])
        images.append(image)
    return tuple(images)


def write_photos(folder: Path, count: int, size: int = 64, start: int = 0) -> Path:
    """``count`` of the synthetic photos as PNG files img<i>.png in ``folder`` (created)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(synthetic_images(count + start, size)[start:]):
        Image.fromarray((image.numpy() * 255).round().astype("uint8")).save(folder / f"img{start + i}.png")
    return folder


def make_subject(count: int = 4, flip: bool = False, captions: tuple[str, ...] | None = None) -> SubjectData:
    return SubjectData(
        images=synthetic_images(count),
        captions=captions or (PROMPT,) * count,
        instance_prompt=PROMPT,
        class_prompt="a photo of toy",
        resolution=64,
        source_names=tuple(f"toy{i}.png" for i in range(count)),
        flip=flip,
    )


@pytest.fixture(scope="module")
def tiny():
    return placeholder.tiny_sd15(seed=0, tokenizer_dir=tokenizer_dir())


@pytest.fixture(scope="module")
def subject() -> SubjectData:
    return make_subject()


def snapshot(components) -> dict:
    """Everything train_lora must leave as it was."""
    out = {}
    for name in ("unet", "vae", "text_encoder"):
        model = getattr(components, name)
        out[name] = {
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "params": {k: (id(p), p.requires_grad) for k, p in model.named_parameters()},
            "modules": {k: (type(m).__name__, m.training) for k, m in model.named_modules()},
            "peft_config": hasattr(model, "peft_config"),
        }
    out["checkpointing"] = components.unet.is_gradient_checkpointing
    return out


def assert_unchanged(components, before: dict) -> None:
    after = snapshot(components)
    for name in ("unet", "vae", "text_encoder"):
        b, a = before[name], after[name]
        assert a["modules"] == b["modules"], f"{name}: modules, types or train/eval modes changed"
        assert a["params"] == b["params"], f"{name}: parameters replaced or requires_grad changed"
        assert set(a["state"]) == set(b["state"])
        changed = [k for k in b["state"] if not torch.equal(a["state"][k], b["state"][k])]
        assert not changed, f"{name}: weights changed: {changed[:5]}"
        assert not a["peft_config"]
    assert after["checkpointing"] == before["checkpointing"]
    assert all(p.grad is None for p in components.unet.parameters())


class Recorder(TrainingCallbacks):
    def __init__(self, stop_at: int | None = None, error: BaseException | None = None) -> None:
        self.begin: list[int] = []
        self.states: list[StepState] = []
        self.end: list[list[float]] = []
        self.stop_at, self.error = stop_at, error

    def on_train_begin(self, total_steps: int) -> None:
        self.begin.append(total_steps)

    def on_step_end(self, state: StepState) -> None:
        self.states.append(state)
        if self.stop_at is not None and state.step == self.stop_at:
            raise self.error

    def on_train_end(self, losses: list[float]) -> None:
        self.end.append(losses)


# ---------------------------------------------------------------------------------------------
# Config, names, subject
# ---------------------------------------------------------------------------------------------


def test_config_defaults_round_trip_and_widget_specs():
    config = LoRATrainConfig()
    assert (config.rank, config.effective_alpha, config.steps, config.train_text_encoder) == (16, 16.0, 500, False)
    assert LoRATrainConfig.from_dict(json.loads(config.to_json())) == config
    spec = field_spec(LoRATrainConfig, "rank")
    assert spec == {
        "help": spec["help"], "min": 1, "max": 128, "name": "rank", "type": "int", "default": 16,
    }  # fmt: skip
    assert field_spec(LoRATrainConfig, "lr_scheduler")["choices"][:2] == ["constant", "constant_with_warmup"]
    assert field_spec(LoRATrainConfig, "precision")["choices"] == ["auto", "fp32", "bf16", "fp16"]
    assert field_spec(LoRATrainConfig, "cache_latents")["type"] == "bool"
    assert all(s["help"] for s in field_specs(LoRATrainConfig))
    assert LoRATrainConfig(rank=8.0).rank == 8 and isinstance(LoRATrainConfig(unet_lr=1).unet_lr, float)
    with pytest.raises(ConfigError, match="unknown LoRATrainConfig field"):
        LoRATrainConfig.from_dict({"rank": 4, "learning_rate": 1e-4})
    with pytest.raises(KeyError, match="no field"):
        field_spec(LoRATrainConfig, "lr")


@pytest.mark.parametrize(
    ("values", "fragments"),
    [
        ({"unet_lr": 0}, ["unet_lr must be a finite number > 0 and <= 1.0 (got 0)"]),
        ({"unet_lr": -1}, ["unet_lr must be a finite number > 0 and <= 1.0 (got -1)"]),
        ({"unet_lr": float("nan")}, ["unet_lr must be a finite number > 0 and <= 1.0 (got nan)"]),
        ({"unet_lr": float("inf")}, ["unet_lr must be a finite number > 0 and <= 1.0 (got inf)"]),
        ({"unet_lr": 2.0}, ["unet_lr must be", "<= 1.0 (got 2.0)"]),
        ({"unet_lr": "1e-4"}, ["unet_lr must be a finite number", "(got '1e-4')"]),
        ({"text_encoder_lr": -1e-5}, ["text_encoder_lr must be 0 (frozen text encoder) or a finite number > 0"]),
        ({"text_encoder_lr": float("nan")}, ["text_encoder_lr must be", "(got nan)"]),
        ({"rank": 0}, ["rank must be a whole number >= 1 and <= 128 (got 0)"]),
        ({"rank": 129}, ["rank must be a whole number >= 1 and <= 128 (got 129)"]),
        ({"rank": 4.5}, ["rank must be a whole number", "(got 4.5)"]),
        ({"rank": True}, ["rank must be a whole number", "(got True)"]),
        ({"alpha": -1}, ["alpha must be 0 (same as rank) or", "(got -1)"]),
        ({"alpha": 2000}, ["alpha must be", "<= 1024 (got 2000)"]),
        ({"steps": 0}, ["steps must be a whole number >= 1 and <= 100000 (got 0)"]),
        (
            {"steps": 10, "lr_warmup_steps": 11, "lr_scheduler": "linear"},
            ["lr_warmup_steps must be between 0 and steps (10) (got 11)"],
        ),
        ({"lr_warmup_steps": 5}, ["has no effect with lr_scheduler 'constant'", "constant_with_warmup"]),
        ({"lr_scheduler": "exponential"}, ["lr_scheduler must be one of 'constant', ", "(got 'exponential')"]),
        ({"precision": "fp8"}, ["precision must be one of 'auto', 'fp32', 'bf16', 'fp16' (got 'fp8')"]),
        ({"batch_size": 0}, ["batch_size must be a whole number >= 1 and <= 64 (got 0)"]),
        ({"seed": -1}, ["seed must be a whole number >= 0 and <= 4294967295 (got -1)"]),
        ({"seed": 2**32}, ["seed must be", "(got 4294967296)"]),
        ({"noise_offset": 1.5}, ["noise_offset must be a finite number >= 0 and <= 1.0 (got 1.5)"]),
        ({"min_snr_gamma": -5}, ["min_snr_gamma must be 0 (off) or", "(got -5)"]),
        ({"max_grad_norm": float("inf")}, ["max_grad_norm must be", "(got inf)"]),
        ({"cache_latents": 1}, ["cache_latents must be true or false (got 1)"]),
    ],
)
def test_config_rejects_bad_values_naming_field_and_range(values, fragments):
    with pytest.raises(ConfigError) as caught:
        LoRATrainConfig(**values)
    for fragment in fragments:
        assert fragment in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_cli_options_come_from_the_config_metadata(capsys):
    parser = build_parser()
    base = ["lora", "--checkpoint", "c.safetensors", "--images", "d", "--instance-prompt", "p", "--output", "o.safetensors"]
    args = parser.parse_args(base + ["--unet-lr", "2e-4", "--no-cache-latents", "--lr-scheduler", "cosine", "--rank", "8"])
    assert (args.unet_lr, args.cache_latents, args.lr_scheduler, args.rank) == (2e-4, False, "cosine", 8)
    assert args.steps == 500 and args.gradient_checkpointing is False
    with pytest.raises(SystemExit) as caught:
        cli_main(["lora", "--help"])  # what `python -m trainers lora --help` prints
    assert caught.value.code == 0
    help_text = capsys.readouterr().out
    assert "--text-encoder-lr" in help_text and "--min-snr-gamma" in help_text
    assert "Allowed: a whole number >= 1 and <= 128" in " ".join(help_text.split())


@pytest.mark.parametrize(
    ("name", "stem"),
    [("sks_dog", "sks_dog"), ("sks dog v2.safetensors", "sks dog v2"), ("a.b-c_1", "a.b-c_1"), ("x" * 128, "x" * 128),
     ("犬" * 42, "犬" * 42), ("cafe\u0301", "caf\u00e9"), ("Café_lora", "Café_lora")],
)
def test_output_name_accepts_plain_names(name, stem):
    assert validate_output_name(name) == stem


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty"),
        (".safetensors", "empty"),
        ("loras/dog", "path separator"),
        ("..\\dog", "path separator"),
        ("dog..v2", r"'\.\.'"),
        (".hidden", "starts with '.'"),
        ("dog\x00", "control"),
        ("dog\n", "control"),
        ("dog\x85", "control"),  # C1 control (NEXT LINE)
        ("evil\u202egnp.safetensors", "direction-changing"),  # right-to-left override spoofs the name
        ("dog\u200bv2", "invisible"),  # zero-width space
        ("dog\u00a0v2", "invisible"),  # no-break space looks like a space
        ("dog\ue000", "invisible"),  # private use
        ("c:dog", "not allowed"),
        ("what?", "not allowed"),
        ("CON", "reserved"),
        ("nul.txt", "reserved"),
        ("Com1", "reserved"),
        ("lpt9.safetensors", "reserved"),
        ("CONIN$", "reserved"),
        ("conout$.x", "reserved"),
        ("com0", "reserved"),
        ("nul .txt", "reserved"),
        ("dog.", "ends with a dot"),
        ("dog ", "space"),
        ("x" * 129, "at most 128 bytes"),
        ("犬" * 43, "43 characters, 129 bytes"),
        ("犬" * 80, "240 bytes"),  # passed before, then failed at save with ENAMETOOLONG
    ],
)
def test_output_name_rejects_unsafe_names_and_says_what_to_use(name, reason):
    with pytest.raises(ValueError, match=reason) as caught:
        validate_output_name(name)
    assert "Use letters, digits" in str(caught.value)


def test_subject_fingerprint_tracks_what_training_sees():
    a, b = make_subject(), make_subject()
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 64
    assert make_subject(flip=True).fingerprint() != a.fingerprint()
    assert make_subject(captions=("x",) * 4).fingerprint() != a.fingerprint()
    nudged = list(a.images)
    nudged[0] = nudged[0].clone()
    nudged[0][0, 0, 0] += 0.5 / 255 * 0.4  # below uint8 quantisation: same pixels
    same = SubjectData(tuple(nudged), a.captions, a.instance_prompt, a.class_prompt, 64, a.source_names)
    assert same.fingerprint() == a.fingerprint()
    nudged[0][0, 0, 0] = 0.0
    other = SubjectData(tuple(nudged), a.captions, a.instance_prompt, a.class_prompt, 64, a.source_names)
    assert other.fingerprint() != a.fingerprint()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"images": ()}, "no images"),
        ({"captions": (PROMPT,)}, "captions"),
        ({"resolution": 96}, "multiple of 64"),
        ({"instance_prompt": " "}, "instance_prompt is empty"),
        ({"images": (torch.zeros(64, 64, 4),) * 4}, r"toy0.png has shape \(64, 64, 4\)"),
        ({"images": (torch.full((64, 64, 3), float("nan")),) * 4}, "NaN"),
    ],
)
def test_subject_rejects_bad_data(change, message):
    fields = {
        "images": synthetic_images(), "captions": (PROMPT,) * 4, "instance_prompt": PROMPT, "class_prompt": "",
        "resolution": 64, "source_names": tuple(f"toy{i}.png" for i in range(4)),
    }  # fmt: skip
    fields.update(change)
    with pytest.raises(ValueError, match=message):
        SubjectData(**fields)


def test_center_crop_resize_takes_the_middle_square():
    image = torch.zeros(100, 200, 3)
    image[:, 50:150] = 1.0  # the centred 100x100 square is white, the sides black
    out = center_crop_resize(image, 64)
    assert out.shape == (64, 64, 3) and out.dtype == torch.float32
    assert float(out.min()) > 0.99
    tall = center_crop_resize(torch.rand(300, 120, 3), 64)
    assert tall.shape == (64, 64, 3) and 0 <= float(tall.min()) and float(tall.max()) <= 1


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _subject_latents(tiny, subject):
    prepared = loop.prepare_training_set(
        subject.pixels(), subject.captions, vae=tiny.vae, text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer, flip=False, cache_latents=True, cache_text=True,
    )  # fmt: skip
    return prepared, prepared.latent_mean[0]


def test_training_lowers_the_loss_on_the_subject(tiny, subject):
    """Loss over fixed timesteps and noise on the subject's images, before vs after 200 steps."""
    prepared, latents = _subject_latents(tiny, subject)
    timesteps = [50, 150, 300, 500, 700, 900]
    conditioning = prepared.embeddings[prepared.caption_index]
    before = loop.fixed_noise_loss(tiny.unet, latents, conditioning, tiny.noise_scheduler, timesteps, seed=1)

    result = train_lora(tiny, subject, LoRATrainConfig(steps=200, unet_lr=1e-3, rank=8, batch_size=2))
    unet = copy.deepcopy(tiny.unet)
    assert apply_lora(unet, None, result.state_dict) == {"unet": 32, "text_encoder": 0}
    after = loop.fixed_noise_loss(unet, latents, conditioning, tiny.noise_scheduler, timesteps, seed=1)
    first, last = sum(result.losses[:20]) / 20, sum(result.losses[-20:]) / 20
    logger.info(
        "subject loss before %.4f, after %.4f (ratio %.3f); training loss first 20 steps %.4f, last 20 %.4f",
        before, after, after / before, first, last,
    )  # fmt: skip
    assert after < 0.85 * before, (before, after)
    assert last < first
    ups = [v for k, v in result.state_dict.items() if k.endswith("lora_up.weight")]
    assert all(float(v.abs().max()) > 0 for v in ups), "some LoRA up weights never moved from zero"


def test_same_seed_same_lora_and_other_seed_differs(tiny, subject, tmp_path):
    config = LoRATrainConfig(**FAST, seed=7, text_encoder_lr=1e-4)
    first = train_lora(tiny, subject, config)
    second = train_lora(tiny, subject, config)
    # byte-identical files, metadata included
    assert save_lora(first, tmp_path / "a.safetensors").read_bytes() == \
        save_lora(second, tmp_path / "b.safetensors").read_bytes()
    other = train_lora(tiny, subject, LoRATrainConfig(**FAST, seed=8, text_encoder_lr=1e-4))
    assert first.state_dict.keys() == second.state_dict.keys() == other.state_dict.keys()
    assert all(torch.equal(first.state_dict[k], second.state_dict[k]) for k in first.state_dict)
    assert first.losses == second.losses
    downs = [k for k in first.state_dict if k.endswith("lora_down.weight")]
    assert all(not torch.equal(first.state_dict[k], other.state_dict[k]) for k in downs)
    assert first.losses != other.losses


def test_key_sets_unet_only_and_with_text_encoder(tiny, subject):
    unet_only = train_lora(tiny, subject, LoRATrainConfig(**FAST))
    both = train_lora(tiny, subject, LoRATrainConfig(**FAST, text_encoder_lr=1e-4))
    assert (unet_only.unet_modules, unet_only.text_encoder_modules) == (32, 0)
    assert (both.unet_modules, both.text_encoder_modules) == (32, 8)
    assert sorted(unet_only.state_dict) == expected_kohya_keys(tiny.unet)
    assert sorted(both.state_dict) == expected_kohya_keys(tiny.unet, tiny.text_encoder)
    assert len(unet_only.state_dict) == 96 and len(both.state_dict) == 120
    for key, tensor in both.state_dict.items():
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"
        assert key.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")), key
        assert "lora_A" not in key and "lora_B" not in key and "base_model" not in key
        if key.endswith(".alpha"):
            assert tensor.ndim == 0 and float(tensor) == 4.0
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert both.state_dict[f"{q}.lora_down.weight"].shape == (4, 32)
    assert both.state_dict[f"{q}.lora_up.weight"].shape == (32, 4)
    assert "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0.alpha" in both.state_dict
    assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight" in both.state_dict


def full_size_models():
    """Full SD1.5 UNet and text encoder with parameters on the meta device (no memory, names and shapes only)."""
    from trainers.sd15 import architecture as sd15_config
    from trainers.sd15 import convert
    from trainers.sd15.checkpoint import build_text_encoder, build_unet

    with convert.parameters_on_meta():
        return build_unet(sd15_config.unet_config("full")), build_text_encoder(sd15_config.text_encoder_config("full"))


def test_full_size_kohya_names_match_the_sd15_lists():
    unet, text_encoder = full_size_models()
    unet_keys = expected_kohya_keys(unet)
    all_keys = expected_kohya_keys(unet, text_encoder)
    assert len(unet_keys) == 384 and len(all_keys) == 528  # 128 UNet modules, 48 text-encoder modules
    # The kohya list built independently from the SD1.5 block layout.
    blocks = [f"down_blocks_{b}_attentions_{a}" for b in range(3) for a in range(2)]
    blocks += ["mid_block_attentions_0"]
    blocks += [f"up_blocks_{b}_attentions_{a}" for b in range(1, 4) for a in range(3)]
    names = {
        f"lora_unet_{block}_transformer_blocks_0_{attn}_{proj}"
        for block in blocks
        for attn in ("attn1", "attn2")
        for proj in ("to_q", "to_k", "to_v", "to_out_0")
    }
    names |= {
        f"lora_te_text_model_encoder_layers_{i}_self_attn_{p}_proj" for i in range(12) for p in "qkv"
    } | {f"lora_te_text_model_encoder_layers_{i}_self_attn_out_proj" for i in range(12)}
    assert {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in all_keys} == names
    # transformers 4 module paths (with text_model.) give the same names
    assert kohya_text_encoder_name("text_model.encoder.layers.3.self_attn.q_proj") == kohya_text_encoder_name(
        "encoder.layers.3.self_attn.q_proj"
    )


def _pipeline(tiny):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=tiny.vae, text_encoder=copy.deepcopy(tiny.text_encoder), tokenizer=tiny.tokenizer,
        unet=copy.deepcopy(tiny.unet), scheduler=tiny.noise_scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def _lora_layer_count(model) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in model.modules())


@pytest.mark.parametrize(("text_encoder_lr", "conv_layers"), [(0.0, False), (1e-3, False), (0.0, True)],
                         ids=["unet-only", "unet+text-encoder", "unet+conv"])
def test_diffusers_load_lora_weights_consumes_every_key(tiny, subject, tmp_path, text_encoder_lr, conv_layers):
    """diffusers 0.42 (transformers 5) loads our kohya files, with and without text-encoder keys
    and convolution (LoCon) keys, and the loaded pipeline computes exactly what the LoRA means
    (compared with a merged copy)."""
    result = train_lora(tiny, subject, LoRATrainConfig(steps=4, unet_lr=1e-2, rank=4, alpha=2, text_encoder_lr=text_encoder_lr,
                                                       conv_layers=conv_layers))
    path = save_lora(result, tmp_path / "lora.safetensors", dtype=None)
    assert sorted(result.state_dict) == expected_kohya_keys(tiny.unet, tiny.text_encoder if text_encoder_lr else None,
                                                            conv_layers)
    pipe = _pipeline(tiny)
    pipe.load_lora_weights(str(path))
    assert _lora_layer_count(pipe.unet) == result.unet_modules == 32 + (18 if conv_layers else 0)
    assert _lora_layer_count(pipe.text_encoder) == result.text_encoder_modules

    merged_unet, merged_text = copy.deepcopy(tiny.unet), copy.deepcopy(tiny.text_encoder)
    apply_lora(merged_unet, merged_text, result.state_dict)
    ids = tiny.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        context = pipe.text_encoder(ids)[0]
        assert torch.allclose(context, merged_text(ids)[0], atol=1e-5)
        if text_encoder_lr:
            assert not torch.allclose(context, tiny.text_encoder(ids)[0], atol=1e-5)
        ours = merged_unet(latents, torch.tensor([500]), encoder_hidden_states=context).sample
        theirs = pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=context).sample
        plain = tiny.unet(latents, torch.tensor([500]), encoder_hidden_states=context).sample
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(plain, theirs, atol=1e-5)


def test_models_unchanged_after_training_with_every_option(tiny, subject):
    before = snapshot(tiny)
    result = train_lora(
        tiny, make_subject(3, flip=True),
        LoRATrainConfig(
            steps=5, rank=4, unet_lr=1e-3, text_encoder_lr=1e-4, gradient_checkpointing=True, cache_latents=False,
            batch_size=3, min_snr_gamma=5.0, noise_offset=0.05, lr_scheduler="cosine", lr_warmup_steps=2,
        ),
    )  # fmt: skip
    assert len(result.losses) == 5 and all(math.isfinite(v) for v in result.losses)
    assert_unchanged(tiny, before)


def test_cached_and_uncached_latents_train_the_same_lora(tiny, subject, monkeypatch):
    calls = []
    encode = type(tiny.vae).encode
    monkeypatch.setattr(type(tiny.vae), "encode", lambda self, x, *a, **k: calls.append(len(x)) or encode(self, x, *a, **k))
    cached = train_lora(tiny, subject, LoRATrainConfig(**FAST, cache_latents=True))
    assert calls == [len(subject)]  # every image once, before the first step
    calls.clear()
    encoded = train_lora(tiny, subject, LoRATrainConfig(**FAST, cache_latents=False))
    assert calls == [1] * FAST["steps"]  # the batch of each step (batch size 1)
    for key, tensor in cached.state_dict.items():
        # Same draws and distribution; only float rounding of batched vs single VAE calls differs.
        assert torch.allclose(tensor, encoded.state_dict[key], atol=1e-4, rtol=1e-3), key


def test_flip_caches_both_mirror_images(tiny):
    subject = make_subject(2, flip=True)
    prepared = loop.prepare_training_set(
        subject.pixels(), subject.captions, vae=tiny.vae, text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer, flip=True, cache_latents=True, cache_text=True,
    )  # fmt: skip
    assert prepared.latent_mean.shape == (2, 2, 4, 8, 8)
    assert not torch.allclose(prepared.latent_mean[0], prepared.latent_mean[1])
    # index 0: the images as they are; index 1: the encoding of their mirrored pixels
    pixels = subject.pixels() * 2 - 1
    for variant, images in enumerate((pixels, pixels.flip(-1))):
        mean, std = loop.encode_latent_stats(tiny.vae, images)
        assert torch.equal(prepared.latent_mean[variant], mean) and torch.equal(prepared.latent_std[variant], std)
    assert prepared.embeddings.shape == (1, 77, 32) and prepared.caption_index.tolist() == [0, 0]


def test_callbacks_see_every_step_in_order_with_the_schedule(tiny, subject):
    recorder = Recorder()
    config = LoRATrainConfig(steps=8, rank=4, unet_lr=1e-3, lr_scheduler="linear", lr_warmup_steps=4)
    result = train_lora(tiny, subject, config, callbacks=recorder)
    assert recorder.begin == [8]
    assert [s.step for s in recorder.states] == list(range(1, 9))
    assert all(s.total_steps == 8 and s.phase == "train" for s in recorder.states)
    assert [s.loss for s in recorder.states] == result.losses
    assert recorder.end == [result.losses]
    lrs = [s.lr for s in recorder.states]
    assert lrs[0] == 0.0 and lrs[:5] == sorted(lrs[:5]) and lrs[4] == pytest.approx(1e-3)
    assert lrs[5:] == sorted(lrs[5:], reverse=True)
    elapsed = [s.elapsed for s in recorder.states]
    assert elapsed == sorted(elapsed)


class Cancelled(BaseException):
    """Like ComfyUI's InterruptProcessingException on newest ComfyUI: not an Exception."""


@pytest.mark.parametrize("error", [Cancelled("user pressed cancel"), TrainingStopped("stop")], ids=["BaseException", "TrainingStopped"])
def test_exception_in_callback_propagates_and_restores_the_models(tiny, subject, tmp_path, error):
    before = snapshot(tiny)
    recorder = Recorder(stop_at=3, error=error)
    config = LoRATrainConfig(steps=10, rank=4, unet_lr=1e-3, text_encoder_lr=1e-4, gradient_checkpointing=True)
    with pytest.raises(type(error)) as caught:
        train_lora(tiny, subject, config, callbacks=recorder)
    assert caught.value is error
    assert [s.step for s in recorder.states] == [1, 2, 3] and recorder.end == []
    assert_unchanged(tiny, before)
    assert list(tmp_path.iterdir()) == []


def test_non_finite_loss_stops_at_once(tiny, subject, monkeypatch):
    before = snapshot(tiny)
    real = loop.per_sample_mse
    calls = []

    def poisoned(prediction, target):
        calls.append(1)
        out = real(prediction, target)
        return out * float("nan") if len(calls) == 3 else out

    monkeypatch.setattr(loop, "per_sample_mse", poisoned)
    recorder = Recorder()
    with pytest.raises(NonFiniteLossError, match=r"loss became NaN or infinite at step 3 .*Lower the learning rate") as caught:
        train_lora(tiny, subject, LoRATrainConfig(steps=10, rank=4, unet_lr=1e-3), callbacks=recorder)
    assert caught.value.step == 3
    assert [s.step for s in recorder.states] == [1, 2] and recorder.end == []
    assert_unchanged(tiny, before)


# -- DoRA (lora_type "dora"): a magnitude per input column, exported as .dora_scale -------------

DORA = {"steps": 6, "rank": 4, "alpha": 2.0, "unet_lr": 1e-2, "text_encoder_lr": 1e-3, "conv_layers": True,
        "lora_type": "dora", "seed": 5}


def _adapted_modules(tiny) -> dict[str, torch.nn.Module]:
    """Kohya name -> module of every layer a LoRA with conv_layers and the text encoder adapts."""
    table = {kohya_unet_name(n): tiny.unet.get_submodule(n) for n in unet_lora_targets(tiny.unet, conv_layers=True)}
    table.update({kohya_text_encoder_name(n): tiny.text_encoder.get_submodule(n)
                  for n in text_encoder_lora_targets(tiny.text_encoder)})
    return table


def test_a_dora_lora_trains_repeats_and_holds_a_magnitude_per_input_column(tiny, subject, tmp_path):
    """A DoRA starts as the base model (the first loss of a plain LoRA), its magnitudes move off their
    start (the weights' column norms), the same seed gives the same bytes, and every module, linear
    or convolution, holds a .dora_scale in ComfyUI's input-axis shape (1 x in, 1 x in x 1 x 1)."""
    config = LoRATrainConfig(**DORA)
    result = train_lora(tiny, subject, config)
    plain = train_lora(tiny, subject, replace(config, lora_type="lora"))
    assert all(math.isfinite(v) for v in result.losses)
    assert result.losses[0] == pytest.approx(plain.losses[0], rel=1e-6)
    assert result.losses[1:] != plain.losses[1:]  # the magnitudes train
    assert sorted(result.state_dict) == expected_kohya_keys(tiny.unet, tiny.text_encoder, conv_layers=True, dora=True)
    table = _adapted_modules(tiny)
    assert len(table) == result.unet_modules + result.text_encoder_modules
    moved = []
    for name, module in table.items():
        scale = result.state_dict[f"{name}.dora_scale"]
        weight = module.weight.detach()
        assert scale.shape == ((1, weight.shape[1]) if weight.dim() == 2 else (1, weight.shape[1], 1, 1)), name
        moved.append(float((scale.flatten() - column_norms(weight)).abs().max() / column_norms(weight).max()))
    logger.info("DoRA magnitudes moved by %.2e to %.2e of the largest column norm", min(moved), max(moved))
    assert min(moved) > 1e-4  # every module's magnitudes trained
    path = save_lora(result, tmp_path / "a.safetensors")
    again = save_lora(train_lora(tiny, subject, config), tmp_path / "b.safetensors")
    assert again.read_bytes() == path.read_bytes()
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
        assert handle.get_tensor(next(k for k in handle.keys() if k.endswith(".dora_scale"))).dtype == torch.float16
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2", "dora_wd": "True"}
    assert meta["dbs.lora_type"] == "dora"


class OutputsAtEnd(TrainingCallbacks):
    """What the trained models (DoRA layers still injected) compute on fixed inputs, at the end."""

    def __init__(self, tiny, ids: torch.Tensor, latents: torch.Tensor) -> None:
        super().__init__()
        self.tiny, self.ids, self.latents = tiny, ids, latents

    def on_train_end(self, losses) -> None:
        with torch.no_grad():
            self.context = self.tiny.text_encoder(self.ids)[0]
            self.sample = self.tiny.unet(self.latents, torch.tensor([500]), encoder_hidden_states=self.context).sample


def _relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


def test_a_trained_dora_computes_what_its_file_merged_by_apply_lora_computes(tiny, subject):
    """Scaling each layer's input by m / ||W + dW|| while training is the file's merged weight: the
    trained models and a copy of the base models with the file merged agree (attention, convolutions
    and text encoder), and a file with a module the models lack is still refused."""
    ids = tiny.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    outputs = OutputsAtEnd(tiny, ids, latents)
    result = train_lora(tiny, subject, LoRATrainConfig(**{**DORA, "unet_lr": 3e-2, "text_encoder_lr": 1e-2}), outputs)
    unet, text_encoder = copy.deepcopy(tiny.unet), copy.deepcopy(tiny.text_encoder)
    assert apply_lora(unet, text_encoder, result.state_dict) == {"unet": 50, "text_encoder": result.text_encoder_modules}
    with torch.no_grad():
        context = text_encoder(ids)[0]
        sample = unet(latents, torch.tensor([500]), encoder_hidden_states=context).sample
        base = tiny.unet(latents, torch.tensor([500]), encoder_hidden_states=tiny.text_encoder(ids)[0]).sample
    errors = _relative(outputs.context, context), _relative(outputs.sample, sample)
    logger.info("trained DoRA vs merged file: text encoder %.2e, UNet %.2e relative (LoRA moved the UNet output "
                "by %.2e)", *errors, _relative(sample, base))
    assert max(errors) < 1e-5 and _relative(sample, base) > 1e-3
    stray = {**{k: v for k, v in result.state_dict.items() if k.startswith("lora_unet_")},
             "lora_unet_nowhere.dora_scale": torch.ones(1, 4)}
    with pytest.raises(ValueError, match="1 LoRA modules match no layer.*lora_unet_nowhere"):
        apply_lora(copy.deepcopy(tiny.unet), None, stray)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_dora_layer_is_its_exported_weight_merged(kind):
    """Far from its start (random up/down, magnitudes 0.5-1.5x): a DoRA layer's output is the layer
    with merged_weight(... dora_scale) as its weight, for a Linear and a 3x3 Conv2d; removing it
    gives back the plain layer."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 10) if kind == "linear" else torch.nn.Conv2d(6, 8, 3, padding=1)
    x = torch.randn(3, 5, 12) if kind == "linear" else torch.randn(2, 6, 7, 7)
    model = torch.nn.Sequential(layer)
    plain = model(x).detach()
    tuner = inject_lora(model, ["0"], rank=3, alpha=2.0, seed=0, dora=True)
    try:
        params = lora_parameters(model)
        assert len(params) == 3 and params[-1].shape == (layer.weight.shape[1],)
        torch.testing.assert_close(model(x), plain, rtol=1e-6, atol=1e-6)  # the start changes nothing
        with torch.no_grad():
            params[0].normal_()
            params[1].normal_()
            params[2].mul_(torch.rand(params[2].shape) + 0.5)
        ours = model(x).detach()
        state = kohya_state_dict(model, None, rank=3, alpha=2.0)
    finally:
        remove_lora(tuner)
    assert type(model[0]) is type(layer) and not any("dora" in name for name, _ in model.named_modules())
    weight = merged_weight(layer.weight, state["lora_unet_0.lora_down.weight"], state["lora_unet_0.lora_up.weight"],
                           float(state["lora_unet_0.alpha"]), state["lora_unet_0.dora_scale"])
    merged = (torch.nn.functional.linear(x, weight, layer.bias) if kind == "linear"
              else torch.nn.functional.conv2d(x, weight, layer.bias, padding=1))
    logger.info("DoRA %s layer vs merged weight: %.2e relative", kind, _relative(ours, merged))
    assert _relative(ours, merged) < 1e-5 and _relative(merged, plain) > 0.1


def test_huge_learning_rate_diverges_with_a_clear_error(tiny, subject):
    before = snapshot(tiny)
    config = LoRATrainConfig(steps=40, rank=128, alpha=1024, unet_lr=1.0, text_encoder_lr=1.0, max_grad_norm=0)
    with pytest.raises(NonFiniteLossError, match="became NaN or infinite at step .*Lower the learning rate"):
        train_lora(tiny, subject, config)
    assert_unchanged(tiny, before)


def test_rejects_a_model_that_already_has_lora_layers(tiny, subject):
    from trainers.training.lora import inject_lora, remove_lora, unet_lora_targets

    tuner = inject_lora(tiny.unet, unet_lora_targets(tiny.unet), 4, 4.0, seed=0)
    try:
        with pytest.raises(ValueError, match="already has LoRA layers"):
            train_lora(tiny, subject, LoRATrainConfig(**FAST))
    finally:
        remove_lora(tuner)
    assert _lora_layer_count(tiny.unet) == 0


def test_prior_set_rides_along_in_the_loop(tiny, subject):
    """The loop takes a second (class) set: its loss is reported separately and added with its weight."""
    from trainers.training.lora import inject_lora, lora_parameters, remove_lora, unet_lora_targets

    def prepared(s):
        return loop.prepare_training_set(
            s.pixels(), s.captions, vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer,
            flip=False, cache_latents=True, cache_text=True,
        )  # fmt: skip

    instance, prior = prepared(subject), prepared(make_subject(2, captions=("a photo of toy",) * 2))
    tuner = inject_lora(tiny.unet, unet_lora_targets(tiny.unet), 4, 4.0, seed=0)
    try:
        params = lora_parameters(tiny.unet)
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        recorder = Recorder()
        result = loop.run_training_loop(
            loop.LoopModels(tiny.unet, tiny.vae, tiny.text_encoder, tiny.noise_scheduler),
            instance,
            loop.Optimization(optimizer, scheduler, params),
            loop.LoopSettings(steps=3, batch_size=2, seed=0, prior_loss_weight=0.5),
            recorder,
            prior=prior,
        )
    finally:
        remove_lora(tuner)
    assert len(result.prior_losses) == 3
    for state, total, inst, pri in zip(recorder.states, result.losses, result.instance_losses, result.prior_losses, strict=True):
        assert total == pytest.approx(inst + 0.5 * pri, rel=1e-5)
        assert state.instance_loss == inst and state.prior_loss == pri


def test_min_snr_weights_follow_the_formula(tiny):
    timesteps = torch.tensor([10, 500, 990])
    weights = loop.min_snr_weights(tiny.noise_scheduler, timesteps, 5.0)
    # SNR(t) = alpha_bar_t / (1 - alpha_bar_t), from the DDPM schedule SD1.5 trains with
    # (scaled_linear betas 0.00085-0.012 over 1000 steps), computed here, not by the code under test
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, dim=0)[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    assert torch.allclose(weights.double(), torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr,
                          rtol=1e-6)
    assert float(weights[0]) < 1.0 and float(weights[2]) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Saving, metadata, fingerprints, loss curve, CLI
# ---------------------------------------------------------------------------------------------


def test_save_is_atomic_refuses_overwrite_and_carries_metadata(tiny, subject, tmp_path):
    config = LoRATrainConfig(**FAST, text_encoder_lr=1e-4)
    result = train_lora(tiny, subject, config)
    provenance = Provenance.of_run("tiny.safetensors", "ab" * 32, subject, config)
    path = save_lora(result, tmp_path / "sks.safetensors", provenance=provenance)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sks.safetensors"]  # no temporary files left
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        dtypes = {key: handle.get_tensor(key).dtype for key in handle.keys()}
    assert {dtypes[k] for k in dtypes if k.endswith("weight")} == {torch.float16}
    assert {dtypes[k] for k in dtypes if k.endswith("alpha")} == {torch.float32}
    assert LoRATrainConfig.from_dict(json.loads(metadata["dbs.config"])) == LoRATrainConfig(**FAST, text_encoder_lr=1e-4)
    assert metadata["dbs.fingerprint"] == provenance.fingerprint == run_fingerprint("ab" * 32, subject, config)
    assert metadata["dbs.subject_fingerprint"] == subject.fingerprint()
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "4"
    assert metadata["ss_sd_model_name"] == "tiny.safetensors" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["dbs.save_dtype"] == "float16"
    assert history_from_metadata(metadata).losses == pytest.approx(result.losses, rel=1e-4)

    stamp = path.stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="already exists"):
        save_lora(result, path)
    assert path.stat().st_mtime_ns == stamp
    save_lora(result, path, overwrite=True, dtype=None)
    assert load_file(str(path))[next(iter(result.state_dict))].dtype == torch.float32
    with pytest.raises(ValueError, match=r"must end in \.safetensors"):
        save_lora(result, tmp_path / "sks.ckpt")
    huge = copy.copy(result)
    huge.state_dict = {**result.state_dict, next(iter(result.state_dict)): torch.full((2, 2), 1e6)}
    with pytest.raises(ValueError, match="not finite in torch.float16"):
        save_lora(huge, tmp_path / "huge.safetensors")
    assert not (tmp_path / "huge.safetensors").exists()


# A value other than the default for every config field (a new field without one fails below).
OTHER_VALUES = {
    "rank": 8, "alpha": 4.0, "steps": 10, "unet_lr": 2e-4, "text_encoder_lr": 1e-5, "lr_scheduler": "cosine",
    "lr_warmup_steps": 3, "batch_size": 2, "seed": 1, "precision": "bf16", "gradient_checkpointing": True,
    "cache_latents": False, "max_grad_norm": 0.5, "noise_offset": 0.05, "min_snr_gamma": 5.0, "class_images": 3,
    "prior_loss_weight": 0.5, "class_steps": 10, "class_guidance": 5.0, "class_seed": 1, "save_precision": "fp32",
    "optimizer": "adafactor", "record_sources": True, "fused_backward": True, "weight_precision": "bf16",
    "gradient_accumulation": 2, "ema_decay": 0.99, "ema_on_cpu": True,
    "caption_dropout": 0.1, "shuffle_tags": True, "keep_tags": 2, "conv_layers": True, "lora_type": "dora",
    "unmasked_weight": 0.5,
}
PRIOR_ONLY = {"prior_loss_weight", "class_steps", "class_guidance", "class_seed"}


def _identity_cases():
    for cls in (LoRATrainConfig, DreamBoothTrainConfig):
        for spec in field_specs(cls):
            for prior in (False, True):
                yield pytest.param(cls, spec["name"], prior, id=f"{cls.__name__}-{spec['name']}-prior_{prior}")


@pytest.mark.parametrize(("cls", "name", "prior"), list(_identity_cases()))
def test_run_fingerprint_changes_with_each_input(subject, cls, name, prior):
    """Every config field is part of the run identity, except the class-image settings while
    prior preservation is off (they change nothing then)."""
    base = {"lr_scheduler": "linear", "class_images": 2 if prior else 0}  # linear: warmup is allowed
    if name == "lr_scheduler":
        base["lr_scheduler"] = "constant"
    if name == "class_images":
        base["class_images"] = 0
    if name == "ema_on_cpu":  # only with an EMA
        base["ema_decay"] = 0.99
    if name == "keep_tags":  # only with shuffle_tags
        base["shuffle_tags"] = True
    config = cls(**base)
    changed_config = cls(**{**base, name: OTHER_VALUES[name]})
    assert getattr(changed_config, name) != getattr(config, name)
    fingerprint = run_fingerprint("base", subject, config, "generated:abc")
    expected_change = prior or name not in PRIOR_ONLY
    assert (run_fingerprint("base", subject, changed_config, "generated:abc") != fingerprint) == expected_change


@pytest.mark.parametrize("cls", [LoRATrainConfig, DreamBoothTrainConfig])
def test_the_run_identity_is_the_global_batch_however_it_is_split(subject, cls):
    """batch_size x gradient_accumulation x processes is one job however it is split (the same
    draws, the same training up to float sums); another global batch is another job."""
    whole = run_fingerprint("base", subject, cls(batch_size=4))
    assert run_fingerprint("base", subject, cls(batch_size=2, gradient_accumulation=2)) == whole
    assert run_fingerprint("base", subject, cls(batch_size=1, gradient_accumulation=2), processes=2) == whole
    assert run_fingerprint("base", subject, cls(batch_size=2), processes=2) == whole
    assert run_fingerprint("base", subject, cls(batch_size=2), processes=1) != whole
    assert run_fingerprint("base", subject, cls(batch_size=4), processes=2) != whole


def test_run_fingerprint_changes_with_base_subject_and_class_images(subject):
    config, with_prior = LoRATrainConfig(), LoRATrainConfig(class_images=2)
    base = run_fingerprint("base", subject, config)
    assert base == run_fingerprint("base", make_subject(), LoRATrainConfig())
    assert run_fingerprint("other", subject, config) != base
    assert run_fingerprint("base", make_subject(3), config) != base
    assert run_fingerprint("base", make_subject(flip=True), config) != base
    # the class images count only when prior preservation is on
    assert run_fingerprint("base", subject, config, "generated:a") == run_fingerprint("base", subject, config, "generated:b")
    assert run_fingerprint("base", subject, with_prior, "generated:a") != \
        run_fingerprint("base", subject, with_prior, "generated:b")
    # LoRA and DreamBooth runs of the same inputs never share a fingerprint
    assert run_fingerprint("base", subject, DreamBoothTrainConfig(class_images=0)) != base


def test_loss_curve_image_draws_axes_and_curves():
    losses = [1.0 / (1 + 0.05 * i) + 0.05 * math.sin(i) for i in range(200)]
    image = loss_curve_image(losses, title="LoRA", extra_curves={"prior": [0.5] * 200}, width=400, height=240)
    assert image.shape == (1, 240, 400, 3) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    colourful = (image[0].max(dim=-1).values - image[0].min(dim=-1).values) > 0.3
    assert int(colourful.sum()) > 200  # the coloured curves are there
    one = loss_curve_image([0.7])
    assert one.shape == (1, 320, 512, 3) and float(one.std()) > 0
    empty = loss_curve_image([])
    assert empty.shape == (1, 320, 512, 3)
    with_nan = loss_curve_image([1.0, float("nan"), 0.5, float("inf"), 0.4])
    assert torch.isfinite(with_nan).all()


def test_cli_trains_and_saves_with_a_progress_line(tmp_path, capsys):

    checkpoint = placeholder.write_random_sd15_checkpoint(tmp_path / "tiny.safetensors", size="tiny")
    images = write_photos(tmp_path / "photos", 3, 96)
    (images / "img1.txt").write_text("a photo of sks toy, side view")
    output = tmp_path / "out.safetensors"
    command = [
        sys.executable, "-m", "trainers", "lora", "--checkpoint", str(checkpoint), "--images", str(images),
        "--instance-prompt", PROMPT, "--output", str(output), "--tokenizer", str(tokenizer_dir()),
        "--resolution", "64", "--steps", "4", "--rank", "4", "--text-encoder-lr", "1e-4", "--captions",
        "--record-sources", "--loss-curve", str(tmp_path / "loss.png"),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=repo_root(), capture_output=True, timeout=300)
    stderr = done.stderr.decode()  # bytes: text mode would turn the progress line's \r into \n
    assert done.returncode == 0, stderr[-3000:]
    assert "\r[###" in stderr and "] 4/4 loss" in stderr
    assert "saved" in done.stdout.decode()
    state = load_file(str(output))
    assert len(state) == 120
    with safe_open(str(output), "pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["dbs.captions"]) == sorted({PROMPT, "a photo of sks toy, side view"})
    assert len(metadata["dbs.base_fingerprint"]) == 64 and "dbs.fingerprint" in metadata
    assert (tmp_path / "loss.png").stat().st_size > 0

    # The identical command reuses the file; another run may not replace it without --overwrite.
    # (In this process: the subprocess above proved the entry point; these runs train nothing.)
    content = output.read_bytes()
    argv = command[3:]  # after "python -m trainers"
    code, out, err = run_cli(argv, capsys)
    assert code == 0 and f"reused (identical earlier run) {output}" in out, err[-2000:]
    assert "] 1/4 loss" not in err and output.read_bytes() == content
    code, _, err = run_cli(argv + ["--seed", "1"], capsys)
    assert code == 2 and "exists" in err and output.read_bytes() == content
    code, _, err = run_cli(argv[:-2] + ["--unet-lr", "0"], capsys)
    assert code == 2 and "unet_lr must be a finite number > 0" in err


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``python -m trainers`` in this process: (exit status, stdout, stderr)."""
    from trainers.cli import main as cli_main

    try:
        code = cli_main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_models_loaded_in_inference_mode_are_refused_with_advice(subject):
    with torch.inference_mode():
        frozen = placeholder.tiny_sd15(seed=0, tokenizer_dir=tokenizer_dir())
    with pytest.raises(RuntimeError, match=r"inference_mode\(False\)"):
        train_lora(frozen, subject, LoRATrainConfig(**FAST))


def test_python_m_trainers_lists_commands():
    done = subprocess.run([sys.executable, "-m", "trainers"], cwd=repo_root(), capture_output=True, text=True)
    assert done.returncode == 0 and "lora" in done.stdout and "placeholder" in done.stdout
