"""The likeness lab: a procedural world, a small text-to-image model pretrained on it, and its evaluation."""
