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

#: The most classes one prompt set can hold: beyond it two colours would sit closer than MIN_SEPARATION.
MAX_CLASSES = 124
MIN_SEPARATION = 51.0  # Euclidean RGB distance between the two closest colours at MAX_CLASSES
BACKGROUND = (0, 0, 0)


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
    def from_masks(cls, masks, names=None) -> "ColorCode":
        """The code for a set of prompt masks: all label masks, or all RGB colour masks."""
        masks = list(masks)
        kinds = {m.ndim for m in masks}
        if len(kinds) > 1:
            raise InputError("prompt masks mix label masks (H, W) and colour masks (H, W, 3); use one kind")
        if kinds == {3}:
            return cls.for_colors(np.concatenate([np.unique(m.reshape(-1, 3), axis=0) for m in masks]))
        return cls.for_ids(np.unique(np.concatenate([np.unique(m) for m in masks])) if masks else [])

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
        order = np.argsort(keys)
        sorted_keys = keys[order]
        pos = np.clip(np.searchsorted(sorted_keys, values), 0, len(keys) - 1)
        hit = sorted_keys[pos] == values
        unknown = ~hit & (values != 0)
        if unknown.any():
            raise InputError(f"{name}: {what} {np.unique(values[unknown])[:10].tolist()} are not in this prompt set")
        return np.where(hit, order[pos] + 1, 0)


def snap(painting, colors):
    """Nearest-colour decoding of a painting.

    painting: (B, 3, H, W) float tensor in 0..255; colors: (B, K+1, 3) float tensor, black first.
    Returns (index (B, H, W) long into colors, score (B, H, W) float32). The score is the margin
    (d2 - d1) / (d2 + d1) between the nearest (d1) and second-nearest (d2) colour: 1 on a colour,
    0 halfway between two.
    """
    import torch

    # distance: (B, K+1, H, W)
    distance = torch.cdist(
        painting.flatten(2).transpose(1, 2).float(), colors.float()
    ).transpose(1, 2).reshape(painting.shape[0], colors.shape[1], *painting.shape[2:])
    if colors.shape[1] == 1:
        return torch.zeros(distance.shape[0:1] + distance.shape[2:], dtype=torch.long, device=painting.device), \
            torch.ones(distance.shape[0:1] + distance.shape[2:], device=painting.device)
    two = distance.topk(2, dim=1, largest=False)
    d1, d2 = two.values[:, 0], two.values[:, 1]
    score = (d2 - d1) / (d2 + d1).clamp_min(1e-6)
    return two.indices[:, 0], score.float()
