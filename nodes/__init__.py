"""ComfyUI node classes; each wraps a core function. The node set is being built (see the open nodes issue)."""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
