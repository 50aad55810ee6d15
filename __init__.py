"""ComfyUI entry point for Identity Tokens: V1 node registration (NODE_CLASS_MAPPINGS) and the web folder."""

if __package__:  # ComfyUI imports the pack folder as a package
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # imported as a bare module (pytest collecting a clone whose folder name is not an identifier): nothing to register
    NODE_CLASS_MAPPINGS: dict[str, type] = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
