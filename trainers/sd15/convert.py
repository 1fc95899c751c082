"""State-dict conversion between diffusers/transformers models and the original SD1.5 layout.

The original (LDM, "single file") layout is what ComfyUI, A1111 and most model sites use:

- UNet under ``model.diffusion_model.`` (``input_blocks`` / ``middle_block`` / ``output_blocks``),
- VAE under ``first_stage_model.`` (``encoder.down.<i>.block.<j>``, 1x1-conv mid attention),
- CLIP text encoder under ``cond_stage_model.transformer.text_model.``.

Conversion is a pure renaming (plus the VAE attention weights' linear <-> 1x1-conv reshape):
values and dtypes never change, so a round trip is bit-exact. The mapping is generated from the
diffusers config (number of levels, layers per level, which levels have attention), so it works
for any SD1.5-shaped config, including the tiny test one. It is strict: a key the config does not
explain, a key the config needs but the input lacks, or a shape that does not fit the config
raises :class:`ConversionError` naming the keys.

The component functions work on keys *without* the component prefix; :func:`ldm_to_diffusers`
and :func:`diffusers_to_ldm` handle whole checkpoints.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
# The text encoder's keys inside TEXT_ENCODER_PREFIX (transformers 4 kept this submodule name;
# transformers 5's CLIPTextModel has no ``text_model`` submodule).
_TEXT_MODEL = "text_model."
# Non-persistent buffer that older exports wrote to files; never part of the weights.
_POSITION_IDS = "embeddings.position_ids"

# Entries of original LDM training checkpoints that are not weights of the three models: the
# DDPM schedule buffers of LatentDiffusion and the training-time log-variance. They are skipped
# when reading (SD1.5 uses a fixed schedule, shipped in architecture.py).
LDM_SCHEDULE_BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
    }
)
# EMA copies of the UNet that non-pruned training checkpoints carry next to the weights in use.
LDM_EMA_PREFIX = "model_ema."

StateDict = dict[str, torch.Tensor]


class ConversionError(ValueError):
    """A state dict does not match the layout its config describes."""


def _format_keys(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{shown}{more}"


# ---------------------------------------------------------------------------------------------
# Mapping tables, generated from configs
# ---------------------------------------------------------------------------------------------

# Inner module names of a ResNet block: diffusers -> LDM UNet ``ResBlock``.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# diffusers -> LDM VAE ``ResnetBlock``.
_VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
# diffusers ``Attention`` (linear projections) -> LDM VAE ``AttnBlock`` (1x1 convolutions).
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
# Modules whose weight is a linear matrix in diffusers and a 1x1 conv kernel in LDM.
_VAE_CONV_AS_LINEAR = frozenset({"to_q", "to_k", "to_v", "to_out.0"})

_SAME = None  # inner names are identical in both layouts


class _Block:
    """One module subtree that moves as a whole, with optional inner renames."""

    __slots__ = ("diffusers", "ldm", "inner", "conv_as_linear")

    def __init__(
        self,
        diffusers: str,
        ldm: str,
        inner: Mapping[str, str] | None = _SAME,
        conv_as_linear: frozenset[str] = frozenset(),
    ):
        self.diffusers = diffusers
        self.ldm = ldm
        self.inner = inner
        self.conv_as_linear = conv_as_linear


class _KeyMap:
    """Bidirectional key translation between two layouts built from a list of blocks."""

    def __init__(self, blocks: list[_Block]):
        self._by_diffusers = {b.diffusers: b for b in blocks}
        self._by_ldm = {b.ldm: b for b in blocks}
        if len(self._by_diffusers) != len(blocks) or len(self._by_ldm) != len(blocks):
            raise AssertionError("duplicate block in key map")  # a bug in the table builder

    @staticmethod
    def _find(key: str, table: Mapping[str, _Block]) -> tuple[_Block, str] | None:
        parts = key.split(".")
        # Longest block prefix wins; the remainder is the inner module path plus the tensor name.
        for cut in range(len(parts) - 1, 0, -1):
            block = table.get(".".join(parts[:cut]))
            if block is not None:
                return block, ".".join(parts[cut:])
        return None

    def to_ldm(self, key: str) -> tuple[str, bool] | None:
        """LDM name of a diffusers key and whether its tensor is reshaped, or None if unknown."""
        found = self._find(key, self._by_diffusers)
        if found is None:
            return None
        block, rest = found
        module, _, tensor_name = rest.rpartition(".")
        if block.inner is None:
            return f"{block.ldm}.{rest}", False
        if module not in block.inner:
            return None
        reshaped = module in block.conv_as_linear and tensor_name == "weight"
        return f"{block.ldm}.{block.inner[module]}.{tensor_name}", reshaped

    def to_diffusers(self, key: str) -> tuple[str, bool] | None:
        """diffusers name of an LDM key and whether its tensor is reshaped, or None if unknown."""
        found = self._find(key, self._by_ldm)
        if found is None:
            return None
        block, rest = found
        module, _, tensor_name = rest.rpartition(".")
        if block.inner is None:
            return f"{block.diffusers}.{rest}", False
        for diffusers_module, ldm_module in block.inner.items():
            if ldm_module == module:
                reshaped = diffusers_module in block.conv_as_linear and tensor_name == "weight"
                return f"{block.diffusers}.{diffusers_module}.{tensor_name}", reshaped
        return None


def _per_level(value: int | list[int] | tuple[int, ...], levels: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * levels
    value = list(value)
    if len(value) != levels:
        raise ConversionError(f"config {name} has {len(value)} entries for {levels} levels")
    return value


def _unet_blocks(config: Mapping[str, Any]) -> list[_Block]:
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    levels = len(down_types)
    if len(up_types) != levels:
        raise ConversionError(
            f"config has {levels} down blocks but {len(up_types)} up blocks; SD1.5 layouts mirror them"
        )
    layers = _per_level(config["layers_per_block"], levels, "layers_per_block")
    blocks = [
        _Block("conv_in", "input_blocks.0.0"),
        _Block("time_embedding.linear_1", "time_embed.0"),
        _Block("time_embedding.linear_2", "time_embed.2"),
        _Block("conv_norm_out", "out.0"),
        _Block("conv_out", "out.2"),
    ]

    index = 1
    for level, block_type in enumerate(down_types):
        has_attention = "CrossAttn" in block_type
        for layer in range(layers[level]):
            blocks.append(
                _Block(f"down_blocks.{level}.resnets.{layer}", f"input_blocks.{index}.0", _UNET_RESNET)
            )
            if has_attention:
                blocks.append(_Block(f"down_blocks.{level}.attentions.{layer}", f"input_blocks.{index}.1"))
            index += 1
        if level < levels - 1:
            blocks.append(_Block(f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{index}.0.op"))
            index += 1

    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type != "UNetMidBlock2DCrossAttn":
        raise ConversionError(f"unsupported mid_block_type {mid_type!r}; SD1.5 uses UNetMidBlock2DCrossAttn")
    blocks += [
        _Block("mid_block.resnets.0", "middle_block.0", _UNET_RESNET),
        _Block("mid_block.attentions.0", "middle_block.1"),
        _Block("mid_block.resnets.1", "middle_block.2", _UNET_RESNET),
    ]

    index = 0
    up_layers = list(reversed(layers))
    for level, block_type in enumerate(up_types):
        has_attention = "CrossAttn" in block_type
        for layer in range(up_layers[level] + 1):
            blocks.append(
                _Block(f"up_blocks.{level}.resnets.{layer}", f"output_blocks.{index}.0", _UNET_RESNET)
            )
            if has_attention:
                blocks.append(_Block(f"up_blocks.{level}.attentions.{layer}", f"output_blocks.{index}.1"))
            if layer == up_layers[level] and level < levels - 1:
                slot = 2 if has_attention else 1
                blocks.append(
                    _Block(f"up_blocks.{level}.upsamplers.0.conv", f"output_blocks.{index}.{slot}.conv")
                )
            index += 1
    return blocks


def _vae_blocks(config: Mapping[str, Any]) -> list[_Block]:
    levels = len(config["block_out_channels"])
    layers = int(config["layers_per_block"])
    blocks = [
        _Block("quant_conv", "quant_conv"),
        _Block("post_quant_conv", "post_quant_conv"),
    ]
    for part in ("encoder", "decoder"):
        blocks += [
            _Block(f"{part}.conv_in", f"{part}.conv_in"),
            _Block(f"{part}.conv_norm_out", f"{part}.norm_out"),
            _Block(f"{part}.conv_out", f"{part}.conv_out"),
            _Block(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET),
            _Block(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET),
            _Block(
                f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION, _VAE_CONV_AS_LINEAR
            ),
        ]
    for level in range(levels):
        for layer in range(layers):
            blocks.append(
                _Block(
                    f"encoder.down_blocks.{level}.resnets.{layer}",
                    f"encoder.down.{level}.block.{layer}",
                    _VAE_RESNET,
                )
            )
        if level < levels - 1:
            blocks.append(
                _Block(
                    f"encoder.down_blocks.{level}.downsamplers.0.conv",
                    f"encoder.down.{level}.downsample.conv",
                )
            )
    for level in range(levels):
        ldm_level = levels - 1 - level  # the LDM decoder numbers its levels from the bottom
        for layer in range(layers + 1):
            blocks.append(
                _Block(
                    f"decoder.up_blocks.{level}.resnets.{layer}",
                    f"decoder.up.{ldm_level}.block.{layer}",
                    _VAE_RESNET,
                )
            )
        if level < levels - 1:
            blocks.append(
                _Block(
                    f"decoder.up_blocks.{level}.upsamplers.0.conv", f"decoder.up.{ldm_level}.upsample.conv"
                )
            )
    return blocks


# ---------------------------------------------------------------------------------------------
# Expected keys and shapes, from the model class itself (built on the meta device: no memory)
# ---------------------------------------------------------------------------------------------


def _config_key(config: Mapping[str, Any]) -> str:
    return json.dumps(dict(config), sort_keys=True, default=list)


@functools.lru_cache(maxsize=16)
def _expected_shapes(kind: str, config_json: str) -> dict[str, tuple[int, ...]]:
    config = json.loads(config_json)
    with torch.device("meta"):
        if kind == "unet":
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel(**config)
        elif kind == "vae":
            from diffusers import AutoencoderKL

            model = AutoencoderKL(**config)
        elif kind == "text_encoder":
            from transformers import CLIPTextConfig, CLIPTextModel

            model = CLIPTextModel(CLIPTextConfig(**config))
        else:
            raise ValueError(f"unknown model kind {kind!r}")
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    if kind == "text_encoder":  # transformers-5 names whatever transformers built it
        shapes = {key.removeprefix(_TEXT_MODEL): shape for key, shape in shapes.items()}
    return shapes


def keys_for(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """``state_dict`` named as ``model`` names its parameters: a CLIP text encoder of transformers 4
    keeps them under a ``text_model`` submodule, the engine's (transformers-5) names do not."""
    if hasattr(model, "text_model") and not hasattr(model, "text_projection") \
            and not any(key.startswith(_TEXT_MODEL) for key in state_dict):
        return {_TEXT_MODEL + key: tensor for key, tensor in state_dict.items()}
    return state_dict


def expected_shapes(kind: str, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """diffusers/transformers state-dict keys and shapes of a model built from ``config``.

    ``kind`` is ``"unet"``, ``"vae"`` or ``"text_encoder"``.
    """
    return dict(_expected_shapes(kind, _config_key(config)))


def _check_against_config(
    kind: str,
    converted: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    describe: dict[str, str],
) -> None:
    """Raise if ``converted`` (diffusers names) lacks keys, has extra keys or wrong shapes.

    ``describe`` maps diffusers names back to the caller's names for the message.
    """
    expected = _expected_shapes(kind, _config_key(config))
    missing = [describe.get(k, k) for k in expected if k not in converted]
    unexpected = [describe.get(k, k) for k in converted if k not in expected]
    wrong = [
        f"{describe.get(k, k)} {tuple(v.shape)} (expected {expected[k]})"
        for k, v in converted.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_format_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_format_keys(unexpected)}")
    if wrong:
        problems.append(f"wrong shape for {len(wrong)} key(s): {_format_keys(wrong, 4)}")
    if problems:
        raise ConversionError(f"{kind} weights do not match the SD1.5 {kind} config: " + "; ".join(problems))


def _raise_unknown(kind: str, layout: str, unknown: list[str]) -> None:
    if unknown:
        raise ConversionError(
            f"{len(unknown)} {kind} key(s) have no counterpart in the {layout} layout of this config: "
            f"{_format_keys(unknown)}"
        )


def _linear_to_conv(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(*weight.shape, 1, 1) if weight.ndim == 2 else weight


def _conv_to_linear(weight: torch.Tensor) -> torch.Tensor:
    if weight.ndim == 4 and weight.shape[2:] == (1, 1):
        return weight.reshape(weight.shape[0], weight.shape[1])
    return weight


# ---------------------------------------------------------------------------------------------
# UNet and VAE
# ---------------------------------------------------------------------------------------------


def _to_ldm(
    kind: str, blocks: list[_Block], state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> StateDict:
    _check_against_config(kind, state_dict, config, {})
    key_map = _KeyMap(blocks)
    out: StateDict = {}
    unknown = []
    for key, tensor in state_dict.items():
        mapped = key_map.to_ldm(key)
        if mapped is None:
            unknown.append(key)
            continue
        name, reshaped = mapped
        out[name] = _linear_to_conv(tensor) if reshaped else tensor
    _raise_unknown(kind, "LDM", unknown)
    return out


def _to_diffusers(
    kind: str, blocks: list[_Block], state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> StateDict:
    key_map = _KeyMap(blocks)
    out: StateDict = {}
    original_names: dict[str, str] = {}
    unknown = []
    for key, tensor in state_dict.items():
        mapped = key_map.to_diffusers(key)
        if mapped is None:
            unknown.append(key)
            continue
        name, reshaped = mapped
        out[name] = _conv_to_linear(tensor) if reshaped else tensor
        original_names[name] = key
    _raise_unknown(kind, "diffusers", unknown)
    # Report missing keys by their LDM names, as they would appear in the file.
    for name in _expected_shapes(kind, _config_key(config)):
        if name not in original_names:
            ldm = key_map.to_ldm(name)
            original_names[name] = ldm[0] if ldm else name
    _check_against_config(kind, out, config, original_names)
    return out


def unet_diffusers_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """diffusers ``UNet2DConditionModel`` keys -> LDM keys (without ``model.diffusion_model.``)."""
    return _to_ldm("unet", _unet_blocks(config), state_dict, config)


def unet_ldm_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """LDM UNet keys (without ``model.diffusion_model.``) -> diffusers ``UNet2DConditionModel`` keys."""
    return _to_diffusers("unet", _unet_blocks(config), state_dict, config)


def vae_diffusers_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """diffusers ``AutoencoderKL`` keys -> LDM keys (without ``first_stage_model.``)."""
    return _to_ldm("vae", _vae_blocks(config), state_dict, config)


def vae_ldm_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """LDM VAE keys (without ``first_stage_model.``) -> diffusers ``AutoencoderKL`` keys."""
    return _to_diffusers("vae", _vae_blocks(config), state_dict, config)


# ---------------------------------------------------------------------------------------------
# CLIP text encoder
# ---------------------------------------------------------------------------------------------


def normalize_text_encoder_keys(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """transformers-5 ``CLIPTextModel`` keys from either CLIP layout, without position ids.

    Accepts keys with the ``text_model.`` submodule of transformers 4 (and of LDM files) or
    without it (transformers 5); drops the ``position_ids`` buffer some exports include.
    """
    out: StateDict = {}
    for key, tensor in state_dict.items():
        name = key[len(_TEXT_MODEL) :] if key.startswith(_TEXT_MODEL) else key
        if name == _POSITION_IDS:
            continue
        if name in out:
            raise ConversionError(f"text encoder key {name!r} appears both with and without 'text_model.'")
        out[name] = tensor
    return out


def text_encoder_diffusers_to_ldm(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> StateDict:
    """``CLIPTextModel`` keys -> LDM keys (without ``cond_stage_model.transformer.``)."""
    normalized = normalize_text_encoder_keys(state_dict)
    _check_against_config("text_encoder", normalized, config, {})
    return {_TEXT_MODEL + key: tensor for key, tensor in normalized.items()}


def text_encoder_ldm_to_diffusers(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> StateDict:
    """LDM text-encoder keys (without ``cond_stage_model.transformer.``) -> transformers-5 keys."""
    normalized = normalize_text_encoder_keys(state_dict)
    _check_against_config(
        "text_encoder",
        normalized,
        config,
        {key: _TEXT_MODEL + key for key in _expected_shapes("text_encoder", _config_key(config))},
    )
    return normalized


# ---------------------------------------------------------------------------------------------
# Whole checkpoints
# ---------------------------------------------------------------------------------------------


def split_ldm_keys(keys: Iterable[str]) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """Sort single-file keys into components.

    Returns ``({"unet": [...], "vae": [...], "text_encoder": [...]}, ignored, unknown)`` with full
    key names. ``ignored`` are known non-weight entries (schedule buffers, EMA copies, position
    ids); ``unknown`` are keys no SD1.5 component owns.
    """
    parts: dict[str, list[str]] = {"unet": [], "vae": [], "text_encoder": []}
    ignored: list[str] = []
    unknown: list[str] = []
    for key in keys:
        if key.startswith(UNET_PREFIX):
            parts["unet"].append(key)
        elif key.startswith(VAE_PREFIX):
            parts["vae"].append(key)
        elif key.startswith(TEXT_ENCODER_PREFIX):
            inner = key[len(TEXT_ENCODER_PREFIX) :]
            if inner in (_POSITION_IDS, _TEXT_MODEL + _POSITION_IDS):
                ignored.append(key)
            else:
                parts["text_encoder"].append(key)
        elif key in LDM_SCHEDULE_BUFFERS or key.startswith(LDM_EMA_PREFIX):
            ignored.append(key)
        else:
            unknown.append(key)
    return parts, ignored, unknown


COMPONENT_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_ENCODER_PREFIX}


# Each part's LDM keys (without its prefix) -> diffusers/transformers keys, checked against its config.
LDM_TO_DIFFUSERS = {
    "unet": unet_ldm_to_diffusers,
    "vae": vae_ldm_to_diffusers,
    "text_encoder": text_encoder_ldm_to_diffusers,
}


def ldm_to_diffusers(
    state_dict: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    text_encoder_config: Mapping[str, Any],
) -> dict[str, StateDict]:
    """Split a single-file SD1.5 state dict into diffusers/transformers state dicts.

    Returns ``{"unet": ..., "vae": ..., "text_encoder": ...}``. Known non-weight entries are
    skipped (see :func:`split_ldm_keys`); any other foreign key raises.
    """
    parts, ignored, unknown = split_ldm_keys(state_dict.keys())
    if unknown:
        raise ConversionError(
            f"{len(unknown)} key(s) belong to no SD1.5 component (UNet {UNET_PREFIX!r}, VAE {VAE_PREFIX!r}, "
            f"text encoder {TEXT_ENCODER_PREFIX!r}): {_format_keys(unknown)}"
        )
    if ignored:
        logger.debug("skipping %d non-weight entries: %s", len(ignored), _format_keys(ignored))
    configs = {"unet": unet_config, "vae": vae_config, "text_encoder": text_encoder_config}
    out = {}
    for name, config in configs.items():
        convert = LDM_TO_DIFFUSERS[name]
        prefix = COMPONENT_PREFIXES[name]
        out[name] = convert({key[len(prefix) :]: state_dict[key] for key in parts[name]}, config)
    return out


def diffusers_to_ldm(
    unet: Mapping[str, torch.Tensor],
    vae: Mapping[str, torch.Tensor],
    text_encoder: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    text_encoder_config: Mapping[str, Any],
) -> StateDict:
    """Merge diffusers/transformers state dicts into one single-file SD1.5 state dict."""
    out: StateDict = {}
    for prefix, converted in (
        (UNET_PREFIX, unet_diffusers_to_ldm(unet, unet_config)),
        (VAE_PREFIX, vae_diffusers_to_ldm(vae, vae_config)),
        (TEXT_ENCODER_PREFIX, text_encoder_diffusers_to_ldm(text_encoder, text_encoder_config)),
    ):
        for key, tensor in converted.items():
            out[prefix + key] = tensor
    return out


# ---------------------------------------------------------------------------------------------
# Building models without allocating their random initial weights
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create modules with parameters on the meta device (no memory, no init cost).

    Buffers stay real (e.g. CLIP's non-persistent ``position_ids``). Fill the parameters with
    ``module.load_state_dict(state_dict, strict=True, assign=True)``.
    """
    original = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def assert_materialized(model: torch.nn.Module, name: str) -> None:
    """Raise if any parameter or buffer of ``model`` was left on the meta device."""
    left = [key for key, value in [*model.named_parameters(), *model.named_buffers()] if value.is_meta]
    if left:
        raise ConversionError(f"{name}: no weights were loaded for {_format_keys(left)}")
