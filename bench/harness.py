"""What the benches share: RSS sampling split by phase, and trainer callbacks that time a job's
phases (load, data caching, each step, save). Benches train through trainers.jobs.train_file,
like the nodes and the command line, so they measure what users run."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

GB = 1024**3
MB = 1024**2


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PhaseRss:
    """Samples this process's RSS every `interval` seconds; `peaks[name]` is the highest value seen
    while phase `name` was current (`enter(name)` starts a phase)."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        value = rss_bytes()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def enter(self, phase: str) -> None:
        self._sample()
        self.phase = phase
        self._sample()

    def __enter__(self) -> PhaseRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def phase_clock(rss: PhaseRss) -> Any:
    """Trainer callbacks that stamp a job's phases and switch `rss` to each: the `before_load`
    hook and the callbacks of :func:`trainers.jobs.train_file`."""
    from trainers.training.callbacks import TrainingCallbacks

    class PhaseClock(TrainingCallbacks):
        def __init__(self) -> None:
            self.marks: dict[str, float] = {}
            self.steps: list[float] = []
            self.rss_before_training = 0

        def stamp(self, name: str) -> None:
            self.marks[name] = time.monotonic()
            rss.enter(name)

        def before_load(self) -> None:
            self.stamp("load")

        def on_base_loaded(self) -> None:
            self.stamp("prepare")

        def on_train_begin(self, total_steps: int) -> None:
            self.rss_before_training = rss_bytes()
            self.stamp("train")
            self.steps.append(self.marks["train"])

        def on_step_end(self, state: object) -> None:
            self.steps.append(time.monotonic())

        def on_train_end(self, losses: list[float]) -> None:
            self.stamp("release")  # the trainer frees optimizer states and gradients

        def on_save_begin(self) -> None:
            self.stamp("save")

        def step_seconds(self) -> list[float]:
            return [b - a for a, b in zip(self.steps, self.steps[1:], strict=False)]

    return PhaseClock()


# -- what every bench's command line shares ----------------------------------------------------------
def default_inputs(args: Any) -> None:
    """``--tokenizer`` and ``--checkpoint`` default to ComfyUI's CLIP tokenizer and the random
    full-size test checkpoint (made once, cached)."""
    if args.tokenizer is None:
        from tests.support.paths import tokenizer_dir

        args.tokenizer = tokenizer_dir()
    if args.checkpoint is None:
        from tests.support.models import ensure_test_models

        args.checkpoint = ensure_test_models()["checkpoint"]


def chosen_configs(parser: Any, text: str, known: Any) -> list[str]:
    """The comma-separated configuration names of ``text``; an unknown one is a usage error."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


def bench_workdir(args: Any, repo: Any, prefix: str) -> bool:
    """Make ``args.workdir`` (a new folder in <repo>/.cache unless given); True when the bench made
    it (and removes it at the end)."""
    import tempfile
    from pathlib import Path

    own = args.workdir is None
    if own:
        (Path(repo) / ".cache").mkdir(exist_ok=True)
        args.workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=Path(repo) / ".cache"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    return own
