"""Objects followed through a propagation run by where they were going, not by the colour they were painted.

The demo model (and SegGPT, less often) paints a moving object's neighbour, or the place it left, in its
colour: two alike objects that cross come out as one colour, and a nucleus that has ended lives on in the
colour of another. When the annotated frame's ids are objects (each id one connected piece), a run's
painted ids are replaced by tracks (`ObjectTracks.follow`, frame by frame):

- each object is expected where it was, moved on by its velocity (smoothed centroid steps);
- a painted piece (connected component of the objects' colours, whatever the colour) goes to the objects
  whose expected region it overlaps (LINK_SHARE of the smaller of the two); a piece that two or more
  objects reach (touching objects, or a crossing) is split between them, each pixel to the nearest
  expected region (ties to the nearest expected centre); objects whose expected regions overlap
  (OVERLAP_SHARE: one covers the other) coast (same shape and velocity) until they part;
- an object whose expected region the painted pieces cover less than SUPPORT_SHARE of (it has gone, or its
  painting has collapsed) ends: its id is not painted again in this run. Pieces no object reaches are
  background.

Thresholds chosen on generated crossing and ending videos (scenes.py, seeds 0-2), reported on seeds 3-9
and stardist's 3D stack: BENCHMARKS.md section 16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .instances import connected_components

#: a piece and an expected region are linked when their overlap is this share of the smaller of the two
LINK_SHARE = 0.2
#: an object ends when the painted pieces cover less than this share of its expected region
SUPPORT_SHARE = 0.3
#: how far a new centroid step moves the velocity (1: the last step alone)
VELOCITY_STEP = 0.5
#: objects that share a piece coast when this share of one's expected region is in another's (they overlap)
OVERLAP_SHARE = 0.1
#: pixels: an object whose painted (or expected, inside the frame) area falls below this ends
MIN_AREA = 8


@dataclass
class _Track:
    """One object: its mask cropped to its box, where the box was last (float row, column) and its velocity."""

    mask: np.ndarray  # (h, w) bool
    corner: np.ndarray  # (2,) float: the box's top-left in the frame
    velocity: np.ndarray  # (2,) float: pixels a frame

    def expected(self, shape: tuple[int, int]) -> tuple[tuple[slice, slice], np.ndarray]:
        """Where the object should be now, clipped to a frame of `shape`: (frame box, mask in that box)."""
        top, left = np.round(self.corner + self.velocity).astype(int)
        height, width = self.mask.shape
        rows = slice(max(top, 0), min(top + height, shape[0]))
        cols = slice(max(left, 0), min(left + width, shape[1]))
        if rows.start >= rows.stop or cols.start >= cols.stop:
            return (slice(0, 0), slice(0, 0)), np.zeros((0, 0), bool)
        return (rows, cols), self.mask[rows.start - top:rows.stop - top, cols.start - left:cols.stop - left]


def one_piece_ids(mask: np.ndarray) -> list[int]:
    """The ids of a label mask (H, W) that are each one connected piece (8-connectivity), sorted."""
    from scipy import ndimage

    mask = np.asarray(mask).astype(np.int64, copy=False)
    return [label_id for label_id, box in enumerate(ndimage.find_objects(mask), 1)
            if box is not None and connected_components(mask[box] == label_id)[1] == 1]


class ObjectTracks:
    """The objects of one annotated frame, followed through the predicted frames of one run (see the module
    docstring).

    Args:
        annotation: the annotated frame's label mask (H, W); its `ids` are the objects followed.
        ids: which ids to follow (each must be one connected piece: `one_piece_ids`).
    """

    def __init__(self, annotation: np.ndarray, ids: Iterable[int]):
        annotation = np.asarray(annotation)
        self.ids = sorted(int(i) for i in ids)
        self.tracks: dict[int, _Track] = {}
        for label_id in self.ids:
            rows, cols = np.nonzero(annotation == label_id)
            if len(rows):
                box = slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1)
                self.tracks[label_id] = _Track(annotation[box] == label_id, np.array([box[0].start, box[1].start],
                                                                                     float), np.zeros(2))
        self.ended: list[int] = []

    def follow(self, labels: np.ndarray) -> np.ndarray:
        """A predicted frame's labels (H, W) with the followed ids replaced by their tracks' (pixels of
        other ids kept); updates the tracks."""
        labels = np.asarray(labels)
        followed = np.isin(labels, self.ids)
        pieces, count = connected_components(followed)
        piece_area = np.bincount(pieces.ravel(), minlength=count + 1)
        expected, links = {}, {}
        for label_id, track in self.tracks.items():
            box, mask = track.expected(labels.shape)
            overlap = np.bincount(pieces[box][mask], minlength=count + 1)
            overlap[0] = 0
            area = int(mask.sum())
            linked = np.flatnonzero(overlap >= LINK_SHARE * np.minimum(area, piece_area))
            linked = linked[overlap[linked] > 0]
            if area >= MIN_AREA and overlap[linked].sum() >= SUPPORT_SHARE * area:
                expected[label_id], links[label_id] = (box, mask), linked
        for label_id in [i for i in self.tracks if i not in expected]:
            self.end(label_id)
        owners: dict[int, list[int]] = {}
        for label_id, linked in links.items():
            for piece in linked:
                owners.setdefault(int(piece), []).append(label_id)
        owner = np.zeros(count + 1, labels.dtype)  # each piece's one owner (0: none, or several)
        for piece, ids in owners.items():
            owner[piece] = ids[0] if len(ids) == 1 else 0
        out = np.where(followed, owner[pieces], labels).astype(labels.dtype, copy=False)
        overlapping = set()
        for piece, ids in owners.items():
            if len(ids) > 1:
                overlapping.update(_split(out, pieces == piece, {i: expected[i] for i in ids}))
        for label_id in expected:
            region = out == label_id
            if not self._update(label_id, region, coast=label_id in overlapping):
                out[region] = 0  # (a few pixels left of an object that ends)
        return out

    def follow_foreground(self, labels: np.ndarray) -> np.ndarray:
        """`follow` for a frame painted as the objects' foreground (any id non-zero): its pieces go to the
        objects as a painting in their colours would."""
        labels = np.asarray(labels)
        if not self.ids:
            return np.zeros_like(labels)
        return self.follow(np.where(labels != 0, self.ids[0], 0).astype(np.asarray(self.ids).dtype))

    def end(self, label_id: int) -> None:
        """Stop following `label_id`: it is not painted again in this run."""
        self.tracks.pop(label_id, None)
        self.ended.append(label_id)

    def _update(self, label_id: int, region: np.ndarray, coast: bool) -> bool:
        """The track after this frame: moved on unchanged while it overlaps another, else its own region.
        False when the region is too small and the object ends."""
        track = self.tracks[label_id]
        if coast:
            track.corner = track.corner + track.velocity
            return True
        rows, cols = np.nonzero(region)
        if len(rows) < MIN_AREA:
            self.end(label_id)
            return False
        box = slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1)
        before = track.corner + np.mean(np.nonzero(track.mask), axis=1)
        after = np.array([rows.mean(), cols.mean()])
        track.velocity = track.velocity + VELOCITY_STEP * (after - before - track.velocity)
        track.mask, track.corner = region[box], np.array([box[0].start, box[1].start], float)
        return True


def _split(out: np.ndarray, piece: np.ndarray, expected: dict) -> set[int]:
    """Paint `piece` (H, W bool) in `out` between the objects of `expected` ({id: (box, mask)}): each pixel
    to the nearest expected region, ties (inside several) to the nearest expected centre. Returns the ids
    whose expected region overlaps another's by OVERLAP_SHARE or more."""
    from scipy import ndimage

    rows, cols = np.nonzero(piece)
    ids = list(expected)
    cost = np.empty((len(ids), len(rows)))
    regions = np.zeros((len(ids), *out.shape), bool)
    for n, label_id in enumerate(ids):
        box, mask = expected[label_id]
        region = regions[n]
        region[box] = mask
        inside_rows, inside_cols = np.nonzero(region)
        distance = ndimage.distance_transform_edt(~region)[rows, cols]
        centre = np.hypot(rows - inside_rows.mean(), cols - inside_cols.mean())
        cost[n] = distance + 1e-3 * centre
    out[rows, cols] = np.asarray(ids)[np.argmin(cost, axis=0)]
    covered = regions.sum(0) > 1
    return {label_id for label_id, region in zip(ids, regions)
            if np.count_nonzero(region & covered) >= OVERLAP_SHARE * np.count_nonzero(region)}
