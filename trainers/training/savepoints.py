"""Save points of a long run: every ``save_every`` steps, a model file of that step and the
training state to resume from.

- **Step files** go to ``<output folder>/<output stem>/<stem>-step<NNNNNN>.safetensors`` (a
  subfolder per run keeps ComfyUI's model lists tidy), written like the final file (atomic,
  through ``saving.save_safely``) and loading exactly like it. Their metadata names the step
  (``dbs.step_file``) and the run (``dbs.run_fingerprint``); they carry no reusable fingerprint,
  so a step file is never taken for a finished run. ``keep_last`` bounds how many stay, besides
  the file of the best scored step (``watch.best_round``) when the run scores its samples.
- **Training states** go to the job's state folder (``state.write_state``): only the newest
  complete one is kept.
- A cancel keeps the last complete state (the identical job resumes from it); with
  ``save_on_cancel`` the weights of the cancelled step are written as a step file and a state.
- A save point that cannot be written (disk full, ...) stops the run with an error naming the
  folder and the space needed; the previous step file and state stay intact.
"""

from __future__ import annotations

import errno
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .callbacks import LossHistory, SampleRound, StepState, TrainingCallbacks
from .record import read_metadata
from .saving import FileIdentity, SaveFailed, human_bytes, save_safely
from .state import write_state
from .watch import best_round

log = logging.getLogger(__name__)

# write(result, path, precision, overwrite) -> path: how the method saves a result as a model file
ResultWriter = Callable[[Any, Path, str, bool], Path]


def step_file(output: Path, step: int) -> Path:
    return output.parent / output.stem / f"{output.stem}-step{step:06d}.safetensors"


class SaveStopped(OSError):
    """A save point could not be written; the run stopped (its last complete state is kept).
    ``strerror`` and ``str()`` are the whole message (the command line prints ``strerror``)."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(code or errno.EIO, message)

    def __str__(self) -> str:
        return self.strerror


class SavePoints(TrainingCallbacks):
    """The job's callbacks plus save points (all other hooks are passed through)."""

    def __init__(self, inner: TrainingCallbacks, *, output: Path, write: ResultWriter, precision: str,
                 fingerprint: str, state_dir: Path | None, keep_last: int, save_on_cancel: bool,
                 job: dict[str, Any], state_bytes: int, file_bytes: int,
                 is_cancel: Callable[[BaseException], bool], shown: Callable[[Path], str] = str,
                 earlier_rounds: Callable[[], list[SampleRound]] | None = None):
        super().__init__()
        self.inner, self.output, self.write, self.precision = inner, output, write, precision
        self.fingerprint, self.state_dir, self.keep_last = fingerprint, state_dir, keep_last
        self.save_on_cancel, self.job, self.is_cancel, self.shown = save_on_cancel, job, is_cancel, shown
        self.state_bytes, self.file_bytes = state_bytes, file_bytes
        self.last_point: int | None = None  # newest step with a complete state (this run)
        # the run's scored sample rounds: the best step's file is kept however old it is
        self.rounds: list[SampleRound] = []
        self.earlier_rounds = earlier_rounds

    # -- passed through ----------------------------------------------------------------------
    def on_base_loaded(self) -> None:
        self.inner.on_base_loaded()

    def on_generate_step(self, done: int, total: int) -> None:
        self.inner.on_generate_step(done, total)

    def on_resume(self, step: int, history: LossHistory) -> None:
        if self.earlier_rounds is not None:  # rounds scored before the stop count for the best step
            self.rounds = [r for r in self.earlier_rounds() if r.step <= step and r.scores is not None]
        self.inner.on_resume(step, history)

    def on_train_begin(self, total_steps: int) -> None:
        self.inner.on_train_begin(total_steps)

    def on_step_end(self, state: StepState) -> None:
        self.inner.on_step_end(state)

    def check_cancel(self) -> None:
        self.inner.check_cancel()

    def on_validation(self, step: int, loss: float) -> None:
        self.inner.on_validation(step, loss)

    def on_sample_step(self, done: int, total: int) -> None:
        self.inner.on_sample_step(done, total)

    def score_samples(self, samples: SampleRound) -> dict[str, float] | None:
        return self.inner.score_samples(samples)

    def on_samples(self, samples: SampleRound) -> None:
        if samples.scores is not None:
            self.rounds = [r for r in self.rounds if r.step != samples.step] + [samples]
        self.inner.on_samples(samples)

    def on_train_end(self, losses: list[float]) -> None:
        self.inner.on_train_end(losses)

    def on_save_begin(self) -> None:
        self.inner.on_save_begin()

    # -- save points -----------------------------------------------------------------------------
    def on_save_point(self, step: int, capture: Callable[[], Any], snapshot: Callable[[], Any]) -> None:
        self.inner.on_save_point(step, capture, snapshot)
        self._write_point(step, capture, snapshot)

    def on_stop(self, step: int, capture: Callable[[], Any], snapshot: Callable[[], Any],
                error: BaseException) -> None:
        self.inner.on_stop(step, capture, snapshot, error)
        if self.save_on_cancel and self.is_cancel(error):
            log.info("cancelled at step %d: saving its weights (save_on_cancel)", step)
            self._write_point(step, capture, snapshot)
        if self.last_point is not None:
            log.info("training state of step %d kept: the identical job resumes from it", self.last_point)

    def _write_point(self, step: int, capture: Callable[[], Any], snapshot: Callable[[], Any]) -> None:
        path = step_file(self.output, step)
        result = snapshot()
        result.metadata.update({"dbs.step_file": str(step), "dbs.run_fingerprint": self.fingerprint})
        failures: list[OSError] = []  # why the write failed (SaveFailed's own text speaks of a finished run)

        def write(target: Path, precision: str, overwrite: bool) -> Path:
            try:
                return self.write(result, target, precision, overwrite)
            except FileExistsError:
                raise
            except OSError as exc:
                failures.append(exc)
                raise

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            existing = read_metadata(path) if path.exists() else None
            same_run = existing is not None and existing.get("dbs.run_fingerprint") == self.fingerprint
            saved = save_safely(write, path, self.precision, replace=FileIdentity.of(path) if same_run else None,
                                size_hint=self.file_bytes, shown=self.shown)
        except (SaveFailed, OSError) as exc:
            cause = failures[-1] if isinstance(exc, SaveFailed) and failures else exc
            raise SaveStopped(f"the step-{step} file could not be written in {self.shown(path.parent)} "
                              f"({cause.strerror or cause}); it needs about {human_bytes(self.file_bytes)}. "
                              f"{self._kept()}", cause.errno) from None
        if self.state_dir is not None:
            try:
                write_state(self.state_dir, capture(), self.fingerprint, {**self.job, "step_file": saved.path.name})
            except OSError as exc:
                raise SaveStopped(f"the training state of step {step} could not be written in "
                                  f"{self.shown(self.state_dir)} ({exc.strerror or exc}); it needs about "
                                  f"{human_bytes(self.state_bytes)}. {self._kept()}", exc.errno) from None
            self.last_point = step
        self._prune()
        log.info("save point at step %d: %s", step, saved.path.name)

    def _kept(self) -> str:
        if self.last_point is None:
            return "Free space there and run again."
        return (f"The state of step {self.last_point} is intact: free space, then queue the same prompt (or run "
                "the same command) again to resume from it.")

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        pattern = re.compile(rf"^{re.escape(self.output.stem)}-step(\d{{6,}})\.safetensors$")
        folder = step_file(self.output, 0).parent
        mine = []
        for path in folder.iterdir():
            match = pattern.match(path.name)
            metadata = read_metadata(path) if match else None
            if metadata is not None and metadata.get("dbs.run_fingerprint") == self.fingerprint:
                mine.append((int(match.group(1)), path))
        on_disk = {step for step, _ in mine}
        best = best_round(self.rounds, eligible=on_disk.__contains__)
        for step, path in sorted(mine)[:-self.keep_last]:
            if best is None or step != best.step:
                path.unlink(missing_ok=True)
