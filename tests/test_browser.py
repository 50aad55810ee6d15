"""The front-end in a real browser: CI's ComfyUI (its own legacy front-end in web/) in Debian's Chromium, driven by
Playwright. The example workflows load with no errors from the pack's scripts, the node search finds every node, the
preset widgets show real values, and a training run draws its chart and ends finished, or cancelled.

Screenshots go to test-artifacts/browser/ (IDENTITY_TOKENS_ARTIFACTS moves it). Skipped, with the reason, only
where Chromium is missing and cannot be installed (needs root and apt-get).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser import (
    CHART_BLUE,
    DOC_SCREENSHOTS,
    FINISHED_GREEN,
    UPDATE_DOCS,
    Page,
    colour_pixels,
    install_chromium,
    load_workflow,
    open_front_end,
    preset_widget_values,
    run_state,
    search_results,
    train_and_cancel,
    train_until_done,
    training_graph,
)
from tests.comfy_server import ComfyServer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "example_workflows").glob("*.json"))
TRAIN = "IdentityTokens_TrainIdentityToken"


@pytest.fixture(scope="module")
def front_end(comfy_server: ComfyServer) -> Iterator[Page]:
    """One browser page on CI's ComfyUI for the module."""
    executable, why = install_chromium()
    if executable is None:
        pytest.skip(why)
    with open_front_end(executable, comfy_server.url) as page:
        yield page


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_workflows_load_without_errors(front_end: Page, path: Path) -> None:
    unknown = load_workflow(front_end, json.loads(path.read_text()))
    assert unknown == [], f"{path.name}: node types the front-end does not know: {unknown}"
    count = front_end.run("() => app.graph._nodes.length")
    assert count == len(json.loads(path.read_text())["nodes"])
    front_end.fit_graph()
    shot = front_end.screenshot(f"workflow_{path.stem}")
    if UPDATE_DOCS:  # docs/NODES.md shows these
        shutil.copyfile(shot, DOC_SCREENSHOTS / shot.name)
    assert front_end.pack_errors() == []


def test_node_search_finds_every_node(front_end: Page, comfy_server: ComfyServer) -> None:
    """Double-click the empty canvas, type each node's display name: it is among the search box's results."""
    names = {n: info["display_name"] for n, info in comfy_server.object_info().items() if n.startswith("IdentityTokens_")}
    assert len(names) >= 12
    front_end.run("() => app.graph.clear()")
    missing = []
    for node_type, display in names.items():
        found = search_results(front_end, display)  # each item reads the title, then the type or category
        if not any(item.startswith(display) for item in found) or len(found) > 5:
            missing.append(f"{display} ({node_type}): results {found}")
    assert missing == []
    assert front_end.pack_errors() == []


def test_preset_widgets_show_the_presets_values(front_end: Page, comfy_server: ComfyServer) -> None:
    presets = comfy_server.object_info(TRAIN)[TRAIN]["input"]["required"]["preset"][1]["presets"]
    values = preset_widget_values(front_end)
    keys = ("steps", "learning_rate", "batch_size", "reg_weight")
    assert {k: values["fresh"][k] for k in keys} == presets["Cross-Init"]
    assert {k: values["chosen"][k] for k in keys} == presets["Textual Inversion"]
    assert values["edited"]["steps"] == 123 and values["edited"]["batch_size"] == presets["Textual Inversion"]["batch_size"]
    assert {k: values["old"][k] for k in keys} == presets["Textual Inversion"] and values["old"]["preset"] == "Textual Inversion"
    assert front_end.pack_errors() == []


def test_a_training_run_draws_its_chart_and_ends_finished(front_end: Page) -> None:
    node = training_graph(front_end, 6, "browser-finished")
    train_until_done(front_end, node)
    state = run_state(front_end, node)
    assert state == {"state": "finished", "steps": 6, "reason": ""}, state
    front_end.page.wait_for_function("id => app.graph.getNodeById(id).imgs?.[0]?.complete", arg=node, timeout=30_000)
    assert "identity_tokens_attention" in front_end.run("id => app.graph.getNodeById(id).imgs[0].src", node)
    shot = front_end.node_screenshot(node, "training_finished")
    assert colour_pixels(shot, CHART_BLUE) > 30, "no loss line drawn on the node"
    assert colour_pixels(shot, FINISHED_GREEN) > 10, "no finished line drawn on the node"
    front_end.screenshot("training_finished_page")
    assert front_end.pack_errors() == []


def test_cancel_shows_the_cancelled_state(front_end: Page) -> None:
    node = training_graph(front_end, 2000, "browser-cancelled")
    train_and_cancel(front_end, node)
    state = run_state(front_end, node)
    assert state["state"] == "cancelled" and state["steps"] < 2000, state
    front_end.node_screenshot(node, "training_cancelled")
    assert front_end.pack_errors() == []
