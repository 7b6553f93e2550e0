"""One model per process, shared by every caller: the CLI, napari, Label Studio, FiftyOne and the Ray actors.

    model = get_model("demo", "cpu")     # loaded once; the same object for the same arguments
    cached("demo", "cpu")                # that model, or None if it would have to be loaded
    clear()                              # forget it
"""

from __future__ import annotations

import threading
import warnings

from .engine import SegGPT
from .loading import DefaultModelWarning, resolve_source
from .vocabulary import AUTO_MODEL

_cache_lock = threading.Lock()
_cache: dict[tuple, SegGPT] = {}


def _cache_key(source, device, dtype, quantize=None) -> tuple:
    return resolve_source(source), str(device or "auto"), str(dtype or "auto"), str(quantize or "none")


def cached(source=AUTO_MODEL, device=None, dtype=None, quantize=None) -> SegGPT | None:
    """The model `get_model` holds for these arguments, or None if it must be loaded first."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DefaultModelWarning)
        return _cache.get(_cache_key(source, device, dtype, quantize))


def get_model(source=AUTO_MODEL, device=None, dtype=None, quantize=None) -> SegGPT:
    """A SegGPT for (source, device, dtype, quantize), loaded once per process and shared by every caller.
    Only the latest model stays loaded (ViT-L weighs 1.5 GB): asking for another one frees the previous one."""
    key = _cache_key(source, device, dtype, quantize)
    with _cache_lock:
        model = _cache.get(key)
        if model is None:
            _cache.clear()
            model = _cache[key] = SegGPT.from_pretrained(key[0], device=None if key[1] == "auto" else key[1],
                                                         dtype=None if key[2] == "auto" else key[2],
                                                         quantize=None if key[3] == "none" else key[3])
        return model


def clear() -> None:
    """Forget the cached model (its memory is freed once no caller holds it)."""
    with _cache_lock:
        _cache.clear()
