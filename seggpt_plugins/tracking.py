"""Objects that keep their ids through a stack or a video: matching objects of neighbouring frames.

    tracker = StackTracker(len(frames), annotated_objects(annotations))
    for prediction in model.propagate(frames, annotations=annotations):
        objects = tracker.follow(prediction.index, prediction.objects())
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np

from .instances import Instances, find_instances
from .propagation import plan_runs


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
