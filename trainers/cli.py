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
import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from .data.class_images import default_class_cache, sweep_class_cache
from .data.images import BAD_FILE_MODES, CROP_MODES, LOSS_MASKS, load_subject
from .files.fileio import atomic_write_bytes, sweep_stale_temps
from .jobs import Durability, JobResult, check_sample_dir, train_file
from .runfile import RUN_FORMAT
from .sd15.placeholder import write_placeholder_models
from .training import parallel
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
    parser.add_argument("--config", type=Path, default=None, metavar="RUN.json",
                        help="take the options from a run file (a training node's export, or written by hand: "
                             f"{RUN_FORMAT!r}); options given on the command line after it override its values, "
                             "and its relative paths are relative to the file's folder")
    parser.add_argument("--checkpoint", type=Path,
                        help="SD1.5 base model: a single-file .safetensors or a diffusers folder")
    parser.add_argument("--images", type=Path, help="folder with 3-20 photos of the subject")
    parser.add_argument("--instance-prompt", help="prompt naming the subject, e.g. 'a photo of sks dog'")
    parser.add_argument("--class-prompt", default="",
                        help="prompt of the subject's class, e.g. 'a photo of dog' (needed for prior preservation)")
    parser.add_argument("--output", type=Path, help=output_help)
    parser.add_argument(
        "--tokenizer", type=Path, default=None,
        help="CLIP tokenizer folder (ComfyUI's comfy/sd1_tokenizer); default: $DBS_TOKENIZER, "
        "$COMFYUI_PATH/comfy/sd1_tokenizer, or a diffusers folder's tokenizer/",
    )  # fmt: skip
    parser.add_argument("--resolution", type=int, default=512, help="training resolution, a multiple of 64 (default 512)")
    parser.add_argument("--max-images", type=int, default=0, help="use at most this many photos (by name); 0 = all")
    parser.add_argument("--crop-mode", choices=CROP_MODES, default="center",
                        help="how photos are cropped: square around the face, centred, or padded, or to the "
                             "nearest aspect-ratio bucket (about the square's area, sides multiples of 64) "
                             "(default center)")
    parser.add_argument("--loss-mask", choices=LOSS_MASKS, default="off",
                        help="masked loss: face = a soft box around each detected face; mask = <images>/masks/"
                             "<photo name>.png (white = the subject); off (default). See --unmasked-weight")
    parser.add_argument("--captions", action="store_true", help="use <image>.txt next to each image as its caption")
    parser.add_argument("--bad-files", choices=BAD_FILE_MODES, default="stop",
                        help="stop: unusable photos are an error naming them; skip: leave them out (default stop)")
    parser.add_argument("--flip", action="store_true", help="random horizontal flip augmentation")
    parser.add_argument("--shard-optimizer", action="store_true",
                        help="under accelerate launch: each process keeps only its share of the optimizer states "
                             "(ZeRO stage 1): AdamW's 6.9 GB of states for the SD1.5 UNet divided by the processes; "
                             "the same training. Not with fused_backward or weight_precision bf16")
    parser.add_argument("--shard-gradients", action="store_true",
                        help="under accelerate launch: --shard-optimizer and each process also keeps only its share "
                             "of the gradients (ZeRO stage 2): the SD1.5 UNet's 3.4 GB of gradients divided by the "
                             "processes too; the same training. Not with fp16, fused_backward or weight_precision bf16")
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


REQUIRED = ("--checkpoint", "--images", "--instance-prompt", "--output")
# run-file options that are paths (relative ones are resolved against the run file's folder)
_PATH_OPTIONS = ("checkpoint", "images", "output", "tokenizer", "class_folder", "sample_dir", "loss_curve",
                 "state_dir", "rescue_dir", "class_cache")


class RunFileError(ValueError):
    """A run file that cannot be read or does not fit the command; the message says what to fix."""


def read_run_file(path: Path, command: str, parser: argparse.ArgumentParser) -> tuple[list[str], int | None]:
    """The command-line options a run file stands for, and the process count it was exported for
    (None: any)."""
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunFileError(f"cannot read the run file {path}: {error}") from None
    if not isinstance(run, dict) or run.get("format") != RUN_FORMAT:
        raise RunFileError(f"{path} is not a run file (its \"format\" must be {RUN_FORMAT!r})")
    if run.get("command") != command:
        raise RunFileError(f"{path} is a {run.get('command')!r} run: use `{PROG} {run.get('command')} --config "
                           f"{path}`")
    options = run.get("options")
    if not isinstance(options, dict):
        raise RunFileError(f"{path} has no \"options\" object")
    processes = run.get("processes")
    if processes is not None and (isinstance(processes, bool) or not isinstance(processes, int) or processes < 1):
        raise RunFileError(f"\"processes\" in {path} must be a whole number >= 1 (got {processes!r})")
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    argv: list[str] = []
    for name, value in options.items():
        action = actions.get(name)
        if action is None or name == "config":
            raise RunFileError(f"{path}: unknown option {name!r}; see `{PROG} {command} --help`")
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:
            if not isinstance(value, bool):
                raise RunFileError(f"{path}: option {name!r} must be true or false (got {value!r})")
            if isinstance(action, argparse.BooleanOptionalAction):
                argv.append(flag if value else "--no-" + flag[2:])
            elif value:
                argv.append(flag)
            continue
        if value is None:
            continue
        if name in _PATH_OPTIONS:
            value = str((path.parent / Path(str(value)).expanduser()).resolve()) \
                if not Path(str(value)).expanduser().is_absolute() else str(Path(str(value)).expanduser())
        argv += [flag, str(value)]
    return argv, processes


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


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser,
           processes: parallel.Processes = parallel.SINGLE) -> int:
    config_cls = TRAINERS[args.command][0]
    missing = [flag for flag in REQUIRED if getattr(args, flag[2:].replace("-", "_")) is None]
    if missing:  # given on the command line or by --config
        parser.error(f"the following arguments are required: {', '.join(missing)} (or --config RUN.json)")
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
                               on_bad=args.bad_files, tokenizer_dir=tokenizer, loss_mask=args.loss_mask).subject
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    device = parallel.device_of(processes, args.device)
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
             *sweep_stale_temps(rescue), *sweep_class_cache(class_cache), *sweep_states(states)] \
        if processes.main else []  # only the main process writes (or removes) anything
    for path in swept:
        logging.getLogger(__name__).info("removed stale temporary file %s", path)
    progress = TerminalProgress() if processes.main else TrainingCallbacks()
    previous = signal.signal(signal.SIGINT, progress.cancel) if processes.main else signal.getsignal(signal.SIGINT)
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
    except Exception as error:
        if not processes.several:
            raise
        # most often another process failed or was killed and this one lost it at the gradient average
        traceback.print_exc()
        sys.stderr.write(
            f"\nerror: process {processes.rank} of {processes.world} stopped: {type(error).__name__}: {error}\n"
            "If another process of this launch failed or was killed, its own error is above or in the launcher's "
            "report. No final file was written; with --save-every the same command resumes from the last "
            "training state (with any process count).\n")
        return 1
    finally:
        signal.signal(signal.SIGINT, previous)
    if not processes.main:
        return 0
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
    if args.command == "placeholder":
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        for kind, path in write_placeholder_models(args.out, tiny=args.tiny, seed=args.seed).items():
            print(f"{kind}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
        return 0
    exported_for = None
    if args.config is not None:
        sub = _subparser(parser, args.command)
        try:
            options, exported_for = read_run_file(args.config, args.command, sub)
        except RunFileError as error:
            sub.error(str(error))
        at = argv.index(args.command)
        args = parser.parse_args([args.command, *options, *argv[at + 1 :]])  # the command line wins
    plugin = parallel.unsupported_plugin()
    if plugin is not None:  # it would be ignored: say so instead of training without what was asked
        _subparser(parser, args.command).error(
            f"this launch asks for accelerate's {plugin}, which the engine does not run (it keeps its own training "
            "loop): launch without it; for less memory per GPU use --shard-gradients (ZeRO stage 2: optimizer "
            "states and gradients split over the processes), --shard-optimizer (ZeRO stage 1), --optimizer "
            "adafactor, --fused-backward or --weight-precision bf16")
    world = parallel.launched_world()
    if exported_for is not None and exported_for != world:
        _subparser(parser, args.command).error(
            f"{args.config} was exported for {exported_for} process(es) but this launch has {world}: its global batch "
            f"is batch_size x gradient_accumulation x {exported_for}; launch it with --num_processes {exported_for} "
            "(or export it again for this count)")
    processes = parallel.shard_optimizer_states(args.shard_optimizer, gradients=args.shard_gradients)
    logging.basicConfig(level=logging.INFO if processes.main else logging.WARNING,
                        format=("" if processes.main else f"[rank {processes.rank}] ")
                        + "%(levelname)s %(name)s: %(message)s")
    try:
        return _train(args, _subparser(parser, args.command), processes)
    finally:
        parallel.close()


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)
