"""A small client for ComfyUI's HTTP + websocket API (stdlib + websocket-client).

Queues an API-format prompt, follows the websocket until that prompt finishes, and returns its
outputs, progress events and error. Used by the demo, the headless runner and the tests.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)


class IncompleteDownload(ConnectionError):
    """The server's answer for an output file ended early (an OSError, like the other network errors)."""

    def __init__(self, received: int, expected: str | None):
        super().__init__(f"the download ended after {received} of {expected} bytes")


class PromptRejected(RuntimeError):
    """ComfyUI refused the prompt at validation (HTTP 400): nothing ran."""

    def __init__(self, payload: dict):
        self.payload = payload
        error = payload.get("error") or {}
        parts = [str(error.get("message", "prompt rejected")), str(error.get("details", ""))]
        for node_id, info in (payload.get("node_errors") or {}).items():
            for err in info.get("errors", []):
                parts.append(f"node {node_id} ({info.get('class_type')}): {err.get('message')}: {err.get('details')}")
        super().__init__("; ".join(p for p in parts if p))

    @property
    def node_ids(self) -> set[str]:
        """The nodes ComfyUI blamed."""
        return set(self.payload.get("node_errors") or {})

    def details(self, node_id: str) -> list[str]:
        """The error details ComfyUI reported for one node (e.g. "output_name - <our message>")."""
        info = (self.payload.get("node_errors") or {}).get(node_id) or {}
        return [str(err.get("details", "")) for err in info.get("errors", [])]


@dataclass
class RunResult:
    prompt_id: str
    status: str  # "success" | "error" | "interrupted"
    outputs: dict = field(default_factory=dict)
    events: list = field(default_factory=list)
    error: dict | None = None

    @property
    def progress(self) -> list[dict]:
        return [e["data"] for e in self.events if e.get("type") == "progress"]

    def progress_for(self, node_id: str) -> list[dict]:
        return [p for p in self.progress if str(p.get("node")) == str(node_id)]

    def files(self, node_id: str | None = None, kind: str = "images") -> list[dict]:
        found = []
        for nid, out in self.outputs.items():
            if node_id is None or str(nid) == str(node_id):
                found.extend(out.get(kind, []))
        return found

    def raise_for_status(self) -> RunResult:
        if self.status != "success":
            err = self.error or {}
            raise RuntimeError(
                f"prompt {self.prompt_id} ended with {self.status}: node {err.get('node_id')} "
                f"({err.get('node_type')}): {err.get('exception_message', '').strip()}"
            )
        return self


class ComfyClient:
    def __init__(self, base_url: str, client_id: str | None = None, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self.timeout = timeout

    # -- plain HTTP ---------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        req = urllib.request.Request(self.base_url + path, data=body, method=method, headers=headers or {})
        return urllib.request.urlopen(req, timeout=self.timeout)

    def get_json(self, path: str):
        with self._request("GET", path) as resp:
            return json.loads(resp.read())

    def post_json(self, path: str, payload: dict):
        body = json.dumps(payload).encode()
        with self._request("POST", path, body, {"Content-Type": "application/json"}) as resp:
            data = resp.read()
            return json.loads(data) if data else None

    def object_info(self) -> dict:
        return self.get_json("/object_info")

    def interrupt(self) -> None:
        self.post_json("/interrupt", {})

    def queue(self, prompt: dict, extra_data: dict | None = None) -> str:
        payload = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            payload["extra_data"] = extra_data
        try:
            answer = self.post_json("/prompt", payload)
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                raise PromptRejected(json.loads(body)) from None
            except json.JSONDecodeError:
                raise RuntimeError(f"POST /prompt failed: HTTP {exc.code}: {body[:500]!r}") from None
        if answer.get("node_errors"):
            # ComfyUI queues a prompt when at least one output is valid and silently drops the
            # invalid ones; a half-run experiment is worse than a clear refusal.
            self.cancel(answer["prompt_id"])
            raise PromptRejected(answer)
        return answer["prompt_id"]

    def cancel(self, prompt_id: str) -> None:
        """Remove a queued prompt, or interrupt it if it is the one running."""
        self.post_json("/queue", {"delete": [prompt_id]})
        running = self.get_json("/queue").get("queue_running", [])
        if any(len(item) > 1 and item[1] == prompt_id for item in running):
            self.interrupt()

    def history(self, prompt_id: str) -> dict:
        return self.get_json(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id, {})

    def download(self, file_info: dict) -> bytes:
        buffer = io.BytesIO()
        self.download_to(file_info, buffer)
        return buffer.getvalue()

    def download_to(self, file_info: dict, stream: BinaryIO, chunk_size: int = 1 << 20) -> int:
        """Copy one output file from ``/view`` into `stream` piece by piece; returns its size.

        Raises IncompleteDownload when the answer ends before its Content-Length (http.client's
        read(n) just returns less then), so a cut connection never passes for a whole file.
        """
        query = urllib.parse.urlencode(
            {"filename": file_info["filename"], "subfolder": file_info.get("subfolder", ""),
             "type": file_info.get("type", "output")}
        )
        size = 0
        with self._request("GET", f"/view?{query}") as resp:
            expected = resp.headers.get("Content-Length")
            try:
                while chunk := resp.read(chunk_size):
                    stream.write(chunk)
                    size += len(chunk)
            except http.client.IncompleteRead as exc:
                raise IncompleteDownload(size + len(exc.partial), expected) from None
        if expected is not None and expected.strip().isdigit() and size != int(expected):
            raise IncompleteDownload(size, expected)
        return size

    def upload_image(self, path: Path, subfolder: str = "", overwrite: bool = True) -> dict:
        boundary = uuid.uuid4().hex
        parts = []
        for name, value in (("subfolder", subfolder), ("overwrite", "true" if overwrite else "false"),
                            ("type", "input")):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{Path(path).name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode() + Path(path).read_bytes() + b"\r\n"
        )
        parts.append(f"--{boundary}--\r\n".encode())
        with self._request("POST", "/upload/image", b"".join(parts),
                           {"Content-Type": f"multipart/form-data; boundary={boundary}"}) as resp:
            return json.loads(resp.read())

    # -- websocket ----------------------------------------------------------------------------
    def run(self, prompt: dict, timeout: float = 900.0,
            on_event: Callable[[dict], None] | None = None,
            on_queued: Callable[[str], None] | None = None) -> RunResult:
        """Queue `prompt` and follow it over the websocket until it ends (or `timeout` passes)."""
        import websocket  # websocket-client

        ws_url = self.base_url.replace("http://", "ws://").replace("https://", "wss://")
        ws = websocket.create_connection(f"{ws_url}/ws?clientId={self.client_id}", timeout=timeout)
        try:
            prompt_id = self.queue(prompt)
            if on_queued:
                on_queued(prompt_id)
            result = RunResult(prompt_id=prompt_id, status="running")
            deadline = time.monotonic() + timeout
            while True:
                ws.settimeout(max(1.0, deadline - time.monotonic()))
                try:
                    raw = ws.recv()
                except websocket.WebSocketTimeoutException:
                    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f}s") from None
                if not isinstance(raw, str):  # binary frames are latent previews
                    continue
                event = json.loads(raw)
                data = event.get("data") or {}
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                if event.get("type") in ("status", "crystools.monitor"):
                    continue
                result.events.append(event)
                if on_event:
                    on_event(event)
                kind = event.get("type")
                if kind == "execution_error":
                    result.status, result.error = "error", data
                    break
                if kind == "execution_interrupted":
                    result.status, result.error = "interrupted", data
                    break
                if kind == "execution_success" or (kind == "executing" and data.get("node") is None
                                                   and data.get("prompt_id") == prompt_id):
                    result.status = "success"
                    break
        finally:
            ws.close()
        result.outputs = self._outputs(prompt_id)
        return result

    def _outputs(self, prompt_id: str) -> dict:
        # History is written right after the last websocket message; give it a moment.
        for _ in range(50):
            entry = self.history(prompt_id)
            if entry:
                return entry.get("outputs", {})
            time.sleep(0.1)
        return {}
