"""The ComfyUI canvas in headless Chromium with the pack installed: what a user sees."""

from __future__ import annotations

import pytest

from scripts.frontend import VISIBLE_ALERTS_JS

pytestmark = pytest.mark.browser

MISSING_TYPES_JS = """() => window.app.graph._nodes
    .filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type)"""
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
# Fit every node of the graph into the part of the canvas the page's menus, banner and minimap
# leave free, then report each node's box on screen (CSS pixels), whether the canvas itself is what
# shows at its corners and centre (nothing drawn over it), and where each widget is.
FIT_AND_MEASURE_JS = """([left, top, right, bottom]) => {
    const c = app.canvas, nodes = app.graph._nodes, title = LiteGraph.NODE_TITLE_HEIGHT;
    c.draw(true, true);  // nodes take their final size when first drawn
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of nodes) {
        x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
        x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    const rect = c.canvas.getBoundingClientRect();
    const scale = Math.min((right - left) / (x1 - x0), (bottom - top) / (y1 - y0), 1.0);
    c.ds.scale = scale;
    c.ds.offset = [(left - rect.left) / scale - x0, (top - rect.top) / scale - y0];
    c.setDirty(true, true);
    c.draw(true, true);
    const screen = (x, y) => { const [sx, sy] = c.ds.convertOffsetToCanvas([x, y]); return [rect.left + sx, rect.top + sy]; };
    // a point shows the node when the canvas is on top there, or the node's own DOM widget (its
    // live chart) or the frontend's box around it, which at a small zoom reaches the node's bottom
    // corners; anything else (menus, the minimap, another node's chart) covers it
    const seen = (n) => ([x, y]) => {
        const top = document.elementFromPoint(x, y);
        return top === c.canvas || (n.widgets || []).some(w => w.element && (w.element.contains(top)
            || (top.classList.contains("dom-widget") && top.contains(w.element))));
    };
    return nodes.map(n => {
        const [a, b] = screen(n.pos[0], n.pos[1] - title), [d, e] = screen(n.pos[0] + n.size[0], n.pos[1] + n.size[1]);
        const probes = [[a + 3, b + 3], [d - 3, b + 3], [a + 3, e - 3], [d - 3, e - 3], [(a + d) / 2, (b + e) / 2]];
        return {type: n.type, box: [a, b, d, e], visible: probes.map(seen(n)),
                widgets: (n.widgets || []).map(w => ({name: w.name, at: screen(n.pos[0] + n.size[0] / 2,
                    n.pos[1] + (w.last_y ?? w.y ?? 0) + LiteGraph.NODE_WIDGET_HEIGHT / 2)}))};
    });
}"""


def assert_clean(page):
    """No console error and nothing alarming on screen."""
    assert page.console_errors == [], page.console_errors
    assert page.evaluate(VISIBLE_ALERTS_JS) == []


def test_canvas_opens_and_default_workflow_has_no_missing_nodes(canvas_page, artifacts_dir):
    page = canvas_page
    assert page.evaluate("() => typeof window.app.graphToPrompt") == "function"
    page.evaluate("async () => { await window.app.loadGraphData(); }")
    types = page.evaluate("() => window.app.graph._nodes.map(n => n.type)")
    assert {"CheckpointLoaderSimple", "KSampler", "SaveImage"} <= set(types)
    assert page.evaluate(MISSING_TYPES_JS) == []
    page.wait_for_timeout(500)
    page.screenshot(path=str(artifacts_dir / "canvas-default-workflow.png"))
    assert_clean(page)


LIVE_CHART_WIDGETS = {"LoRATrain": {"live_chart"}, "DreamBoothTrain": {"live_chart"}}
PACK_NODES = ["LoadSubjectImages", "LoRATrain", "DreamBoothTrain", "ApplyLoRAScaled", "CannyControl", "LoRAScaleGrid",
              "LoadFidelityModels", "SubjectFidelity"]


def test_pack_nodes_appear_in_the_canvas_with_tooltips(canvas_page, artifacts_dir):
    page = canvas_page
    page.evaluate("() => window.app.graph.clear()")
    info = page.evaluate("""(types) => types.map((type, i) => {
        const node = LiteGraph.createNode(type);
        window.app.graph.add(node);
        const def = LiteGraph.registered_node_types[type].nodeData;
        const inputs = Object.assign({}, def.input.required || {}, def.input.optional || {});
        return {type, category: def.category, description: def.description,
                inputs: Object.fromEntries(Object.entries(inputs).map(([k, v]) => [k, Array.isArray(v[0]) ? "COMBO" : v[0]])),
                untipped: Object.entries(inputs).filter(([k, v]) => !(v[1] && v[1].tooltip)).map(([k]) => k),
                outputTips: def.output_tooltips,
                tooltips: Object.fromEntries(Object.entries(inputs).map(([k, v]) => [k, (v[1] || {}).tooltip]))};
    })""", PACK_NODES)
    # three nodes a row, each row below the tallest node of the one above (sizes as drawn)
    page.evaluate("""() => {
        app.canvas.draw(true, true);
        const nodes = app.graph._nodes, gap = 60;
        let top = 80;
        for (let row = 0; row * 3 < nodes.length; row++) {
            const cells = nodes.slice(row * 3, row * 3 + 3);
            let left = 40;
            for (const node of cells) { node.pos = [left, top]; left += node.size[0] + gap; }
            top += Math.max(...cells.map(n => n.size[1])) + LiteGraph.NODE_TITLE_HEIGHT + gap;
        }
    }""")
    free_area = [110, 150, 1140, 970]  # right of the sidebar, below the menus, left of the minimap
    page.evaluate(FIT_AND_MEASURE_JS, free_area)
    # DOM widgets (the training nodes' live charts) follow the view on the next frames: measure
    # again once they have moved, or a chart left where the view was covers another node
    page.wait_for_timeout(300)
    shown = page.evaluate(FIT_AND_MEASURE_JS, free_area)
    page.wait_for_timeout(500)
    page.screenshot(path=str(artifacts_dir / "canvas-pack-nodes.png"))
    for node, on_screen in zip(info, shown, strict=True):
        assert node["category"] == "DreamBooth", node
        assert node["description"], node
        assert node["untipped"] == [], node
        assert all(node["outputTips"]), node
        # the whole node is on screen, not under the page's menus or minimap
        assert all(on_screen["visible"]), (node["type"], on_screen["box"], on_screen["visible"])
        # one widget per widget-type input of the schema, nothing else (no seed "control after generate"),
        # and on the training nodes the live chart of web/live_chart.js
        expected = {name for name, kind in node["inputs"].items() if kind in WIDGET_TYPES}
        expected |= LIVE_CHART_WIDGETS.get(node["type"], set())
        assert {w["name"] for w in on_screen["widgets"]} == expected, node["type"]
    canny = next(n for n in info if n["type"] == "CannyControl")
    assert "OpenCV units (0-255)" in canny["tooltips"]["low_threshold"]
    # the tooltip a user reads when hovering LoRATrain's rank widget
    train = next(n for n in shown if n["type"] == "LoRATrain")
    rank = next(w for w in train["widgets"] if w["name"] == "rank")
    page.mouse.move(rank["at"][0] - 40, rank["at"][1])
    page.mouse.move(*rank["at"])
    page.wait_for_selector(".node-tooltip", timeout=5000)
    assert page.inner_text(".node-tooltip").startswith("LoRA rank (dimension of the low-rank update)")
    assert_clean(page)
