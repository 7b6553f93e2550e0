"""The napari layers the widget reads and makes, as plain functions of the viewer (no widget state).

- an image's kind ('2d', 'stack' or 'series') and, for a series, its files; the layers offered and
  chosen as targets and examples for an image; an image series opened as layers;
- the output layers of a run ('<image> SegGPT', '<image> SegGPT confidence'), reused when they fit;
- an image's own Labels layer ('<image> labels'), which Accept writes into (and creates);
- how the Review list names a plane, and moving the viewer to one;
- a Labels layer as export sees it (`_export.LabelSet`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from napari.layers import Image, Labels

from ._export import LabelSet, plane_names
from ._series import SERIES_KEY
from ._stack import level0, spatial_shape

RESULT_SUFFIX = " SegGPT"
CONFIDENCE_SUFFIX = " SegGPT confidence"
LABELS_SUFFIX = " labels"  # an image's own Labels layer: "<image> labels" (Accept creates it when missing)
META_KEY = "seggpt"  # layer.metadata key marking the layers this widget makes

PlaneKey = tuple  # index of one plane in a layer (its leading axes; () for a 2D layer)

#: How proposals are drawn until accepted: outlines, not the filled regions of the user's own labels (which
#: Accept copies them into, where they look like every other label).
PROPOSAL_LOOK = dict(contour=2, opacity=0.8)


def image_kind(image) -> str:
    """'2d', 'stack' (ZYX, TYX, TZYX) or 'series' (a stack of unrelated 2D images, from a folder)."""
    leading = len(spatial_shape(image)) - 2
    if leading <= 0:
        return "2d"
    return "series" if leading == 1 and image.metadata.get(SERIES_KEY) else "stack"


def plane_word(image) -> str:
    """What a plane of `image` is called in the widget's messages: 'image' (a 2D image or a series), 'slice'."""
    return "slice" if image_kind(image) == "stack" else "image"


def series_names(image) -> list[str] | None:
    """The file names of the planes of an image opened from a folder (one per plane), else None."""
    names = image.metadata.get(SERIES_KEY) if image is not None else None
    planes = int(np.prod(spatial_shape(image)[:-2])) if names else 0
    return list(names) if names and len(names) == planes else None


def target_choices(image_choices: list, image) -> list:
    """Image layers to segment ((name, layer) of `image_choices`): every image but a 2D example itself (a
    stack or series: its own planes that are not annotated)."""
    choices = []
    for name, layer in image_choices:
        if layer == image:
            if image_kind(layer) == "2d":
                continue
            name += " (images not labelled)" if image_kind(layer) == "series" else " (slices not annotated)"
        choices.append((name, layer))
    return choices


def default_targets(image, offered: list) -> list:
    """Targets for a new example image: a series' other images, a 2D image's fellow 2D images."""
    shape = image_kind(image)
    if shape == "series":
        return [image]
    if shape == "2d":
        return [layer for layer in offered if image_kind(layer) == "2d"]
    return []


def matching_labels(image, current, candidates: list):
    """`current` when it covers the image's shape, else the first of `candidates` that does (None: none)."""
    shape = spatial_shape(image)
    if current is not None and tuple(level0(current.data).shape) == shape:
        return current
    return next((layer for layer in candidates if tuple(level0(layer.data).shape) == shape), None)


def place(image) -> dict:
    """Where a layer drawn over `image` goes: its scale, translation and axis names."""
    return dict(scale=image.scale, translate=image.translate, axis_labels=image.axis_labels)


# ------------------------------------------------------------------------------- output layers


def reusable(viewer, name: str, layer_type, shape, dtype):
    """Our layer `name` when it has this type, shape and dtype; an unfit one of ours is removed. None:
    make a new one (a user's layer of that name stays: the new layer gets a suffix)."""
    if name not in viewer.layers:
        return None
    layer = viewer.layers[name]
    fits = (isinstance(layer, layer_type) and isinstance(layer.data, np.ndarray) and layer.data.shape == shape
            and layer.data.dtype == dtype and not getattr(layer, "rgb", False))
    if fits:
        return layer
    if META_KEY in layer.metadata:
        viewer.layers.remove(layer)
    return None


def output_layers(viewer, image, examples: Labels, objects: bool, confidence: bool) -> tuple[Labels, Image | None]:
    """'<image> SegGPT' with the example layer's colours (objects: napari's own colours, one per id, and
    room for many ids), drawn as outlines (PROPOSAL_LOOK), and '<image> SegGPT confidence' when asked for."""
    from napari.utils.colormaps import label_colormap

    shape = spatial_shape(image)
    dtype = np.dtype(np.uint32 if objects else level0(examples.data).dtype)
    name = image.name + RESULT_SUFFIX
    result = reusable(viewer, name, Labels, shape, dtype)
    if result is None:
        result = viewer.add_labels(np.zeros(shape, dtype), name=name, opacity=PROPOSAL_LOOK["opacity"],
                                   metadata={META_KEY: {"result_of": image.name}}, **place(image))
        result.contour = PROPOSAL_LOOK["contour"]
    result.metadata[META_KEY] = {"result_of": image.name, "examples": examples.name}
    result.colormap = label_colormap() if objects else copy.deepcopy(examples.colormap)
    scores = None
    if confidence:
        cname = image.name + CONFIDENCE_SUFFIX
        scores = reusable(viewer, cname, Image, shape, np.dtype(np.float32))
        if scores is None:
            scores = viewer.add_image(np.zeros(shape, np.float32), name=cname, colormap="magma",
                                      contrast_limits=(0.0, 1.0), blending="additive", opacity=0.6,
                                      metadata={META_KEY: {"confidence_of": image.name}}, **place(image))
    return result, scores


def own_labels(viewer, image) -> Labels | None:
    """The image's own Labels layer: '<image> labels' when it exists and fits the image."""
    name = image.name + LABELS_SUFFIX
    if name not in viewer.layers:
        return None
    layer = viewer.layers[name]
    fits = (isinstance(layer, Labels) and META_KEY not in layer.metadata
            and tuple(level0(layer.data).shape) == spatial_shape(image))
    return layer if fits else None


def add_own_labels(viewer, image, dtype) -> Labels:
    """An empty '<image> labels' over the image."""
    return viewer.add_labels(np.zeros(spatial_shape(image), dtype), name=image.name + LABELS_SUFFIX, opacity=0.6,
                             **place(image))


def add_series(viewer, series) -> tuple[Image, Labels, list[Image]]:
    """Layers for an image series (`_series.Series`): one stack when its images share a size, else one
    layer each; and an empty Labels layer over the first (or the stack), the example image. Returns
    (example image, its Labels layer, the target images)."""
    axes = dict(axis_labels=("image", "y", "x"))
    if series.stackable:
        image = viewer.add_image(np.stack(series.images), name=series.folder.name,
                                 metadata={SERIES_KEY: series.names}, **axes)
        targets = [image]
    else:
        layers = [viewer.add_image(im, name=Path(n).stem, metadata={SERIES_KEY: [n]})
                  for n, im in zip(series.names, series.images)]
        image, targets = layers[0], layers[1:]
    labels = viewer.add_labels(np.zeros(spatial_shape(image), np.uint16), name=image.name + LABELS_SUFFIX,
                               **(axes if image.ndim == 3 else {}))
    return image, labels, targets


# --------------------------------------------------------------------------------------- review


def plane_name(image, key: PlaneKey, with_layer: bool = False) -> str:
    """How the Review list names a plane: its file (a series), 'z = 3' (named axes), 'slice 3', or the
    image's name (2D); `with_layer` puts the image's name first (runs over several images)."""
    names = series_names(image)
    if names is not None:
        return names[int(np.ravel_multi_index(key, spatial_shape(image)[:-2]))] if key else names[0]
    if not key:
        return image.name
    axes = [str(a) for a in image.axis_labels[:len(key)]]
    where = " ".join(f"slice {i}" if a.lstrip("-").isdigit() else f"{a} = {i}" for a, i in zip(axes, key))
    return f"{image.name}: {where}" if with_layer else where


def go_to(viewer, layer, key: PlaneKey) -> None:
    """Move the viewer to plane `key` of `layer` and centre the view on the layer."""
    shape = spatial_shape(layer)
    point = layer.data_to_world(np.array(list(key) + [(shape[-2] - 1) / 2, (shape[-1] - 1) / 2], float))
    offset = viewer.dims.ndim - len(point)
    for axis, value in enumerate(point[:len(key)]):
        viewer.dims.set_point(offset + axis, float(value))
    viewer.camera.center = tuple(float(v) for v in point[-2:])


# --------------------------------------------------------------------------------------- export


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_. " else "_" for c in text)


def label_set(image, labels: Labels) -> LabelSet:
    """A Labels layer as export sees it: a series' planes named after the image files (a label TIFF each),
    else the layer as one TIFF, its planes named after the image's file (or name) and the plane."""
    data = np.asarray(level0(labels.data))
    names = series_names(image) if image is not None and spatial_shape(image) == data.shape else None
    if names is not None:
        return LabelSet(data, names, [f"{_safe(Path(n).stem)}_labels.tif" for n in names])
    path = getattr(getattr(image, "source", None), "path", None) if image is not None else None
    base = Path(path).name if path else (image.name if image is not None else labels.name)
    return LabelSet(data, plane_names(base, data.shape, labels.axis_labels), [f"{_safe(labels.name)}.tif"])
