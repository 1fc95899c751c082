"""The ComfyUI canvas in headless Chromium with the pack installed."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.browser

MISSING_TYPES_JS = """() => window.app.graph._nodes
    .filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type)"""


def test_canvas_opens_and_default_workflow_has_no_missing_nodes(canvas_page, artifacts_dir):
    page = canvas_page
    assert page.evaluate("() => typeof window.app.graphToPrompt") == "function"
    page.evaluate("async () => { await window.app.loadGraphData(); }")
    types = page.evaluate("() => window.app.graph._nodes.map(n => n.type)")
    assert {"CheckpointLoaderSimple", "KSampler", "SaveImage"} <= set(types)
    assert page.evaluate(MISSING_TYPES_JS) == []
    page.wait_for_timeout(500)
    page.screenshot(path=str(artifacts_dir / "canvas-default-workflow.png"))
    assert not [e for e in page.console_errors if "missing" in e.lower() and "node" in e.lower()]


PACK_NODES = ["LoadSubjectImages", "LoRATrain", "DreamBoothTrain", "ApplyLoRAScaled", "CannyControl", "LoRAScaleGrid"]


def test_pack_nodes_appear_in_the_canvas_with_tooltips(canvas_page, artifacts_dir):
    page = canvas_page
    page.evaluate("() => window.app.graph.clear()")
    info = page.evaluate("""(types) => types.map((type, i) => {
        const node = LiteGraph.createNode(type);
        node.pos = [40 + 380 * i, 160];
        window.app.graph.add(node);
        const def = LiteGraph.registered_node_types[type].nodeData;
        const inputs = Object.assign({}, def.input.required || {}, def.input.optional || {});
        return {type, category: def.category, description: def.description,
                widgets: (node.widgets || []).map(w => w.name),
                untipped: Object.entries(inputs).filter(([k, v]) => !(v[1] && v[1].tooltip)).map(([k]) => k),
                outputTips: def.output_tooltips,
                tooltips: Object.fromEntries(Object.entries(inputs).map(([k, v]) => [k, (v[1] || {}).tooltip]))};
    })""", PACK_NODES)
    page.evaluate("() => window.app.canvas.setDirty(true, true)")
    page.wait_for_timeout(500)
    page.screenshot(path=str(artifacts_dir / "canvas-pack-nodes.png"))
    for node in info:
        assert node["category"] == "DreamBooth", node
        assert node["description"], node
        assert node["untipped"] == [], node
        assert all(node["outputTips"]), node
    train = next(n for n in info if n["type"] == "LoRATrain")
    assert {"rank", "steps", "unet_lr", "text_encoder_lr", "seed"} <= set(train["widgets"])
    canny = next(n for n in info if n["type"] == "CannyControl")
    assert "OpenCV units (0-255)" in canny["tooltips"]["low_threshold"]
    assert {"low_threshold", "high_threshold", "blur", "strength", "start_percent", "end_percent"} <= set(canny["widgets"])
    # the training seed stays put between runs (no "control after generate" widget)
    assert "control_after_generate" not in train["widgets"]
