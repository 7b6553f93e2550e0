"""The SegGPT dock widget: label one slice (or a few), let SegGPT propose the rest, fix, accept.

All model work runs in a napari `thread_worker` (a generator that yields one result per slice), so the
viewer stays responsive, the progress bar advances slice by slice, and Cancel stops the run after
the batch in flight. Results go to a Labels layer "<image> SegGPT" with the example's own label ids
and colours; the user's Labels layer is only changed by "Accept", in one undoable step.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    RadioButtons,
    Select,
    SpinBox,
)
from napari.layers import Image, Labels
from psygnal import Signal
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info, show_warning

from . import _models
from ._stack import (
    SUPPORTED_NDIM,
    PlaneStack,
    accept_indices,
    annotated_planes,
    level0,
    nearest,
    spatial_shape,
    spread,
)

log = logging.getLogger(__name__)

RESULT_SUFFIX = " SegGPT"
CONFIDENCE_SUFFIX = " SegGPT confidence"
META_KEY = "seggpt"  # layer.metadata key marking the layers this widget makes
REFRESH_SECONDS = 0.3  # redraw the result layer at most this often while a run writes into it


class UserError(Exception):
    """Bad input from the user: shown in the notification area, no traceback."""


def _fmt_shape(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def _intensity_range(layer) -> tuple[float, float]:
    """The layer's contrast limits: the model sees what the user sees (HU windows, 16-bit ranges)."""
    lo, hi = (float(v) for v in layer.contrast_limits)
    return lo, hi


def _job(source: str, device: str, run: Callable[[Any], Iterator]):
    """Worker body (runs in a thread): load the model once, then yield one result per slice."""
    from seggpt_plugins import SegGPTError

    try:
        if _models.cached(source, device) is None:
            yield ("loading", _models.resolve_source(source))
        model = _models.get_model(source, device)
        yield ("running", str(model.device))
        for key, prediction in run(model):
            yield ("result", key, prediction)
    except SegGPTError as exc:  # bad input or an unusable model source: a message, not a traceback
        yield ("error", str(exc))


@dataclass
class _Source:
    """The image + example labels the actions work on, and the line of planes to process."""

    image: Image
    labels: Labels
    leading: int
    axis: int | None
    position: tuple[int, ...]
    images: PlaneStack
    masks: PlaneStack

    @property
    def current(self) -> int:
        return 0 if self.axis is None else self.position[self.axis]


@dataclass
class _Run:
    kind: str
    total: int
    result: Labels
    confidence: Image | None
    started: float = field(default_factory=time.monotonic)
    running_since: float | None = None
    done: int = 0
    cancelled: bool = False
    error: str | None = None
    last_refresh: float = 0.0
    keys: list = field(default_factory=list)


class SegGPTWidget(Container):
    """Dock widget: image + example labels in, SegGPT proposals out."""

    status_changed = Signal(str)  # every status line shown under the progress bar

    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self._worker = None
        self._run: _Run | None = None
        self.last_run: dict | None = None  # summary of the last finished run (for scripts and tests)
        self._deselected: set[int] = set()
        self._slice_items: list = []
        self._hooked_labels: Labels | None = None
        self._closed = False

        # ---- inputs
        self._image = ComboBox(label="Image", choices=self._image_choices,
                               tooltip="The image to segment (2D, ZYX, TYX or TZYX; grey or RGB).")
        self._labels = ComboBox(label="Examples", choices=self._labels_choices,
                                tooltip="Labels layer holding your example annotation: every slice with any "
                                        "label is an example (prompt) for SegGPT.")
        self._axis = ComboBox(label="Stack axis", choices=self._axis_choices,
                              tooltip="Axis to go through (for 4D TZYX: T or Z; the other stays at the "
                                      "current slider position).")
        self._slices = Select(label="Annotated", choices=[], allow_multiple=True,
                              tooltip="Slices found with labels. Deselect one to leave it out of the prompts.")
        self._slices.native.setMaximumHeight(96)
        self._slices_info = Label(value="")
        # ---- actions
        self._segment_btn = PushButton(text="Segment current slice",
                                       tooltip="Segment the slice shown, from the nearest annotated slices.")
        self._propagate_btn = PushButton(text="Propagate through stack",
                                         tooltip="Segment every slice that is not annotated, going outward in "
                                                 "both directions from the annotated slices.")
        self._target = ComboBox(label="Target image", choices=self._image_choices,
                                tooltip="Another image layer to segment with the examples above.")
        self._other_btn = PushButton(text="Segment another image layer",
                                     tooltip="Prompts from the image + examples above, targets: every plane "
                                             "of the target image.")
        self._progress = ProgressBar(min=0, max=1, value=0)
        self._cancel_btn = PushButton(text="Cancel", enabled=False,
                                      tooltip="Stop after the batch in flight; results so far are kept.")
        self._status = Label(value="Ready.")
        self._accept_btn = PushButton(text="Accept into example layer",
                                      tooltip="Copy '<image> SegGPT' into the Labels layer chosen under "
                                              "'Examples', only in slices that are still empty there. "
                                              "One undo step takes it back.")
        # ---- settings
        self._model = LineEdit(value="demo", tooltip="'demo' (small model shipped with the package), a hub "
                                                     "id such as BAAI/seggpt-vit-large, a transformers "
                                                     "directory or a Painter .pth checkpoint.")
        self._browse_btn = PushButton(text="Browse…")
        self._device = ComboBox(label="Device", choices=list(_models.DEVICES), value="auto",
                                tooltip="auto: CUDA, then Apple MPS, then CPU.")
        self._num_prompts = SpinBox(label="Prompts", min=1, max=32, value=3,
                                    tooltip="How many annotated slices are shown to the model for each "
                                            "target (the nearest ones).")
        self._memory = SpinBox(label="Memory", min=0, max=32, value=4,
                               tooltip="Propagation: how many recent predictions join the prompts "
                                       "(Painter's video memory; 0 = annotated slices only).")
        self._mode = RadioButtons(label="Mode", choices=["instance", "semantic"], value="instance",
                                  orientation="horizontal",
                                  tooltip="SegGPT's task token: instance (objects) or semantic (classes).")
        self._batch = SpinBox(label="Batch size", min=1, max=256, value=8,
                              tooltip="Slices per model call (more: faster on a GPU, more memory).")
        self._confidence = CheckBox(text="Confidence layer", value=False,
                                    tooltip="Also write '<image> SegGPT confidence' (0..1 per pixel).")

        progress_row = Container(layout="horizontal", labels=False, label="Progress",
                                 widgets=[self._progress, self._cancel_btn])
        progress_row.margins = (0, 0, 0, 0)
        model_row = Container(layout="horizontal", labels=False, label="Model",
                              widgets=[self._model, self._browse_btn])
        model_row.margins = (0, 0, 0, 0)
        self.extend([
            self._image, self._labels, self._axis, self._slices, self._slices_info,
            self._segment_btn, self._propagate_btn, self._target, self._other_btn,
            progress_row, self._status, self._accept_btn,
            Label(value="<b>Settings</b>"), model_row, self._device, self._num_prompts, self._memory,
            self._mode, self._batch, self._confidence,
        ])
        self._status.native.setWordWrap(True)
        self._slices_info.native.setWordWrap(True)

        from qtpy.QtCore import QTimer

        self._refresh_timer = QTimer(self.native)
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.setInterval(250)
        self._refresh_timer.timeout.connect(self._refresh_annotated)

        self._image.changed.connect(self._on_image_changed)
        self._labels.changed.connect(self._on_labels_changed)
        self._axis.changed.connect(self._refresh_annotated)
        self._slices.changed.connect(self._on_slices_changed)
        self._segment_btn.changed.connect(self.segment_current)
        self._propagate_btn.changed.connect(self.propagate)
        self._other_btn.changed.connect(self.segment_other)
        self._cancel_btn.changed.connect(self.cancel)
        self._accept_btn.changed.connect(self.accept)
        self._browse_btn.changed.connect(self._browse)

        layers = self.viewer.layers.events
        for event in (layers.inserted, layers.removed, layers.moved, layers.reordered):
            event.connect(self._on_layers_changed)
        self.viewer.dims.events.current_step.connect(self._on_step)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._on_layers_changed)
        self.native.destroyed.connect(self._on_destroyed)
        self.reset_choices()
        self._on_image_changed()
        self._on_labels_changed()  # hook the initial choice's paint events

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

    def _axis_choices(self, _widget=None):
        image = getattr(self, "_image", None)
        image = image.value if image is not None else None
        if image is None:
            return []
        leading = len(spatial_shape(image)) - 2
        if leading < 1 or leading + 2 not in SUPPORTED_NDIM:
            return []
        offset = self.viewer.dims.ndim - image.ndim
        viewer_names = list(self.viewer.dims.axis_labels)
        layer_names = list(getattr(image, "axis_labels", None) or ())

        def named(name) -> bool:  # napari's default labels are numbers ("0" or "-3")
            return bool(name) and not str(name).lstrip("-").isdigit()

        choices = []
        for axis in range(leading):
            candidates = [layer_names[axis] if axis < len(layer_names) else "",
                          viewer_names[offset + axis] if 0 <= offset + axis < len(viewer_names) else ""]
            name = next((str(c) for c in candidates if named(c)), "")
            choices.append((f"{name} (axis {axis})" if name else f"axis {axis}", axis))
        return choices

    def _on_layers_changed(self, event=None):
        if self._closed:
            return
        if event is not None and getattr(event, "type", "") == "inserted":
            event.value.events.name.connect(self._on_layers_changed)
        self.reset_choices()
        self._pick_matching_labels()
        self._refresh_annotated()

    def _on_image_changed(self, _value=None):
        self._axis.reset_choices()
        choices = self._axis.choices
        self._axis.visible = len(choices) > 0
        if choices:
            self._axis.value = choices[-1]  # the axis just before YX: Z for ZYX / TZYX, T for TYX
        self._pick_matching_labels()
        self._refresh_annotated()

    def _pick_matching_labels(self):
        """Choose a Labels layer of the image's shape when the current choice does not fit."""
        image = self._image.value
        if image is None:
            return
        shape = spatial_shape(image)
        current = self._labels.value
        if current is not None and tuple(level0(current.data).shape) == shape:
            return
        for _name, layer in self._labels_choices():
            if tuple(level0(layer.data).shape) == shape:
                self._labels.value = layer
                return

    def _on_labels_changed(self, _value=None):
        if self._hooked_labels is not None:
            for event in (self._hooked_labels.events.paint, self._hooked_labels.events.data):
                event.disconnect(self._schedule_refresh)
        self._hooked_labels = self._labels.value
        if self._hooked_labels is not None:
            self._hooked_labels.events.paint.connect(self._schedule_refresh)
            self._hooked_labels.events.data.connect(self._schedule_refresh)
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

    def _on_slices_changed(self, value):
        offered = {v for v in self._slices.choices}
        self._deselected = (self._deselected - offered) | (offered - set(value or []))

    def _on_destroyed(self, *_):
        """The dock was closed: stop the run and stop listening to the viewer."""
        self._closed = True
        if self._worker is not None:
            self._worker.quit()
        layers = self.viewer.layers.events
        for event in (layers.inserted, layers.removed, layers.moved, layers.reordered):
            event.disconnect(self._on_layers_changed)
        self.viewer.dims.events.current_step.disconnect(self._on_step)
        for layer in self.viewer.layers:
            layer.events.name.disconnect(self._on_layers_changed)
        if self._hooked_labels is not None:
            self._hooked_labels.events.paint.disconnect(self._schedule_refresh)
            self._hooked_labels.events.data.disconnect(self._schedule_refresh)

    # ------------------------------------------------------------------------- input checking

    def _source(self) -> _Source:
        image = self._image.value
        if image is None:
            raise UserError("No image layer: open or add an image, then choose it under 'Image'.")
        shape = spatial_shape(image)
        if len(shape) not in SUPPORTED_NDIM:
            rgb = " (RGB)" if image.rgb else ""
            raise UserError(f"Unsupported dimensions: '{image.name}' has shape {_fmt_shape(shape)}{rgb}. "
                            "SegGPT handles 2D (YX), 3D (ZYX or TYX) and 4D (TZYX) images, grey or RGB.")
        labels = self._labels.value
        if labels is None:
            raise UserError("No Labels layer with an example: add a Labels layer, paint the objects on one "
                            "slice, and choose it under 'Examples'.")
        label_shape = tuple(int(s) for s in level0(labels.data).shape)
        if label_shape != shape:
            raise UserError(f"Shape mismatch: image '{image.name}' is {_fmt_shape(shape)} but Labels "
                            f"'{labels.name}' is {_fmt_shape(label_shape)}. The examples must cover the image "
                            "pixel for pixel.")
        leading = len(shape) - 2
        axis = None
        if leading:
            axis = self._axis.value if self._axis.value is not None else leading - 1
        position = self._position(image, shape)
        return _Source(image, labels, leading, axis, position,
                       PlaneStack(level0(image.data), leading, axis, position),
                       PlaneStack(level0(labels.data), leading, axis, position))

    def _position(self, layer, shape) -> tuple[int, ...]:
        """Current slider position in the layer's own data indices (scale and translate respected)."""
        leading = len(shape) - 2
        if not leading:
            return ()
        point = np.asarray(layer.world_to_data(self.viewer.dims.point), dtype=float)[:leading]
        point = np.nan_to_num(point)
        return tuple(int(np.clip(round(p), 0, n - 1)) for p, n in zip(point, shape[:leading]))

    def _annotated(self, src: _Source) -> list[int]:
        """Annotated planes of the example line, minus those the user deselected."""
        found = annotated_planes(src.masks)
        chosen = [i for i in found if i not in self._deselected]
        if not found:
            where = "" if src.axis is None else f" along {self._axis_name(src)}"
            raise UserError(f"No annotation: Labels '{src.labels.name}' is empty{where}. Paint the objects on "
                            "at least one slice: that slice is the example SegGPT copies.")
        if not chosen:
            raise UserError("All annotated slices are deselected under 'Annotated': select at least one.")
        return chosen

    def _axis_name(self, src: _Source) -> str:
        for name, value in self._axis_choices():
            if value == src.axis:
                return name
        return f"axis {src.axis}"

    def _refresh_annotated(self, _value=None):
        """Update the list of annotated slices (runs when layers change or the user paints)."""
        if self._closed:
            return
        try:
            src = self._source()
            found = annotated_planes(src.masks)
        except UserError as exc:
            self._set_slice_choices([])
            self._slices_info.value = str(exc)
            return
        except Exception as exc:  # unreadable data: say so, do not break the viewer
            self._set_slice_choices([])
            self._slices_info.value = f"Cannot read the labels: {exc}"
            return
        if src.axis is None:
            self._set_slice_choices([("whole image", 0)] if found else [])
            self._slices_info.value = ("2D image: use it as the example for 'Segment another image layer'."
                                       if found else "No labels yet: paint an example.")
            return
        name = self._axis_name(src).split(" (")[0]
        self._set_slice_choices([(f"slice {i}" if name.startswith("axis") else f"{name} = {i}", i) for i in found])
        if found:
            self._slices_info.value = (f"{len(found)} of {len(src.masks)} slices annotated; "
                                       f"{len(src.masks) - len(found)} to propagate.")
        else:
            self._slices_info.value = f"No labels along {name} yet: paint the objects on one slice."

    def reset_choices(self, *_):
        """Refresh the layer choices (napari calls this when layers come and go); keeps the slice list."""
        if not hasattr(self, "_slices"):  # during construction
            return super().reset_choices()
        with self._slices.changed.blocked():
            super().reset_choices()
        self._set_slice_choices(self._slice_items)

    def _set_slice_choices(self, choices):
        self._slice_items = list(choices)
        with self._slices.changed.blocked():
            self._slices.choices = choices
            self._slices.value = [v for _, v in choices if v not in self._deselected]

    # -------------------------------------------------------------------------------- actions

    def _report(self, exc: Exception):
        self._set_status(str(exc))
        show_error(str(exc))

    def _busy(self) -> bool:
        if self._worker is not None:
            show_warning("SegGPT is still running: wait for it or press Cancel.")
            return True
        return False

    def segment_current(self, _=None):
        """Segment the slice at the current slider position from the nearest annotated slices."""
        if self._busy():
            return
        try:
            src = self._source()
            if src.axis is None:
                raise UserError(f"'{src.image.name}' is a single 2D image, which is the example itself. Use "
                                "'Segment another image layer' to segment other images from it.")
            annotated = self._annotated(src)
            current = src.current
            prompts = nearest([i for i in annotated if i != current], current, self._num_prompts.value)
            if not prompts:
                raise UserError(f"Slice {current} is the only annotated slice: it is the example. Move the "
                                "slider to another slice, or use 'Propagate through stack'.")
            prompt_images = [src.images[i] for i in prompts]
            prompt_masks = [np.array(src.masks[i]) for i in prompts]
            result, confidence = self._output_layers(src.image, src.labels)
            key = src.images.key(current)
            seg_type, batch = self._mode.value, self._batch.value
            intensity = _intensity_range(src.image)
            images = src.images

            def run(model):
                for pred in model.iter_segment(images[current], prompt_images, prompt_masks, batch_size=batch,
                                               seg_type=seg_type, intensity_range=intensity):
                    yield key, pred

            self._start("segment current slice", 1, run, result, confidence,
                        f"slice {current} from slices {', '.join(map(str, prompts))}")
        except UserError as exc:
            self._report(exc)

    def propagate(self, _=None):
        """Segment every slice that is not annotated, outward from the annotated slices (core propagate)."""
        if self._busy():
            return
        try:
            src = self._source()
            if src.axis is None:
                raise UserError(f"'{src.image.name}' is a 2D image: there is no stack to propagate through. "
                                "Use 'Segment another image layer' to segment other images from it.")
            annotated = self._annotated(src)
            annotations = {i: np.array(src.masks[i]) for i in annotated}
            total = len(src.images) - len(annotations)
            if total == 0:
                show_info("Every slice is annotated: nothing to propagate.")
                return
            result, confidence = self._output_layers(src.image, src.labels)
            for i in annotated:  # the annotated slices are the user's: no output there
                result.data[src.images.key(i)] = 0
                if confidence is not None:
                    confidence.data[src.images.key(i)] = 0
            images = src.images
            options = dict(memory=self._memory.value, max_prompts=self._num_prompts.value,
                           batch_size=self._batch.value, seg_type=self._mode.value,
                           intensity_range=_intensity_range(src.image))

            def run(model):
                for pred in model.propagate(images, annotations=annotations, **options):
                    yield images.key(pred.index), pred

            self._start("propagate", total, run, result, confidence,
                        f"{total} slices from {len(annotations)} annotated")
        except UserError as exc:
            self._report(exc)

    def segment_other(self, _=None):
        """Prompts from the chosen image + examples; targets: every plane of the target image layer."""
        if self._busy():
            return
        try:
            from seggpt_plugins.images import to_rgb8

            src = self._source()
            target = self._target.value
            if target is None:
                raise UserError("Choose the image to segment under 'Target image'.")
            shape = spatial_shape(target)
            if len(shape) not in SUPPORTED_NDIM:
                raise UserError(f"Unsupported dimensions: target '{target.name}' has shape {_fmt_shape(shape)}. "
                                "SegGPT handles 2D (YX), 3D (ZYX or TYX) and 4D (TZYX) images, grey or RGB.")
            annotated = self._annotated(src)
            prompts = spread(annotated, self._num_prompts.value)
            # each layer is scaled by its own contrast limits, so prompts and targets look as shown
            prompt_images = [to_rgb8(src.images[i], _intensity_range(src.image), name=f"example slice {i}")
                             for i in prompts]
            prompt_masks = [np.array(src.masks[i]) for i in prompts]
            data = level0(target.data)
            keys = list(np.ndindex(*shape[:-2]))
            if target is src.image:  # the same image: leave its annotated planes alone
                label_data = level0(src.labels.data)
                keys = [k for k in keys if not np.any(np.asarray(label_data[k]))]
                if not keys:
                    raise UserError(f"Every plane of '{target.name}' is annotated: nothing to segment.")
            result, confidence = self._output_layers(target, src.labels)
            intensity = _intensity_range(target)
            seg_type, batch = self._mode.value, self._batch.value

            def run(model):
                for start in range(0, len(keys), batch):
                    chunk = keys[start:start + batch]
                    rgbs = [to_rgb8(np.asarray(data[k]), intensity, name=f"{target.name} plane {k}") for k in chunk]
                    for pred in model.iter_segment(rgbs, prompt_images, prompt_masks, batch_size=batch,
                                                   seg_type=seg_type):
                        yield chunk[pred.index], pred

            self._start("segment another image", len(keys), run, result, confidence,
                        f"'{target.name}' ({len(keys)} planes) from {len(prompts)} examples")
        except UserError as exc:
            self._report(exc)

    def cancel(self, _=None):
        if self._worker is not None and self._run is not None:
            self._run.cancelled = True
            self._set_status("Cancelling: finishing the batch in flight…")
            self._cancel_btn.enabled = False
            self._worker.quit()

    def accept(self, _=None):
        """Copy '<image> SegGPT' into the example Labels layer, only in its empty slices, as one undo step."""
        if self._busy():
            return
        try:
            image, labels = self._image.value, self._labels.value
            if image is None or labels is None:
                raise UserError("Choose the image (whose '<image> SegGPT' result to accept) and the Labels "
                                "layer to accept it into.")
            name = image.name + RESULT_SUFFIX
            if name not in self.viewer.layers:
                raise UserError(f"Nothing to accept yet: run SegGPT on '{image.name}' first (results go to "
                                f"'{name}').")
            result = self.viewer.layers[name]
            if not isinstance(labels.data, np.ndarray):
                raise UserError(f"Labels '{labels.name}' is not an in-memory array ({type(labels.data).__name__}); "
                                "Accept needs a layer napari can paint into.")
            if tuple(result.data.shape) != tuple(labels.data.shape):
                raise UserError(f"Shape mismatch: '{name}' is {_fmt_shape(result.data.shape)} but Labels "
                                f"'{labels.name}' is {_fmt_shape(labels.data.shape)}. Choose the Labels layer "
                                "that belongs to this image under 'Examples'.")
            indices, values, planes = accept_indices(np.asarray(result.data), labels.data)
            if planes == 0:
                show_info(f"Nothing to accept: every slice with a result already holds labels in "
                          f"'{labels.name}' (annotated slices are never overwritten).")
                return
            with labels.block_history():  # one undo item, however many slices
                labels.data_setitem(indices, values.astype(labels.data.dtype, copy=False))
            message = (f"Accepted {planes} slice{'s' * (planes != 1)} into '{labels.name}'. "
                       "Undo (Ctrl+Z on that layer) takes them back in one step.")
            self._set_status(message)
            show_info(message)
        except UserError as exc:
            self._report(exc)

    def _browse(self, _=None):
        from qtpy.QtWidgets import QFileDialog

        path, _filter = QFileDialog.getOpenFileName(
            self.native, "SegGPT weights", "",
            "SegGPT weights (*.pth *.pt *.bin *.safetensors config.json);;All files (*)")
        if path:
            self._model.value = _models.resolve_source(path)

    # ------------------------------------------------------------------------------ output layers

    def _output_layers(self, image, labels: Labels) -> tuple[Labels, Image | None]:
        """'<image> SegGPT' (reused when it fits) with the example layer's colours; optional confidence."""
        shape = spatial_shape(image)
        dtype = np.dtype(level0(labels.data).dtype)
        place = dict(scale=image.scale, translate=image.translate, axis_labels=image.axis_labels)
        name = image.name + RESULT_SUFFIX
        result = self._reusable(name, Labels, shape, dtype)
        if result is None:
            result = self.viewer.add_labels(np.zeros(shape, dtype), name=name, opacity=0.6,
                                            metadata={META_KEY: {"result_of": image.name}}, **place)
        result.metadata[META_KEY] = {"result_of": image.name, "examples": labels.name}
        result.colormap = copy.deepcopy(labels.colormap)  # the same id shows in the same colour
        confidence = None
        if self._confidence.value:
            cname = image.name + CONFIDENCE_SUFFIX
            confidence = self._reusable(cname, Image, shape, np.dtype(np.float32))
            if confidence is None:
                confidence = self.viewer.add_image(np.zeros(shape, np.float32), name=cname, colormap="magma",
                                                   contrast_limits=(0.0, 1.0), blending="additive", opacity=0.6,
                                                   metadata={META_KEY: {"confidence_of": image.name}}, **place)
        return result, confidence

    def _reusable(self, name, kind, shape, dtype):
        if name not in self.viewer.layers:
            return None
        layer = self.viewer.layers[name]
        fits = (isinstance(layer, kind) and isinstance(layer.data, np.ndarray) and layer.data.shape == shape
                and layer.data.dtype == dtype and not getattr(layer, "rgb", False))
        if fits:
            return layer
        if META_KEY in layer.metadata:  # our own layer from an earlier run of another shape: replace it
            self.viewer.layers.remove(layer)
        else:  # a user layer that happens to have the name: keep it, the new layer gets a suffix
            pass
        return None

    # -------------------------------------------------------------------------------- the worker

    def _start(self, kind: str, total: int, run, result: Labels, confidence: Image | None, what: str):
        source, device = self._model.value, self._device.value
        self._run = _Run(kind=kind, total=total, result=result, confidence=confidence)
        worker = thread_worker(_job, start_thread=False)(source, device, run)
        worker.yielded.connect(self._on_yielded)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._set_running(True)
        self._progress.max = max(total, 1)
        self._progress.value = 0
        self._set_status(f"Starting: {what}…")
        log.info("SegGPT %s: %s", kind, what)
        worker.start()

    def _set_running(self, running: bool):
        for button in (self._segment_btn, self._propagate_btn, self._other_btn, self._accept_btn):
            button.enabled = not running
        self._cancel_btn.enabled = running

    def _on_yielded(self, item):
        run = self._run
        if run is None or self._closed:
            return
        kind = item[0]
        if kind == "loading":
            self._progress.max = 0  # busy indicator while the model loads
            self._set_status(f"Loading model '{item[1]}' (first run only)…")
        elif kind == "running":
            self._progress.max = max(run.total, 1)
            self._progress.value = 0
            run.running_since = time.monotonic()
            if not run.cancelled:
                self._set_status(f"Running on {item[1]}: 0 / {run.total} slices")
        elif kind == "result":
            _, key, pred = item
            self._store(run, key, pred)
        elif kind == "error":
            run.error = item[1]
            self._set_status(f"Failed: {item[1]}")
            show_error(item[1])

    def _store(self, run: _Run, key, pred):
        run.result.data[key] = pred.labels
        if run.confidence is not None:
            run.confidence.data[key] = pred.scores
        run.done += 1
        run.keys.append(key)
        self._progress.value = min(run.done, self._progress.max)
        elapsed = time.monotonic() - (run.running_since or run.started)
        per = elapsed / run.done
        left = per * (run.total - run.done)
        status = f"{run.done} / {run.total} slices · {per:.2f} s per slice"
        if run.done < run.total:
            status += f" · about {left:.0f} s left"
        if not run.cancelled:
            self._set_status(status)
        now = time.monotonic()
        if now - run.last_refresh >= REFRESH_SECONDS:
            run.last_refresh = now
            run.result.refresh()
            if run.confidence is not None:
                run.confidence.refresh()

    def _on_finished(self):
        run, self._worker, self._run = self._run, None, None
        if run is None or self._closed:
            return
        run.result.refresh()
        if run.confidence is not None:
            run.confidence.refresh()
        seconds = time.monotonic() - run.started
        self.last_run = dict(kind=run.kind, done=run.done, total=run.total, cancelled=run.cancelled,
                             error=run.error, seconds=seconds, result=run.result.name, keys=list(run.keys))
        self._set_running(False)
        if run.error is not None:
            return
        if run.cancelled:
            message = f"Cancelled: {run.done} of {run.total} slices done (kept in '{run.result.name}')."
        else:
            message = f"Done: {run.done} slice{'s' * (run.done != 1)} in {seconds:.1f} s → '{run.result.name}'."
        self._set_status(message)
