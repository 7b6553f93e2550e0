"""Propagating frame labels through the videos of a video dataset (prompts and targets: see `plan.py`).

    plan = make_plan(dataset, params, view)             # plan.video: the labels are frame fields
    steps = segment_videos(dataset, plan.opts, plan.prompts, plan.target_ids(), kind=plan.kind)
    summary = yield from steps                           # yields (fraction, label); returns a summary dict

First every video is checked, before the model is loaded: its file opens and its first and last frames
decode (the core's `open_frames`), its annotated frames lie inside it and their Segmentation masks have its
frame size; an InputError names the file and the field otherwise. Then each video with frames to label is
propagated by the core (`propagate_video`: outward from its annotated frames, both ways, with a memory of
the last predicted frames; objects tracked from frame to frame for Detections), decoding one frame at a
time. FiftyOne numbers frames from 1, the core from 0: frame number n is index n - 1 of the file.

Frames that already have the output are still predicted with skip_existing (the memory of a run needs
them) but not written; a video with nothing to write is not decoded. Every prediction is staged and the
frame field committed at the end, in one command (`commit.py`), as for images.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from seggpt_plugins.errors import InputError
from seggpt_plugins.images import to_rgb8
from seggpt_plugins.prompts import PromptPool
from seggpt_plugins.video import open_frames, propagate_video

from seggpt_plugins.fiftyone.codecs import OBJECTS, make_codec
from seggpt_plugins.fiftyone.commit import Commit, frame_key, recover
from seggpt_plugins.fiftyone.fields import DETECTIONS, SEGMENTATION, frame_field
from seggpt_plugins.fiftyone.models import shown_name
from seggpt_plugins.fiftyone.options import Options
from seggpt_plugins.fiftyone.segment import Progress, load_model


@dataclass
class Video:
    """One video of the run, as checked: its frames, annotations and the frames to write."""

    sample_id: str
    filepath: str
    count: int  # frames in the file (FiftyOne numbers them 1..count)
    size: tuple[int, int]  # (height, width) of every frame
    labels: dict[int, Any] = field(default_factory=dict)  # frame number -> its label-field label
    frame_ids: dict[int, str] = field(default_factory=dict)  # frame number -> frame id, of the annotated frames
    todo: list[int] = field(default_factory=list)  # frame numbers that get the output

    @property
    def name(self) -> str:
        return os.path.basename(self.filepath)


def check_videos(dataset, opts: Options, kind: str, ids: list[str], targets: set[str]) -> list[Video]:
    """Open and check every video of `ids` (targets and prompt videos), read its annotations, and work out
    the frames to write (every frame of a target but the annotated ones; with skip_existing, not those that
    have the output). InputError naming the file and the field on bad input; nothing is decoded but the
    first and last frame of each video."""
    from fiftyone import ViewField as F

    view = dataset.select(list(ids), ordered=True)
    label_name = frame_field(opts.label_field)
    annotated = view.match_frames(F(label_name) != None)  # noqa: E711 (a database expression)
    found = dict(zip(*annotated.values(["id", "frames.frame_number"])))
    labels = dict(zip(annotated.values("id"), annotated.values(opts.label_field)))
    frame_ids = dict(zip(annotated.values("id"), annotated.values("frames.id")))
    done: dict = {}
    if opts.skip_existing and dataset.has_field(opts.output_field):
        written = view.match_frames(F(frame_field(opts.output_field)) != None)  # noqa: E711
        done = dict(zip(*written.values(["id", "frames.frame_number"])))
    videos = []
    for sample_id, filepath in zip(*view.values(["id", "filepath"])):
        with open_frames(filepath) as frames:  # a missing, corrupt or undecodable file fails here
            video = Video(sample_id, filepath, frames.count, frames.size)
        numbers = found.get(sample_id, [])
        video.labels = dict(zip(numbers, labels.get(sample_id, [])))
        video.frame_ids = dict(zip(numbers, frame_ids.get(sample_id, [])))
        for number, label in video.labels.items():
            _check_annotation(video, number, label, opts.label_field, kind)
        if sample_id in targets:
            skip = set(video.labels) | set(done.get(sample_id, []))
            video.todo = [n for n in range(1, video.count + 1) if n not in skip]
        videos.append(video)
    return videos


def _check_annotation(video: Video, number: int, label, label_field: str, kind: str) -> None:
    where = f"{video.filepath}: frame {number} of '{label_field}'"
    if number > video.count:
        raise InputError(f"{where} is past the end of the video, which has {video.count} frames (numbered 1.."
                         f"{video.count})")
    if kind != SEGMENTATION:
        return  # Detections: boxes and masks are relative to the frame
    try:
        mask = label.get_mask()
    except Exception as exc:  # e.g. a mask_path whose file is gone
        raise InputError(f"{where}: its mask cannot be read ({type(exc).__name__}: {exc})") from None
    if mask is None:
        raise InputError(f"{where}: the Segmentation has neither a mask nor a mask_path")
    mask = np.asarray(mask)
    if mask.shape[:2] != tuple(video.size):
        raise InputError(f"{where}: the mask is {mask.shape[1]}x{mask.shape[0]} (width x height), but the video's "
                         f"frames are {video.size[1]}x{video.size[0]}")
    if mask.ndim != 2:
        raise InputError(f"{where}: a colour (RGB) mask; video propagation needs integer label masks")


def external_pool(videos: list[Video], prompts: list[str], codec) -> PromptPool | None:
    """The annotated frames of the prompt videos, as a core PromptPool keyed by frame id."""
    sources = [(v, n) for v in videos if v.sample_id in set(prompts) for n in sorted(v.labels)]
    if not sources:
        return None

    def load(i: int):
        video, number = sources[i]
        with open_frames(video.filepath, check=False) as frames:
            rgb = to_rgb8(frames[number - 1], name=f"{video.filepath} frame {number}")
        name = f"{video.name} frame {number}"
        return rgb, codec.encode(video.labels[number], rgb.shape[0], rgb.shape[1], name=name)

    return PromptPool([video.frame_ids[n] for video, n in sources], load)


def segment_videos(dataset, opts: Options, prompts: list[str], targets: list[str], *, kind: str,
                   declare: bool = True, model=None) -> Iterator[tuple[float, str]]:
    """Label every frame to write of every target video, then commit the frame field; yields (fraction,
    label); returns a summary dict. prompts: the prompt videos (their annotated frames are prompts for the
    other videos); declare: as `segment.segment_view`."""
    started = time.monotonic()
    seg_type = opts.embedding_type or ("semantic" if kind == SEGMENTATION else "instance")
    codec = make_codec(kind, opts.label_field, seg_type)
    recover(dataset, opts)
    yield 0.0, f"Checking {len(targets)} video{'' if len(targets) == 1 else 's'}"
    videos = check_videos(dataset, opts, kind, list(dict.fromkeys(list(targets) + list(prompts))), set(targets))
    for video in videos:
        if video.sample_id in set(targets) and video.todo and not video.labels and not prompts:
            raise InputError(f"{video.filepath}: no frame has '{opts.label_field}' and there are no prompt videos "
                             "to learn from")
    codec.prepare([label for video in videos for label in video.labels.values()])
    pool = external_pool(videos, prompts, codec)
    work = [v for v in videos if v.todo]
    summary: dict[str, Any] = {"output_field": opts.output_field, "confidence_field": opts.confidence_field,
                               "prompts": len(prompts), "videos": len(work), "targets": 0, "unit": "frames",
                               "embedding_type": seg_type}
    if work:
        if model is None:
            yield 0.0, f"Loading model {shown_name(opts.model)}"
            model = load_model(opts)
        commit = Commit(dataset, opts, kind, declare=declare, frames=True)
        try:
            yield from _propagate(model, opts, seg_type, codec, pool, work, commit)
            keys = [frame_key(v.sample_id, n) for v in work for n in v.todo]
            yield 0.95, f"Saving {len(keys)} frame labels to '{opts.output_field}'"
            commit.run(codec, keys)
        finally:
            commit.close()
        summary["targets"] = len(commit.confidence)
        summary["mean_confidence"] = float(np.mean(list(commit.confidence.values())))
        if kind == DETECTIONS:
            summary["instances"] = int(sum(len(m) for m in commit.meta.values()))
    summary["seconds"] = round(time.monotonic() - started, 3)
    yield 1.0, f"Done: {summary['targets']} frames of {len(work)} videos written to '{opts.output_field}'"
    return summary


def _propagate(model, opts: Options, seg_type: str, codec, pool, videos: list[Video], commit: Commit):
    """Each video through the core's propagation, frame by frame; the frames to write are staged."""
    progress = Progress()
    total = sum(v.count - len(v.labels) for v in videos)
    done = 0
    for number, video in enumerate(videos, 1):
        with open_frames(video.filepath) as frames:
            annotations = {n - 1: codec.encode(label, *video.size, name=f"{video.name} frame {n}")
                           for n, label in video.labels.items()}
            images, masks, used = [], [], list(video.frame_ids.values())
            extra = opts.max_prompts - len(annotations)
            if pool is not None and extra > 0:
                first = to_rgb8(frames[min(annotations, default=0)], name=str(video.filepath))
                chosen = pool.choose(first, extra, exclude=used)  # not the video's own frames
                images, masks = pool.pairs(chosen)
                used += [pool.keys[i] for i in chosen]
            todo = set(video.todo)
            results = propagate_video(model, frames, annotations, images or None, masks or None,
                                      objects=OBJECTS if codec.kind == DETECTIONS else None,
                                      memory=opts.memory, batch_size=opts.batch_size, seg_type=seg_type,
                                      max_prompts=opts.max_prompts, ensemble=opts.ensemble,
                                      example_ids="classes")  # the codec's ids, as its segment runs have them
            for result in results:
                if result.annotated:
                    continue
                frame_number = result.index + 1
                if frame_number in todo:
                    if codec.kind == DETECTIONS:
                        staged, meta = codec.decode_objects(result.instances)
                    else:
                        staged, meta = codec.decode(result.prediction)
                    commit.stage(frame_key(video.sample_id, frame_number), staged, meta,
                                 float(result.prediction.confidence), used)
                done += 1
                if progress.due(force=done in (1, total)):
                    commit.heartbeat()
                    yield (0.95 * done / total,
                           f"Video {number}/{len(videos)} ({video.name}): frame {frame_number}/{video.count}")
