"""Error types of the engine."""


class CheckpointError(Exception):
    """A checkpoint folder or hub id that cannot be loaded; the message names the file or tensor at fault."""
