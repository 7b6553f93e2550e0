"""The SegGPT dock widget: label one slice (or a few), let SegGPT propose the rest, review, accept, export.

Each action (segment the current slice, propagate, segment target images) builds an `_Action`: what
the model does, how many results it yields and which image layers they belong to. `_run` starts every
action the same way: in a napari `thread_worker` (a generator that yields one result per plane), so
the viewer stays responsive, the progress bar advances plane by plane, and Cancel stops the run after
the batch in flight. A run's proposals go to a Labels layer "<image> SegGPT" per target, cleared when
the run starts, so that it only ever holds that run's proposals. The user's Labels layers are only
changed by "Accept", one undo step per layer, and only with proposals of the last run that are shown.

The controls and their layout are in `_form.py`; the worker body in `_worker.py`; plane bookkeeping
(pure numpy) in `_stack.py`; the layers it reads and makes in `_layers.py`; image series in
`_series.py`; export in `_export.py`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from magicgui.widgets import Container
from napari.layers import Image, Labels
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info, show_warning
from psygnal import Signal

from seggpt_plugins import loading
from seggpt_plugins.ensembles import tile_size
from seggpt_plugins.errors import InputError
from seggpt_plugins.instances import IdentityTracker, StackTracker, annotated_objects
from seggpt_plugins.prompts import nearest, spread
from seggpt_plugins.vocabulary import MAX_CLASSES

from ._export import LabelSet, export
from ._form import build_form
from ._layers import (LABELS_SUFFIX, META_KEY, PlaneKey, add_own_labels, go_to, image_kind, label_set, output_layers,
                      own_labels, plane_name, series_names)
from ._series import SERIES_KEY, read_series
from ._stack import (SUPPORTED_NDIM, PlaneStack, accept_indices, annotated_planes, level0, spatial_shape,
                     worst_first)
from ._worker import load_and_work

log = logging.getLogger(__name__)

REFRESH_SECONDS = 0.3  # redraw the result layer at most this often while a run writes into it


class UserError(Exception):
    """Bad input from the user: shown in the notification area, no traceback."""


def _fmt_shape(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'s' * (count != 1)}"


def _intensity_range(layer) -> tuple[float, float]:
    """The layer's contrast limits: the model sees what the user sees (HU windows, 16-bit ranges)."""
    lo, hi = (float(v) for v in layer.contrast_limits)
    return lo, hi


def _with_objects(work, follow=None):
    """`work` whose predictions carry one id per object (touching objects split); `follow(target, key,
    instances)` may give them the ids of the objects they continue."""

    def objects(model):
        for t, key, pred in work(model):
            found = pred.instances(split_touching=True)
            if follow is not None:
                found = follow(t, key, found)
            yield t, key, replace(pred, labels=found.map)

    return objects


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
class _Target:
    """An image a run segments: its proposals go to '<image> SegGPT', Accept copies them into `labels`."""

    image: Image
    labels: Labels | None  # None: the image's own '<image> labels', found or created at Accept


@dataclass
class _Action:
    """One model run, ready to start: what the worker does, how many results, which images they belong to."""

    name: str  # what the run is ("propagate", ...): the log and `last_run["kind"]`
    what: str  # for the status line: "Starting: <what>…"
    total: int  # results `work` yields
    targets: list[_Target]
    examples: Labels  # the result layers take this layer's label dtype and colours (labels output)
    work: Callable[[Any], Iterator[tuple[int, PlaneKey, Any]]]  # model -> (target, plane key, Prediction)
    objects: bool = False  # results hold one id per object (their own colours, a wide dtype)
    note: str | None = None  # told to the user when the run starts and ends


@dataclass
class _RunState:
    """A run, as the UI thread sees it through the worker's messages; after it ends, its proposals."""

    action: _Action
    results: list[Labels]  # one per target
    confidences: list[Image | None]
    started: float = field(default_factory=time.monotonic)
    running_since: float | None = None  # when the model was ready
    done: int = 0
    cancelled: bool = False
    error: str | None = None
    last_refresh: float = 0.0
    keys: list = field(default_factory=list)  # (target, plane key) of each proposal, in order
    scores: list = field(default_factory=list)  # ((target, plane key), Prediction.confidence)

    @property
    def total(self) -> int:
        return self.action.total

    def keys_of(self, target: int) -> list[PlaneKey]:
        return [key for t, key in self.keys if t == target]


class SegGPTWidget(Container):
    """Dock widget: image + example labels in, SegGPT proposals out."""

    status_changed = Signal(str)  # every status line shown under the progress bar

    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self._worker = None
        self._active: _RunState | None = None
        self._proposal: _RunState | None = None  # the last run: what Accept and Review work on
        self._accepted: dict[Labels, Image] = {}  # the Labels layers Accept wrote into -> their images
        self.last_run: dict | None = None  # summary of the last finished run (for scripts and tests)
        self._deselected: set[int] = set()
        self._slice_items: list = []
        self._review_items: list = []  # (target, plane key) of each Review row
        self._watched_labels: Labels | None = None  # its painting (and undo) refreshes the annotated slices
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
        self._targets_btn.changed.connect(self.segment_targets)
        self._cancel_btn.changed.connect(self.cancel)
        self._accept_btn.changed.connect(self.accept)
        self._export_btn.changed.connect(self.export_labels)
        self._series_btn.changed.connect(self.open_series)
        self._review.changed.connect(self._on_review)
        self._review.native.itemClicked.connect(lambda _item: self._on_review())  # also a second click
        self._browse_btn.changed.connect(self._browse)
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
        image = image.value if image is not None else None
        choices = []
        for name, layer in self._image_choices():
            if layer == image:
                if image_kind(layer) == "2d":
                    continue
                name += " (images not labelled)" if image_kind(layer) == "series" else " (slices not annotated)"
            choices.append((name, layer))
        return choices

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
        if image is None:
            return
        offered = [layer for _, layer in self._target_choices()]
        shape = image_kind(image)
        if shape == "series":
            chosen = [image]
        elif shape == "2d":
            chosen = [layer for layer in offered if image_kind(layer) == "2d"]
        else:
            chosen = []
        self._targets.value = chosen

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

    def _plane_label(self, inputs: _Inputs, i: int) -> str:
        """How the Annotated list names plane i: the file name of a series, else 'z = 12' (or 'slice 12')."""
        names = series_names(inputs.image)
        if names is not None:
            return names[i]
        name = self._axis_name(inputs).split(" (")[0]
        return f"slice {i}" if name.startswith("axis") else f"{name} = {i}"

    def _refresh_annotated(self, _value=None):
        """Update the list of annotated slices (runs when layers change, the user paints or undoes)."""
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
            self._slices_info.value = ("2D image: the example for 'Segment targets' (other image layers)."
                                       if found else "No labels yet: paint an example.")
            return
        self._set_slice_choices([(self._plane_label(inputs, i), i) for i in found])
        if not found:
            self._slices_info.value = f"No labels yet: paint the objects on one {self._plane_word(inputs)}."
        elif image_kind(inputs.image) == "series":
            self._slices_info.value = (f"{len(found)} of {len(inputs.masks)} images labelled; "
                                       f"{len(inputs.masks) - len(found)} to segment.")
        else:
            self._slices_info.value = (f"{len(found)} of {len(inputs.masks)} slices annotated; "
                                       f"{len(inputs.masks) - len(found)} to propagate.")

    @staticmethod
    def _plane_word(inputs: _Inputs) -> str:
        return "image" if image_kind(inputs.image) == "series" else "slice"

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
        self._run(self._current_slice_action)

    def propagate(self, _=None):
        """Segment every slice that is not annotated, outward from the annotated slices (core propagate)."""
        self._run(self._propagate_action)

    def segment_targets(self, _=None):
        """Prompts from the chosen image + examples; targets: every plane of each chosen target image."""
        self._run(self._targets_action)

    def _model_options(self, layer) -> dict:
        """The settings every model call takes; `layer`'s contrast limits scale its planes."""
        return dict(batch_size=self._batch.value, seg_type=self._mode.value, intensity_range=_intensity_range(layer))

    def _tile_setting(self):
        """The Tile setting: None (off), "auto" or pixels; checked with the halo."""
        tile = "auto" if self._tile_auto.value else (self._tile.value or None)
        try:
            tile_size(tile, self._halo.value)
        except InputError as exc:
            raise UserError(str(exc)) from None
        return tile

    def _examples(self, masks: list[np.ndarray]) -> tuple[list[np.ndarray], bool, str | None]:
        """The example masks as the model gets them, whether results are instances, and a note.

        Objects mode with instance output: the examples are one class (what is an object), and each
        object found gets its own id. Examples with more objects than SegGPT's colours keep apart are
        used that way too (with a note), instead of being refused."""
        objects = self._output.value == "instances"
        if self._mode.value != "instance":  # classes stay classes (instances: objects of each class)
            return masks, objects, None
        note = None
        if not objects:
            ids: set = set()
            for mask in masks:
                ids |= set(np.unique(mask).tolist())
            ids.discard(0)
            if len(ids) <= MAX_CLASSES:
                return masks, False, None
            note = (f"The examples hold {len(ids)} objects, more than the {MAX_CLASSES} SegGPT's colours keep "
                    "apart: they are used as one class, and the result gets one id per object (instances).")
        return [(np.asarray(m) != 0).astype(np.uint8) for m in masks], True, note

    def _segment_work(self, prompt_images, prompt_masks, example_layer, plans):
        """The worker body of the segment actions: prompts prepared once, then every planned plane
        (`plans`: (target, data, plane keys, target layer) each), read one batch at a time. Tiles: as
        set, or with "auto", only planes larger than the model's canvas are tiled."""
        setting, halo, ensemble = self._tile_setting(), self._halo.value, self._ensemble.value
        example_range = _intensity_range(example_layer)
        options = self._model_options(example_layer)
        shapes = [spatial_shape(layer)[-2:] for *_, layer in plans]

        def work(model):
            tile = setting
            if tile == "auto" and max(max(s) for s in shapes) <= max(model.input_size):
                tile = None  # it fits the canvas: seen whole
            prepared = model.prepare_prompts(prompt_images, prompt_masks, intensity_range=example_range,
                                             ensemble=ensemble, tile=tile)
            batch = options["batch_size"]
            for t, data, keys, layer in plans:  # with auto tiles the core caps the halo per plane
                call = dict(options, intensity_range=_intensity_range(layer), tile=tile, halo=halo)
                for start in range(0, len(keys), batch):
                    chunk = keys[start:start + batch]
                    for pred in model.iter_segment([np.asarray(data[k]) for k in chunk], prepared, **call):
                        yield t, chunk[pred.index], pred

        return work

    def _current_slice_action(self) -> _Action:
        inputs = self._read_inputs()
        if inputs.axis is None:
            raise UserError(f"'{inputs.image.name}' is a single 2D image, which is the example itself. Use "
                            "'Segment targets' to segment other images from it.")
        annotated = self._annotated(inputs)
        current = inputs.current
        prompts = nearest([i for i in annotated if i != current], current, self._num_prompts.value)
        if not prompts:
            raise UserError(f"{self._plane_label(inputs, current).capitalize()} is the only annotated "
                            f"{self._plane_word(inputs)}: it is the example. Move the slider to another one, or "
                            "use 'Segment targets'.")
        originals = [np.array(inputs.masks[i]) for i in prompts]
        masks, objects, note = self._examples(originals)
        key = inputs.images.key(current)
        work = self._segment_work([inputs.images[i] for i in prompts], masks, inputs.image,
                                  [(0, inputs.images.data, [key], inputs.image)])
        if objects:  # the objects keep the ids of the nearest annotated slice's objects
            known = annotated_objects(dict(zip(prompts, originals)))
            tracker = IdentityTracker()
            tracker.seen([max(int(np.max(inputs.masks[i])) for i in annotated)])
            before = known[prompts[0]].map  # nearest() puts the closest first
            work = _with_objects(work, lambda _t, _key, found: tracker.follow(found, before))
        what = f"{self._plane_label(inputs, current)} from {', '.join(self._plane_label(inputs, i) for i in prompts)}"
        return _Action("segment current slice", what, 1, [_Target(inputs.image, inputs.labels)], inputs.labels,
                       work, objects=objects, note=note)

    def _propagate_action(self) -> _Action | None:
        inputs = self._read_inputs()
        if inputs.axis is None:
            raise UserError(f"'{inputs.image.name}' is a 2D image: there is no stack to propagate through. "
                            "Use 'Segment targets' to segment other images from it.")
        annotated = self._annotated(inputs)
        annotations = {i: np.array(inputs.masks[i]) for i in annotated}
        total = len(inputs.images) - len(annotations)
        if total == 0:
            show_info("Every slice is annotated: nothing to propagate.")
            return None
        masks, objects, note = self._examples(list(annotations.values()))
        planes = inputs.images
        options = dict(self._model_options(inputs.image), ensemble=self._ensemble.value, memory=self._memory.value,
                       max_prompts=self._num_prompts.value, annotations=dict(zip(annotations, masks)))

        def work(model):
            for pred in model.propagate(planes, **options):
                yield 0, planes.key(pred.index), pred

        if objects:  # each object keeps its id through the stack
            tracker = StackTracker(len(planes), annotated_objects(annotations))
            frame_of = {planes.key(i): i for i in range(len(planes))}
            work = _with_objects(work, lambda _t, key, found: tracker.follow(frame_of[key], found))
        return _Action("propagate", f"{total} slices from {len(annotations)} annotated", total,
                       [_Target(inputs.image, inputs.labels)], inputs.labels, work, objects=objects, note=note)

    def _targets_action(self) -> _Action:
        inputs = self._read_inputs()
        targets = list(self._targets.value or [])
        if not targets:
            raise UserError("No target: choose the image layers to segment under 'Targets'.")
        for target in targets:
            shape = spatial_shape(target)
            if len(shape) not in SUPPORTED_NDIM:
                raise UserError(f"Unsupported dimensions: target '{target.name}' has shape {_fmt_shape(shape)}. "
                                "SegGPT handles 2D (YX), 3D (ZYX or TYX) and 4D (TZYX) images, grey or RGB.")
        prompts = spread(self._annotated(inputs), self._num_prompts.value)
        masks, objects, note = self._examples([np.array(inputs.masks[i]) for i in prompts])
        plans, action_targets = [], []
        for t, target in enumerate(targets):
            keys = list(np.ndindex(*spatial_shape(target)[:-2]))
            if target == inputs.image:  # the example image itself: leave its annotated planes alone
                label_data = level0(inputs.labels.data)
                keys = [k for k in keys if not np.any(np.asarray(label_data[k]))]
                if not keys:
                    raise UserError(f"Every plane of '{target.name}' is annotated: nothing to segment.")
            plans.append((t, level0(target.data), keys, target))
            own = inputs.labels if target == inputs.image else own_labels(self.viewer, target)
            action_targets.append(_Target(target, own))
        work = self._segment_work([inputs.images[i] for i in prompts], masks, inputs.image, plans)
        if objects:
            work = _with_objects(work)
        total = sum(len(keys) for _, _, keys, _ in plans)
        what = f"{', '.join(repr(t.name) for t in targets)} ({_plural(total, 'plane')}) from " \
               f"{_plural(len(prompts), 'example')}"
        return _Action("segment targets", what, total, action_targets, inputs.labels, work, objects=objects, note=note)

    def cancel(self, _=None):
        """Stop the run after the batch in flight; the results so far stay in the result layer."""
        if self._worker is not None and self._active is not None:
            self._active.cancelled = True
            self._set_status("Cancelling: finishing the batch in flight…")
            self._cancel_btn.enabled = False
            self._worker.quit()

    # --------------------------------------------------------------------------------- accept

    def _accept_plan(self, run: _RunState, t: int):
        """What Accept writes for target t: (Labels layer or None to create it, indices, values, planes).
        UserError when that layer cannot take the proposals."""
        target, result = run.action.targets[t], run.results[t]
        dest = target.labels if target.labels is not None and target.labels in self.viewer.layers else None
        if dest is None:
            dest = own_labels(self.viewer, target.image)
        data = np.asarray(result.data)
        if dest is None:
            return None, *accept_indices(data, np.zeros_like(data), run.keys_of(t))
        if not isinstance(dest.data, np.ndarray):
            raise UserError(f"Labels '{dest.name}' is not an in-memory array ({type(dest.data).__name__}); "
                            "Accept needs a layer napari can paint into.")
        if tuple(data.shape) != tuple(dest.data.shape):
            raise UserError(f"Shape mismatch: '{result.name}' is {_fmt_shape(data.shape)} but Labels "
                            f"'{dest.name}' is {_fmt_shape(dest.data.shape)}.")
        indices, values, planes = accept_indices(data, dest.data, run.keys_of(t))
        top = int(values.max()) if values.size else 0
        if np.issubdtype(dest.data.dtype, np.integer) and top > np.iinfo(dest.data.dtype).max:
            raise UserError(f"'{result.name}' holds ids up to {top}, more than Labels '{dest.name}' "
                            f"({dest.data.dtype}) can store. Convert that layer to a wider type (e.g. uint32) first.")
        return dest, indices, values, planes

    def accept(self, _=None):
        """Copy the last run's proposals that are shown into each target's own Labels layer, only into
        planes still empty there; one undo step per layer."""
        if self._busy():
            return
        try:
            run = self._proposal
            if run is None or not run.keys:
                raise UserError("Nothing to accept yet: run SegGPT first (its proposals appear in "
                                "'<image> SegGPT').")
            shown = [t for t, result in enumerate(run.results)
                     if result in self.viewer.layers and result.visible and run.keys_of(t)]
            if not shown:
                names = ", ".join(f"'{r.name}'" for r in run.results)
                raise UserError(f"Nothing shown to accept: the last run's proposals ({names}) are hidden or "
                                "removed. Show them to accept them.")
            plans = [(t, self._accept_plan(run, t)) for t in shown]  # every check before any write
            written = []
            for t, (dest, indices, values, planes) in plans:
                if planes == 0:
                    continue
                image, result = run.action.targets[t].image, run.results[t]
                dest = dest if dest is not None else add_own_labels(self.viewer, image, result.data.dtype)
                with dest.block_history():  # one undo item, however many slices
                    dest.data_setitem(indices, values.astype(dest.data.dtype, copy=False))
                result.visible = False  # what is shown now is the accepted labels
                self._accepted[dest] = image
                written.append((dest, planes))
            if not written:
                show_info("Nothing to accept: every slice with a proposal already holds labels (annotated "
                          "slices are never overwritten).")
                return
            self.viewer.layers.selection.active = written[0][0]
            into = ", ".join(f"{_plural(planes, 'slice')} into '{dest.name}'" for dest, planes in written)
            message = f"Accepted {into}. Undo (Ctrl+Z on that layer) takes them back in one step."
            self._set_status(message)
            show_info(message)
        except UserError as exc:
            self._report(exc)

    # --------------------------------------------------------------------------------- review

    def _update_review(self, run: _RunState):
        """The run's planes, least confident first (Prediction.confidence)."""
        rows = worst_first(run.scores)
        self._review_items = [item for item, _ in rows]
        with self._review.changed.blocked():
            self._review.choices = []
            several = len(run.results) > 1
            self._review.choices = [(f"{score:.2f} · {plane_name(run.action.targets[t].image, key, several)}", k)
                                    for k, ((t, key), score) in enumerate(rows)]

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
        place = dict(axis_labels=("image", "y", "x"))
        if series.stackable:
            name = series.folder.name
            image = self.viewer.add_image(np.stack(series.images), name=name, metadata={SERIES_KEY: series.names},
                                          **place)
            targets = [image]
            message = (f"Opened {_plural(len(series.names), 'image')} of '{name}' as one stack: paint one or a few of "
                       f"them in '{name}{LABELS_SUFFIX}', then 'Segment targets' segments the rest.")
        else:
            layers = [self.viewer.add_image(im, name=Path(n).stem, metadata={SERIES_KEY: [n]})
                      for n, im in zip(series.names, series.images)]
            image, targets = layers[0], layers[1:]
            message = (f"Opened {_plural(len(layers), 'image')} of different sizes as layers: paint "
                       f"'{image.name}{LABELS_SUFFIX}', then 'Segment targets' segments the others.")
        labels = self.viewer.add_labels(np.zeros(spatial_shape(image), np.uint16), name=image.name + LABELS_SUFFIX,
                                        **(place if image.ndim == 3 else {}))
        self._image.value, self._labels.value = image, labels
        self._targets.value = targets
        self._set_status(message)

    def _export_sets(self) -> list[LabelSet]:
        pairs = []
        if self._labels.value is not None:
            pairs.append((self._image.value, self._labels.value))
        for labels, image in self._accepted.items():
            if labels in self.viewer.layers and not any(labels == p[1] for p in pairs):
                pairs.append((image, labels))
        if not pairs or not any(np.any(np.asarray(level0(lab.data))) for _, lab in pairs):
            raise UserError("Nothing to export: the examples layer is empty and nothing was accepted yet.")
        return [label_set(image, labels) for image, labels in pairs]

    def export_labels(self, _=None, folder=None) -> list[Path]:
        """Write the examples layer and the layers accepted into as label TIFFs and COCO (`_export.py`)."""
        try:
            sets = self._export_sets()
            if folder is None:
                from qtpy.QtWidgets import QFileDialog

                folder = QFileDialog.getExistingDirectory(self.native, "Export labels into this folder")
                if not folder:
                    return []
            try:
                paths = export(sets, folder, objects=self._output.value == "instances")
            except InputError as exc:
                raise UserError(str(exc)) from None
        except UserError as exc:
            self._report(exc)
            return []
        planes = sum(len(s.names) for s in sets)
        message = (f"Exported {_plural(len(paths) - 1, 'label TIFF')} and COCO ({_plural(planes, 'image')}) to "
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

    # ------------------------------------------------------------------------------ output layers

    def _open_outputs(self, action: _Action) -> tuple[list[Labels], list[Image | None]]:
        """The run's output layers, emptied: a run's proposals are its own. The last run's output layers
        that this run does not reuse are removed (their proposals can no longer be accepted)."""
        results, confidences = [], []
        for target in action.targets:
            result, confidence = output_layers(self.viewer, target.image, action.examples, action.objects,
                                               self._confidence.value)
            for layer in (result, confidence):
                if layer is not None:
                    layer.data[...] = 0
                    layer.visible = True
                    layer.refresh()
            results.append(result)
            confidences.append(confidence)
        previous, kept = self._proposal, [layer for layer in results + confidences if layer is not None]
        if previous is not None:
            for layer in previous.results + previous.confidences:
                if layer is not None and layer not in kept and layer in self.viewer.layers:
                    self.viewer.layers.remove(layer)
        return results, confidences

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
        results, confidences = self._open_outputs(action)
        self._active = self._proposal = _RunState(action, results, confidences)
        self._update_review(self._active)
        worker = thread_worker(load_and_work, start_thread=False)(self._model.value, self._device.value,
                                                                  action.work, self._precision.value)
        worker.yielded.connect(self._on_yielded)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._set_running(True)
        self._progress.max = max(action.total, 1)
        self._progress.value = 0
        self._set_status(f"Starting: {action.what}…")
        if action.note:
            show_info(action.note)
        log.info("SegGPT %s: %s", action.name, action.what)
        worker.start()

    def _set_running(self, running: bool):
        for button in (self._segment_btn, self._propagate_btn, self._targets_btn, self._accept_btn,
                       self._export_btn, self._series_btn):
            button.enabled = not running
        self._cancel_btn.enabled = running

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
            status = f"Loading model '{source}' (first run only)…"
            if seconds:
                status += f" {seconds:.0f} s"
            if downloaded:
                status += f" · {downloaded / 1e6:.0f} MB downloaded"
            if not run.cancelled:
                self._set_status(status)
        elif kind == "running":
            self._progress.max = max(run.total, 1)
            self._progress.value = 0
            run.running_since = time.monotonic()
            if not run.cancelled:
                self._set_status(f"Running on {message[1]}: 0 / {run.total} slices")
        elif kind == "result":
            _, t, key, pred = message
            self._write_result(run, t, key, pred)
        elif kind == "error":
            run.error = message[1]
            self._set_status(f"Failed: {message[1]}")
            show_error(message[1])

    def _write_result(self, run: _RunState, t: int, key: PlaneKey, pred):
        run.results[t].data[key] = pred.labels
        if run.confidences[t] is not None:
            run.confidences[t].data[key] = pred.scores
        run.done += 1
        run.keys.append((t, key))
        run.scores.append(((t, key), float(pred.confidence)))
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
        for layer in run.results + run.confidences:
            if layer is not None:
                layer.refresh()
        self._update_review(run)

    def _on_finished(self):
        run, self._worker, self._active = self._active, None, None
        if run is None or self._closed:
            return
        self._refresh_outputs(run)
        seconds = time.monotonic() - run.started
        self.last_run = dict(kind=run.action.name, done=run.done, total=run.total, cancelled=run.cancelled,
                             error=run.error, seconds=seconds, result=run.results[0].name,
                             results=[r.name for r in run.results], keys=[key for _, key in run.keys],
                             confidence=[score for _, score in run.scores])
        self._set_running(False)
        if run.error is not None:
            return
        names = ", ".join(f"'{r.name}'" for r in run.results)
        if run.cancelled:
            message = f"Cancelled: {run.done} of {run.total} slices done (kept in {names})."
        else:
            message = f"Done: {_plural(run.done, 'slice')} in {seconds:.1f} s → {names}."
        if run.action.note:
            message += " " + run.action.note
        self._set_status(message)
