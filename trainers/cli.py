"""``python -m trainers <command>``: the engine's only command line.

Commands: ``lora`` and ``dreambooth`` (train on a folder of photos; parse -> job -> print, with
the same options meaning the same thing in both), ``placeholder`` (random-weight SD1.5 models).
While training, sample images go to ``<output stem>-samples/`` (their grid to
``<output stem>-samples.png``) and the validation loss is printed when computed; the end says
what share of the run they took.
Training goes through :func:`trainers.jobs.train_file`, like the ComfyUI nodes: an identical
earlier run is reused, a different file of the same name is an error unless ``--overwrite``
(which replaces only files this pack wrote).

Exit codes of the training commands: 0 saved or reused; 1 training finished but the file could
not be written anywhere, or a save point could not be written (the message says what was tried
and what is kept); 2 bad input, or not enough free space (nothing was trained); 130 cancelled
with Ctrl-C (the last complete training state is kept: the same command resumes).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch

from .data.class_images import default_class_cache, sweep_class_cache
from .data.images import BAD_FILE_MODES, CROP_MODES, load_subject
from .files.fileio import atomic_write_bytes, sweep_stale_temps
from .jobs import Durability, JobResult, check_sample_dir, train_file
from .sd15.placeholder import write_placeholder_models
from .training.callbacks import NonFiniteLossError, SampleRound, StepState, TrainingCallbacks
from .training.config import (
    ConfigError,
    DreamBoothTrainConfig,
    LoRATrainConfig,
    add_config_arguments,
    config_from_args,
)
from .training.determinism import request_reproducible_blas
from .training.plot import loss_curve_image
from .training.savepoints import SaveStopped
from .training.saving import NotEnoughSpace, SaveFailed
from .training.state import sweep_states
from .training.watch import WatchConfig

PROG = "python -m trainers"
TRAINERS = {
    "lora": (LoRATrainConfig, "train a LoRA on a folder of subject photos (kohya .safetensors)",
             "LoRA file to write (.safetensors)"),
    "dreambooth": (DreamBoothTrainConfig, "fine-tune the whole UNet (DreamBooth) and save a checkpoint",
                   "checkpoint file to write (.safetensors)"),
}


class TerminalProgress(TrainingCallbacks):
    """A one-line progress bar on a terminal stream, redrawn with carriage returns."""

    def __init__(self, stream: Any = None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.cancelled = False  # set by the first Ctrl-C: training stops after the current step

    def cancel(self, *_: Any) -> None:
        if self.cancelled:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.cancelled = True
        self.stream.write("\ncancelling after this step (Ctrl-C again to stop at once)\n")

    def _bar(self, done: float) -> str:
        filled = int(self.width * done)
        return f"\r[{'#' * filled}{'.' * (self.width - filled)}]"

    def on_generate_step(self, done: int, total: int) -> None:
        self.stream.write(f"{self._bar(done / max(total, 1))} class images: step {done}/{total}")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()

    def on_step_end(self, state: StepState) -> None:
        per_step = state.elapsed / state.step
        eta = per_step * (state.total_steps - state.step)
        self.stream.write(
            f"{self._bar(state.step / max(state.total_steps, 1))} {state.step}/{state.total_steps} "
            f"loss {state.loss:.4f} lr {state.lr:.2e} {per_step:.2f} s/step eta {_duration(eta)}"
        )
        self.stream.flush()
        if self.cancelled:
            raise KeyboardInterrupt

    def on_validation(self, step: int, loss: float) -> None:
        self._line(f"validation loss at step {step}: {loss:.5f}")

    def on_sample_step(self, done: int, total: int) -> None:
        self.stream.write(f"{self._bar(done / max(total, 1))} samples: {done}/{total}")
        self.stream.flush()
        if self.cancelled:
            raise KeyboardInterrupt

    def on_samples(self, samples: SampleRound) -> None:
        where = f" -> {samples.paths[0].parent}" if samples.paths else ""
        self._line(f"samples of step {samples.step}: {len(samples.images)} images in {samples.seconds:.1f} s{where}")

    def _line(self, text: str) -> None:
        """A line of its own where the progress bar is (the bar is redrawn after it)."""
        self.stream.write(f"\r{text}".ljust(self.width + 60) + "\n")
        self.stream.flush()

    def on_train_end(self, losses: list[float]) -> None:
        self.stream.write("\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def default_tokenizer_dir() -> Path | None:
    """$DBS_TOKENIZER, or the tokenizer of the ComfyUI at $COMFYUI_PATH."""
    for candidate in (os.environ.get("DBS_TOKENIZER"), os.environ.get("COMFYUI_PATH")):
        if candidate:
            path = Path(candidate)
            for folder in (path, path / "comfy" / "sd1_tokenizer"):
                if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
                    return folder
    return None


def add_run_arguments(parser: argparse.ArgumentParser, output_help: str) -> None:
    """The options both training commands share (the config fields come from the config class)."""
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="SD1.5 base model: a single-file .safetensors or a diffusers folder")
    parser.add_argument("--images", required=True, type=Path, help="folder with 3-20 photos of the subject")
    parser.add_argument("--instance-prompt", required=True, help="prompt naming the subject, e.g. 'a photo of sks dog'")
    parser.add_argument("--class-prompt", default="",
                        help="prompt of the subject's class, e.g. 'a photo of dog' (needed for prior preservation)")
    parser.add_argument("--output", required=True, type=Path, help=output_help)
    parser.add_argument(
        "--tokenizer", type=Path, default=None,
        help="CLIP tokenizer folder (ComfyUI's comfy/sd1_tokenizer); default: $DBS_TOKENIZER, "
        "$COMFYUI_PATH/comfy/sd1_tokenizer, or a diffusers folder's tokenizer/",
    )  # fmt: skip
    parser.add_argument("--resolution", type=int, default=512, help="training resolution, a multiple of 64 (default 512)")
    parser.add_argument("--max-images", type=int, default=0, help="use at most this many photos (by name); 0 = all")
    parser.add_argument("--crop-mode", choices=CROP_MODES, default="center",
                        help="how photos are cropped square: around the face, centred, or padded (default center)")
    parser.add_argument("--captions", action="store_true", help="use <image>.txt next to each image as its caption")
    parser.add_argument("--bad-files", choices=BAD_FILE_MODES, default="stop",
                        help="stop: unusable photos are an error naming them; skip: leave them out (default stop)")
    parser.add_argument("--flip", action="store_true", help="random horizontal flip augmentation")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --output if it holds another run (an identical run is always reused)")
    parser.add_argument("--loss-curve", type=Path, default=None, help="also write the loss curve as a PNG")
    parser.add_argument("--class-folder", type=Path, default=None,
                        help="prior preservation: use these class images (at most --class-images) instead of "
                             "generating them")
    parser.add_argument("--save-every", type=int, default=0,
                        help="every N steps write a step file (<output stem>/<stem>-stepNNNNNN.safetensors beside "
                             "--output) and a training state to resume from; 0 = off (default)")
    parser.add_argument("--keep-last", type=int, default=2, help="step files kept (0 = all; default 2)")
    parser.add_argument("--resume", default="auto",
                        help="auto: continue the identical job from its newest complete training state (default); "
                             "never: start over; or a state folder to continue from")
    parser.add_argument("--save-on-cancel", action="store_true",
                        help="Ctrl-C also writes the current step as a step file and a training state")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where training states live (default: dreambooth_studio/states in $XDG_CACHE_HOME "
                             "or ~/.cache)")
    parser.add_argument("--rescue-dir", type=Path, default=None,
                        help="where a finished run is saved when --output's folder cannot take it (disk full, "
                             "read-only); default: dreambooth_studio/rescued in $XDG_CACHE_HOME or ~/.cache")
    parser.add_argument("--class-cache", type=Path, default=None,
                        help="prior preservation: where generated class images are kept "
                             "(default ~/.cache/dreambooth_studio/class_images)")
    parser.add_argument("--sample-dir", type=Path, default=None,
                        help="where sample images go (step<NNNNNN>-p<i>-<prompt>.png and samples.json); default "
                             "<output stem>-samples/ beside --output. Their grid is written as "
                             "<output stem>-samples.png beside --output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="DreamBooth Studio engine: SD1.5 subject training.")
    commands = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (config_cls, text, output_help) in TRAINERS.items():
        sub = commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        add_run_arguments(sub, output_help)
        add_config_arguments(sub, config_cls)
        add_config_arguments(sub, WatchConfig, "sample images and validation loss (they never change the trained file)")
    placeholder = commands.add_parser("placeholder", help="write random-weight SD1.5 test models",
                                      description="Write random-weight SD1.5 checkpoint and ControlNet files "
                                                  "for tests and the demo (existing current files are kept).")
    placeholder.add_argument("--out", required=True, type=Path, help="folder to write into (created if missing)")
    placeholder.add_argument("--tiny", action="store_true", help="tiny SD1.5-shaped models instead of full size")
    placeholder.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return parser


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    config_cls = TRAINERS[args.command][0]
    try:
        config = config_from_args(config_cls, args)
        watch = config_from_args(WatchConfig, args)
    except ConfigError as error:
        parser.error(str(error))
    sample_dir = args.sample_dir or args.output.parent / f"{args.output.stem}-samples"
    try:
        check_sample_dir(sample_dir, (args.images, args.class_folder))
    except ValueError as error:
        parser.error(str(error))
    tokenizer = args.tokenizer or default_tokenizer_dir()
    if tokenizer is None and not args.checkpoint.is_dir():
        parser.error("no tokenizer folder: pass --tokenizer (e.g. ComfyUI/comfy/sd1_tokenizer)")
    try:
        subject = load_subject(args.images, args.instance_prompt, args.class_prompt, args.resolution,
                               args.max_images, args.flip, crop_mode=args.crop_mode,
                               caption_mode="sidecar .txt" if args.captions else "instance prompt",
                               on_bad=args.bad_files, tokenizer_dir=tokenizer).subject
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else torch.device(args.device)
    class_cache = args.class_cache or default_class_cache()
    rescue = args.rescue_dir or default_class_cache().parent / "rescued"
    states = args.state_dir or default_class_cache().parent / "states"
    try:
        durability = Durability(save_every=args.save_every, keep_last=args.keep_last, resume=args.resume,
                                save_on_cancel=args.save_on_cancel, state_root=states)
    except ValueError as error:
        parser.error(str(error))
    # what earlier runs killed while writing left behind (only this pack's names, of dead processes)
    swept = [*sweep_stale_temps(args.output.parent), *sweep_stale_temps(args.output.parent / args.output.stem),
             *sweep_stale_temps(rescue), *sweep_class_cache(class_cache), *sweep_states(states)]
    for path in swept:
        logging.getLogger(__name__).info("removed stale temporary file %s", path)
    progress = TerminalProgress()
    previous = signal.signal(signal.SIGINT, progress.cancel)
    try:
        job = train_file(args.checkpoint, subject, config, args.output, tokenizer, overwrite=args.overwrite,
                         callbacks=progress, class_cache_dir=class_cache, class_folder=args.class_folder,
                         device=device, rescue_dir=rescue, durability=durability,
                         is_cancel=lambda error: isinstance(error, KeyboardInterrupt), watch=watch,
                         sample_dir=sample_dir)
    except KeyboardInterrupt:
        sys.stderr.write("\ncancelled: no final file written; the last complete training state is kept, so the "
                         "same command resumes from it\n")
        return 130
    except (SaveFailed, SaveStopped) as error:
        sys.stderr.write(f"\nerror: {error.strerror}\n")
        return 1
    except NonFiniteLossError as error:
        sys.stderr.write(f"\nerror: {error}\n")
        return 1
    except (ValueError, FileExistsError, FileNotFoundError, NotEnoughSpace) as error:
        sys.stderr.write(f"\nerror: {error}\n")
        return 2
    finally:
        signal.signal(signal.SIGINT, previous)
    for note in job.notes:
        sys.stderr.write(f"note: {note}\n")
    state = "reused (identical earlier run)" if job.reused else "saved"
    print(f"{state} {job.path}; {job.class_report}" + (f"; final loss {job.losses[-1]:.4f}" if job.losses else ""))
    validation = job.history.validation
    if validation:
        (first_step, first), (last_step, last) = validation[0], validation[-1]
        print(f"validation loss {first:.5f} (step {first_step}) -> {last:.5f} (step {last_step}), "
              f"{len(validation)} points")
    if job.watch_report():
        print(job.watch_report())
    if job.samples:
        grid = _write_grid(job, args.output.parent / f"{args.output.stem}-samples.png")
        where = f" in {job.sample_dir}" if job.sample_dir is not None else ""
        print(f"samples: {len(job.samples)} rounds{where}" + (f"; grid: {grid}" if grid else ""))
    if args.loss_curve is not None:
        from PIL import Image

        title = f"{'LoRA' if args.command == 'lora' else 'DreamBooth'} loss: {args.output.stem}"
        curve = loss_curve_image(job.losses, title=title, extra_curves=job.extra_curves(), validation=validation)
        Image.fromarray((curve[0].numpy() * 255).round().astype("uint8")).save(args.loss_curve)
        print(f"loss curve: {args.loss_curve}")
    return 0


GRID_MARK = ("Software", "DreamBooth Studio sample grid")


def _write_grid(job: JobResult, path: Path) -> Path | None:
    """Write the run's sample grid as a PNG at ``path``; a file there that is not an earlier grid
    of this pack (its PNG text says so) is left alone, with a note."""
    import io

    from PIL import Image, PngImagePlugin

    if os.path.lexists(path):
        try:
            with Image.open(path) as existing:
                ours = getattr(existing, "text", {}).get(GRID_MARK[0]) == GRID_MARK[1]
        except (OSError, ValueError):
            ours = False
        if not ours or path.is_symlink():
            sys.stderr.write(f"note: {path} exists and is not a sample grid of this pack: grid not written\n")
            return None
    grid = job.sample_grid()
    if grid is None:
        return None
    info = PngImagePlugin.PngInfo()
    info.add_text(*GRID_MARK)
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG", pnginfo=info)
    return atomic_write_bytes(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    request_reproducible_blas()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        parser.print_help(sys.stdout)
        return 0
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "placeholder":
        for kind, path in write_placeholder_models(args.out, tiny=args.tiny, seed=args.seed).items():
            print(f"{kind}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
        return 0
    return _train(args, parser)
