"""What the examples show, and what a target's pixels say: the quality estimate's view of the pixels.

`ExampleStats` is a naive per-pixel model of a task read off its examples: how often each label takes
each appearance (grey level or coarse colour, `appearance_bins`), each local mean and each local spread
(`texture_words`). It answers with lookup tables made once per example set (`posterior_by_bin`,
`foreground_by_bin`, `label_by_word`), so judging a target costs a gather, not a model. Also here:
`boundary_edges` (do a proposal's boundaries lie on the image's edges) and `agreement` (the mean IoU per
label of two label maps, one bincount). quality.py builds the estimate's features on these.

Everything is vectorised numpy (scipy for small filters): the examples are counted on a strided view of
at most COUNT_SIDE pixels a side, with texture words read at the pixel scale at that view's pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .ensembles import object_diameter
from .images import distinct_values, label_boundaries

GREY_LEVELS = 64  # appearance bins of grey images; colour images: 8 levels per channel (512 bins)
COLOUR_BINS = 512
MEAN_LEVELS, SPREAD_LEVELS = 16, 8  # texture words: levels of the local mean and of the local spread
TEXTURE_SIGMA = 1.0  # the Gaussian window (pixels) the texture words and the edges are read in
#: the examples are counted on a strided view of at most this many pixels a side, each count standing for
#: the stride^2 pixels around it: a histogram of 16k pixels is as good as one of a million, and the
#: texture words are read at the view's pixels only (eval_quality_large.py)
COUNT_SIDE = 128


def is_grey(rgb: np.ndarray) -> bool:
    """Whether an (H, W, 3) image's three channels are equal."""
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))


def appearance_bins(rgb: np.ndarray, grey: bool) -> np.ndarray:
    """(H, W) int32 bin index of each pixel of an (H, W, 3) uint8 image: its grey level (the channels'
    mean, GREY_LEVELS), or its coarse colour (8 levels per channel)."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:  # (the bins of any other image: its values truncated, as uint8 would be)
        rgb = rgb.astype(np.int32)
    if grey:
        if rgb.ndim == 2:
            level = rgb.astype(np.int32)
        else:  # floor of the mean, in integers
            level = (rgb[..., 0].astype(np.int32) + rgb[..., 1] + rgb[..., 2]) // 3
        return level * GREY_LEVELS // 256
    q = rgb >> 5
    return (q[..., 0].astype(np.int32) << 6) | (q[..., 1].astype(np.int32) << 3) | q[..., 2]


def grey_levels(rgb: np.ndarray) -> np.ndarray:
    """(H, W) float32 grey level of an (H, W, 3) uint8 image: the channels' mean (the image itself if 2D)."""
    rgb = np.asarray(rgb)
    if rgb.ndim == 2:
        return rgb.astype(np.float32)
    if rgb.dtype != np.uint8:
        return rgb.astype(np.float32).mean(-1)
    total = rgb[..., 0].astype(np.uint16) + rgb[..., 1] + rgb[..., 2]  # exact, as float32's mean's sum is
    return total.astype(np.float32) / np.float32(3)


def _gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage.gaussian_filter's 1D weights (float64)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * x ** 2)
    return phi / phi.sum()


def _correlate_at(image: np.ndarray, weights: np.ndarray, axis: int, stride: int) -> np.ndarray:
    """float32 correlation of a float32 image with symmetric weights along `axis`, at every `stride`-th
    position only, computed as scipy.ndimage.correlate1d computes it (in float64, the centre tap first,
    then the pairs from the outside in, mode "reflect"): the same bits at those positions."""
    radius = len(weights) // 2
    pad = [(0, 0), (0, 0)]
    pad[axis] = (radius, radius)
    padded = np.pad(image, pad, mode="symmetric").astype(np.float64)
    n = image.shape[axis]

    def shifted(offset):
        taken = slice(radius + offset, radius + offset + n, stride)
        return padded[taken] if axis == 0 else padded[:, taken]

    out = shifted(0) * weights[radius]
    for j in range(radius, 0, -1):
        out += (shifted(-j) + shifted(j)) * weights[radius - j]
    return out.astype(np.float32)


def gaussian_at(image: np.ndarray, sigma: float, stride: int = 1) -> np.ndarray:
    """scipy.ndimage.gaussian_filter(image, sigma)[::stride, ::stride] of a float32 image (2D), the same
    bits, computed at those pixels only."""
    from scipy import ndimage

    if stride == 1:
        return ndimage.gaussian_filter(image, sigma)
    weights = _gaussian_kernel(sigma)
    return _correlate_at(_correlate_at(image, weights, 0, stride), weights, 1, stride)


def texture_words(rgb: np.ndarray, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Two (H, W) uint8 level indices of each pixel of an (H, W, 3) uint8 image: its neighbourhood's mean
    grey level (MEAN_LEVELS) and spread (standard deviation, SPREAD_LEVELS on a log scale up to 128), in a
    Gaussian window of TEXTURE_SIGMA: what the pixel's surroundings look like, beyond its own colour.
    stride: only at every stride-th pixel ([::stride, ::stride]), still read at the pixel scale."""
    grey = grey_levels(rgb)
    mean = gaussian_at(grey, TEXTURE_SIGMA, stride)
    spread = np.sqrt(np.maximum(gaussian_at(grey * grey, TEXTURE_SIGMA, stride) - mean * mean, 0))
    mean_level = np.clip(mean, 0, 255).astype(np.int32) * MEAN_LEVELS // 256
    spread_level = np.clip(np.log1p(spread) / np.log1p(128) * SPREAD_LEVELS, 0, SPREAD_LEVELS - 1)
    return mean_level.astype(np.uint8), spread_level.astype(np.uint8)


def boundary_edges(labels: np.ndarray, rgb: np.ndarray) -> float:
    """How well a proposal's boundaries follow the image's edges: log((mean gradient magnitude on its
    label boundaries + 1) / (mean gradient magnitude over the image + 1)), the gradient read after a
    Gaussian of TEXTURE_SIGMA on each distinct channel. NaN without boundaries (nothing to judge: an
    estimate reads a NaN feature as average, QualityModel)."""
    from scipy import ndimage

    rgb = rgb[..., None] if rgb.ndim == 2 else rgb
    edge = label_boundaries(labels)
    if not edge.any():
        return float("nan")
    channels = rgb[..., :1] if rgb.shape[-1] == 1 or is_grey(rgb) else rgb
    smooth = ndimage.gaussian_filter(channels.astype(np.float32), (TEXTURE_SIGMA, TEXTURE_SIGMA, 0))
    sobel = []
    for axis in (0, 1):  # ndimage.sobel along each image axis, each channel on its own
        derivative = ndimage.correlate1d(smooth, [-1, 0, 1], axis)
        sobel.append(ndimage.correlate1d(derivative, [1, 2, 1], 1 - axis, output=derivative))
    per_channel = sobel[0] ** 2 + sobel[1] ** 2
    squared = per_channel[..., 0]
    for c in range(1, per_channel.shape[-1]):  # added up channel after channel
        squared = squared + per_channel[..., c]
    gradient = np.sqrt(squared)
    return float(np.log((gradient[edge].mean() + 1) / (gradient.mean() + 1)))


DENSE_IDS = 256  # label maps with ids below this are counted as they are (else renumbered first)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """The mean IoU, over the labels either map holds (background excluded), of two label maps; 1 when
    both are empty. One bincount over the pairs of labels."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"label maps of different shapes: {a.shape} and {b.shape}")
    small = all(m.dtype == bool or (m.dtype.kind in "ui" and (m.size == 0 or (m.min() >= 0 and m.max() < DENSE_IDS)))
                for m in (a, b))
    if small:
        ids = np.arange(max(int(a.max(initial=0)), int(b.max(initial=0))) + 1)
        x, y = a.astype(np.intp, copy=False).ravel(), b.astype(np.intp, copy=False).ravel()
    else:  # any ids (large, negative, not integers): numbered 0..n-1 in sorted order
        ids, codes = np.unique(np.concatenate([a.ravel(), b.ravel()]), return_inverse=True)
        x, y = codes[:a.size], codes[a.size:]
    n = len(ids)
    pairs = np.bincount(x * n + y, minlength=n * n).reshape(n, n)
    both = np.diagonal(pairs)
    union = pairs.sum(1) + pairs.sum(0) - both
    kept = (ids != 0) & (union > 0)
    return float(np.mean(both[kept] / union[kept])) if kept.any() else 1.0


def _columns(mask: np.ndarray, ids: tuple) -> np.ndarray:
    """The column of each pixel's label among `ids` (sorted, holding every label of the mask), int32."""
    if ids[0] >= 0 and ids[-1] < 1 << 16 and mask.dtype.kind in "uib":
        lookup = np.zeros(ids[-1] + 1, np.int32)
        lookup[list(ids)] = np.arange(len(ids), dtype=np.int32)
        return lookup[mask.view(np.uint8) if mask.dtype == bool else mask]
    return np.searchsorted(ids, mask).astype(np.int32)


@dataclass(frozen=True)
class ExampleStats:
    """What the examples show: the mean share of labelled pixels, their objects' typical diameter, and
    how often each label takes each appearance, local mean and local spread (a naive per-pixel model of
    the task: counts (levels, ids); `appearance`, `texture_labels`)."""

    foreground: float
    diameter: float | None
    ids: tuple = ()  # label ids of the counts' columns, background 0 first
    counts: np.ndarray | None = None  # (bins, len(ids)) pixel counts
    grey: bool = True
    local_mean: np.ndarray | None = None  # (MEAN_LEVELS, len(ids)) pixel counts (texture_words)
    local_spread: np.ndarray | None = None  # (SPREAD_LEVELS, len(ids)) pixel counts

    @classmethod
    def of(cls, masks, images=None) -> "ExampleStats":
        """Stats of label masks (H, W) with, optionally, their (H, W, 3) uint8 images (counted on a view of
        at most COUNT_SIDE pixels a side, each count standing for stride^2 pixels)."""
        masks = [np.asarray(m) for m in masks]
        if not masks:
            return cls(float("nan"), None)
        shares = [np.count_nonzero(m) / m.size for m in masks]
        foreground, diameter = float(np.mean(shares)), object_diameter(masks)
        if images is None:
            return cls(foreground, diameter)
        images = [np.asarray(rgb) for rgb in images]
        grey = all(is_grey(rgb) for rgb in images)
        ids = tuple(int(i) for i in np.union1d([0], np.concatenate([distinct_values(m) for m in masks])))
        tables = (np.zeros((GREY_LEVELS if grey else COLOUR_BINS, len(ids))), np.zeros((MEAN_LEVELS, len(ids))),
                  np.zeros((SPREAD_LEVELS, len(ids))))
        for rgb, mask in zip(images, masks):
            stride = max(1, math.ceil(max(mask.shape[:2]) / COUNT_SIDE))
            columns = _columns(mask[::stride, ::stride], ids)
            # the texture words at the pixel scale, as a target's are read (quality.features)
            words = (appearance_bins(rgb[::stride, ::stride], grey), *texture_words(rgb, stride))
            for table, word in zip(tables, words):
                pairs = (word.astype(np.int32) * len(ids) + columns).ravel()
                table += np.bincount(pairs, minlength=table.size).reshape(table.shape) * stride ** 2
        return cls(foreground, diameter, ids, *tables[:1], grey, *tables[1:])

    @classmethod
    def combine(cls, stats) -> "ExampleStats | None":
        """The stats of several example sets together (None entries, tuned prompts, are left out)."""
        stats = [s for s in stats if s is not None]
        if not stats:
            return None
        diameters = [s.diameter for s in stats if s.diameter]
        with_counts = [s for s in stats if s.counts is not None]
        ids, counts, grey, local_mean, local_spread = (), None, True, None, None
        if with_counts and len({s.grey for s in with_counts}) == 1:  # grey levels and colours do not add up
            ids, grey = tuple(sorted(set().union(*(s.ids for s in with_counts)))), with_counts[0].grey

            def total(tables):  # each set's columns put under the union's ids, then added up
                out = np.zeros((len(tables[0][1]), len(ids)))
                for set_ids, table in tables:
                    out[:, [ids.index(i) for i in set_ids]] += table
                return out

            counts = total([(s.ids, s.counts) for s in with_counts])
            if all(s.local_mean is not None for s in with_counts):
                local_mean = total([(s.ids, s.local_mean) for s in with_counts])
                local_spread = total([(s.ids, s.local_spread) for s in with_counts])
        return cls(float(np.mean([s.foreground for s in stats])), float(np.median(diameters)) if diameters else None,
                   ids, counts, grey, local_mean, local_spread)

    # the naive model as lookup tables, made on first use (an example set judges many targets)

    @cached_property
    def posterior_by_bin(self) -> np.ndarray:
        """(bins, K): P(label | appearance bin), smoothed towards the labels' prior."""
        prior = self.counts.sum(0) / self.counts.sum()
        return (self.counts + prior) / (self.counts.sum(1, keepdims=True) + 1.0)

    @cached_property
    def foreground_by_bin(self) -> np.ndarray:
        """(bins,): P(any label | appearance bin)."""
        return self.posterior_by_bin[:, np.asarray(self.ids) != 0].sum(-1)

    @cached_property
    def label_by_word(self) -> np.ndarray:
        """(bins * MEAN_LEVELS * SPREAD_LEVELS,): the naive Bayes label of each (appearance, local mean,
        local spread) combination: the label k with the largest P(k) P(appearance | k) P(mean | k)
        P(spread | k), each add-one smoothed."""
        def log_likelihood(counts):  # (levels, K): log P(level | label)
            return np.log((counts + 1) / (counts.sum(0, keepdims=True) + len(counts)))

        bins, rest = np.divmod(np.arange(len(self.counts) * MEAN_LEVELS * SPREAD_LEVELS), MEAN_LEVELS * SPREAD_LEVELS)
        prior = self.counts.sum(0)
        score = (np.log(prior / prior.sum() + 1e-12) + log_likelihood(self.counts)[bins]
                 + log_likelihood(self.local_mean)[rest // SPREAD_LEVELS]
                 + log_likelihood(self.local_spread)[rest % SPREAD_LEVELS])  # (combinations, K)
        return np.asarray(self.ids)[score.argmax(-1)]

    def appearance(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The naive model on a target (H, W, 3): (P(label | appearance) (H, W, K), the label ids (K,));
        None without counts."""
        if self.counts is None:
            return None
        return self.posterior_by_bin[appearance_bins(rgb, self.grey)], np.asarray(self.ids)

    def texture_labels(self, rgb: np.ndarray, words: tuple[np.ndarray, np.ndarray] | None = None,
                       bins: np.ndarray | None = None) -> np.ndarray | None:
        """The labels (H, W) a naive Bayes model of the examples gives a target (H, W, 3) (`label_by_word`).
        `words`: the target's texture words if read already (features reads them at the pixel scale at a
        strided view's pixels); `bins`: its appearance_bins if read already. None without the examples'
        counts or texture tables."""
        if self.counts is None or self.local_mean is None:
            return None
        mean, spread = words if words is not None else texture_words(rgb)
        bins = bins if bins is not None else appearance_bins(rgb, self.grey)
        return self.label_by_word[(bins * MEAN_LEVELS + mean) * SPREAD_LEVELS + spread]
