"""What an example mask's ids mean: classes, or objects of one class.

The labels microscopists have are instance label images (StarDist, Cellpose, napari Labels: each nucleus
its own id). Shown to SegGPT as they are, every id is a colour of its own: a target's nucleus comes back
painted in several of them and is cut into as many objects. When an example's ids number objects, it is
shown as its foreground (one class, id 1), and a target's objects come from that foreground, split by the
object step (`instances.ObjectRule` with `split_touching`).

    "auto"       objects when the masks look like instance labels (`instance_labelled`), else classes
    "classes"    every id a class (--label-names, a host's label map, colour masks)
    "instances"  every id an object of one class
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import InputError
from .images import distinct_values

EXAMPLE_IDS = ("auto", "classes", "instances")
MIN_OBJECT_IDS = 5  # fewer ids than this are classes, whatever their shapes (a cat, a dog and a car, apart)
MANY_OBJECT_IDS = 16  # this many one-piece ids are objects even when they touch (dense cells)
ONE_PIECE_SHARE = 0.8  # the share of ids that must each be one connected piece (a crop may cut an object)
APART_SHARE = 0.4  # with fewer ids, the share that must touch no other id (parts of a thing all touch)
# (the three shares and counts chosen on the design split of benchmarks/eval_instance_examples.py)
PIECE_MIN_AREA = 4  # pixels: smaller specks of an id are not counted as pieces


def check_example_ids(example_ids: str) -> str:
    if example_ids not in EXAMPLE_IDS:
        raise InputError(f"example ids must be one of {', '.join(EXAMPLE_IDS)}, got {example_ids!r}")
    return example_ids


def instance_labelled(masks: Sequence[np.ndarray]) -> bool:
    """Whether label masks (H, W) number objects rather than classes: at least MIN_OBJECT_IDS ids in all,
    nearly all of them (ONE_PIECE_SHARE) one connected piece each, and either many ids (MANY_OBJECT_IDS)
    or most of them apart from every other id (APART_SHARE), as nuclei are and a thing's parts are not.
    Colour masks (H, W, 3) are classes."""
    masks = [np.asarray(mask) for mask in masks]
    if any(mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer) for mask in masks):
        return False
    present = [values[values != 0] for values in map(distinct_values, masks)]
    ids = sum(len(values) for values in present)
    if ids < MIN_OBJECT_IDS:
        return False  # (before the pieces are counted: a class mask is judged at the cost of a bincount)
    one_piece = apart = 0
    for mask, values in zip(masks, present):
        if not len(values):
            continue
        touching = _touching_ids(mask)
        apart += int(np.count_nonzero(~np.isin(values, touching)))
        one_piece += _one_piece_ids(mask)
    if one_piece < ONE_PIECE_SHARE * ids:
        return False
    return ids >= MANY_OBJECT_IDS or apart >= APART_SHARE * ids


def _one_piece_ids(mask: np.ndarray) -> int:
    """How many ids of a label mask are one connected piece of at least PIECE_MIN_AREA pixels (8-connectivity;
    specks beside it not counted)."""
    from skimage.measure import label

    pieces = label(mask, background=0, connectivity=2)  # neighbours of one value: one piece
    areas = np.bincount(pieces.ravel())
    first = np.zeros(len(areas), np.int64)  # each piece's id (any pixel of it)
    first[pieces.ravel()] = mask.ravel()
    piece_ids = first[1:]
    counted = np.unique(piece_ids[areas[1:] >= PIECE_MIN_AREA], return_counts=True)
    return int(np.count_nonzero(counted[1] == 1))  # (an id made of specks only is no object)


def _touching_ids(mask: np.ndarray) -> np.ndarray:
    """The ids with a pixel next to (8-connectivity) a pixel of another non-zero id."""
    found = []
    for a, b in ((mask[:, :-1], mask[:, 1:]), (mask[:-1, :], mask[1:, :]),
                 (mask[:-1, :-1], mask[1:, 1:]), (mask[:-1, 1:], mask[1:, :-1])):
        meet = (a != b) & (a != 0) & (b != 0)
        found += [a[meet], b[meet]]
    return np.unique(np.concatenate(found)) if found else np.zeros(0, mask.dtype)


def ids_are_objects(masks: Sequence[np.ndarray], example_ids: str = "auto") -> bool:
    """Whether these example masks' ids are to be read as objects of one class (see the module docstring)."""
    example_ids = check_example_ids(example_ids)
    if example_ids == "auto":
        return instance_labelled(masks)
    if example_ids == "instances" and any(np.asarray(m).ndim != 2 for m in masks):
        raise InputError("example ids 'instances' needs label masks (H, W); a colour mask's colours are classes")
    return example_ids == "instances"


def foreground(mask: np.ndarray) -> np.ndarray:
    """An instance label mask as one class: 1 where any object is, 0 elsewhere (uint8)."""
    return (np.asarray(mask) != 0).astype(np.uint8)
