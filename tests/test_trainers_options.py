"""Training options beyond the base recipe, each shown to do what it says on the tiny model:
the Prodigy optimizer (its own step size, from a tiny start, without a learning rate to tune),
the EMA of the trained weights (the hand-computed average is what is saved), caption dropout
and shuffled tags (their share and their order, drawn from the run's seed), DoRA's magnitudes in a
resumed run."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from tests.test_trainers_lora import Recorder, make_subject, tiny  # noqa: F401 - tiny is a fixture
from tests.test_trainers_resume import FINGERPRINT, SavePoints, fresh
from trainers.training.callbacks import TrainingCallbacks, TrainingStopped
from trainers.training.config import ConfigError, DreamBoothTrainConfig, LoRATrainConfig, check_device
from trainers.training.loop import PRODIGY_SETTINGS
from trainers.training.lora import save_lora, train_lora
from trainers.training.prodigy import Prodigy
from trainers.training.state import newest_state

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


class WeightsEachStep(TrainingCallbacks):
    """The UNet's LoRA weights before the first step, after every step, and at the end."""

    def __init__(self, unet) -> None:
        super().__init__()
        self.unet, self.seen, self.final = unet, [], None

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.unet.named_parameters() if "lora_" in n}

    def on_train_begin(self, total_steps: int) -> None:
        self.seen.append(self.weights())

    def on_step_end(self, state) -> None:
        self.seen.append(self.weights())

    def on_train_end(self, losses) -> None:
        self.final = self.weights()


def test_ema_saves_the_hand_computed_average_of_the_weights_and_resumes_exactly(tiny, tmp_path):  # noqa: F811
    subject = make_subject(count=3)
    settings = {"steps": 5, "rank": 4, "unet_lr": 1e-2, "seed": 2}
    watched = WeightsEachStep(tiny.unet)
    result = train_lora(tiny, subject, LoRATrainConfig(**settings, ema_decay=0.7), watched)
    average = watched.seen[0]  # it starts at the weights before training
    for step, weights in enumerate(watched.seen[1:], start=1):
        d = min(0.7, step / (step + 9))  # diffusers' warm-up, then the decay
        average = {n: average[n] * d + weights[n] * (1 - d) for n in weights}
    for name, tensor in watched.final.items():  # what the file is made of
        torch.testing.assert_close(tensor, average[name], rtol=1e-6, atol=1e-9)
        assert not torch.equal(tensor, watched.seen[-1][name]) or not tensor.any()  # not the last weights
    plain = train_lora(tiny, subject, LoRATrainConfig(**settings))
    assert plain.losses == result.losses  # the average does not change the training
    assert any(not torch.equal(plain.state_dict[k], result.state_dict[k]) for k in plain.state_dict)
    again = train_lora(tiny, subject, LoRATrainConfig(**settings, ema_decay=0.7))
    assert save_lora(again, tmp_path / "b.safetensors").read_bytes() == \
        save_lora(result, tmp_path / "a.safetensors").read_bytes()

    # a training state on disk holds the average (and Prodigy's step size and sums): stopped after
    # step 4 (state at 2) and resumed, the same file
    config = LoRATrainConfig(**{**settings, "unet_lr": 1.0}, ema_decay=0.7, text_encoder_lr=0.5, optimizer="prodigy")
    whole = train_lora(fresh(), subject, config)
    with pytest.raises(TrainingStopped):
        train_lora(fresh(), subject, config, SavePoints(tmp_path / "states", stop_after=4), save_every=2)
    state, _ = newest_state(tmp_path / "states", FINGERPRINT)
    assert state.step == 2 and state.average is not None
    resumed = train_lora(fresh(), subject, config, resume=state)
    assert all(torch.equal(resumed.state_dict[k], whole.state_dict[k]) for k in whole.state_dict)


def test_a_dora_run_resumed_from_its_state_gives_the_same_file(tmp_path):
    """A DoRA's magnitudes are trained weights like its up/down ones: a training state holds them (and
    their optimizer states), so a run stopped after step 3 (state at 2) and resumed writes the same
    bytes as the run that went through."""
    subject = make_subject(count=3)
    config = LoRATrainConfig(steps=4, rank=4, unet_lr=1e-2, text_encoder_lr=1e-3, conv_layers=True,
                             lora_type="dora", seed=2)
    whole = train_lora(fresh(), subject, config)
    with pytest.raises(TrainingStopped):
        train_lora(fresh(), subject, config, SavePoints(tmp_path / "states", stop_after=3), save_every=2)
    state, _ = newest_state(tmp_path / "states", FINGERPRINT)
    modules = sum(1 for key in whole.state_dict if key.endswith(".dora_scale"))
    assert state.step == 2 and len(state.parameters) == 3 * modules  # down, up and magnitudes of each
    resumed = train_lora(fresh(), subject, config, resume=state)
    assert save_lora(resumed, tmp_path / "resumed.safetensors").read_bytes() == \
        save_lora(whole, tmp_path / "whole.safetensors").read_bytes()


def test_an_unknown_lora_type_is_refused_with_the_choices():
    for hostile in ("loha", "DoRA", "", 1, None):
        with pytest.raises(ConfigError, match="lora_type must be one of 'lora', 'dora' \\(got "):
            LoRATrainConfig(lora_type=hostile)


def test_ema_on_cpu_needs_an_ema():
    with pytest.raises(ConfigError, match="ema_on_cpu has no effect with ema_decay 0"):
        LoRATrainConfig(ema_on_cpu=True)
    with pytest.raises(ConfigError, match="ema_decay must be 0 \\(off\\) or a finite number >= 0.5"):
        DreamBoothTrainConfig(ema_decay=0.2)


def test_caption_dropout_drops_its_share_and_shuffled_tags_keep_the_leading_ones(tiny):  # noqa: F811
    from trainers.training.loop import (
        IndexStream,
        LoopModels,
        batch_conditioning,
        draw_batch,
        encode_text,
        prepare_training_set,
        tokenize,
    )

    caption = "sks toy, red, on grass, sunny, close-up"
    training_set = prepare_training_set(torch.rand(4, 3, 64, 64), [caption, caption, "sks toy", caption],
                                        vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer,
                                        flip=False, cache_latents=True, cache_text=False, caption_dropout=True)
    models = LoopModels(tiny.unet, tiny.vae, tiny.text_encoder, tiny.noise_scheduler)
    generator = torch.Generator().manual_seed(0)
    stream = IndexStream(4, generator)
    dropped = 0
    seconds = set()
    for _ in range(100):  # 100 steps of batch 20
        drawn = draw_batch(models, [training_set], [stream], 20, generator, caption_dropout=0.25, keep_tags=1)
        dropped += int(drawn.dropped.sum())
        for index, text in zip(drawn.indices[0].tolist(), drawn.texts, strict=True):
            if index == 2:
                assert text is None  # one tag: nothing to shuffle
                continue
            tags = text.split(", ")
            assert sorted(tags) == sorted(caption.split(", ")) and tags[0] == "sks toy"  # the kept tag stays first
            seconds.add(tags[1])
    assert abs(dropped / 2000 - 0.25) < 0.03  # the share asked for (binomial sd 0.01)
    assert seconds == {"red", "on grass", "sunny", "close-up"}  # every other tag moves around

    # a dropped row is conditioned on the empty caption, a shuffled one on its shuffled text
    with torch.no_grad():
        conditioning = batch_conditioning(training_set, torch.tensor([0, 1]), tiny.text_encoder,
                                          dropped=torch.tensor([True, False]),
                                          texts=[None, "sks toy, sunny, red, close-up, on grass"])
        expected = encode_text(tiny.text_encoder, tokenize(tiny.tokenizer, ["", "sks toy, sunny, red, close-up, on grass"]))
    torch.testing.assert_close(conditioning, expected)


def test_a_lora_with_caption_dropout_and_shuffled_tags_repeats_and_records_them(tiny, tmp_path):  # noqa: F811
    subject = make_subject(count=3, captions=("sks toy, red, grass", "sks toy, blue, sand", "sks toy, studio"))
    config = LoRATrainConfig(steps=4, rank=4, unet_lr=1e-3, caption_dropout=0.5, shuffle_tags=True, seed=4)
    first = train_lora(tiny, subject, config)
    path = save_lora(first, tmp_path / "a.safetensors")
    assert save_lora(train_lora(tiny, subject, config), tmp_path / "b.safetensors").read_bytes() == path.read_bytes()
    plain = train_lora(tiny, subject, LoRATrainConfig(steps=4, rank=4, unet_lr=1e-3, seed=4))
    assert plain.losses != first.losses  # other conditioning, same images and noise
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    assert (meta["ss_caption_dropout_rate"], meta["ss_shuffle_caption"], meta["ss_keep_tokens"]) == ("0.5", "True", "1")
