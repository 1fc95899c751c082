"""This pack against its peers, side by side in one run: s/step and peak memory of the diffusers
DreamBooth example scripts, kohya sd-scripts and ``python -m trainers`` on the same random
full-size SD1.5 model, the same 4 photos and the same settings.

Usage (heavy: wrap it in ``flock /tmp/dbs-heavy.lock`` on a shared machine)::

    .venv/bin/python bench/peers.py [--only lora,full] [--sizes 64,256] [--tools diffusers,kohya,ours]
        [--steps 3,13] [--repeat 1] [--precision fp32|bf16] [--json FILE] [--mirrors DIR]

Runs (batch 1, constant learning rate, seed 0, no prior preservation, text encoder frozen):
  lora  LoRA rank 4, alpha 4 on the UNet, AdamW, lr 1e-4.
        diffusers ``train_dreambooth_lora.py``; kohya ``train_network.py --network_module networks.lora
        --network_dim 4 --network_alpha 4 --network_train_unet_only --cache_latents --sdpa``; ours
        ``python -m trainers lora --rank 4 --alpha 4 --text-encoder-lr 0``.
  full  the whole UNet fine-tuned with AdamW, lr 2e-6.
        diffusers ``train_dreambooth.py``; kohya ``train_db.py --cache_latents --sdpa
        --stop_text_encoder_training -1`` (sd-scripts trains the text encoder too unless told not to);
        ours ``python -m trainers dreambooth --class-images 0 --text-encoder-lr 0``.
Each tool keeps its own defaults otherwise (AdamW weight decay 1e-2, gradient clipping at 1.0 in all
three). kohya runs with ``--max_data_loader_n_workers 0`` like the other two (its default forks
DataLoader workers every epoch). ``--precision bf16`` gives diffusers and kohya
``--mixed_precision bf16`` and ours ``--precision bf16``. The peers run without checkpoints,
validation or samples (their intervals lie past the last step), ours with ``--sample-every 0
--validate-every 0``. Every tool saves its result at the end, as a user's run would.

Each (run, size, tool) trains in two fresh processes, a short and a long one (``--steps 3,13``), one
after the other. Columns of the table printed after each repeat:
  s/step      (wall time of the long process - wall time of the short one) / (step difference):
              loading, latent caching and saving cost the same in both and cancel out.
              Before each process the model files are read and the tool's --help is run (it imports
              what training imports), so each process starts with a warm page cache.
              A value at or below zero (marked "noise") means loading and saving varied by more than
              the extra steps cost: give a longer second run (e.g. --steps 5,35).
  in-run      a check that no loading or saving enters: the seconds between the "1/N" and the "N/N"
              progress counts that the long process printed (tqdm bars of the peers, our progress
              line), seen live on its output, / (N - 1). It leaves out the first step's warm-up.
  peak GB     the larger peak RSS of the two processes, in GiB: the high-water mark of each process's
              own memory (VmHWM), read every 50 ms while it runs. os.wait4's maxrss (kept in the JSON
              as rusage_peak) is not used: it also counts the memory of the process that started the
              child, which is this one and holds about 6 GB when it has just generated the test models.
  speed x     on our rows: the fastest peer's s/step / ours (above 1: ours is faster), and which peer.
  in-run x    the same from the in-run column.
  memory x    on our rows: our peak / the lowest peer's peak (below 1: ours needs less), and which peer.
A tool that fails prints the last lines of its stderr; its row says "failed" and the bench goes on.
All numbers, commands, sources and settings go into ``--json FILE`` (rewritten after each tool).

What it needs (made once, cached in .cache/bench/, see bench/peer_setup.py): git mirrors of
huggingface/diffusers and kohya-ss/sd-scripts under /work/.mirror/ (the search tool's fetch makes
them; none is downloaded here), a venv for sd-scripts (pip, a few minutes the first time), a
diffusers-format copy of the checkpoint, the photos. Without ``--checkpoint`` the random-weight
full-size test checkpoint is used; without ``--tokenizer`` ComfyUI's CLIP tokenizer. The diffusers
scripts run in the project's venv, offline. The full fine-tune needs about 15 GB per process; the
processes run one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import peer_setup  # noqa: E402
from bench.harness import GB, chosen_configs, default_inputs  # noqa: E402

RUNS = {
    "lora": {"label": "LoRA rank 4", "lr": 1e-4},
    "full": {"label": "full fine-tune AdamW", "lr": 2e-6},
}
TOOLS = ("diffusers", "kohya", "ours")
PEER_TOOLS = ("diffusers", "kohya")
STDERR_TAIL = 25


@dataclass
class Result:
    run: str
    size: int
    tool: str
    steps: tuple[int, int]
    seconds: list[float] = field(default_factory=list)  # wall time of each process
    peaks: list[int] = field(default_factory=list)  # max RSS of each process, bytes
    s_per_step: float | None = None
    peak_bytes: int | None = None
    training_spans: list[tuple[float, float] | None] = field(default_factory=list)  # see training_span()
    in_run_s_per_step: float | None = None  # from the long process's progress counts, steps 1 -> last
    error: str | None = None
    command: list[str] = field(default_factory=list)


class Tools:
    """Where each tool is and how it is called; a tool that could not be set up keeps its error."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.errors: dict[str, str] = {}
        self.sources: dict[str, str] = {}
        self.python = {"diffusers": sys.executable, "ours": sys.executable}
        if "diffusers" in args.tools:
            self._setup("diffusers", self._setup_diffusers)
        if "kohya" in args.tools:
            self._setup("kohya", self._setup_kohya)
        self.sources["ours"] = _our_source()

    def _setup(self, tool: str, prepare) -> None:
        try:
            prepare()
        except peer_setup.SetupError as error:
            self.errors[tool] = str(error)
            print(f"{tool} is not set up, its rows will say failed:\n{error}", file=sys.stderr)

    def _setup_diffusers(self) -> None:
        self.diffusers_dir, self.sources["diffusers"] = peer_setup.diffusers_scripts(self.args.mirrors)
        self.model_dir = peer_setup.diffusers_model(self.args.checkpoint, self.args.tokenizer, log=_note)

    def _setup_kohya(self) -> None:
        self.kohya_dir, self.sources["kohya"] = peer_setup.kohya_scripts(self.args.mirrors)
        self.python["kohya"] = str(peer_setup.kohya_venv(self.kohya_dir, log=_note))
        self.tokenizer_cache = peer_setup.kohya_tokenizer_cache(self.args.tokenizer)

    def model_files(self, tool: str) -> list[Path]:
        return [self.model_dir] if tool == "diffusers" else [self.args.checkpoint]

    def command(self, tool: str, run: str, size: int, steps: int, out: Path) -> tuple[list[str], Path]:
        """(argv, working folder) of one training process."""
        images, kohya_images = peer_setup.photos(size)
        lr = f"{RUNS[run]['lr']:g}"
        precision = self.args.precision
        if tool == "diffusers":
            script = "train_dreambooth_lora.py" if run == "lora" else "train_dreambooth.py"
            argv = [
                self.python[tool], str(self.diffusers_dir / script),
                "--pretrained_model_name_or_path", str(self.model_dir),
                "--instance_data_dir", str(images), "--instance_prompt", peer_setup.CAPTION,
                "--output_dir", str(out), "--resolution", str(size), "--train_batch_size", "1",
                "--learning_rate", lr, "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
                "--max_train_steps", str(steps), "--checkpointing_steps", str(steps + 1000), "--seed", "0",
                "--mixed_precision", "no" if precision == "fp32" else precision,
            ]
            if run == "lora":
                argv += ["--rank", "4"]
            return argv, out
        if tool == "kohya":
            script = "train_network.py" if run == "lora" else "train_db.py"
            argv = [
                self.python[tool], script,
                "--pretrained_model_name_or_path", str(self.args.checkpoint),
                "--train_data_dir", str(kohya_images), "--caption_extension", ".txt",
                "--tokenizer_cache_dir", str(self.tokenizer_cache),
                "--output_dir", str(out), "--output_name", "peer", "--save_model_as", "safetensors",
                "--resolution", str(size), "--train_batch_size", "1", "--max_train_steps", str(steps),
                "--learning_rate", lr, "--lr_scheduler", "constant", "--optimizer_type", "AdamW", "--seed", "0",
                "--mixed_precision", "no" if precision == "fp32" else precision,
                "--cache_latents", "--sdpa", "--max_data_loader_n_workers", "0",
            ]
            if run == "lora":
                argv += ["--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "4",
                         "--network_train_unet_only"]
            else:
                argv += ["--stop_text_encoder_training", "-1"]
            return argv, self.kohya_dir
        argv = [
            self.python[tool], "-m", "trainers", "lora" if run == "lora" else "dreambooth",
            "--checkpoint", str(self.args.checkpoint), "--tokenizer", str(self.args.tokenizer),
            "--images", str(images), "--instance-prompt", peer_setup.CAPTION,
            "--output", str(out / "ours.safetensors"), "--resolution", str(size), "--batch-size", "1",
            "--steps", str(steps), "--unet-lr", lr, "--text-encoder-lr", "0", "--lr-scheduler", "constant",
            "--seed", "0", "--precision", precision, "--sample-every", "0", "--validate-every", "0",
        ]
        if run == "lora":
            argv += ["--rank", "4", "--alpha", "4"]
        else:
            argv += ["--class-images", "0", "--optimizer", "adamw"]
        return argv, REPO


def _help_argv(argv: list[str]) -> list[str]:
    """The tool's --help: it imports what training imports, so the measured process starts warm."""
    script_end = 4 if argv[1] == "-m" else 2  # python -m trainers lora | python script.py
    return argv[:script_end] + ["--help"]


def warm_page_cache(paths: list[Path]) -> None:
    """Read the model files once so that every process starts with them in the page cache (a full
    fine-tune's 15 GB can push them out, and a cold read would land in one process of a pair only)."""
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            with open(file, "rb") as handle:
                while handle.read(1 << 24):
                    pass


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _our_source() -> str:
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=10", "HEAD"], capture_output=True,
                          text=True, check=False)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False)
    return f"this checkout {done.stdout.strip()}{' (with uncommitted changes)' if dirty.stdout.strip() else ''}"


def child_env() -> dict[str, str]:
    """The same environment for every tool: offline, unbuffered, no trackers."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", DIFFUSERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
        HF_HOME=str(peer_setup.CACHE / "hf-home"),
    )
    env.pop("PYTHONPATH", None)
    return env


PROGRESS = re.compile(rb"(?<![\w./-])(\d+)/(\d+)(?![\w./-])")


class ProgressWatch:
    """Copies a child's output stream into a log file and notes when each "k/N" progress count
    (N = the process's step count) first appears: tqdm's bars of diffusers and kohya and our
    progress line all print one as each optimizer step ends."""

    def __init__(self, stream: Any, log: Any, steps: int, start: float) -> None:
        self.stream, self.log, self.steps, self.start = stream, log, steps, start
        self.events: list[tuple[float, int]] = []  # (seconds since start, k) of each "k/N" printed
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        carry = b""
        while chunk := self.stream.read1(1 << 16):
            now = time.monotonic() - self.start
            self.log.write(chunk)
            text, carry = carry + chunk, chunk[-24:]
            for match in PROGRESS.finditer(text):
                if match.end() > len(text) - len(chunk) and int(match[2]) == self.steps:
                    self.events.append((now, int(match[1])))


def vm_hwm(pid: int) -> int:
    """Peak resident memory (bytes) of a running process's current program (Linux; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def run_process(argv: list[str], cwd: Path, log_dir: Path, timeout: float, steps: int) -> dict[str, Any]:
    """Wall seconds, max RSS (bytes), exit code and when each step's progress count appeared, of one
    process; its output goes to log_dir."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "stdout.txt", "wb") as out, open(log_dir / "stderr.txt", "wb") as err:
        start = time.monotonic()
        proc = subprocess.Popen(argv, cwd=cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        watches = [ProgressWatch(proc.stdout, out, steps, start), ProgressWatch(proc.stderr, err, steps, start)]
        deadline = start + timeout
        high_water = 0  # VmHWM of the process's own memory, polled while it runs
        try:
            while True:
                high_water = max(high_water, vm_hwm(proc.pid))
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    _, status, usage = os.wait4(proc.pid, 0)
                    err.write(f"\n[bench] killed after {timeout:.0f} s\n".encode())
                    break
                time.sleep(0.05)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            os.wait4(proc.pid, 0)
            proc.returncode = -9
            raise
        seconds = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        for watch in watches:
            watch.thread.join(timeout=10)
    events = sorted(event for watch in watches for event in watch.events)
    # rusage's maxrss also takes in the memory of the process that started the child (this one, when
    # it generated the test models first): the polled high-water mark of the child's own memory does
    # not, and misses at most the last 50 ms before exit.
    return {"seconds": seconds, "peak": high_water or usage.ru_maxrss * 1024, "rusage_peak": usage.ru_maxrss * 1024,
            "code": proc.returncode,
            "training_span": training_span(events, steps)}


def training_span(events: list[tuple[float, int]], steps: int) -> tuple[float, float] | None:
    """(when step 1 ended, when the last step ended) from the "k/N" counts a process printed. Other
    bars with the same N can come first (a latent-caching bar over as many photos as steps), and a
    bar repaints its count, so: the first "1/N" of the last run of them, then the first "N/N" after."""
    ones = [i for i, (_, k) in enumerate(events) if k == 1]
    if not ones:
        return None
    first = ones[-1]
    while first > 0 and events[first - 1][1] == 1:
        first -= 1
    last = next((t for t, k in events[first:] if k == steps), None)
    return None if last is None else (events[first][0], last)


def _tail(path: Path, lines: int = STDERR_TAIL) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.replace("\r", "\n").strip().splitlines()[-lines:])


def measure(tools: Tools, run: str, size: int, tool: str, args: argparse.Namespace, repeat: int) -> Result:
    result = Result(run=run, size=size, tool=tool, steps=tuple(args.steps))
    if tool in tools.errors:
        result.error = tools.errors[tool].splitlines()[0]
        return result
    for steps in args.steps:
        name = f"r{repeat}-{run}-{size}-{tool}-{steps}"
        out = args.workdir / "runs" / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        argv, cwd = tools.command(tool, run, size, steps, out)
        result.command = argv
        warm_page_cache(tools.model_files(tool))
        subprocess.run(_help_argv(argv), cwd=cwd, env=child_env(), stdin=subprocess.DEVNULL, capture_output=True,
                       check=False)
        logs = args.workdir / "logs" / name
        done = run_process(argv, cwd, logs, args.timeout, steps)
        shutil.rmtree(out, ignore_errors=True)
        os.sync()  # the next process does not pay for this one's writes
        seconds, peak, code = done["seconds"], done["peak"], done["code"]
        _note(f"  {run} {size}px {tool} {steps} steps: {seconds:.1f} s, peak {peak / GB:.2f} GB"
              + (f", exit code {code}" if code else ""))
        if code != 0:
            result.error = f"exit code {code} at {steps} steps (logs: {logs})"
            _note(f"  {tool} failed; last lines of its stderr:\n" + _indent(_tail(logs / "stderr.txt")))
            return result
        result.seconds.append(seconds)
        result.peaks.append(peak)
        result.training_spans.append(done["training_span"])
    (short, long_), (t_short, t_long) = args.steps, result.seconds
    result.s_per_step = (t_long - t_short) / (long_ - short)
    result.peak_bytes = max(result.peaks)
    span = result.training_spans[-1]
    if span is not None:
        result.in_run_s_per_step = (span[1] - span[0]) / (long_ - 1)
    return result


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def _ratio(ours: float | None, best: float | None) -> float | None:
    if ours is None or best is None or ours <= 0 or best <= 0:
        return None  # a slope at or below zero is noise (see the docstring)
    return best / ours


def ratios(rows: list[Result]) -> dict[str, Any]:
    """Our speed against the fastest peer and our memory against the lowest, per (run, size)."""
    ours = next((r for r in rows if r.tool == "ours" and r.s_per_step is not None), None)
    peers = [r for r in rows if r.tool in PEER_TOOLS and r.s_per_step is not None]
    if ours is None or not peers:
        return {}
    found: dict[str, Any] = {}
    timed = [r for r in peers if r.s_per_step > 0]
    if timed:
        fastest = min(timed, key=lambda r: r.s_per_step)
        found.update(speed=_ratio(ours.s_per_step, fastest.s_per_step), fastest_peer=fastest.tool)
    in_run = [r for r in peers if r.in_run_s_per_step and r.in_run_s_per_step > 0]
    if in_run:
        fastest = min(in_run, key=lambda r: r.in_run_s_per_step)
        found.update(in_run_speed=_ratio(ours.in_run_s_per_step, fastest.in_run_s_per_step),
                     in_run_fastest_peer=fastest.tool)
    leanest = min(peers, key=lambda r: r.peak_bytes)
    found.update(memory=ours.peak_bytes / leanest.peak_bytes, leanest_peer=leanest.tool)
    return found


def _times(value: float | None, peer: str | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x ({peer})"


def table(results: list[Result], repeat: int, args: argparse.Namespace) -> str:
    header = ("run", "tool", "s/step", "in-run", "peak GB", "speed x", "in-run x", "memory x")
    lines = []
    for run in args.only:
        for size in args.sizes:
            rows = [r for r in results if r.run == run and r.size == size]
            if not rows:
                continue
            found = ratios(rows)
            for row in rows:
                ours = row.tool == "ours" and found
                if row.s_per_step is None:
                    cells = ("failed", "", "failed")
                else:
                    cells = (f"{row.s_per_step:.2f}" + ("" if row.s_per_step > 0 else " (noise)"),
                             "-" if row.in_run_s_per_step is None else f"{row.in_run_s_per_step:.2f}",
                             f"{row.peak_bytes / GB:.2f}")
                lines.append((
                    f"{RUNS[run]['label']}, {size}px", row.tool, *cells,
                    _times(found.get("speed"), found.get("fastest_peer")) if ours else "",
                    _times(found.get("in_run_speed"), found.get("in_run_fastest_peer")) if ours else "",
                    _times(found.get("memory"), found.get("leanest_peer")) if ours else "",
                ))
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    title = (f"repeat {repeat + 1}/{args.repeat}: {args.precision}, batch 1, steps {args.steps[0]} and "
             f"{args.steps[1]}, s/step = slope, peak = max RSS")
    return "\n".join([title, fmt.format(*header), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*line) for line in lines])


def write_json(path: Path, args: argparse.Namespace, tools: Tools, repeats: list[list[Result]]) -> None:
    payload = {
        "settings": {
            "runs": args.only, "sizes": args.sizes, "tools": args.tools, "steps": args.steps,
            "precision": args.precision, "checkpoint": str(args.checkpoint), "photos": 4, "batch": 1,
            "threads": os.cpu_count(),
        },
        "sources": tools.sources,
        "setup_errors": tools.errors,
        "repeats": [
            {"results": [asdict(r) for r in results],
             "ratios": {f"{run}-{size}": ratios([r for r in results if r.run == run and r.size == size])
                        for run in args.only for size in args.sizes}}
            for results in repeats
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="lora,full", help="runs: lora, full (default both)")
    parser.add_argument("--sizes", default="64,256", help="image sizes in pixels, multiples of 64 (default 64,256)")
    parser.add_argument("--tools", default=",".join(TOOLS), help="tools: diffusers, kohya, ours (default all)")
    parser.add_argument("--steps", default="3,13", help="short and long step counts (default 3,13)")
    parser.add_argument("--repeat", type=int, default=1, help="times the whole matrix runs (default 1)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32 (default) or bf16 mixed precision for every tool")
    parser.add_argument("--json", type=Path, help="write every result to this JSON file")
    parser.add_argument("--checkpoint", type=Path, help="SD1.5 .safetensors (default: the random test checkpoint)")
    parser.add_argument("--tokenizer", type=Path, help="CLIP tokenizer folder (default: ComfyUI's sd1_tokenizer)")
    parser.add_argument("--mirrors", type=Path, default=peer_setup.DEFAULT_MIRRORS,
                        help=f"folder with the git mirrors of the peers (default {peer_setup.DEFAULT_MIRRORS})")
    parser.add_argument("--workdir", type=Path, default=peer_setup.CACHE / "peer-runs",
                        help="where each process's output and logs go (outputs are removed after each process)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one process may take (default 3600)")
    args = parser.parse_args(argv)
    args.only = chosen_configs(parser, args.only, RUNS)
    args.tools = chosen_configs(parser, args.tools, TOOLS)
    try:
        args.sizes = [int(size) for size in args.sizes.split(",") if size.strip()]
        args.steps = [int(steps) for steps in args.steps.split(",")]
    except ValueError:
        parser.error("--sizes and --steps take comma-separated whole numbers, e.g. --sizes 64,256 --steps 3,13")
    if not args.sizes or any(size < 64 or size % 64 for size in args.sizes):
        parser.error(f"--sizes {args.sizes}: each size must be a multiple of 64 (64, 128, 256 ...)")
    if len(args.steps) != 2 or not 1 <= args.steps[0] < args.steps[1]:
        parser.error(f"--steps {args.steps}: give two step counts, short then long, e.g. --steps 3,13")
    if args.repeat < 1:
        parser.error("--repeat must be 1 or more")
    default_inputs(args)
    if not Path(args.checkpoint).is_file():
        parser.error(f"--checkpoint {args.checkpoint} is not a file")
    if not Path(args.tokenizer).is_dir():
        parser.error(f"--tokenizer {args.tokenizer} is not a folder; give the CLIP tokenizer folder")
    args.checkpoint, args.tokenizer = Path(args.checkpoint).resolve(), Path(args.tokenizer).resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tools = Tools(args)
    for tool, source in tools.sources.items():
        _note(f"{tool}: {source}")
    repeats: list[list[Result]] = []
    for repeat in range(args.repeat):
        results: list[Result] = []
        repeats.append(results)
        for run in args.only:
            for size in args.sizes:
                for tool in args.tools:
                    results.append(measure(tools, run, size, tool, args, repeat))
                    if args.json:
                        write_json(args.json, args, tools, repeats)
        print(table(results, repeat, args), flush=True)
        print(flush=True)
    return 0 if all(r.error is None for results in repeats for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
