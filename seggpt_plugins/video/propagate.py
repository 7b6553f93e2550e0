"""`propagate_video`: every chosen frame of a video once, the annotated frames and then SegGPT's predictions
(`model.propagate`), with object ids kept through the video."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from ..errors import InputError
from .frames import Frames

if TYPE_CHECKING:
    from ..instances import ObjectRule


@dataclass
class FrameResult:
    """One chosen frame's labels: `prediction.labels` (the annotation itself for annotated frames, with
    scores 1) and, with objects, `instances` whose ids follow each object through the video."""

    index: int  # frame index in the file (prediction.index too)
    time: float  # seconds from the first frame
    prediction: Any  # engine.Prediction
    instances: Any = None  # instances.Instances when objects were asked for
    annotated: bool = False


def propagate_video(model, frames: Frames, annotations: dict | None = None, prompt_images=None, prompt_masks=None,
                    *, objects: ObjectRule | bool | None = None, **options) -> Iterator[FrameResult]:
    """Every chosen frame once: the annotated frames first (as given), then SegGPT's predictions as
    `model.propagate` yields them (runs outward from the annotated frames, both ways; in order without).

    annotations: {frame index in the file: label mask (H, W)}; each must be a chosen frame of `frames`.
    objects: the rule (instances.ObjectRule; True: its defaults) by which each predicted frame's objects are
    found (`Prediction.objects`), with ids that stay with them from the annotated frames' objects outward
    (tracking.StackTracker); None or False: labels alone. options: model.propagate's (memory, batch_size,
    seg_type, intensity_range, max_prompts, ensemble, ...). Only the current frames and the last object map
    of each run are held, so memory stays flat however long the video.
    """
    from ..engine import Prediction
    from ..images import to_mask
    from ..instances import ObjectRule
    from ..tracking import StackTracker, annotated_objects

    masks = {}
    for index, mask in sorted((annotations or {}).items()):
        position = frames.position(int(index), name=f"annotation of frame {index}")
        mask = to_mask(mask, name=f"annotation of frame {index}")
        if mask.ndim != 2 or mask.shape != frames.size:
            raise InputError(f"annotation of frame {index}: a label mask of {frames.size[1]}x{frames.size[0]} (width x "
                             f"height) is needed, like the frames of {frames.path}; got shape {mask.shape}")
        masks[position] = mask
    rule = ObjectRule() if objects is True else objects or None
    tracker = StackTracker(len(frames), annotated_objects(masks)) if rule is not None else None
    predictions = model.propagate(frames, prompt_images, prompt_masks, annotations=masks, **options)
    for position, mask in masks.items():
        index = frames.indices[position]
        prediction = Prediction(labels=mask, scores=np.ones(mask.shape, np.float32), index=index)
        yield FrameResult(index, frames.time(position), prediction,
                          tracker.annotated[position] if tracker is not None else None, annotated=True)
    for prediction in predictions:
        position = prediction.index
        prediction.index = frames.indices[position]
        instances = tracker.follow(position, prediction.objects(rule)) if tracker is not None else None
        yield FrameResult(prediction.index, frames.time(position), prediction, instances)
