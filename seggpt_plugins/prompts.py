"""Prompts: prepared example sets, learned prompts, and which examples a target is shown.

    prompts = model.prepare_prompts(images, masks)        # PromptSet: read, coloured, resized once
    model.segment(targets, prompts)                        # reused for every target (SAM 2's set_image/predict)

    pool = PromptPool(keys, load)                          # many candidate examples, described once
    chosen = pool.choose(target_rgb, k=4)                  # the k most alike in appearance
    images, masks = pool.pairs(chosen)

Choosing examples is done one way for every adapter: `nearest` (stack slices: the closest indices),
`most_similar` (image collections: the closest appearance descriptors), `spread` (evenly over a set).
Numpy and Pillow only; torch is imported by the methods that hold tensors.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .colors import ColorCode
from .errors import InputError

TUNED_PROMPT_SUFFIX = ".safetensors"
TUNED_PROMPT_FORMAT = "seggpt-tuned-prompt/1"
DESCRIPTOR_SIZE = 16 * 16 + 32 + 16  # see describe()
POOL_CACHE = 64  # decoded example pairs a PromptPool keeps in memory (descriptors are all kept)


# ------------------------------------------------------------------------------------ prepared prompts


@dataclass
class PromptSet:
    """Prepared prompts for one or more targets: model-size tensors on the device and their colour code.

    Made by `SegGPT.prepare_prompts`; pass it to `segment`/`iter_segment` in place of prompt images and
    masks to reuse it (one PromptSet for all targets, or a list with one per target).
    """

    images: Any  # (P, 3, h, w) normalised, model dtype
    masks: Any  # (P, 3, h, w) normalised, model dtype
    code: ColorCode
    sizes: tuple = ()  # (H, W) of each example as given: the scale at which "auto" tiles a target
    examples: Any = None  # quality.ExampleStats of the example masks (None for tuned prompts alone)
    shown: tuple | None = None  # the label ids the example masks hold (None: all of the code's, e.g. tuned)
    ids_are_objects: bool = False  # the examples' ids numbered objects, shown as one class (example_ids.py)
    intensity_range: tuple | None = None  # the range that made its 16-bit/float examples 8-bit (for targets too)
    weights: Any = None  # (P,) float on the CPU: each prompt's weight in the ensemble (None: all equal)
    base: "PromptSet | None" = field(default=None, repr=False, compare=False)  # extended(): the set its own
    #                                      examples came from (its first len(base) rows); None: all rows are

    def __len__(self) -> int:
        return self.images.shape[0]

    def row_weights(self):
        """(P,) float on the CPU: each prompt's weight in the ensemble (ones when all are equal)."""
        import torch

        return self.weights if self.weights is not None else torch.ones(len(self))

    def extended(self, images, masks, weight: float = 1.0) -> "PromptSet":
        """This set with more prompt rows (P', 3, h, w) after its own, in the same colour code, each weighing
        `weight` in the ensemble where one of its own weighs 1 (as before). Its `base` is the set of its own
        examples (a propagation run's fixed prompts, its memory after them)."""
        import torch

        weights = None
        if weight != 1.0 or self.weights is not None:
            weights = torch.cat([self.row_weights(), torch.full((images.shape[0],), float(weight))])
        return PromptSet(torch.cat([self.images, images]), torch.cat([self.masks, masks]), self.code, self.sizes,
                         self.examples, self.shown, self.ids_are_objects, self.intensity_range, weights,
                         self.base if self.base is not None else self)

    def first(self, count: int | None) -> "PromptSet":
        """The first `count` prompts (all of them for None)."""
        if count is None or count >= len(self):
            return self
        return PromptSet(self.images[:count], self.masks[:count], self.code, self.sizes, self.examples, self.shown,
                         self.ids_are_objects, self.intensity_range,
                         None if self.weights is None else self.weights[:count])

    @staticmethod
    def concat(sets: Sequence["PromptSet"]) -> "PromptSet":
        """The prompts of several sets in one (they must share a colour code)."""
        import torch

        from .quality import ExampleStats

        return PromptSet(torch.cat([s.images for s in sets]), torch.cat([s.masks for s in sets]), sets[0].code,
                         tuple(size for s in sets for size in s.sizes),
                         ExampleStats.combine([s.examples for s in sets]),
                         None if any(s.shown is None for s in sets) else
                         tuple(sorted(set().union(*(s.shown for s in sets)))),
                         all(s.ids_are_objects for s in sets), sets[0].intensity_range,
                         None if all(s.weights is None for s in sets) else
                         torch.cat([s.row_weights() for s in sets]))


@dataclass
class TunedPrompt:
    """A learned in-context prompt (image and mask canvases at model size) used in place of an example pair."""

    image: Any  # (3, h, w) float tensor, normalised
    mask: Any  # (3, h, w) float tensor, normalised
    code: ColorCode
    seg_type: str = "instance"

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        from .io import atomic_write

        path = Path(path)
        meta = {"ids": json.dumps(self.code.ids.tolist()), "colors": json.dumps(self.code.colors.tolist()),
                "seg_type": self.seg_type, "format": TUNED_PROMPT_FORMAT}
        tensors = {"image": self.image.detach().float().cpu().contiguous(),
                   "mask": self.mask.detach().float().cpu().contiguous()}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), overwrite=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TunedPrompt":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != TUNED_PROMPT_FORMAT:
                    raise InputError(f"{path}: not a tuned prompt file (written by `seggpt tune-prompt`)")
                image, mask = f.get_tensor("image"), f.get_tensor("mask")
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{path}: cannot read a tuned prompt ({exc})") from None
        code = ColorCode(np.asarray(json.loads(meta["ids"]), np.int64),
                         np.asarray(json.loads(meta["colors"]), np.uint8).reshape(-1, 3))
        return cls(image, mask, code, meta.get("seg_type", "instance"))


def as_list(obj) -> list:
    """None -> [], a list or tuple -> a list of its items, anything else -> [it]."""
    if obj is None:
        return []
    return list(obj) if isinstance(obj, (list, tuple)) else [obj]


def is_tuned(obj) -> bool:
    """A TunedPrompt, or the path of one (a .safetensors file)."""
    return isinstance(obj, TunedPrompt) or (
        isinstance(obj, (str, os.PathLike)) and str(obj).endswith(TUNED_PROMPT_SUFFIX))


# ------------------------------------------------------------------------------------- choosing examples


def nearest(indices: Sequence[int], target: int, count: int | None) -> list[int]:
    """The `count` indices closest to `target` (ties: the lower first); all of them, ordered, for None."""
    ordered = sorted(indices, key=lambda i: (abs(i - target), i))
    return ordered if count is None else ordered[:count]


def spread(indices: Sequence[int], count: int) -> list[int]:
    """At most `count` of `indices`, evenly spread over them (keeps the first and last)."""
    indices = sorted(indices)
    if len(indices) <= count:
        return indices
    picks = np.unique(np.linspace(0, len(indices) - 1, count).round().astype(int))
    return [indices[k] for k in picks]


def describe(rgb8: np.ndarray) -> np.ndarray:
    """An appearance descriptor (unit vector of DESCRIPTOR_SIZE floats) for choosing similar examples.

    Three equally weighted parts: a standardised 16x16 grey thumbnail (layout), a 32-bin intensity
    histogram and a 16-bin gradient-magnitude histogram (both square-rooted: texture and contrast).
    Dot products rank examples by similarity. Large images are reduced to at most 256 pixels first.
    """
    from PIL import Image

    grey = np.asarray(rgb8, np.float32)
    grey = grey.mean(axis=-1) if grey.ndim == 3 else grey
    image = Image.fromarray(grey, mode="F")
    longest = max(image.size)
    if longest > 256:
        scale = 256.0 / longest
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BOX)
        grey = np.asarray(image, np.float32)
    parts = []
    layout = np.asarray(image.resize((16, 16), Image.BOX), np.float32).ravel()
    parts.append(layout - layout.mean())
    parts.append(np.sqrt(np.histogram(grey, bins=32, range=(0, 256))[0].astype(np.float32)))
    gy, gx = np.gradient(grey) if min(grey.shape) > 1 else (np.zeros_like(grey), np.zeros_like(grey))
    parts.append(np.sqrt(np.histogram(np.hypot(gx, gy), bins=16, range=(0, 128))[0].astype(np.float32)))
    parts = [p / (np.linalg.norm(p) or 1.0) for p in parts]
    return (np.concatenate(parts) / np.sqrt(len(parts))).astype(np.float32)


def most_similar(descriptor: np.ndarray, pool: np.ndarray, k: int) -> tuple[int, ...]:
    """Indices of the k `pool` rows most similar to `descriptor` (all of them when k >= len(pool)), sorted:
    the same examples always make the same key, so a prepared PromptSet can be reused for them."""
    if k >= len(pool):
        return tuple(range(len(pool)))
    order = np.argsort(-(pool @ descriptor), kind="stable")[:k]
    return tuple(sorted(int(i) for i in order))


def _mask_values(mask) -> np.ndarray:
    """The distinct values of a mask, shaped as a small mask of the same kind (ids (N, 1), colours (N, 1, 3))."""
    mask = np.asarray(mask)
    if mask.ndim == 3:
        return np.unique(mask.reshape(-1, mask.shape[-1]), axis=0)[:, None, :]
    return np.unique(mask)[:, None]


class PromptPool:
    """Candidate example pairs for a collection of targets: each target is shown the k most alike.

    `load(i)` returns pair i as (image (H, W, 3) uint8, mask); every pair is loaded once to be described,
    and at most `cache` pairs stay in memory (the pool may be large). `keys` name the pairs (sample or
    task ids) for the caller's records.
    """

    def __init__(self, keys: Sequence, load: Callable[[int], tuple[np.ndarray, Any]], cache: int = POOL_CACHE):
        self.keys = list(keys)
        self._load = load
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = max(1, cache)
        self.descriptors = np.zeros((len(self.keys), DESCRIPTOR_SIZE), np.float32)
        self._values: list[np.ndarray] = []
        for i in range(len(self.keys)):
            pair = self._load(i)
            self.descriptors[i] = describe(pair[0])
            self._values.append(_mask_values(pair[1]))
            self._remember(i, pair)

    @classmethod
    def from_pairs(cls, keys: Sequence, pairs: Sequence[tuple[np.ndarray, Any]],
                   descriptors: np.ndarray | None = None) -> "PromptPool":
        """A pool of pairs already in memory (descriptors computed here unless given, one row per pair)."""
        pool = cls.__new__(cls)
        pool.keys, pool._load = list(keys), lambda i: pairs[i]
        pool._cache, pool._cache_size = OrderedDict(enumerate(pairs)), max(1, len(pairs))
        pool.descriptors = (np.asarray(descriptors, np.float32) if descriptors is not None else
                            np.stack([describe(p[0]) for p in pairs]) if len(pairs) else
                            np.zeros((0, DESCRIPTOR_SIZE), np.float32))
        pool._values = [_mask_values(p[1]) for p in pairs]
        return pool

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def code(self) -> ColorCode:
        """One colour code over every pair's mask: each choice of examples paints each label alike."""
        return ColorCode.from_masks(self._values)

    def choose(self, target_rgb: np.ndarray, k: int, exclude: Sequence = ()) -> tuple[int, ...]:
        """The k pairs most alike `target_rgb` (sorted indices), leaving out the pairs whose key is in `exclude`."""
        allowed = [i for i, key in enumerate(self.keys) if key not in set(exclude)] if exclude else None
        if allowed is None:
            return most_similar(describe(target_rgb), self.descriptors, k)
        if not allowed:
            return ()
        picked = most_similar(describe(target_rgb), self.descriptors[allowed], k)
        return tuple(allowed[i] for i in picked)

    def pairs(self, indices: Sequence[int]) -> tuple[list, list]:
        """(images, masks) of the given pairs, loading those no longer cached."""
        images, masks = [], []
        for i in indices:
            pair = self._cache.get(i)
            if pair is None:
                pair = self._load(i)
            self._remember(i, pair)
            images.append(pair[0])
            masks.append(pair[1])
        return images, masks

    def _remember(self, i: int, pair) -> None:
        self._cache[i] = pair
        self._cache.move_to_end(i)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
