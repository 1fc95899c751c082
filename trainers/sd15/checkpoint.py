"""Loading and saving Stable Diffusion 1.5 models, offline and without pickle.

- :func:`describe_checkpoint` reads only a safetensors header and says whether the file is an
  SD1.5 checkpoint; if not, its :class:`CheckpointError` says what the file looks like (SDXL,
  SD2.x, a LoRA, a ControlNet, an inpainting model, not a model at all) and what to pick instead.
  It is cheap and runs before any model is built.
- :func:`load_sd15_single_file` builds diffusers/transformers models from a single-file
  checkpoint with the configs shipped in :mod:`trainers.sd15.architecture` (inferred from the tensor
  shapes, so the tiny test layout loads too).
- :func:`load_sd15_diffusers_folder` loads a local diffusers folder.
- :func:`save_sd15_single_file` writes the single-file layout ComfyUI loads, atomically.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..files.fileio import atomic_save_safetensors, check_metadata, refuse_existing
from . import architecture, convert

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

PICK_SD15 = (
    "Pick an SD1.5 checkpoint instead: a single .safetensors file (about 2-4 GB) holding "
    "model.diffusion_model.*, first_stage_model.* and cond_stage_model.transformer.* tensors, "
    "such as v1-5-pruned-emaonly.safetensors or a DreamBooth model trained from it."
)


class CheckpointError(ValueError):
    """A file is not a usable SD1.5 checkpoint; the message says why and what to do."""


Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`describe_checkpoint` learned from a header, including the inferred configs."""

    path: Path
    file_bytes: int
    num_tensors: int
    dtypes: dict[str, int]
    metadata: dict[str, str]
    size: str  # "full" (the real SD1.5 widths), "tiny" (test layout) or "custom"
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    text_encoder_config: dict[str, Any]
    ignored_keys: tuple[str, ...] = ()


@dataclass
class SD15Components:
    """The pieces a trainer needs, as diffusers/transformers objects."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    size: str = "full"
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Header reading
# ---------------------------------------------------------------------------------------------


def read_safetensors_header(path: str | os.PathLike) -> tuple[Shapes, dict[str, str], dict[str, int]]:
    """Tensor shapes, metadata and dtype counts of a safetensors file, reading only its header.

    Raises CheckpointError for files that are not safetensors, are damaged or truncated.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name} is not a safetensors file: it is only {size} bytes long.")
        (header_len,) = struct.unpack("<Q", head)
        # A safetensors file is an 8-byte little-endian length and a JSON object. Only when that is
        # not what the file holds are its first bytes read as another format's signature (the
        # length's low byte can be 0x80 or "P" in a real safetensors file).
        raw = handle.read(header_len) if header_len <= min(size - 8, _MAX_HEADER_BYTES) else b""
        if raw[:1] != b"{":
            if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
                raise CheckpointError(
                    f"{path.name} is a PyTorch pickle file renamed to .safetensors. Pickle files can run code "
                    f"when loaded, so this pack only reads real safetensors files. {PICK_SD15}"
                )
            raise CheckpointError(
                f"{path.name} is not a safetensors file (its first bytes are not a safetensors header; "
                f"is it a renamed text, image or archive file?), or it is truncated. {PICK_SD15}"
            )
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(
            f"{path.name} is not a safetensors file (unreadable header: {error}). {PICK_SD15}"
        ) from None

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        metadata = {}
    shapes: Shapes = {}
    dtypes: Counter[str] = Counter()
    data_end = 0
    try:
        for name, entry in header.items():
            dtype, shape, (start, end) = (
                entry["dtype"],
                tuple(int(n) for n in entry["shape"]),
                entry["data_offsets"],
            )
            count = 1
            for n in shape:
                count *= n
            if dtype in _DTYPE_BYTES and end - start != count * _DTYPE_BYTES[dtype]:
                raise ValueError(f"tensor {name!r} has {end - start} bytes for shape {shape} {dtype}")
            shapes[name] = shape
            dtypes[dtype] += 1
            data_end = max(data_end, int(end))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"{path.name} has a damaged safetensors header ({error}). {PICK_SD15}"
        ) from None
    available = size - 8 - header_len
    if data_end > available:
        raise CheckpointError(
            f"{path.name} is truncated: its header describes {data_end + 8 + header_len} bytes but the file has "
            f"{size}. The download or copy was probably interrupted; copy the file again."
        )
    return shapes, {str(k): str(v) for k, v in metadata.items()}, dict(dtypes)


# ---------------------------------------------------------------------------------------------
# Streaming tensors out of a safetensors file
# ---------------------------------------------------------------------------------------------

_TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
}  # fmt: skip


def _tensor_table(path: Path) -> tuple[int, dict[str, tuple[str, tuple[int, ...], int, int]]]:
    """(data start, {key: (dtype, shape, begin, end)}) of a safetensors file, from its header."""
    read_safetensors_header(path)  # clear errors for damaged, truncated or foreign files
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length).decode("utf-8"))
    header.pop("__metadata__", None)
    table = {key: (entry["dtype"], tuple(int(n) for n in entry["shape"]), *map(int, entry["data_offsets"]))
             for key, entry in header.items()}
    return 8 + length, table


def stream_tensors(path: str | os.PathLike, keys: Iterable[str] | None = None,
                   dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of a safetensors file, read one at a time with plain reads in file order.

    Floating tensors are cast to ``dtype`` when given. Only one tensor in the file's dtype is held
    at a time and the file is not memory-mapped, so reading a checkpoint into models costs the
    models plus one tensor: no page-cache pages of the whole file counted in this process.
    """
    path = Path(path)
    start, table = _tensor_table(path)
    wanted = list(table) if keys is None else list(keys)
    missing = [key for key in wanted if key not in table]
    if missing:
        raise CheckpointError(f"{path.name} has no tensor {missing[0]!r}")
    order = sorted(wanted, key=lambda key: table[key][2])
    with open(path, "rb", buffering=0) as handle:
        for key in order:
            name, shape, begin, end = table[key]
            if name not in _TORCH_DTYPES:
                raise CheckpointError(f"{path.name}: tensor {key!r} has dtype {name}, which is not a model weight type")
            raw = torch.empty(end - begin, dtype=torch.uint8)
            handle.seek(start + begin)
            view = memoryview(raw.numpy())
            done = 0
            while done < len(view):
                count = handle.readinto(view[done:])
                if not count:
                    raise CheckpointError(f"{path.name} is truncated inside tensor {key!r}; copy the file again")
                done += count
            tensor = raw.view(_TORCH_DTYPES[name]).reshape(shape)
            if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            yield key, tensor
            del raw, tensor


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------

_LORA_MARKERS = re.compile(
    r"(lora_down|lora_up|lora_A\.|lora_B\.|\.lora\.|lora_unet_|lora_te\d?_|\.hada_w|\.lokr_w)"
)


def _strip(shapes: Shapes, prefix: str) -> Shapes:
    return {key[len(prefix) :]: shape for key, shape in shapes.items() if key.startswith(prefix)}


def _count(keys: Any, pattern: str) -> int:
    """Number of distinct integers N in keys matching ``pattern`` with ``{}`` for N."""
    regex = re.compile("^" + re.escape(pattern).replace(r"\{\}", r"(\d+)") + r"\.")
    found = {int(m.group(1)) for key in keys if (m := regex.match(key))}
    if found and found != set(range(len(found))):
        raise CheckpointError(
            f"damaged checkpoint: blocks {pattern.replace('{}', 'N')} are numbered {sorted(found)}"
        )
    return len(found)


def _foreign_kind(shapes: Shapes) -> tuple[str, str] | None:
    """(what the file looks like, how to fix) for files that are clearly not SD1.5 checkpoints."""
    keys = shapes.keys()
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    unet_in = shapes.get(convert.UNET_PREFIX + "input_blocks.0.0.weight")

    if any(_LORA_MARKERS.search(k) for k in keys) and unet_in is None:
        return (
            "a LoRA (low-rank adapter) file, not a full model",
            "Apply LoRAs with ApplyLoRAScaled or LoraLoader on top of a base model, and pick the SD1.5 "
            "base checkpoint here.",
        )
    if (
        "controlnet_cond_embedding.conv_in.weight" in keys
        or has("input_hint_block.")
        or has("control_model.")
        or has("zero_convs.")
        or has("controlnet_")
    ):
        return (
            "a ControlNet model",
            "Put ControlNets in models/controlnet and use them with CannyControl or ControlNetLoader.",
        )

    context_dims = {
        shape[1] for key, shape in shapes.items() if key.endswith("attn2.to_k.weight") and len(shape) == 2
    }
    if has("conditioner.embedders.1.") or 2048 in context_dims or 1280 in context_dims:
        return ("an SDXL checkpoint (two text encoders, 2048-wide cross-attention)", PICK_SD15)
    if has(convert.UNET_PREFIX + "label_emb.") or has("conditioner.embedders."):
        return ("an SDXL-family checkpoint (the UNet has a label_emb / added conditioning)", PICK_SD15)
    if has("cond_stage_model.model.") or 1024 in context_dims:
        return (
            "a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder, 1024-wide cross-attention)",
            PICK_SD15,
        )
    if has(convert.UNET_PREFIX) and unet_in is None:
        return ("a diffusion model of another architecture (SD3, Flux or similar)", PICK_SD15)
    if unet_in is not None and unet_in[1] != 4:
        if unet_in[1] == 9:
            what = (
                "an SD1.5 inpainting checkpoint (its UNet takes 9 input channels: latent, mask, masked image)"
            )
        elif unet_in[1] == 8:
            what = "an InstructPix2Pix-style edit checkpoint (its UNet takes 8 input channels)"
        else:
            what = f"a UNet with {unet_in[1]} input channels (SD1.5 uses 4)"
        return (what, "Training needs the regular text-to-image model. " + PICK_SD15)
    if unet_in is None:
        if "conv_in.weight" in keys and has("down_blocks."):
            return (
                "a diffusers-layout UNet file without VAE and text encoder",
                "Pick the single-file checkpoint, or load the whole diffusers folder with "
                "load_sd15_diffusers_folder. " + PICK_SD15,
            )
        if has("encoder.") and has("decoder."):
            return ("a VAE file without UNet and text encoder", "Put VAEs in models/vae. " + PICK_SD15)
        if has("emb_params") or has("string_to_param") or has("clip_l") or has("clip_g"):
            return ("a textual-inversion embedding", "Put embeddings in models/embeddings. " + PICK_SD15)
        if has("text_model.") or has("transformer.text_model.") or has("encoder.layers."):
            return ("a text-encoder file without UNet and VAE", PICK_SD15)
        sample = ", ".join(sorted(keys)[:4]) or "no tensors at all"
        return (
            f"a file with {len(shapes)} tensors that are not a Stable Diffusion model (keys such as {sample})",
            PICK_SD15,
        )
    return None


def _infer_unet_config(u: Shapes) -> dict[str, Any]:
    keys = u.keys()
    if "out.2.weight" not in u:
        raise CheckpointError("the UNet has no output layer (out.2.weight)")
    levels: list[dict[str, Any]] = []
    current: dict[str, Any] = {"channels": None, "layers": 0, "attention": False}
    first_attention = None
    for index in range(1, _count(keys, "input_blocks.{}")):
        if f"input_blocks.{index}.0.op.weight" in u:
            levels.append(current)
            current = {"channels": None, "layers": 0, "attention": False}
            continue
        resnet = u.get(f"input_blocks.{index}.0.out_layers.3.weight")
        if resnet is None:
            raise CheckpointError(f"unrecognized UNet block input_blocks.{index}")
        current["channels"] = resnet[0]
        current["layers"] += 1
        if f"input_blocks.{index}.1.proj_in.weight" in u:
            current["attention"] = True
            first_attention = first_attention or index
    levels.append(current)
    if first_attention is None or any(level["channels"] is None for level in levels):
        raise CheckpointError("the UNet has no cross-attention or an empty level; it is not SD1.5-shaped")
    attention = f"input_blocks.{first_attention}.1."
    layers = [level["layers"] for level in levels]
    down = ["CrossAttnDownBlock2D" if level["attention"] else "DownBlock2D" for level in levels]
    return {
        "in_channels": u["input_blocks.0.0.weight"][1],
        "out_channels": u["out.2.weight"][0],
        "block_out_channels": [level["channels"] for level in levels],
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "down_block_types": down,
        "up_block_types": [t.replace("Down", "Up") for t in reversed(down)],
        "cross_attention_dim": u[attention + "transformer_blocks.0.attn2.to_k.weight"][1],
        "transformer_layers_per_block": _count(keys, attention + "transformer_blocks.{}"),
        "use_linear_projection": len(u[attention + "proj_in.weight"]) == 2,
    }


def _infer_vae_config(v: Shapes) -> dict[str, Any]:
    keys = v.keys()
    levels = _count(keys, "encoder.down.{}")
    return {
        "in_channels": v["encoder.conv_in.weight"][1],
        "out_channels": v["decoder.conv_out.weight"][0],
        "block_out_channels": [v[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)],
        "layers_per_block": _count(keys, "encoder.down.0.block.{}"),
        "latent_channels": v["post_quant_conv.weight"][0],
    }


def _infer_text_encoder_config(t: Shapes) -> dict[str, Any]:
    vocab, hidden = t["embeddings.token_embedding.weight"]
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": t["encoder.layers.0.mlp.fc1.weight"][0],
        "projection_dim": hidden,
        "num_hidden_layers": _count(t.keys(), "encoder.layers.{}"),
        "num_attention_heads": architecture.clip_num_heads(hidden),
        "max_position_embeddings": t["embeddings.position_embedding.weight"][0],
    }


def _complete(derived: dict[str, Any], preset: Any) -> tuple[dict[str, Any], str]:
    """The shipped preset that has exactly these derived fields, else the full one updated."""
    for size in architecture.SIZES:
        config = preset(size)
        if all(config.get(key) == value for key, value in derived.items()):
            return config, size
    config = preset("full")
    config.update(derived)
    return config, "custom"


def infer_configs(shapes: Shapes) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], str]:
    """(unet, vae, text encoder) configs and size label from single-file tensor shapes."""
    text = convert.normalize_text_encoder_keys(_strip(shapes, convert.TEXT_ENCODER_PREFIX))  # type: ignore[arg-type]
    try:
        unet, unet_size = _complete(
            _infer_unet_config(_strip(shapes, convert.UNET_PREFIX)), architecture.unet_config
        )
        vae, vae_size = _complete(
            _infer_vae_config(_strip(shapes, convert.VAE_PREFIX)), architecture.vae_config
        )
        te, te_size = _complete(_infer_text_encoder_config(text), architecture.text_encoder_config)
    except KeyError as error:
        raise CheckpointError(
            f"the checkpoint lacks tensor {error.args[0]!r}; the file is damaged or incomplete"
        ) from None
    sizes = {unet_size, vae_size, te_size}
    return unet, vae, te, sizes.pop() if len(sizes) == 1 else "custom"


def describe_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Check that ``path`` is an SD1.5 single-file safetensors checkpoint, reading only its header.

    Raises CheckpointError (a ValueError) naming what the file looks like and what to do.
    """
    path = Path(path)
    if path.is_dir():
        hint = (
            " It looks like a diffusers folder: load it with load_sd15_diffusers_folder."
            if (path / "model_index.json").is_file()
            else ""
        )
        raise CheckpointError(f"{path} is a folder, not a checkpoint file.{hint} {PICK_SD15}")
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist. {PICK_SD15}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path.name} is a pickle-based {path.suffix} file. Pickle files can run arbitrary code when "
            f"loaded, so this pack only reads .safetensors. Download the .safetensors version of the model "
            f"(most model pages offer one) or convert it with a trusted tool first."
        )
    shapes, metadata, dtypes = read_safetensors_header(path)
    foreign = _foreign_kind(shapes)
    if foreign is not None:
        what, fix = foreign
        raise CheckpointError(f"{path.name} is not an SD1.5 checkpoint: it looks like {what}. {fix}")

    parts, ignored, unknown = convert.split_ldm_keys(shapes.keys())
    missing = [name for name, keys in parts.items() if not keys]
    if missing:
        names = {
            "unet": "UNet (model.diffusion_model.*)",
            "vae": "VAE (first_stage_model.*)",
            "text_encoder": "text encoder (cond_stage_model.transformer.*)",
        }
        raise CheckpointError(
            f"{path.name} is an incomplete SD1.5 checkpoint: it has no {' and no '.join(names[m] for m in missing)}. "
            f"Training needs all three parts in one file. {PICK_SD15}"
        )
    if unknown:
        raise CheckpointError(
            f"{path.name} has {len(unknown)} tensors outside the SD1.5 parts, e.g. "
            f"{', '.join(sorted(unknown)[:4])}. It may be a merged or extended model. {PICK_SD15}"
        )
    try:
        unet, vae, te, size = infer_configs(shapes)
    except convert.ConversionError as error:
        raise CheckpointError(f"{path.name}: {error}") from None
    except CheckpointError as error:
        raise CheckpointError(f"{path.name} is not a usable SD1.5 checkpoint: {error}. {PICK_SD15}") from None
    if unet["cross_attention_dim"] != te["hidden_size"]:
        raise CheckpointError(
            f"{path.name}: the UNet attends to {unet['cross_attention_dim']}-wide text features but the text "
            f"encoder produces {te['hidden_size']}; the parts do not belong together. {PICK_SD15}"
        )
    return CheckpointInfo(
        path=path,
        file_bytes=path.stat().st_size,
        num_tensors=len(shapes),
        dtypes=dtypes,
        metadata=metadata,
        size=size,
        unet_config=unet,
        vae_config=vae,
        text_encoder_config=te,
        ignored_keys=tuple(sorted(ignored)),
    )


# ---------------------------------------------------------------------------------------------
# Building models
# ---------------------------------------------------------------------------------------------


def load_tokenizer(tokenizer_dir: str | os.PathLike) -> Any:
    """CLIP tokenizer from a local folder, limited to SD1.5's 77 tokens.

    The folder holds vocab.json + merges.txt (ComfyUI's comfy/sd1_tokenizer, diffusers releases)
    or a tokenizer.json (what transformers 5 saves).
    """
    from transformers import CLIPTokenizer

    folder = Path(tokenizer_dir)
    missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
    if missing and not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"tokenizer folder {folder} lacks {', '.join(missing)} (or a tokenizer.json); point it to "
            f"ComfyUI's comfy/sd1_tokenizer or a diffusers folder's tokenizer/"
        )
    # ComfyUI's copy says model_max_length 8192; SD1.5's text encoder has 77 positions.
    return CLIPTokenizer.from_pretrained(
        str(folder), model_max_length=architecture.MAX_TOKEN_LENGTH, local_files_only=True
    )


def make_noise_scheduler() -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**architecture.noise_scheduler_config())


def build_unet(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor] | None = None) -> Any:
    """A UNet from ``config``: randomly initialised, or holding ``state_dict`` (diffusers keys)."""
    from diffusers import UNet2DConditionModel

    return _build(lambda: UNet2DConditionModel(**config), state_dict, "UNet")


def build_vae(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor] | None = None) -> Any:
    from diffusers import AutoencoderKL

    return _build(lambda: AutoencoderKL(**config), state_dict, "VAE")


def build_text_encoder(
    config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor] | None = None
) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    return _build(lambda: CLIPTextModel(CLIPTextConfig(**config)), state_dict, "text encoder")


def _build(factory: Any, state_dict: Mapping[str, torch.Tensor] | None, name: str) -> Any:
    if state_dict is None:
        return factory().eval()
    with convert.parameters_on_meta():
        model = factory()
    try:
        model.load_state_dict(convert.keys_for(model, state_dict), strict=True, assign=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise CheckpointError(f"{name}: the weights do not match the model config: {detail}") from None
    convert.assert_materialized(model, name)
    return model.eval()


def model_config(model: Any) -> dict[str, Any]:
    """The constructor config of a diffusers model or of a transformers CLIPTextModel."""
    config = model.config
    if hasattr(config, "to_dict") and not isinstance(config, Mapping):  # transformers
        values = config.to_dict()
        return {key: values[key] for key in architecture.text_encoder_config() if key in values}
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


# ---------------------------------------------------------------------------------------------
# Public loaders and saver
# ---------------------------------------------------------------------------------------------


COMPONENTS = ("unet", "vae", "text_encoder")
# One dtype for every part, or one per part ("unet", "vae", "text_encoder"; missing ones are fp32).
Dtypes = torch.dtype | Mapping[str, torch.dtype]


def component_dtypes(dtype: Dtypes) -> dict[str, torch.dtype]:
    """The dtype each part is loaded in."""
    if isinstance(dtype, torch.dtype):
        return dict.fromkeys(COMPONENTS, dtype)
    unknown = sorted(set(dtype) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown model part(s) {', '.join(unknown)}; parts: {', '.join(COMPONENTS)}")
    return {name: dtype.get(name, torch.float32) for name in COMPONENTS}


def _single_file_state(info: CheckpointInfo, name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One part's weights with diffusers keys, streamed from the file in ``dtype``."""
    parts, _, _ = convert.split_ldm_keys(_header_keys(info.path))
    prefix = convert.COMPONENT_PREFIXES[name]
    state = {key[len(prefix):]: tensor for key, tensor in stream_tensors(info.path, parts[name], dtype)}
    config = {"unet": info.unet_config, "vae": info.vae_config, "text_encoder": info.text_encoder_config}[name]
    try:
        return convert.LDM_TO_DIFFUSERS[name](state, config)
    except convert.ConversionError as error:
        raise CheckpointError(f"{info.path.name}: {error}") from None


def _single_file_part(info: CheckpointInfo, name: str, dtype: torch.dtype, load: bool = True) -> Any:
    config = {"unet": info.unet_config, "vae": info.vae_config, "text_encoder": info.text_encoder_config}[name]
    builder = {"unet": build_unet, "vae": build_vae, "text_encoder": build_text_encoder}[name]
    if not load:
        return empty_part(builder, config, dtype)
    return builder(config, _single_file_state(info, name, dtype))


def empty_part(builder: Any, config: Mapping[str, Any], dtype: torch.dtype) -> Any:
    """A part whose parameters hold no memory yet (meta tensors of ``dtype``): filled later with
    ``load_state_dict(load_part_state(...), assign=True)``."""
    with convert.parameters_on_meta():
        model = builder(config)
    for parameter in model.parameters():
        parameter.data = parameter.data.to(dtype)
    return model.eval()


def load_sd15_single_file(
    path: str | os.PathLike, tokenizer_dir: str | os.PathLike, dtype: Dtypes = torch.float32,
    parts: tuple[str, ...] = COMPONENTS,
) -> SD15Components:
    """Load an SD1.5 single-file safetensors checkpoint into diffusers/transformers models.

    Offline and pickle-free: configs come from :mod:`trainers.sd15.architecture` (chosen by the tensor
    shapes), the tokenizer from ``tokenizer_dir``. ``dtype`` is one dtype for all parts or one per
    part. Weights are streamed tensor by tensor into the models: loading peaks at the models in
    their dtypes plus one tensor. Parts left out of ``parts`` are built without weights (meta
    tensors), to be read later (``training.residency``). Models are returned on the CPU in eval mode.
    """
    info = describe_checkpoint(path)
    tokenizer = load_tokenizer(tokenizer_dir)
    dtypes = component_dtypes(dtype)
    models = {name: _single_file_part(info, name, dtypes[name], name in parts) for name in COMPONENTS}
    logger.info("loaded %s (%s SD1.5 layout, %s)", info.path.name, info.size,
                ", ".join(f"{name} {str(d).replace('torch.', '')}" for name, d in dtypes.items()))
    return SD15Components(
        unet=models["unet"],
        vae=models["vae"],
        text_encoder=models["text_encoder"],
        tokenizer=tokenizer,
        noise_scheduler=make_noise_scheduler(),
        size=info.size,
        source=str(info.path),
    )


def load_part_state(source: str | os.PathLike, name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One part's weights (diffusers keys, in ``dtype``) read again from the file or diffusers folder a
    model was loaded from, streamed: for putting back a part that was freed while training."""
    if name not in COMPONENTS:
        raise ValueError(f"unknown model part {name!r}; parts: {', '.join(COMPONENTS)}")
    source = Path(source)
    if source.is_dir():
        state = _read_tensors(_folder_weight_files(source / name, _FOLDER_WEIGHTS[name]), dtype)
        return convert.normalize_text_encoder_keys(state) if name == "text_encoder" else state
    return _single_file_state(describe_checkpoint(source), name, dtype)


def _require_tokenizer(path: Path, tokenizer_dir: str | os.PathLike | None) -> None:
    if tokenizer_dir is None and not path.is_dir():
        raise FileNotFoundError(
            "no CLIP tokenizer folder: give ComfyUI's comfy/sd1_tokenizer (a single-file checkpoint has none)"
        )


def check_sd15(path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None) -> None:
    """Refuse anything that :func:`load_sd15` could not load as SD1.5: not an SD1.5 single file or
    diffusers folder (reading only headers and config files, no weights), or a single file
    without a tokenizer folder."""
    path = Path(path)
    if path.is_dir():
        _check_diffusers_folder(path)
    else:
        describe_checkpoint(path)
    _require_tokenizer(path, tokenizer_dir)


def load_sd15(
    path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None, dtype: Dtypes = torch.float32,
    parts: tuple[str, ...] = COMPONENTS,
) -> SD15Components:
    """An SD1.5 single-file checkpoint or diffusers folder, whichever ``path`` is, with each part in
    ``dtype`` (one for all, or one per part).

    A folder's own ``tokenizer/`` is used when ``tokenizer_dir`` is None.
    """
    if Path(path).is_dir():
        return load_sd15_diffusers_folder(path, tokenizer_dir, dtype, parts)
    _require_tokenizer(Path(path), tokenizer_dir)
    return load_sd15_single_file(path, tokenizer_dir, dtype, parts)


def _header_keys(path: Path) -> list[str]:
    shapes, _, _ = read_safetensors_header(path)
    return list(shapes)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} is missing; is {path.parent.parent} a complete diffusers folder?"
        ) from None
    except ValueError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None


def _check_diffusers_folder(folder: Path) -> None:
    """Refuse non-SD1.5 diffusers folders from their config files, before loading weights."""
    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    unet = _read_json(folder / "unet" / "config.json")
    text = _read_json(folder / "text_encoder" / "config.json")
    pipeline = index.get("_class_name", "")
    problem = None
    if "XL" in pipeline or "text_encoder_2" in index or unet.get("addition_embed_type"):
        problem = "an SDXL pipeline"
    elif unet.get("cross_attention_dim") in (1024, 2048) or text.get("hidden_act") == "gelu":
        problem = "a Stable Diffusion 2.x pipeline"
    elif unet.get("in_channels", 4) != 4:
        problem = (
            f"a pipeline whose UNet takes {unet.get('in_channels')} input channels (inpainting or edit model)"
        )
    elif unet.get("cross_attention_dim") != text.get("hidden_size"):
        problem = "a pipeline whose UNet and text encoder do not fit together"
    if problem:
        raise CheckpointError(
            f"{folder} is not an SD1.5 diffusers folder: it looks like {problem}. {PICK_SD15}"
        )


_FOLDER_WEIGHTS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}


def _folder_weight_files(sub: Path, stem: str) -> list[Path]:
    """The safetensors files of one diffusers subfolder: single file, shards, or fp16 variant."""
    single = sub / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    index = sub / f"{stem}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [name for name in shards if not (sub / name).is_file()]
        if not shards or missing:
            raise CheckpointError(
                f"{sub} is incomplete: shards {missing or shards} listed in {index.name} are missing"
            )
        return [sub / name for name in shards]
    variant = sub / f"{stem}.fp16.safetensors"
    if variant.is_file():
        return [variant]
    raise CheckpointError(
        f"{sub} has no safetensors weights ({stem}.safetensors); pickle (.bin) weights are never loaded. "
        f"Convert the folder to safetensors or pick a single-file .safetensors checkpoint."
    )


def weight_shapes(path: str | os.PathLike) -> Shapes:
    """Every tensor shape of a base model (a single file, or a diffusers folder's UNet, VAE and
    text encoder), from the headers only."""
    path = Path(path)
    if not path.is_dir():
        return read_safetensors_header(path)[0]
    shapes: Shapes = {}
    for sub, stem in _FOLDER_WEIGHTS.items():
        for file in _folder_weight_files(path / sub, stem):
            shapes.update({f"{sub}.{key}": shape for key, shape in read_safetensors_header(file)[0].items()})
    return shapes


def _read_tensors(files: list[Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {key: tensor for file in files for key, tensor in stream_tensors(file, dtype=dtype)}


def load_sd15_diffusers_folder(
    path: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    dtype: Dtypes = torch.float32,
    parts: tuple[str, ...] = COMPONENTS,
) -> SD15Components:
    """Load a local SD1.5 diffusers folder (unet/, vae/, text_encoder/, tokenizer/), safetensors only.

    Each model is built from its folder's config.json and must match its weights exactly (no
    silently re-initialised layers). Nothing is looked up online. The noise scheduler is always
    SD1.5's DDPM training schedule from the shipped config.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder. Use load_sd15_single_file for .safetensors files.")
    _check_diffusers_folder(folder)
    files = {name: _folder_weight_files(folder / name, stem) for name, stem in _FOLDER_WEIGHTS.items()}
    tokenizer = load_tokenizer(tokenizer_dir if tokenizer_dir is not None else folder / "tokenizer")
    dtypes = component_dtypes(dtype)

    def diffusers_config(name: str) -> dict[str, Any]:
        config = _read_json(folder / name / "config.json")
        return {key: value for key, value in config.items() if not key.startswith("_")}

    unet_config, vae_config = diffusers_config("unet"), diffusers_config("vae")
    text_config = CLIPTextConfig.from_dict(_read_json(folder / "text_encoder" / "config.json"))
    unet = _build(
        lambda: UNet2DConditionModel.from_config(unet_config),
        _read_tensors(files["unet"], dtypes["unet"]),
        f"UNet in {folder / 'unet'}",
    ) if "unet" in parts else empty_part(lambda config: UNet2DConditionModel.from_config(config), unet_config,
                                          dtypes["unet"])
    vae = _build(
        lambda: AutoencoderKL.from_config(vae_config),
        _read_tensors(files["vae"], dtypes["vae"]),
        f"VAE in {folder / 'vae'}",
    )
    text_state = convert.normalize_text_encoder_keys(_read_tensors(files["text_encoder"], dtypes["text_encoder"]))
    text_encoder = _build(
        lambda: CLIPTextModel(text_config), text_state, f"text encoder in {folder / 'text_encoder'}"
    )
    channels = list(unet.config.block_out_channels)
    size = next(
        (s for s in architecture.SIZES if architecture.unet_config(s)["block_out_channels"] == channels),
        "custom",
    )
    return SD15Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=make_noise_scheduler(),
        size=size,
        source=str(folder),
    )


class CastTensors(Mapping[str, torch.Tensor]):
    """Tensors cast to ``dtype`` one at a time, when each is read (``dtype=None`` keeps each
    tensor's dtype): writing a checkpoint never holds a cast copy of the whole model."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> None:
        self._tensors, self._dtype = tensors, dtype

    def dtype_of(self, key: str) -> torch.dtype:
        tensor = self._tensors[key]
        return self._dtype if self._dtype is not None and tensor.is_floating_point() else tensor.dtype

    def shape_of(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def __getitem__(self, key: str) -> torch.Tensor:
        tensor = self._tensors[key].detach().to("cpu")
        if self._dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self._dtype)
        return tensor.contiguous()

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def sd15_state_dict(
    unet: Any, vae: Any, text_encoder: Any, dtype: torch.dtype | None = torch.float16
) -> Mapping[str, torch.Tensor]:
    """The single-file (LDM) state dict of three models, floating tensors cast to ``dtype``.

    ``dtype=None`` keeps each tensor's dtype. Each tensor is a detached CPU copy or view, made when
    it is read (see :class:`CastTensors`).
    """
    state = convert.diffusers_to_ldm(
        unet.state_dict(),
        vae.state_dict(),
        text_encoder.state_dict(),
        model_config(unet),
        model_config(vae),
        model_config(text_encoder),
    )
    return CastTensors(state, dtype)


def save_sd15_single_file(
    path: str | os.PathLike,
    unet: Any,
    vae: Any,
    text_encoder: Any,
    dtype: torch.dtype | None = torch.float16,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an SD1.5 single-file checkpoint (LDM keys) that ComfyUI loads as SD15.

    Atomic (temporary file in the same folder, then renamed), never replaces an existing file
    unless ``overwrite``; ``metadata`` must map str to str. Returns the path.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint file name must end in .safetensors, got {path.name}")
    metadata = check_metadata(metadata)
    refuse_existing(path, overwrite)
    metadata.setdefault("format", "pt")
    state = sd15_state_dict(unet, vae, text_encoder, dtype)
    return atomic_save_safetensors(state, path, metadata=metadata, overwrite=overwrite)
