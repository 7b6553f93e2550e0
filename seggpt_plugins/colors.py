"""Colours and labels: how label ids become prompt colours, and how a painting becomes labels again.

SegGPT reads and writes masks as RGB paintings. A `ColorCode` maps each label id to a colour chosen
for maximum separation from black (background) and from the other colours in use; the decoder snaps
each painted pixel to the nearest of those colours and reports how clear the decision was.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .errors import InputError
from .images import distinct_values
from .vocabulary import MAX_CLASSES

MIN_SEPARATION = 51.0  # Euclidean RGB distance between the two closest colours at MAX_CLASSES


@lru_cache(maxsize=1)
def _farthest_point_order() -> np.ndarray:
    """Colours of a 16-level RGB lattice in greedy farthest-point order, starting from black."""
    levels = np.arange(0, 256, 17, dtype=np.float64)
    candidates = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    distance = np.linalg.norm(candidates, axis=1)  # to black
    order = []
    for _ in range(MAX_CLASSES):
        i = int(np.argmax(distance))
        order.append(candidates[i])
        distance = np.minimum(distance, np.linalg.norm(candidates - candidates[i], axis=1))
    return np.asarray(order, dtype=np.uint8)


def palette(num_colors: int) -> np.ndarray:
    """`num_colors` RGB colours (uint8, (K, 3)) as far from black and from each other as the lattice allows."""
    if num_colors > MAX_CLASSES:
        raise InputError(
            f"{num_colors} classes is more than the {MAX_CLASSES} that SegGPT's colour prompt can keep apart "
            f"(colours must stay at least {MIN_SEPARATION:.0f} RGB units apart); split the labels into "
            "several runs or merge classes (for many instances, try a foreground mask)"
        )
    return _farthest_point_order()[:num_colors].copy()


@dataclass(frozen=True)
class ColorCode:
    """Label ids (sorted, > 0) and the RGB colour that stands for each in prompts and paintings."""

    ids: np.ndarray  # (K,) int64
    colors: np.ndarray  # (K, 3) uint8

    @classmethod
    def for_ids(cls, ids) -> "ColorCode":
        ids = np.unique(np.asarray(list(ids), dtype=np.int64))
        ids = ids[ids != 0]
        if ids.size and ids.min() < 0:
            raise InputError(f"label ids must be >= 0, got {ids.min()}")
        return cls(ids, palette(len(ids)))

    @classmethod
    def for_colors(cls, colors) -> "ColorCode":
        """RGB prompts: labels 1..K over the distinct non-black colours in sorted order."""
        colors = np.unique(np.asarray(colors, dtype=np.uint8).reshape(-1, 3), axis=0)
        colors = colors[np.any(colors != 0, axis=1)]
        if len(colors) > MAX_CLASSES:
            raise InputError(
                f"the colour masks hold {len(colors)} distinct non-black colours, more than the {MAX_CLASSES} "
                "classes SegGPT can keep apart (an antialiased or JPEG mask? save masks as PNG label maps)"
            )
        return cls(np.arange(1, len(colors) + 1, dtype=np.int64), colors)

    @classmethod
    def from_masks(cls, masks) -> "ColorCode":
        """The code for a set of prompt masks: all label masks, or all RGB colour masks."""
        masks = list(masks)
        kinds = {m.ndim for m in masks}
        if len(kinds) > 1:
            raise InputError("prompt masks mix label masks (H, W) and colour masks (H, W, 3); use one kind")
        if kinds == {3}:
            return cls.for_colors(np.concatenate([np.unique(m.reshape(-1, 3), axis=0) for m in masks]))
        return cls.for_ids(np.unique(np.concatenate([distinct_values(m) for m in masks])) if masks else [])

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def all_colors(self) -> np.ndarray:
        """(K + 1, 3) uint8: black first, then the label colours."""
        return np.concatenate([np.zeros((1, 3), np.uint8), self.colors])

    @property
    def all_ids(self) -> np.ndarray:
        """(K + 1,) int64: 0 first, then the label ids."""
        return np.concatenate([np.zeros(1, np.int64), self.ids])

    def as_dict(self) -> dict[int, tuple[int, int, int]]:
        return {int(i): tuple(int(v) for v in c) for i, c in zip(self.ids, self.colors)}

    def encode(self, mask: np.ndarray, name: str = "mask") -> np.ndarray:
        """A label mask (H, W) or colour mask (H, W, 3) as the RGB painting the model reads."""
        if mask.ndim == 3:
            self.labels_of_colors(mask, name)  # validates the colours
            return mask.astype(np.uint8, copy=False)
        index = self._lookup(self.ids, mask.astype(np.int64), name, "label ids")
        return self.all_colors[index]

    def labels_of_colors(self, rgb: np.ndarray, name: str = "mask") -> np.ndarray:
        """Exact colour-to-label lookup for colour masks (each colour must belong to this code)."""
        pack = lambda c: c[..., 0].astype(np.int64) << 16 | c[..., 1].astype(np.int64) << 8 | c[..., 2]  # noqa: E731
        return self.all_ids[self._lookup(pack(self.colors), pack(rgb), name, "colours")]

    @staticmethod
    def _lookup(keys: np.ndarray, values: np.ndarray, name: str, what: str) -> np.ndarray:
        """Index into all_ids/all_colors (0 = background) of each value; values must be 0 or in `keys`."""
        if len(keys) == 0:
            if np.any(values != 0):
                raise InputError(f"{name}: {what} {np.unique(values[values != 0])[:10].tolist()} are not in this "
                                 "prompt set")
            return np.zeros(values.shape, np.int64)
        if (keys.min() >= 0 and keys.max() < 1 << 16 and values.dtype.kind in "ui" and values.size
                and values.min() >= 0):  # label ids: a table
            table = np.zeros(int(keys.max()) + 2, np.int64)  # (its last entry: any value beyond the ids)
            table[keys] = np.arange(1, len(keys) + 1)
            index = table[np.minimum(values, len(table) - 1)]
        else:  # any keys (packed colours): a sorted search
            order = np.argsort(keys)
            sorted_keys = keys[order]
            pos = np.clip(np.searchsorted(sorted_keys, values), 0, len(keys) - 1)
            index = np.where(sorted_keys[pos] == values, order[pos] + 1, 0)
        unknown = (index == 0) & (values != 0)
        if unknown.any():
            raise InputError(f"{name}: {what} {np.unique(values[unknown])[:10].tolist()} are not in this prompt set")
        return index


def color_distances(painting, colors):
    """Euclidean RGB distance of every pixel to every colour.

    painting: (B, 3, H, W) float in 0..255; colors: (B or 1, K+1, 3) float, black first.
    Returns (B, K+1, H, W) float32.
    """
    import torch

    batch, _, height, width = painting.shape
    flat = painting.flatten(2).transpose(1, 2).float()  # (B, H*W, 3)
    distance = torch.cdist(flat, colors.float().expand(batch, -1, -1))  # (B, H*W, K+1)
    return distance.transpose(1, 2).reshape(batch, colors.shape[1], height, width)


#: favour_background measures a pixel's distance to the foreground as its distance to the nearest blend of
#: its two nearest label colours (the segment between them), not to the nearest colour alone: with one
#: colour per nucleus, stardist's tiles read 0.57 rather than 0.42 at margin 0.7, generated tasks the same
#: (BENCHMARKS.md section 19, eval_margin_classes.py)
MARGIN_AGAINST_BLENDS = True


def favour_background(distance, margin: float, colors=None):
    """Distances (B, K+1, H, W) with the background's (index 0) scaled so that a pixel takes a label only
    when its painting is nearer the foreground than black by at least `margin`, in decide()'s terms:
    (d_background - d_foreground) / (d_background + d_foreground) >= margin. 0: the plain nearest colour.

    d_foreground is the distance to the nearest label's colour; with `colors` ((1 or B, K+1, 3), black first)
    and MARGIN_AGAINST_BLENDS, to the nearest blend of the two nearest labels' colours (a pixel the model
    paints between two labels is foreground, however far from both). A pixel that takes a label takes the
    nearest one, as without a margin."""
    if not margin:
        return distance
    distance = distance.clone()
    scale = (1.0 - margin) / (1.0 + margin)
    if colors is None or not MARGIN_AGAINST_BLENDS or distance.shape[1] < 3:
        distance[:, 0] *= scale
        return distance
    nearest = _distance_to_blends(distance[:, 1:], colors[:, 1:].float())  # (B, H, W)
    first = distance[:, 1:].min(1).values  # (B, H, W): to the nearest label's colour, >= nearest
    distance[:, 0] *= scale * first.clamp_min(1e-6) / nearest.clamp_min(1e-6)  # background iff scale * d_bg > nearest
    return distance


def _distance_to_blends(label_distance, label_colors):
    """Each pixel's distance to the segment between its two nearest label colours. label_distance
    (B, K, H, W), label_colors (1 or B, K, 3) -> (B, H, W); from the triangle of the two distances and the
    colours' own distance, so the painting itself is not needed."""
    import torch

    batch, labels, height, width = label_distance.shape
    two = label_distance.topk(2, dim=1, largest=False)
    d_a, d_b = two.values[:, 0], two.values[:, 1]  # (B, H, W)
    gaps = torch.cdist(label_colors, label_colors).expand(batch, -1, -1).reshape(batch, labels * labels)
    pair = (two.indices[:, 0] * labels + two.indices[:, 1]).reshape(batch, -1)
    gap = gaps.gather(1, pair).reshape(batch, height, width).clamp_min(1e-6)  # |colour a - colour b|
    along = (d_a ** 2 - d_b ** 2 + gap ** 2) / (2 * gap)  # the pixel's projection onto a->b, from a
    height_above = (d_a ** 2 - along ** 2).clamp_min(0).sqrt()
    return torch.where((along > 0) & (along < gap), height_above, d_a)


def decide(distance):
    """Nearest colour and confidence from (B, K+1, H, W) distances.

    Returns (index (B, H, W) long into the colours, score (B, H, W) float32): the margin
    (d2 - d1) / (d2 + d1) between the nearest (d1) and second-nearest (d2) colour, 1 on a colour and
    0 halfway between two.
    """
    import torch

    if distance.shape[1] == 1:
        shape = (distance.shape[0], *distance.shape[2:])
        return torch.zeros(shape, dtype=torch.long, device=distance.device), torch.ones(shape, device=distance.device)
    two = distance.topk(2, dim=1, largest=False)
    d1, d2 = two.values[:, 0], two.values[:, 1]
    return two.indices[:, 0], ((d2 - d1) / (d2 + d1).clamp_min(1e-6)).float()


def resize_rows(maps, size: tuple[int, int], start: int, stop: int):
    """Rows start..stop of a bilinear resize of (B, C, h, w) maps to `size`, as F.interpolate(align_corners=False)
    would give them, without materialising the whole output (bilinear is separable)."""
    import torch
    import torch.nn.functional as F

    height, width = maps.shape[-2:]
    if width != size[1]:
        maps = F.interpolate(maps, size=(height, size[1]), mode="bilinear", align_corners=False)
    if height == size[0]:
        return maps[:, :, start:stop]
    y = ((torch.arange(start, stop, device=maps.device, dtype=torch.float32) + 0.5) * (height / size[0]) - 0.5)
    y = y.clamp_min(0)
    y0 = y.floor().long().clamp_max(height - 1)
    y1 = (y0 + 1).clamp_max(height - 1)
    weight = (y - y0.float()).view(1, 1, -1, 1)
    return maps[:, :, y0] * (1 - weight) + maps[:, :, y1] * weight


def restrict_to_neighbours(distance, confident_score: float = 0.3, radius: int = 2):
    """Keep uncertain pixels from snapping to a colour that is not around them.

    At a boundary the model paints a blend of the two colours, and a blend can lie nearest a third
    colour, which would leave thin fringes of a label that is not there. Pixels whose margin is below
    `confident_score` may only take a colour that confident pixels show within `radius` pixels (when
    there are any): other colours get a large distance. distance: (B, K+1, H, W), modified copy returned.
    """
    import torch
    import torch.nn.functional as F

    index, score = decide(distance)
    confident = score >= confident_score  # (B, H, W)
    present = F.one_hot(index, distance.shape[1]).permute(0, 3, 1, 2).float() * confident[:, None]
    nearby = F.max_pool2d(present, 2 * radius + 1, stride=1, padding=radius) > 0  # (B, K+1, H, W)
    allowed = nearby | confident[:, None] | ~nearby.any(1, keepdim=True)
    return torch.where(allowed, distance, distance + 1e4)


def snap(painting, colors):
    """Nearest-colour decoding of a painting: (B, 3, H, W) in 0..255 and (B, K+1, 3) colours -> decide()."""
    return decide(color_distances(painting, colors))
