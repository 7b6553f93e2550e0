"""How inputs meet the canvas: tiles with a halo for large targets, and the paper's spatial ensemble.

The model sees a fixed canvas per image (448x448 for ViT-L, 128x128 for the demo model). A large
target is cut into overlapping tiles at its own scale; every tile is segmented with the same prompts
(tiles are just more targets in a batch) and the results are stitched back:

    grid = tile_grid((H, W), tile=(512, 512), halo=32)    # Tile: the part read, and the core it decides
    stitch = Stitcher((H, W))
    stitch.add(grid[k], labels_k, scores_k)                # each pixel's label from the tile whose core holds it
    labels, scores = stitch.result()                       # scores blended across the halos

Examples larger than the tile are cut to their window with the most labelled pixels
(`example_windows`), so examples and targets meet the canvas at one scale; tile "auto" is a few
object diameters of the examples (`object_tile`).

Numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .images import distinct_values
from .instances import connected_components

ENSEMBLES = ("feature", "spatial", "both")


# ------------------------------------------------------------------------------------------- tiling


@dataclass(frozen=True)
class Tile:
    """A window of the target: `box` is what the model sees (rows r0:r1, columns c0:c1), `core` the part
    of it whose labels the stitched result takes (the cores of a grid cover the image exactly once)."""

    box: tuple[int, int, int, int]
    core: tuple[int, int, int, int]

    @property
    def slices(self) -> tuple[slice, slice]:
        r0, r1, c0, c1 = self.box
        return slice(r0, r1), slice(c0, c1)


def tile_size(tile, halo: int = 0):
    """A tile setting -> None (no tiling), "auto" or (h, w); InputError names what is wrong."""
    if tile is None or tile == "auto":
        return tile
    if isinstance(tile, (int, np.integer)) and not isinstance(tile, bool):
        tile = (int(tile), int(tile))
    if (not isinstance(tile, (tuple, list)) or len(tile) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in tile)):
        raise InputError(f"tile must be None, 'auto', a number of pixels or (height, width), got {tile!r}")
    if isinstance(halo, bool) or not isinstance(halo, (int, np.integer)) or halo < 0:
        raise InputError(f"halo must be a whole number of pixels >= 0, got {halo!r}")
    if min(tile) < 2 or 2 * halo >= min(tile):
        raise InputError(f"a {tile[1]}x{tile[0]} tile with a halo of {halo} leaves no core: tiles need at least "
                         f"2 pixels and a halo below half the tile")
    return int(tile[0]), int(tile[1])


def _spans(length: int, tile: int, halo: int) -> list[tuple[int, int, int, int]]:
    """(start, stop, core start, core stop) along one axis: cores of at most tile - 2 * halo pixels that
    cover 0..length, each inside a window of `tile` pixels (shifted inward at the borders)."""
    if length <= tile:
        return [(0, length, 0, length)]
    core = tile - 2 * halo
    count = math.ceil(length / core)
    edges = np.linspace(0, length, count + 1).round().astype(int)
    spans = []
    for a, b in zip(edges[:-1], edges[1:]):
        start = int(min(max(a - halo, 0), length - tile))
        spans.append((start, start + tile, int(a), int(b)))
    return spans


def tile_grid(shape: tuple[int, int], tile: tuple[int, int], halo: int) -> list[Tile]:
    """The tiles of an image of `shape` (H, W): windows of `tile` (h, w) pixels overlapping by `halo` on
    each side; one tile when the image fits. InputError when the halo leaves no core."""
    (height, width), (tile_h, tile_w) = shape[:2], tile
    if tile_h < 2 or tile_w < 2 or halo < 0:
        raise InputError(f"tile must be at least 2x2 pixels and halo >= 0, got tile {tile_w}x{tile_h}, halo {halo}")
    if 2 * halo >= min(tile_h, tile_w):
        raise InputError(f"halo {halo} leaves no core in a {tile_w}x{tile_h} tile: use a halo below "
                         f"{min(tile_h, tile_w) // 2}")
    rows, cols = _spans(height, tile_h, halo), _spans(width, tile_w, halo)
    return [Tile((r0, r1, c0, c1), (a, b, c, d)) for r0, r1, a, b in rows for c0, c1, c, d in cols]


def _ramp(length: int, start: int, stop: int, core_start: int, core_stop: int, full: int) -> np.ndarray:
    """Blending weights along one axis of a tile: 1 over the core, falling linearly through the halo to
    near 0 at the tile's edge (no fall at the image's own border)."""
    position = np.arange(start, stop, dtype=np.float32)
    weight = np.ones(stop - start, np.float32)
    if core_start > start:
        weight = np.minimum(weight, (position - start + 1) / (core_start - start + 1))
    if core_stop < stop and stop < full:
        weight = np.minimum(weight, (stop - position) / (stop - core_stop + 1))
    return weight


class Stitcher:
    """The full-size result of a tiled target: labels from the cores, scores blended over the halos."""

    def __init__(self, shape: tuple[int, int], label_dtype=np.int64, with_painting: bool = False):
        self.shape = tuple(shape[:2])
        self.labels = np.zeros(self.shape, label_dtype)
        self._score_sum = np.zeros(self.shape, np.float32)
        self._weight_sum = np.zeros(self.shape, np.float32)
        self.painting = np.zeros((*self.shape, 3), np.uint8) if with_painting else None

    def add(self, tile: Tile, labels: np.ndarray, scores: np.ndarray, painting: np.ndarray | None = None) -> None:
        r0, r1, c0, c1 = tile.box
        a, b, c, d = tile.core
        core = (slice(a - r0, b - r0), slice(c - c0, d - c0))
        self.labels[a:b, c:d] = labels[core]
        if self.painting is not None and painting is not None:
            self.painting[a:b, c:d] = painting[core]
        weight = np.outer(_ramp(r1 - r0, r0, r1, a, b, self.shape[0]), _ramp(c1 - c0, c0, c1, c, d, self.shape[1]))
        self._score_sum[r0:r1, c0:c1] += weight * scores
        self._weight_sum[r0:r1, c0:c1] += weight

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return self.labels, self._score_sum / np.maximum(self._weight_sum, 1e-6)


def auto_tile(prompt_sizes, target_shape: tuple[int, int]) -> tuple[int, int] | None:
    """The tile size that shows a target at the examples' own scale: the examples' median size (None when
    the target is no larger, or no example size is known). Examples cut to windows (`example_windows`)
    report the windows' size, so a target is tiled like its examples were."""
    if not prompt_sizes:
        return None
    tile = (int(np.median([s[0] for s in prompt_sizes])), int(np.median([s[1] for s in prompt_sizes])))
    return tile if target_shape[0] > tile[0] or target_shape[1] > tile[1] else None


#: "auto" tiles are this many object diameters on a side (benchmarks/eval_tiling.py measures 4 to 12).
OBJECTS_PER_TILE = 6
MIN_AUTO_TILE = 32


def object_diameter(masks) -> float | None:
    """The examples' typical object size: the median over their objects (connected parts of one label or
    colour) of sqrt(area), in pixels; parts under 4 pixels are ignored. None when there are no objects."""
    areas = []
    for mask in masks:
        mask = np.asarray(mask)
        if mask.ndim == 3:  # a colour mask: one key per colour
            mask = (mask[..., 0].astype(np.int64) << 16) | (mask[..., 1].astype(np.int64) << 8) | mask[..., 2]
        parts, count = connected_components(mask != 0, connectivity=4)
        if not count:
            continue
        foreground = parts > 0  # a part holding several labels (touching instances) counts once per label
        keys = parts[foreground].astype(np.int64) * (int(mask.max()) + 1) + mask[foreground]
        areas.extend(int(a) for a in distinct_values(keys, return_counts=True)[1] if a >= 4)
    return float(np.sqrt(np.median(areas))) if areas else None


def object_tile(masks, per_tile: float = OBJECTS_PER_TILE, at_least=(MIN_AUTO_TILE, MIN_AUTO_TILE)
                ) -> tuple[int, int] | None:
    """The "auto" tile: `per_tile` typical object diameters on a side (a multiple of 8), and at least
    `at_least` (h, w) (the model's canvas: a tile smaller than it would only be enlarged), so objects fill
    the canvas alike in examples and targets; None without objects."""
    diameter = object_diameter(masks)
    if diameter is None:
        return None
    side = max(MIN_AUTO_TILE, int(math.ceil(diameter * per_tile / 8)) * 8)
    return max(side, int(at_least[0])), max(side, int(at_least[1]))


def auto_halo(tile: tuple[int, int], halo: int) -> int:
    """The halo used with an "auto" tile: at most a quarter of it, so that every tile keeps a core."""
    return min(int(halo), min(tile) // 4)


def best_window(mask: np.ndarray, window: tuple[int, int]) -> tuple[slice, slice]:
    """The `window` (h, w) of a mask (H, W[, 3]) holding the most labelled pixels, searched on a grid of a
    quarter window (the whole mask when it fits); ties go to the first, top-left."""
    labelled = np.asarray(mask) != 0
    labelled = labelled.any(-1) if labelled.ndim == 3 else labelled
    height, width = labelled.shape
    win_h, win_w = min(window[0], height), min(window[1], width)
    total = np.zeros((height + 1, width + 1), np.int64)
    total[1:, 1:] = labelled.cumsum(0).cumsum(1)
    rows = np.unique(np.r_[np.arange(0, height - win_h + 1, max(1, win_h // 4)), height - win_h])
    cols = np.unique(np.r_[np.arange(0, width - win_w + 1, max(1, win_w // 4)), width - win_w])
    r, c = rows[:, None], cols[None, :]
    counts = total[r + win_h, c + win_w] - total[r, c + win_w] - total[r + win_h, c] + total[r, c]
    i, j = np.unravel_index(int(np.argmax(counts)), counts.shape)
    return slice(int(rows[i]), int(rows[i]) + win_h), slice(int(cols[j]), int(cols[j]) + win_w)


def example_windows(pairs, tile, at_least=(MIN_AUTO_TILE, MIN_AUTO_TILE)) -> list:
    """Example pairs (image, mask, ...) cut to the window of `tile` (h, w) with the most labelled pixels,
    so that examples and a tiled target are seen at the same scale; pairs that fit stay whole. `tile`
    "auto" takes `object_tile` of the masks, at least `at_least` (nothing is cut without objects).
    Returns the new pairs."""
    if tile == "auto":
        tile = object_tile([pair[1] for pair in pairs], at_least=at_least)
    if tile is None:
        return list(pairs)
    out = []
    for image, mask, *rest in pairs:
        if image.shape[0] <= tile[0] and image.shape[1] <= tile[1]:
            out.append((image, mask, *rest))
            continue
        rows, cols = best_window(mask, tile)
        out.append((np.ascontiguousarray(image[rows, cols]), np.ascontiguousarray(mask[rows, cols]), *rest))
    return out


# ------------------------------------------------------------------------------ the spatial ensemble


def grid_side(count: int) -> int:
    """Examples per side of the spatial ensemble's grid: ceil(sqrt(K))."""
    return max(1, math.ceil(math.sqrt(count)))


def cells(size: tuple[int, int], side: int) -> list[tuple[int, int, int, int]]:
    """The (r0, r1, c0, c1) cells of a side x side grid over a canvas of `size` (h, w), row by row."""
    rows = np.linspace(0, size[0], side + 1).round().astype(int)
    cols = np.linspace(0, size[1], side + 1).round().astype(int)
    return [(int(rows[i]), int(rows[i + 1]), int(cols[j]), int(cols[j + 1])) for i in range(side) for j in range(side)]


def stitch_examples(images: list[np.ndarray], masks: list[np.ndarray], size: tuple[int, int]):
    """The spatial ensemble's prompt half: K examples (H, W, 3) uint8 images and (H, W, 3) uint8 colour
    masks, each resized into its cell of a g x g grid (g = ceil(sqrt(K))) of a canvas of `size`; images
    bicubic, masks nearest so that colours stay exact. Cells past K stay black (no example, background).
    Returns (image canvas (h, w, 3), mask canvas (h, w, 3)), both uint8."""
    from PIL import Image

    side = grid_side(len(images))
    image_canvas = np.zeros((*size, 3), np.uint8)
    mask_canvas = np.zeros((*size, 3), np.uint8)
    for (r0, r1, c0, c1), image, mask in zip(cells(size, side), images, masks):
        cell = (c1 - c0, r1 - r0)
        image_canvas[r0:r1, c0:c1] = np.asarray(Image.fromarray(image).resize(cell, Image.BICUBIC))
        mask_canvas[r0:r1, c0:c1] = np.asarray(Image.fromarray(mask).resize(cell, Image.NEAREST))
    return image_canvas, mask_canvas


def groups(count: int, ensemble: str, group_size: int = 4) -> list[list[int]]:
    """Which examples go on one canvas: all on one (spatial), one each (feature), or canvases of
    `group_size` combined by the feature ensemble (both: e.g. 16 examples as 4 canvases of 4)."""
    if ensemble not in ENSEMBLES:
        raise InputError(f"ensemble must be one of {ENSEMBLES}, got {ensemble!r}")
    if ensemble == "feature" or count == 1:
        return [[k] for k in range(count)]
    if ensemble == "spatial":
        return [list(range(count))]
    return [list(range(k, min(k + group_size, count))) for k in range(0, count, group_size)]
