"""Sample rounds scored while training (tiny models): the scores are recorded with each round (and
survive a resume), go into the file's metadata, never change the trained weights, and pick the best
step by the stated rule, whose step file is kept however many newer ones are pruned."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.test_trainers_watch import QUICK_SAMPLES, Events, job, split_file
from trainers.jobs import Durability
from trainers.training.callbacks import SampleRound, TrainingStopped
from trainers.training.config import LoRATrainConfig
from trainers.training.savepoints import step_file
from trainers.training.watch import (
    CLIP_T_MARGIN,
    SAMPLES_JSON,
    SampleFolder,
    WatchConfig,
    best_round,
    load_sample_rounds,
)

pytestmark = [pytest.mark.trainers, pytest.mark.usefixtures("one_thread")]

# Made-up scores per step (the real scorer is tests/test_nodes_fidelity.py's business): DINO
# peaks at step 4, but CLIP-T there has fallen more than the margin below step 0's, so the rule
# must pick step 2 (the best DINO that keeps the prompt).
SCORES = {0: (0.30, 0.50, 0.300), 2: (0.60, 0.70, 0.295), 4: (0.90, 0.85, 0.200), 6: (0.50, 0.60, 0.290),
          8: (0.40, 0.55, 0.290)}
BEST = 2


class Scoring(Events):
    """Events, plus the made-up scores of each round; counts the rounds it scored."""

    def __init__(self, stop_at=None):
        super().__init__(stop_at)
        self.scored: list[int] = []

    def score_samples(self, samples: SampleRound):
        assert len(samples.images) == len(samples.prompts) and all(isinstance(i, Image.Image) for i in samples.images)
        self.scored.append(samples.step)
        dino, clip_i, clip_t = SCORES[samples.step]
        return {"dino": dino, "clip_i": clip_i, "clip_t": clip_t}


def _round(step, scores=None):
    values = dict(zip(("dino", "clip_i", "clip_t"), scores, strict=True)) if scores else None
    return SampleRound(step=step, prompts=["a"], images=[Image.new("RGB", (8, 8))], scores=values)


def test_best_round_is_the_highest_dino_that_keeps_clip_t_within_the_margin():
    rounds = [_round(s, v) for s, v in SCORES.items()]
    assert best_round(rounds).step == BEST
    assert best_round(rounds, margin=0.2).step == 4  # a looser margin lets the overfit step through
    assert best_round(rounds, eligible=lambda step: step != BEST).step == 6  # only steps with a file
    assert best_round([_round(0, SCORES[0])]) is None  # the base model is never "the best step"
    assert best_round([_round(0), _round(2)]) is None  # nothing scored
    tie = [_round(0, (0.1, 0.1, 0.3)), _round(2, (0.5, 0.5, 0.3)), _round(4, (0.5, 0.6, 0.3))]
    assert best_round(tie).step == 2  # the earliest on a tie
    assert CLIP_T_MARGIN == 0.02


def test_scores_are_recorded_never_change_the_weights_and_the_best_step_file_is_kept(base_file, tmp_path):
    config = LoRATrainConfig(steps=8, rank=4, unet_lr=1e-3)
    watch = {"sample_every": 2, "validate_every": 0, **QUICK_SAMPLES}
    plain_dir, scored_dir = tmp_path / "plain", tmp_path / "scored"
    plain_dir.mkdir()
    scored_dir.mkdir()
    plain = job(base_file, plain_dir / "run.safetensors", config, WatchConfig(**watch), sample_dir=plain_dir / "s")
    events = Scoring()
    # save points every 2 steps, only the newest step file kept: the best one (step 2) must stay too
    states = Durability(save_every=2, keep_last=1, state_root=tmp_path / "states")
    scored = job(base_file, scored_dir / "run.safetensors", config, WatchConfig(**watch), events, states,
                 scored_dir / "samples")
    assert events.scored == [0, 2, 4, 6, 8]
    header_plain, tensors_plain = split_file(plain.path)
    header_scored, tensors_scored = split_file(scored.path)
    assert tensors_scored == tensors_plain  # scoring never touches the weights
    metadata = header_scored["__metadata__"]
    assert json.loads(metadata.pop("dbs.fidelity")) == [[s, *v] for s, v in SCORES.items()]
    assert metadata == header_plain["__metadata__"]  # nothing else in the file differs
    # each round carries its scores, in memory and in the sample folder's record
    assert [(r.step, r.scores["dino"]) for r in scored.samples] == [(s, v[0]) for s, v in SCORES.items()]
    record = json.loads((scored_dir / "samples" / SAMPLES_JSON).read_text())
    assert record["scores"]["4"] == {"dino": 0.9, "clip_i": 0.85, "clip_t": 0.2}
    assert [r.scores["clip_t"] for r in load_sample_rounds(scored_dir / "samples")] == [v[2] for v in SCORES.values()]
    # the best step by the rule, with its step file: save points at 2, 4 and 6 with keep_last 1 kept
    # the newest (6) and the best (2); 4 was pruned
    best, path = scored.best_step()
    assert best.step == BEST and path == step_file(scored.path, BEST) and path.is_file()
    assert not step_file(scored.path, 4).exists() and step_file(scored.path, 6).is_file()
    # a run without scores has no best step
    assert plain.best_step() is None


def test_a_resumed_run_keeps_the_scores_from_before_the_stop(base_file, tmp_path):
    config = LoRATrainConfig(steps=8, rank=4, unet_lr=1e-3)
    watch = WatchConfig(sample_every=2, validate_every=0, **QUICK_SAMPLES)
    states = Durability(save_every=2, keep_last=1, state_root=tmp_path / "states")
    output, samples = tmp_path / "run.safetensors", tmp_path / "samples"
    with pytest.raises(TrainingStopped):
        job(base_file, output, config, watch, Scoring(stop_at=("step", 5)), states, samples)
    events = Scoring()
    resumed = job(base_file, output, config, watch, events, states, samples)
    assert events.scored == [6, 8]  # only the new rounds were scored; 0, 2 and 4 came from the folder
    assert [r.step for r in resumed.samples if r.scores] == [0, 2, 4, 6, 8]
    best, path = resumed.best_step()
    # step 2's file survived the pruning at step 6, after the resume: the scores of before the stop count
    assert best.step == BEST and path.is_file() and not step_file(output, 4).exists()
    assert json.loads(split_file(output)[0]["__metadata__"]["dbs.fidelity"]) == [[s, *v] for s, v in SCORES.items()]


def test_sample_records_with_malformed_scores_read_as_unscored(tmp_path):
    settings = {"run": "r", "prompts": ["a"], "seed": 0, "steps": 2, "cfg": 7.5, "size": 8, "sampler": "ddim"}
    folder = SampleFolder(tmp_path, settings)
    folder.start(0)
    folder.write(_round(0, (0.1, 0.2, 0.3)))
    folder.write(_round(2, (0.4, 0.5, 0.6)))
    record = json.loads((tmp_path / SAMPLES_JSON).read_text())
    record["scores"]["2"] = {"dino": "NaN", "clip_i": 0.5, "clip_t": 0.6}
    (tmp_path / SAMPLES_JSON).write_text(json.dumps(record))
    rounds = load_sample_rounds(tmp_path)
    assert rounds[0].scores == {"dino": 0.1, "clip_i": 0.2, "clip_t": 0.3} and rounds[1].scores is None
