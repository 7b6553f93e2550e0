"""Errors the core raises for bad input: each message names what was wrong and what was expected."""


class SegGPTError(Exception):
    """Base class of the errors this package raises on purpose."""


class InputError(SegGPTError, ValueError):
    """An image, mask, prompt or path given by the caller is unusable."""


class ModelSourceError(SegGPTError, OSError):
    """A model source (hub id, directory, checkpoint) could not be loaded."""
