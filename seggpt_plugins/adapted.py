"""Adapted models for the host apps: where they are kept and listed, how a run is told in one line and as a
fraction, and `adapt` in a helper thread for hosts whose progress is a generator (FiftyOne)."""

from __future__ import annotations

import os
from pathlib import Path

from .adapt import AdaptProgress


def adapted_models_dir() -> Path:
    """Where the host apps keep the models they adapt: $SEGGPT_ADAPTED_DIR, else
    $XDG_CACHE_HOME (or ~/.cache)/seggpt-plugins/adapted."""
    from .vocabulary import ADAPTED_ENV

    configured = os.environ.get(ADAPTED_ENV, "").strip()
    if configured:
        return Path(configured).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(cache).expanduser() / "seggpt-plugins" / "adapted"


def adapted_models(folder=None) -> list[tuple[Path, dict]]:
    """(model directory, its adaptation.json) of the adapted models saved in `folder` (default:
    `adapted_models_dir()`), newest first; unreadable ones are skipped."""
    import json

    folder = Path(folder) if folder is not None else adapted_models_dir()
    found = []
    for path in folder.iterdir() if folder.is_dir() else []:
        try:
            info = json.loads((path / "adaptation.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and (path / "config.json").is_file():
            found.append((path, info, (path / "adaptation.json").stat().st_mtime))
    return [(path, info) for path, info, _ in sorted(found, key=lambda f: -f[2])]


def summary_line(adaptation: dict, examples: str) -> str:
    """How an adaptation went, in one line for people: 'Adapted to 2 examples in 12 s (held-out IoU 0.70 ->
    0.75 at step 20 of 26, foreground margin 0.7 -> 0.5)', or that it did not beat the base model.
    `examples`: what was learnt from."""
    before, best = adaptation["held_out_iou_before"], adaptation["held_out_iou_best"]
    seconds = f"{adaptation['seconds']:.0f} s"
    if not adaptation["improved"]:
        return (f"Adapting to {examples} for {seconds} ({adaptation['steps']} steps) did not beat the model on the "
                f"held-out part (IoU {before:.2f})")
    weights = (f"at step {adaptation['best_step']} of {adaptation['steps']}" if adaptation["best_step"]
               else f"no step of {adaptation['steps']} beat the weights")
    margin, base = adaptation.get("foreground_margin"), adaptation.get("base_foreground_margin")
    margin = f", foreground margin {base:g} -> {margin:g}" if margin is not None and margin != base else ""
    return f"Adapted to {examples} in {seconds} (held-out IoU {before:.2f} -> {best:.2f} {weights}{margin})"


def progress_fraction(p: AdaptProgress, time_limit: float | None) -> float:
    """How far a run is, 0..1: its steps or its time, whichever is further."""
    done = p.step / p.steps if p.steps else 1.0
    if time_limit:
        done = max(done, p.seconds / time_limit)
    return min(1.0, done)


def adapt_steps(model, images, masks, **kwargs):
    """`model.adapt(images, masks, **kwargs)` in a helper thread, for hosts whose progress is a generator:
    yields its AdaptProgress reports; returns the adapted model (`yield from`); re-raises its error.
    A consumer that stops early should make `cancel` return True, so the thread ends soon."""
    import queue
    import threading

    reports: queue.Queue = queue.Queue()
    done = object()
    box: dict = {}

    def run():
        try:
            box["model"] = model.adapt(images, masks, progress=reports.put, **kwargs)
        except BaseException as exc:  # handed to the consumer's thread
            box["error"] = exc
        finally:
            reports.put(done)

    threading.Thread(target=run, name="seggpt-adapt", daemon=True).start()
    while True:
        item = reports.get()
        if item is done:
            break
        yield item
    if "error" in box:
        raise box["error"]
    return box["model"]
