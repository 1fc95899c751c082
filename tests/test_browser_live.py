"""The live chart in a training node (web/live_chart.js), in headless Chromium on the real canvas:
a LoRA training queued from the UI, watched while it runs, through a page reload, to the end;
on the frontend ComfyUI pins (1.32.9) and on the newest one (classic canvas and Nodes 2.0)."""

from __future__ import annotations

import time

import pytest

from scripts.demo import draw_sample_subject
from scripts.frontend import NEWEST_FRONTEND_VERSION, VISIBLE_ALERTS_JS
from tests.conftest import (
    APP_READY_JS,
    CORE_CONSOLE_NOISE,
    NEWEST_CORE_CONSOLE_NOISE,
    install_checkpoint,
    open_canvas,
)
from tests.support.paths import tokenizer_dir
from trainers.eval.placeholder import write_random_fidelity_models
from trainers.training.callbacks import SampleRound
from trainers.training.watch import best_round

pytestmark = pytest.mark.browser

PINNED = "1.32.9"
SUBJECT = "live_chart_subject"
# The tiny model (what the chart shows does not depend on the model's size) trains 6-8 steps a
# second here with the page watching; a reloaded page was back by step 6-15: enough steps that
# the run is still going then.
STEPS = 50
SAMPLE_EVERY = 25
VALIDATE_EVERY = 25
# the default sample prompts: the subject's instance prompt, and the same on the beach
INSTANCE_PROMPT = "a photo of sks robot"
PROMPTS = [INSTANCE_PROMPT, f"{INSTANCE_PROMPT} on the beach"]

# (frontend, Nodes 2.0 on): the pinned one first, so the second server starts once its run is over
FRONTENDS = {
    PINNED: ("comfy_server", CORE_CONSOLE_NOISE),
    NEWEST_FRONTEND_VERSION: ("newest_frontend_server", NEWEST_CORE_CONSOLE_NOISE),
}

CHARTS_JS = "() => window.__dreamboothStudioLive ? window.__dreamboothStudioLive.charts() : null"
# The graph a user builds from the node menu: Load Subject Images -> LoRA Train, nothing else.
BUILD_JS = """(a) => {
    app.graph.clear();
    const subject = LiteGraph.createNode("LoadSubjectImages");
    const train = LiteGraph.createNode("LoRATrain");
    app.graph.add(subject);
    app.graph.add(train);
    subject.pos = [60, 120];
    train.pos = [subject.pos[0] + subject.size[0] + 80, 120];
    const set = (node, name, value) => {
        const widget = node.widgets.find(w => w.name === name);
        if (!widget) throw new Error(`${node.type} has no widget ${name}`);
        widget.value = value;
    };
    for (const [name, value] of Object.entries(a.subject)) set(subject, name, value);
    for (const [name, value] of Object.entries(a.train)) set(train, name, value);
    subject.connect(0, train, train.inputs.findIndex(i => i.name === "subject"));
    app.canvas.setDirty(true, true);
    return String(train.id);
}"""
# Scroll the canvas (classic or Nodes 2.0 alike) so the node's chart sits at (x, y) on screen.
SHOW_CHART_JS = """async ([x, y]) => {
    const frame = () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
    const ds = app.canvas.ds;
    ds.scale = 1;
    for (let i = 0; i < 4; i++) {
        app.canvas.setDirty(true, true);
        app.canvas.draw?.(true, true);
        await frame();
        const chart = document.querySelector(".dbs-live");
        if (!chart) return false;
        const box = chart.getBoundingClientRect();
        if (Math.abs(box.left - x) < 2 && Math.abs(box.top - y) < 2) return true;
        ds.offset[0] += (x - box.left) / ds.scale;
        ds.offset[1] += (y - box.top) / ds.scale;
    }
    return true;
}"""
# The sample images of the strip, with whether each is loaded and shown.
STRIP_JS = """() => [...document.querySelectorAll(".dbs-live-samples-images img")].map(img => ({
    src: img.getAttribute("src"), alt: img.alt, title: img.closest("figure").title,
    loaded: img.complete && img.naturalWidth > 0, width: img.getBoundingClientRect().width}))"""


@pytest.fixture(scope="module")
def servers(request, tiny_checkpoint):
    """The server of each frontend, started on first use (the newest one after the pinned run),
    with the tiny checkpoint to train."""
    started = {}

    def get(frontend: str):
        if frontend not in started:
            server = request.getfixturevalue(FRONTENDS[frontend][0])
            draw_sample_subject(server.input_dir / SUBJECT, count=3, size=96)
            install_checkpoint(server, tiny_checkpoint)
            started[frontend] = server
        return started[frontend]

    return get


def set_nodes_2(page, on: bool) -> None:
    page.evaluate("async (on) => { await app.extensionManager.setting.set('Comfy.VueNodes.Enabled', on); }", on)
    page.wait_for_timeout(300)


def chart_of(page, node_id: str) -> dict | None:
    charts = page.evaluate(CHARTS_JS) or []
    return next((c for c in charts if c["node"] == node_id), None)


def wait_for_chart(page, node_id: str, ready, what: str, timeout: float = 600.0) -> dict:
    """Poll the node's chart until `ready(chart)`; fail naming `what` and the chart's last state."""
    deadline = time.monotonic() + timeout
    chart = None
    while time.monotonic() < deadline:
        chart = chart_of(page, node_id)
        if chart is not None and ready(chart):
            return chart
        if page.console_errors:
            break
        page.wait_for_timeout(250)
    pytest.fail(f"{what}: chart {chart}, console errors {page.console_errors}")


def strip_shown(page) -> bool:
    images = page.evaluate(STRIP_JS)
    return bool(images) and all(i["loaded"] and i["width"] > 10 for i in images)


# A point of the page where the canvas itself is on top (no node, menu or minimap).
EMPTY_CANVAS_JS = """() => {
    for (let y = 300; y < 900; y += 40)
        for (let x = 1500; x > 200; x -= 40)
            if (document.elementFromPoint(x, y) === app.canvas.canvas) return [x, y];
    return null;
}"""


def move_mouse_away(page) -> list[int]:
    """Put the pointer over empty canvas (no widget tooltip in the pictures); returns where."""
    point = page.evaluate(EMPTY_CANVAS_JS)
    assert point, "no empty spot of canvas on the page"
    page.mouse.move(*point)
    return point


def queue_from_the_ui(page) -> None:
    """What a user does: click empty canvas, press Ctrl+Enter (the frontend's Queue Prompt)."""
    page.mouse.click(*move_mouse_away(page))  # also lets the frontend store the workflow it now holds
    page.keyboard.press("Control+Enter")


def screenshot(page, path) -> None:
    """The page with the node's chart at a fixed place on screen."""
    page.evaluate(SHOW_CHART_JS, [420, 150])
    move_mouse_away(page)
    page.wait_for_timeout(300)
    page.screenshot(path=str(path))


# Load Fidelity Models wired into the training node built by BUILD_JS.
ADD_SCORING_JS = """(a) => {
    const train = app.graph.getNodeById(Number(a.train));
    const scorer = LiteGraph.createNode("LoadFidelityModels");
    app.graph.add(scorer);
    scorer.pos = [60, train.pos[1] + 420];
    scorer.widgets.find(w => w.name === "dino_model").value = a.dino;
    scorer.widgets.find(w => w.name === "clip_model").value = a.clip;
    scorer.connect(0, train, train.inputs.findIndex(i => i.name === "fidelity_models"));
    app.canvas.setDirty(true, true);
}"""
@pytest.mark.parametrize("frontend,nodes_2", [(PINNED, False), (NEWEST_FRONTEND_VERSION, False),
                                              (NEWEST_FRONTEND_VERSION, True)],
                         ids=[f"{PINNED}-classic", f"{NEWEST_FRONTEND_VERSION}-classic",
                              f"{NEWEST_FRONTEND_VERSION}-nodes2"])
def test_chart_follows_a_training_queued_from_the_ui(browser, servers, tiny_checkpoint, artifacts_dir,
                                                       frontend, nodes_2):
    server = servers(frontend)
    tag = f"{frontend}-{'nodes2' if nodes_2 else 'classic'}"
    output_name = f"live_chart_{tag.replace('.', '_').replace('-', '_')}"
    # the run on the pinned frontend's classic canvas also scores its sample rounds
    scored = frontend == PINNED and not nodes_2
    if scored:  # before the page opens: its combos list the folders
        write_random_fidelity_models(server.base_dir / "models" / "subject_eval", tokenizer_dir())
    page = open_canvas(browser, server, FRONTENDS[frontend][1])
    try:
        set_nodes_2(page, nodes_2)
        node_id = page.evaluate(BUILD_JS, {
            "subject": {"folder": SUBJECT, "instance_prompt": INSTANCE_PROMPT, "class_prompt": "a photo of robot",
                        "resolution": 64, "crop_mode": "center"},
            "train": {"ckpt_name": tiny_checkpoint.name, "output_name": output_name, "steps": STEPS,
                      "rank": 4, "alpha": 4.0, "sample_every": SAMPLE_EVERY, "validate_every": VALIDATE_EVERY,
                      "sample_prompts": "", "sample_steps": 1, "sample_size": 0,
                      "save_every": SAMPLE_EVERY if scored else 0},
        })
        if scored:
            page.evaluate(ADD_SCORING_JS, {"train": node_id, "dino": "dino-random-tiny", "clip": "clip-random-tiny"})
        if nodes_2:  # the training node is a Vue node, and the chart is inside it
            page.wait_for_selector(f'[data-node-id="{node_id}"] .dbs-live', timeout=30_000)
        before = wait_for_chart(page, node_id, lambda c: True, "no chart in the new LoRA Train node", timeout=30)
        assert before["steps"] == [] and before["status"] is None, before
        queue_from_the_ui(page)
        wait_for_chart(page, node_id, lambda c: c["status"] is not None, "the queued run never started", timeout=180)

        # while it runs: the chart gains points, the strip shows the step-0 samples
        running = wait_for_chart(page, node_id, lambda c: len(c["steps"]) >= 2 and c["strip"] is not None,
                                 "the chart did not gain points while training")
        assert running["status"] == "running", running
        assert running["steps"] == list(range(1, len(running["steps"]) + 1)), running
        assert running["validation"][0] == 0, running  # validation before the first step
        assert running["strip"]["prompts"] == PROMPTS and running["strip"]["step"] in running["sampleSteps"], running
        assert running["sampleSteps"][0] == 0, running  # samples before the first step
        page.wait_for_function(f"() => ({STRIP_JS})().length === 2 && ({STRIP_JS})().every(i => i.loaded)",
                               timeout=30_000)
        assert [i["title"] for i in page.evaluate(STRIP_JS)] == PROMPTS
        assert f"/{STEPS}" in running["header"] and "s/step" in running["header"], running
        screenshot(page, artifacts_dir / f"live-chart-{tag}-midrun.png")

        # a reload during the run: the chart catches up with the steps it had before, and more
        page.reload(wait_until="domcontentloaded", timeout=120_000)
        page.wait_for_function(APP_READY_JS, timeout=120_000)
        seen = running["steps"]
        # (live events of the steps since may come first: the catch-up fills in what came before)
        caught_up = wait_for_chart(page, node_id, lambda c: c["steps"][: len(seen)] == seen,
                                   "the chart did not catch up after a reload")
        assert caught_up["status"] == "running", ("the run ended before the page was back: give it more steps",
                                                  caught_up)
        assert caught_up["steps"] == list(range(1, len(caught_up["steps"]) + 1)), caught_up  # no gap
        assert caught_up["validation"][0] == 0, caught_up

        # the end: every step, every validation point and sample round, the newest samples shown
        # (the header text is redrawn on the next animation frame after the status changes)
        final = wait_for_chart(page, node_id, lambda c: c["status"] in ("finished", "failed", "cancelled")
                               and c["header"].endswith(f"| {c['status']}"), "the run did not end")
        assert final["status"] == "finished", (final, server.log_tail())
        assert final["steps"] == list(range(1, STEPS + 1)), final
        assert final["total"] == STEPS, final
        assert final["validation"] == list(range(0, STEPS + 1, VALIDATE_EVERY)), final
        assert final["sampleSteps"] == list(range(0, STEPS + 1, SAMPLE_EVERY)), final
        assert final["strip"] == {"step": STEPS, "prompts": PROMPTS}, final
        assert final["header"].startswith(f"LoRA · step {STEPS}/{STEPS}") and final["header"].endswith("| finished")
        page.wait_for_function(f"() => ({STRIP_JS})().length === 2 && ({STRIP_JS})().every(i => i.loaded)",
                               timeout=30_000)
        assert all(f"step{STEPS:06d}-p" in i["src"] for i in page.evaluate(STRIP_JS))
        assert (server.models_dir / "loras" / f"{output_name}.safetensors").is_file()
        if scored:  # every round's scores on the chart, and the best step the rule gives
            assert [r["step"] for r in final["scored"]] == final["sampleSteps"], final
            rounds = [SampleRound(r["step"], [], [], scores={k: r[k] for k in ("dino", "clip_i", "clip_t")})
                      for r in final["scored"]]
            expected = best_round(rounds, eligible=lambda step: step % SAMPLE_EVERY == 0)  # save points, the end
            assert (final["best"] or {}).get("step") == (expected.step if expected else None), final
            if expected is not None:
                assert (server.models_dir / "loras" / final["best"]["file"]).is_file(), final
            caption = page.locator(".dbs-live-samples-caption").inner_text()
            assert "DINO" in caption and "CLIP-T" in caption, caption
        screenshot(page, artifacts_dir / f"live-chart-{tag}-final.png")
        page.locator(".dbs-live").screenshot(path=str(artifacts_dir / f"live-chart-{tag}-chart.png"))

        # a finished run stays: a new page of the same workflow shows all of it again
        if frontend == PINNED:  # and Nodes 2.0 on the pinned frontend too (it has them)
            set_nodes_2(page, True)
        page.reload(wait_until="domcontentloaded", timeout=120_000)
        page.wait_for_function(APP_READY_JS, timeout=120_000)
        again = wait_for_chart(page, node_id, lambda c: c["status"] == "finished" and len(c["steps"]) == STEPS,
                               "the finished run did not come back after a reload", timeout=60)
        assert again["validation"] == final["validation"] and again["sampleSteps"] == final["sampleSteps"], again
        if frontend == PINNED:
            page.wait_for_selector(f'[data-node-id="{node_id}"] .dbs-live', timeout=30_000)
            screenshot(page, artifacts_dir / f"live-chart-{PINNED}-nodes2-reloaded.png")
        assert page.console_errors == [], page.console_errors
        assert page.evaluate(VISIBLE_ALERTS_JS) == []
    finally:
        try:
            set_nodes_2(page, False)
        finally:
            page.context.close()


# Two training nodes on the page; events for one of them, for a node that does not exist, and
# for the first node after it is removed; then the palette switched to light and back.
LISTENERS_JS = """async () => {
    const api = window.comfyAPI.api.api;
    const live = window.__dreamboothStudioLive;
    const frame = () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
    const send = (node, type, extra) => api.dispatchCustomEvent(`dreambooth_studio.${type}`,
        {node: String(node), prompt_id: "p-1", ...extra});
    const step = (node, s) => send(node, "step", {step: s, total: 4, loss: 0.5 - s / 100, lr: 1e-4, elapsed: s,
        instance_loss: 0.5, prior_loss: null, validation: s === 1 ? [[0, 0.6], [1, 0.59]] : []});
    app.graph.clear();
    const lora = LiteGraph.createNode("LoRATrain"), dreambooth = LiteGraph.createNode("DreamBoothTrain");
    app.graph.add(lora);
    app.graph.add(dreambooth);
    const loraChart = lora.dreambooth_studio_chart;
    send(lora.id, "status", {status: "running", total: 4, method: "lora", output: "a.safetensors"});
    step(lora.id, 1);
    step("999999", 1);
    await frame();
    const both = live.charts();
    app.graph.remove(lora);
    await frame();
    const count = live.chartCount();
    step(lora.id, 2);
    send(lora.id, "samples", {step: 2, seconds: 1, images: [{filename: "x.png", subfolder: "", type: "output", prompt: "p"}]});
    send(lora.id, "status", {status: "finished", total: 4, method: "lora", output: "a.safetensors"});
    await new Promise(r => setTimeout(r, 300));  // a catch-up it asked for would have gone out by now
    await frame();
    const settings = app.extensionManager.setting, palette = settings.get("Comfy.ColorPalette");
    await settings.set("Comfy.ColorPalette", "dark");
    await frame();
    const canvas = dreambooth.dreambooth_studio_chart.canvas;
    const progress = dreambooth.dreambooth_studio_chart.progressText;
    const before = {picture: canvas.toDataURL(), color: getComputedStyle(progress).color, chart: live.charts()[0]};
    await settings.set("Comfy.ColorPalette", "light");
    await frame();
    const light = {picture: canvas.toDataURL(), color: getComputedStyle(progress).color, chart: live.charts()[0]};
    await settings.set("Comfy.ColorPalette", "dark");
    await frame();
    const afterTheme = live.charts()[0].theme;
    await settings.set("Comfy.ColorPalette", palette);
    const remaining = live.charts(), removed = loraChart.summary();
    // a training node inside a subgraph: the server names it "<subgraph node id>:<its id>"
    let subgraph = null;
    if (typeof app.graph.convertToSubgraph === "function") {
        app.graph.clear();
        const inner = LiteGraph.createNode("LoRATrain");
        app.graph.add(inner);
        const outer = app.graph.convertToSubgraph(new Set([inner])).node;
        const id = `${outer.id}:${inner.id}`;
        step(id, 1);
        await frame();
        subgraph = {id, charts: live.charts()};
    }
    return {subgraph, both, count, removed, remaining, listeners: live.pageListeners(),
            lightPictureDiffers: light.picture !== before.picture, colors: [before.color, light.color],
            themes: [before.chart.theme, light.chart.theme], afterTheme};
}"""


@pytest.mark.parametrize("frontend", [PINNED, NEWEST_FRONTEND_VERSION])
def test_chart_takes_only_its_nodes_events_lets_go_when_removed_and_follows_the_theme(browser, servers, frontend):
    page = open_canvas(browser, servers(frontend), FRONTENDS[frontend][1])
    try:
        result = page.evaluate(LISTENERS_JS)
        lora, dreambooth = result["both"]
        assert lora["steps"] == [1] and lora["validation"] == [0, 1] and lora["status"] == "running", lora
        assert dreambooth["steps"] == [] and dreambooth["status"] is None, dreambooth  # not its events
        # removed: no chart left for it, and the events that came after touched nothing
        assert result["count"] == 1
        assert result["remaining"] == [dreambooth | {"theme": result["afterTheme"]}]
        assert result["removed"]["steps"] == [1] and result["removed"]["status"] == "running", result["removed"]
        assert result["removed"]["sampleSteps"] == []
        # the page keeps one listener per event type, whatever number of charts
        assert sorted(result["listeners"]) == ["dreambooth_studio.samples", "dreambooth_studio.status",
                                               "dreambooth_studio.step", "reconnected"]
        # the light palette redraws the chart in its colours, and the dark one back
        assert result["themes"] == ["dark", "light"] and result["afterTheme"] == "dark", result
        assert result["lightPictureDiffers"] and result["colors"][0] != result["colors"][1], result
        # inside a subgraph the chart answers to the id the server uses for it
        subgraph = result["subgraph"]
        assert subgraph is not None, "this frontend has no subgraphs"
        taken = [c for c in subgraph["charts"] if c["steps"]]
        assert [(c["node"], c["steps"]) for c in taken] == [(subgraph["id"], [1])], subgraph
        assert page.console_errors == [], page.console_errors
    finally:
        page.context.close()
