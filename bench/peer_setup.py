"""What bench/peers.py needs before it can run the peers, made once and cached in .cache/bench/:

- the diffusers DreamBooth example scripts at the tag of the pinned diffusers (or the newest commit
  when the mirror has no such tag), exported from a local mirror of huggingface/diffusers;
- kohya sd-scripts (newest ``main``), exported from a local mirror of kohya-ss/sd-scripts (files the
  mirror left out, its Windows bitsandbytes DLLs, are skipped), with a venv of its own holding its
  pinned requirements.txt plus torch 2.14.1 / torchvision 0.29.1 (which it leaves out). Every pin of
  sd-scripts 48d368fa55 installs on Python 3.11 as it is; ``KOHYA_RELAXED`` is where a pin that
  does not would be changed;
- a diffusers-format model folder written from the single-file checkpoint (the diffusers scripts
  load only that format), a tokenizer folder that kohya finds offline, and the photos.

The mirrors are git directories under /work/.mirror/ (``$DBS_MIRRORS`` or ``--mirrors`` elsewhere),
one per repository, named ``<owner>+<name>/<something>``. Nothing here downloads them: when one is
missing, the error says what to fetch. Run alone, this module prepares everything without timing::

    .venv/bin/python -m bench.peer_setup [--mirrors DIR] [--tools diffusers,kohya]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "bench"
PEERS = CACHE / "peers"
DEFAULT_MIRRORS = Path(os.environ.get("DBS_MIRRORS", "/work/.mirror"))

DIFFUSERS_REPO = "huggingface/diffusers"
DIFFUSERS_TAG = "v0.42.1"  # the diffusers release the project pins (requirements.txt)
DIFFUSERS_SCRIPTS = ("train_dreambooth_lora.py", "train_dreambooth.py")
KOHYA_REPO = "kohya-ss/sd-scripts"
KOHYA_REF = "main"
KOHYA_TORCH = ("torch==2.14.1", "torchvision==0.29.1")  # sd-scripts leaves torch out of its requirements
# Pins of sd-scripts' requirements.txt that do not install on this Python, and what replaces them.
KOHYA_RELAXED: dict[str, str] = {}
KOHYA_TOKENIZER_ID = "openai/clip-vit-large-patch14"  # sd-scripts looks it up under this name
CLIP_MAX_TOKENS = 77
CAPTION = "a photo of sks toy"


class SetupError(RuntimeError):
    """A peer cannot be prepared; the message says what to do."""


# -- mirrors ----------------------------------------------------------------------------------------
def find_mirror(repo: str, mirrors: Path = DEFAULT_MIRRORS) -> Path:
    """The git directory of ``repo`` ("owner/name") under ``mirrors``."""
    base = mirrors / repo.replace("/", "+")
    candidates = [base] + sorted(base.glob("*")) if base.is_dir() else []
    for folder in candidates:
        if (folder / "HEAD").is_file() and (folder / "objects").is_dir():
            return folder
    raise SetupError(
        f"no mirror of {repo} under {mirrors}: ask the search tool's fetch for github:{repo} (it leaves a git "
        f"directory in {base}/), or pass --mirrors with the folder that holds {base.name}/"
    )


def _git(gitdir: Path, *args: str, stdin: bytes | None = None) -> bytes:
    done = subprocess.run(
        ["git", "--git-dir", str(gitdir), *args], input=stdin, capture_output=True, check=False
    )
    if done.returncode != 0:
        raise SetupError(f"git {' '.join(args)} in {gitdir} failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def resolve_commit(gitdir: Path, *refs: str) -> tuple[str, str]:
    """(ref, commit) of the first of ``refs`` that the mirror has."""
    for ref in refs:
        done = subprocess.run(
            ["git", "--git-dir", str(gitdir), "rev-parse", "--verify", "-q", f"{ref}^{{commit}}"],
            capture_output=True, text=True, check=False,
        )
        if done.returncode == 0:
            return ref, done.stdout.strip()
    raise SetupError(f"{gitdir} has none of {', '.join(refs)}")


def _stamp_matches(stamp: Path, value: str) -> bool:
    return stamp.is_file() and stamp.read_text() == value


def export_tree(gitdir: Path, commit: str, dest: Path) -> int:
    """Write the files of ``commit`` into ``dest`` (a new folder); blobs that the mirror lacks (its
    largest files may be left out) are skipped. Returns how many were skipped."""
    listing = _git(gitdir, "ls-tree", "-r", "-z", commit).split(b"\0")
    entries = []
    for line in filter(None, listing):
        meta, path = line.split(b"\t", 1)
        mode, kind, oid = meta.split()
        if kind == b"blob":
            entries.append((mode, oid, path.decode()))
    output = _git(gitdir, "cat-file", "--batch", stdin=b"".join(oid + b"\n" for _, oid, _ in entries))
    skipped, pos = 0, 0
    for mode, _, path in entries:
        end = output.index(b"\n", pos)
        header = output[pos:end].split()
        pos = end + 1
        if header[-1] == b"missing":
            skipped += 1
            continue
        size = int(header[2])
        content, pos = output[pos : pos + size], pos + size + 1
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if mode == b"120000":
            target.symlink_to(content.decode())
        else:
            target.write_bytes(content)
            if mode == b"100755":
                target.chmod(0o755)
    return skipped


def diffusers_scripts(mirrors: Path = DEFAULT_MIRRORS) -> tuple[Path, str]:
    """(folder holding the two example scripts, where they come from)."""
    gitdir = find_mirror(DIFFUSERS_REPO, mirrors)
    ref, commit = resolve_commit(gitdir, DIFFUSERS_TAG, "HEAD")
    source = f"{DIFFUSERS_REPO} {ref} {commit[:10]}"
    if ref != DIFFUSERS_TAG:
        source += f" (the mirror has no tag {DIFFUSERS_TAG}: newest commit)"
    folder = PEERS / "diffusers"
    stamp = folder / ".commit"
    if not _stamp_matches(stamp, commit):
        folder.mkdir(parents=True, exist_ok=True)
        for name in DIFFUSERS_SCRIPTS:
            (folder / name).write_bytes(_git(gitdir, "show", f"{commit}:examples/dreambooth/{name}"))
        stamp.write_text(commit)
    return folder, source


def kohya_scripts(mirrors: Path = DEFAULT_MIRRORS) -> tuple[Path, str]:
    """(sd-scripts folder, where it comes from)."""
    gitdir = find_mirror(KOHYA_REPO, mirrors)
    ref, commit = resolve_commit(gitdir, KOHYA_REF, "HEAD")
    folder = PEERS / "sd-scripts"
    stamp = folder / ".commit"
    if not _stamp_matches(stamp, commit):
        part = PEERS / "sd-scripts.part"
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        export_tree(gitdir, commit, part)
        (part / ".commit").write_text(commit)
        shutil.rmtree(folder, ignore_errors=True)
        part.rename(folder)
    return folder, f"{KOHYA_REPO} {ref} {commit[:10]}"


# -- kohya's own venv -------------------------------------------------------------------------------
def _requirements(sd_scripts: Path) -> str:
    lines = []
    for line in (sd_scripts / "requirements.txt").read_text().splitlines():
        pin = line.split("#", 1)[0].strip()
        lines.append(KOHYA_RELAXED.get(pin, line))
    return "\n".join(lines) + "\n"


def _base_python() -> str:
    """The interpreter behind this venv (a venv made from a venv's python would share its packages'
    site-packages settings)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def kohya_venv(sd_scripts: Path, log=print) -> Path:
    """Python of sd-scripts' venv, created and filled on first use (pip, several minutes)."""
    venv = PEERS / "kohya-venv"
    python = venv / "bin" / "python"
    requirements = _requirements(sd_scripts)
    want = hashlib.sha256((" ".join(KOHYA_TORCH) + requirements).encode()).hexdigest()
    stamp = venv / ".dbs-requirements"
    if python.exists() and _stamp_matches(stamp, want):
        return python
    (sd_scripts / "requirements.bench.txt").write_text(requirements)
    steps = [
        [_base_python(), "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "-q", *KOHYA_TORCH],
        [str(python), "-m", "pip", "install", "-q", "-r", "requirements.bench.txt"],
    ]
    if not python.exists():
        shutil.rmtree(venv, ignore_errors=True)
    else:
        steps = steps[1:]
    for step in steps:
        log(f"kohya venv: {' '.join(step[-3:])}")
        done = subprocess.run(step, cwd=sd_scripts, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise SetupError(
                f"setting up {venv} failed at `{' '.join(step)}`:\n{tail}\n"
                f"if a pin of {sd_scripts}/requirements.txt cannot install on this Python, relax it in "
                f"KOHYA_RELAXED of bench/peer_setup.py"
            )
    stamp.write_text(want)
    return python


def kohya_tokenizer_cache(tokenizer: Path) -> Path:
    """A ``--tokenizer_cache_dir`` for sd-scripts holding the CLIP tokenizer files of ``tokenizer``
    under the name it looks for, limited to 77 tokens (ComfyUI's copy says 8192, and sd-scripts
    pads prompts to the tokenizer's maximum)."""
    cache = PEERS / "kohya-tokenizer"
    folder = cache / KOHYA_TOKENIZER_ID.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    for source in sorted(Path(tokenizer).iterdir()):
        if source.is_file():
            shutil.copyfile(source, folder / source.name)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config["model_max_length"] = CLIP_MAX_TOKENS
    config_path.write_text(json.dumps(config, indent=2))
    return cache


# -- model and photos -------------------------------------------------------------------------------
def _file_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()} {stat.st_size} {stat.st_mtime_ns}"


def diffusers_model(checkpoint: Path, tokenizer: Path, log=print) -> Path:
    """A diffusers-format folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    scheduler/) of the single-file ``checkpoint``, written once in a separate process so that this
    one stays small."""
    key = _file_key(checkpoint)
    folder = CACHE / f"diffusers-{checkpoint.stem}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    stamp = folder / ".source"
    if _stamp_matches(stamp, key):
        return folder
    log(f"writing a diffusers-format copy of {checkpoint.name} into {folder}")
    part = folder.with_name(folder.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    done = subprocess.run(
        [sys.executable, "-m", "bench.peer_setup", "--write-diffusers-model", str(checkpoint), str(tokenizer),
         str(part)],
        cwd=REPO, capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        raise SetupError(f"could not write the diffusers-format model:\n{done.stderr.strip()[-2000:]}")
    (part / ".source").write_text(key)
    shutil.rmtree(folder, ignore_errors=True)
    part.rename(folder)
    return folder


def _write_diffusers_model(checkpoint: Path, tokenizer: Path, out: Path) -> None:
    sys.path.insert(0, str(REPO))
    from diffusers import StableDiffusionPipeline

    from trainers.sd15.checkpoint import load_sd15

    parts = load_sd15(checkpoint, tokenizer)
    pipeline = StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=parts.noise_scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out)


def photos(resolution: int) -> tuple[Path, Path]:
    """The same 4 photos at ``resolution`` (scikit-image's astronaut, chelsea, coffee, motorcycle,
    centre-cropped square) as (folder of PNGs for diffusers and ours, sd-scripts' train_data_dir
    whose ``1_sks`` folder holds the same PNGs with .txt captions)."""
    from PIL import Image
    from skimage import data

    root = CACHE / f"photos-{resolution}"
    plain, kohya = root / "images", root / "kohya"
    if (root / ".complete").is_file():
        return plain, kohya
    shutil.rmtree(root, ignore_errors=True)
    plain.mkdir(parents=True)
    (kohya / f"1_{CAPTION.split()[-2]}").mkdir(parents=True)
    sources = {
        "astronaut": data.astronaut(), "chelsea": data.chelsea(), "coffee": data.coffee(),
        "motorcycle": data.stereo_motorcycle()[0],
    }
    for name, pixels in sources.items():
        image = Image.fromarray(pixels).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.LANCZOS)
        image.save(plain / f"{name}.png")
        shutil.copyfile(plain / f"{name}.png", kohya / f"1_{CAPTION.split()[-2]}" / f"{name}.png")
        (kohya / f"1_{CAPTION.split()[-2]}" / f"{name}.txt").write_text(CAPTION)
    (root / ".complete").write_text("4 photos\n")
    return plain, kohya


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mirrors", type=Path, default=DEFAULT_MIRRORS, help="folder holding the git mirrors")
    parser.add_argument("--tools", default="diffusers,kohya", help="peers to prepare (default diffusers,kohya)")
    parser.add_argument("--write-diffusers-model", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_diffusers_model:
        _write_diffusers_model(*args.write_diffusers_model)
        return 0
    failed = False
    for tool in [name.strip() for name in args.tools.split(",") if name.strip()]:
        try:
            if tool == "diffusers":
                print("diffusers scripts:", diffusers_scripts(args.mirrors)[1])
            elif tool == "kohya":
                folder, source = kohya_scripts(args.mirrors)
                print("sd-scripts:", source)
                print("kohya venv:", kohya_venv(folder))
            else:
                parser.error(f"unknown tool {tool!r}; choose from diffusers, kohya")
        except SetupError as error:
            print(f"{tool}: {error}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
