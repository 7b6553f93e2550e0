"""The SegGPT dock widget: label one slice (or a few), let SegGPT propose the rest, review, accept, export.

This module is the Qt and magicgui wiring: the form's signals, the layer choices, the notifications, and
the napari `thread_worker` every action runs in (a generator that yields one result per plane), so the
viewer stays responsive, the progress bar advances plane by plane (tile by tile for one large tiled
image), and Cancel stops the run after the batch in flight; removing a layer the run writes into or
reads cancels it too. A run's proposals go to a Labels layer "<image> SegGPT" per target, cleared when the
run starts, so that it only ever holds that run's proposals. The user's Labels layers are only changed
by "Accept", one undo step per layer, and only with proposals of the last run that are shown.

The widget's runs (the worker started, its messages shown as they arrive) are in `_widget_run.py`, and
"Adapt to my labels" in `_widget_adapt.py`: the Qt wiring of `SegGPTWidget`, as mixins. The logic behind
them is Qt-free: `_actions.py` builds each button's `Action` (inputs read and checked, prompt planes
chosen, the work function); `_runs.py` holds a run's state and what follows it (output layers, Review rows,
Accept, export sets, the adapted model's work and saving). The controls and their layout are in
`_form.py`; the worker body in `_worker.py`; plane bookkeeping (pure numpy) in `_stack.py`; the layers it
reads and makes in `_layers.py`; image series in `_series.py`; export in `_export.py`.

"Adapt to my labels" fine-tunes a copy of the model in use on the annotated planes (the core's
`SegGPT.adapt`) in the same kind of worker, with progress per step and the same Cancel; when it beats the
model on its held-out corner, the widget keeps it in memory and the next runs use it, until "Use the
shipped model" or a change of the Model field; "Save adapted model…" writes it as a model folder.
"""

from __future__ import annotations

from pathlib import Path

from magicgui.widgets import Container
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info, show_warning
from psygnal import Signal

from seggpt_plugins import loading
from seggpt_plugins.errors import InputError

from ._actions import Actions, FormValues, UserError, axis_choices, plural
from ._export import export
from ._form import build_form
from ._layers import META_KEY, add_series, default_targets, go_to, image_kind, matching_labels, target_choices
from ._runs import AdaptState, RunState, accept, accepted_message, export_sets, review_rows, series_message
from ._series import read_series
from ._stack import spatial_shape
from ._widget_adapt import AdaptControls
from ._widget_run import RunControls


class SegGPTWidget(RunControls, AdaptControls, Container):
    """Dock widget: image + example labels in, SegGPT proposals out. Its runs are in `_widget_run.py`
    (`RunControls`), 'Adapt to my labels' in `_widget_adapt.py` (`AdaptControls`)."""

    status_changed = Signal(str)  # every status line shown under the progress bar

    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self._worker = None
        self._active: RunState | AdaptState | None = None  # the run (or adapting) in progress
        self._proposal: RunState | None = None  # the last run: what Accept and Review work on
        self._accepted: dict[Labels, Image] = {}  # the Labels layers Accept wrote into -> their images
        self.last_run: dict | None = None  # summary of the last finished run (for scripts and tests)
        self._deselected: set[int] = set()
        self._slice_items: list = []
        self._review_items: list = []  # (target, plane key) of each Review row
        self._watched_labels: Labels | None = None  # its painting (and undo) refreshes the annotated slices
        self._closed = False
        self._adapted = None  # the adapted SegGPT the runs use instead of the Model field's, or None
        self.adapt_steps = 300  # the step cap of 'Adapt to my labels' (the time limit is the form's)
        self.adapt_settings = None  # an adapt.AdaptSettings for the rest (None: the core's defaults)
        self.last_adapt: dict | None = None  # how the last 'Adapt to my labels' ended (for scripts and tests)
        build_form(self)  # self._image, self._labels, ... self._confidence

        from qtpy.QtCore import QTimer

        self._refresh_timer = QTimer(self.native)
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.setInterval(250)
        self._refresh_timer.timeout.connect(self._refresh_annotated)
        self._connect()
        self.reset_choices()
        self._on_image_changed()
        self._on_labels_changed()  # watch the initial choice's painting

    def _connect(self):
        self._image.changed.connect(self._on_image_changed)
        self._labels.changed.connect(self._on_labels_changed)
        self._axis.changed.connect(self._refresh_annotated)
        self._slices.changed.connect(self._on_slices_changed)
        self._segment_btn.changed.connect(self.segment_current)
        self._propagate_btn.changed.connect(self.propagate)
        self._targets_btn.changed.connect(self.segment_targets)
        self._cancel_btn.changed.connect(self.cancel)
        self._accept_btn.changed.connect(self.accept)
        self._export_btn.changed.connect(self.export_labels)
        self._series_btn.changed.connect(self.open_series)
        self._review.changed.connect(self._on_review)
        self._review.native.itemClicked.connect(lambda _item: self._on_review())  # also a second click
        self._browse_btn.changed.connect(self._browse)
        self._adapt_btn.changed.connect(self.adapt_model)
        self._unadapt_btn.changed.connect(self.use_shipped_model)
        self._save_model_btn.changed.connect(self.save_adapted_model)
        self._model.changed.connect(self._on_model_changed)
        self._tile_auto.changed.connect(lambda auto: setattr(self._tile, "enabled", not auto))
        for event, handler in self._viewer_hooks():
            event.connect(handler)
        self.native.destroyed.connect(self._on_destroyed)

    def _viewer_hooks(self) -> list:
        """(viewer event, handler) pairs the widget listens to while its dock is open."""
        layers = self.viewer.layers.events
        hooks = [(event, self._on_layers_changed)
                 for event in (layers.inserted, layers.removed, layers.moved, layers.reordered)]
        hooks.append((self.viewer.dims.events.current_step, self._on_step))
        hooks += [(layer.events.name, self._on_layers_changed) for layer in self.viewer.layers]
        return hooks

    def _set_status(self, text: str):
        self._status.value = text
        self.status_changed.emit(text)

    @property
    def running(self) -> bool:
        """True while a SegGPT run is in progress (its worker has not finished yet)."""
        return self._worker is not None

    # ---------------------------------------------------------------------------------- choices

    def _image_choices(self, _widget=None):
        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, Image) and META_KEY not in layer.metadata]

    def _labels_choices(self, _widget=None):
        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, Labels) and META_KEY not in layer.metadata]

    def _target_choices(self, _widget=None):
        """Image layers to segment: every image but a 2D example itself (a stack or series: its own
        planes that are not annotated)."""
        image = getattr(self, "_image", None)
        return target_choices(self._image_choices(), image.value if image is not None else None)

    def _axis_choices(self, _widget=None):
        image = getattr(self, "_image", None)
        return axis_choices(self.viewer, image.value if image is not None else None)

    def _on_layers_changed(self, event=None):
        if self._closed:
            return
        kind = getattr(event, "type", "") if event is not None else ""
        if kind == "inserted":
            event.value.events.name.connect(self._on_layers_changed)
        if kind == "removed":
            self._on_removed(event.value)
        self.reset_choices()
        if kind == "inserted":
            self._offer_target(event.value)
        self._pick_matching_labels()
        self._refresh_annotated()

    def _offer_target(self, layer):
        """A layer added after the dock opened is chosen as a target as the ones there before were
        (`default_targets`: a 2D example's fellow 2D images)."""
        image = self._image.value
        offered = [choice for _, choice in self._target_choices()]
        if image is None or layer == image or not any(layer == o for o in offered):  # == : proxies of layers
            return
        chosen = list(self._targets.value or [])
        if any(layer == d for d in default_targets(image, [layer])) and not any(layer == c for c in chosen):
            self._targets.value = chosen + [layer]

    def _on_removed(self, layer):
        """A layer left the viewer: when the run in progress writes into it (its result layer) or reads it (a
        target image), the run is cancelled, and the status says why."""
        run = self._active
        if run is None or self._worker is None:
            return
        line = run.removed(layer)
        if line is not None:
            self.cancel()
            self._set_status(line)

    def _on_image_changed(self, _value=None):
        self._axis.reset_choices()
        choices = self._axis.choices
        self._axis.visible = len(choices) > 0
        if choices:
            self._axis.value = choices[-1]  # the axis just before YX: Z for ZYX / TZYX, T for TYX
        self._show_actions()
        self._default_targets()
        self._pick_matching_labels()
        self._refresh_annotated()

    def _show_actions(self):
        """Offer only the actions that apply to the chosen image."""
        image = self._image.value
        shape = image_kind(image) if image is not None else "2d"
        self._segment_btn.visible = shape in ("stack", "series")
        self._segment_btn.text = "Segment current image" if shape == "series" else "Segment current slice"
        self._propagate_btn.visible = self._memory.visible = shape == "stack"

    def _default_targets(self):
        """Targets for a new example image: a series' other images, a 2D image's fellow 2D images."""
        image = self._image.value
        self._targets.reset_choices()
        if image is not None:
            self._targets.value = default_targets(image, [layer for _, layer in self._target_choices()])

    def _pick_matching_labels(self):
        """Choose a Labels layer of the image's shape when the current choice does not fit."""
        image, current = self._image.value, self._labels.value
        if image is not None:
            matching = matching_labels(image, current, [layer for _, layer in self._labels_choices()])
            if matching is not None and matching is not current:
                self._labels.value = matching

    def _on_labels_changed(self, _value=None):
        self._watch_labels(self._labels.value)
        self._deselected = set()
        self._refresh_annotated()

    def _on_step(self, _event=None):
        if self._closed:
            return
        image = self._image.value
        if image is not None and len(spatial_shape(image)) >= 4:
            self._schedule_refresh()

    def _schedule_refresh(self, _event=None):
        if not self._closed:
            self._refresh_timer.start()

    def _watch_labels(self, labels: Labels | None):
        """Refresh the slice list when `labels` is painted or its painting undone (None: stop watching)."""
        old, self._watched_labels = self._watched_labels, labels
        for layer, hook in ((old, "disconnect"), (labels, "connect")):
            if layer is not None:
                for event in (layer.events.paint, layer.events.data, layer.events.set_data):  # set_data: undo
                    getattr(event, hook)(self._schedule_refresh)

    def _on_slices_changed(self, value):
        offered = set(self._slices.choices)
        self._deselected = (self._deselected - offered) | (offered - set(value or []))

    def _on_destroyed(self, *_):
        """The dock was closed: stop the run and stop listening to the viewer."""
        self._closed = True
        if self._worker is not None:
            self._worker.quit()
        for event, handler in self._viewer_hooks():
            event.disconnect(handler)
        self._watch_labels(None)

    # ------------------------------------------------------------------------------- the form's values

    def _form_values(self) -> FormValues:
        """The chosen layers and settings, as the actions read them."""
        return FormValues(
            image=self._image.value, labels=self._labels.value, axis=self._axis.value,
            targets=list(self._targets.value or []), deselected=set(self._deselected),
            num_prompts=self._num_prompts.value, batch_size=self._batch.value, seg_type=self._mode.value,
            output=self._output.value, ensemble=self._ensemble.value, memory=self._memory.value,
            tile="auto" if self._tile_auto.value else (self._tile.value or None), halo=self._halo.value)

    def _refresh_annotated(self, _value=None):
        """Update the list of annotated slices (runs when layers change, the user paints or undoes)."""
        if self._closed:
            return
        items, info = Actions(self.viewer, self._form_values()).slice_list()
        self._set_slice_choices(items)
        self._slices_info.value = info

    def reset_choices(self, *_):
        """Refresh the layer choices (napari calls this when layers come and go); keeps the slice list
        and the chosen targets that are still there."""
        if not hasattr(self, "_slices"):  # during construction
            return super().reset_choices()
        targets = list(self._targets.value or [])
        with self._slices.changed.blocked():
            super().reset_choices()
        offered = [layer for _, layer in self._target_choices()]
        self._targets.value = [layer for layer in targets if layer in offered]
        self._set_slice_choices(self._slice_items)

    def _set_slice_choices(self, choices):
        shown = [self._slices.native.item(k).text() for k in range(self._slices.native.count())]
        unchanged = list(choices) == self._slice_items and shown == [name for name, _ in choices]
        self._slice_items = list(choices)
        with self._slices.changed.blocked():
            if not unchanged:  # (unchanged: kept as it is, e.g. on slider steps, so the list does not jump)
                self._slices.choices = []  # a Select appends new items after the kept ones: start afresh
                self._slices.choices = choices
            self._slices.value = [v for _, v in choices if v not in self._deselected]

    # -------------------------------------------------------------------------------- actions

    def segment_current(self, _=None):
        """Segment the slice at the current slider position from the nearest annotated slices."""
        self._run(Actions.current_slice)

    def propagate(self, _=None):
        """Segment every slice that is not annotated, outward from the annotated slices (core propagate)."""
        self._run(Actions.propagate)

    def segment_targets(self, _=None):
        """Prompts from the chosen image + examples; targets: every plane of each chosen target image."""
        self._run(Actions.targets)

    def cancel(self, _=None):
        """Stop the run after the batch in flight; the results so far stay in the result layer. Adapting stops
        after the step in flight, and the model in use stays."""
        if self._worker is not None and self._active is not None:
            self._active.cancelled = True
            step = "step" if isinstance(self._active, AdaptState) else "batch"
            self._set_status(f"Cancelling: finishing the {step} in flight…")
            self._cancel_btn.enabled = False
            self._worker.quit()

    # --------------------------------------------------------------------------------- accept

    def accept(self, _=None):
        """Copy the last run's proposals that are shown into each target's own Labels layer, only into
        planes still empty there; one undo step per layer."""
        if self._busy():
            return
        try:
            written = accept(self.viewer, self._proposal)
        except UserError as exc:
            self._report(exc)
            return
        for dest, _planes, image in written:
            self._accepted[dest] = image
        if not written:
            units = self._proposal.action.units
            show_info(f"Nothing to accept: every {self._proposal.action.unit} with a proposal already holds labels "
                      f"(annotated {units} are never overwritten).")
            return
        self.viewer.layers.selection.active = written[0][0]
        message = accepted_message(written)
        self._set_status(message)
        show_info(message)

    # --------------------------------------------------------------------------------- review

    def _update_review(self, run: RunState):
        """The run's planes, least confident first (Prediction.confidence)."""
        self._review_items, choices = review_rows(run)
        with self._review.changed.blocked():
            self._review.choices = []
            self._review.choices = choices

    def _on_review(self, row=None):
        """A Review row was chosen (or clicked again): go to its plane."""
        row = self._review.value if row is None else row
        if isinstance(row, (list, tuple)):  # magicgui emits a list, even for single selection
            row = row[0] if row else None
        run = self._proposal
        if row is None or run is None or not 0 <= row < len(self._review_items):
            return
        t, key = self._review_items[row]
        image, result = run.action.targets[t].image, run.results[t]
        go_to(self.viewer, image, key)
        if result in self.viewer.layers:
            self.viewer.layers.selection.active = result

    # --------------------------------------------------------------------------- series, export

    def open_series(self, _=None, folder=None):
        """Open a folder of 2D images: one stack of images when they share a size, else one layer each;
        then the first one (or the stack) is the example image and the rest the targets."""
        if folder is None:
            from qtpy.QtWidgets import QFileDialog

            folder = QFileDialog.getExistingDirectory(self.native, "A folder of images")
            if not folder:
                return
        try:
            series = read_series(folder)
        except InputError as exc:
            self._report(UserError(str(exc)))
            return
        image, labels, targets = add_series(self.viewer, series)
        message = series_message(series, image)
        self._image.value, self._labels.value = image, labels
        self._targets.value = targets
        self._set_status(message)

    def export_labels(self, _=None, folder=None) -> list[Path]:
        """Write the examples layer and the layers accepted into as label TIFFs and COCO (`_export.py`)."""
        try:
            sets = export_sets(self.viewer, self._image.value, self._labels.value, self._accepted)
            if folder is None:
                from qtpy.QtWidgets import QFileDialog

                folder = QFileDialog.getExistingDirectory(self.native, "Export labels into this folder")
                if not folder:
                    return []
            try:
                paths = export(sets, folder, objects=self._output.value == "instances",
                               overwrite=self._overwrite.value)
            except InputError as exc:
                raise UserError(str(exc)) from None
        except UserError as exc:
            self._report(exc)
            return []
        planes = sum(len(s.names) for s in sets)
        message = (f"Exported {plural(len(paths) - 1, 'label TIFF')} and COCO ({plural(planes, 'image')}) to "
                   f"{folder}.")
        self._set_status(message)
        show_info(message)
        return paths

    def _browse(self, _=None):
        from qtpy.QtWidgets import QFileDialog

        path, _filter = QFileDialog.getOpenFileName(
            self.native, "SegGPT weights", "",
            "SegGPT weights (*.pth *.pt *.bin *.safetensors config.json);;All files (*)")
        if path:
            self._model.value = loading.resolve_source(path)  # a config.json stands for its folder

    # -------------------------------------------------------------------------------- the runner

    def _report(self, exc: Exception):
        self._set_status(str(exc))
        show_error(str(exc))

    def _busy(self) -> bool:
        if self._worker is not None:
            show_warning("SegGPT is still running: wait for it or press Cancel.")
            return True
        return False
