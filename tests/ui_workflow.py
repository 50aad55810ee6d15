"""Test helper: ComfyUI's UI (litegraph) workflow format, converted to the API (prompt) format with object_info."""

from __future__ import annotations

from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # frontend-only: never sent to the server
SEED_CONTROLS = {"fixed", "increment", "decrement", "randomize"}
UPLOAD_OPTIONS = {"image_upload": "image", "video_upload": "video", "audio_upload": "audio"}

Link = tuple[int, int, int, int, int, str]  # id, from node, from slot, to node, to slot, type


def is_widget(spec: list[Any]) -> bool:
    """True when an object_info input spec ([type, options]) is drawn as a widget: a combo or a primitive type."""
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def ordered_inputs(info: dict[str, Any]) -> list[tuple[str, list[Any]]]:
    """A node's inputs from object_info, required then optional, in declaration order (input_order when given)."""
    found: list[tuple[str, list[Any]]] = []
    for group in ("required", "optional"):
        specs = info.get("input", {}).get(group, {})
        order = info.get("input_order", {}).get(group, list(specs))
        found += [(name, list(specs[name])) for name in order]
    return found


def extra_widget_value(name: str, spec: list[Any]) -> set[Any]:
    """Values the frontend saves right after this widget's own (seed control, upload button), if it adds one."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("control_after_generate") or (spec[0] == "INT" and name in ("seed", "noise_seed")):
        return SEED_CONTROLS
    return {value for key, value in UPLOAD_OPTIONS.items() if options.get(key)}


def is_extra(value: Any, extras: set[Any], next_spec: list[Any] | None) -> bool:
    """Whether a saved value is the extra one (2023 frontends saved the seed control as a boolean)."""
    if isinstance(value, bool):
        return extras is SEED_CONTROLS and (next_spec is None or next_spec[0] != "BOOLEAN")
    return isinstance(value, str) and value in extras


def links_by_id(ui: dict[str, Any]) -> dict[int, Link]:
    """The workflow's links keyed by id (the list form [id, from, from_slot, to, to_slot, type] or the dict form)."""
    found: dict[int, Link] = {}
    for link in ui.get("links", []):
        if isinstance(link, dict):
            link = [link[k] for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")]
        found[int(link[0])] = tuple(link)  # type: ignore[assignment]
    return found


def ui_to_api(ui: dict[str, Any], object_info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The API-format prompt ComfyUI's frontend would queue for this UI-format workflow."""
    nodes = {int(node["id"]): node for node in ui["nodes"]}
    links = links_by_id(ui)

    def source(link_id: int) -> list[Any]:
        """[node id, output slot] feeding this link, followed through Reroute nodes."""
        _, from_node, from_slot, *_ = links[link_id]
        node = nodes[from_node]
        if node["type"] == "Reroute":
            upstream = node["inputs"][0]["link"]
            if upstream is None:
                raise ValueError(f"Reroute {from_node} has no input")
            return source(upstream)
        return [str(from_node), from_slot]

    prompt: dict[str, dict[str, Any]] = {}
    for node_id, node in sorted(nodes.items()):
        kind = node["type"]
        if kind in VIRTUAL_NODES or node.get("mode", 0) == 2:  # 2: muted ("never")
            continue
        if node.get("mode", 0) == 4:
            raise ValueError(f"node {node_id} ({kind}) is bypassed; bypass is not supported by this converter")
        if kind not in object_info:
            raise KeyError(f"node {node_id}: {kind} is not in object_info (missing custom node?)")
        linked = {slot["name"]: slot["link"] for slot in node.get("inputs", []) if slot.get("link") is not None}
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values", [])
        specs = ordered_inputs(object_info[kind])
        if isinstance(values, dict):  # some nodes save widgets by name
            inputs.update({name: values[name] for name, spec in specs if is_widget(spec) and name in values})
        else:
            widgets = [(name, spec) for name, spec in specs if is_widget(spec)]
            position = 0
            for index, (name, spec) in enumerate(widgets):
                if position >= len(values):
                    break  # an optional widget the saved file predates: the server uses its default
                # A widget turned into a linked input keeps its slot in widgets_values; the link wins (below).
                inputs[name] = values[position]
                position += 1
                extras = extra_widget_value(name, spec)
                next_spec = widgets[index + 1][1] if index + 1 < len(widgets) else None
                if extras and position < len(values) and is_extra(values[position], extras, next_spec):
                    position += 1
            if position != len(values):
                raise ValueError(f"node {node_id} ({kind}): {len(values)} widget values, {position} used: {values}")
        for name, link_id in linked.items():
            if nodes[links[link_id][1]]["type"] == "PrimitiveNode":
                continue  # a Primitive writes its value into this widget, which widgets_values already holds
            inputs[name] = source(link_id)
        entry: dict[str, Any] = {"inputs": inputs, "class_type": kind}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        prompt[str(node_id)] = entry
    return prompt


def check_ui_format(ui: dict[str, Any], object_info: dict[str, Any] | None = None) -> list[str]:
    """Problems with a UI-format workflow: ids, link bookkeeping on both ends, slot names and types; [] when sound."""
    problems: list[str] = []
    for key in ("last_node_id", "last_link_id", "nodes", "links", "version"):
        if key not in ui:
            problems.append(f"missing top-level key {key!r}")
    nodes: dict[int, dict[str, Any]] = {}
    for node in ui.get("nodes", []):
        if node["id"] in nodes:
            problems.append(f"duplicate node id {node['id']}")
        nodes[node["id"]] = node
        needed = ("type", "pos", "size", "flags", "order", "mode", "properties", "widgets_values")
        for key in needed if node.get("type") in VIRTUAL_NODES else (*needed, "inputs", "outputs"):
            if key not in node:
                problems.append(f"node {node['id']}: missing {key!r}")
    links = links_by_id(ui)
    if len(links) != len(ui.get("links", [])):
        problems.append("duplicate link ids")
    if nodes and ui.get("last_node_id", -1) < max(nodes):
        problems.append("last_node_id is below the largest node id")
    if links and ui.get("last_link_id", -1) < max(links):
        problems.append("last_link_id is below the largest link id")
    for link_id, (_, src, src_slot, dst, dst_slot, kind) in links.items():
        if src not in nodes or dst not in nodes:
            problems.append(f"link {link_id}: unknown node")
            continue
        outputs, inputs = nodes[src].get("outputs", []), nodes[dst].get("inputs", [])
        if src_slot >= len(outputs) or link_id not in (outputs[src_slot].get("links") or []):
            problems.append(f"link {link_id}: not listed in node {src} output {src_slot}")
        elif outputs[src_slot]["type"] != kind:
            problems.append(
                f"link {link_id}: type {kind} but node {src} output {src_slot} is {outputs[src_slot]['type']}"
            )
        if dst_slot >= len(inputs) or inputs[dst_slot].get("link") != link_id:
            problems.append(f"link {link_id}: not the link of node {dst} input {dst_slot}")
        elif inputs[dst_slot]["type"] not in (kind, "*"):
            problems.append(
                f"link {link_id}: type {kind} but node {dst} input {dst_slot} is {inputs[dst_slot]['type']}"
            )
    for node_id, node in nodes.items():
        for slot in node.get("inputs", []):
            if slot.get("link") is not None and slot["link"] not in links:
                problems.append(f"node {node_id} input {slot['name']}: dangling link {slot['link']}")
        for slot in node.get("outputs", []):
            for link_id in slot.get("links") or []:
                if link_id not in links or links[link_id][1] != node_id:
                    problems.append(f"node {node_id} output {slot['name']}: dangling link {link_id}")
        if object_info is None or node["type"] in VIRTUAL_NODES:
            continue
        info = object_info.get(node["type"])
        if info is None:
            problems.append(f"node {node_id}: {node['type']} not in object_info")
            continue
        specs = dict(ordered_inputs(info))
        required = info.get("input", {}).get("required", {})
        sockets = {slot["name"] for slot in node.get("inputs", [])}
        for name in required:
            if not is_widget(specs[name]) and name not in sockets:
                problems.append(f"node {node_id} ({node['type']}): required input {name!r} has no slot")
        for slot in node.get("inputs", []):
            spec = specs.get(slot["name"])
            if spec is None:
                problems.append(f"node {node_id}: no input {slot['name']!r} on {node['type']}")
            elif not is_widget(spec) and spec[0] != slot["type"]:
                problems.append(f"node {node_id} input {slot['name']}: {slot['type']}, object_info says {spec[0]}")
        expected = list(zip(info.get("output_name", info.get("output", [])), info.get("output", [])))
        got = [(slot["name"], slot["type"]) for slot in node.get("outputs", [])]
        if got != expected:
            problems.append(f"node {node_id} ({node['type']}): outputs {got}, object_info says {expected}")
    return problems
