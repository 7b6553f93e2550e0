"""How good is a proposal? An estimate of the IoU a person would measure, to review the worst first.

    model.segment(targets, prompts)                       # quality="fast" (the default): Prediction.quality
    model.segment(targets, prompts, quality="full")      # + the mirrored target: twice the forward passes
    pred.confidence                                       # = pred.quality: what every adapter sorts by

The snap score (how cleanly the painting snapped to a prompt colour) alone says little about being
right: a model that copies too much of an example paints it cleanly. The "fast" estimate reads three views
of a proposal, each blind where another sees ("full" reads the first two and the mirrored target):

- snap_foreground: the mean snap score over the predicted foreground (how sure the painting is);
- boundary_edges: whether the proposal's boundaries lie on the target's edges (`boundary_edges`): an
  over- or under-painted region has its boundary across flat background or through an object;
- texture_agreement: the mean IoU per label between the proposal and the labels a naive per-pixel model
  of the task gives the target (`ExampleStats.texture_labels`: naive Bayes over each pixel's grey level
  or coarse colour, its neighbourhood's mean and its spread, all read off the examples);
- flip_agreement ("full"): the mean IoU per label between the proposal and the proposal for the
  mirrored target, mirrored back (a model that is unsure changes its mind).

`BLENDS` fixes which features each estimate adds up (standardised, with fixed weights); the curve that
maps that score to an IoU is fitted on generated tasks whose truth is known (quality_fit.py, `seggpt
fit-quality`, quality.json beside the weights). `features` can read other candidates too (`CANDIDATES`:
the uncertain share, size and fragment ratios against the examples, the naive model's per-pixel fit); an
estimate reads only the groups its blend uses (`Prediction.quality_features`; the naive model's
P(foreground) is always read, for the per-object estimate), and fitting reads them all. How each relates
to the true IoU is how the blend was chosen (docs/quality.md).

Features are statistics: they are read on a strided view of at most FEATURE_SIDE pixels a side, the
texture words at the pixel scale at that view's pixels (as the examples' are counted), and the naive
model is a lookup table per example set (`ExampleStats`, example_stats.py, with the pixel-level readings),
so the estimate costs a few milliseconds per target whatever its size (benchmarks/bench_quality_host.py).

Per object (`ObjectContext`, `object_features`): `Prediction.instances()` gives each object its own
predicted IoU with the true object (`Instance.quality`), a fixed blend (OBJECT_BLEND) of its snap score,
how well its ring of background and its own pixels agree with the naive model, its extent and its size
against the examples' objects, calibrated the same way on the objects of generated tasks (the "object"
entry of quality.json). The prediction keeps what that needs (the naive P(foreground) on the strided view,
uint8), so objects found later, or tracked through a stack, are estimated without the target.

Numpy and scipy; the estimates are small JSON files. This module is the runtime estimate only: fitting
lives in quality_fit.py, which imports it (never the other way round).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .ensembles import object_diameter
from .errors import InputError
from .example_stats import ExampleStats, agreement, appearance_bins, boundary_edges, texture_words
from .instances import connected_components, find_instances
from .vocabulary import DEMO_MODEL

QUALITIES = ("fast", "full")
#: the features each estimate blends, with their weights (on standardised features). fast: three views of a
#: proposal that together rank it on generated tasks AND real nuclei (docs/quality.md, eval_quality.py);
#: full: the mirrored target's agreement leads, which ranks the targets of one run on real nuclei
#: (chosen on the design runs of benchmarks/eval_run_ranking.py; docs/quality.md, "Ranking a run")
BLENDS = {"fast": {"snap_foreground": 1.0, "boundary_edges": 1.0, "texture_agreement": 1.0},
          "full": {"snap_foreground": 1.0, "boundary_edges": 1.0, "flip_agreement": 2.0}}
UNCERTAIN_MARGIN = 0.5
#: features are read on a strided view of at most this many pixels a side (statistics: 16k pixels are
#: plenty; benchmarks/eval_quality_large.py measures the ranking of 512x512 targets read this way)
FEATURE_SIDE = 128
#: a gross error (`gross_error`): a painted share beyond this factor of the examples' either way
GROSS_SHARE = 3.0
#: ... or, where the examples' ids are objects, parts over GIANT_OBJECT times their typical object area
#: (several objects run together) holding more than GIANT_ALLOWED of the painted pixels (chosen on the
#: 128 px tiles of the left half of stardist's 2D image: benchmarks/eval_review_ranking.py)
GIANT_OBJECT = 2.0
GIANT_ALLOWED = 0.5
QUALITY_FILE = "quality.json"  # next to a model's weights: the estimate fitted for them
QUALITY_ENV = "SEGGPT_QUALITY_MODEL"  # or this file, for any weights
SHIPPED = Path(__file__).resolve().parent / "demo" / "model" / QUALITY_FILE  # fitted for the demo model


def check_quality(quality) -> str | None:
    """A quality setting -> None (off), "fast" or "full"; InputError names what is wrong."""
    if quality is None or quality in QUALITIES:
        return quality
    raise InputError(f"quality must be one of {QUALITIES} or None, got {quality!r}")


# ------------------------------------------------------------------------------------------ features


def feature_stride(shape) -> int:
    """The stride of the view the features are read on (statistics: a strided view is enough)."""
    return max(1, math.ceil(max(shape[:2]) / FEATURE_SIDE))


#: every candidate feature `features` can read, by group (a group is read when any of its names is asked for)
FEATURE_GROUPS = {"snap": ("snap_foreground", "snap_all", "uncertain"), "size": ("size_ratio",),
                  "objects": ("diameter_ratio", "fragments"),
                  "appearance": ("appearance_fit", "appearance_agreement", "appearance_fit_foreground",
                                 "appearance_agreement_foreground"),
                  "texture": ("texture_agreement",), "edges": ("boundary_edges",),
                  "flip": ("flip_agreement", "flip_agreement_foreground"),
                  "parts": ("parts_size", "parts_bad_size", "parts_ring_fit", "parts_snap", "parts_agreement",
                            "parts_extent", "boundary_fit")}
CANDIDATES = tuple(name for group in FEATURE_GROUPS.values() for name in group)


def features(labels: np.ndarray, scores: np.ndarray, examples: ExampleStats, rgb: np.ndarray | None = None,
             flipped: np.ndarray | None = None, strided: int | None = None, names=CANDIDATES,
             maps: dict | None = None, texture: tuple | None = None) -> dict[str, float]:
    """The features of one prediction (labels and scores (H, W)) given the target (H, W, 3): the groups
    of FEATURE_GROUPS that hold any of `names` (the flip group only with `flipped`, the mirrored target's
    labels, mirrored back). They are read on a strided view of at most FEATURE_SIDE pixels a side, the
    texture words at the pixel scale at that view's pixels; `strided`: the arrays are such a view already,
    of that stride, and `texture` the target's texture_words read at the pixel scale then strided alike
    (without it they are read on the view). `maps`: a dict that receives the naive model's P(foreground) on
    that view ("foreground") and the stride ("stride"), for the per-object estimate. A feature that cannot
    be read (no boundaries, no examples' counts) is NaN."""
    wanted = {group for group, members in FEATURE_GROUPS.items() if set(members) & set(names)}
    stride = strided or feature_stride(labels.shape)
    texture_wanted = "texture" in wanted and rgb is not None and examples.local_mean is not None
    if texture is not None and stride > 1 and not strided:
        texture = tuple(words[::stride, ::stride] for words in texture)
    elif texture is None and texture_wanted:
        texture = texture_words(rgb, 1 if strided else stride)  # at the pixel scale, as the examples' are counted
    whole, whole_stride = labels, (stride if strided else 1)  # object sizes: read on every pixel (see below)
    if stride > 1 and not strided:
        labels, scores = labels[::stride, ::stride], scores[::stride, ::stride]
        rgb = rgb[::stride, ::stride] if rgb is not None else None
        flipped = flipped[::stride, ::stride] if flipped is not None else None
    foreground = labels != 0
    share = float(np.count_nonzero(foreground) / foreground.size)
    bins = appearance_bins(rgb, examples.grey) if rgb is not None and examples.counts is not None else None
    out = {}
    if "snap" in wanted:
        out["snap_foreground"] = float(scores[foreground].mean()) if share else 1.0
        out["snap_all"] = float(scores.mean())
        out["uncertain"] = float((scores < UNCERTAIN_MARGIN).mean())
    if "size" in wanted:
        eps = 1.0 / labels.size
        known = not math.isnan(examples.foreground)
        out["size_ratio"] = abs(math.log((share + eps) / (examples.foreground + eps))) if known else 0.0
    if "objects" in wanted:  # (a strided view loses objects a few pixels wide: these read the whole map)
        out.update(_objects_features(whole, whole_stride, examples.diameter))
    foreground_p = None
    if bins is not None and (wanted & {"appearance", "parts"} or maps is not None):
        foreground_p = examples.foreground_by_bin[bins]  # P(any label | appearance)
        if maps is not None:
            maps.update(foreground=foreground_p, stride=stride)
    if "appearance" in wanted:
        out.update(_appearance_features(labels, foreground, foreground_p, bins, examples))
    if "texture" in wanted:
        out["texture_agreement"] = (agreement(labels, examples.texture_labels(rgb, texture, bins=bins))
                                    if texture_wanted else float("nan"))
    if "edges" in wanted:
        out["boundary_edges"] = boundary_edges(labels, rgb) if rgb is not None else float("nan")
    if "flip" in wanted and flipped is not None:
        out["flip_agreement"] = agreement(labels, flipped)
        out["flip_agreement_foreground"] = agreement(foreground, flipped != 0)
    if "parts" in wanted:
        out.update(_parts_features(labels, scores, foreground_p, stride, examples.diameter))
    return out


def gross_error(labels: np.ndarray, examples: ExampleStats, strided: int | None = None,
                objects: bool = False) -> dict[str, float]:
    """How far a proposal is from its examples in ways a local reading misses, as a factor in (0, 1] that
    scales its estimate down (`gross_error`), with what it read (`painted_share`, `giant_objects`).

    The blend reads how a proposal looks locally; a slice painted over whole can look clean there and still
    be wholly wrong (a drifting propagation ranked its fully painted slices best: issue 33), and an image
    whose objects ran together in clumps can have a clean foreground and half its objects wrong (a series
    of tiles ranked the worst last). The factor is exp(-2 x the log excess) for a painted share beyond
    GROSS_SHARE of the examples' either way, times exp(-2 x the excess) for a share of the painted pixels
    beyond GIANT_ALLOWED in parts over GIANT_OBJECT times the examples' object area, this one only where
    `objects` (the examples' ids were objects, so the objects are what a person reviews: in a semantic run
    clumps of touching objects are no error). Read on the strided view of `features` (`strided`: the
    labels are that view already, at that stride)."""
    stride = strided or feature_stride(labels.shape)
    view = labels if strided else labels[::stride, ::stride]
    painted = int(np.count_nonzero(view))
    share = painted / view.size
    out = {"painted_share": share, "giant_objects": 0.0, "gross_error": 1.0}
    expected = examples.foreground
    if expected > 0:
        excess = max(0.0, abs(math.log((share + 1e-3) / expected)) - math.log(GROSS_SHARE))
        out["gross_error"] = math.exp(-2 * excess)
    if objects and examples.diameter and painted:
        parts, _ = connected_components(view != 0, connectivity=4)
        areas = np.bincount(parts.ravel())[1:] * stride ** 2
        out["giant_objects"] = float(areas[areas > GIANT_OBJECT * examples.diameter ** 2].sum() / areas.sum())
        out["gross_error"] *= math.exp(-2 * max(0.0, out["giant_objects"] - GIANT_ALLOWED))
    return out


def _objects_features(labels, stride: int, diameter: float | None) -> dict[str, float]:
    """diameter_ratio (|log| of the proposal's object diameter over the examples') and fragments (the
    share of its parts under a quarter of the examples' object area), of labels (a view of `stride`)."""
    foreground = labels != 0
    share = bool(foreground.any())
    found = object_diameter([labels]) if share else None
    found = found * stride if found else None
    out = {"diameter_ratio": (abs(math.log(found / diameter)) if found and diameter
                              else (0.0 if not share and not diameter else 2.0)), "fragments": 0.0}
    if share and diameter:
        parts, count = connected_components(foreground, connectivity=4)
        areas = np.bincount(parts.ravel())[1:]
        out["fragments"] = float((areas * stride ** 2 < diameter ** 2 / 4).mean()) if count else 0.0
    return out


def _appearance_features(labels, foreground, foreground_p, bins, examples: ExampleStats) -> dict[str, float]:
    """The grey-level (or coarse colour) naive model's fit and agreement with the proposal (0.5 each
    without the examples' counts)."""
    if bins is None:
        return dict.fromkeys(FEATURE_GROUPS["appearance"], 0.5)
    posterior, ids = examples.posterior_by_bin[bins], np.asarray(examples.ids)
    column = np.searchsorted(ids, labels).clip(0, len(ids) - 1)
    fits = np.take_along_axis(posterior, column[..., None], -1)[..., 0] * (ids[column] == labels)
    return {"appearance_fit": float(fits.mean()), "appearance_agreement": agreement(labels, ids[posterior.argmax(-1)]),
            "appearance_fit_foreground": float(np.where(foreground, foreground_p, 1 - foreground_p).mean()),
            "appearance_agreement_foreground": agreement(foreground, foreground_p > 0.5)}


def _parts_features(labels, scores, foreground_p, stride: int, diameter: float | None) -> dict[str, float]:
    """The image's objects' features (object_features, on the strided view), pooled by area: parts_size
    (mean |log size ratio|), parts_bad_size (the area share of objects over 2x off the examples' diameter),
    parts_ring_fit, parts_snap, parts_agreement, parts_extent; and boundary_fit: the naive model's agreement
    with the proposal on a band around the predicted boundaries (where a wrong proposal differs most from a
    right one)."""
    from scipy import ndimage

    empty = {"parts_size": 0.0, "parts_bad_size": 0.0, "parts_ring_fit": 0.5, "parts_snap": 1.0,
             "parts_agreement": 0.5, "parts_extent": 1.0}
    if foreground_p is None:
        return {**empty, "boundary_fit": 0.5}
    found = find_instances(labels, min_area=max(1, 16 // stride ** 2))
    rows = object_features(found.map, scores, foreground_p, 1, diameter / stride if diameter else None)
    foreground = labels != 0
    band = ndimage.binary_dilation(foreground, iterations=2) & ~ndimage.binary_erosion(foreground, iterations=2)
    boundary = (float(np.where(foreground, foreground_p, 1 - foreground_p)[band].mean()) if band.any() else 0.5)
    if not rows:
        return {**empty, "boundary_fit": boundary}
    areas = np.array([o.area for o in found.objects], np.float64)
    weights = areas / areas.sum()
    pooled = lambda name: float(sum(w * rows[o.id][name] for w, o in zip(weights, found.objects)))  # noqa: E731
    bad = float(sum(w for w, o in zip(weights, found.objects) if rows[o.id]["object_size"] > math.log(2)))
    return {"parts_size": pooled("object_size"), "parts_bad_size": bad, "parts_ring_fit": pooled("object_ring_fit"),
            "parts_snap": pooled("object_snap"), "parts_agreement": pooled("object_agreement"),
            "parts_extent": pooled("object_extent"), "boundary_fit": boundary}


# ----------------------------------------------------------------------------------------- the model


@dataclass
class QualityModel:
    """predicted IoU = sigmoid(bias + sum(weights * (x - mean) / scale)) over named features; a feature
    that could not be read (NaN) counts as average (0 after standardising)."""

    names: tuple
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float

    def predict(self, values: dict[str, float]) -> float:
        x = np.nan_to_num((np.array([values[n] for n in self.names], np.float64) - self.mean) / self.scale)
        return float(1.0 / (1.0 + np.exp(-(self.bias + x @ self.weights))))

    def as_dict(self) -> dict:
        return {"names": list(self.names), "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "weights": self.weights.tolist(), "bias": self.bias}

    @classmethod
    def from_dict(cls, data: dict) -> "QualityModel":
        return cls(tuple(data["names"]), np.array(data["mean"], float), np.array(data["scale"], float),
                   np.array(data["weights"], float), float(data["bias"]))


def load_models(path) -> dict[str, QualityModel]:
    """The estimates of one quality.json ("fast", "full" and optionally OBJECT_MODEL); InputError if unreadable."""
    try:
        data = json.loads(Path(path).read_text())
        if data.get("format") != "seggpt-quality/1":
            raise ValueError("not a seggpt-quality/1 file")
        models = {name: QualityModel.from_dict(m) for name, m in data["models"].items()}  # OBJECT_MODEL optional
        missing = [q for q in QUALITIES if q not in models]
        if missing:
            raise ValueError(f"no {', '.join(missing)} estimate in it")
        return models
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"quality estimate {path}: {exc}") from None


class UncalibratedQualityWarning(UserWarning):
    """The quality estimate in use was fitted for other weights (its ranking holds, its scale may not)."""


def models_document(models: dict[str, QualityModel], fitted_on: str) -> dict:
    """A quality.json's content: the estimates and what they were fitted on (load_models reads it)."""
    return {"format": "seggpt-quality/1", "fitted_on": fitted_on,
            "models": {name: m.as_dict() for name, m in models.items()}}


def calibrated_file(source: str | None) -> Path | None:
    """The quality.json fitted for a model's weights: $SEGGPT_QUALITY_MODEL, the demo model's, or the one
    beside its weights (a model folder); None when there is none (models_for then warns)."""
    configured = os.environ.get(QUALITY_ENV)
    if configured:
        return Path(configured)
    if source == DEMO_MODEL:
        return SHIPPED
    folder = Path(source) if source else None
    if folder is not None and folder.is_dir() and (folder / QUALITY_FILE).is_file():
        return folder / QUALITY_FILE
    return None


def models_for(source: str | None) -> dict[str, QualityModel]:
    """The estimates for a model: $SEGGPT_QUALITY_MODEL, else the quality.json beside its weights (a
    model folder), else the demo model's, with a warning for loaded weights (fit one: `seggpt fit-quality`)."""
    path = calibrated_file(source)
    if path is not None:
        return load_models(path)
    if source:  # weights loaded from somewhere (a network built in memory has nowhere to keep one)
        folder = Path(source).is_dir()
        out = Path(source) / QUALITY_FILE if folder else QUALITY_FILE
        where = "read beside the weights" if folder else f"then point ${QUALITY_ENV} at it"
        warnings.warn(f"the quality estimate was fitted for the demo model, not for {source}: its ranking holds "
                      f"better than its scale; fit one with `seggpt fit-quality --model {source} --out {out}` "
                      f"({where})", UncalibratedQualityWarning, stacklevel=3)
    return load_models(SHIPPED)


# ----------------------------------------------------------------------------------- per-object estimate

#: the per-object candidates (`object_features`); OBJECT_BLEND is what the per-object estimate adds up
OBJECT_CANDIDATES = ("object_snap", "object_fit", "object_ring_fit", "object_agreement", "object_size",
                     "object_extent")
#: (equal weights, the signs their relation to the IoU has on generated tasks; object_fit left out: its sign
#: reverses on real nuclei slices, see docs/quality.md)
OBJECT_BLEND = {"object_snap": 1.0, "object_ring_fit": 1.0, "object_agreement": 1.0, "object_extent": 1.0,
                "object_size": -1.0}
OBJECT_MODEL = "object"  # its key in a quality.json (optional: files fitted before it have none)


@dataclass
class ObjectContext:
    """What a prediction keeps to estimate its objects' quality later (`Prediction.instances`): the naive
    model's P(foreground) on the strided view the image features were read on (uint8, 0-255), that view's
    stride, the examples' object diameter and the per-object estimate (None: the estimate file has none)."""

    foreground: np.ndarray  # (h, w) uint8: P(any label | appearance) * 255 on the strided view
    stride: int
    diameter: float | None
    model: QualityModel | None

    def qualities(self, id_map: np.ndarray, scores: np.ndarray | None) -> dict[int, float]:
        """{object id: predicted IoU with its true object} for the objects of an instance map of the target."""
        rows = object_features(id_map, scores, self.foreground.astype(np.float32) / 255, self.stride, self.diameter)
        return {object_id: self.model.predict(row) for object_id, row in rows.items()}


def object_features(id_map: np.ndarray, scores: np.ndarray | None, foreground: np.ndarray, stride: int,
                    diameter: float | None) -> dict[int, dict[str, float]]:
    """{object id: features} of each object of an instance map (H, W) of a target, given the naive model's
    P(foreground) on its view of stride `stride` (quality.features), and the examples' object diameter:

    - object_snap: the object's mean snap score;
    - object_fit: the mean P(foreground) over its pixels (an object painted where the examples' background
      looks alike is suspect);
    - object_ring_fit: the mean P(background) over the background in a ring around it (a quarter of the
      examples' object diameter wide): an object cut too small leaves foreground-like pixels around it;
    - object_agreement: the IoU, over the object and its ring, of the object with the naive foreground;
    - object_size: |log(sqrt(area) / the examples' object diameter)| (0 without one);
    - object_extent: its area over its bounding box's (touching objects painted as one fill less of it).

    Objects too small to show on the strided view get the mean of the others (0.5 when none shows). One pass
    of bincounts over the map: cheap for thousands of objects."""
    from scipy import ndimage

    id_map = np.asarray(id_map)
    top = int(id_map.max()) if id_map.size else 0
    if not top:
        return {}
    flat_full = id_map.ravel().astype(np.int64)
    areas = np.bincount(flat_full, minlength=top + 1).astype(np.float64)
    snaps = (np.bincount(flat_full, np.asarray(scores, np.float64).ravel(), minlength=top + 1) / np.maximum(areas, 1)
             if scores is not None else np.ones(top + 1))
    small = id_map[::stride, ::stride].astype(np.int64) if stride > 1 else id_map.astype(np.int64)
    p = np.asarray(foreground, np.float64)
    width = max(1, int(round((diameter or 4 * stride) / 4 / stride)))
    grown = ndimage.grey_dilation(small, footprint=np.ones((2 * width + 1,) * 2, bool))  # a neighbour's id
    ring = np.where(small == 0, grown, 0)
    inside = np.bincount(small.ravel(), minlength=top + 1).astype(np.float64)
    around = np.bincount(ring.ravel(), minlength=top + 1).astype(np.float64)
    fit = np.bincount(small.ravel(), p.ravel(), minlength=top + 1) / np.maximum(inside, 1)
    ring_fg = np.bincount(ring.ravel(), p.ravel(), minlength=top + 1)
    ring_fit = 1 - ring_fg / np.maximum(around, 1)
    naive = p > 0.5
    hits = np.bincount(small.ravel(), naive.ravel(), minlength=top + 1)
    ring_hits = np.bincount(ring.ravel(), naive.ravel(), minlength=top + 1)
    agree = hits / np.maximum(inside + ring_hits, 1)  # |object & naive| / |object | naive| within object + ring
    shown = inside > 0
    shown[0] = False
    fallback = {name: float(values[shown].mean()) if shown.any() else 0.5
                for name, values in (("fit", fit), ("ring", ring_fit), ("agree", agree))}
    boxes = ndimage.find_objects(id_map.astype(np.int64))
    out = {}
    for object_id in np.flatnonzero(areas > 0):
        if object_id == 0:
            continue
        seen = shown[object_id]
        size = math.sqrt(areas[object_id])
        out[int(object_id)] = {
            "object_snap": float(snaps[object_id]),
            "object_fit": float(fit[object_id]) if seen else fallback["fit"],
            "object_ring_fit": float(ring_fit[object_id]) if seen and around[object_id] else fallback["ring"],
            "object_agreement": float(agree[object_id]) if seen else fallback["agree"],
            "object_size": abs(math.log(size / diameter)) if diameter else 0.0,
            "object_extent": float(areas[object_id] / np.prod([b.stop - b.start for b in boxes[object_id - 1]]))}
    return out
