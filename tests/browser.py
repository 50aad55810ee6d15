"""Test helper: Debian's Chromium driven by Playwright (the PyPI package with the system browser, no browser download),
on a ComfyUI server's page, collecting page errors and console errors, with helpers for the canvas."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tests.comfy_server import CHECKPOINT_NAME

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("IDENTITY_TOKENS_ARTIFACTS", ROOT / "test-artifacts")) / "browser"
DOC_SCREENSHOTS = ROOT / "docs" / "images"  # IDENTITY_TOKENS_DOC_SCREENSHOTS=1: the workflow screenshots go here too
UPDATE_DOCS = os.environ.get("IDENTITY_TOKENS_DOC_SCREENSHOTS") == "1"
BROWSER_NAMES = ("chromium", "chromium-browser")
PACK_URL = "/extensions/identity_tokens/"  # where ComfyUI serves the pack's web/ folder
TRAIN_NODE = "IdentityTokens_TrainIdentityToken"
CHART_BLUE = np.array([0x66, 0xCC, 0xFF])  # the loss line's colour (#6cf) in web/identity_tokens.js
FINISHED_GREEN = np.array([0x77, 0xDD, 0x77])  # the finished line's colour (#7d7)


def find_chromium() -> str | None:
    """The system Chromium's path, or None."""
    return next((path for name in BROWSER_NAMES if (path := shutil.which(name))), None)


def install_chromium() -> tuple[str | None, str]:
    """Chromium from Debian's packages when it is missing (root and apt-get only): (path or None, why not)."""
    found = find_chromium()
    if found:
        return found, ""
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        return None, "Chromium is not installed and cannot be installed here (needs root and apt-get): apt install chromium"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = ""
    for command in ([apt, "install", "-y", "-q", "chromium"], [apt, "update", "-q"], [apt, "install", "-y", "-q", "chromium"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        log = (done.stdout + done.stderr)[-1500:]
        if command[1] == "install" and done.returncode == 0 and find_chromium():
            return find_chromium(), ""
    return None, f"apt-get could not install Chromium: {log}"


@dataclass
class Page:
    """A Playwright page on the ComfyUI front-end, with what went wrong on it."""

    page: Any
    errors: list[str] = field(default_factory=list)  # uncaught page errors, with their stacks
    console_errors: list[str] = field(default_factory=list)

    def pack_errors(self) -> list[str]:
        """Errors whose text or stack names one of the pack's scripts."""
        return [e for e in self.errors + self.console_errors if PACK_URL in e or "identity_tokens" in e]

    def run(self, script: str, arg: object = None) -> Any:
        """page.evaluate of a JS function expression."""
        return self.page.evaluate(script, arg)

    def fit_graph(self) -> None:
        """Zoom and pan the canvas so every node is in view (at most 1:1), then redraw."""
        self.run(
            """() => {
                const nodes = app.graph._nodes, title = LiteGraph.NODE_TITLE_HEIGHT, pad = 40;
                const left = Math.min(...nodes.map(n => n.pos[0])), top = Math.min(...nodes.map(n => n.pos[1] - title));
                const right = Math.max(...nodes.map(n => n.pos[0] + n.size[0]));
                const bottom = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
                const canvas = app.canvas.canvas;
                const scale = Math.min(1, canvas.width / (right - left + 2 * pad), canvas.height / (bottom - top + 2 * pad));
                app.canvas.ds.scale = scale;
                app.canvas.ds.offset = [-left + (canvas.width / scale - (right - left)) / 2,
                                        -top + (canvas.height / scale - (bottom - top)) / 2];
                app.canvas.setDirty(true, true);
                app.canvas.draw(true, true);
            }"""
        )

    def screenshot(self, name: str) -> Path:
        """A full-page screenshot in the artefacts folder."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def node_screenshot(self, node_id: int, name: str) -> Path:
        """A screenshot of one node's box on the canvas (the canvas is redrawn first)."""
        box = self.run(
            """id => {
                const node = app.graph.getNodeById(id);
                app.canvas.draw(true, true);
                const rect = app.canvas.canvas.getBoundingClientRect();
                const [x, y] = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT]);
                const scale = app.canvas.ds.scale;
                return {x: rect.left + x, y: rect.top + y, width: node.size[0] * scale,
                        height: (node.size[1] + LiteGraph.NODE_TITLE_HEIGHT) * scale};
            }""",
            node_id,
        )
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), clip=box)
        return path


@contextmanager
def open_front_end(executable: str, url: str, timeout_ms: float = 60_000) -> Iterator[Page]:
    """Headless Chromium on the server's page, once ComfyUI's app has set up its graph and node types."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            watched = Page(page)
            page.on("pageerror", lambda error: watched.errors.append(f"{error}\n{getattr(error, 'stack', '')}"))
            page.on("console", lambda message: _console(watched, message))
            page.goto(url)
            page.wait_for_function("() => window.app?.graph && LiteGraph.registered_node_types", timeout=timeout_ms)
            yield watched
        finally:
            browser.close()


def _console(watched: Page, message: Any) -> None:
    """Keep console errors with where they came from."""
    if message.type == "error":
        location = message.location or {}
        watched.console_errors.append(f"{message.text} ({location.get('url', '')}:{location.get('lineNumber', '')})")


def load_workflow(page: Page, workflow: dict) -> list[str]:
    """Load a UI-format workflow into the graph; the node types the front-end does not know."""
    return page.run(
        """async workflow => {
            await app.loadGraphData(workflow);
            return app.graph._nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type);
        }""",
        workflow,
    )


def preset_widget_values(front_end: Page) -> dict:
    """A new training node's widget values: fresh, after choosing Textual Inversion, after the user sets steps 123,
    and a copy configured from its saved form with 0 / -1 in the preset widgets (a workflow from before)."""
    return front_end.run(
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
        TRAIN_NODE,
    )


def training_graph(front_end: Page, steps: int, name: str) -> int:
    """The train_save_sample example on the tiny checkpoint at 64 px; the training node's id."""
    load_workflow(front_end, json.loads((ROOT / "example_workflows" / "train_save_sample.json").read_text()))
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


def run_state(front_end: Page, node_id: int) -> dict:
    """The training node's live-view state."""
    return front_end.run(
        """id => { const run = app.graph.getNodeById(id).identityTokensRun;
                   return run ? {state: run.state, steps: run.history.length, reason: run.reason} : {state: "none"}; }""",
        node_id,
    )


def colour_pixels(path: Path, colour: np.ndarray) -> int:
    """How many pixels of a screenshot are within 40 of colour (each channel)."""
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB")).astype(int)
    return int((np.abs(rgb - colour).max(axis=-1) < 40).sum())


def search_results(page: Page, text: str) -> list[str]:
    """Double-click the empty canvas, type text: the node search's results (each item's text, spaces collapsed);
    the legacy front-end's LiteGraph search box or today's search dialog, whichever opens. Closed again after."""
    page.page.mouse.dblclick(700, 500)
    legacy = page.page.locator(".litesearchbox input")
    today = page.page.locator("li.p-autocomplete-option")
    page.page.wait_for_timeout(500)
    if legacy.count():
        legacy.first.press_sequentially(text)
        items = page.page.locator(".litesearchbox .lite-search-item")
    else:
        page.page.keyboard.type(text)
        items = today
    page.page.wait_for_timeout(500)
    found = [" ".join(t.split()) for t in items.all_inner_texts()]
    page.page.keyboard.press("Escape")
    page.page.wait_for_timeout(200)
    return found


def train_until_done(page: Page, node_id: int, timeout_ms: float = 300_000) -> None:
    """Queue the graph and wait until the training node's live view says finished or stopped."""
    page.run("() => app.queuePrompt(0, 1)")
    page.page.wait_for_function(
        "id => ['finished', 'stopped'].includes(app.graph.getNodeById(id).identityTokensRun?.state)",
        arg=node_id, timeout=timeout_ms,
    )


def train_and_cancel(page: Page, node_id: int, timeout_ms: float = 300_000) -> None:
    """Queue the graph, press Cancel (POST /interrupt) after the first step, and wait until the run is over."""
    page.run("() => app.queuePrompt(0, 1)")
    page.page.wait_for_function("id => app.graph.getNodeById(id).identityTokensRun?.history.length >= 1",
                                arg=node_id, timeout=timeout_ms)
    page.run("async () => { const { api } = await import('/scripts/api.js'); await api.interrupt(); }")
    page.page.wait_for_function("id => app.graph.getNodeById(id).identityTokensRun?.state !== 'running'",
                                arg=node_id, timeout=120_000)
