"""From label maps to objects: connected components, small parts, one id per object.

One implementation for every adapter (scipy.ndimage, 8-connectivity: pixels touching at a corner
belong to one object, as in OpenCV and scikit-image).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_EIGHT = np.ones((3, 3), bool)
_FOUR = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)


def connected_components(binary: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """(components (H, W) int32, 0 = background and 1..N one per part, N) of a binary mask."""
    from scipy import ndimage

    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    components, count = ndimage.label(np.asarray(binary, bool), structure=_EIGHT if connectivity == 8 else _FOUR)
    return components.astype(np.int32, copy=False), int(count)


def without_small_parts(binary: np.ndarray, min_area: int) -> np.ndarray:
    """The binary mask without its connected parts of fewer than `min_area` pixels."""
    binary = np.asarray(binary, bool)
    if min_area <= 1 or not binary.any():
        return binary
    components, count = connected_components(binary)
    keep = np.bincount(components.ravel(), minlength=count + 1) >= min_area
    keep[0] = False
    return keep[components]


@dataclass(frozen=True)
class Instance:
    """One object of an instance map: its id there, its class (the label id it was painted with), where it is."""

    id: int  # 1..N in the instance map
    class_id: int
    area: int  # pixels
    box: tuple[slice, slice]  # rows, columns of its bounding box in the instance map
    score: float  # mean confidence over its pixels (1.0 without scores)


def split_instances(labels: np.ndarray, scores: np.ndarray | None = None, min_area: int = 1,
                    max_instances: int | None = None) -> tuple[np.ndarray, list[Instance]]:
    """One id per connected part of each label: (instance map (H, W) with ids 1..N, the N instances).

    Parts smaller than `min_area` pixels are left out (background in the map). The map is uint16 when
    N fits, else uint32. ValueError when more than `max_instances` parts remain.
    """
    from scipy import ndimage

    labels = np.asarray(labels)
    instances: list[Instance] = []
    out = np.zeros(labels.shape, np.uint32)
    for class_id in np.unique(labels):
        if class_id == 0:
            continue
        components, _ = connected_components(labels == class_id)
        for k, box in enumerate(ndimage.find_objects(components), 1):
            if box is None:
                continue
            inside = components[box] == k
            area = int(inside.sum())
            if area < max(min_area, 1):
                continue
            if max_instances is not None and len(instances) >= max_instances:
                raise ValueError(f"more than {max_instances} objects in one image")
            score = float(scores[box][inside].mean()) if scores is not None else 1.0
            instances.append(Instance(len(instances) + 1, int(class_id), area, box, score))
            out[box][inside] = len(instances)
    return (out.astype(np.uint16) if len(instances) <= np.iinfo(np.uint16).max else out), instances
