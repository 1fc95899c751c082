"""Prodigy: Adam whose step size is estimated while training (Mishchenko & Defazio, "Prodigy: An
Expeditiously Adaptive Parameter-Free Learner", 2023, the Adam variant of its Algorithm 4).

One step size ``d`` for the whole run starts tiny (``d0``) and grows as the gradients show how far
the weights are from where they started: ``d_hat = d_coef * numerator / denominator`` with

- numerator: a decaying sum (by ``beta3``) of ``(d / d0) * d * lr * <g, p0 - p>``, the progress
  the steps made along the gradients (``p0``: each weight's starting value);
- denominator: the L1 norm of ``s``, a decaying sum of ``(d / d0) * d * lr * g``.

``d`` never shrinks, grows by at most ``growth_rate`` per step and never passes the largest
``d_hat`` seen. The weights then take an Adam step with learning rate ``d * lr`` (times Adam's
bias correction with ``use_bias_correction``), moments scaled by ``d``, and decoupled weight
decay. ``lr`` is a multiplier of the estimated step size: 1.0 is the method as published; a group
with ``lr`` 0.5 steps half as far (the text encoder next to the UNet). With
``safeguard_warmup`` the denominator leaves ``lr`` out, so a warm-up's small ``lr`` does not
inflate the estimate.

The group keys and state names are those of the ``prodigyopt`` package, with one difference:
there, all groups must share one ``lr`` (or 0); here each group's ``lr`` scales its own steps
and its part of the estimate. Four fp32 states per weight (``exp_avg``, ``exp_avg_sq``, ``s``,
``p0``): small for a LoRA, 13.8 GB for the SD1.5 UNet.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


class Prodigy(torch.optim.Optimizer):
    def __init__(self, params: Iterable[Any], lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999),
                 beta3: float | None = None, eps: float = 1e-8, weight_decay: float = 0.0,
                 use_bias_correction: bool = False, safeguard_warmup: bool = False, d0: float = 1e-6,
                 d_coef: float = 1.0, growth_rate: float = math.inf) -> None:
        if lr <= 0 or d0 <= 0 or d_coef <= 0:
            raise ValueError(f"Prodigy needs lr, d0 and d_coef > 0 (got {lr}, {d0}, {d_coef})")
        defaults = {"lr": lr, "betas": betas, "beta3": beta3, "eps": eps, "weight_decay": weight_decay,
                    "decouple": True, "use_bias_correction": use_bias_correction,
                    "safeguard_warmup": safeguard_warmup, "d": d0, "d0": d0, "d_max": d0, "d_numerator": 0.0,
                    "d_denom": 0.0, "d_hat": 0.0, "d_coef": d_coef, "growth_rate": growth_rate, "k": 0}
        super().__init__(params, defaults)

    @property
    def step_size(self) -> float:
        """The estimated step size ``d`` (a group's learning rate is ``d * lr``)."""
        return float(self.param_groups[0]["d"])

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        first = self.param_groups[0]
        d, d0, d_max = first["d"], first["d0"], first["d_max"]
        beta1, beta2 = first["betas"]
        beta3 = first["beta3"] if first["beta3"] is not None else math.sqrt(beta2)
        k = first["k"]
        correction = math.sqrt(1 - beta2 ** (k + 1)) / (1 - beta1 ** (k + 1)) if first["use_bias_correction"] else 1.0
        numerator = first["d_numerator"] * beta3
        denominator = 0.0
        stepped: list[tuple[torch.Tensor, dict[str, Any], float]] = []
        for group in self.param_groups:
            dlr = d * group["lr"] * correction
            weight = (d / d0) * (d if group["safeguard_warmup"] else dlr)
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                grad = parameter.grad
                if grad.is_sparse:
                    raise RuntimeError("Prodigy does not support sparse gradients")
                state = self.state[parameter]
                if not state:
                    state["step"] = 0
                    state["s"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
                    state["p0"] = parameter.detach().clone()
                    state["exp_avg"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
                if group["lr"] > 0:
                    numerator += (d / d0) * dlr * float(torch.dot(grad.flatten().float(),
                                                                  (state["p0"] - parameter).flatten().float()))
                    state["exp_avg"].mul_(beta1).add_(grad, alpha=d * (1 - beta1))
                    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=d * d * (1 - beta2))
                    state["s"].mul_(beta3).add_(grad, alpha=weight)
                    denominator += float(state["s"].abs().sum())
                stepped.append((parameter, group, dlr))
        if denominator == 0:  # no gradient yet says anything: no step (the next one estimates)
            return loss
        d_hat = first["d_coef"] * numerator / denominator
        if d == d0:
            d = max(d, d_hat)
        d_max = max(d_max, d_hat)
        d = min(d_max, d * first["growth_rate"])
        for group in self.param_groups:
            group.update(d=d, d_max=d_max, d_hat=d_hat, d_numerator=numerator, d_denom=denominator, k=k + 1)
        for parameter, group, dlr in stepped:
            state = self.state[parameter]
            state["step"] += 1
            if group["lr"] == 0:
                continue
            denom = state["exp_avg_sq"].sqrt().add_(d * group["eps"])
            if group["weight_decay"]:
                parameter.mul_(1 - group["weight_decay"] * dlr)
            parameter.addcdiv_(state["exp_avg"], denom, value=-dlr)
        return loss
