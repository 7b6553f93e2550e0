"""What the widget's buttons run, without Qt: the form's values and the chosen layers in, an `Action` out.

An `Action` is one model run, ready to start: what the worker does (`work`: model, report -> (target, plane
key, Prediction) per plane; `report(target, plane key, tiles done, tiles)` per tile of a tiled plane), how
many results it yields, which image layers they belong to and what a result is called ("slice", "image").
`Actions` builds one per button (segment the current slice, propagate, segment target images) and reads
the example layers for the Annotated list and for adapting the model (`adapt_examples`). Bad input raises
`UserError` (one line for the user); `NothingToDo` says there is nothing to run.

The work functions call the core: its `Runner` with prompts prepared once (its tile events are the
progress inside a large plane), or `SegGPT.propagate`. With instance output each object gets an id that
follows it through the run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable, Iterator

import numpy as np

from seggpt_plugins.ensembles import tile_size
from seggpt_plugins.errors import InputError
from seggpt_plugins.instances import ObjectRule
from seggpt_plugins.prompts import nearest, spread
from seggpt_plugins.runner import Runner
from seggpt_plugins.runner import Target as RunTarget
from seggpt_plugins.tracking import IdentityTracker, StackTracker, annotated_objects
from seggpt_plugins.vocabulary import MAX_CLASSES

from ._layers import PlaneKey, image_kind, own_labels, plane_word, series_names
from ._stack import SUPPORTED_NDIM, PlaneStack, annotated_planes, level0, spatial_shape


#: The core's object rule in every action with Output "instances". The examples are shown as one class
#: (`Actions._examples`), so touching objects come out as one piece and only the split tells them apart (as
#: `Prediction.objects` does for examples whose ids are objects). It differs from `seggpt propagate`'s default
#: on purpose: that propagates each object's own id, which keeps touching objects apart already (on stardist's
#: 3D stack the split takes the CLI's F1 0.48 -> 0.46 and napari's 0.32 -> 0.73: BENCHMARKS.md section 18).
OBJECTS = ObjectRule(split_touching=True)


class UserError(Exception):
    """Bad input from the user: shown in the notification area, no traceback."""


class NothingToDo(Exception):
    """The action has nothing to run: told to the user as information."""


def fmt_shape(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'s' * (count != 1)}"


def intensity_range(layer) -> tuple[float, float]:
    """The layer's contrast limits: the model sees what the user sees (HU windows, 16-bit ranges)."""
    lo, hi = (float(v) for v in layer.contrast_limits)
    return lo, hi


@dataclass
class FormValues:
    """The form as a button press finds it: the chosen layers and axis, and the settings a run takes."""

    image: Any  # napari Image layer (None: none chosen)
    labels: Any  # napari Labels layer with the examples (None: none chosen)
    axis: int | None  # the leading axis chosen to go through (None: the last one)
    targets: list  # image layers for 'Segment targets'
    deselected: set  # annotated planes the user left out
    num_prompts: int
    batch_size: int
    seg_type: str
    output: str  # "labels" or "instances"
    ensemble: str
    memory: int
    tile: int | str | None  # pixels, "auto", or None (off)
    halo: int


@dataclass
class Inputs:
    """The image + example labels the actions read, and the line of planes to go through."""

    image: Any
    labels: Any
    axis: int | None  # the leading axis to go through; None for a 2D image
    position: tuple[int, ...]  # the slider position, one index per leading axis
    images: PlaneStack
    masks: PlaneStack

    @property
    def current(self) -> int:
        return 0 if self.axis is None else self.position[self.axis]


@dataclass
class Target:
    """An image a run segments: its proposals go to '<image> SegGPT', Accept copies them into `labels`."""

    image: Any
    labels: Any  # None: the image's own '<image> labels', found or created at Accept


@dataclass
class Action:
    """One model run, ready to start: what the worker does, how many results, which images they belong to."""

    name: str  # what the run is ("propagate", ...): the log and `last_run["kind"]`
    what: str  # for the status line: "Starting: <what>…"
    total: int  # results `work` yields
    targets: list[Target]
    examples: Any  # Labels: the result layers take its label dtype and colours (labels output)
    work: Callable[[Any, Callable], Iterator[tuple[int, PlaneKey, Any]]]  # (model, report) -> (t, plane, Prediction)
    objects: bool = False  # results hold one id per object (their own colours, a wide dtype)
    note: str | None = None  # told to the user when the run starts and ends
    unit: str = "slice"  # what a result is, in the status: "slice", "image" (2D images, a series) or "plane"

    @property
    def units(self) -> str:
        return self.unit + "s"


def axis_choices(viewer, image) -> list[tuple[str, int]]:
    """The leading axes of `image` a run can go through, named by the layer's or the viewer's axis labels."""
    if image is None:
        return []
    leading = len(spatial_shape(image)) - 2
    if leading < 1 or leading + 2 not in SUPPORTED_NDIM:
        return []
    offset = viewer.dims.ndim - image.ndim
    viewer_names = list(viewer.dims.axis_labels)
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


class Actions:
    """The actions of one button press: `current_slice()`, `propagate()`, `targets()`; and `slice_list()`,
    the Annotated list of the chosen examples."""

    def __init__(self, viewer, form: FormValues):
        self.viewer = viewer
        self.form = form

    # ------------------------------------------------------------------------------- reading inputs

    def inputs(self) -> Inputs:
        image = self.form.image
        if image is None:
            raise UserError("No image layer: open or add an image, then choose it under 'Image'.")
        shape = spatial_shape(image)
        if len(shape) not in SUPPORTED_NDIM:
            rgb = " (RGB)" if image.rgb else ""
            raise UserError(f"Unsupported dimensions: '{image.name}' has shape {fmt_shape(shape)}{rgb}. "
                            "SegGPT handles 2D (YX), 3D (ZYX or TYX) and 4D (TZYX) images, grey or RGB.")
        labels = self.form.labels
        if labels is None:
            raise UserError("No Labels layer with an example: add a Labels layer, paint the objects on one "
                            "slice, and choose it under 'Examples'.")
        label_shape = tuple(int(s) for s in level0(labels.data).shape)
        if label_shape != shape:
            raise UserError(f"Shape mismatch: image '{image.name}' is {fmt_shape(shape)} but Labels "
                            f"'{labels.name}' is {fmt_shape(label_shape)}. The examples must cover the image "
                            "pixel for pixel.")
        leading = len(shape) - 2
        axis = None
        if leading:
            axis = self.form.axis if self.form.axis is not None else leading - 1
        position = self._position(image, shape)
        return Inputs(image, labels, axis, position,
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

    def annotated(self, inputs: Inputs) -> list[int]:
        """Annotated planes of the example line, minus those the user deselected."""
        found = annotated_planes(inputs.masks)
        chosen = [i for i in found if i not in self.form.deselected]
        if not found:
            elsewhere = self.labelled_elsewhere(inputs)
            if elsewhere:
                raise UserError(f"No annotation along {self.axis_name(inputs)} at {self.held_at(inputs)} in Labels "
                                f"'{inputs.labels.name}' (its labels are at {elsewhere}): move the slider there, or "
                                f"paint one {self.plane_word(inputs)} here.")
            where = "" if inputs.axis is None else f" along {self.axis_name(inputs)}"
            what = ("the image: it is" if inputs.axis is None else
                    f"at least one {self.plane_word(inputs)}: that {self.plane_word(inputs)} is")
            raise UserError(f"No annotation: Labels '{inputs.labels.name}' is empty{where}. Paint the objects on "
                            f"{what} the example SegGPT copies.")
        if not chosen:
            raise UserError(f"All annotated {self.plane_word(inputs)}s are deselected under 'Annotated': select at "
                            "least one.")
        return chosen

    def axis_name(self, inputs: Inputs, axis: int | None = None) -> str:
        axis = inputs.axis if axis is None else axis
        for name, value in axis_choices(self.viewer, self.form.image):
            if value == axis:
                return name
        return f"axis {axis}"

    def held_at(self, inputs: Inputs, key=None) -> str:
        """Where the leading axes other than the chosen one stand ('t = 0'), at `key` or the slider."""
        key = inputs.position if key is None else key
        return ", ".join(f"{self.axis_name(inputs, a).split(' (')[0]} = {key[a]}"
                         for a in range(len(key)) if a != inputs.axis)

    def labelled_elsewhere(self, inputs: Inputs, most: int = 3) -> str | None:
        """4D examples with no labels along the chosen line: where the labels are instead ('t = 1'), or None
        (no labels anywhere, fewer than two leading axes, or lazy data, which is not read whole)."""
        data = inputs.masks.data
        if inputs.masks.leading < 2 or not isinstance(data, np.ndarray):
            return None
        planes = np.any(data.reshape(*data.shape[:inputs.masks.leading], -1), axis=-1)
        others = tuple(a for a in range(inputs.masks.leading) if a != inputs.axis)
        where = np.flatnonzero(np.any(planes, axis=inputs.axis).ravel()) if others else []
        if not len(where):
            return None
        keys = [np.unravel_index(int(k), tuple(data.shape[a] for a in others)) for k in where]
        full = [[0] * inputs.masks.leading for _ in keys]
        for row, key in zip(full, keys):
            for a, v in zip(others, key):
                row[a] = int(v)
        text = "; ".join(self.held_at(inputs, row) for row in full[:most])
        return text + (f" and {len(full) - most} more" if len(full) > most else "")

    def plane_label(self, inputs: Inputs, i: int) -> str:
        """How the Annotated list names plane i: the file name of a series, else 'z = 12' (or 'slice 12')."""
        names = series_names(inputs.image)
        if names is not None:
            return names[i]
        name = self.axis_name(inputs).split(" (")[0]
        return f"slice {i}" if name.startswith("axis") else f"{name} = {i}"

    @staticmethod
    def plane_word(inputs: Inputs) -> str:
        return plane_word(inputs.image)

    def slice_list(self) -> tuple[list[tuple[str, int]], str]:
        """The Annotated list ((name, plane) of each annotated plane) and the line under it."""
        try:
            inputs = self.inputs()
            found = annotated_planes(inputs.masks)
        except UserError as exc:
            return [], str(exc)
        except Exception as exc:  # unreadable data: say so, do not break the viewer
            return [], f"Cannot read the labels: {exc}"
        if inputs.axis is None:
            return ([("whole image", 0)] if found else [],
                    "2D image: the example for 'Segment targets' (other image layers)." if found
                    else "No labels yet: paint an example.")
        items = [(self.plane_label(inputs, i), i) for i in found]
        elsewhere = None if found else self.labelled_elsewhere(inputs)
        if elsewhere:
            info = (f"No labels along {self.axis_name(inputs).split(' (')[0]} at {self.held_at(inputs)}; the labels "
                    f"are at {elsewhere}: move the slider there, or paint one slice here.")
        elif not found:
            info = f"No labels yet: paint the objects on one {self.plane_word(inputs)}."
        elif image_kind(inputs.image) == "series":
            info = f"{len(found)} of {len(inputs.masks)} images labelled; {len(inputs.masks) - len(found)} to segment."
        else:
            info = (f"{len(found)} of {len(inputs.masks)} slices annotated; "
                    f"{len(inputs.masks) - len(found)} to propagate.")
        return items, info

    # ------------------------------------------------------------------------------------ settings

    def _model_options(self, layer) -> dict:
        """The settings every model call takes; `layer`'s contrast limits scale its planes."""
        return dict(batch_size=self.form.batch_size, seg_type=self.form.seg_type, intensity_range=intensity_range(layer))

    def _tile_setting(self):
        """The Tile setting: None (off), "auto" or pixels; checked with the halo."""
        try:
            tile_size(self.form.tile, self.form.halo)
        except InputError as exc:
            raise UserError(str(exc)) from None
        return self.form.tile

    def _examples(self, masks: list[np.ndarray]) -> tuple[list[np.ndarray], bool, str | None]:
        """The example masks as the model gets them, whether results are instances, and a note.

        Objects mode with instance output: the examples are one class (what is an object), and each
        object found gets its own id. Examples with more objects than SegGPT's colours keep apart are
        used that way too (with a note), instead of being refused."""
        objects = self.form.output == "instances"
        if self.form.seg_type != "instance":  # classes stay classes (instances: objects of each class)
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

    # ------------------------------------------------------------------------------------- actions

    def current_slice(self) -> Action:
        """Segment the slice at the current slider position from the nearest annotated slices."""
        inputs = self.inputs()
        if inputs.axis is None:
            raise UserError(f"'{inputs.image.name}' is a single 2D image, which is the example itself. Use "
                            "'Segment targets' to segment other images from it.")
        annotated = self.annotated(inputs)
        current = inputs.current
        prompts = nearest([i for i in annotated if i != current], current, self.form.num_prompts)
        if not prompts:
            raise UserError(f"{self.plane_label(inputs, current).capitalize()} is the only annotated "
                            f"{self.plane_word(inputs)}: it is the example. Move the slider to another one, or "
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
            work = with_objects(work, lambda _t, _key, found: tracker.follow(found, before))
        what = f"{self.plane_label(inputs, current)} from {', '.join(self.plane_label(inputs, i) for i in prompts)}"
        return Action("segment current slice", what, 1, [Target(inputs.image, inputs.labels)], inputs.labels,
                      work, objects=objects, note=note, unit=self.plane_word(inputs))

    def propagate(self) -> Action:
        """Segment every slice that is not annotated, outward from the annotated slices (core propagate)."""
        inputs = self.inputs()
        if inputs.axis is None:
            raise UserError(f"'{inputs.image.name}' is a 2D image: there is no stack to propagate through. "
                            "Use 'Segment targets' to segment other images from it.")
        annotated = self.annotated(inputs)
        annotations = {i: np.array(inputs.masks[i]) for i in annotated}
        total = len(inputs.images) - len(annotations)
        if total == 0:
            raise NothingToDo("Every slice is annotated: nothing to propagate.")
        masks, objects, note = self._examples(list(annotations.values()))
        planes = inputs.images
        options = dict(self._model_options(inputs.image), ensemble=self.form.ensemble, memory=self.form.memory,
                       max_prompts=self.form.num_prompts, annotations=dict(zip(annotations, masks)),
                       example_ids="classes")  # as _examples made them (objects: already their foreground)

        def work(model, _report=None):
            for pred in model.propagate(planes, **options):
                yield 0, planes.key(pred.index), pred

        if objects:  # each object keeps its id through the stack
            tracker = StackTracker(len(planes), annotated_objects(annotations))
            frame_of = {planes.key(i): i for i in range(len(planes))}
            work = with_objects(work, lambda _t, key, found: tracker.follow(frame_of[key], found))
        return Action("propagate", f"{total} slices from {len(annotations)} annotated", total,
                      [Target(inputs.image, inputs.labels)], inputs.labels, work, objects=objects, note=note)

    def targets(self) -> Action:
        """Prompts from the chosen image + examples; targets: every plane of each chosen target image."""
        inputs = self.inputs()
        annotated = self.annotated(inputs)  # no examples is the first thing to say
        targets = list(self.form.targets or [])
        if not targets:
            raise UserError("No target: choose the image layers to segment under 'Targets'.")
        for target in targets:
            shape = spatial_shape(target)
            if len(shape) not in SUPPORTED_NDIM:
                raise UserError(f"Unsupported dimensions: target '{target.name}' has shape {fmt_shape(shape)}. "
                                "SegGPT handles 2D (YX), 3D (ZYX or TYX) and 4D (TZYX) images, grey or RGB.")
        prompts = spread(annotated, self.form.num_prompts)
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
            action_targets.append(Target(target, own))
        work = self._segment_work([inputs.images[i] for i in prompts], masks, inputs.image, plans)
        if objects:
            work = with_objects(work)
        total = sum(len(keys) for _, _, keys, _ in plans)
        words = {plane_word(target) for target in targets}
        unit = words.pop() if len(words) == 1 else "plane"
        what = f"{', '.join(repr(t.name) for t in targets)} ({plural(total, unit)}) from " \
               f"{plural(len(prompts), 'example')}"
        return Action("segment targets", what, total, action_targets, inputs.labels, work, objects=objects, note=note,
                      unit=unit)

    def adapt_examples(self):
        """The annotated planes selected under 'Annotated', read and checked as `SegGPT.adapt` takes them (the
        masks as the segment actions give them to the model), and what they are for the status line
        ('1 annotated slice'); UserError before any model work."""
        from seggpt_plugins.adapt import read_examples

        inputs = self.inputs()
        annotated = self.annotated(inputs)
        masks, _objects, _note = self._examples([np.array(inputs.masks[i]) for i in annotated])
        try:
            examples = read_examples([np.asarray(inputs.images[i]) for i in annotated], masks,
                                     intensity_range(inputs.image), example_ids="classes")
        except InputError as exc:
            raise UserError(f"Cannot adapt to Labels '{inputs.labels.name}': {exc}") from None
        word = "image" if inputs.axis is None else self.plane_word(inputs)
        return examples, plural(len(annotated), f"annotated {word}")

    # -------------------------------------------------------------------------------- work functions

    def _segment_work(self, prompt_images, prompt_masks, example_layer, plans):
        """The worker body of the segment actions: prompts prepared once, then every planned plane
        (`plans`: (target, data, plane keys, target layer) each), read as the core's Runner needs them,
        with `report(target, key, done, total)` per tile. Tiles: as set, or with "auto", only planes larger
        than the model's canvas are tiled."""
        setting, halo, ensemble = self._tile_setting(), self.form.halo, self.form.ensemble
        example_range = intensity_range(example_layer)
        options = self._model_options(example_layer)
        shapes = [spatial_shape(layer)[-2:] for *_, layer in plans]

        def work(model, report=None):
            tile = setting
            if tile == "auto" and max(max(s) for s in shapes) <= max(model.input_size):
                tile = None  # it fits the canvas: seen whole
            prepared = model.prepare_prompts(prompt_images, prompt_masks, intensity_range=example_range,
                                             ensemble=ensemble, tile=tile,
                                             example_ids="classes")  # as _examples made them (the form's output)

            def on_event(event):
                if event.kind == "tile" and report is not None:
                    report(*event.key, event.done, event.total)

            for t, data, keys, layer in plans:  # with auto tiles the core caps the halo per plane
                runner = Runner(model, prepared, **dict(options, intensity_range=intensity_range(layer)),
                                ensemble=ensemble, tile=tile, halo=halo)
                planes = [RunTarget((t, key), partial(read_plane, data, key), name=f"'{layer.name}' plane {key}")
                          for key in keys]
                for result in runner.run(planes, on_event=on_event, errors="raise"):
                    yield t, result.key[1], result.prediction

        return work


def read_plane(data, key) -> np.ndarray:
    """One plane of a layer's data (numpy, dask, zarr), read when the Runner needs it."""
    return np.asarray(data[key])


def with_objects(work, follow=None):
    """`work` whose predictions carry one id per object (`Prediction.objects(OBJECTS)`); `follow(target, key,
    instances)` may give them the ids of the objects they continue."""

    def objects(model, report=None):
        for t, key, pred in work(model, report):
            found = pred.objects(OBJECTS)
            if follow is not None:
                found = follow(t, key, found)
            yield t, key, replace(pred, labels=found.map)

    return objects
