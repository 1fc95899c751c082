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
- Exit codes: 0 done; 1 a node failed (its id, title, type and message are printed) or the
  server rejected the prompt (every node error is printed); 2 bad arguments or workflow file;
  130 the run was interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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


def download_outputs(client: ComfyClient, result, out_dir: Path, previews: bool = False) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for node_outputs in result.outputs.values():
        for kind in ("images", "gifs", "videos", "audio"):
            for info in node_outputs.get(kind, []):
                if not isinstance(info, dict) or "filename" not in info:
                    continue
                if info.get("type") == "temp" and not previews:
                    continue  # PreviewImage output: shown in the canvas, not a result
                # Keep SaveImage's subfolder, but never let a name from the server leave out_dir.
                parts = [p for p in Path(str(info.get("subfolder", ""))).parts if p not in ("..", ".", "/")]
                target = out_dir.joinpath(*parts, Path(info["filename"]).name)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(client.download(info))
                saved.append(target)
    return saved


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
    for path in download_outputs(client, result, args.out, args.previews):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
