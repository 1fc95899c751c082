"""Adafactor as the full fine-tune uses it, with a step that is cheap on memory traffic.

The arithmetic is that of ``transformers.optimization.Adafactor(scale_parameter=False,
relative_step=False, warmup_init=False, beta1=None)`` (Shazeer & Stern 2018, with fairseq's
factored estimate): an absolute learning rate, no first moment, second moments factored over the
last two dimensions of every tensor with two or more (a row and a column mean), the update clipped
to an RMS of ``clip_threshold``. Its state and group names are the same, so a training state saved
with that class resumes here.

Written for speed: on the SD1.5 UNet's 860M weights transformers' step allocates four
weight-sized temporaries (and computes an RMS of every weight that these settings never use),
about 11 s a step on a 2-core CPU, more than the forward and backward passes. Here one scratch
buffer (as large as the largest weight, kept between steps) holds the squared gradient and then
the update; for convolutions, whose last two dimensions are the 3x3 kernel, the row and column
sums and the outer product of the factors are small matrix products instead of reductions and
broadcasts over 3-element dimensions; the weight takes the update in one fused add. See
``bench/optimizer_step.py``. Results equal transformers' up to fp32 rounding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import torch


class Adafactor(torch.optim.Optimizer):
    def __init__(self, params: Iterable[Any], lr: float = 1e-3, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, weight_decay: float = 0.0) -> None:
        if lr <= 0:
            raise ValueError(f"Adafactor needs a learning rate > 0 (got {lr})")
        # transformers' group keys, with the switches this class does not take fixed: its states load here
        defaults = {"lr": lr, "eps": eps, "clip_threshold": clip_threshold, "decay_rate": decay_rate,
                    "beta1": None, "weight_decay": weight_decay, "scale_parameter": False,
                    "relative_step": False, "warmup_init": False}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["beta1"] is not None or group["scale_parameter"] or group["relative_step"]:
                raise ValueError("this Adafactor has no first moment, parameter scaling or relative steps")
            for parameter in group["params"]:
                if parameter.grad is not None:
                    self._step_one(parameter, group)
        return loss

    def _step_one(self, parameter: torch.Tensor, group: dict[str, Any]) -> None:
        grad = parameter.grad
        if grad.is_sparse:
            raise RuntimeError("Adafactor does not support sparse gradients")
        if grad.dtype != torch.float32:
            grad = grad.float()
        weight = parameter if parameter.dtype == torch.float32 else parameter.float()
        state = self.state[parameter]
        factored = grad.dim() >= 2
        if not state:
            state["step"] = 0
            if factored:
                state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
                state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad)
            state["RMS"] = 0.0  # transformers' parameter scale; unused without scale_parameter
        state["step"] += 1
        beta = 1.0 - math.pow(state["step"], group["decay_rate"])
        tiny = group["eps"][0]
        scratch = self._scratch(grad)
        torch.mul(grad, grad, out=scratch)
        if factored:
            self._factored_update(scratch, state, beta, tiny)
        else:
            second = state["exp_avg_sq"]
            second.mul_(beta).add_(scratch.add_(tiny), alpha=1.0 - beta)
            torch.rsqrt(second, out=scratch)
        update = scratch.mul_(grad)
        rms = float(torch.linalg.vector_norm(update)) / math.sqrt(update.numel())
        scale = group["lr"] / max(1.0, rms / group["clip_threshold"])
        if group["weight_decay"]:
            weight.mul_(1.0 - group["weight_decay"] * group["lr"])
        weight.add_(update, alpha=-scale)
        if weight is not parameter:
            parameter.copy_(weight)

    def _factored_update(self, squares: torch.Tensor, state: dict[str, Any], beta: float, tiny: float) -> None:
        """Update the row and column means from ``squares`` (grad**2), then overwrite ``squares``
        with the factored estimate's inverse square root (transformers' ``_approx_sq_grad``)."""
        rows, columns = squares.shape[-2], squares.shape[-1]
        row, column = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        share = 1.0 - beta  # of the new means in the moving averages
        if rows * columns <= _SMALL_TAIL:  # e.g. a 3x3 kernel: matrix products instead of 3-wide reductions
            to_means, from_logs = _tail_matrices(rows, columns, squares.device)
            flat = squares.view(-1, rows * columns)
            means = flat @ to_means  # every row mean, then every column mean
            row.lerp_(means[:, :rows].reshape(row.shape), share).add_(share * tiny)
            column.lerp_(means[:, rows:].reshape(column.shape), share).add_(share * tiny)
            del means
            # r_i * c_j = exp(-(log(row_i / mean(row)) + log(col_j)) / 2): two products and one exp
            row_logs = (row / row.mean(dim=-1, keepdim=True)).log_().view(-1, rows)
            torch.mm(row_logs, from_logs[:rows], out=flat)
            flat.addmm_(column.log().view(-1, columns), from_logs[rows:]).exp_()
        else:
            row.lerp_(squares.mean(dim=-1), share).add_(share * tiny)
            column.lerp_(squares.mean(dim=-2), share).add_(share * tiny)
            row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_()
            torch.mul(row_factor.unsqueeze(-1), column.rsqrt().unsqueeze(-2), out=squares)

    def _scratch(self, like: torch.Tensor) -> torch.Tensor:
        buffer = getattr(self, "_buffer", None)
        if buffer is None or buffer.numel() < like.numel() or buffer.device != like.device:
            buffer = self._buffer = torch.empty(like.numel(), dtype=torch.float32, device=like.device)
        return buffer[: like.numel()].view(like.shape)


# Last two dimensions with at most this many elements (convolution kernels) are summed and
# multiplied out with matrix products.
_SMALL_TAIL = 64


@functools.lru_cache(maxsize=8)
def _tail_matrices(rows: int, columns: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For a flattened rows x columns block: the (rows*columns, rows+columns) matrix that gives its
    row means and then its column means, and the (rows+columns, rows*columns) one that spreads
    -1/2 of each row's and each column's value over the block's cells."""
    index = torch.arange(rows * columns, device=device)
    to_means = torch.zeros(rows * columns, rows + columns, device=device)
    to_means[index, index // columns] = 1.0 / columns
    to_means[index, rows + index % columns] = 1.0 / rows
    from_logs = (to_means > 0).T.float().mul_(-0.5).contiguous()
    return to_means, from_logs
