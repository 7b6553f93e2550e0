"""Label Studio labeling configs and results: what to segment, and how masks travel as brush RLE or polygons.

A config is read with the SDK's `LabelInterface`. Every `<BrushLabels>` or `<PolygonLabels>` attached to an
`<Image>` makes that image a *view*: one image per task to segment, with the labels of all the controls that
point at it. Label ids 1..K are given over *all* labels of a view in config order, so a label keeps its id
(and so its prompt colour) whichever labels a reference happens to use.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from seggpt_plugins.images import resize_nearest
from seggpt_plugins.vocabulary import MAX_CLASSES

log = logging.getLogger("seggpt_plugins.labelstudio")

BRUSH = "brushlabels"
POLYGON = "polygonlabels"
SUPPORTED = {"brushlabels": BRUSH, "polygonlabels": POLYGON}
MAX_LABELS = MAX_CLASSES  # the most classes SegGPT's colour prompt keeps apart
POLYGON_SUBPIXEL_BITS = 4  # cv2.fillPoly fixed-point precision when rasterising reference polygons


class ConfigError(ValueError):
    """The labeling config cannot be used by this backend (the message says why and what would work)."""


@dataclass(frozen=True)
class Control:
    name: str  # from_name
    kind: str  # BRUSH or POLYGON
    labels: tuple[str, ...]


@dataclass(frozen=True)
class View:
    """One <Image> with the label controls that point at it."""

    image_name: str  # to_name
    value_key: str  # the task data key of the image ("image" for value="$image")
    controls: tuple[Control, ...]
    labels: tuple[str, ...]  # every label of the view, config order, no duplicates

    @property
    def label_ids(self) -> dict[str, int]:
        return {name: i + 1 for i, name in enumerate(self.labels)}

    def control_for(self, label: str, prefer: str = BRUSH) -> Control:
        """The control that carries predictions of `label`: the preferred kind when it has the label."""
        having = [c for c in self.controls if label in c.labels]
        for control in having:
            if control.kind == prefer:
                return control
        return having[0]


@dataclass(frozen=True)
class LabelingSpec:
    views: tuple[View, ...]
    key: str  # a hash of the config text: caches and model versions change with the config


def parse_label_config(config: str) -> LabelingSpec:
    if not isinstance(config, str) or not config.strip():
        raise ConfigError("label_config is missing or empty: send the project's labeling config (XML)")
    return _parse_cached(config)


@lru_cache(maxsize=64)
def _parse_cached(config: str) -> LabelingSpec:
    from label_studio_sdk.label_interface import LabelInterface

    try:
        interface = LabelInterface(config)
    except Exception as exc:  # the SDK raises several types for broken XML; the detail goes to the log only
        log.info("label_config rejected by the SDK: %s: %s", type(exc).__name__, str(exc)[:500])
        raise ConfigError("label_config is not a valid Label Studio labeling config (its XML cannot be read)") from None
    images = {}
    for obj in interface.objects:
        if obj.tag.lower() == "image":
            images[obj.name] = obj
    by_image: dict[str, list[Control]] = {}
    for control in interface.controls:
        kind = SUPPORTED.get(control.tag.lower())
        if kind is None:
            continue
        labels = tuple(dict.fromkeys(str(v) for v in (control.labels or [])))
        if not labels:
            raise ConfigError(f"<{control.tag} name=\"{control.name}\"> has no <Label> children")
        for to_name in control.to_name or []:
            if to_name not in images:
                raise ConfigError(f"<{control.tag} name=\"{control.name}\"> points at {to_name!r}, which is not an <Image>")
            by_image.setdefault(to_name, []).append(Control(control.name, kind, labels))
    if not by_image:
        raise ConfigError("the labeling config has no <BrushLabels> or <PolygonLabels> attached to an <Image>: "
                          "this backend segments images (e.g. <Image name=\"image\" value=\"$image\"/> with "
                          "<BrushLabels name=\"tag\" toName=\"image\"><Label value=\"Cell\"/></BrushLabels>)")
    views = []
    for image_name, controls in by_image.items():
        obj = images[image_name]
        if getattr(obj, "is_image_list", False):
            raise ConfigError(f"<Image name=\"{image_name}\"> uses valueList (several images per task), "
                              "which this backend does not segment")
        value = str(obj.value or "")
        if not value.startswith("$") or len(value) < 2:
            raise ConfigError(f"<Image name=\"{image_name}\" value={value!r}>: the value must name a task field, "
                              "e.g. value=\"$image\"")
        labels = tuple(dict.fromkeys(label for c in controls for label in c.labels))
        if len(labels) > MAX_LABELS:
            raise ConfigError(f"<Image name=\"{image_name}\"> has {len(labels)} labels; SegGPT keeps at most "
                              f"{MAX_LABELS} apart in one prompt")
        views.append(View(image_name, value[1:], tuple(controls), labels))
    key = hashlib.sha256(config.encode()).hexdigest()[:16]
    return LabelingSpec(tuple(views), key)


# ------------------------------------------------------------------------------------------ annotations


def annotation_to_mask(results: list, view: View, shape: tuple[int, int]) -> np.ndarray:
    """The label mask (H, W) of one annotation's regions on `view`, at the image's `shape`.

    Brush masks are decoded with the SDK's RLE decoder; polygons (percent coordinates) are rasterised.
    Later regions paint over earlier ones. Regions with labels the config does not have are skipped.
    """
    import cv2
    from label_studio_sdk.converter.brush import decode_rle

    height, width = shape
    ids = view.label_ids
    mask = np.zeros((height, width), np.uint8)
    controls = {c.name: c for c in view.controls}
    for region in results or []:
        if not isinstance(region, dict) or region.get("to_name") not in (None, view.image_name):
            continue
        control = controls.get(region.get("from_name"))
        kind = str(region.get("type", "")).lower()
        value = region.get("value") or {}
        if control is None or kind not in SUPPORTED or not isinstance(value, dict):
            continue
        names = value.get(kind) or []
        label_id = next((ids[n] for n in names if n in ids), None)
        if label_id is None:
            if names:
                log.info("skipping a region labelled %s: not a label of <Image name=%r> in the current config",
                         names, view.image_name)
            continue
        if int(region.get("image_rotation") or 0) % 360:
            log.info("skipping a rotated region (image_rotation=%s): not supported", region.get("image_rotation"))
            continue
        if kind == BRUSH:
            rle = value.get("rle")
            if value.get("format", "rle") != "rle" or not rle:
                continue
            ow, oh = int(region.get("original_width") or width), int(region.get("original_height") or height)
            flat = decode_rle(rle)
            if flat.size != ow * oh * 4:
                log.warning("skipping a brush region: its RLE holds %d values, not %dx%dx4", flat.size, ow, oh)
                continue
            painted = flat.reshape(oh, ow, 4)[:, :, 3] >= 128
            if (oh, ow) != (height, width):
                painted = resize_nearest(painted, height, width)
            mask[painted] = label_id
        else:
            points = np.asarray(value.get("points") or [], dtype=np.float64)
            if points.ndim != 2 or points.shape[0] < 3 or points.shape[1] != 2 or not np.all(np.isfinite(points)):
                continue
            pixels = points_to_pixels(points, (height, width))
            scale = 1 << POLYGON_SUBPIXEL_BITS
            cv2.fillPoly(mask, [np.round(pixels * scale).astype(np.int32)], int(label_id),
                         lineType=cv2.LINE_8, shift=POLYGON_SUBPIXEL_BITS)
    return mask


def points_to_pixels(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Label Studio polygon points (x, y in percent of width and height) -> pixel-centre (col, row) coordinates."""
    height, width = shape
    return np.stack([points[:, 0] / 100.0 * width - 0.5, points[:, 1] / 100.0 * height - 0.5], axis=1)


def pixels_to_points(pixels: np.ndarray, shape: tuple[int, int]) -> list[list[float]]:
    height, width = shape
    x = (pixels[:, 0] + 0.5) / width * 100.0
    y = (pixels[:, 1] + 0.5) / height * 100.0
    return [[round(float(a), 4), round(float(b), 4)] for a, b in zip(x, y)]


# ------------------------------------------------------------------------------------------ predictions


def _new_id() -> str:
    return uuid.uuid4().hex[:10]


def mask_to_polygons(binary: np.ndarray, tolerance: float = 1.0, min_area: int = 10) -> list[np.ndarray]:
    """Outer contours of each connected part of a binary mask, simplified (Douglas-Peucker, `tolerance` pixels).

    Returns (N, 2) arrays of pixel (col, row) coordinates, one per part of at least `min_area` pixels.
    Holes are not kept (a Label Studio polygon has one ring).
    """
    import cv2

    contours, _ = cv2.findContours(binary.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    polygons = []
    for contour in contours:
        filled = np.zeros(binary.shape, np.uint8)
        cv2.drawContours(filled, [contour], -1, 1, thickness=cv2.FILLED)
        if int(filled.sum()) < max(min_area, 1):
            continue
        simple = cv2.approxPolyDP(contour, float(tolerance), True) if tolerance > 0 else contour
        simple = simple.reshape(-1, 2)
        if len(simple) < 3:  # a line or a dot: keep the outline as traced
            simple = contour.reshape(-1, 2)
        if len(simple) < 3:
            continue
        polygons.append(simple.astype(np.float64))
    return polygons


def prediction_to_results(instances, view: View, *, prefer: str = BRUSH, tolerance: float = 1.0,
                          objects: bool = False) -> list[dict]:
    """Label Studio result regions for one view's predicted objects (the core's `Instances`, found by its one
    object rule, with class ids as in `view.label_ids`).

    Brush: one region per label (the union of its objects), or with `objects` one per object. Polygon: the
    polygons of each object. A region's `score` is its object's confidence (its predicted IoU when the
    prediction's quality was estimated); a label's brush region carries its objects' confidence weighted by
    their area.
    """
    from label_studio_sdk.converter.brush import mask2rle

    height, width = instances.map.shape
    names = {label_id: name for name, label_id in view.label_ids.items()}
    by_label: dict[int, list] = {}
    for obj in instances.objects:
        by_label.setdefault(int(obj.class_id), []).append(obj)
    regions = []
    for label_id, members in by_label.items():
        name = names.get(label_id)
        if name is None:
            continue
        control = view.control_for(name, prefer)
        base = {"from_name": control.name, "to_name": view.image_name, "type": control.kind,
                "original_width": int(width), "original_height": int(height), "image_rotation": 0}
        if control.kind == BRUSH and not objects:
            binary = np.isin(instances.map, [o.id for o in members])
            score = sum(o.confidence * o.area for o in members) / max(1, sum(o.area for o in members))
            parts = [(binary, score)]
        else:
            parts = [(instances.map == o.id, o.confidence) for o in members]
        for binary, score in parts:
            if control.kind == BRUSH:
                regions.append(dict(base, id=_new_id(), score=round(float(score), 4),
                                    value={"format": "rle", "rle": mask2rle(binary.astype(np.uint8) * 255),
                                           BRUSH: [name]}))
                continue
            for polygon in mask_to_polygons(binary, tolerance=tolerance, min_area=0):
                regions.append(dict(base, id=_new_id(), score=round(float(score), 4),
                                    value={"points": pixels_to_points(polygon, (height, width)), "closed": True,
                                           POLYGON: [name]}))
    return regions
