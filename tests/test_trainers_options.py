"""Training options beyond the base recipe, each shown to do what it says on the tiny model:
the Prodigy optimizer (its own step size, from a tiny start, without a learning rate to tune)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from tests.test_trainers_lora import Recorder, make_subject, tiny  # noqa: F401 - tiny is a fixture
from trainers.training.config import ConfigError, DreamBoothTrainConfig, LoRATrainConfig, check_device
from trainers.training.loop import PRODIGY_SETTINGS
from trainers.training.lora import save_lora, train_lora
from trainers.training.prodigy import Prodigy

pytestmark = pytest.mark.trainers

TARGET = torch.tensor([10.0, -10.0, 5.0, 0.5])


def quadratic_steps(optimizer: Prodigy, weights: torch.nn.Parameter, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        ((weights - TARGET) ** 2).sum().div(2).backward()
        optimizer.step()


def test_prodigy_finds_its_step_size_from_a_tiny_start_and_resumes_exactly():
    # lr 1.0 multiplies an estimate that starts at d0 = 1e-6: plain Adam at that step size moves a
    # weight by about 300 x 1e-6 in 300 steps; Prodigy grows it to the distance it has to cover
    weights = torch.nn.Parameter(torch.zeros(4))
    optimizer = Prodigy([weights], lr=1.0, **PRODIGY_SETTINGS)
    quadratic_steps(optimizer, weights, 300)
    assert optimizer.step_size > 0.1
    torch.testing.assert_close(weights.detach(), TARGET, atol=0.1, rtol=0)

    # a training state taken mid-way (its step size and sums are group keys) continues exactly
    first, second = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    straight = Prodigy([first], lr=1.0, **PRODIGY_SETTINGS)
    quadratic_steps(straight, first, 120)
    stopped = Prodigy([second], lr=1.0, **PRODIGY_SETTINGS)
    quadratic_steps(stopped, second, 70)
    state = stopped.state_dict()
    resumed_weights = torch.nn.Parameter(second.detach().clone())
    resumed = Prodigy([resumed_weights], lr=1.0, **PRODIGY_SETTINGS)
    resumed.load_state_dict(state)
    quadratic_steps(resumed, resumed_weights, 50)
    assert torch.equal(resumed_weights.detach(), first.detach()) and resumed.step_size == straight.step_size


def test_a_lora_trains_with_prodigy_at_lr_1_and_the_same_seed_gives_the_same_file(tiny, tmp_path):  # noqa: F811
    subject = make_subject()
    config = LoRATrainConfig(steps=60, rank=4, unet_lr=1.0, text_encoder_lr=0.5, optimizer="prodigy", seed=3)
    recorder = Recorder()
    first = train_lora(tiny, subject, config, recorder)
    rates = [state.lr for state in recorder.states]  # the step size each step applied (lr x estimate)
    # (it grows slowly while the LoRA is still near its zero start, then faster: the quadratic above)
    assert rates[0] == pytest.approx(1e-6) and rates[-1] > 1.2 * rates[0]
    assert rates == sorted(rates)  # the estimate never shrinks
    assert all(math.isfinite(v) for v in first.losses)
    ups = [v for k, v in first.state_dict.items() if k.endswith("lora_up.weight")]
    assert all(float(v.abs().max()) > 0 for v in ups)  # every LoRA moved from its zero start
    path = save_lora(first, tmp_path / "a.safetensors")
    assert save_lora(train_lora(tiny, subject, config), tmp_path / "b.safetensors").read_bytes() == path.read_bytes()
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_optimizer"].startswith("Prodigy(") and '"optimizer": "prodigy"' in meta["dbs.config"]


def test_optimizers_a_run_cannot_use_are_refused_with_what_to_use():
    with pytest.raises(ConfigError, match="'prodigy' estimates one step size.*turn them off"):
        DreamBoothTrainConfig(optimizer="prodigy", fused_backward=True)
    with pytest.raises(ConfigError, match="'prodigy' estimates one step size.*turn them off"):
        DreamBoothTrainConfig(optimizer="prodigy", weight_precision="bf16")
    with pytest.raises(ConfigError, match="'adamw8bit' .*CUDA GPUs only.*on cpu"):
        check_device(LoRATrainConfig(optimizer="adamw8bit"), "cpu")
    with pytest.raises(ConfigError, match="optimizer must be one of 'adamw', 'adafactor', 'adamw8bit', 'prodigy'"):
        LoRATrainConfig(optimizer="sgd")
