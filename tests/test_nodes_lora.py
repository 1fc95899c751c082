"""LoRATrain and ApplyLoRAScaled inside an imported ComfyUI, on the full-size random SD1.5."""

from __future__ import annotations

import importlib
import logging
import re

import numpy as np
import pytest
import torch

from tests.support.comfy_inprocess import import_comfyui, import_pack

pytestmark = pytest.mark.nodes

STEPS = 2


@pytest.fixture(scope="module")
def env(tmp_path_factory, test_models):
    base = tmp_path_factory.mktemp("comfy-inproc")
    folder_paths = import_comfyui(base, {"checkpoints": [test_models["checkpoint"]]})
    pack = import_pack()
    nodes_mod = importlib.import_module("dreambooth_studio.nodes")
    return {"base": base, "folder_paths": folder_paths, "pack": pack, "nodes": nodes_mod,
            "ckpt": test_models["checkpoint"].name}


def _subject(env, n=2, res=64):
    images = importlib.import_module("dreambooth_studio.trainers.data.images")
    gen = torch.Generator().manual_seed(0)
    raw = [torch.rand(80, 96, 3, generator=gen) for _ in range(n)]
    return images.prepare_subject(raw, [f"img{i}.png" for i in range(n)], "a photo of sks toy",
                                  "a photo of toy", res).subject


def _train_node(env, name, text_encoder_lr=0.0, **overrides):
    lora_train = importlib.import_module("dreambooth_studio.nodes.lora_train")
    settings = dict(rank=4, alpha=4.0, steps=STEPS, unet_lr=1e-4, text_encoder_lr=text_encoder_lr,
                    lr_scheduler="constant", lr_warmup_steps=0, batch_size=1, seed=0, precision="fp32",
                    gradient_checkpointing=False, cache_latents=True, sample_every=0, validate_every=0)
    settings.update(overrides)
    return lora_train.LoRATrain.execute(subject=_subject(env), ckpt_name=env["ckpt"], output_name=name,
                                        overwrite=False, **settings)


@pytest.fixture(scope="module")
def trained(env):
    unet_only = _train_node(env, "inproc_unet_only")
    with_te = _train_node(env, "inproc_unet_te", text_encoder_lr=1e-5, conv_layers=True)  # and the convolutions
    return {"unet": unet_only, "te": with_te}


@pytest.fixture(scope="module")
def base_model(env):
    import comfy.sd

    path = env["folder_paths"].get_full_path("checkpoints", env["ckpt"])
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)
    return model, clip, vae


def test_trained_loras_are_saved_and_returned(env, trained):
    for out in trained.values():
        lora_sd, name, curve, samples, best_lora, best_name, launch_command = out.result
        # no fidelity models: the "best" LoRA is the final one
        assert best_name == name and best_lora.keys() == lora_sd.keys()
        assert launch_command == ""  # trained here: nothing exported
        path = env["base"] / "models" / "loras" / name
        assert path.is_file(), path
        assert curve.ndim == 4 and curve.shape[-1] == 3
        assert samples.ndim == 4 and samples.shape[-1] == 3  # sample_every 0: an image saying so
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in lora_sd)
    assert not any(k.startswith("lora_te_") for k in trained["unet"].result[0])
    assert any(k.startswith("lora_te_") for k in trained["te"].result[0])


@pytest.mark.parametrize("which", ["unet", "te"])
def test_comfy_loads_every_key(env, trained, base_model, which, caplog):
    import comfy.lora
    import comfy.sd

    model, clip, _ = base_model
    lora_sd = trained[which].result[0]
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(lora_sd, key_map)
        comfy.sd.load_lora_for_models(model, clip, lora_sd, 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in lora_sd}
    assert len(patches) == len(modules)
    unet_modules = [m for m in modules if m.startswith("lora_unet_")]
    attention = [m for m in unet_modules if "_attn" in m]
    assert len(attention) == 128  # every attention projection of SD1.5's UNet
    if which == "te":
        assert len(modules) - len(unet_modules) == 48  # q/k/v/out of 12 CLIP layers
        # conv_layers: the 3x3 convolutions of 22 ResNet blocks, 3 downsamplers and 3 upsamplers
        assert len(unet_modules) - len(attention) == 50
        assert all(lora_sd[f"{m}.lora_down.weight"].shape[2:] == (3, 3) for m in set(unet_modules) - set(attention))
    else:
        assert len(unet_modules) == 128


@pytest.fixture(scope="module")
def trained_dora(env):
    # a learning rate that moves the magnitudes by more than the file's fp16 rounding in 2 steps
    return _train_node(env, "inproc_dora", text_encoder_lr=1e-3, conv_layers=True, lora_type="dora", unet_lr=1e-2)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_comfy_loads_a_dora_file_and_patches_what_apply_lora_merges(env, trained_dora, base_model, scale, caplog):
    """Every key of a DoRA file (attention, convolutions and text encoder, each with an input-axis
    .dora_scale) loads in ComfyUI's LoRA loader, and ComfyUI's patched weights at strength 1 and
    others (it interpolates W + k (W' - W)) are the engine's merge of the same tensors."""
    import comfy.lora
    import comfy.sd

    lora = importlib.import_module("dreambooth_studio.trainers.training.lora")
    model, clip, _ = base_model
    lora_sd = trained_dora.result[0]
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in lora_sd}
    assert len(modules) == 128 + 50 + 48 and all(f"{m}.dora_scale" in lora_sd for m in modules)
    with caplog.at_level(logging.WARNING):
        patched_model, patched_clip = comfy.sd.load_lora_for_models(model, clip, lora_sd, scale, scale)
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text and "ERROR" not in caplog.text
    assert len(patched_model.patches) == 128 + 50 and len(patched_clip.patcher.patches) == 48
    worst, moved = 0.0, 0.0
    sides = [(patched_model, model, comfy.lora.model_lora_keys_unet(model.model, {})),
             (patched_clip.patcher, clip.patcher, comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}))]
    for patched, original, key_map in sides:
        weights = original.model.state_dict()
        for module in sorted(m for m in modules if m in key_map):
            key = key_map[module]
            base_weight = weights[key].float()
            theirs = comfy.lora.calculate_weight(patched.patches[key], base_weight.clone(), key)
            down, up, dora_scale = (lora_sd[f"{module}.{part}"] for part in ("lora_down.weight", "lora_up.weight",
                                                                               "dora_scale"))
            ours = lora.merged_weight(base_weight, down, up, float(lora_sd[f"{module}.alpha"]), dora_scale, scale)
            assert dora_scale.shape == (1, base_weight.shape[1], *[1] * (base_weight.dim() - 2)), module
            worst = max(worst, float((theirs - ours).abs().max() / (theirs - base_weight).abs().max()))
            if scale == 1.0:  # how far the magnitudes took the weight from the plain merge of the same up/down
                plain = lora.merged_weight(base_weight, down, up, float(lora_sd[f"{module}.alpha"]), None)
                moved = max(moved, float((ours - plain).abs().max() / (ours - base_weight).abs().max()))
    logging.getLogger(__name__).info("scale %g: ComfyUI vs merged_weight %.2e of the update; DoRA vs plain %.2e",
                                     scale, worst, moved)
    assert worst < 1e-4 and (moved > 0.01 or scale != 1.0) and "ERROR" not in caplog.text  # calculate_weight logs its failures


def _encode(clip, text="a photo of sks toy"):
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens(tokens, return_pooled=False)


def test_scales_act_on_their_side_only(env, trained, base_model):
    apply = importlib.import_module("dreambooth_studio.nodes.lora_apply").ApplyLoRAScaled
    model, clip, _ = base_model
    lora_sd = trained["te"].result[0]
    run = lambda u, t: apply.execute(model=model, clip=clip, lora_name="(use the lora input)",  # noqa: E731
                                     unet_scale=u, text_encoder_scale=t, lora=lora_sd).result
    base_cond = _encode(clip)

    m00, c00 = run(0.0, 0.0)
    assert m00 is model and c00 is clip  # nothing patched: identical to no LoRA

    m10, c10 = run(1.0, 0.0)
    assert len(m10.patches) == 128 + 50 and c10 is clip  # attention and convolutions
    assert torch.equal(_encode(c10), base_cond)

    m01, c01 = run(0.0, 1.0)
    assert m01 is model and len(c01.patcher.patches) == 48
    assert not torch.equal(_encode(c01), base_cond)
    # the input objects were cloned, never patched in place
    assert not model.patches and not clip.patcher.patches


@pytest.mark.parametrize("scale", [0.5, -1.0])
def test_fractional_and_negative_scales_add_that_share_of_the_update(env, trained, base_model, scale):
    """A patched layer is base + scale * alpha/rank * up @ down, on the UNet and the text encoder
    alike (a scale handled as on/off would give the whole update)."""
    import comfy.lora

    apply = importlib.import_module("dreambooth_studio.nodes.lora_apply").ApplyLoRAScaled
    model, clip, _ = base_model
    lora_sd = trained["te"].result[0]
    patched_model, patched_clip = apply.execute(model=model, clip=clip, lora_name="(use the lora input)",
                                                unet_scale=scale, text_encoder_scale=scale, lora=lora_sd).result
    unet_keys = comfy.lora.model_lora_keys_unet(model.model, {})
    clip_keys = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    cases = [
        (patched_model, model, unet_keys, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
        (patched_clip.patcher, clip.patcher, clip_keys, "lora_te_text_model_encoder_layers_0_self_attn_q_proj"),
    ]
    for patched, original, key_map, module in cases:
        key = key_map[module]
        base_weight = original.model.state_dict()[key].float()
        weight = comfy.lora.calculate_weight(patched.patches[key], base_weight.clone(), key)
        down, up = lora_sd[f"{module}.lora_down.weight"].float(), lora_sd[f"{module}.lora_up.weight"].float()
        update = up @ down * float(lora_sd[f"{module}.alpha"]) / down.shape[0]
        assert update.abs().max() > 0, module
        # within float32 rounding of weights about 1000x larger than the update
        assert torch.allclose(weight - base_weight, scale * update, rtol=1e-2, atol=1e-8), module


def test_lora_matching_nothing_is_an_error(env, base_model):
    apply = importlib.import_module("dreambooth_studio.nodes.lora_apply").ApplyLoRAScaled
    model, clip, _ = base_model
    bogus = {"lora_unet_not_a_layer.lora_down.weight": torch.zeros(4, 8),
             "lora_unet_not_a_layer.lora_up.weight": torch.zeros(8, 4)}
    with pytest.raises(ValueError, match="matches no UNet or text-encoder module"):
        apply.execute(model=model, clip=clip, lora_name="(use the lora input)", unet_scale=1.0,
                      text_encoder_scale=1.0, lora=bogus)


def test_partial_match_is_reported(env, trained, base_model, caplog):
    apply = importlib.import_module("dreambooth_studio.nodes.lora_apply").ApplyLoRAScaled
    model, clip, _ = base_model
    lora_sd = dict(trained["unet"].result[0])
    lora_sd["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(4, 8)
    lora_sd["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(8, 4)
    with caplog.at_level(logging.WARNING):
        apply.execute(model=model, clip=clip, lora_name="(use the lora input)", unet_scale=1.0,
                      text_encoder_scale=1.0, lora=lora_sd)
    assert "128 UNet and 0 text-encoder modules matched of 129; 1 unmatched" in caplog.text
    assert "lora_unet_not_a_layer" in caplog.text


def test_identical_rerun_reuses_the_file(env, trained, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("base model loaded for a job whose result is on disk")

    ckpt_mod = importlib.import_module("dreambooth_studio.trainers.sd15.checkpoint")
    monkeypatch.setattr(ckpt_mod, "load_sd15_single_file", no_load)
    again = _train_node(env, "inproc_unet_only")
    first = trained["unet"].result[0]
    assert set(again.result[0]) == set(first)
    assert all(torch.equal(again.result[0][k], first[k]) for k in first)


BAD_SETTINGS = [
    ({"unet_lr": 0.0}, "unet_lr"),
    ({"unet_lr": -1e-4}, "unet_lr"),
    ({"unet_lr": float("nan")}, "unet_lr"),
    ({"text_encoder_lr": float("nan")}, "text_encoder_lr"),
    ({"rank": 0}, "rank"),
    ({"rank": 129}, "rank"),
    ({"steps": 0}, "steps"),
    # ComfyUI does not check a V3 combo's value: the config names the choices
    ({"lora_type": "loha"}, "lora_type must be one of 'lora', 'dora'"),
    ({"lora_type": None}, "lora_type must be one of 'lora', 'dora'"),
]


@pytest.mark.parametrize("overrides,field", BAD_SETTINGS)
def test_bad_settings_fail_before_any_model_loads(env, monkeypatch, overrides, field):
    ckpt_mod = importlib.import_module("dreambooth_studio.trainers.sd15.checkpoint")
    monkeypatch.setattr(ckpt_mod, "load_sd15_single_file",
                        lambda *a, **k: pytest.fail("model loaded despite bad input"))
    before = set((env["base"] / "models" / "loras").iterdir())
    with pytest.raises(ValueError, match=field):
        _train_node(env, "bad_settings", **overrides)
    assert set((env["base"] / "models" / "loras").iterdir()) == before


@pytest.mark.parametrize(("name", "reason"), [
    ("../escape", "contains a path separator"), ("a/b", "contains a path separator"),
    ("sub\\dir", "contains a path separator"), ("CON", "reserved device name"), ("nul.txt", "reserved device name"),
    ("", "output name is empty"), ("..", "contains '..'"), (".hidden", "starts with '.'"),
])
def test_bad_output_names_fail_before_any_model_loads(env, monkeypatch, name, reason):
    ckpt_mod = importlib.import_module("dreambooth_studio.trainers.sd15.checkpoint")
    monkeypatch.setattr(ckpt_mod, "load_sd15_single_file",
                        lambda *a, **k: pytest.fail("model loaded despite bad input"))
    base = env["base"]

    def listing():
        return sorted(str(p.relative_to(base)) for p in base.rglob("*") if "input" not in p.parts)

    before = listing()
    with pytest.raises(ValueError, match=re.escape(reason) + ".*Use letters, digits"):
        _train_node(env, name)
    assert listing() == before  # nothing written anywhere (models, output, temp)


def test_existing_name_without_overwrite_is_an_error(env, trained, monkeypatch):
    ckpt_mod = importlib.import_module("dreambooth_studio.trainers.sd15.checkpoint")
    monkeypatch.setattr(ckpt_mod, "load_sd15_single_file",
                        lambda *a, **k: pytest.fail("model loaded despite bad input"))
    path = env["base"] / "models" / "loras" / "inproc_unet_only.safetensors"
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        _train_node(env, "inproc_unet_only", seed=1)  # a different job under the same name
    assert path.read_bytes() == before


@pytest.mark.parametrize("kind", ["sdxl", "text"])
def test_checkpoint_that_is_not_sd15_is_refused(env, monkeypatch, kind):
    ckpt_dir = env["base"] / "models" / "checkpoints"
    if kind == "sdxl":
        from safetensors.torch import save_file

        save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(4),
                   "model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 2816),
                   "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight":
                       torch.zeros(4, 2048)}, str(ckpt_dir / "fake_sdxl.safetensors"))
        name = "fake_sdxl.safetensors"
    else:
        (ckpt_dir / "notes.safetensors").write_text("not a model")
        name = "notes.safetensors"
    ckpt_mod = importlib.import_module("dreambooth_studio.trainers.sd15.checkpoint")
    monkeypatch.setattr(ckpt_mod, "load_sd15_single_file",
                        lambda *a, **k: pytest.fail("model loaded despite bad input"))
    lora_train = importlib.import_module("dreambooth_studio.nodes.lora_train")
    with pytest.raises(ValueError, match=name.replace(".", r"\.") if kind == "text" else "SDXL"):
        lora_train.LoRATrain.execute(subject=_subject(env), ckpt_name=name, output_name="never_written",
                                     overwrite=False, rank=4, alpha=4.0, steps=1, unet_lr=1e-4,
                                     text_encoder_lr=0.0, lr_scheduler="constant", lr_warmup_steps=0,
                                     batch_size=1, seed=0, precision="fp32", gradient_checkpointing=False,
                                     cache_latents=True)
    assert not (env["base"] / "models" / "loras" / "never_written.safetensors").exists()


def test_loss_curve_is_an_image(trained):
    curve = trained["unet"].result[2]
    assert curve.dtype == torch.float32 and 0 <= float(curve.min()) and float(curve.max()) <= 1
    assert np.asarray(curve).std() > 0


# -- LoRAScaleGrid ------------------------------------------------------------------------------------

def _grid_module():
    return importlib.import_module("dreambooth_studio.nodes.sweep_grid")


@pytest.mark.parametrize("values,message", [
    ({"unet_scales": ""}, "unet_scales is empty"),
    ({"text_encoder_scales": "0, x"}, "text_encoder_scales: 'x' is not a number"),
    ({"cfg_values": "7, nan"}, "cfg_values: nan is outside 0 to 100"),
    ({"unet_scales": "11"}, "unet_scales: 11 is outside -10 to 10"),
    ({"unet_scales": "0 1 2 3", "text_encoder_scales": "0 1 2 3", "cfg_values": "1 2 3 4 5"},
     "80 combinations is more than 64"),
])
def test_sweep_grid_refuses_bad_lists_at_validation(env, values, message):
    grid = _grid_module().LoRAScaleGrid
    inputs = {"unet_scales": "0, 1", "text_encoder_scales": "0", "cfg_values": "5", **values}
    assert message in grid.validate_inputs(**inputs)


@pytest.fixture(scope="module")
def fidelity_models(env):
    from tests.support.paths import tokenizer_dir

    placeholder = importlib.import_module("dreambooth_studio.trainers.eval.placeholder")
    fidelity = importlib.import_module("dreambooth_studio.trainers.eval.fidelity")
    paths = placeholder.write_random_fidelity_models(env["base"] / "models" / "subject_eval", tokenizer_dir())
    return fidelity.load_fidelity_models(paths["dino"], paths["clip"])


def test_sweep_grid_samples_every_combination_with_comfy_sampling(env, trained, base_model, fidelity_models):
    import nodes as comfy_nodes

    grid_node = _grid_module().LoRAScaleGrid
    fidelity = importlib.import_module("dreambooth_studio.trainers.eval.fidelity")
    model, clip, vae = base_model
    settings = dict(model=model, clip=clip, vae=vae, lora_name="(use the lora input)", positive="a photo of sks toy",
                    negative="blurry", seed=7, steps=1, sampler_name="euler", scheduler="normal", width=64, height=64,
                    unet_scales="0, 1", text_encoder_scales="0, 1", cfg_values="1, 6", lora=trained["te"].result[0])
    # scoring without the subject's photos fails before the first cell is sampled
    with pytest.raises(ValueError, match="no real images to score against"):
        grid_node.execute(**settings, fidelity_models=fidelity_models)
    subject = _subject(env)
    grid, images, labels, scores = grid_node.execute(**settings, fidelity_models=fidelity_models, subject=subject,
                                                     fidelity_prompt="a photo of a toy").result
    assert images.shape == (8, 64, 64, 3)
    assert labels.splitlines()[:3] == ["unet 0 | te 0 | cfg 1", "unet 0 | te 0 | cfg 6", "unet 0 | te 1 | cfg 1"]
    assert len(labels.splitlines()) == 8
    # 4 rows (scale pairs) x 2 columns (CFG) of 64 px cells with 3-line label strips (settings and
    # scores), plus a title band
    _, header, strip = _grid_module().label_metrics(64, lines=3)
    assert tuple(grid.shape) == (1, header + 4 * (64 + strip + 4) + 4, 2 * (64 + 4) + 4, 3)
    # each cell's scores are the engine's scores of that image against the subject, with the CLIP-T prompt
    expected = fidelity.score(fidelity_models, images, list(subject.images), ["a photo of a toy"] * 8)
    rows = scores.splitlines()
    assert "CLIP-T prompt: a photo of a toy" in rows[0]
    assert rows[2].split()[1:] == [f"{expected.dino:.3f}", f"{expected.clip_i:.3f}", f"{expected.clip_t:.3f}"]
    for row, label, cell in zip(rows[3:11], labels.splitlines(), expected.per_image, strict=True):
        assert row.split()[1:4] == [f"{v:.3f}" for v in cell] and row.endswith(label)
    # scales (0, 0) are exactly the base model through ComfyUI's own sampler
    latent = {"samples": torch.zeros([1, 4, 8, 8])}
    encode = comfy_nodes.CLIPTextEncode().encode
    plain = comfy_nodes.common_ksampler(model, 7, 1, 6.0, "euler", "normal", encode(clip, "a photo of sks toy")[0],
                                        encode(clip, "blurry")[0], latent)[0]["samples"]
    assert torch.equal(images[1], vae.decode(plain)[0].float().cpu())
    # every swept setting changes the picture
    by_label = dict(zip(labels.splitlines(), images, strict=True))
    base = by_label["unet 0 | te 0 | cfg 6"]
    for other in ("unet 1 | te 0 | cfg 6", "unet 0 | te 1 | cfg 6", "unet 0 | te 0 | cfg 1"):
        assert not torch.equal(by_label[other], base), other
    # the inputs were not patched in place
    assert not model.patches and not clip.patcher.patches
