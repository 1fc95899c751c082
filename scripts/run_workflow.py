"""Run a workflow headless on a ComfyUI server: queue, override inputs, stream progress, download.

    python scripts/run_workflow.py WORKFLOW.json [--server http://127.0.0.1:8188] \\
        [--set "<node title or id>.<input>=<value>" ...] [--out DIR] [--timeout SECONDS] [--print-api]

- WORKFLOW.json is UI format (what the canvas saves, e.g. example_workflows/*.json) or API
  format (what ``POST /prompt`` takes). UI format is converted by the server's own frontend in
  headless Chromium (``app.graphToPrompt()``), exactly as the Run button does.
- ``--set`` picks a node by id, by title (``_meta.title``) or by node type when only one node
  has it, and an input by name; the value is read as JSON when it parses (numbers, true/false,
  lists) and as text otherwise. A linked input cannot be set.
- Progress goes to stderr (node being run, step/total); output files are downloaded into --out.
- Output files keep the server's subfolder under --out. Each name is made safe for POSIX and
  Windows alike (``<>:"|?*`` and bidi controls become ``_``, trailing dots and spaces go,
  ``CON.png`` becomes ``CON_.png``); a name that cannot be made safe (absolute, ``..``, empty,
  control characters, over 255 UTF-8 bytes) is refused. Each file is downloaded under a temporary
  name and renamed when complete. An existing file is never replaced: the same bytes are left as
  they are, different bytes are saved as ``<stem>-2<suffix>`` (a note on stderr says so).
- Exit codes: 0 done; 1 a node failed (its id, title, type and message are printed) or the
  server rejected the prompt (every node error is printed); 2 bad arguments or workflow file
  (checked before the prompt is queued); 3 the run finished but some output files were not
  downloaded (each is printed with its node and the reason; the others are downloaded whole);
  130 the run was interrupted.
"""

from __future__ import annotations

import argparse
import errno
import filecmp
import http.client
import json
import os
import re
import secrets
import sys
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.comfyclient import ComfyClient, PromptRejected  # noqa: E402
from scripts.frontend import Frontend, is_api_prompt, is_ui_workflow  # noqa: E402


class UsageError(ValueError):
    """Bad arguments or workflow file (exit code 2)."""


def title_of(prompt: dict, node_id: str) -> str:
    node = prompt[node_id]
    return (node.get("_meta") or {}).get("title") or node["class_type"]


def find_node(prompt: dict, ref: str) -> str:
    """Node id for a reference: an id, a unique title, or a node type used by one node only."""
    if ref in prompt:
        return ref
    for key in ("title", "class_type"):
        found = [nid for nid, node in prompt.items()
                 if (((node.get("_meta") or {}).get("title")) if key == "title" else node["class_type"]) == ref]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise UsageError(f"{len(found)} nodes are called {ref!r} (ids {', '.join(found)}): use a node id")
    names = ", ".join(f"{nid} {title_of(prompt, nid)!r}" for nid in sorted(prompt, key=_id_order))
    raise UsageError(f"no node {ref!r} in the workflow; nodes: {names}")


def _id_order(node_id: str):
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def apply_overrides(prompt: dict, overrides: list[str]) -> dict:
    """A copy of `prompt` with every ``node.input=value`` applied."""
    prompt = json.loads(json.dumps(prompt))
    for item in overrides:
        target, sep, value = item.partition("=")
        ref, dot, name = target.rpartition(".")
        if not sep or not dot or not ref or not name:
            raise UsageError(f"--set {item!r}: expected <node title or id>.<input>=<value>")
        node_id = find_node(prompt, ref)
        inputs = prompt[node_id].setdefault("inputs", {})
        if isinstance(inputs.get(name), list):
            raise UsageError(f"--set {item!r}: input {name!r} of node {node_id} is linked to another node")
        if name not in inputs:
            known = ", ".join(k for k, v in inputs.items() if not isinstance(v, list))
            raise UsageError(f"--set {item!r}: node {node_id} ({title_of(prompt, node_id)}) has no input {name!r}; "
                             f"its inputs: {known}")
        inputs[name] = parse_value(value)
    return prompt


def load_prompt(path: Path, server: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read workflow {path}: {exc}") from None
    if is_api_prompt(data):
        return data
    if is_ui_workflow(data):
        with Frontend(server) as frontend:
            try:
                return frontend.to_api(data)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
    raise UsageError(f"{path} is neither a UI-format workflow (nodes + links) nor an API-format prompt "
                     "({id: {class_type, inputs}})")


class ProgressPrinter:
    def __init__(self, prompt: dict, stream=sys.stderr):
        self.prompt, self.stream = prompt, stream
        self.last = None

    def __call__(self, event: dict) -> None:
        kind, data = event.get("type"), event.get("data") or {}
        node = str(data.get("node")) if data.get("node") is not None else None
        name = f"{node} {title_of(self.prompt, node)!r}" if node in self.prompt else node
        if kind == "executing" and node is not None and node != self.last:
            self.last = node
            self.stream.write(f"running node {name}\n")
        elif kind == "progress":
            self.stream.write(f"  node {name}: {data.get('value')}/{data.get('max')}\n")
        elif kind == "execution_cached" and data.get("nodes"):
            self.stream.write(f"cached: {', '.join(str(n) for n in data['nodes'])}\n")
        self.stream.flush()


# -- output files ------------------------------------------------------------------------------
# The server names the files (`subfolder`, `filename`): a broken or hostile server must not be able
# to write outside --out, on the OS running this script or on any other.

MAX_NAME_BYTES = 255  # ext4, APFS and NTFS (255 UTF-16 units, never more than the UTF-8 bytes)
_WINDOWS_FORBIDDEN = re.compile(r'[<>:"|?*]')  # ':' also opens an NTFS alternate data stream
_BIDI_CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")  # reorder what is shown
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_WINDOWS_DEVICES = re.compile(r"(con|prn|aux|nul|conin\$|conout\$|clock\$|com[0-9¹²³]|lpt[0-9¹²³])", re.I)
_TEMP_PREFIX = ".run_workflow-"


class UnsafeName(ValueError):
    """The server named an output file in a way that cannot be saved safely under --out."""


def _component(name: str, what: str) -> str:
    """One safe path component on POSIX and Windows alike, or UnsafeName.

    Refused: names that mean something else than a plain name (empty, '.', '..', only dots and
    spaces), control characters, invalid Unicode, more than 255 UTF-8 bytes. Made safe: characters
    Windows forbids and bidi controls become '_', trailing dots and spaces (which Windows drops)
    go, device names get '_' (CON.png -> CON_.png).
    """
    if _CONTROL.search(name):
        raise UnsafeName(f"{what} contains control characters")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafeName(f"{what} is not valid Unicode text") from None
    if not name:
        raise UnsafeName(f"{what} is empty")
    if not name.strip(" ."):
        raise UnsafeName(f"{what} is {name!r}, not a file name")
    name = _BIDI_CONTROLS.sub("_", _WINDOWS_FORBIDDEN.sub("_", name)).rstrip(" .")
    base = name.split(".", 1)[0]
    if _WINDOWS_DEVICES.fullmatch(base.rstrip(" ")):
        name = base + "_" + name[len(base):]
    size = len(name.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        raise UnsafeName(f"{what} is {size} bytes long in UTF-8; file systems allow {MAX_NAME_BYTES}")
    return name


def local_parts(subfolder, filename) -> tuple[str, ...]:
    """The path under --out for an output file the server calls `subfolder`/`filename`.

    Built from single sanitised components and checked to stay inside --out under both POSIX and
    Windows rules, whatever OS runs this. Raises UnsafeName (with the reason) for names that cannot
    be made safe: a subfolder that is absolute (``/x``, ``C:/x``, ``C:x``, ``\\x``,
    ``\\\\host\\share``) or goes up (``..``), a file name that is a path, and what
    `_component` refuses.
    """
    if subfolder is None:
        subfolder = ""
    if not isinstance(subfolder, str):
        raise UnsafeName(f"its subfolder is not text but {type(subfolder).__name__}")
    if not isinstance(filename, str):
        raise UnsafeName(f"its file name is not text but {type(filename).__name__}")
    if PurePosixPath(subfolder).anchor or PureWindowsPath(subfolder).anchor:
        raise UnsafeName("its subfolder is an absolute path (a root, a drive or a network share)")
    folders = [part for part in re.split(r"[/\\]", subfolder) if part not in ("", ".")]
    if ".." in folders:
        raise UnsafeName("its subfolder goes up with '..'")
    if "/" in filename or "\\" in filename:
        raise UnsafeName("its file name is a path, not a single name")
    parts = tuple(_component(part, "a subfolder name") for part in folders) + (_component(filename, "its file name"),)
    for flavour in (PurePosixPath, PureWindowsPath):
        joined = flavour("out").joinpath(*parts)
        if joined.parts != ("out", *parts) or ".." in parts:  # defence in depth: one component each
            raise UnsafeName("its name does not stay inside the output folder")
    return parts


def _shown(text) -> str:
    """A server-chosen name for a message: escaped (no control or bidi characters) and not too long."""
    shown = repr(text)
    return shown if len(shown) <= 90 else f"{shown[:60]}...{shown[-20:]} ({len(str(text))} characters)"


@dataclass
class Downloads:
    saved: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # a file kept under another name
    failed: list[str] = field(default_factory=list)  # one message per file not downloaded


def download_outputs(client: ComfyClient, result, out_dir: Path, previews: bool = False,
                     prompt: dict | None = None) -> Downloads:
    """Download every output file of `result` into `out_dir`; a bad file is reported, the others still come.

    A file is downloaded to a temporary name and renamed when complete. An existing file is never
    replaced: the same bytes are kept as they are, different bytes go to ``<stem>-2<suffix>`` (-3 ...).
    """
    prompt = prompt or {}
    done = Downloads()
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = result.outputs if isinstance(result.outputs, dict) else {}
    for node_id, node_outputs in outputs.items():
        if not isinstance(node_outputs, dict):
            continue
        for kind in ("images", "gifs", "videos", "audio"):
            infos = node_outputs.get(kind)
            for info in infos if isinstance(infos, list) else []:
                if not isinstance(info, dict) or "filename" not in info:
                    continue
                if info.get("type") == "temp" and not previews:
                    continue  # PreviewImage output: shown in the canvas, not a result
                try:
                    parts = local_parts(info.get("subfolder", ""), info["filename"])
                except UnsafeName as exc:
                    done.failed.append(_failure(prompt, str(node_id), info, f"{exc}, so the runner refuses it "
                                                "(the file stays on the server)"))
                    continue
                try:
                    path, note = _save_output(client, info, out_dir, parts)
                except (UnsafeName, OSError, http.client.HTTPException) as exc:
                    done.failed.append(_failure(prompt, str(node_id), info, _reason(exc)))
                    continue
                done.saved.append(path)
                if note:
                    done.notes.append(note)
    return done


def _failure(prompt: dict, node_id: str, info: dict, why: str) -> str:
    node = prompt.get(node_id)
    where = f"node {node_id} {title_of(prompt, node_id)!r} ({node['class_type']})" if node else f"node {node_id}"
    subfolder, filename = info.get("subfolder") or "", info.get("filename")
    name = f"{subfolder}/{filename}" if subfolder and isinstance(subfolder, str) and isinstance(filename, str) else filename
    return f"{where}: output file {_shown(name)} not downloaded: {why}"


def _reason(exc: Exception) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"the server answered HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"cannot reach the server: {exc.reason}"
    # An OSError's strerror, not str(exc): that carries the temporary file's full path.
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _save_output(client: ComfyClient, info: dict, out_dir: Path, parts: tuple[str, ...]) -> tuple[Path, str | None]:
    target = out_dir.joinpath(*parts)
    created = [d for d in (target.parent, *target.parent.parents) if d != out_dir and out_dir in d.parents
               and not d.exists()]
    # A folder in --out may be a link the user made; never follow one out of --out.
    real_out = os.path.realpath(out_dir)
    existing = next(d for d in (target.parent, *target.parent.parents) if d.exists())
    if os.path.commonpath([real_out, os.path.realpath(existing)]) != real_out:
        raise UnsafeName(f"the folder {_shown(existing.relative_to(out_dir).as_posix())} in --out is a link "
                         "that leads outside --out")
    temp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.parent / f"{_TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}.part"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with open(fd, "wb") as stream:
            client.download_to(info, stream)
            stream.flush()
            os.fsync(stream.fileno())
        placed, note = _place(temp, target)
        temp = None
        return placed, note
    except BaseException:
        if temp is not None:
            temp.unlink(missing_ok=True)
        for folder in created:  # deepest first; only folders made for this file, and only if still empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _place(temp: Path, target: Path) -> tuple[Path, str | None]:
    """Give the complete download `temp` its name without replacing anything already there."""
    candidate = target
    for number in range(2, 10_000):
        try:
            _link_new(temp, candidate)
            if candidate == target:
                return candidate, None
            return candidate, (f"{target} already exists with different content; "
                               f"this download was saved as {candidate.name}")
        except FileExistsError:
            if candidate.is_file() and filecmp.cmp(temp, candidate, shallow=False):
                temp.unlink()
                return candidate, None
        candidate = target.with_name(f"{target.stem}-{number}{target.suffix}")
        if len(candidate.name.encode("utf-8")) > MAX_NAME_BYTES:
            break
    raise FileExistsError(errno.EEXIST, f"{target.name} exists (with different content) and no free name is left "
                                        "next to it; choose another --out")


def _link_new(temp: Path, target: Path) -> None:
    """Rename `temp` to `target`, failing with FileExistsError if `target` exists (os.replace would replace it)."""
    if os.name == "nt":
        os.rename(temp, target)  # Windows refuses an existing target
        return
    try:
        os.link(temp, target)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links (some network and FAT mounts)
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "exists") from None
        os.replace(temp, target)
        return
    temp.unlink()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scripts/run_workflow.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", type=Path, help="UI-format or API-format workflow JSON")
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI URL (default %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="override an input; NODE is a node id, title or unique node type (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("workflow-output"), help="where output files go")
    parser.add_argument("--timeout", type=float, default=24 * 3600, help="seconds to wait for the run")
    parser.add_argument("--previews", action="store_true", help="also download PreviewImage (temp) images")
    parser.add_argument("--print-api", action="store_true",
                        help="print the API-format prompt (after --set) and exit without running it")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    client = ComfyClient(args.server)
    try:
        if args.out.exists() and not args.out.is_dir():
            raise UsageError(f"--out {args.out} is a file, not a folder")
        prompt = apply_overrides(load_prompt(args.workflow, args.server), args.overrides)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_api:
        print(json.dumps(prompt, indent=2))
        return 0
    try:
        result = client.run(prompt, timeout=args.timeout, on_event=ProgressPrinter(prompt),
                            on_queued=lambda pid: print(f"queued prompt {pid}", file=sys.stderr))
    except PromptRejected as exc:
        print("error: the server rejected the prompt:", file=sys.stderr)
        for node_id, info in (exc.payload.get("node_errors") or {}).items():
            for err in info.get("errors", []):
                where = f"node {node_id} {title_of(prompt, node_id)!r}" if node_id in prompt else f"node {node_id}"
                print(f"  {where} ({info.get('class_type')}): {err.get('message')}: {err.get('details')}",
                      file=sys.stderr)
        if not exc.payload.get("node_errors"):
            print(f"  {exc}", file=sys.stderr)
        return 1
    if result.status == "interrupted":
        print("interrupted", file=sys.stderr)
        return 130
    if result.status != "success":
        err = result.error or {}
        node_id = str(err.get("node_id"))
        title = title_of(prompt, node_id) if node_id in prompt else "?"
        print(f"error in node {node_id} {title!r} ({err.get('node_type')}): {err.get('exception_type')}: "
              f"{str(err.get('exception_message', '')).strip()}", file=sys.stderr)
        return 1
    try:
        done = download_outputs(client, result, args.out, args.previews, prompt)
    except OSError as exc:  # --out itself cannot be made
        print(f"error: cannot create --out {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 3
    for path in done.saved:
        print(path)
    for note in done.notes:
        print(f"note: {note}", file=sys.stderr)
    for message in done.failed:
        print(f"error: {message}", file=sys.stderr)
    if done.failed:
        total = len(done.failed) + len(done.saved)
        print(f"error: {len(done.failed)} of {total} output files not downloaded (see above); "
              f"the other {len(done.saved)} are in {args.out}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
