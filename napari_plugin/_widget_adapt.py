"""The SegGPT dock widget's "Adapt to my labels" (a part of `SegGPTWidget`, `_widget.py`): the Qt wiring that
fine-tunes a copy of the model in use on the annotated planes in a napari `thread_worker`, with progress per
step and the same Cancel; when it beats the model on its held-out corner the widget keeps it in memory and
the next runs use it, until "Use the shipped model" or a change of the Model field; "Save adapted model…"
writes it as a model folder. What needs no Qt is in `_runs.py` (`AdaptState`, `save_adapted`) and
`_actions.py` (the examples).
"""

from __future__ import annotations

import logging
from pathlib import Path

from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info, show_warning

from ._actions import Actions, UserError
from ._runs import AdaptState, loading_text, save_adapted
from ._worker import load_and_work

log = logging.getLogger(__name__)


class AdaptControls:
    """`SegGPTWidget`'s adapting (a mixin: the form, the worker and the state are the widget's)."""

    def _model_in_use(self):
        """What the runs load: the adapted SegGPT, else the Model field's source."""
        return self._adapted if self._adapted is not None else self._model.value

    def _model_name(self) -> str:
        return "the adapted model" if self._adapted is not None else f"'{self._model.value}'"

    def adapt_model(self, _=None):
        """Fine-tune a copy of the model in use on the annotated examples (the core's `SegGPT.adapt`) in a
        worker, for at most the form's seconds; when it beats that model on its held-out corner, the next
        runs use it. Cancel stops it after the step in flight and keeps the model in use."""
        if self._busy():
            return
        try:
            examples, what = Actions(self.viewer, self._form_values()).adapt_examples()
        except UserError as exc:
            self._report(exc)
            return
        state = AdaptState(what, self._model_name(), float(self._adapt_time.value))
        work = state.work(examples, self.adapt_steps, self.adapt_settings)

        def report(p):  # from the worker thread, per step: a Qt signal hands it to this thread
            worker.yielded.emit(("adapt", p))

        worker = thread_worker(load_and_work, start_thread=False)(self._model_in_use(), self._device.value, work,
                                                                  self._precision.value, report)
        worker.yielded.connect(self._on_adapt_yielded)
        worker.finished.connect(self._on_adapt_finished)
        self._active, self._worker = state, worker
        self._set_running(True)
        self._progress.max, self._progress.value = 1000, 0
        self._set_status(f"Starting: adapting {state.model} to {what}…")
        log.info("SegGPT adapt: %s to %s", state.model, what)
        worker.start()

    def _on_adapt_yielded(self, message):
        state = self._active
        if not isinstance(state, AdaptState) or self._closed:
            return
        kind = message[0]
        if kind == "note":
            show_warning(message[1])
        elif kind == "loading":
            self._progress.max = 0  # busy indicator while the model loads
            if not state.cancelled:
                self._set_status(loading_text(*message[1:]))
        elif kind == "adapt":
            value, line = state.progress(message[1])
            self._progress.max, self._progress.value = 1000, value
            if not state.cancelled:
                self._set_status(line)
        elif kind == "result" and not state.cancelled:
            state.adapted = message[1]
        elif kind == "error":
            state.error = message[1]
            show_error(message[1])

    def _on_adapt_finished(self):
        state, self._worker, self._active = self._active, None, None
        if not isinstance(state, AdaptState) or self._closed:
            return
        used = state.used()
        if used:
            self._adapted = state.adapted
        self._set_running(False)
        message = state.end_message()
        self.last_adapt = state.summary(used)
        self._set_status(message)
        if state.error is None:
            show_info(message)

    def use_shipped_model(self, _=None):
        """Drop the adapted model: the next runs use the model the Model field names."""
        if self._busy() or self._adapted is None:
            return
        self._adapted = None
        self._set_running(False)
        self._set_status(f"Back to '{self._model.value}': the next runs use it (the adapted model was dropped).")

    def _on_model_changed(self, _value=None):
        if self._adapted is not None and self._worker is None:
            self._adapted = None
            self._set_running(False)
            self._set_status(f"Model changed: the next runs use '{self._model.value}', not the adapted model.")

    def save_adapted_model(self, _=None, folder=None) -> Path | None:
        """Write the adapted model into an empty or new folder (`SegGPT.save_pretrained`), which any Model
        field or `--model` loads."""
        try:
            if self._adapted is None:
                raise UserError("No adapted model to save: press 'Adapt to my labels' first.")
            if folder is None:
                from qtpy.QtWidgets import QFileDialog

                folder = QFileDialog.getExistingDirectory(self.native, "Save the adapted model into this (empty) "
                                                                       "folder")
                if not folder:
                    return None
            path, message = save_adapted(self._adapted, folder)
        except UserError as exc:
            self._report(exc)
            return None
        self._set_status(message)
        show_info(message)
        return path
