"""docs/NODES.md is what tests/nodes_doc.py generates from the nodes' descriptions and tooltips."""

from __future__ import annotations

from tests.nodes_doc import DOC, EXAMPLES, pack_node_classes, render


def test_nodes_doc_is_up_to_date() -> None:
    assert DOC.read_text() == render(pack_node_classes()), "docs/NODES.md is stale: run python -m tests.nodes_doc"


def test_nodes_doc_covers_every_node_and_example() -> None:
    text = DOC.read_text()
    for node_id, (_cls, display) in pack_node_classes().items():
        assert f"## {display}" in text and f"`{node_id}`" in text
    for path in EXAMPLES.glob("*.json"):
        assert f"images/workflow_{path.stem}.png" in text
        assert (DOC.parent / "images" / f"workflow_{path.stem}.png").is_file(), f"no screenshot of {path.name}"
