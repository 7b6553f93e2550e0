"""The SegGPT dock widget: label one slice (or a few), let SegGPT propose the rest, fix, accept.

Each action (segment the current slice, propagate, segment another image layer) builds an `_Action`:
what the model does, how many results it yields and where they go. `_run` starts every action the
same way: in a napari `thread_worker` (a generator that yields one result per slice), so the viewer
stays responsive, the progress bar advances slice by slice, and Cancel stops the run after the batch
in flight. Results go to a Labels layer "<image> SegGPT" with the example's own label ids and
colours; the user's Labels layer is only changed by "Accept", in one undoable step.

The controls and their layout are in `_form.py`; the plane bookkeeping (pure numpy) in `_stack.py`.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from magicgui.widgets import Container
from napari.layers import Image, Labels
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info, show_warning
from psygnal import Signal

from seggpt_plugins import loading
from seggpt_plugins.ensembles import tile_size
from seggpt_plugins.errors import InputError
from seggpt_plugins.instances import StackTracker, annotated_objects
from seggpt_plugins.prompts import nearest, spread

from ._form import build_form
from ._stack import SUPPORTED_NDIM, PlaneStack, accept_indices, annotated_planes, level0, spatial_shape

log = logging.getLogger(__name__)

RESULT_SUFFIX = " SegGPT"
CONFIDENCE_SUFFIX = " SegGPT confidence"
META_KEY = "seggpt"  # layer.metadata key marking the layers this widget makes
REFRESH_SECONDS = 0.3  # redraw the result layer at most this often while a run writes into it

PlaneKey = tuple  # index of one plane in a layer (its leading axes; () for a 2D layer)


class UserError(Exception):
    """Bad input from the user: shown in the notification area, no traceback."""


def _fmt_shape(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def _intensity_range(layer) -> tuple[float, float]:
    """The layer's contrast limits: the model sees what the user sees (HU windows, 16-bit ranges)."""
    lo, hi = (float(v) for v in layer.contrast_limits)
    return lo, hi


def _load_and_work(model_source: str, device: str, work: Callable[[Any], Iterator]):
    """Worker body (runs in a thread): load the model once, then yield one result per slice.

    Yields messages for `SegGPTWidget._on_yielded`: ("loading", resolved source), ("running", device),
    ("result", plane key, Prediction) per slice, or ("error", message) for a SegGPTError.
    """
    from seggpt_plugins import SegGPTError

    try:
        model = loading.cached(model_source, device)
        if model is None:
            resolved = loading.resolve_source(model_source)  # what "auto" stands for here
            yield ("loading", resolved)
            model = loading.get_model(resolved, device)
        yield ("running", str(model.device))
        for key, prediction in work(model):
            yield ("result", key, prediction)
    except SegGPTError as exc:  # bad input or an unusable model source: a message, not a traceback
        yield ("error", str(exc))


@dataclass
class _Inputs:
    """The image + example labels the actions read, and the line of planes to go through."""

    image: Image
    labels: Labels
    axis: int | None  # the leading axis to go through; None for a 2D image
    position: tuple[int, ...]  # the slider position, one index per leading axis
    images: PlaneStack
    masks: PlaneStack

    @property
    def current(self) -> int:
        return 0 if self.axis is None else self.position[self.axis]


@dataclass
class _Action:
    """One model run, ready to start: what the worker does, how many results, where they go."""

    name: str  # what the run is ("propagate", ...): the log and `last_run["kind"]`
    what: str  # for the status line: "Starting: <what>…"
    total: int  # results `work` yields
    image: Image  # results go to '<image> SegGPT', of this layer's shape and placement
    examples: Labels  # the result layer takes this layer's label dtype and colours
    work: Callable[[Any], Iterator[tuple[PlaneKey, Any]]]  # model -> (plane key, Prediction) per result
    untouched: Sequence[PlaneKey] = ()  # planes cleared in the output layers: the user's annotated ones
    objects: bool = False  # results hold one id per object (their own colours, a wide dtype)


@dataclass
class _RunState:
    """A run in progress, as the UI thread sees it through the worker's messages."""

    action: _Action
    result: Labels
    confidence: Image | None
    started: float = field(default_factory=time.monotonic)
    running_since: float | None = None  # when the model was ready
    done: int = 0
    cancelled: bool = False
    error: str | None = None
    last_refresh: float = 0.0
    keys: list = field(default_factory=list)  # the planes written, in order

    @property
    def total(self) -> int:
        return self.action.total


class SegGPTWidget(Container):
    """Dock widget: image + example labels in, SegGPT proposals out."""

    status_changed = Signal(str)  # every status line shown under the progress bar

    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self._worker = None
        self._active: _RunState | None = None
        self.last_run: dict | None = None  # summary of the last finished run (for scripts and tests)
        self._deselected: set[int] = set()
        self._slice_items: list = []
        self._watched_labels: Labels | None = None  # its painting refreshes the list of annotated slices
        self._closed = False
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
        self._other_btn.changed.connect(self.segment_other)
        self._cancel_btn.changed.connect(self.cancel)
        self._accept_btn.changed.connect(self.accept)
        self._browse_btn.changed.connect(self._browse)
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
        """Refresh the slice list when `labels` is painted (None: stop watching the current layer)."""
        old, self._watched_labels = self._watched_labels, labels
        for layer, hook in ((old, "disconnect"), (labels, "connect")):
            if layer is not None:
                for event in (layer.events.paint, layer.events.data):
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

    # ------------------------------------------------------------------------- input checking

    def _read_inputs(self) -> _Inputs:
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
        return _Inputs(image, labels, axis, position,
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

    def _annotated(self, inputs: _Inputs) -> list[int]:
        """Annotated planes of the example line, minus those the user deselected."""
        found = annotated_planes(inputs.masks)
        chosen = [i for i in found if i not in self._deselected]
        if not found:
            where = "" if inputs.axis is None else f" along {self._axis_name(inputs)}"
            raise UserError(f"No annotation: Labels '{inputs.labels.name}' is empty{where}. Paint the objects on "
                            "at least one slice: that slice is the example SegGPT copies.")
        if not chosen:
            raise UserError("All annotated slices are deselected under 'Annotated': select at least one.")
        return chosen

    def _axis_name(self, inputs: _Inputs) -> str:
        for name, value in self._axis_choices():
            if value == inputs.axis:
                return name
        return f"axis {inputs.axis}"

    def _refresh_annotated(self, _value=None):
        """Update the list of annotated slices (runs when layers change or the user paints)."""
        if self._closed:
            return
        try:
            inputs = self._read_inputs()
            found = annotated_planes(inputs.masks)
        except UserError as exc:
            self._set_slice_choices([])
            self._slices_info.value = str(exc)
            return
        except Exception as exc:  # unreadable data: say so, do not break the viewer
            self._set_slice_choices([])
            self._slices_info.value = f"Cannot read the labels: {exc}"
            return
        if inputs.axis is None:
            self._set_slice_choices([("whole image", 0)] if found else [])
            self._slices_info.value = ("2D image: use it as the example for 'Segment another image layer'."
                                       if found else "No labels yet: paint an example.")
            return
        name = self._axis_name(inputs).split(" (")[0]
        self._set_slice_choices([(f"slice {i}" if name.startswith("axis") else f"{name} = {i}", i) for i in found])
        if found:
            self._slices_info.value = (f"{len(found)} of {len(inputs.masks)} slices annotated; "
                                       f"{len(inputs.masks) - len(found)} to propagate.")
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

    def segment_current(self, _=None):
        """Segment the slice at the current slider position from the nearest annotated slices."""
        self._run(self._current_slice_action)

    def propagate(self, _=None):
        """Segment every slice that is not annotated, outward from the annotated slices (core propagate)."""
        self._run(self._propagate_action)

    def segment_other(self, _=None):
        """Prompts from the chosen image + examples; targets: every plane of the target image layer."""
        self._run(self._other_image_action)

    def _model_options(self, layer) -> dict:
        """The settings every model call takes; `layer`'s contrast limits scale its planes."""
        return dict(batch_size=self._batch.value, seg_type=self._mode.value, intensity_range=_intensity_range(layer),
                    ensemble=self._ensemble.value)

    def _tile_options(self) -> dict:
        """The tiling settings of the segment actions: tile None (off), "auto" or pixels, and the halo."""
        tile = "auto" if self._tile_auto.value else (self._tile.value or None)
        try:
            tile_size(tile, self._halo.value)
        except InputError as exc:
            raise UserError(str(exc)) from None
        return dict(tile=tile, halo=self._halo.value)

    def _current_slice_action(self) -> _Action:
        inputs = self._read_inputs()
        if inputs.axis is None:
            raise UserError(f"'{inputs.image.name}' is a single 2D image, which is the example itself. Use "
                            "'Segment another image layer' to segment other images from it.")
        annotated = self._annotated(inputs)
        current = inputs.current
        prompts = nearest([i for i in annotated if i != current], current, self._num_prompts.value)
        if not prompts:
            raise UserError(f"Slice {current} is the only annotated slice: it is the example. Move the "
                            "slider to another slice, or use 'Propagate through stack'.")
        prompt_images = [inputs.images[i] for i in prompts]
        prompt_masks = [np.array(inputs.masks[i]) for i in prompts]
        planes, key = inputs.images, inputs.images.key(current)
        options = dict(self._model_options(inputs.image), **self._tile_options())

        def work(model):
            for pred in model.iter_segment(planes[current], prompt_images, prompt_masks, **options):
                yield key, pred

        return _Action("segment current slice", f"slice {current} from slices {', '.join(map(str, prompts))}",
                       1, inputs.image, inputs.labels, self._as_objects(work), objects=self._objects.value)

    def _propagate_action(self) -> _Action | None:
        inputs = self._read_inputs()
        if inputs.axis is None:
            raise UserError(f"'{inputs.image.name}' is a 2D image: there is no stack to propagate through. "
                            "Use 'Segment another image layer' to segment other images from it.")
        annotated = self._annotated(inputs)
        annotations = {i: np.array(inputs.masks[i]) for i in annotated}
        total = len(inputs.images) - len(annotations)
        if total == 0:
            show_info("Every slice is annotated: nothing to propagate.")
            return None
        planes = inputs.images
        options = dict(self._model_options(inputs.image), memory=self._memory.value,
                       max_prompts=self._num_prompts.value)

        def work(model):
            for pred in model.propagate(planes, annotations=annotations, **options):
                yield planes.key(pred.index), pred

        if self._objects.value:  # each object keeps its id through the stack
            work = self._as_objects(work, StackTracker(len(planes), annotated_objects(annotations)),
                                    frame_of={planes.key(i): i for i in range(len(planes))})
        return _Action("propagate", f"{total} slices from {len(annotations)} annotated", total, inputs.image,
                       inputs.labels, work, untouched=[planes.key(i) for i in annotated],
                       objects=self._objects.value)

    def _other_image_action(self) -> _Action:
        inputs = self._read_inputs()
        target = self._target.value
        if target is None:
            raise UserError("Choose the image to segment under 'Target image'.")
        shape = spatial_shape(target)
        if len(shape) not in SUPPORTED_NDIM:
            raise UserError(f"Unsupported dimensions: target '{target.name}' has shape {_fmt_shape(shape)}. "
                            "SegGPT handles 2D (YX), 3D (ZYX or TYX) and 4D (TZYX) images, grey or RGB.")
        prompts = spread(self._annotated(inputs), self._num_prompts.value)
        prompt_images = [inputs.images[i] for i in prompts]
        prompt_masks = [np.array(inputs.masks[i]) for i in prompts]
        data = level0(target.data)
        keys = list(np.ndindex(*shape[:-2]))
        if target is inputs.image:  # the same image: leave its annotated planes alone
            label_data = level0(inputs.labels.data)
            keys = [k for k in keys if not np.any(np.asarray(label_data[k]))]
            if not keys:
                raise UserError(f"Every plane of '{target.name}' is annotated: nothing to segment.")
        # each layer is scaled by its own contrast limits, so examples and targets look as shown
        example_range = _intensity_range(inputs.image)
        options = dict(self._model_options(target), **self._tile_options())
        ensemble, batch = options.pop("ensemble"), options["batch_size"]

        def work(model):
            examples = model.prepare_prompts(prompt_images, prompt_masks, intensity_range=example_range,
                                             ensemble=ensemble, tile=options["tile"])
            for start in range(0, len(keys), batch):  # read one batch of planes at a time (dask, zarr)
                chunk = keys[start:start + batch]
                for pred in model.iter_segment([np.asarray(data[k]) for k in chunk], examples, **options):
                    yield chunk[pred.index], pred

        return _Action("segment another image", f"'{target.name}' ({len(keys)} planes) from {len(prompts)} examples",
                       len(keys), target, inputs.labels, self._as_objects(work), objects=self._objects.value)

    def _as_objects(self, work, tracker=None, frame_of=None):
        """`work` whose predictions carry one id per object when 'One id per object' is on (and, with a
        StackTracker, ids followed from slice to slice); `work` itself otherwise."""
        if not self._objects.value:
            return work

        def objects(model):
            for key, pred in work(model):
                found = pred.instances(split_touching=True)
                if tracker is not None:
                    found = tracker.follow(frame_of[key], found)
                yield key, replace(pred, labels=found.map)

        return objects

    def cancel(self, _=None):
        """Stop the run after the batch in flight; the results so far stay in the result layer."""
        if self._worker is not None and self._active is not None:
            self._active.cancelled = True
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
            top = int(values.max()) if values.size else 0
            if np.issubdtype(labels.data.dtype, np.integer) and top > np.iinfo(labels.data.dtype).max:
                raise UserError(f"'{name}' holds ids up to {top}, more than Labels '{labels.name}' "
                                f"({labels.data.dtype}) can store. Convert that layer to a wider type (e.g. "
                                "uint32) first.")
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
            self._model.value = loading.resolve_source(path)  # a config.json stands for its folder

    # ------------------------------------------------------------------------------ output layers

    def _output_layers(self, image, labels: Labels, objects: bool = False) -> tuple[Labels, Image | None]:
        """'<image> SegGPT' (reused when it fits) with the example layer's colours (objects: napari's own
        colours, one per id, and room for many ids); optional confidence."""
        shape = spatial_shape(image)
        dtype = np.dtype(np.uint32 if objects else level0(labels.data).dtype)
        place = dict(scale=image.scale, translate=image.translate, axis_labels=image.axis_labels)
        name = image.name + RESULT_SUFFIX
        result = self._reusable(name, Labels, shape, dtype)
        if result is None:
            result = self.viewer.add_labels(np.zeros(shape, dtype), name=name, opacity=0.6,
                                            metadata={META_KEY: {"result_of": image.name}}, **place)
        result.metadata[META_KEY] = {"result_of": image.name, "examples": labels.name}
        if not objects:
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
        # (a user layer that happens to have the name stays: the new layer gets a suffix)
        return None


    # -------------------------------------------------------------------------------- the runner

    def _report(self, exc: Exception):
        self._set_status(str(exc))
        show_error(str(exc))

    def _busy(self) -> bool:
        if self._worker is not None:
            show_warning("SegGPT is still running: wait for it or press Cancel.")
            return True
        return False

    def _run(self, build: Callable[[], _Action | None]):
        """Start an action: `build` checks the input (UserError: a message) and returns the action, or
        None when there is nothing to do; its results go to the output layers, from a worker thread."""
        if self._busy():
            return
        try:
            action = build()
        except UserError as exc:
            self._report(exc)
            return
        if action is None:
            return
        result, confidence = self._output_layers(action.image, action.examples, action.objects)
        for key in action.untouched:
            result.data[key] = 0
            if confidence is not None:
                confidence.data[key] = 0
        self._active = _RunState(action, result, confidence)
        worker = thread_worker(_load_and_work, start_thread=False)(self._model.value, self._device.value,
                                                                   action.work)
        worker.yielded.connect(self._on_yielded)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._set_running(True)
        self._progress.max = max(action.total, 1)
        self._progress.value = 0
        self._set_status(f"Starting: {action.what}…")
        log.info("SegGPT %s: %s", action.name, action.what)
        worker.start()

    def _set_running(self, running: bool):
        for button in (self._segment_btn, self._propagate_btn, self._other_btn, self._accept_btn):
            button.enabled = not running
        self._cancel_btn.enabled = running

    def _on_yielded(self, message):
        run = self._active
        if run is None or self._closed:
            return
        kind = message[0]
        if kind == "loading":
            self._progress.max = 0  # busy indicator while the model loads
            self._set_status(f"Loading model '{message[1]}' (first run only)…")
        elif kind == "running":
            self._progress.max = max(run.total, 1)
            self._progress.value = 0
            run.running_since = time.monotonic()
            if not run.cancelled:
                self._set_status(f"Running on {message[1]}: 0 / {run.total} slices")
        elif kind == "result":
            _, key, pred = message
            self._write_result(run, key, pred)
        elif kind == "error":
            run.error = message[1]
            self._set_status(f"Failed: {message[1]}")
            show_error(message[1])

    def _write_result(self, run: _RunState, key: PlaneKey, pred):
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
            self._refresh_outputs(run)

    def _refresh_outputs(self, run: _RunState):
        run.result.refresh()
        if run.confidence is not None:
            run.confidence.refresh()

    def _on_finished(self):
        run, self._worker, self._active = self._active, None, None
        if run is None or self._closed:
            return
        self._refresh_outputs(run)
        seconds = time.monotonic() - run.started
        self.last_run = dict(kind=run.action.name, done=run.done, total=run.total, cancelled=run.cancelled,
                             error=run.error, seconds=seconds, result=run.result.name, keys=list(run.keys))
        self._set_running(False)
        if run.error is not None:
            return
        if run.cancelled:
            message = f"Cancelled: {run.done} of {run.total} slices done (kept in '{run.result.name}')."
        else:
            message = f"Done: {run.done} slice{'s' * (run.done != 1)} in {seconds:.1f} s → '{run.result.name}'."
        self._set_status(message)
