"""Errors the pack shows to users: each message names the input, what was wrong, and the fix."""


class InputError(ValueError):
    """Bad user input (images, files, options); the message names the input and the fix."""
