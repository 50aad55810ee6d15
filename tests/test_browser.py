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

import numpy as np
import pytest
from PIL import Image

from tests.browser import DOC_SCREENSHOTS, UPDATE_DOCS, Page, install_chromium, open_front_end
from tests.comfy_server import CHECKPOINT_NAME, ComfyServer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "example_workflows").glob("*.json"))
TRAIN = "IdentityTokens_TrainIdentityToken"
CHART_BLUE = np.array([0x66, 0xCC, 0xFF])  # the loss line's colour (#6cf) in web/identity_tokens.js
FINISHED_GREEN = np.array([0x77, 0xDD, 0x77])  # the finished line's colour (#7d7)


@pytest.fixture(scope="module")
def front_end(comfy_server: ComfyServer) -> Iterator[Page]:
    """One browser page on CI's ComfyUI for the module."""
    executable, why = install_chromium()
    if executable is None:
        pytest.skip(why)
    with open_front_end(executable, comfy_server.url) as page:
        yield page


def _load(page: Page, workflow: dict) -> list[str]:
    """Load a UI-format workflow into the graph; the node types the front-end does not know."""
    return page.run(
        """async workflow => {
            await app.loadGraphData(workflow);
            return app.graph._nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type);
        }""",
        workflow,
    )


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_workflows_load_without_errors(front_end: Page, path: Path) -> None:
    unknown = _load(front_end, json.loads(path.read_text()))
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
    assert len(names) >= 10
    front_end.run("() => app.graph.clear()")
    missing = []
    for node_type, display in names.items():
        front_end.page.mouse.dblclick(700, 500)
        box = front_end.page.locator(".litesearchbox input").first
        box.press_sequentially(display)  # typed, so the search box filters as a user's typing does
        items = front_end.page.locator(".litesearchbox .lite-search-item")
        front_end.page.wait_for_timeout(300)
        found = items.all_inner_texts()  # each item reads title + type
        if f"{display}{node_type}" not in found or len(found) > 5:
            missing.append(f"{display} ({node_type}): results {found}")
        front_end.page.keyboard.press("Escape")
        front_end.page.locator(".litesearchbox").wait_for(state="detached", timeout=10_000)
    assert missing == []
    assert front_end.pack_errors() == []


def test_preset_widgets_show_the_presets_values(front_end: Page, comfy_server: ComfyServer) -> None:
    presets = comfy_server.object_info(TRAIN)[TRAIN]["input"]["required"]["preset"][1]["presets"]
    values = front_end.run(
        """type => {
            app.graph.clear();
            const node = LiteGraph.createNode(type);
            app.graph.add(node);
            const read = () => Object.fromEntries(node.widgets.filter(w => w.name !== "preset").map(w => [w.name, w.value]));
            const fresh = read();
            const chooser = node.widgets.find(w => w.name === "preset");
            chooser.value = "Textual Inversion";
            chooser.callback(chooser.value);
            const chosen = read();
            node.widgets.find(w => w.name === "steps").value = 123;  // the user's own value is kept
            const edited = read();
            const saved = node.serialize();
            saved.widgets_values.splice(1, 4, 0, 0, 0, -1);  // as a workflow saved when 0 / -1 meant the preset's
            const loaded = LiteGraph.createNode(type);
            app.graph.add(loaded);
            loaded.configure(saved);
            const old = Object.fromEntries(loaded.widgets.map(w => [w.name, w.value]));
            return {fresh, chosen, edited, old};
        }""",
        TRAIN,
    )
    keys = ("steps", "learning_rate", "batch_size", "reg_weight")
    assert {k: values["fresh"][k] for k in keys} == presets["Cross-Init"]
    assert {k: values["chosen"][k] for k in keys} == presets["Textual Inversion"]
    assert values["edited"]["steps"] == 123 and values["edited"]["batch_size"] == presets["Textual Inversion"]["batch_size"]
    assert {k: values["old"][k] for k in keys} == presets["Textual Inversion"] and values["old"]["preset"] == "Textual Inversion"
    assert front_end.pack_errors() == []


def _training_graph(front_end: Page, steps: int, name: str) -> int:
    """The train_save_sample example on the tiny checkpoint at 64 px; the training node's id."""
    _load(front_end, json.loads((ROOT / "example_workflows" / "train_save_sample.json").read_text()))
    return front_end.run(
        """([checkpoint, steps, name]) => {
            const all = type => app.graph._nodes.filter(n => n.type === type);
            const set = (node, widget, value) => { node.widgets.find(w => w.name === widget).value = value; };
            set(all("CheckpointLoaderSimple")[0], "ckpt_name", checkpoint);
            all("LoadImage").forEach((node, i) => set(node, "image", ["astronaut.png", "coffee.png", "chelsea.png"][i]));
            const train = all("IdentityTokens_TrainIdentityToken")[0];
            set(train, "preset", "Cross-Init fast");
            Object.entries({steps, batch_size: 1, resolution: 64}).forEach(([k, v]) => set(train, k, v));
            set(all("IdentityTokens_SaveIdentity")[0], "name", name);
            set(all("EmptyLatentImage")[0], "width", 64);
            set(all("EmptyLatentImage")[0], "height", 64);
            set(all("KSampler")[0], "steps", 1);
            return train.id;
        }""",
        [CHECKPOINT_NAME, steps, name],
    )


def _run_state(front_end: Page, node_id: int) -> dict:
    """The training node's live-view state."""
    return front_end.run(
        """id => { const run = app.graph.getNodeById(id).identityTokensRun;
                   return run ? {state: run.state, steps: run.history.length, reason: run.reason} : {state: "none"}; }""",
        node_id,
    )


def _colour_pixels(path: Path, colour: np.ndarray) -> int:
    """How many pixels of a screenshot are within 40 of colour (each channel)."""
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB")).astype(int)
    return int((np.abs(rgb - colour).max(axis=-1) < 40).sum())


def test_a_training_run_draws_its_chart_and_ends_finished(front_end: Page) -> None:
    node = _training_graph(front_end, 6, "browser-finished")
    front_end.run("() => app.queuePrompt(0, 1)")
    front_end.page.wait_for_function(
        "id => ['finished', 'stopped'].includes(app.graph.getNodeById(id).identityTokensRun?.state)", arg=node,
        timeout=300_000,
    )
    state = _run_state(front_end, node)
    assert state == {"state": "finished", "steps": 6, "reason": ""}, state
    shot = front_end.node_screenshot(node, "training_finished")
    assert _colour_pixels(shot, CHART_BLUE) > 30, "no loss line drawn on the node"
    assert _colour_pixels(shot, FINISHED_GREEN) > 10, "no finished line drawn on the node"
    front_end.screenshot("training_finished_page")
    assert front_end.pack_errors() == []


def test_cancel_shows_the_cancelled_state(front_end: Page) -> None:
    node = _training_graph(front_end, 2000, "browser-cancelled")
    front_end.run("() => app.queuePrompt(0, 1)")
    front_end.page.wait_for_function("id => app.graph.getNodeById(id).identityTokensRun?.history.length >= 1",
                                     arg=node, timeout=300_000)
    front_end.run("async () => { const { api } = await import('/scripts/api.js'); await api.interrupt(); }")
    front_end.page.wait_for_function(
        "id => app.graph.getNodeById(id).identityTokensRun?.state !== 'running'", arg=node, timeout=120_000
    )
    state = _run_state(front_end, node)
    assert state["state"] == "cancelled" and state["steps"] < 2000, state
    front_end.node_screenshot(node, "training_cancelled")
    assert front_end.pack_errors() == []
