"""Only what trains stays resident: frozen parts leave memory once their outputs are cached.

After the latents are cached the VAE is not needed until a sample image is decoded; after the
text embeddings are cached a frozen text encoder is not needed at all while training (the sample
prompts are encoded up front). :class:`Residency` frees such a part's weights (its parameters
become meta tensors: no memory) and puts them back when asked: read again from the checkpoint the
models were loaded from, streamed tensor by tensor, in the dtype they had. Without a source file
a part on a GPU is moved to the CPU instead, and a part on the CPU stays (nothing to read it
back from). The UNet of a run can start unloaded, read only once the VAE and text encoder have
left (:meth:`Residency.not_loaded`), so the three never share memory.

Buffers (CLIP's position ids) stay: they are tiny and not in the checkpoint.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..sd15.checkpoint import COMPONENTS, SD15Components, load_part_state
from ..sd15.convert import keys_for

log = logging.getLogger(__name__)


@dataclass
class _Away:
    how: str  # "freed" (parameters on meta, read back from the source) or "offloaded" (moved to the CPU)
    device: torch.device
    dtype: torch.dtype


def _first_parameter(model: torch.nn.Module) -> torch.nn.Parameter:
    return next(model.parameters())


def free_parameters(model: torch.nn.Module) -> None:
    """Replace every parameter by a meta tensor of the same shape, dtype and requires_grad."""
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None and not parameter.is_meta:
                module._parameters[name] = torch.nn.Parameter(
                    torch.empty_like(parameter, device="meta"), requires_grad=parameter.requires_grad)


def parameters_freed(model: torch.nn.Module) -> bool:
    """Whether no parameter of ``model`` holds memory."""
    return all(parameter.is_meta for parameter in model.parameters())


class Residency:
    """Frees and restores the frozen parts of one job's models (``base``, loaded from ``source``)."""

    def __init__(self, base: SD15Components, source: str | os.PathLike | None = None) -> None:
        self.base = base
        self.source = source if source is not None else (base.source or None)
        self._away: dict[str, _Away] = {}

    def is_away(self, name: str) -> bool:
        return name in self._away

    def not_loaded(self, name: str, device: torch.device | str, dtype: torch.dtype) -> None:
        """Part ``name`` was built without its weights (``load_sd15(parts=...)``): :meth:`restore`
        reads them from the source onto ``device`` in ``dtype`` when the run needs it."""
        if self.source is None:
            raise ValueError(f"the {name} can only be left unloaded when there is a file to read it from")
        self._away[name] = _Away("freed", torch.device(device), dtype)

    def device_of(self, name: str) -> torch.device:
        """Where part ``name`` is, or will be once restored."""
        away = self._away.get(name)
        return away.device if away is not None else _first_parameter(getattr(self.base, name)).device

    def release(self, name: str) -> bool:
        """Free part ``name`` ("vae" or "text_encoder"); False when it must stay (no source, CPU)."""
        if name not in COMPONENTS or name == "unet":
            raise ValueError(f"only the VAE and the text encoder can be released, not {name!r}")
        if name in self._away:
            return True
        model = getattr(self.base, name)
        parameter = _first_parameter(model)
        device, dtype = parameter.device, parameter.dtype
        if any(p.requires_grad for p in model.parameters()):
            raise RuntimeError(f"the {name} is being trained: it cannot leave memory")
        if self.source is not None and os.path.exists(self.source):
            free_parameters(model)
            self._away[name] = _Away("freed", device, dtype)
        elif device.type != "cpu":
            model.to("cpu")
            self._away[name] = _Away("offloaded", device, dtype)
        else:
            log.debug("the %s stays in memory: no checkpoint file to read it back from", name)
            return False
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("%s left %s (%s) until it is needed again", name, device.type, self._away[name].how)
        return True

    def restore(self, name: str) -> None:
        """Put part ``name`` back where and in the dtype it was (no-op when it never left)."""
        away = self._away.pop(name, None)
        if away is None:
            return
        model = getattr(self.base, name)
        if away.how == "offloaded":
            model.to(away.device)
            return
        assert self.source is not None
        state = keys_for(model, load_part_state(self.source, name, away.dtype))
        model.load_state_dict(state, strict=True, assign=True)
        del state
        model.to(away.device)

    def restore_all(self) -> None:
        for name in list(self._away):
            self.restore(name)

    @contextmanager
    def as_in_source(self, name: str, dtype: torch.dtype = torch.float32) -> Iterator[Any]:
        """Frozen part ``name`` holding the source file's values in ``dtype`` for the block (writing a
        checkpoint: a part kept in bf16 while training is written with the file's own values), then
        as it was before (freed again, or back in its training dtype). Without a source file the
        part is used as it is."""
        model = getattr(self.base, name)
        if self.source is None or not os.path.exists(self.source):
            self.restore(name)
            yield model
            return
        away = self._away.pop(name, None)
        parameter = _first_parameter(model)
        device = away.device if away is not None else parameter.device
        kept = parameter.dtype
        model.load_state_dict(keys_for(model, load_part_state(self.source, name, dtype)), strict=True, assign=True)
        model.to(device)
        try:
            yield model
        finally:
            if away is not None:
                free_parameters(model)
                self._away[name] = away
            elif kept != dtype:
                model.to(kept)

    @contextmanager
    def borrowed(self, name: str) -> Iterator[Any]:
        """Part ``name`` in memory for the block (a sample round's VAE), released again after."""
        away = name in self._away
        if away:
            self.restore(name)
        try:
            yield getattr(self.base, name)
        finally:
            if away:
                self.release(name)


def after_caching(residency: Residency | None, *, cached_latents: bool, frozen_text: bool) -> None:
    """Once the latents and text embeddings are cached: free the VAE when the latents are cached and
    the text encoder when it is frozen, then read a UNet that waited for them to leave. Nothing
    happens without a residency (a caller that keeps its models as they came)."""
    if residency is None:
        return
    if cached_latents:
        residency.release("vae")
    if frozen_text:
        residency.release("text_encoder")
    residency.restore("unet")
