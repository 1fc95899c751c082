"""The headless runner never writes outside --out, whatever names the server gives its output files.

A fake ComfyUI (websocket, /prompt, /history, /view in a thread) answers with hostile and unlucky
names; the runner's main() is called as the command line would. No ComfyUI is imported.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest
from aiohttp import web

from scripts import run_workflow
from scripts.run_workflow import UnsafeName, local_parts

pytestmark = pytest.mark.trainers

NODE, TITLE = "9", "Save grid"
PROMPT = {NODE: {"class_type": "SaveImage", "inputs": {"filename_prefix": "grid", "images": ["8", 0]},
                 "_meta": {"title": TITLE}},
          "8": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}}
GOOD = [{"filename": "grid_00001_.png", "subfolder": "", "type": "output"},
        {"filename": "grid_00002_.png", "subfolder": "sweeps/run1", "type": "output"}]


def content(info: dict) -> bytes:
    """What the fake server sends for a file: distinct bytes per name, big enough to need several reads."""
    return (f"{info.get('subfolder')}|{info['filename']}|".encode("utf-8", "surrogatepass") * 4000)[:70_000]


class FakeComfy:
    """Just enough of ComfyUI's API for the runner: one prompt that succeeds with `outputs`."""

    def __init__(self):
        self.outputs: dict = {}
        self.broken: dict[str, str] = {}  # filename -> "cut" (connection closed mid-body) or "404"
        self.queued = 0
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_get("/ws", self.ws)
        app.router.add_post("/prompt", self.prompt)
        app.router.add_get("/history/{prompt_id}", self.history)
        app.router.add_get("/view", self.view)
        self.runner = web.AppRunner(app)
        # The loop runs in its own thread from the start: the test process's main thread may
        # already run another loop (playwright's sync API does, in the browser tests).
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.runner.setup(), self.loop).result(timeout=30)
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        asyncio.run_coroutine_threadsafe(site.start(), self.loop).result(timeout=30)
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)

    async def ws(self, request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets[request.query["clientId"]] = ws
        async for _ in ws:
            pass
        return ws

    async def prompt(self, request):
        body = await request.json()
        self.queued += 1
        ws = self.sockets[body["client_id"]]
        await ws.send_json({"type": "executing", "data": {"node": NODE, "prompt_id": "p1"}})
        await ws.send_json({"type": "execution_success", "data": {"prompt_id": "p1"}})
        return web.json_response({"prompt_id": "p1", "number": 1, "node_errors": {}})

    async def history(self, request):
        return web.json_response({"p1": {"outputs": {NODE: {"images": self.outputs}}}})

    async def view(self, request):
        info = {"filename": request.query["filename"], "subfolder": request.query.get("subfolder", "")}
        how = self.broken.get(info["filename"])
        if how == "404":
            return web.Response(status=404)
        body = content(info)
        if how == "cut":
            response = web.StreamResponse(headers={"Content-Length": str(len(body))})
            await response.prepare(request)
            await response.write(body[: len(body) // 2])
            request.transport.close()
            return response
        return web.Response(body=body, content_type="image/png")


@pytest.fixture(scope="module")
def fake_comfy():
    server = FakeComfy()
    yield server
    server.close()


@pytest.fixture
def run(fake_comfy, tmp_path, capsys):
    """Run the runner's main() on a SaveImage prompt whose outputs are `outputs`; -> (code, out, err)."""
    workflow = tmp_path / "workflow.json"
    workflow.write_text(json.dumps(PROMPT))
    out = tmp_path / "parent" / "out"

    def go(outputs, broken=None):
        fake_comfy.outputs, fake_comfy.broken = outputs, broken or {}
        capsys.readouterr()
        code = run_workflow.main([str(workflow), "--server", fake_comfy.url, "--out", str(out)])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    go.out = out
    return go


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_good_files_whole(out: Path, extra: dict[str, bytes] | None = None):
    """Exactly the good files (and `extra`) are in --out, byte for byte: nothing partial, nothing else."""
    expected = {"grid_00001_.png": content(GOOD[0]), "sweeps/run1/grid_00002_.png": content(GOOD[1])}
    expected.update(extra or {})
    assert files_under(out) == expected
    dirs = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_dir()}
    assert dirs == {str(d) for k in expected for d in PurePosixPath(k).parents if str(d) != "."}


# -- end to end: the runner against a server that names files badly ----------------------------------

HOSTILE = {
    "windows drive": ({"subfolder": "C:/Users/Public", "filename": "x.png"}, "absolute path"),
    "drive-relative": ({"subfolder": "D:evil", "filename": "x.png"}, "absolute path"),
    "UNC share": ({"subfolder": "\\\\host\\share", "filename": "x.png"}, "absolute path"),
    "rooted backslash": ({"subfolder": "\\Windows\\Temp", "filename": "x.png"}, "absolute path"),
    "posix root": ({"subfolder": "/tmp", "filename": "x.png"}, "absolute path"),
    "up in subfolder": ({"subfolder": "a/../../..", "filename": "x.png"}, "goes up"),
    "up with backslash": ({"subfolder": "a\\..\\..", "filename": "x.png"}, "goes up"),
    "dot-dot file": ({"subfolder": "", "filename": ".."}, "not a file name"),
    "dot file": ({"subfolder": "", "filename": "."}, "not a file name"),
    "empty file": ({"subfolder": "", "filename": ""}, "empty"),
    "NUL": ({"subfolder": "", "filename": "a\x00b.png"}, "control characters"),
    "newline": ({"subfolder": "sub\nfolder", "filename": "x.png"}, "control characters"),
    "over-long": ({"subfolder": "", "filename": "x" * 300 + ".png"}, "304 bytes long"),
    "over-long CJK": ({"subfolder": "", "filename": "猫" * 90 + ".png"}, "274 bytes long"),
    "path as file name": ({"subfolder": "", "filename": "../../x.png"}, "is a path"),
    "lone surrogate": ({"subfolder": "", "filename": "\ud800.png"}, "not valid Unicode"),
    "not text": ({"subfolder": "", "filename": 42}, "not text"),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_a_hostile_name_is_refused_with_exit_3_and_the_good_files_are_downloaded(run, case):
    bad, reason = HOSTILE[case]
    code, out, err = run([GOOD[0], {**bad, "type": "output"}, GOOD[1]])
    assert code == 3, err
    assert "Traceback" not in err
    refusals = [line for line in err.splitlines() if line.startswith("error: node")]
    assert len(refusals) == 1, err
    assert refusals[0].startswith(f"error: node {NODE} '{TITLE}' (SaveImage): output file ")
    assert "not downloaded" in refusals[0] and reason in refusals[0], refusals[0]
    assert refusals[0].endswith(", so the runner refuses it (the file stays on the server)")
    assert "\x00" not in err and "\n" not in refusals[0]  # the name is escaped, not printed raw
    assert "error: 1 of 3 output files not downloaded" in err
    assert_good_files_whole(run.out)
    assert sorted(Path(p) for p in out.split()) == sorted([run.out / "grid_00001_.png",
                                                         run.out / "sweeps/run1/grid_00002_.png"])
    # nothing anywhere next to --out (the parent folder holds --out only)
    assert [p.name for p in run.out.parent.iterdir()] == ["out"]
    assert sorted(p.name for p in run.out.parent.parent.iterdir()) == ["parent", "workflow.json"]


def test_names_windows_cannot_hold_are_made_safe_on_every_os(run):
    unlucky = [{"filename": "CON.png", "subfolder": "aux"}, {"filename": "a:b.png", "subfolder": ""},
               {"filename": "x.png:stream", "subfolder": ""}, {"filename": "trail.png. ", "subfolder": "d. "},
               {"filename": 'q<u>o"t|e?*.png', "subfolder": "C_/x:y"},
               {"filename": "gnp\u202e.exe", "subfolder": ""}]
    code, out, err = run(GOOD + [{**u, "type": "output"} for u in unlucky])
    assert code == 0, err
    assert_good_files_whole(run.out, {
        "aux_/CON_.png": content(unlucky[0]), "a_b.png": content(unlucky[1]),
        "x.png_stream": content(unlucky[2]), "d/trail.png": content(unlucky[3]),
        "C_/x_y/q_u_o_t_e__.png": content(unlucky[4]), "gnp_.exe": content(unlucky[5])})
    assert len(out.split()) == 8


def test_a_download_that_fails_leaves_nothing_partial(run):
    cut = {"filename": "cut_00001_.png", "subfolder": "cutdir/deep", "type": "output"}
    missing = {"filename": "gone_00001_.png", "subfolder": "", "type": "output"}
    code, out, err = run([GOOD[0], cut, missing, GOOD[1]], broken={cut["filename"]: "cut", missing["filename"]: "404"})
    assert code == 3, err
    assert "Traceback" not in err
    assert f"error: node {NODE} '{TITLE}' (SaveImage): output file 'cutdir/deep/cut_00001_.png' not downloaded: " \
           f"the download ended after" in err
    assert "output file 'gone_00001_.png' not downloaded: the server answered HTTP 404" in err
    assert "error: 2 of 4 output files not downloaded" in err
    assert_good_files_whole(run.out)  # no temporary file, no half file, no empty cutdir/


def test_an_existing_file_is_never_replaced_by_a_different_one(run):
    run.out.mkdir(parents=True)
    (run.out / "grid_00001_.png").write_bytes(b"an earlier run")
    (run.out / "sweeps" / "run1").mkdir(parents=True)
    (run.out / "sweeps" / "run1" / "grid_00002_.png").write_bytes(content(GOOD[1]))  # the same bytes
    code, out, err = run(GOOD)
    assert code == 0, err
    assert files_under(run.out) == {"grid_00001_.png": b"an earlier run", "grid_00001_-2.png": content(GOOD[0]),
                                    "sweeps/run1/grid_00002_.png": content(GOOD[1])}
    assert out.split() == [str(run.out / "grid_00001_-2.png"), str(run.out / "sweeps/run1/grid_00002_.png")]
    assert "grid_00001_.png already exists with different content; this download was saved as " \
           "grid_00001_-2.png" in err
    # Run again, with a name that differs only in case (one file on Windows and macOS): nothing is lost.
    code, out, err = run([GOOD[0], {**GOOD[0], "filename": "GRID_00001_.png"}])
    assert code == 0, err
    kept = files_under(run.out)
    assert len(kept) == len(set(kept.values())) == 4 and b"an earlier run" in kept.values()


@pytest.mark.skipif(os.name != "posix", reason="creating symlinks needs privileges on Windows")
def test_a_link_in_out_is_not_followed_out_of_it(run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run.out.mkdir(parents=True)
    (run.out / "sweeps").symlink_to(elsewhere, target_is_directory=True)
    code, out, err = run(GOOD)
    assert code == 3, err
    assert "output file 'sweeps/run1/grid_00002_.png' not downloaded: the folder 'sweeps' in --out is a link " \
           "that leads outside --out" in err
    assert list(elsewhere.iterdir()) == []
    assert (run.out / "grid_00001_.png").read_bytes() == content(GOOD[0])


def test_an_out_that_is_a_file_is_refused_before_anything_runs(run, fake_comfy):
    run.out.parent.mkdir(parents=True)
    run.out.write_bytes(b"not a folder")
    queued = fake_comfy.queued
    code, out, err = run(GOOD)
    assert code == 2 and "is a file, not a folder" in err, err
    assert fake_comfy.queued == queued  # nothing was queued on the server
    assert run.out.read_bytes() == b"not a folder"


# -- the path function, under both rules whatever OS runs the tests -----------------------------------

@pytest.mark.parametrize("subfolder, filename, parts", [
    ("", "ComfyUI_00001_.png", ("ComfyUI_00001_.png",)),
    (None, "ComfyUI_00001_.png", ("ComfyUI_00001_.png",)),
    ("sweeps/run1", "x_00003_.png", ("sweeps", "run1", "x_00003_.png")),
    ("sweeps\\run1", "x.png", ("sweeps", "run1", "x.png")),  # a Windows server's separator
    ("./a//b/", "x.png", ("a", "b", "x.png")),
    ("", "猫の写真 00001.webp", ("猫の写真 00001.webp",)),
    ("", ".hidden.png", (".hidden.png",)),
    ("", "x" * 251 + ".png", ("x" * 251 + ".png",)),  # 255 bytes: the limit itself is fine
    ("", "CON.png", ("CON_.png",)),
    ("", "nul", ("nul_",)),
    ("", "Com1.tar.gz", ("Com1_.tar.gz",)),
    ("", "LPT¹.png", ("LPT¹_.png",)),
    ("", "CONIN$", ("CONIN$_",)),
    ("conout$", "x.png", ("conout$_", "x.png")),
    ("", "CONSOLE.png", ("CONSOLE.png",)),  # not a device name
    ("", "a:b.png", ("a_b.png",)),
    ("", "x.png:Zone.Identifier:$DATA", ("x.png_Zone.Identifier_$DATA",)),
    ("a/C:/b", "x.png", ("a", "C_", "b", "x.png")),
    ("", "x.png. . ", ("x.png",)),
    ("dir. ", "x.png", ("dir", "x.png")),
    ("", "a\u202egnp.exe", ("a_gnp.exe",)),
])
def test_local_parts_keeps_normal_names_and_makes_the_others_safe(subfolder, filename, parts):
    assert local_parts(subfolder, filename) == parts


REFUSED = [
    ("C:/Windows", "x.png"), ("C:\\Windows", "x.png"), ("C:", "x.png"), ("c:evil", "x.png"),
    ("\\\\host\\share\\dir", "x.png"), ("//host/share", "x.png"), ("\\\\?\\C:\\x", "x.png"),
    ("\\\\.\\pipe\\x", "x.png"), ("\\x", "x.png"), ("/etc", "x.png"), ("..", "x.png"), ("a/../..", "x.png"),
    ("a\\..", "x.png"), ("...", "x.png"), (". .", "x.png"), ("a/ /b", "x.png"),
    ("", ".."), ("", "."), ("", ""), ("", "..."), ("", " "), ("", "a/b.png"), ("", "a\\b.png"),
    ("", "\\\\host\\share\\x.png"), ("", "C:\\x.png"), ("", "/etc/passwd"),
    ("", "a\x00b"), ("", "a\tb"), ("", "a\x7fb"), ("", "a\x85b"), ("sub\x1b[31m", "x.png"),
    ("", "x" * 252 + ".png"), ("", "é" * 128), ("d" * 256, "x.png"), ("", "\udcff.png"),
    (3, "x.png"), ("", None), ("", ["x.png"]),
]


@pytest.mark.parametrize("subfolder, filename", REFUSED)
def test_local_parts_refuses_names_that_cannot_be_made_safe(subfolder, filename):
    with pytest.raises(UnsafeName):
        local_parts(subfolder, filename)


@pytest.mark.parametrize("flavour", [PurePosixPath, PureWindowsPath])
def test_every_accepted_name_stays_inside_out_under_both_rules(flavour):
    pieces = ["", ".", "..", "...", "a", "C:", "c:x", "\\", "/", "\\\\h\\s", "CON", "x. ", " ", ":", "$DATA",
              "\u202e", "aux.png", "~", "a..b"]
    accepted = 0
    for sub_a in pieces:
        for sub_b in pieces:
            for sep in ("/", "\\"):
                for filename in pieces:
                    try:
                        parts = local_parts(sub_a + sep + sub_b, filename)
                    except UnsafeName:
                        continue
                    accepted += 1
                    joined = flavour("out").joinpath(*parts)
                    assert joined.parts == ("out", *parts), (sub_a, sep, sub_b, filename)
                    assert not joined.is_absolute() and not joined.drive and ".." not in joined.parts
                    for part in parts:
                        assert part.strip(" .") and part == part.rstrip(" .")
                        assert not any(c in part for c in '<>:"|?*\\/\u202e')
                        assert not run_workflow._WINDOWS_DEVICES.fullmatch(part.split(".")[0])
    assert accepted > 500
