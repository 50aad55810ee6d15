"""Errors the pack shows to users: each message names the input, what was wrong, and the fix."""


class InputError(ValueError):
    """Bad user input (images, files, options); the message names the input and the fix."""


class TrainingStopped(RuntimeError):
    """Training ended early (cancel, Ctrl-C, non-finite loss); carries the last good identity."""

    def __init__(self, message: str, identity: object | None = None, partial_path: str | None = None) -> None:
        super().__init__(message)
        self.identity = identity
        self.partial_path = partial_path
