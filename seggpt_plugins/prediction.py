"""One target's result: labels, per-pixel scores, its predicted IoU, and its objects on request."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .instances import Instances, ObjectRule


@dataclass
class Prediction:
    """One target's result, at the target's own size."""

    labels: np.ndarray  # (H, W) integer label ids (the prompt's own ids; 0 = background)
    scores: np.ndarray  # (H, W) float32 in [0, 1]: how clearly each pixel snapped to its colour
    painting: np.ndarray | None = None  # (H, W, 3) uint8: the model's raw RGB painting, resized (on request)
    index: int = 0  # which target (segment) or frame (propagate) this is
    colors: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # label id -> prompt colour
    quality: float | None = None  # the predicted IoU of this proposal (quality.py), when estimated
    quality_features: dict[str, float] | None = None  # what the estimate read (quality.features)
    object_context: Any = field(default=None, repr=False, compare=False)  # quality.ObjectContext: for instances()
    ids_are_objects: bool = False  # painted from examples whose ids were objects (example_ids.py): id 1 is all
    joined_memory: bool | None = None  # propagation: whether this frame joined its run's memory (propagation.py)

    @property
    def confidence(self) -> float:
        """How far to trust this proposal, in [0, 1], to review the lowest first: the predicted IoU
        (`quality`) when it was estimated, else the mean snap score over the foreground."""
        return self.quality if self.quality is not None else self.snap_confidence

    @property
    def snap_confidence(self) -> float:
        """Mean score over the pixels predicted as foreground (1.0 when there are none): how cleanly the
        painting snapped to prompt colours, not how right it is (see quality.py)."""
        foreground = self.labels != 0
        return float(self.scores[foreground].mean()) if foreground.any() else 1.0

    def objects(self, rule: ObjectRule = ObjectRule()) -> Instances:
        """One id per object by `rule` (instances.ObjectRule): an `Instances` with the id map and, per object,
        its class (the label id it was painted with, or `rule.classes[id]`), area, box, mean score and, when
        this prediction's quality was estimated, its predicted IoU (`quality`, quality.ObjectContext).
        Painted from examples whose ids were objects, touching objects are always split: the foreground is
        one class, and the object step is what tells the objects apart."""
        if self.ids_are_objects and not rule.split_touching:
            rule = replace(rule, split_touching=True)
        return self.with_object_quality(rule.find(self.labels, self.scores))

    def instances(self, min_area: int = 16, split_touching: bool = False, object_radius: float | None = None,
                  classes: dict[int, int] | None = None) -> Instances:
        """`objects` by the rule these arguments make (instances.ObjectRule)."""
        return self.objects(ObjectRule(min_area, split_touching, object_radius, classes))

    def with_object_quality(self, instances: Instances) -> Instances:
        """`instances` of this prediction (e.g. tracked through a stack) with each object's predicted IoU,
        when this prediction's quality was estimated with a per-object estimate; else unchanged."""
        context = self.object_context
        if context is None or context.model is None or not len(instances):
            return instances
        return instances.with_quality(context.qualities(instances.map, self.scores))
