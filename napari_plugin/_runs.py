"""A run of the widget without Qt: its state as the worker's messages arrive, and what comes after it.

`RunState` is a run as the UI thread sees it (results written into its output layers, progress, the
status lines); after it ends it holds the proposals Accept and Review work on. Around it:
`open_outputs` (the run's output layers, emptied), `review_rows` (least confident first),
`accept` (the last run's shown proposals into each target's own Labels layer, every check before any
write, one undo step per layer) and `export_sets` (what Export writes). `AdaptState` is an 'Adapt to my
labels' run (`work`: the core's adapt in the worker); `save_adapted` writes its model. `series_message`:
the status line of an opened folder of images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from seggpt_plugins.errors import InputError

from ._actions import Action, UserError, fmt_shape, plural
from ._export import LabelSet
from ._layers import (LABELS_SUFFIX, PlaneKey, add_own_labels, label_set, output_layers, own_labels, plane_name,
                      plane_word)
from ._stack import accept_indices, level0, worst_first

REFRESH_SECONDS = 0.3  # redraw the result layer at most this often while a run writes into it


@dataclass
class RunState:
    """A run, as the UI thread sees it through the worker's messages; after it ends, its proposals."""

    action: Action
    results: list  # Labels: one per target
    confidences: list  # Image or None: one per target
    started: float = field(default_factory=time.monotonic)
    running_since: float | None = None  # when the model was ready
    done: int = 0
    cancelled: bool = False
    error: str | None = None
    last_refresh: float = 0.0
    keys: list = field(default_factory=list)  # (target, plane key) of each proposal, in order
    scores: list = field(default_factory=list)  # ((target, plane key), Prediction.confidence)
    tile: tuple | None = None  # (tiles done, tiles) of the plane in progress, when it is tiled
    stopped: tuple | None = None  # ("result" or "image", layer name): a layer of the run was removed during it
    lost: list = field(default_factory=list)  # its result layers removed during the run
    model: str | None = None  # the fingerprint of the model's weights, once it runs

    @property
    def total(self) -> int:
        return self.action.total

    def keys_of(self, target: int) -> list[PlaneKey]:
        return [key for t, key in self.keys if t == target]

    def start_running(self) -> None:
        """The model is ready: progress is timed from now."""
        self.running_since = time.monotonic()

    def record(self, t: int, key: PlaneKey, pred) -> None:
        """One result: its labels (and scores) into target t's output layers at plane `key`."""
        self.results[t].data[key] = pred.labels
        if self.confidences[t] is not None:
            self.confidences[t].data[key] = pred.scores
        self.done += 1
        self.tile = None
        self.keys.append((t, key))
        self.scores.append(((t, key), float(pred.confidence)))

    def progress_text(self) -> str:
        """'3 / 10 slices · 0.52 s per slice · about 4 s left', with the tile of a tiled plane in progress."""
        elapsed = time.monotonic() - (self.running_since or self.started)
        unit = self.action.unit
        status = f"{self.done} / {self.total} {self.action.units}"
        left = None
        if self.done:
            per = elapsed / self.done
            status += f" · {per:.2f} s per {unit}"
            left = per * (self.total - self.done)
        if self.tile is not None:
            done, tiles = self.tile
            status += f" · tile {done} of {tiles}"
            if self.total == 1:
                left = elapsed / done * (tiles - done)
        if left is not None and self.done < self.total:
            status += f" · about {left:.0f} s left"
        return status

    def progress(self) -> tuple[int, int]:
        """(value, maximum) of the progress bar: results, or the tiles of a run of one tiled plane."""
        if self.tile is not None and self.total == 1:
            return self.tile[0], self.tile[1]
        return min(self.done, max(self.total, 1)), max(self.total, 1)

    def removed(self, layer) -> str | None:
        """`layer` left the viewer: when it is one of the run's result layers or target images, the run must
        stop; returns the status line that says so (None: the run goes on)."""
        if any(layer == r for r in self.results):  # == : the widget's viewer hands out proxies of layers
            self.lost.append(layer)
            self.stopped = self.stopped or ("result", layer.name)
            return f"Cancelling: '{layer.name}' was removed during the run…"
        if any(layer == target.image for target in self.action.targets):
            self.stopped = self.stopped or ("image", layer.name)
            return f"Cancelling: image '{layer.name}' was removed during the run…"
        return None

    def refresh_due(self) -> bool:
        """Whether the output layers should be redrawn now (at most every REFRESH_SECONDS)."""
        now = time.monotonic()
        if now - self.last_refresh >= REFRESH_SECONDS:
            self.last_refresh = now
            return True
        return False

    def summary(self, seconds: float) -> dict:
        """The widget's `last_run` (for scripts and tests)."""
        return dict(kind=self.action.name, done=self.done, total=self.total, cancelled=self.cancelled,
                    error=self.error, seconds=seconds, result=self.results[0].name,
                    results=[r.name for r in self.results], keys=[key for _, key in self.keys],
                    confidence=[score for _, score in self.scores], model=self.model)

    def end_message(self, seconds: float) -> str:
        names = ", ".join(f"'{r.name}'" for r in self.results)
        shown = ", ".join(f"'{r.name}'" for r in self.results if not any(r == gone for gone in self.lost))
        done = plural(self.done, self.action.unit)
        if self.stopped and self.stopped[0] == "result":
            message = (f"Cancelled: '{self.stopped[1]}' was removed during the run, and the proposals of the {done} "
                       "done with it; run again to get them.")
        elif self.stopped:
            message = f"Cancelled: image '{self.stopped[1]}' was removed during the run" + (
                f"; the proposals of the {done} done stay in {shown}." if shown else ".")
        elif self.cancelled:
            message = f"Cancelled: {self.done} of {self.total} {self.action.units} done (kept in {names})."
        else:
            message = f"Done: {plural(self.done, self.action.unit)} in {seconds:.1f} s → {names}."
        if self.action.note:
            message += " " + self.action.note
        return message


@dataclass
class AdaptState:
    """An 'Adapt to my labels' run, as the UI thread sees it: the core's progress reports, cancel, the result."""

    what: str  # what it learns from: '1 annotated slice'
    model: str  # the model it starts from, for people
    time_limit: float
    started: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    error: str | None = None
    adapted: object = None  # the adapted SegGPT, once it came back (not when cancelled)

    def removed(self, layer) -> None:
        """Layers leaving the viewer do not stop it: the examples were read when it started."""
        return None

    def work(self, examples, steps: int, settings):
        """The worker's work (`_worker.load_and_work`): the core's `SegGPT.adapt` on `examples`, for at most
        `time_limit` seconds and `steps` steps, stopped after the step in flight once `cancelled`."""

        def work(model, report):
            yield (model.adapt(examples, None, time_limit=self.time_limit, steps=steps, settings=settings,
                               progress=report, cancel=lambda: self.cancelled),)

        return work

    def used(self) -> bool:
        """Whether the next runs use the adapted model: it came back, was not cancelled, and beat the old one."""
        return self.adapted is not None and not self.cancelled and self.adapted.adaptation["improved"]

    def summary(self, used: bool) -> dict:
        """How it ended (the widget's `last_adapt`, for scripts and tests)."""
        return dict(what=self.what, cancelled=self.cancelled, error=self.error, used=used,
                    adaptation=getattr(self.adapted, "adaptation", None))

    def progress(self, p) -> tuple[int, str]:
        """(progress bar value of 1000, status line) for an adapt.AdaptProgress report."""
        from seggpt_plugins.adapted import progress_fraction

        line = f"Adapting to {self.what}: step {p.step} / {p.steps} · {p.seconds:.0f} of {self.time_limit:.0f} s"
        if p.best_iou is not None:
            line += f" · held-out IoU {p.best_iou:.2f}"
        return int(1000 * progress_fraction(p, self.time_limit)), line

    def end_message(self) -> str:
        """The status line when it ends (the next runs use the adapted model only when it beat the old one)."""
        from seggpt_plugins.adapted import summary_line

        if self.cancelled:
            return f"Adapting cancelled: the runs keep using {self.model}."
        if self.error:
            return f"Adapting failed: {self.error}"
        if self.adapted is None:
            return f"Adapting stopped: the runs keep using {self.model}."
        info = self.adapted.adaptation
        if not info["improved"]:
            return summary_line(info, self.what) + f": the runs keep using {self.model}."
        return summary_line(info, self.what) + (": the next runs use it ('Use the shipped model' goes back, 'Save "
                                                 "adapted model…' keeps it).")


def loading_text(source: str, seconds: float, downloaded: int) -> str:
    """The status line while the model loads."""
    status = f"Loading model '{source}' (first run only)…"
    if seconds:
        status += f" {seconds:.0f} s"
    if downloaded:
        status += f" · {downloaded / 1e6:.0f} MB downloaded"
    return status


def open_outputs(viewer, action: Action, previous: RunState | None, confidence: bool) -> tuple[list, list]:
    """The run's output layers, emptied: a run's proposals are its own. The last run's output layers
    that this run does not reuse are removed (their proposals can no longer be accepted)."""
    results, confidences = [], []
    for target in action.targets:
        result, scores = output_layers(viewer, target.image, action.examples, action.objects, confidence)
        for layer in (result, scores):
            if layer is not None:
                layer.data[...] = 0
                layer.visible = True
                layer.refresh()
        results.append(result)
        confidences.append(scores)
    kept = [layer for layer in results + confidences if layer is not None]
    if previous is not None:
        for layer in previous.results + previous.confidences:
            if layer is not None and layer not in kept and layer in viewer.layers:
                viewer.layers.remove(layer)
    return results, confidences


def review_rows(run: RunState) -> tuple[list, list]:
    """The run's planes, least confident first (Prediction.confidence): ((target, plane key) of each row,
    the Review list's (text, row) choices)."""
    rows = worst_first(run.scores)
    several = len(run.results) > 1
    choices = [(f"{score:.2f} · {plane_name(run.action.targets[t].image, key, several)}", k)
               for k, ((t, key), score) in enumerate(rows)]
    return [item for item, _ in rows], choices


# ------------------------------------------------------------------------------------------- accept


def accept(viewer, run: RunState | None) -> list[tuple]:
    """Copy the last run's proposals that are shown into each target's own Labels layer, only into planes
    still empty there; one undo step per layer. Returns (layer, planes written, image) per layer written;
    UserError, before any write, when a layer cannot take its proposals."""
    if run is None or not run.keys:
        raise UserError("Nothing to accept yet: run SegGPT first (its proposals appear in '<image> SegGPT').")
    shown = [t for t, result in enumerate(run.results)
             if result in viewer.layers and result.visible and run.keys_of(t)]
    if not shown:
        names = ", ".join(f"'{r.name}'" for r in run.results)
        raise UserError(f"Nothing shown to accept: the last run's proposals ({names}) are hidden or "
                        "removed. Show them to accept them.")
    plans = [(t, accept_plan(viewer, run, t)) for t in shown]  # every check before any write
    written = []
    for t, (dest, indices, values, planes) in plans:
        if planes == 0:
            continue
        image, result = run.action.targets[t].image, run.results[t]
        dest = dest if dest is not None else add_own_labels(viewer, image, result.data.dtype)
        with dest.block_history():  # one undo item, however many slices
            dest.data_setitem(indices, values.astype(dest.data.dtype, copy=False))
        result.visible = False  # what is shown now is the accepted labels
        written.append((dest, planes, image))
    return written


def accept_plan(viewer, run: RunState, t: int):
    """What Accept writes for target t: (Labels layer or None to create it, indices, values, planes).
    UserError when that layer cannot take the proposals."""
    target, result = run.action.targets[t], run.results[t]
    dest = target.labels if target.labels is not None and target.labels in viewer.layers else None
    if dest is None:
        dest = own_labels(viewer, target.image)
    data = np.asarray(result.data)
    if dest is None:
        return None, *accept_indices(data, np.zeros_like(data), run.keys_of(t))
    if not isinstance(dest.data, np.ndarray):
        raise UserError(f"Labels '{dest.name}' is not an in-memory array ({type(dest.data).__name__}); "
                        "Accept needs a layer napari can paint into.")
    if tuple(data.shape) != tuple(dest.data.shape):
        raise UserError(f"Shape mismatch: '{result.name}' is {fmt_shape(data.shape)} but Labels "
                        f"'{dest.name}' is {fmt_shape(dest.data.shape)}.")
    indices, values, planes = accept_indices(data, dest.data, run.keys_of(t))
    top = int(values.max()) if values.size else 0
    if np.issubdtype(dest.data.dtype, np.integer) and top > np.iinfo(dest.data.dtype).max:
        raise UserError(f"'{result.name}' holds ids up to {top}, more than Labels '{dest.name}' "
                        f"({dest.data.dtype}) can store. Convert that layer to a wider type (e.g. uint32) first.")
    return dest, indices, values, planes


def accepted_message(written: list[tuple]) -> str:
    into = ", ".join(f"{plural(planes, plane_word(image))} into '{dest.name}'" for dest, planes, image in written)
    return f"Accepted {into}. Undo (Ctrl+Z on that layer) takes them back in one step."


# ------------------------------------------------------------------------------------------- export


def export_sets(viewer, image, labels, accepted: dict) -> list[LabelSet]:
    """The examples layer (with its image) and the layers Accept wrote into (`accepted`: layer -> image)."""
    pairs = []
    if labels is not None:
        pairs.append((image, labels))
    for layer, source in accepted.items():
        if layer in viewer.layers and not any(layer == p[1] for p in pairs):
            pairs.append((source, layer))
    if not pairs or not any(np.any(np.asarray(level0(lab.data))) for _, lab in pairs):
        raise UserError("Nothing to export: the examples layer is empty and nothing was accepted yet.")
    return [label_set(source, layer) for source, layer in pairs]


def save_adapted(adapted, folder) -> tuple[Path, str]:
    """Write the adapted model into an empty or new folder (`SegGPT.save_pretrained`), which any Model field or
    `--model` loads: (the folder, the status line). UserError: a folder not empty, or the save failed."""
    path = Path(folder)
    if path.is_dir() and any(path.iterdir()):
        raise UserError(f"'{path}' is not empty: choose an empty or new folder for the adapted model.")
    try:
        adapted.save_pretrained(path)
    except InputError as exc:
        raise UserError(str(exc)) from None
    message = (f"Saved the adapted model to {path}: give that folder as Model (here, or --model of the seggpt "
               "commands) to use it again.")
    return path, message


def series_message(series, image) -> str:
    """The status line of a folder of images opened (`_series.read_series`, `image` its first layer)."""
    if series.stackable:
        name = series.folder.name
        return (f"Opened {plural(len(series.names), 'image')} of '{name}' as one stack: paint one or a few of "
                f"them in '{name}{LABELS_SUFFIX}', then 'Segment targets' segments the rest.")
    return (f"Opened {plural(len(series.names), 'image')} of different sizes as layers: paint "
            f"'{image.name}{LABELS_SUFFIX}', then 'Segment targets' segments the others.")
