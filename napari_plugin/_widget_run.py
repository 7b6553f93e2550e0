"""The SegGPT dock widget's runs (a part of `SegGPTWidget`, `_widget.py`): the Qt wiring that starts an
action (`_actions.py`) in a napari `thread_worker` (`_worker.py`: one result per plane), and on the UI
thread shows its messages as they arrive: the model loading, progress per plane (per tile for one large
tiled image), each result written into the output layers, errors, and the end. What needs no Qt is in
`_runs.py` (`RunState`, `open_outputs`, `loading_text`).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info, show_warning

from ._actions import Action, Actions, NothingToDo, UserError
from ._layers import PlaneKey
from ._runs import RunState, loading_text, open_outputs
from ._worker import load_and_work

log = logging.getLogger(__name__)


class RunControls:
    """`SegGPTWidget`'s runs (a mixin: the form, the worker and the state are the widget's)."""

    def _run(self, build: Callable[[Actions], Action]):
        """Start an action: `build` checks the input (UserError: a message; NothingToDo: information) and
        returns the action; its results go to the output layers, from a worker thread."""
        if self._busy():
            return
        try:
            action = build(Actions(self.viewer, self._form_values()))
        except UserError as exc:
            self._report(exc)
            return
        except NothingToDo as exc:
            show_info(str(exc))
            return
        results, confidences = open_outputs(self.viewer, action, self._proposal, self._confidence.value)
        self._active = self._proposal = RunState(action, results, confidences)
        self._update_review(self._active)

        def report(*tile):  # from the core's thread, per tile: a Qt signal hands it to this thread
            worker.yielded.emit(("tile", *tile))

        worker = thread_worker(load_and_work, start_thread=False)(self._model_in_use(), self._device.value,
                                                                  action.work, self._precision.value, report)
        worker.yielded.connect(self._on_yielded)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._set_running(True)
        self._progress.max = max(action.total, 1)
        self._progress.value = 0
        self._set_status(f"Starting: {action.what}{' with the adapted model' * (self._adapted is not None)}…")
        if action.note:
            show_info(action.note)
        log.info("SegGPT %s: %s", action.name, action.what)
        worker.start()

    def _set_running(self, running: bool):
        for button in (self._segment_btn, self._propagate_btn, self._targets_btn, self._accept_btn,
                       self._export_btn, self._series_btn, self._adapt_btn):
            button.enabled = not running
        self._cancel_btn.enabled = running
        self._unadapt_btn.enabled = self._save_model_btn.enabled = not running and self._adapted is not None

    def _on_yielded(self, message):
        run = self._active
        if run is None or self._closed:
            return
        kind = message[0]
        if kind == "note":
            show_warning(message[1])
        elif kind == "loading":
            _, source, seconds, downloaded = message
            self._progress.max = 0  # busy indicator while the model loads
            if not run.cancelled:
                self._set_status(loading_text(source, seconds, downloaded))
        elif kind == "running":
            self._progress.max = max(run.total, 1)
            self._progress.value = 0
            run.start_running()
            run.model = message[2]
            if not run.cancelled:
                self._set_status(f"Running on {message[1]}: 0 / {run.total} {run.action.units}")
        elif kind == "tile":
            _, _t, _key, done, tiles = message
            run.tile = (done, tiles)
            self._show_progress(run)
        elif kind == "result":
            _, t, key, pred = message
            self._write_result(run, t, key, pred)
        elif kind == "error":
            run.error = message[1]
            self._set_status(f"Failed: {message[1]}")
            show_error(message[1])

    def _write_result(self, run: RunState, t: int, key: PlaneKey, pred):
        run.record(t, key, pred)
        self._show_progress(run)
        if run.refresh_due():
            self._refresh_outputs(run)

    def _show_progress(self, run: RunState):
        value, maximum = run.progress()
        if self._progress.max != maximum:
            self._progress.max = maximum
        self._progress.value = value
        if not run.cancelled:
            self._set_status(run.progress_text())

    def _refresh_outputs(self, run: RunState):
        for layer in run.results + run.confidences:
            if layer is not None and layer in self.viewer.layers:
                layer.refresh()
        self._update_review(run)

    def _on_finished(self):
        run, self._worker, self._active = self._active, None, None
        if run is None or self._closed:
            return
        self._refresh_outputs(run)
        seconds = time.monotonic() - run.started
        self.last_run = run.summary(seconds)
        self._set_running(False)
        if run.error is not None:
            return
        self._set_status(run.end_message(seconds) + " (adapted model)" * (self._adapted is not None))
