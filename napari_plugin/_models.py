"""One SegGPT model kept in memory across runs (and across widgets): loading ViT-L takes seconds."""

from __future__ import annotations

import threading
from pathlib import Path

_lock = threading.Lock()
_cache: dict[tuple[str, str], object] = {}

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_source(text: str) -> str:
    """The model field as a source for SegGPT.from_pretrained: "demo", a hub id, or a local path.

    A `config.json` picked in the file dialog stands for its transformers directory.
    """
    text = (text or "").strip()
    if not text:
        return "demo"
    path = Path(text).expanduser()
    if path.name == "config.json" and path.is_file():
        return str(path.parent)
    if path.exists():
        return str(path)
    return text


def _key(source: str, device: str) -> tuple[str, str]:
    return resolve_source(source), device or "auto"


def cached(source: str, device: str):
    """The loaded model for (source, device), or None if it must be loaded first."""
    return _cache.get(_key(source, device))


def get_model(source: str, device: str):
    """Load (once) and return the model. Only the latest model stays cached: ViT-L weighs 1.5 GB."""
    key = _key(source, device)
    with _lock:
        model = _cache.get(key)
        if model is None:
            from seggpt_plugins import SegGPT

            model = SegGPT.from_pretrained(key[0], device=None if key[1] == "auto" else key[1])
            _cache.clear()
            _cache[key] = model
        return model


def clear() -> None:
    with _lock:
        _cache.clear()
