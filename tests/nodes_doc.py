"""docs/NODES.md from the nodes' own descriptions and tooltips (one place for each fact): python -m tests.nodes_doc.

The intro and the front-end notes come from docs/nodes_intro.md; the rest is generated. test_nodes_doc.py checks the
committed file is what this writes. The workflow screenshots are taken by the browser test (tests/test_browser.py,
with IDENTITY_TOKENS_DOC_SCREENSHOTS=1 it writes them into docs/images/).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "NODES.md"
INTRO = ROOT / "docs" / "nodes_intro.md"
EXAMPLES = ROOT / "example_workflows"
SCREENSHOTS = ROOT / "docs" / "images"


def _cell(text: object) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _kind(spec: tuple) -> tuple[str, str]:
    """(type, default) of an input spec as the doc shows them."""
    kind, options = spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(kind, (list, tuple)):
        files = any("." in str(v) for v in kind) or not kind
        shown = "a file name" if files else " / ".join(str(v) for v in kind)
        return f"choice: {shown}", str(options.get("default", "" if files else kind[0]))
    default = options.get("default", "")
    limits = [f"{k} {options[k]}" for k in ("min", "max") if k in options and kind in ("INT", "FLOAT")]
    return kind + (f" ({', '.join(limits)})" if limits else ""), "" if default == "" else str(default)


def _node_section(node_id: str, cls: type, display: str) -> list[str]:
    """One node's section: description, inputs and outputs."""
    lines = [f"## {display}", "", f"`{node_id}` · category `{cls.CATEGORY}`", "", _cell(getattr(cls, "DESCRIPTION", "")), ""]
    inputs = cls.INPUT_TYPES()
    lines += ["| input | type | default | what it does |", "|---|---|---|---|"]
    for section in ("required", "optional"):
        for name, spec in inputs.get(section, {}).items():
            kind, default = _kind(spec)
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            label = name if section == "required" else f"{name} (optional)"
            lines.append(f"| {label} | {_cell(kind)} | {_cell(default)} | {_cell(options.get('tooltip', ''))} |")
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    tips = getattr(cls, "OUTPUT_TOOLTIPS", ("",) * len(names))
    if names:
        lines += ["", "| output | type | what it is |", "|---|---|---|"]
        lines += [f"| {n} | {t} | {_cell(tip)} |" for n, t, tip in zip(names, cls.RETURN_TYPES, tips)]
    return lines + [""]


def render(node_classes: dict[str, tuple[type, str]]) -> str:
    """The whole of docs/NODES.md."""
    lines = [INTRO.read_text().rstrip(), "", "## Example workflows", ""]
    for path in sorted(EXAMPLES.glob("*.json")):
        lines += [f"### {path.stem}", "", f"`example_workflows/{path.name}`, as CI's ComfyUI draws it in the browser test:", ""]
        lines += [f"![{path.stem}](images/workflow_{path.stem}.png)", ""]
    lines += ["# Node reference", "", "Generated from the nodes' descriptions and tooltips (`python -m tests.nodes_doc`).", ""]
    for node_id, (cls, display) in node_classes.items():
        lines += _node_section(node_id, cls, display)
    return "\n".join(lines).rstrip() + "\n"


def pack_node_classes() -> dict[str, Any]:
    """The pack's NODE_CLASSES, imported the way ComfyUI does (CI's ComfyUI on the CPU)."""
    from tests.comfy_tiny import comfy_ready

    comfy_ready()
    from identity_tokens.nodes import NODE_CLASSES

    return NODE_CLASSES


def main() -> int:
    """Write docs/NODES.md."""
    DOC.write_text(render(pack_node_classes()))
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
