"""ComfyUI node registration (V1 mappings, which both CI's March-2024 core and today's ComfyUI load)."""

from .encoder_nodes import NODE_CLASSES as ENCODER_NODE_CLASSES
from .face_nodes import NODE_CLASSES as FACE_NODE_CLASSES
from .identity_nodes import NODE_CLASSES as IDENTITY_NODE_CLASSES

NODE_CLASSES = {**IDENTITY_NODE_CLASSES, **FACE_NODE_CLASSES, **ENCODER_NODE_CLASSES}
NODE_CLASS_MAPPINGS: dict[str, type] = {node_id: cls for node_id, (cls, _) in NODE_CLASSES.items()}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {node_id: name for node_id, (_, name) in NODE_CLASSES.items()}
