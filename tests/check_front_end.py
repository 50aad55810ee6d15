"""The browser test's checks against another ComfyUI (today's, with its front-end package), outside CI.

    python -m tests.check_front_end --comfyui DIR --python VENV/bin/python [--out test-artifacts/today]

DIR is a ComfyUI checkout, VENV a virtual environment with its requirements (and so comfyui-frontend-package). Prints
what it saw as JSON (front-end and core versions, each check's result, page errors) and keeps screenshots in --out;
docs/NODES.md records the last run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tests import browser
from tests.comfy_server import ComfyServer

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("steps", "learning_rate", "batch_size", "reg_weight")


def _checks(page: browser.Page, server: ComfyServer) -> dict:
    """Every check of tests/test_browser.py, as results instead of assertions."""
    page.page.wait_for_timeout(3000)  # today's front-end greets a new user with dialogs (templates, missing models)
    for _ in range(3):
        page.page.keyboard.press("Escape")
        page.page.wait_for_timeout(500)
    page.run("async () => app.extensionManager?.setting?.set('Comfy.Workflow.ShowMissingModelsWarning', false)")
    seen: dict = {"workflows": {}, "search": {}}
    for path in sorted((ROOT / "example_workflows").glob("*.json")):
        workflow = json.loads(path.read_text())
        unknown = browser.load_workflow(page, workflow)
        count = page.run("() => app.graph._nodes.length")
        page.fit_graph()
        page.screenshot(f"workflow_{path.stem}")
        seen["workflows"][path.stem] = {"unknown_types": unknown, "nodes": count, "expected": len(workflow["nodes"])}
    page.run("() => app.graph.clear()")
    info = server.object_info()
    for node_type, node in info.items():
        if node_type.startswith("IdentityTokens_"):
            found = browser.search_results(page, node["display_name"])
            seen["search"][node_type] = any(item.startswith(node["display_name"]) for item in found)
    presets = info[browser.TRAIN_NODE]["input"]["required"]["preset"][1]["presets"]
    values = browser.preset_widget_values(page)
    seen["presets"] = {
        "fresh_is_cross_init": {k: values["fresh"][k] for k in KEYS} == presets["Cross-Init"],
        "choosing_fills_textual_inversion": {k: values["chosen"][k] for k in KEYS} == presets["Textual Inversion"],
        "user_edit_kept": values["edited"]["steps"] == 123,
        "old_workflow_filled": {k: values["old"][k] for k in KEYS} == presets["Textual Inversion"],
    }
    seen["node_help"] = _hover_tooltips(page, info[browser.TRAIN_NODE])
    node = browser.training_graph(page, 6, "today-finished")
    browser.train_until_done(page, node)
    page.page.wait_for_timeout(3000)  # the executed message (the attention heatmap) follows the last progress event
    heatmap = page.run("id => (app.graph.getNodeById(id).imgs ?? []).map(i => i.src)", node)
    shot = page.node_screenshot(node, "training_finished")
    seen["finished"] = {**browser.run_state(page, node), "chart_pixels": browser.colour_pixels(shot, browser.CHART_BLUE),
                        "finished_line_pixels": browser.colour_pixels(shot, browser.FINISHED_GREEN),
                        "heatmap_on_node": any("identity_tokens_attention" in src for src in heatmap)}
    node = browser.training_graph(page, 2000, "today-cancelled")
    browser.train_and_cancel(page, node)
    page.node_screenshot(node, "training_cancelled")
    seen["cancelled"] = browser.run_state(page, node)
    seen["pack_errors"] = page.pack_errors()
    seen["other_page_errors"] = [e.splitlines()[0] for e in page.errors if e not in seen["pack_errors"]]
    return seen


def _hover_tooltips(page: browser.Page, node_info: dict) -> dict:
    """Hover a new training node's title and its steps widget: whether the description and the tooltip show."""
    where = page.run(
        """type => {
            app.graph.clear();
            const node = LiteGraph.createNode(type);
            node.pos = [200, 100];
            app.graph.add(node);
            app.canvas.ds.scale = 1;
            app.canvas.ds.offset = [0, 0];
            app.canvas.setDirty(true, true);
            app.canvas.draw(true, true);
            const rect = app.canvas.canvas.getBoundingClientRect(), steps = node.widgets.find(w => w.name === "steps");
            return {title: [rect.left + 260, rect.top + 85], steps: [rect.left + 300, rect.top + 110 + steps.last_y]};
        }""",
        browser.TRAIN_NODE,
    )
    wanted = {"title": node_info["description"], "steps": node_info["input"]["required"]["steps"][1]["tooltip"]}
    shown = {}
    for part, (x, y) in where.items():
        page.page.mouse.move(x, y)
        page.page.wait_for_timeout(1500)
        texts = page.run("() => Array.from(document.querySelectorAll('.node-tooltip')).map(e => e.innerText)")
        shown[part] = any(" ".join(wanted[part].split())[:60] in " ".join(t.split()) for t in texts)
        page.screenshot(f"tooltip_{part}")
    return shown


def main(argv: list[str] | None = None) -> int:
    """Start the given ComfyUI with the pack, run the checks, print the report."""
    parser = argparse.ArgumentParser(prog="python -m tests.check_front_end", description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True)
    parser.add_argument("--python", required=True, help="the interpreter of a venv with that ComfyUI's requirements")
    parser.add_argument("--out", type=Path, default=ROOT / "test-artifacts" / "today")
    args = parser.parse_args(argv)
    browser.ARTIFACTS = args.out
    from core.images import sample_photo_path
    from tests.tiny_sd15 import write_tiny_sd15

    with tempfile.TemporaryDirectory() as work:
        checkpoint = Path(work) / "tiny_sd15.safetensors"
        write_tiny_sd15(checkpoint)
        server = ComfyServer().start(args.comfyui, Path(work) / "base", checkpoint, sample_photo_path(),
                                     python=args.python, timeout=300)
        try:
            with browser.open_front_end(browser.find_chromium(), server.url, timeout_ms=120_000) as page:
                versions = page.run("() => window.__COMFYUI_FRONTEND_VERSION__")
                report = {"front_end": versions, "core": server.get_json("/system_stats")["system"].get("comfyui_version"),
                          **_checks(page, server)}
        finally:
            server.stop()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
