"""diffusers <-> single-file (LDM) conversion: exact, general over configs, strict."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.paths import repo_root
from trainers.sd15 import architecture as sd15_config
from trainers.sd15 import convert
from trainers.sd15.placeholder import random_text_encoder, random_unet, random_vae, tiny_sd15

pytestmark = pytest.mark.trainers

CONVERTERS = {
    "unet": (convert.unet_diffusers_to_ldm, convert.unet_ldm_to_diffusers, sd15_config.unet_config),
    "vae": (convert.vae_diffusers_to_ldm, convert.vae_ldm_to_diffusers, sd15_config.vae_config),
    "text_encoder": (
        convert.text_encoder_diffusers_to_ldm,
        convert.text_encoder_ldm_to_diffusers,
        sd15_config.text_encoder_config,
    ),
}


@pytest.fixture(scope="module")
def tiny():
    return tiny_sd15(seed=0)


@pytest.fixture(scope="module")
def full_models():
    """Random full-size SD1.5 models (about 12 s and 4.3 GB), built once and freed after this module."""
    return {
        "unet": random_unet("full", 0),
        "vae": random_vae("full", 0),
        "text_encoder": random_text_encoder("full", 0),
    }


def engine_names(kind: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict under the names the converters use: transformers 5's for CLIP (transformers 4
    nests it under ``text_model.``)."""
    return convert.normalize_text_encoder_keys(state) if kind == "text_encoder" else state


def _assert_round_trip(kind: str, model: torch.nn.Module, size: str) -> dict[str, torch.Tensor]:
    to_ldm, to_diffusers, preset = CONVERTERS[kind]
    config = preset(size)
    original = engine_names(kind, model.state_dict())
    ldm = to_ldm(original, config)
    back = to_diffusers(ldm, config)
    assert set(back) == set(original)
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype, key
        assert back[key].shape == tensor.shape, key
        assert torch.equal(back[key], tensor), key
    assert len(ldm) == len(original)
    return ldm


@pytest.mark.parametrize("kind", sorted(CONVERTERS))
def test_tiny_round_trip_is_bit_exact(tiny, kind):
    _assert_round_trip(kind, getattr(tiny, kind), "tiny")


@pytest.mark.parametrize("kind", sorted(CONVERTERS))
def test_full_size_round_trip_is_bit_exact(full_models, kind):
    ldm = _assert_round_trip(kind, full_models[kind], "full")
    # The key counts of the released SD1.5 checkpoint (position_ids excluded).
    assert len(ldm) == {"unet": 686, "vae": 248, "text_encoder": 196}[kind]


def test_full_size_ldm_names_and_shapes_match_sd15_layout(full_models):
    """Spot checks against the published SD1.5 single-file layout."""
    unet = convert.unet_diffusers_to_ldm(full_models["unet"].state_dict(), sd15_config.unet_config())
    expected_unet = {
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
        "middle_block.1.proj_out.weight": (1280, 1280, 1, 1),
        "middle_block.2.emb_layers.1.weight": (1280, 1280),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "time_embed.2.weight": (1280, 1280),
        "out.2.weight": (4, 320, 3, 3),
    }
    for key, shape in expected_unet.items():
        assert tuple(unet[key].shape) == shape, key
    vae = convert.vae_diffusers_to_ldm(full_models["vae"].state_dict(), sd15_config.vae_config())
    expected_vae = {
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.1.downsample.conv.weight": (256, 256, 3, 3),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
    }
    for key, shape in expected_vae.items():
        assert tuple(vae[key].shape) == shape, key
    assert "decoder.up.0.upsample.conv.weight" not in vae
    text = convert.text_encoder_diffusers_to_ldm(
        full_models["text_encoder"].state_dict(), sd15_config.text_encoder_config()
    )
    assert tuple(text["text_model.encoder.layers.11.mlp.fc1.weight"].shape) == (3072, 768)
    assert tuple(text["text_model.final_layer_norm.weight"].shape) == (768,)


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_ldm_layout_agrees_with_diffusers_single_file_converter(request, size):
    """An independent oracle: diffusers' own LDM -> diffusers converter reads our LDM output back."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    models = request.getfixturevalue("full_models" if size == "full" else "tiny")
    unet, vae = (models["unet"], models["vae"]) if size == "full" else (models.unet, models.vae)
    ldm = {}
    for prefix, converted in (
        (
            convert.UNET_PREFIX,
            convert.unet_diffusers_to_ldm(unet.state_dict(), sd15_config.unet_config(size)),
        ),
        (convert.VAE_PREFIX, convert.vae_diffusers_to_ldm(vae.state_dict(), sd15_config.vae_config(size))),
    ):
        ldm.update({prefix + key: tensor for key, tensor in converted.items()})
    for model, theirs in (
        (unet, convert_ldm_unet_checkpoint(dict(ldm), sd15_config.unet_config(size))),
        (vae, convert_ldm_vae_checkpoint(dict(ldm), sd15_config.vae_config(size))),
    ):
        ours = model.state_dict()
        assert set(theirs) == set(ours)
        assert all(torch.equal(theirs[key], ours[key]) for key in ours)


def test_conversion_keeps_dtype_and_values(tiny):
    half = {k: v.to(torch.float16) for k, v in tiny.unet.state_dict().items()}
    config = sd15_config.unet_config("tiny")
    back = convert.unet_ldm_to_diffusers(convert.unet_diffusers_to_ldm(half, config), config)
    assert all(back[k].dtype == torch.float16 and torch.equal(back[k], half[k]) for k in half)


def test_vae_attention_is_linear_in_diffusers_and_conv_in_ldm(tiny):
    config = sd15_config.vae_config("tiny")
    original = tiny.vae.state_dict()
    converted = convert.vae_diffusers_to_ldm(original, config)
    linear = original["encoder.mid_block.attentions.0.to_q.weight"]
    conv = converted["encoder.mid.attn_1.q.weight"]
    assert linear.ndim == 2 and conv.shape == (*linear.shape, 1, 1)
    assert torch.equal(conv[:, :, 0, 0], linear)
    assert "encoder.mid.attn_1.norm.weight" in converted
    assert "decoder.norm_out.weight" in converted


def test_unknown_key_is_named(tiny):
    config = sd15_config.unet_config("tiny")
    ldm = convert.unet_diffusers_to_ldm(tiny.unet.state_dict(), config)
    ldm["input_blocks.1.0.bogus_layer.weight"] = torch.zeros(1)
    with pytest.raises(convert.ConversionError, match=r"input_blocks\.1\.0\.bogus_layer\.weight"):
        convert.unet_ldm_to_diffusers(ldm, config)
    state = dict(tiny.unet.state_dict())
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(convert.ConversionError, match=r"unexpected 1 key.*extra\.weight"):
        convert.unet_diffusers_to_ldm(state, config)


def test_missing_key_is_named_in_the_callers_layout(tiny):
    config = sd15_config.vae_config("tiny")
    ldm = convert.vae_diffusers_to_ldm(tiny.vae.state_dict(), config)
    del ldm["decoder.up.0.block.1.conv2.bias"]
    with pytest.raises(
        convert.ConversionError, match=r"missing 1 key.*decoder\.up\.0\.block\.1\.conv2\.bias"
    ):
        convert.vae_ldm_to_diffusers(ldm, config)
    state = dict(tiny.vae.state_dict())
    del state["encoder.conv_in.weight"]
    with pytest.raises(convert.ConversionError, match=r"encoder\.conv_in\.weight"):
        convert.vae_diffusers_to_ldm(state, config)


def test_wrong_config_is_a_shape_or_key_error_not_a_silent_success(tiny):
    ldm = convert.unet_diffusers_to_ldm(tiny.unet.state_dict(), sd15_config.unet_config("tiny"))
    with pytest.raises(convert.ConversionError):
        convert.unet_ldm_to_diffusers(ldm, sd15_config.unet_config("full"))
    wider = sd15_config.unet_config("tiny") | {"cross_attention_dim": 64}
    with pytest.raises(convert.ConversionError, match="wrong shape"):
        convert.unet_ldm_to_diffusers(ldm, wider)


def test_text_encoder_accepts_both_layouts_and_ignores_position_ids(tiny):
    config = sd15_config.text_encoder_config("tiny")
    state = engine_names("text_encoder", tiny.text_encoder.state_dict())
    ldm = convert.text_encoder_diffusers_to_ldm(state, config)
    assert all(key.startswith("text_model.") for key in ldm)
    without_prefix = {key[len("text_model.") :]: value for key, value in ldm.items()}
    for variant in (ldm, without_prefix):
        variant = dict(variant)
        variant["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        back = convert.text_encoder_ldm_to_diffusers(variant, config)
        assert set(back) == set(state)
        assert all(torch.equal(back[key], state[key]) for key in state)
    # transformers-4 style diffusers keys (with text_model.) are accepted on the way in too
    assert set(convert.text_encoder_diffusers_to_ldm(ldm, config)) == set(ldm)
    broken = dict(ldm)
    del broken["text_model.final_layer_norm.bias"]
    with pytest.raises(convert.ConversionError, match=r"text_model\.final_layer_norm\.bias"):
        convert.text_encoder_ldm_to_diffusers(broken, config)


def test_whole_checkpoint_split_skips_only_known_extras(tiny):
    configs = [
        sd15_config.unet_config("tiny"),
        sd15_config.vae_config("tiny"),
        sd15_config.text_encoder_config("tiny"),
    ]
    ldm = convert.diffusers_to_ldm(
        tiny.unet.state_dict(), tiny.vae.state_dict(), tiny.text_encoder.state_dict(), *configs
    )
    assert {key.split(".")[0] for key in ldm} == {"model", "first_stage_model", "cond_stage_model"}
    extended = dict(ldm)
    extended["alphas_cumprod"] = torch.ones(1000)
    extended["model_ema.decay"] = torch.tensor(0.999)
    extended["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    parts = convert.ldm_to_diffusers(extended, *configs)
    for name, model in (("unet", tiny.unet), ("vae", tiny.vae), ("text_encoder", tiny.text_encoder)):
        original = engine_names(name, model.state_dict())
        assert set(parts[name]) == set(original)
        assert all(torch.equal(parts[name][k], original[k]) for k in original)
    extended["some_other_model.weight"] = torch.zeros(1)
    with pytest.raises(convert.ConversionError, match="some_other_model.weight"):
        convert.ldm_to_diffusers(extended, *configs)


def test_conversion_works_on_other_sd15_shaped_configs():
    """Not just the two presets: 3 levels, 2 layers, attention on the first two levels."""
    config = sd15_config.unet_config("tiny") | {
        "block_out_channels": [32, 32, 64],
        "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "transformer_layers_per_block": 2,
    }
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**config)
    original = model.state_dict()
    ldm = convert.unet_diffusers_to_ldm(original, config)
    assert "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight" in ldm
    assert "output_blocks.2.1.conv.weight" in ldm  # upsampler of a level without attention
    assert "output_blocks.5.2.conv.weight" in ldm  # upsampler of a level with attention
    back = convert.unet_ldm_to_diffusers(ldm, config)
    assert all(torch.equal(back[k], original[k]) for k in original) and set(back) == set(original)


FORBIDDEN_IMPORTS = {
    "comfy",
    "comfy_api",
    "comfy_extras",
    "comfy_execution",
    "folder_paths",
    "server",
    "nodes",
    "execution",
    "node_helpers",
    "latent_preview",
}


def test_trainers_never_imports_comfyui():
    modules = sorted((repo_root() / "trainers").rglob("*.py"))
    assert modules, "trainers/ has no modules"
    offenders = []
    for module in modules:
        tree = ast.parse(module.read_text(encoding="utf-8"), filename=str(module))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", ""))
                in ("import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                names = [str(node.args[0].value)]
            else:
                continue
            offenders += [
                f"{module.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in FORBIDDEN_IMPORTS
            ]
    assert not offenders, f"trainers/ must not import ComfyUI modules: {offenders}"


def test_importing_trainers_is_cheap():
    code = (
        "import sys, trainers, trainers.sd15.architecture; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'safetensors') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=repo_root(),
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(repo_root()), "PATH": "/usr/bin:/bin"},
    )
    assert out.stdout.strip() == "[]"


def test_expected_shapes_does_not_allocate_weights():
    shapes = convert.expected_shapes("unet", sd15_config.unet_config("full"))
    assert len(shapes) == 686
    assert shapes["conv_in.weight"] == (320, 4, 3, 3)


def test_configs_are_fresh_copies():
    config = sd15_config.unet_config()
    config["block_out_channels"].append(1)
    assert sd15_config.unet_config()["block_out_channels"] == [320, 640, 1280, 1280]
    with pytest.raises(ValueError, match="size must be one of"):
        sd15_config.vae_config("huge")


def test_meta_parameters_context_keeps_buffers_real():
    from transformers import CLIPTextConfig, CLIPTextModel

    with convert.parameters_on_meta():
        model = CLIPTextModel(CLIPTextConfig(**sd15_config.text_encoder_config("tiny")))
    assert all(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())
    with pytest.raises(convert.ConversionError, match="no weights were loaded"):
        convert.assert_materialized(model, "text encoder")
    assert not torch.nn.Linear(2, 2).weight.is_meta  # the patch is gone afterwards


def test_paths_helper_points_at_comfyui():
    from tests.support.paths import comfyui_path, tokenizer_dir

    assert (tokenizer_dir() / "vocab.json").is_file(), f"no tokenizer under {comfyui_path()}"
    assert Path(tokenizer_dir()).is_relative_to(comfyui_path())
