"""Propagation through stacks and videos.

Fixed prompts (example pairs, annotated frames) plus a FIFO memory of each run's last predicted
frames, coloured with the prompts' own colour code so every object keeps its id from frame to frame.
Runs go outward from annotated frames; independent runs advance in lockstep, their next frames one
step of the Runner (runner.py), so they share batches and every frame is painted and judged as `segment`'s
targets are.

The memory must not drift (a predicted frame feeds its errors into the next one, until whole frames are
painted). Two rules hold it to the examples:
- it weighs at most as much as the fixed prompts in the ensemble (each remembered frame weighs
  fixed/remembered when there are more of them), so the examples keep half the say at least;
- a predicted frame joins it only when its painted share is within MEMORY_SHARE_FACTOR of the
  examples' (ExampleStats.foreground); an over- or under-painted frame is predicted but not remembered.
Frames are read as the plain nearest colour (PROPAGATION_MARGIN), whatever foreground margin the model
reads a still image with: remembered, a margined frame makes the next one paint a little less, and the
gate then keeps frames out until the objects fade; read plain, the memory holds and the frames are nearer
the truth (BENCHMARKS.md section 19).
Chosen on generated moving scenes (seeds 0-2) and stardist's stack; BENCHMARKS.md section 15.

When an annotated frame's ids are objects (each one connected piece), its runs' ids follow the objects by
where they were going, not by colour alone (object_tracks.py: crossing objects keep their ids, an object
that has gone ends), and the memory remembers the followed ids; BENCHMARKS.md section 17. When the
annotations are instance labels (`example_ids`, as `segment` reads examples: example_ids.py), their objects
are shown as their foreground, one class, and the runs' tracks tell the objects apart; without tracks
(an id in pieces, or follow_objects=False) the predictions say `ids_are_objects`, and the object rule
splits their foreground, as in `segment`. On stardist's stack that raised instance F1 from 0.48 to 0.63 on
the design half of the slices (0.33 -> 0.43 on the other); BENCHMARKS.md section 18.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from .errors import InputError
from .example_ids import check_example_ids, foreground, ids_are_objects
from .images import shared_range, to_mask
from .prompts import PromptSet, as_list, is_tuned, nearest
from .run_items import Target
from .runner import Runner
from .vocabulary import SEG_TYPES


#: a predicted frame joins the memory when its painted share is within this factor of the examples'
MEMORY_SHARE_FACTOR = 1.5
#: the foreground margin propagated frames are read with (colors.favour_background): the plain nearest colour
PROPAGATION_MARGIN = 0.0


@dataclass
class Run:
    """Frames processed one after another from an origin (an annotated frame, or None for a video)."""

    origin: int | None
    frames: list[int]
    position: int = 0
    fixed: Any = None  # PromptSet
    memory: deque = field(default_factory=deque)  # (image, mask) model-size tensors of recent predictions
    left_out: int = 0  # predicted frames kept out of the memory (their painted share far from the examples')
    tracks: Any = None  # object_tracks.ObjectTracks: the origin's objects, when its ids are objects

    @property
    def done(self) -> bool:
        return self.position >= len(self.frames)


def plan_runs(num_frames: int, annotated: Sequence[int]) -> list[Run]:
    """Outward runs: before the first annotation going down, after the last going up, and each gap
    between two annotations filled from both ends (each frame from its nearer annotation)."""
    annotated = sorted(set(annotated))
    if not annotated:
        return [Run(None, list(range(num_frames)))]
    runs = [Run(annotated[0], list(range(annotated[0] - 1, -1, -1)))]
    for low, high in zip(annotated, annotated[1:]):
        middle = (low + high) // 2
        runs.append(Run(low, list(range(low + 1, middle + 1))))
        runs.append(Run(high, list(range(high - 1, middle, -1))))
    runs.append(Run(annotated[-1], list(range(annotated[-1] + 1, num_frames))))
    return [run for run in runs if run.frames]


def stack_intensity_range(frames: Sequence, samples: int = 16) -> tuple[float, float] | None:
    """One robust intensity range for a whole stack (None for 8-bit data), from up to `samples` frames."""
    if np.asarray(frames[0]).dtype == np.uint8:
        return None  # (without reading the other frames)
    picks = np.unique(np.linspace(0, len(frames) - 1, min(samples, len(frames))).round().astype(int))
    return shared_range([frames[int(i)] for i in picks])


def propagate(model, frames: Sequence, prompt_images=None, prompt_masks=None, *, memory: int = 8,
              annotations: dict | None = None, max_prompts: int | None = None, batch_size: int = 8,
              seg_type: str = "instance", intensity_range=None, label_ids=None, ensemble: str = "feature",
              quality: str | None = "fast", memory_gate: bool = True, follow_objects: bool = True,
              example_ids: str = "auto") -> Iterator:
    """See SegGPT.propagate. Each step, the next frame of every run goes through the one loop (runner.Runner:
    batches, colour mode, unseen ids, the quality estimate), each frame a Target with its run's prompts; the
    model's public steps only, so this module does not import the engine. memory_gate=False: the memory as
    it was before its rules (every predicted frame joins it, each weighing as much as an example), for
    comparisons. Each prediction says whether it joined its run's memory (`joined_memory`). follow_objects:
    when an annotated frame's ids are objects (each one connected piece), its runs' ids follow the objects
    by where they were going (object_tracks.py: crossing objects keep their ids, an object that has gone
    ends); False: ids by their painted colours alone, as before. example_ids: what the annotations' ids
    mean, as in `segment` ("auto": objects when they look like instance labels; "classes"; "instances"):
    objects are shown as their foreground (see the module docstring)."""
    num_frames = len(frames)
    if num_frames == 0:
        raise InputError("no frames given")
    if memory < 0 or batch_size < 1 or (max_prompts is not None and max_prompts < 1):
        raise InputError(f"memory must be >= 0, batch_size and max_prompts >= 1 (got {memory}, {batch_size}, "
                         f"{max_prompts})")
    if seg_type not in SEG_TYPES:
        raise InputError(f"seg_type must be one of {SEG_TYPES}, got {seg_type!r}")
    if quality not in (None, "fast"):
        raise InputError(f"propagate estimates quality 'fast' or None, got {quality!r} ('full' is for segment)")
    annotations = {int(k): v for k, v in (annotations or {}).items()}
    bad = [k for k in annotations if not 0 <= k < num_frames]
    if bad:
        raise InputError(f"annotated frame indices {bad} are outside the stack of {num_frames} frames "
                         f"(0..{num_frames - 1})")
    if not annotations and not as_list(prompt_images):
        raise InputError("no prompts given: pass example pairs (prompt_images, prompt_masks) or annotations")
    if intensity_range is None:
        intensity_range = stack_intensity_range(frames)

    check_example_ids(example_ids)
    annotation_masks = {i: to_mask(m, name=f"annotation of frame {i}") for i, m in sorted(annotations.items())}
    frame_shape = np.asarray(frames[0]).shape[:2]
    for i, mask in annotation_masks.items():
        if mask.shape[:2] != frame_shape:
            raise InputError(f"annotation of frame {i}: mask size {mask.shape[1]}x{mask.shape[0]} differs from the "
                             f"frame size {frame_shape[1]}x{frame_shape[0]} (width x height)")
    external_images = as_list(prompt_images)
    external_masks = [to_mask(m, name=f"prompt {k} mask") for k, m in enumerate(as_list(prompt_masks))]
    objects = _annotated_objects(annotation_masks, external_images, label_ids, example_ids)
    shown = {i: foreground(m) for i, m in annotation_masks.items()} if objects else annotation_masks
    code = None
    if not any(is_tuned(p) for p in external_images):
        code = model.color_code([], external_masks + list(shown.values()), label_ids)
    # ids stay colours here: a propagated id is followed through the memory by its colour, or (objects shown
    # as their foreground) by its track (example_ids.py, object_tracks.py)
    external = model.prepare_prompts(external_images, external_masks, intensity_range, code=code,
                                     ensemble=ensemble, example_ids="classes") if external_images else None
    code = external.code if external is not None else code
    annotated = {i: model.prepare_prompts([frames[i]], [m], intensity_range, code=code, example_ids="classes")
                 for i, m in shown.items()}

    runs = plan_runs(num_frames, annotated)
    for run in runs:
        nearby = nearest(annotated, run.origin, None) if run.origin is not None else []
        if ensemble == "feature" or not nearby:
            sets = ([external] if external is not None else []) + [annotated[i] for i in nearby]
            run.fixed = PromptSet.concat(sets).first(max_prompts)
        else:  # the examples of this run stitched together (at most max_prompts of them)
            examples = (external_images + [frames[i] for i in nearby])[:max_prompts]
            masks = (external_masks + [shown[i] for i in nearby])[:max_prompts]
            run.fixed = model.prepare_prompts(examples, masks, intensity_range, code=code, ensemble=ensemble,
                                              example_ids="classes")
        run.memory = deque(maxlen=memory)
        if follow_objects and run.origin is not None:
            run.tracks = _object_tracks(annotation_masks[run.origin])

    # each step, the next frame of every run still going: one Target each, with its run's prompts
    runner = Runner(model, None, batch_size=batch_size, seg_type=seg_type, intensity_range=intensity_range,
                    quality=quality, keep_images=True, readers=0, foreground_margin=PROPAGATION_MARGIN)
    while True:
        active = [run for run in runs if not run.done]
        if not active:
            return
        step = [_next_target(run, frames, memory_gate, objects) for run in active]
        for run, result in zip(active, runner.run(step, errors="raise")):
            prediction = result.prediction
            prediction.index = result.key
            prediction.ids_are_objects = objects and run.tracks is None  # id 1 is all of them: split by the rule
            prediction.joined_memory = bool(run.memory.maxlen) and (
                not memory_gate or _agrees(prediction.labels, run.fixed.examples))
            if prediction.joined_memory:
                remembered = foreground(prediction.labels) if objects else prediction.labels
                frame, colour_mask = model.encode_images([result.rgb]), model.encode_images(
                    [code.encode(remembered)], nearest=True)
                run.memory.append((frame[0], colour_mask[0]))
            elif run.memory.maxlen:
                run.left_out += 1
            run.position += 1
            yield prediction


def _next_target(run: Run, frames: Sequence, gated: bool, objects: bool) -> Target:
    """The run's next frame with its prompts: the fixed ones and the memory (and its object tracks, which
    read a frame painted as the objects' foreground when `objects`)."""
    index = run.frames[run.position]
    relabel = None
    if run.tracks is not None:
        relabel = run.tracks.follow_foreground if objects else run.tracks.follow
    return Target(key=index, image=lambda: frames[index], name=f"frame {index}",
                  prompts=_with_memory(run, gated), relabel=relabel)


def _annotated_objects(annotations: dict, external: list, label_ids, example_ids: str) -> bool:
    """Whether the annotated frames' ids are objects of one class (example_ids.py): then they are shown as
    their foreground, as `segment` shows such examples, and each run follows its objects by their tracks."""
    if example_ids == "instances" and (external or label_ids is not None):
        raise InputError("example ids 'instances' in propagate reads the annotated frames' ids as objects; "
                         "example pairs and label ids are classes (use 'auto' or 'classes')")
    if not annotations or external or label_ids is not None:
        return False
    return ids_are_objects(list(annotations.values()), example_ids)


def _object_tracks(annotation: np.ndarray):
    """ObjectTracks of an annotated frame whose ids are all objects (one connected piece each), else None
    (its ids are classes: a class may be painted in any number of pieces)."""
    from .object_tracks import ObjectTracks, one_piece_ids

    if annotation.ndim != 2:
        return None  # a colour mask: its colours are classes
    ids = one_piece_ids(annotation)
    return ObjectTracks(annotation, ids) if ids and len(ids) == len(np.unique(annotation[annotation > 0])) else None


def _with_memory(run: Run, gated: bool):
    """The run's prompts for its next frame: the fixed ones, then the memory weighing at most as much."""
    if not run.memory:
        return run.fixed
    weight = min(1.0, len(run.fixed) / len(run.memory)) if gated else 1.0
    return run.fixed.extended(*_stacked(run.memory), weight=weight)


def _agrees(labels: np.ndarray, examples) -> bool:
    """Whether a predicted frame's painted share is within MEMORY_SHARE_FACTOR of its examples' (True when
    the examples say nothing, e.g. tuned prompts alone)."""
    expected = getattr(examples, "foreground", float("nan"))
    if not expected > 0:
        return True
    share = np.count_nonzero(labels) / labels.size
    return expected / MEMORY_SHARE_FACTOR <= share <= expected * MEMORY_SHARE_FACTOR


def _stacked(memory: deque):
    """The memory's (image, mask) pairs as two (M, 3, h, w) tensors."""
    import torch

    return torch.stack([m[0] for m in memory]), torch.stack([m[1] for m in memory])
