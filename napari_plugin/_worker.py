"""The body of the widget's worker thread: load the model (reporting as it goes), then run the action.

Everything the user should see comes back as messages for `SegGPTWidget._on_yielded`, not as terminal
output: the model being loaded and for how long, megabytes downloaded from the Hugging Face hub,
notes such as "using the small demo model", each result, and errors of bad input as one line.
"""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from seggpt_plugins import loading, model_cache

LOAD_POLL_SECONDS = 0.5  # how often the widget hears from a model that is still loading


def hub_blobs(source: str) -> Path | None:
    """The Hugging Face cache folder that a hub id's files are downloaded into (None: not a hub id)."""
    if Path(source).expanduser().exists() or source.count("/") != 1 or source.startswith((".", "/", "~")):
        return None
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / f"models--{source.replace('/', '--')}" / "blobs"


def cached_bytes(folder: Path | None) -> int:
    """Bytes in `folder` (complete and partial downloads); 0 when it does not exist."""
    if folder is None or not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _load(source: str, device: str, options: dict) -> Iterator:
    """Load the model in a helper thread; yield ("loading", source, seconds, bytes downloaded) meanwhile.
    Returns the model (`yield from` gives it)."""
    box: dict[str, Any] = {}

    def load():
        try:
            box["model"] = model_cache.get_model(source, device, **options)
        except BaseException as exc:  # handed to the worker thread
            box["error"] = exc

    folder = hub_blobs(source)
    before = cached_bytes(folder)
    started = time.monotonic()
    thread = threading.Thread(target=load, name="seggpt-model-load", daemon=True)
    thread.start()
    yield ("loading", source, 0.0, 0)
    while True:
        thread.join(LOAD_POLL_SECONDS)
        if not thread.is_alive():
            break
        yield ("loading", source, time.monotonic() - started, max(0, cached_bytes(folder) - before))
    if "error" in box:
        raise box["error"]
    return box["model"]


def load_and_work(model_source, device: str, work: Callable[[Any, Callable | None], Iterator],
                  precision: str = "auto", report: Callable | None = None):
    """Worker body (runs in a thread): load the model once (at `precision`: vocabulary.PRECISIONS; a SegGPT
    given as `model_source`, the widget's adapted one, is used as it is), then yield one result per plane;
    `work` calls `report` with the progress inside a plane (its tiles, or the steps of adapting), from
    whichever thread the core works in: `report` must be safe to call from any thread (a Qt signal).

    Yields ("note", text) for warnings (e.g. the demo model stands in for the real one), ("loading",
    source, seconds, bytes) while the model loads, ("running", device, model fingerprint), ("result", *what
    `work` yields) per plane, or ("error", message) for a SegGPTError.
    """
    from seggpt_plugins import SegGPTError

    try:
        options = loading.precision_options(precision)
        model = (model_cache.cached(model_source, device, **options) if isinstance(model_source, str)
                 else model_source)
        if model is None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", loading.DefaultModelWarning)
                resolved = loading.resolve_source(model_source)  # what "auto" stands for here
            for warning in caught:
                yield ("note", str(warning.message))
            model = yield from _load(resolved, device, options)
        yield ("running", str(model.device), model.fingerprint)
        for item in work(model, report):
            yield ("result", *item)
    except SegGPTError as exc:  # bad input or an unusable model source: a message, not a traceback
        yield ("error", str(exc))
