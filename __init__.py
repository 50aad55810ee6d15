"""Identity Tokens: the ComfyUI entry point (V1 node registration and the web folder) and the installed package.

ComfyUI loads this folder from custom_nodes as a package; `pip install .` installs the same folder as the package
`identity_tokens`, whose engine `identity_tokens.core` must import without ComfyUI. So the node mappings are read
lazily (PEP 562): ComfyUI's loader reads them with hasattr/getattr right after importing the pack, which imports
`.nodes` then, while `import identity_tokens.core` (the command line, batch jobs) never touches the ComfyUI layer.
"""

from __future__ import annotations

import importlib
from typing import Any

WEB_DIRECTORY = "./web"

_NODE_MAPPINGS = ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS")

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

if __package__:  # imported as a package: by ComfyUI (any folder name), or as the installed `identity_tokens`

    def __getattr__(name: str) -> Any:
        """Import the ComfyUI layer on first use of NODE_CLASS_MAPPINGS or NODE_DISPLAY_NAME_MAPPINGS."""
        if name not in _NODE_MAPPINGS:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        try:
            nodes = importlib.import_module(".nodes", __name__)
        except AttributeError as error:  # hasattr() would swallow it and ComfyUI would skip the pack silently
            raise ImportError(f"Identity Tokens: importing the nodes failed: {error!r}") from error
        mappings = {key: getattr(nodes, key) for key in _NODE_MAPPINGS}
        globals().update(mappings)  # later reads are plain attributes
        return mappings[name]

    def __dir__() -> list[str]:
        return sorted({*globals(), *_NODE_MAPPINGS})

else:  # imported as a bare module (pytest collecting a clone whose folder name is not an identifier): nothing to register
    NODE_CLASS_MAPPINGS: dict[str, type] = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
