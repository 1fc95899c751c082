"""A training node's run as the canvas sees it: websocket events while it trains, and a small
read-only route that replays the newest run of a node after a page reload.

Events (``PromptServer.instance.send_sync``, broadcast to every open page, each carrying the
node's unique id):

- ``dreambooth_studio.status``: running / finished / failed / cancelled / reused;
- ``dreambooth_studio.step``: one per optimizer step (losses, learning rate, elapsed seconds, and
  the validation points computed since the previous step event);
- ``dreambooth_studio.samples``: one per sample round (image references for ``/view``, and the
  round's DINO / CLIP-I / CLIP-T when the node scores its samples);
- ``dreambooth_studio.status`` at the end also names the best scored step and its file (``best``).

``GET /dreambooth_studio/runs/{node_id}`` returns the same data as one JSON document (the newest
run of that node id in this server process, with the steps of an earlier process it resumed),
which the web extension reads on page load; ``{"status": "none"}`` (no ``steps``) when the node
has not trained in this server session.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import folder_paths

from ..trainers.training.callbacks import LossHistory
from ..trainers.training.watch import load_sample_rounds
from .bridge import ComfyProgress, contained

log = logging.getLogger(__name__)

EVENT_PREFIX = "dreambooth_studio"
ROUTE = "/dreambooth_studio/runs/{node_id}"
# Runs kept for catch-up (one per node id, newest first), and points per run sent to a page.
MAX_RUNS = 32
MAX_POINTS = 2000
# Node ids: the canvas numbers its nodes ("12", "5:3" inside subgraphs); API prompts may name
# them ("train"). Anything else is refused before the lookup.
NODE_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")

_RUNS: OrderedDict[str, RunLog] = OrderedDict()
_LOCK = threading.Lock()


def _server() -> Any:
    try:
        from server import PromptServer
    except ImportError:  # imported outside a ComfyUI server (in-process tests)
        return None
    return getattr(PromptServer, "instance", None)


def _prompt_id() -> str | None:
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    context = get_executing_context()
    return context.prompt_id if context is not None else None


def _number(value: float | None) -> float | None:
    """JSON has no NaN or infinity: a non-finite value is sent as null."""
    return float(value) if value is not None and math.isfinite(value) else None


def image_ref(path: Path, prompt: str | None = None) -> dict[str, str] | None:
    """A ``/view`` reference to a file under output/, or None for a file elsewhere."""
    root = folder_paths.get_output_directory()
    if not contained(path, root):
        return None
    relative = Path(os.path.relpath(os.path.realpath(path), os.path.realpath(root)))
    subfolder = relative.parent.as_posix()
    ref = {"filename": relative.name, "subfolder": "" if subfolder == "." else subfolder, "type": "output"}
    if prompt is not None:
        ref["prompt"] = prompt
    return ref


class RunLog:
    """What one run of a training node has reported so far."""

    def __init__(self, node: str, prompt_id: str | None, method: str, total: int, output: str):
        self.node, self.prompt_id, self.method, self.total, self.output = node, prompt_id, method, total, output
        self.status = "running"
        self.best: dict[str, Any] | None = None  # {"step", "file"}: the best scored step, once the run ended
        self.steps: list[dict[str, Any]] = []
        self.validation: list[list[float]] = []
        self.samples: list[dict[str, Any]] = []

    def header(self) -> dict[str, Any]:
        return {"node": self.node, "prompt_id": self.prompt_id}

    def as_json(self) -> dict[str, Any]:
        steps = self.steps
        if len(steps) > MAX_POINTS:  # a long run: every k-th step, and always the newest
            stride = math.ceil(len(steps) / MAX_POINTS)
            steps = steps[::stride] + ([steps[-1]] if (len(steps) - 1) % stride else [])
        return {**self.header(), "status": self.status, "total": self.total, "method": self.method,
                "output": self.output, "steps": list(steps), "validation": list(self.validation),
                "samples": list(self.samples), "best": self.best}


def run_of(node_id: str) -> dict[str, Any] | None:
    with _LOCK:
        run = _RUNS.get(node_id)
        return run.as_json() if run is not None else None


def _remember(run: RunLog) -> None:
    with _LOCK:
        _RUNS.pop(run.node, None)
        _RUNS[run.node] = run
        while len(_RUNS) > MAX_RUNS:
            _RUNS.popitem(last=False)


class LiveProgress(ComfyProgress):
    """ComfyUI progress and cancel (ComfyProgress), plus the pack's own events for the live chart.
    Without a node id (a node run outside a server) it only records."""

    def __init__(self, total: int, node: str | None, method: str, output: str, preview=None,
                 sample_dir: Path | None = None, scorer=None):
        super().__init__(total, preview=preview)
        self.node = str(node) if node is not None else None
        self.sample_dir = sample_dir
        self.scorer = scorer  # round -> {"dino", "clip_i", "clip_t"} when the node scores its samples
        self.run = RunLog(self.node or "", _prompt_id(), method, total, output)
        self._new_validation: list[list[float]] = []
        if self.node is not None:
            _remember(self.run)
        self._send("status", self._status())

    # -- sending ------------------------------------------------------------------------------
    def _send(self, kind: str, payload: dict[str, Any]) -> None:
        server = _server()
        if server is None or self.node is None:
            return
        try:
            server.send_sync(f"{EVENT_PREFIX}.{kind}", {**self.run.header(), **payload})
        except Exception:  # a page that cannot be told must never stop training
            log.debug("could not send %s event", kind, exc_info=True)

    def _status(self) -> dict[str, Any]:
        return {"status": self.run.status, "total": self.run.total, "method": self.run.method,
                "output": self.run.output, "best": self.run.best}

    def finish(self, status: str, history: LossHistory | None = None, samples: list | None = None,
               best: dict[str, Any] | None = None) -> None:
        """The run ended (``status``); a reused file fills the chart from its recorded history.
        ``best`` ({"step", "file"}) is the best scored step of a run that scored its samples."""
        self.run.best = best
        if history is not None and not self.run.steps:
            self.run.steps = [{"step": i + 1, "loss": _number(loss)} for i, loss in enumerate(history.losses)]
            self.run.validation = [[int(s), _number(v)] for s, v in history.validation]
            self.run.total = max(self.run.total, len(history.losses))
        if samples is not None and not self.run.samples:
            self.run.samples = [self._samples_payload(r) for r in samples]
        self.run.status = status
        self._send("status", self._status())

    # -- trainer callbacks --------------------------------------------------------------------
    def on_resume(self, step: int, history: LossHistory) -> None:
        """A resumed run: the chart starts with the steps (and sample rounds) trained before."""
        self.history = history.copy()
        self.run.steps = [{"step": i + 1, "loss": _number(loss)} for i, loss in enumerate(history.losses)]
        self.run.validation = [[int(s), _number(v)] for s, v in history.validation]
        if self.sample_dir is not None:
            try:
                rounds = load_sample_rounds(self.sample_dir)
            except (OSError, ValueError):
                rounds = []
            self.run.samples = [self._samples_payload(r) for r in rounds if r.step <= step]
        self._send("status", self._status())

    def on_validation(self, step: int, loss: float) -> None:
        point = [int(step), _number(loss)]
        self.history.validation.append((int(step), float(loss)))  # for the live loss-curve preview
        self.run.validation.append(point)
        self._new_validation.append(point)

    def on_sample_step(self, done: int, total: int) -> None:
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()

    def score_samples(self, round):
        return self.scorer(round) if self.scorer is not None else None

    def on_samples(self, round) -> None:
        payload = self._samples_payload(round)
        self.run.samples.append(payload)
        self._send("samples", payload)

    def on_step_end(self, state) -> None:
        entry = {"step": state.step, "loss": _number(state.loss), "lr": _number(state.lr),
                 "elapsed": _number(state.elapsed), "instance_loss": _number(state.instance_loss),
                 "prior_loss": _number(state.prior_loss)}
        self.run.steps.append(entry)
        self.run.total = state.total_steps
        self._send("step", {**entry, "total": state.total_steps, "validation": self._new_validation})
        self._new_validation = []
        super().on_step_end(state)

    @staticmethod
    def _samples_payload(round) -> dict[str, Any]:
        images = []
        for index, path in enumerate(round.paths):
            prompt = round.prompts[index] if index < len(round.prompts) else None
            ref = image_ref(Path(path), prompt)
            if ref is not None:
                images.append(ref)
        payload = {"step": round.step, "seconds": _number(round.seconds), "images": images}
        if round.scores is not None:
            payload["scores"] = {key: _number(value) for key, value in round.scores.items()}
        return payload


def register_routes() -> None:
    """Add the catch-up route to ComfyUI's server (once; ComfyUI adds an /api/ twin itself)."""
    server = _server()
    if server is None or getattr(register_routes, "done", False):
        return
    from aiohttp import web

    @server.routes.get(ROUTE)
    async def newest_run(request: web.Request) -> web.Response:
        node_id = request.match_info.get("node_id", "")
        if not NODE_ID.match(node_id):
            return web.json_response({"error": "a node id is letters, digits, '_', '.', ':' or '-' (e.g. 12 or 5:3)"},
                                     status=400)
        run = run_of(node_id)
        if run is None:  # not an error: every page asks this for each training node it loads
            return web.json_response({"node": node_id, "status": "none",
                                      "message": f"no training run of node {node_id} in this server session"})
        return web.json_response(run)

    register_routes.done = True
