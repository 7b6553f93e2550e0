"""Plane bookkeeping for the widget: which 2D planes of an N-D layer to read, which are annotated,
and what Accept may write. Pure numpy (no Qt, no torch), so it is cheap to import and to test.

SegGPT works on 2D planes: the last two axes (Y, X) of a layer, plus the colour axis of RGB images.
The axes before them ("leading" axes: Z, T, or T and Z) index the planes. A `PlaneStack` is the line
of planes along one leading axis, with every other leading axis held at a fixed position; it reads
one plane at a time, so dask or zarr data is never loaded whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

#: Spatial dimensions the widget handles (2D, ZYX / TYX, TZYX), not counting the RGB colour axis.
SUPPORTED_NDIM = (2, 3, 4)


def level0(data):
    """Full-resolution data of a possibly multiscale layer."""
    if isinstance(data, (list, tuple)) or type(data).__name__ == "MultiScaleData":
        return data[0]
    return data


def spatial_shape(layer) -> tuple[int, ...]:
    """Shape of a layer without the RGB colour axis."""
    data = level0(layer.data)
    shape = tuple(int(s) for s in data.shape)
    return shape[:-1] if getattr(layer, "rgb", False) else shape


@dataclass(frozen=True, eq=False)
class PlaneStack(Sequence):
    """The planes of `data` along leading axis `axis`, the other leading axes fixed at `position`.

    `axis=None` (2D data, or "all planes" use) makes a stack of one plane at `position`.
    `stack[i]` is a numpy array (H, W) or (H, W, C); only that plane is read.
    """

    data: Any
    leading: int  # number of leading axes (ndim - 2 without the colour axis)
    axis: int | None
    position: tuple[int, ...]  # one index per leading axis

    def __len__(self) -> int:
        return 1 if self.axis is None else int(self.data.shape[self.axis])

    def key(self, i: int) -> tuple[int, ...]:
        """Index tuple (leading axes only) of plane `i`."""
        idx = list(self.position)
        if self.axis is not None:
            n = len(self)
            if not -n <= i < n:
                raise IndexError(f"plane {i} is outside 0..{n - 1}")
            idx[self.axis] = int(i) % n
        elif i not in (0, -1):
            raise IndexError(f"plane {i}: this stack has one plane")
        return tuple(idx)

    def __getitem__(self, i):
        if isinstance(i, slice):
            raise TypeError("PlaneStack reads one plane at a time; index it with an int")
        return np.asarray(self.data[self.key(i)])

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]


def annotated_planes(stack: PlaneStack) -> list[int]:
    """Indices of the planes in `stack` holding any non-zero label (each is an example for SegGPT)."""
    data = stack.data
    if isinstance(data, np.ndarray) and stack.axis is not None:
        key = list(stack.position)
        key[stack.axis] = slice(None)
        line = data[tuple(key)]
        flags = line.reshape(line.shape[0], -1).any(axis=1)
        return [int(i) for i in np.flatnonzero(flags)]
    return [i for i in range(len(stack)) if np.any(stack[i])]


def accept_indices(result: np.ndarray, dest: np.ndarray, keys=None) -> tuple[tuple[np.ndarray, ...], np.ndarray, int]:
    """What Accept writes: the result's labelled pixels in every plane where `dest` is still empty.

    Planes of `dest` holding any label (the user's annotations, or slices already fixed by hand) are
    never touched. `keys`: the only planes that may be written (index tuples of the leading axes, as
    `PlaneStack.key` gives them; `()` for 2D); None: every plane. Returns (fancy indices, values,
    number of planes written).
    """
    if result.shape != dest.shape:
        raise ValueError(f"result shape {result.shape} differs from the labels shape {dest.shape}")
    if result.ndim < 2:
        raise ValueError("labels must have at least two dimensions")
    allowed = ~np.any(dest != 0, axis=(-2, -1))  # one flag per plane (a 0-d array for 2D)
    if keys is not None:
        chosen = np.zeros(result.shape[:-2], bool)
        for key in keys:
            chosen[tuple(key)] = True
        allowed &= chosen
    write = (result != 0) & allowed[..., None, None]
    indices = np.nonzero(write)
    planes = int(np.count_nonzero(np.any(write, axis=(-2, -1))))
    return indices, result[indices], planes


def worst_first(scores: Sequence[tuple[Any, float]]) -> list[tuple[Any, float]]:
    """(item, confidence) pairs sorted by confidence, lowest first (ties keep their order): the review order."""
    return sorted(scores, key=lambda pair: pair[1])
