"""From label maps to objects: connected components, small parts, one id per object.

One implementation for every adapter (scipy.ndimage, 8-connectivity: pixels touching at a corner
belong to one object, as in OpenCV and scikit-image).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .images import distinct_values
from .vocabulary import MIN_OBJECT_AREA

_EIGHT = np.ones((3, 3), bool)
_FOUR = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)


def connected_components(binary: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """(components (H, W) int32, 0 = background and 1..N one per part, N) of a binary mask."""
    from scipy import ndimage

    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    components, count = ndimage.label(np.asarray(binary, bool), structure=_EIGHT if connectivity == 8 else _FOUR)
    return components.astype(np.int32, copy=False), int(count)


@dataclass(frozen=True)
class Instance:
    """One object of an instance map: its id there, its class (the label id it was painted with), where it is."""

    id: int  # 1..N in the instance map
    class_id: int
    area: int  # pixels
    box: tuple[slice, slice]  # rows, columns of its bounding box in the instance map
    score: float  # mean confidence over its pixels (1.0 without scores)
    quality: float | None = None  # its predicted IoU with the true object (quality.ObjectContext), when estimated

    @property
    def confidence(self) -> float:
        """How far to trust this object, to review the lowest first: its predicted IoU when estimated, else
        its mean snap score."""
        return self.quality if self.quality is not None else self.score


# ----------------------------------------------------------------------------------------- objects


@dataclass
class Instances:
    """One id per object: `map` (H, W) holds 0 (background) or the id 1..N of the object at each pixel."""

    map: np.ndarray
    objects: list[Instance]

    def __len__(self) -> int:
        return len(self.objects)

    def shifted(self, offset: int) -> "Instances":
        """The same objects with ids offset..: keeps ids apart from those used elsewhere."""
        top = int(self.map.max()) + offset if self.map.size else offset
        dtype = np.uint16 if top <= np.iinfo(np.uint16).max else np.uint32
        moved = np.where(self.map > 0, self.map.astype(np.int64) + offset, 0).astype(dtype)
        return Instances(moved, [replace(o, id=o.id + offset) for o in self.objects])

    def with_quality(self, qualities: dict[int, float]) -> "Instances":
        """The same objects with their predicted IoU ({object id: quality}; ids left out keep theirs)."""
        return Instances(self.map, [replace(o, quality=qualities.get(o.id, o.quality)) for o in self.objects])

    def with_classes(self, classes: dict[int, int]) -> "Instances":
        """The same objects with their class ids mapped ({class id: new class id}; others keep theirs)."""
        return Instances(self.map, [replace(o, class_id=classes.get(o.class_id, o.class_id)) for o in self.objects])

    @classmethod
    def of_map(cls, id_map: np.ndarray, scores: np.ndarray | None = None) -> "Instances":
        """The objects of a map whose ids already are objects (ids kept; each id is its own class)."""
        id_map = np.asarray(id_map)
        return cls(id_map, _objects_of(id_map, lambda object_id: object_id, scores))

    def class_map(self) -> np.ndarray:
        """(H, W) class ids (0 = background)."""
        lut = np.zeros(max((o.id for o in self.objects), default=0) + 1, np.int64)
        for o in self.objects:
            lut[o.id] = o.class_id
        return lut[self.map]


@dataclass(frozen=True)
class ObjectRule:
    """The one rule that turns a label map into objects, for every host (`find_instances`).

    Connected parts of each label (8-connectivity); parts under `min_area` pixels join the object they
    share most border with, or are dropped; `split_touching` separates touching objects by a watershed
    (`object_radius`: their typical radius, default from the parts' median area). `classes` maps label
    ids to class ids when several ids stand for one class. More than `max_instances` objects is a
    ValueError.
    """

    min_area: int = MIN_OBJECT_AREA
    split_touching: bool = False
    object_radius: float | None = None
    classes: dict | None = field(default=None, hash=False, compare=False)
    max_instances: int | None = None

    def find(self, labels: np.ndarray, scores: np.ndarray | None = None) -> "Instances":
        return find_instances(labels, scores, min_area=self.min_area, split_touching=self.split_touching,
                              object_radius=self.object_radius, classes=self.classes,
                              max_instances=self.max_instances)


def find_instances(labels: np.ndarray, scores: np.ndarray | None = None, *, min_area: int = 16,
                   split_touching: bool = False, object_radius: float | None = None,
                   classes: dict[int, int] | None = None, max_instances: int | None = None) -> Instances:
    """Objects in a label map: connected parts of each label (8-connectivity), then, with `split_touching`,
    touching objects separated by a watershed on the distance transform (scikit-image), each part split
    where it has several distance maxima at least `object_radius / 2` apart (default radius: from the
    median part area). Parts smaller than `min_area` pixels join the object they share most border with
    (fragments of one object painted in two colours), or are dropped when they touch none.

    classes: {label id: class id} when several label ids stand for one class (e.g. a prompt whose ids are
    objects, not classes); default: each label id is its own class. Ids are numbered 1..N in reading order
    of each object's first pixel: a prompt's own ids are never reused for other objects by position.
    """
    labels = np.asarray(labels)
    parts = np.zeros(labels.shape, np.int64)
    part_class: list[int] = [0]
    for label_id in distinct_values(labels):
        if label_id == 0:
            continue
        components, count = connected_components(labels == label_id)
        inside = components > 0
        parts[inside] = components[inside] + len(part_class) - 1
        class_id = int(classes.get(int(label_id), label_id)) if classes else int(label_id)
        part_class.extend([class_id] * count)
    part_class = np.asarray(part_class, np.int64)
    areas = np.bincount(parts.ravel(), minlength=len(part_class))
    parts = _absorb_fragments(parts, areas, min_area)
    if split_touching and parts.any():
        parts, part_class = _split_touching(parts, part_class, object_radius)
    return _renumber(parts, part_class, scores, max_instances)


def _absorb_fragments(parts: np.ndarray, areas: np.ndarray, min_area: int) -> np.ndarray:
    """Parts under `min_area` take the id of the large part they share most border with, else 0."""
    from scipy import ndimage

    small = np.flatnonzero((areas < min_area) & (np.arange(len(areas)) > 0) & (areas > 0))
    if not len(small):
        return parts
    large = np.where(areas >= min_area, np.arange(len(areas)), 0)
    large[0] = 0
    keep = large[parts]  # only the large parts (0 elsewhere)
    grown = ndimage.grey_dilation(keep, footprint=np.ones((3, 3), bool))  # a large neighbour's id at borders
    out = keep.copy()
    boxes = ndimage.find_objects(parts)
    for part_id in small:
        box = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in boxes[part_id - 1])
        inside = parts[box] == part_id
        neighbours = grown[box][inside]
        neighbours = neighbours[neighbours > 0]
        if neighbours.size:
            out[box][inside] = np.bincount(neighbours).argmax()
    return out


def _split_touching(parts: np.ndarray, part_class: np.ndarray, radius: float | None):
    """Watershed split of every part that has several well separated distance maxima."""
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    areas = np.bincount(parts.ravel())[1:]
    if radius is None:
        radius = float(np.sqrt(np.median(areas[areas > 0]) / np.pi)) if np.any(areas > 0) else 1.0
    min_distance = max(1, int(round(radius / 2)))
    out = parts.copy()
    classes = list(part_class)
    for part_id, box in enumerate(ndimage.find_objects(parts), 1):
        if box is None:
            continue
        box = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in box)
        inside = parts[box] == part_id
        distance = ndimage.distance_transform_edt(inside)
        peaks = peak_local_max(distance, min_distance=min_distance, threshold_abs=max(1.0, radius / 3),
                               labels=inside.astype(np.int32), exclude_border=False)
        if len(peaks) < 2:
            continue
        markers = np.zeros(inside.shape, np.int64)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        pieces = watershed(-distance, markers, mask=inside)
        region = out[box]
        for k in range(2, len(peaks) + 1):  # piece 1 keeps the part's id, the others get new ones
            classes.append(part_class[part_id])
            region[pieces == k] = len(classes) - 1
    return out, np.asarray(classes, np.int64)


def _renumber(parts: np.ndarray, part_class: np.ndarray, scores, max_instances) -> Instances:
    """Ids 1..N in reading order of each object's first pixel, with their class, area, box and score."""
    flat = parts.ravel()
    present, first = np.unique(flat, return_index=True)
    order = [int(p) for p in present[np.argsort(first)] if p != 0]
    if max_instances is not None and len(order) > max_instances:
        raise ValueError(f"{len(order)} objects in one image, more than {max_instances}")
    lut = np.zeros(int(parts.max()) + 1 if parts.size else 1, np.int64)
    lut[order] = np.arange(1, len(order) + 1)
    dtype = np.uint16 if len(order) <= np.iinfo(np.uint16).max else np.uint32
    out = lut[parts].astype(dtype)
    return Instances(out, _objects_of(out, lambda new_id: int(part_class[order[new_id - 1]]), scores))


def _objects_of(id_map: np.ndarray, class_of, scores) -> list[Instance]:
    """The Instance of every id present in `id_map` (its class from `class_of(id)`, mean score, area, box)."""
    from scipy import ndimage

    objects = []
    for object_id, box in enumerate(ndimage.find_objects(id_map.astype(np.int64)), 1):
        if box is None:
            continue
        inside = id_map[box] == object_id
        score = float(scores[box][inside].mean()) if scores is not None else 1.0
        objects.append(Instance(object_id, int(class_of(object_id)), int(inside.sum()), box, score))
    return objects
