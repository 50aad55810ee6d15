"""Zero fine-tuning identities: an image encoder (a frozen CLIP vision tower and a small trained mapper) that turns
photos into an Identity in one forward pass, its file format, and its training (`python -m core train-encoder`)."""
