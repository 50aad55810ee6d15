"""Identity Tokens core: train and save identity embeddings without ComfyUI."""

__version__ = "0.1.0"
