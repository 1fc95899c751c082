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
