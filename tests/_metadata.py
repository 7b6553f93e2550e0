"""Importing fiftyone next to napari's pytest plugin."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def standard_metadata_finder():
    """Put the standard library's `find_distributions` back on PathFinder for the duration.

    napari's pytest plugin imports `importlib_metadata`, which takes `find_distributions` off the
    standard library's PathFinder so that its own finder answers; its metadata objects raise KeyError
    for a missing field where the standard library returns None, and `eta` (a fiftyone dependency)
    reads the absent 'author' field of its own metadata at import.
    """
    from importlib.machinery import PathFinder

    patched = not hasattr(PathFinder, "find_distributions")
    if patched:
        import importlib.metadata as stdlib_metadata

        PathFinder.find_distributions = staticmethod(stdlib_metadata.MetadataPathFinder.find_distributions)
    try:
        yield
    finally:
        if patched:
            del PathFinder.find_distributions
