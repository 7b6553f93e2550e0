"""FiftyOne labels <-> SegGPT label maps: `SegmentationCodec` and `DetectionsCodec`.

    codec = make_codec(kind, label_field, seg_type)
    codec.prepare(prompt_labels)                    # fixes class order / id ranges (Detections)
    mask = codec.encode(label, height, width, name) # a prompt label as a label map at its image's size
    staged, meta = codec.decode(prediction)         # a prediction as an array to stage (PNG) + metadata
    label = codec.label(staged, meta, mask_path)    # the FiftyOne label to write
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from seggpt_plugins.errors import InputError
from seggpt_plugins.images import resize_nearest, to_mask
from seggpt_plugins.instances import Instances, ObjectRule
from seggpt_plugins.vocabulary import MAX_CLASSES

from seggpt_plugins.fiftyone.fields import DETECTIONS, SEGMENTATION

MAX_INSTANCES = 65535  # instances of one image (staged as a 16-bit PNG)
OBJECTS = ObjectRule(max_instances=MAX_INSTANCES)  # the core's object rule, as every host applies it


class SegmentationCodec:
    """Segmentation <-> label map: the mask's own ids (or RGB colours) are the prompt's ids."""

    kind = SEGMENTATION

    def __init__(self, field: str):
        self.field = field
        self.rgb = False  # RGB colour masks (mask_targets keyed by hex colours)

    def prepare(self, labels: list) -> None:
        pass

    def encode(self, label, height: int, width: int, name: str) -> np.ndarray:
        mask = label.get_mask() if label is not None else None
        if mask is None:
            raise InputError(f"{name}: its '{self.field}' Segmentation has neither a mask nor a mask_path")
        mask = resize_nearest(to_mask(mask, name=f"{name} '{self.field}' mask"), height, width)
        self.rgb = self.rgb or mask.ndim == 3
        return mask

    def decode(self, pred, instances=None) -> tuple[np.ndarray, Any]:
        """Prediction -> (array to stage as PNG, metadata kept in memory); `instances` are not used."""
        labels = pred.labels
        top = int(labels.max()) if labels.size else 0
        if self.rgb:  # ids 1..K stand for the prompts' colours
            lut = np.zeros((max(top, max(pred.colors, default=0)) + 1, 3), np.uint8)
            for label_id, color in pred.colors.items():
                lut[label_id] = color
            return lut[labels], None
        if top > 65535:
            raise InputError(f"label ids up to {top} do not fit a 16-bit mask")
        return labels.astype(np.uint8 if top <= 255 else np.uint16), None

    def label(self, staged: np.ndarray, meta, mask_path: str | None):
        import fiftyone as fo

        return fo.Segmentation(mask_path=mask_path) if mask_path else fo.Segmentation(mask=staged)


class DetectionsCodec:
    """Detections with instance masks <-> label map.

    Instance encoding (type token "instance", when it fits SegGPT's colour budget): every class gets a
    range of ids as wide as its largest object count in one prompt, each object its own id in its class's
    range, so a painted colour tells both the object and its class. Class encoding ("semantic", or too
    many objects): one id per class. Either way the prediction's objects are the core's (OBJECTS, the
    rule every host applies), one Detection each, labelled with its id's class.
    """

    kind = DETECTIONS

    def __init__(self, field: str, seg_type: str):
        self.field = field
        self.seg_type = seg_type
        self.classes: list = []
        self.offsets: np.ndarray = np.zeros(0, np.int64)
        self.widths: np.ndarray = np.zeros(0, np.int64)

    def prepare(self, labels: list) -> None:
        """Fix the class order and id ranges from all prompt labels (before encoding any of them)."""
        counts: list[dict] = []
        for label in labels:
            per_class: dict = {}
            for det in (label.detections if label is not None else []):
                per_class[det.label] = per_class.get(det.label, 0) + 1
            counts.append(per_class)
        self.classes = sorted({c for per_class in counts for c in per_class}, key=lambda c: (c is None, str(c)))
        widths = np.array([max(pc.get(c, 0) for pc in counts) for c in self.classes], np.int64)
        if self.seg_type != "instance" or widths.sum() > MAX_CLASSES:
            widths = np.ones(len(self.classes), np.int64)
        self.widths = widths
        self.offsets = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.int64)

    @property
    def instance_ids(self) -> bool:
        return bool(np.any(self.widths > 1))

    def encode(self, label, height: int, width: int, name: str) -> np.ndarray:
        import fiftyone as fo

        index = {c: i for i, c in enumerate(self.classes)}
        canvas = np.zeros((height, width), np.uint8)
        seen = np.zeros(len(self.classes), np.int64)
        for det in (label.detections if label is not None else []):
            mask = det.get_mask()
            if mask is None:
                raise InputError(f"{name}: a detection ('{det.label}') in '{self.field}' has no instance mask; "
                                 "SegGPT needs masks, not only boxes")
            c = index[det.label]
            target = int(self.offsets[c] + seen[c] % self.widths[c] + 1)
            seen[c] += 1
            fo.Detection(bounding_box=det.bounding_box, mask=np.asarray(mask).astype(bool)).to_segmentation(
                mask=canvas, target=target)
        return canvas

    def class_of(self, label_id: int):
        c = int(np.searchsorted(self.offsets, label_id - 1, side="right")) - 1
        return self.classes[c]

    def decode(self, pred, instances: Instances | None = None) -> tuple[np.ndarray, list]:
        """Prediction -> (instance map 1..N, [(class, confidence, box)] per instance): its objects by the core's
        rule (OBJECTS, or `instances` found by it already, e.g. by the runner), each with its confidence (its
        predicted IoU when the prediction's quality was estimated)."""
        if instances is None:
            try:
                instances = pred.objects(OBJECTS)
            except ValueError:
                raise InputError(f"more than {MAX_INSTANCES} predicted instances in one image") from None
        meta = [(self.class_of(o.class_id), o.confidence, o.box) for o in instances.objects]
        return instances.map.astype(np.uint16, copy=False), meta

    def decode_objects(self, instances) -> tuple[np.ndarray, list]:
        """Tracked objects of a video frame (the core's `Instances`, ids that follow each object through the
        video) -> (their id map, [(class, confidence, box, object id)]): the id becomes `Detection.index`."""
        top = max((o.id for o in instances.objects), default=0)
        if top > MAX_INSTANCES:
            raise InputError(f"more than {MAX_INSTANCES} objects tracked in one video")
        meta = [(self.class_of(o.class_id), o.score, o.box, o.id) for o in instances.objects]
        return instances.map.astype(np.uint16, copy=False), meta

    def label(self, staged: np.ndarray, meta: list, mask_path: str | None, final_dir: str | None = None):
        """With mask_path (a folder), one PNG per detection is written there, referenced as final_dir/k.png.
        meta: (class, confidence, box) per instance k = 1..N of `staged`, or (class, confidence, box, id) for
        tracked objects (`decode_objects`: the instance is `staged == id`, and the id its Detection's index)."""
        import fiftyone as fo

        from seggpt_plugins.io import write_png

        height, width = staged.shape
        detections = []
        for k, (cls, confidence, region, *tracked) in enumerate(meta, 1):
            ys, xs = region
            box = [xs.start / width, ys.start / height, (xs.stop - xs.start) / width, (ys.stop - ys.start) / height]
            crop = staged[region] == (tracked[0] if tracked else k)
            if mask_path:
                write_png(os.path.join(mask_path, f"{k}.png"), crop.astype(np.uint8) * 255, overwrite=True)
                det = fo.Detection(label=cls, bounding_box=box, confidence=confidence,
                                   mask_path=os.path.join(final_dir or mask_path, f"{k}.png"))
            else:
                det = fo.Detection(label=cls, bounding_box=box, mask=crop, confidence=confidence)
            if tracked:
                det.index = int(tracked[0])
            detections.append(det)
        return fo.Detections(detections=detections)


def make_codec(kind: str, field: str, seg_type: str):
    return SegmentationCodec(field) if kind == SEGMENTATION else DetectionsCodec(field, seg_type)
