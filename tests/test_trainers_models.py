"""Tiny SD1.5 models, single-file save/load, checkpoint classification and placeholder files."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.support.paths import repo_root, tokenizer_dir
from trainers.sd15 import architecture as sd15_config
from trainers.sd15 import checkpoint, convert, placeholder
from trainers.sd15.checkpoint import (
    CheckpointError,
    describe_checkpoint,
    load_sd15_single_file,
    save_sd15_single_file,
)

pytestmark = pytest.mark.trainers


@pytest.fixture(scope="module")
def tiny():
    return placeholder.tiny_sd15(seed=0, tokenizer_dir=tokenizer_dir())


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    return placeholder.write_random_sd15_checkpoint(path, seed=0, size="tiny")


def _states_equal(a: torch.nn.Module, b: torch.nn.Module, cast: torch.dtype | None = None) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    if set(sa) != set(sb):
        return False
    if cast is None:
        return all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    return all(torch.equal(sa[k].to(cast), sb[k].to(cast)) for k in sa)


# ---------------------------------------------------------------------------------------------
# The tiny models behave like SD1.5
# ---------------------------------------------------------------------------------------------


def test_tiny_unet_forward_and_backward(tiny):
    unet = tiny.unet.train()
    latents = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 77, sd15_config.unet_config("tiny")["cross_attention_dim"])
    timesteps = torch.tensor([10, 900])
    out = unet(latents, timesteps, encoder_hidden_states=context).sample
    assert out.shape == latents.shape
    torch.nn.functional.mse_loss(out, torch.randn_like(out)).backward()
    grads = {name: p.grad for name, p in unet.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # Gradient reaches the first and last layers and the cross-attention to the text.
    for name in (
        "conv_in.weight",
        "conv_out.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    ):
        assert grads[name].abs().sum() > 0, name
    unet.zero_grad(set_to_none=True)
    unet.eval()


def test_tiny_vae_encode_decode_shapes(tiny):
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        posterior = tiny.vae.encode(image).latent_dist
        latents = posterior.sample(generator=torch.Generator().manual_seed(0))
        decoded = tiny.vae.decode(latents).sample
    assert latents.shape == (1, 4, 8, 8)  # 1/8 of the image, like SD1.5
    assert decoded.shape == image.shape
    assert torch.isfinite(decoded).all()


def test_tiny_text_encoder_on_real_tokenizer_output(tiny):
    tokenizer = tiny.tokenizer
    assert tokenizer.model_max_length == 77  # ComfyUI's tokenizer_config says 8192
    tokens = tokenizer(
        ["a photo of sks dog", "a photo of dog " * 40],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    assert tokens.shape == (2, 77)
    assert tokens[0, 0] == 49406 and tokens[0, 6] == 49407 and tokens[1, -1] == 49407
    with torch.no_grad():
        hidden = tiny.text_encoder(tokens).last_hidden_state
    assert hidden.shape == (2, 77, sd15_config.text_encoder_config("tiny")["hidden_size"])
    assert torch.isfinite(hidden).all()
    assert not torch.allclose(hidden[0], hidden[1])


def test_noise_scheduler_is_sd15_ddpm(tiny):
    scheduler = tiny.noise_scheduler
    assert type(scheduler).__name__ == "DDPMScheduler"
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.prediction_type == "epsilon"
    expected = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    assert torch.allclose(scheduler.betas, expected)


def test_random_models_are_deterministic_by_seed():
    a = placeholder.random_unet("tiny", seed=3)
    b = placeholder.random_unet("tiny", seed=3)
    c = placeholder.random_unet("tiny", seed=4)
    assert _states_equal(a, b)
    assert not _states_equal(a, c)
    # Building models does not disturb the caller's random stream.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    placeholder.random_vae("tiny", seed=0)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------------------------
# Save and load
# ---------------------------------------------------------------------------------------------


def test_save_and_load_round_trip_fp32_is_exact(tiny, tmp_path):
    path = save_sd15_single_file(
        tmp_path / "model.safetensors",
        tiny.unet,
        tiny.vae,
        tiny.text_encoder,
        dtype=torch.float32,
        metadata={"dbs.note": "round trip"},
    )
    info = describe_checkpoint(path)
    assert info.size == "tiny" and info.dtypes == {"F32": info.num_tensors}
    assert info.metadata["dbs.note"] == "round trip"
    loaded = load_sd15_single_file(path, tokenizer_dir())
    assert loaded.size == "tiny"
    for name in ("unet", "vae", "text_encoder"):
        assert _states_equal(getattr(tiny, name), getattr(loaded, name)), name
    assert all(not p.is_meta for p in loaded.unet.parameters())
    assert loaded.tokenizer.model_max_length == 77


def test_save_fp16_and_load_keeps_fp16_precision(tiny, tmp_path):
    path = save_sd15_single_file(tmp_path / "model.safetensors", tiny.unet, tiny.vae, tiny.text_encoder)
    assert set(describe_checkpoint(path).dtypes) == {"F16"}
    loaded = load_sd15_single_file(path, tokenizer_dir())  # fp32 models with fp16 values
    for name in ("unet", "vae", "text_encoder"):
        assert {p.dtype for p in getattr(loaded, name).parameters()} == {torch.float32}
        assert _states_equal(getattr(tiny, name), getattr(loaded, name), cast=torch.float16), name
    half = load_sd15_single_file(path, tokenizer_dir(), dtype=torch.float16)
    assert {p.dtype for p in half.unet.parameters()} == {torch.float16}


def test_loaded_model_matches_original_outputs(tiny, tiny_file):
    loaded = load_sd15_single_file(tiny_file, tokenizer_dir())
    reference = placeholder.random_unet("tiny", seed=0).half().float()  # the file stores fp16
    assert _states_equal(reference, loaded.unet)
    latents, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        expected = reference(latents, 500, encoder_hidden_states=context).sample
        actual = loaded.unet(latents, 500, encoder_hidden_states=context).sample
    assert torch.equal(actual, expected)


def test_save_refuses_to_overwrite(tiny, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="already exists"):
        save_sd15_single_file(path, tiny.unet, tiny.vae, tiny.text_encoder)
    assert path.read_bytes() == b"precious"
    save_sd15_single_file(path, tiny.unet, tiny.vae, tiny.text_encoder, overwrite=True)
    assert describe_checkpoint(path).size == "tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_failed_save_leaves_nothing_behind(tiny, tmp_path, monkeypatch):
    import trainers.files.fileio

    def write_half_then_fail(tensors, handle, metadata=None):
        handle.write(b"partial data")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainers.files.fileio, "write_safetensors", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_sd15_single_file(tmp_path / "model.safetensors", tiny.unet, tiny.vae, tiny.text_encoder)
    assert list(tmp_path.iterdir()) == []


def test_save_rejects_bad_metadata_and_names(tiny, tmp_path):
    with pytest.raises(TypeError, match="str to str"):
        save_sd15_single_file(
            tmp_path / "m.safetensors", tiny.unet, tiny.vae, tiny.text_encoder, metadata={"steps": 100}
        )
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_sd15_single_file(tmp_path / "m.ckpt", tiny.unet, tiny.vae, tiny.text_encoder)
    assert list(tmp_path.iterdir()) == []


def test_load_diffusers_folder(tiny, tmp_path):
    folder = tmp_path / "sd15-diffusers"
    tiny.unet.save_pretrained(folder / "unet", safe_serialization=True)
    tiny.vae.save_pretrained(folder / "vae", safe_serialization=True)
    tiny.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    tiny.tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    loaded = checkpoint.load_sd15_diffusers_folder(folder)
    assert loaded.size == "tiny"
    for name in ("unet", "vae", "text_encoder"):
        assert _states_equal(getattr(tiny, name), getattr(loaded, name)), name
    assert loaded.tokenizer("a dog").input_ids == tiny.tokenizer("a dog").input_ids

    # Text encoders saved by transformers 4 (keys under text_model., with position_ids) load too.
    old_layout = {"text_model." + k: v.contiguous() for k, v in tiny.text_encoder.state_dict().items()}
    old_layout["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(old_layout, str(folder / "text_encoder" / "model.safetensors"))
    assert _states_equal(tiny.text_encoder, checkpoint.load_sd15_diffusers_folder(folder).text_encoder)

    # A missing weight is an error naming it, never a silently re-initialised layer.
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    incomplete = {k: v.contiguous() for k, v in tiny.unet.state_dict().items() if k != "conv_out.bias"}
    save_file(incomplete, str(unet_file))
    with pytest.raises(CheckpointError, match=r"UNet in .*conv_out\.bias"):
        checkpoint.load_sd15_diffusers_folder(folder)

    unet_file.rename(folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        checkpoint.load_sd15_diffusers_folder(folder)


def test_diffusers_folder_of_sdxl_is_refused_before_loading(tmp_path):
    folder = tmp_path / "sdxl"
    (folder / "unet").mkdir(parents=True)
    (folder / "text_encoder").mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (folder / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 2048, "in_channels": 4}))
    (folder / "text_encoder" / "config.json").write_text(json.dumps({"hidden_size": 768}))
    with pytest.raises(CheckpointError, match="SDXL"):
        checkpoint.load_sd15_diffusers_folder(folder)


def test_missing_tokenizer_folder_is_explained(tiny_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="sd1_tokenizer"):
        load_sd15_single_file(tiny_file, tmp_path)


# ---------------------------------------------------------------------------------------------
# describe_checkpoint: header-only classification
# ---------------------------------------------------------------------------------------------

_DTYPE_BYTES = {"F16": 2, "F32": 4}


def write_header_only(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "F16") -> Path:
    """A valid safetensors file with these shapes and all-zero data, stored sparse (no disk use)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        count = 1
        for n in shape:
            count *= n
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + count * _DTYPE_BYTES[dtype]],
        }
        offset += count * _DTYPE_BYTES[dtype]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw)
        handle.truncate(8 + len(raw) + offset)
    return path


def full_sd15_shapes() -> dict[str, tuple[int, ...]]:
    """Key names and shapes of a full SD1.5 single-file checkpoint, computed without weights."""
    out = {}
    for kind, prefix, to_ldm, preset in (
        ("unet", convert.UNET_PREFIX, convert.unet_diffusers_to_ldm, sd15_config.unet_config),
        ("vae", convert.VAE_PREFIX, convert.vae_diffusers_to_ldm, sd15_config.vae_config),
        (
            "text_encoder",
            convert.TEXT_ENCODER_PREFIX,
            convert.text_encoder_diffusers_to_ldm,
            sd15_config.text_encoder_config,
        ),
    ):
        meta = {k: torch.empty(s, device="meta") for k, s in convert.expected_shapes(kind, preset()).items()}
        out.update({prefix + k: tuple(v.shape) for k, v in to_ldm(meta, preset()).items()})
    return out


def test_full_size_header_is_recognised_as_sd15(tmp_path):
    shapes = full_sd15_shapes()
    shapes["cond_stage_model.transformer.text_model.embeddings.position_ids"] = (1, 77)
    shapes["alphas_cumprod"] = (1000,)
    info = describe_checkpoint(write_header_only(tmp_path / "v1-5.safetensors", shapes))
    assert info.size == "full"
    assert info.unet_config == sd15_config.unet_config()
    assert info.vae_config == sd15_config.vae_config()
    assert info.text_encoder_config == sd15_config.text_encoder_config()
    assert set(info.ignored_keys) == {
        "alphas_cumprod",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
    }
    assert info.num_tensors == 1132


def test_tiny_file_is_recognised(tiny_file):
    info = describe_checkpoint(tiny_file)
    assert info.size == "tiny"
    assert info.unet_config == sd15_config.unet_config("tiny")
    assert info.metadata["dbs.placeholder_version"] == placeholder.PLACEHOLDER_VERSION


def _sdxl_shapes() -> dict[str, tuple[int, ...]]:
    return {
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (3840, 1280),
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
        "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
    }


def _sd2_shapes() -> dict[str, tuple[int, ...]]:
    return {
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
    }


def _lora_shapes() -> dict[str, tuple[int, ...]]:
    base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    return {
        f"{base}.lora_down.weight": (8, 320),
        f"{base}.lora_up.weight": (320, 8),
        f"{base}.alpha": (),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (8, 768),
    }


@pytest.mark.parametrize(
    ("name", "shapes", "expected"),
    [
        ("sdxl.safetensors", _sdxl_shapes(), r"looks like an SDXL checkpoint.*Pick an SD1\.5 checkpoint"),
        ("sd21.safetensors", _sd2_shapes(), r"looks like a Stable Diffusion 2\.x checkpoint.*Pick an SD1\.5"),
        ("my-lora.safetensors", _lora_shapes(), r"looks like a LoRA.*ApplyLoRAScaled"),
        (
            "vae.safetensors",
            {"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 4, 3, 3)},
            "looks like a VAE file",
        ),
        (
            "unet-only.safetensors",
            {"conv_in.weight": (320, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)},
            "diffusers-layout UNet",
        ),
        (
            "random.safetensors",
            {"fc.weight": (2, 2)},
            r"not a Stable Diffusion model \(keys such as fc\.weight\)",
        ),
    ],
)
def test_describe_names_what_a_foreign_file_looks_like(tmp_path, name, shapes, expected):
    with pytest.raises(CheckpointError, match=expected) as error:
        describe_checkpoint(write_header_only(tmp_path / name, shapes))
    assert name in str(error.value)
    assert isinstance(error.value, ValueError)


def test_describe_recognises_inpainting_models(tmp_path):
    shapes = full_sd15_shapes()
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
    with pytest.raises(CheckpointError, match="inpainting checkpoint .*9 input channels"):
        describe_checkpoint(write_header_only(tmp_path / "inpaint.safetensors", shapes))


def test_describe_recognises_a_controlnet(tmp_path):
    path = placeholder.write_random_controlnet(tmp_path / "cn.safetensors", size="tiny")
    with pytest.raises(CheckpointError, match="looks like a ControlNet.*models/controlnet"):
        describe_checkpoint(path)


def test_describe_reports_incomplete_checkpoints(tmp_path):
    shapes = {k: v for k, v in full_sd15_shapes().items() if not k.startswith("first_stage_model.")}
    with pytest.raises(CheckpointError, match=r"incomplete SD1\.5 checkpoint: it has no VAE"):
        describe_checkpoint(write_header_only(tmp_path / "novae.safetensors", shapes))


def test_describe_rejects_a_text_file(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("These are my favourite prompts: a photo of sks dog on the moon\n" * 20)
    with pytest.raises(CheckpointError, match="notes.safetensors is not a safetensors file"):
        describe_checkpoint(path)


def test_describe_rejects_a_truncated_file(tiny_file, tmp_path):
    data = tiny_file.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors is truncated.*copy the file again"):
        describe_checkpoint(path)
    tiny_header = tmp_path / "tiny-header.safetensors"
    tiny_header.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        describe_checkpoint(tiny_header)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_describe_refuses_pickle_files(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"PK\x03\x04 pretend zip")
    with pytest.raises(CheckpointError, match="pickle.*only reads .safetensors"):
        describe_checkpoint(path)
    with pytest.raises(CheckpointError, match="pickle"):
        load_sd15_single_file(path, tokenizer_dir())


@pytest.mark.parametrize("start", [b"PK\x03\x04", b"\x80\x02", b"\x80\x04"], ids=["zip", "pickle2", "pickle4"])
def test_describe_refuses_a_renamed_pickle(tmp_path, start):
    path = tmp_path / "renamed.safetensors"
    path.write_bytes(start + b"\0" * 100)
    with pytest.raises(CheckpointError, match="PyTorch pickle file renamed"):
        describe_checkpoint(path)


@pytest.mark.parametrize("low_bytes", [b"\x80", b"PK"], ids=["0x80", "PK"])
def test_a_safetensors_header_length_that_starts_like_a_pickle_is_read(tmp_path, low_bytes):
    """The 8-byte header length of a real file can begin with 0x80 or "PK" (a full-size
    DreamBooth checkpoint did): it is read as the safetensors file it is."""
    wanted = int.from_bytes(low_bytes, "little")
    header = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"pad": ""}}
    size = len(json.dumps(header).encode())
    length = size + (wanted - size) % (1 << (8 * len(low_bytes)))  # the next length with those low bytes
    header["__metadata__"]["pad"] = "x" * (length - size)
    raw = json.dumps(header).encode()
    assert len(raw) == length
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", length) + raw + b"\0" * 8)
    assert path.read_bytes()[: len(low_bytes)] == low_bytes
    pad = length - size
    shapes, metadata, _ = checkpoint.read_safetensors_header(path)
    assert shapes == {"x": (2,)} and len(metadata["pad"]) == pad


def test_describe_missing_path_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        describe_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="diffusers folder"):
        describe_checkpoint(tmp_path)


def test_describe_reads_only_the_header(tmp_path, monkeypatch):
    """A 2 GB-shaped file is classified without touching the tensor data or building models."""
    path = write_header_only(tmp_path / "v1-5.safetensors", full_sd15_shapes())
    reads = []

    class Spy:
        def __init__(self, handle):
            self.handle = handle

        def read(self, n=-1):
            data = self.handle.read(n)
            reads.append(len(data))
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(checkpoint, "open", lambda *a, **k: Spy(open(*a, **k)), raising=False)
    monkeypatch.setattr(checkpoint, "build_unet", lambda *a, **k: pytest.fail("built a model"))
    assert describe_checkpoint(path).size == "full"
    assert 0 < sum(reads) < 1_000_000 and os.path.getsize(path) > 2_000_000_000


def test_load_refuses_non_sd15_before_building_models(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "build_unet", lambda *a, **k: pytest.fail("built a model"))
    path = write_header_only(tmp_path / "sdxl.safetensors", _sdxl_shapes())
    with pytest.raises(CheckpointError, match="SDXL"):
        load_sd15_single_file(path, tokenizer_dir())


# ---------------------------------------------------------------------------------------------
# Placeholder files
# ---------------------------------------------------------------------------------------------


def _tensors_sha256(path: Path) -> str:
    """Hash of the tensors (names, dtypes, bytes); safetensors orders metadata randomly on disk."""
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(str(path)).items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_tiny_checkpoint_file_is_deterministic(tiny_file, tmp_path):
    again = placeholder.write_random_sd15_checkpoint(tmp_path / "again.safetensors", seed=0, size="tiny")
    other = placeholder.write_random_sd15_checkpoint(tmp_path / "other.safetensors", seed=1, size="tiny")
    assert _tensors_sha256(again) == _tensors_sha256(tiny_file)
    assert _tensors_sha256(other) != _tensors_sha256(tiny_file)
    assert describe_checkpoint(again).metadata == describe_checkpoint(tiny_file).metadata
    with pytest.raises(FileExistsError):
        placeholder.write_random_sd15_checkpoint(again, seed=0, size="tiny")


def test_random_controlnet_has_non_zero_outputs():
    controlnet = placeholder.random_controlnet("tiny", seed=0)
    for module in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
        assert module.weight.abs().sum() > 0
    hint = torch.zeros(1, 3, 64, 64)
    hint[..., 16:48, 16:48] = 1
    with torch.no_grad():
        down, mid = controlnet(
            torch.randn(1, 4, 8, 8),
            500,
            encoder_hidden_states=torch.randn(1, 77, 32),
            controlnet_cond=hint,
            return_dict=False,
        )
    assert all(r.abs().max() > 0 for r in down) and mid.abs().max() > 0


def test_placeholder_cli_writes_tiny_files_and_skips_existing(tmp_path):
    command = [sys.executable, "-m", "trainers", "placeholder", "--out", str(tmp_path / "models"), "--tiny"]
    env = {**os.environ, "PYTHONPATH": str(repo_root())}
    first = subprocess.run(command, cwd=repo_root(), env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    names = sorted(p.name for p in (tmp_path / "models").iterdir() if not p.name.startswith("."))
    assert names == [placeholder.TINY_CONTROLNET_NAME, placeholder.TINY_CHECKPOINT_NAME]
    assert "checkpoint:" in first.stdout and "controlnet:" in first.stdout
    stamp = (tmp_path / "models" / placeholder.TINY_CHECKPOINT_NAME).stat().st_mtime_ns
    second = subprocess.run(command, cwd=repo_root(), env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "keeping existing" in second.stderr
    assert (tmp_path / "models" / placeholder.TINY_CHECKPOINT_NAME).stat().st_mtime_ns == stamp
    assert describe_checkpoint(tmp_path / "models" / placeholder.TINY_CHECKPOINT_NAME).size == "tiny"


def test_full_size_placeholder_file_loads_exactly(full_size_file):
    """The cached full-size random checkpoint holds the seed-0 models, rounded to fp16."""
    info = describe_checkpoint(full_size_file)
    assert info.size == "full" and set(info.dtypes) == {"F16"}
    loaded = load_sd15_single_file(full_size_file, tokenizer_dir(), dtype=torch.float16)  # 2 GB, not 4
    assert loaded.size == "full"
    for name, build in (
        ("vae", placeholder.random_vae),
        ("text_encoder", placeholder.random_text_encoder),
        ("unet", placeholder.random_unet),
    ):
        reference = build("full", 0)
        assert _states_equal(reference, getattr(loaded, name), cast=torch.float16), name
        del reference
        setattr(loaded, name, None)


@pytest.fixture(scope="module")
def full_size_file():
    from tests.support.models import ensure_test_models

    return ensure_test_models()["checkpoint"]


def test_save_with_unet_in_training_mode_and_grad(tiny, tmp_path):
    """Saving works on a model mid-training (requires_grad, train mode) and does not change it."""
    unet = placeholder.random_unet("tiny", seed=5).train()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    save_sd15_single_file(tmp_path / "m.safetensors", unet, tiny.vae, tiny.text_encoder, dtype=None)
    assert unet.training and all(p.requires_grad for p in unet.parameters())
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert describe_checkpoint(tmp_path / "m.safetensors").dtypes == {
        "F32": describe_checkpoint(tmp_path / "m.safetensors").num_tensors
    }


def test_write_header_only_helper_makes_valid_files(tmp_path):
    path = write_header_only(tmp_path / "x.safetensors", {"a": (2, 3), "b": (4,)}, dtype="F32")
    from safetensors.torch import load_file

    loaded = load_file(str(path))
    assert loaded["a"].shape == (2, 3) and torch.equal(loaded["b"], torch.zeros(4))
