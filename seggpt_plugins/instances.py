"""From label maps to objects: connected components, small parts, one id per object.

One implementation for every adapter (scipy.ndimage, 8-connectivity: pixels touching at a corner
belong to one object, as in OpenCV and scikit-image).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np

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
    for label_id in np.unique(labels):
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


# ------------------------------------------------------------------------------------------ identity


def match_objects(previous: np.ndarray, current: np.ndarray, min_iou: float = 0.1) -> dict[int, int]:
    """{current id: previous id} for the objects of two instance maps of one scene, by the Hungarian
    assignment (scipy) that maximises the summed IoU; pairs under `min_iou` are not matched."""
    from scipy.optimize import linear_sum_assignment

    prev_ids, prev_index = np.unique(previous, return_inverse=True)
    cur_ids, cur_index = np.unique(current, return_inverse=True)
    overlap = np.bincount(prev_index.ravel() * len(cur_ids) + cur_index.ravel(),
                          minlength=len(prev_ids) * len(cur_ids)).reshape(len(prev_ids), len(cur_ids))
    union = overlap.sum(1)[:, None] + overlap.sum(0)[None, :] - overlap
    iou = overlap / np.maximum(union, 1)
    rows = np.flatnonzero(prev_ids != 0)
    cols = np.flatnonzero(cur_ids != 0)
    if not len(rows) or not len(cols):
        return {}
    sub = iou[np.ix_(rows, cols)]
    r, c = linear_sum_assignment(-sub)
    return {int(cur_ids[cols[j]]): int(prev_ids[rows[i]]) for i, j in zip(r, c) if sub[i, j] >= min_iou}


class IdentityTracker:
    """Object ids that stay with their objects through a stack or a video.

    Each frame's objects take the id of the object they overlap most in the frame before (`match_objects`);
    objects that match nothing get new ids, counted on from the highest id ever seen: ids are never recycled.
    """

    def __init__(self, min_iou: float = 0.1):
        self.min_iou = min_iou
        self.next_id = 1

    def seen(self, ids) -> None:
        """Ids used elsewhere (e.g. in the annotated frames) are never given to new objects."""
        ids = [int(i) for i in np.asarray(ids).ravel() if int(i) > 0]
        if ids:
            self.next_id = max(self.next_id, max(ids) + 1)

    def follow(self, instances: Instances, previous: np.ndarray | None) -> Instances:
        """`instances` with their ids replaced by the ids of the objects they continue in `previous`."""
        matched = match_objects(previous, instances.map, self.min_iou) if previous is not None else {}
        mapping = {}
        for obj in instances.objects:
            if obj.id in matched:
                mapping[obj.id] = matched[obj.id]
            else:
                mapping[obj.id] = self.next_id
                self.next_id += 1
        self.seen(list(mapping.values()))
        top = max(mapping.values(), default=0)
        lut = np.zeros(int(instances.map.max()) + 1 if instances.map.size else 1, np.int64)
        for old, new in mapping.items():
            lut[old] = new
        dtype = np.uint16 if top <= np.iinfo(np.uint16).max else np.uint32
        objects = [replace(o, id=mapping[o.id]) for o in instances.objects]
        return Instances(lut[instances.map].astype(dtype), sorted(objects, key=lambda o: o.id))


class StackTracker:
    """Stable ids through a stack, one frame at a time as `SegGPT.propagate` yields them: from each annotated
    frame outward (as `propagation.plan_runs` visits the frames), each frame's objects matched to those of
    the frame before it in its run. `annotated`: {frame: Instances} of the annotated frames (see
    `annotated_objects`); their ids are kept and never given to other objects. It holds only the object
    maps a frame still to come will be matched against (one per run), so memory stays flat through a long
    stack or video."""

    def __init__(self, num_frames: int, annotated: dict[int, Instances], min_iou: float = 0.1):
        from .propagation import plan_runs

        self.annotated = annotated
        self.before: dict[int, int | None] = {}
        self.order: list[int] = []  # frames run by run, each after the frame before it
        self.waiting: Counter = Counter()  # frame -> frames still to be matched against it
        for run in plan_runs(num_frames, list(annotated)):
            previous = run.origin
            for frame in run.frames:
                self.before[frame] = previous
                self.order.append(frame)
                if previous is not None:
                    self.waiting[previous] += 1
                previous = frame
        self.maps = {frame: objects.map for frame, objects in annotated.items() if self.waiting[frame]}
        self.tracker = IdentityTracker(min_iou)
        for objects in annotated.values():
            self.tracker.seen([o.id for o in objects.objects])

    def follow(self, frame: int, instances: Instances) -> Instances:
        """`instances` of `frame` with the ids of the objects they continue (the frame before it in its run
        must have been followed already: propagate's order guarantees it)."""
        before = self.before.get(frame)
        tracked = self.tracker.follow(instances, self.maps.get(before) if before is not None else None)
        if before is not None:
            self.waiting[before] -= 1
            if self.waiting[before] <= 0:
                self.maps.pop(before, None)
        if self.waiting[frame]:
            self.maps[frame] = tracked.map
        return tracked


def annotated_objects(annotations: dict[int, np.ndarray]) -> dict[int, Instances]:
    """The objects of annotated frames: a frame whose ids each mark one connected object keeps the user's
    ids; in a frame whose ids are classes (several objects share one), objects are numbered after every id
    used so far, so that no two objects of the stack share an id."""
    out, used = {}, 0
    for frame, mask in sorted(annotations.items()):
        mask = np.asarray(mask)
        found = find_instances(mask, min_area=1)
        if len(found) == len(np.unique(mask[mask > 0])):
            found = Instances.of_map(mask)
        else:
            found = found.shifted(used)
        used = max(used, int(found.map.max()) if found.map.size else 0)
        out[frame] = found
    return out


def track_stack(instances: dict[int, Instances], annotated: dict[int, Instances], num_frames: int,
                min_iou: float = 0.1) -> dict[int, Instances]:
    """`StackTracker` over a whole stack: the predicted frames' objects (`instances`) with tracked ids."""
    tracker = StackTracker(num_frames, annotated, min_iou)
    return {frame: tracker.follow(frame, instances[frame]) for frame in tracker.order if frame in instances}
