"""example_workflows/*.json: sound UI-format graphs that convert to their API twins in tests/workflows/.

The example files are for users, so they show what a user would run: a real checkpoint name, a real training set-up
and a full-size image. The twins are what CI runs on the tiny checkpoint. USER_VALUES lists every input where the two
differ (node id -> input -> the value in the example file); everything else must be equal after conversion.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.comfy_server import ComfyServer
from tests.ui_workflow import check_ui_format, links_by_id, ordered_inputs, ui_to_api

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "example_workflows"
TWINS = ROOT / "tests" / "workflows"
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
ENCODER_VALUES: dict[str, dict[str, Any]] = {
    "1": {"ckpt_name": CHECKPOINT},
    "2": {"image": "photo_1.jpg"},
    "3": {"clip_name": "clip-vit-large-patch14.safetensors"},
    "4": {"encoder_name": "my-encoder.safetensors"},
    "8": {"width": 512, "height": 512},
    "9": {"steps": 20},
    "11": {"filename_prefix": "identity_tokens_encoder"},
}
USER_VALUES: dict[str, dict[str, dict[str, Any]]] = {
    "train_save_sample": {
        "1": {"ckpt_name": CHECKPOINT},
        "2": {"image": "photo_1.jpg"},  # the user uploads their own photos into the three Load Image nodes
        "13": {"image": "photo_2.jpg"},
        "14": {"image": "photo_3.jpg"},
        # the preset's values as the front-end fills them; resolution 0: the checkpoint's native size (CI: 64)
        "3": {"preset": "Cross-Init", "steps": 320, "learning_rate": 0.005, "batch_size": 8, "reg_weight": 1e-05,
              "resolution": 0},
        "4": {"name": "my-identity"},
        "8": {"width": 512, "height": 512},
        "9": {"steps": 20},
        "11": {"filename_prefix": "identity_tokens"},
    },
    "face_identity": {
        "1": {"ckpt_name": CHECKPOINT},
        "2": {"image": "photo_1.jpg"},
        "3": {"image": "photo_2.jpg"},
        "4": {"image": "photo_3.jpg"},
        "6": {"size": 512},  # the training resolution; CI trains the tiny model at 64
        "8": {"preset": "Cross-Init", "steps": 320, "learning_rate": 0.005, "batch_size": 8, "reg_weight": 1e-05,
              "resolution": 0},
        "11": {"name": "my-face"},
        "14": {"width": 512, "height": 512},
        "15": {"steps": 20},
        "17": {"filename_prefix": "identity_tokens_face"},
    },
    "two_identities": {
        "1": {"ckpt_name": CHECKPOINT},
        "6": {"width": 512, "height": 512},
        "7": {"steps": 20},
    },
    # CI writes a random full-size ViT-L/14 and a tiny encoder for it (tests/test_encoder_workflow.py)
    "encoder_identity": ENCODER_VALUES,
    "encoder_init_train": {
        **ENCODER_VALUES,
        "12": {"preset": "Cross-Init fast", "steps": 25, "learning_rate": 0.005, "batch_size": 8, "reg_weight": 1e-05,
               "resolution": 0},
        "15": {"steps": 20},
        "17": {"filename_prefix": "identity_tokens_encoder_trained"},
    },
}
NAMES = sorted(path.name.removesuffix(".json") for path in EXAMPLES.glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    """A JSON file."""
    return json.loads(path.read_text())


def twin(name: str) -> dict[str, Any]:
    """The API-format twin of an example workflow."""
    return load(TWINS / f"{name}.api.json")


def as_ci_prompt(name: str, prompt: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """A converted example made comparable with its twin: CI values put back, unset optional defaults and titles dropped."""
    expected = twin(name)
    result: dict[str, Any] = {}
    for node_id, entry in prompt.items():
        inputs = dict(entry["inputs"])
        for key, user_value in USER_VALUES.get(name, {}).get(node_id, {}).items():
            assert inputs.get(key) == user_value, (
                f"{name} node {node_id} {key}: {inputs.get(key)!r}, not {user_value!r}"
            )
            inputs[key] = expected[node_id]["inputs"][key]
        optional = object_info[entry["class_type"]]["input"].get("optional", {})
        for key, spec in optional.items():  # the frontend sends optional widgets the twin may leave to their default
            options = spec[1] if len(spec) > 1 else {}
            if key in inputs and key not in expected.get(node_id, {}).get("inputs", {}):
                if inputs[key] == options.get("default"):
                    del inputs[key]
        result[node_id] = {"class_type": entry["class_type"], "inputs": inputs}
    return result


@pytest.fixture(scope="module")
def object_info(comfy_server: ComfyServer) -> dict[str, Any]:
    """/object_info of the session's ComfyUI server (tests/conftest_comfy.py): ComfyUI's nodes and this pack's."""
    return comfy_server.object_info()


def test_every_example_has_an_api_twin() -> None:
    twins = sorted(path.name.removesuffix(".api.json") for path in TWINS.glob("*.api.json"))
    assert NAMES and NAMES == twins
    assert set(USER_VALUES) <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_example_is_sound_ui_format(name: str) -> None:
    ui = load(EXAMPLES / f"{name}.json")
    assert check_ui_format(ui) == []
    notes = [node for node in ui["nodes"] if node["type"] == "Note"]
    assert notes and all(isinstance(n["widgets_values"][0], str) and n["widgets_values"][0].strip() for n in notes)
    assert "checkpoint" in notes[0]["widgets_values"][0].lower()


def test_training_example_collects_several_photos() -> None:
    """Train Identity Token's images come from Collect Photos fed by three Load Image nodes with different photos."""
    ui = load(EXAMPLES / "train_save_sample.json")
    nodes, links = {node["id"]: node for node in ui["nodes"]}, links_by_id(ui)

    def feeders(node: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """{input name: the node its link comes from} for the linked inputs of a node."""
        return {s["name"]: nodes[links[s["link"]][1]] for s in node["inputs"] if s.get("link") is not None}

    (train,) = [node for node in ui["nodes"] if node["type"] == "IdentityTokens_TrainIdentityToken"]
    collect = feeders(train)["images"]
    assert collect["type"] == "IdentityTokens_CollectPhotos"
    loaders = feeders(collect)
    assert sorted(loaders) == ["photo_1", "photo_2", "photo_3"] and {n["type"] for n in loaders.values()} == {"LoadImage"}
    assert len({n["widgets_values"][0] for n in loaders.values()}) == 3
    ci = twin("train_save_sample")
    ci_images = [ci[ref[0]]["inputs"]["image"] for ref in ci[ci["3"]["inputs"]["images"][0]]["inputs"].values()]
    assert sorted(ci_images) == ["astronaut.png", "chelsea.png", "coffee.png"]
    note = next(node for node in ui["nodes"] if node["type"] == "Note")["widgets_values"][0]
    assert "Collect Photos" in note and "any sizes" in note and "native size" in note


@pytest.mark.parametrize("name", ["encoder_identity", "encoder_init_train"])
def test_encoder_examples_feed_encoder_customize(name: str) -> None:
    """Encoder Customize gets its encoder, vision tower and photo from loaders, its identity goes to Apply Identity
    (and, in encoder_init_train, to Train Identity Token's init with Cross-Init fast's 25 steps); the note says where
    an encoder comes from."""
    ui = load(EXAMPLES / f"{name}.json")
    nodes, links = {node["id"]: node for node in ui["nodes"]}, links_by_id(ui)
    (customize,) = [node for node in ui["nodes"] if node["type"] == "IdentityTokens_EncoderCustomize"]
    feeders = {s["name"]: nodes[links[s["link"]][1]]["type"] for s in customize["inputs"] if s.get("link") is not None}
    assert feeders == {"images": "LoadImage", "encoder": "IdentityTokens_EncoderLoader",
                       "clip_vision": "CLIPVisionLoader", "clip": "CheckpointLoaderSimple"}
    fed = {(nodes[link[3]]["type"], nodes[link[3]]["inputs"][link[4]]["name"]) for link in links.values()
           if link[1] == customize["id"]}
    trains = [node for node in ui["nodes"] if node["type"] == "IdentityTokens_TrainIdentityToken"]
    assert ("IdentityTokens_ApplyIdentity", "identity") in fed
    assert (("IdentityTokens_TrainIdentityToken", "init") in fed) == (name == "encoder_init_train") == bool(trains)
    for train in trains:
        assert train["widgets_values"][:2] == ["Cross-Init fast", 25]
    note = next(node for node in ui["nodes"] if node["type"] == "Note")["widgets_values"][0]
    assert "python -m core train-encoder" in note and "models/identity_encoders" in note and "no encoder ships" in note


@pytest.mark.parametrize("name", NAMES)
def test_example_matches_object_info(name: str, object_info: dict[str, Any]) -> None:
    assert check_ui_format(load(EXAMPLES / f"{name}.json"), object_info) == []


@pytest.mark.parametrize("name", NAMES)
def test_example_converts_to_its_api_twin(name: str, object_info: dict[str, Any]) -> None:
    prompt = ui_to_api(load(EXAMPLES / f"{name}.json"), object_info)
    assert as_ci_prompt(name, prompt, object_info) == {
        node_id: {"class_type": entry["class_type"], "inputs": entry["inputs"]} for node_id, entry in twin(name).items()
    }


# The converter on its own, with a hand-written object_info (no server needed).
TOY_INFO: dict[str, Any] = {
    "Source": {"input": {"required": {}}, "output": ["NUMBER"], "output_name": ["NUMBER"]},
    "Sink": {
        "input": {
            "required": {
                "seed": ["INT", {"default": 0}],
                "mode": [["a", "b"]],
                "image": [["x.png"], {"image_upload": True}],
                "value": ["INT", {"default": 1}],
            },
            "optional": {"extra": ["FLOAT", {"default": 0.5}], "other": ["NUMBER"]},
        },
        "output": [],
        "output_name": [],
    },
}


def toy(widgets: list[Any] | dict[str, Any], link_value: bool) -> dict[str, Any]:
    """A Source -> Reroute -> Sink graph; the link goes to Sink's widget 'value' or to its socket 'other'."""
    target = "value" if link_value else "other"
    sink_inputs = [{"name": target, "type": "NUMBER", "link": 2}]
    if link_value:
        sink_inputs[0]["widget"] = {"name": "value"}
    return {
        "last_node_id": 4,
        "last_link_id": 2,
        "nodes": [
            {
                "id": 1,
                "type": "Source",
                "outputs": [{"name": "NUMBER", "type": "NUMBER", "links": [1], "slot_index": 0}],
            },
            {
                "id": 2,
                "type": "Reroute",
                "inputs": [{"name": "", "type": "*", "link": 1}],
                "outputs": [{"name": "", "type": "NUMBER", "links": [2]}],
            },
            {"id": 3, "type": "Sink", "inputs": sink_inputs, "outputs": [], "widgets_values": widgets},
            {"id": 4, "type": "Note", "widgets_values": ["hello"]},
        ],
        "links": [[1, 1, 0, 2, 0, "NUMBER"], [2, 2, 0, 3, 0, "NUMBER"]],
        "version": 0.4,
    }


def test_converter_skips_seed_control_and_upload_values_and_follows_reroutes() -> None:
    prompt = ui_to_api(toy([7, "fixed", "b", "x.png", "image", 3, 0.25], link_value=False), TOY_INFO)
    assert prompt == {
        "1": {"class_type": "Source", "inputs": {}},
        "3": {
            "class_type": "Sink",
            "inputs": {"seed": 7, "mode": "b", "image": "x.png", "value": 3, "extra": 0.25, "other": ["1", 0]},
        },
    }


def test_converter_lets_a_link_replace_a_widget_and_reads_old_files() -> None:
    # No control or upload values (an older frontend), no value for the optional widget (a file that predates it).
    prompt = ui_to_api(toy([7, "b", "x.png", 3], link_value=True), TOY_INFO)
    assert prompt["3"]["inputs"] == {"seed": 7, "mode": "b", "image": "x.png", "value": ["1", 0]}


def test_converter_reads_the_2023_boolean_seed_control() -> None:
    prompt = ui_to_api(toy([7, True, "b", "x.png", "image", 3], link_value=False), TOY_INFO)
    assert prompt["3"]["inputs"] == {"seed": 7, "mode": "b", "image": "x.png", "value": 3, "other": ["1", 0]}


def test_converter_reads_widgets_saved_by_name() -> None:
    prompt = ui_to_api(toy({"seed": 1, "mode": "a", "image": "x.png", "value": 2}, link_value=False), TOY_INFO)
    assert prompt["3"]["inputs"] == {"seed": 1, "mode": "a", "image": "x.png", "value": 2, "other": ["1", 0]}


def test_converter_rejects_leftover_widget_values() -> None:
    with pytest.raises(ValueError, match="widget values"):
        ui_to_api(toy([7, "fixed", "b", "x.png", "image", 3, 0.25, "surplus"], link_value=False), TOY_INFO)


def test_format_check_finds_broken_links() -> None:
    ui = toy([7, "b", "x.png", 3], link_value=False)
    ui["nodes"][0]["outputs"][0]["links"] = []
    ui["links"][1][5] = "FLOAT"
    problems = check_ui_format(ui)
    assert any("not listed in node 1" in p for p in problems) and any("type FLOAT" in p for p in problems)


def test_ordered_inputs_follows_input_order() -> None:
    info = {"input": {"required": {"b": ["INT"], "a": ["INT"]}}, "input_order": {"required": ["a", "b"]}}
    assert [name for name, _ in ordered_inputs(info)] == ["a", "b"]
