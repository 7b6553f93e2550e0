"""What a run will do, worked out once for the App form and for the run itself.

    plan = make_plan(dataset, params, view, selected=[...])   # ParamError naming the parameter at fault
    plan.kind, plan.prompts, plan.prompt_source, plan.targets  # targets: a view (count it, or take its ids)

Prompts are the tagged samples, else the selection, else every sample whose label field is filled (always
from the whole dataset); targets are the target view minus the prompts (minus samples that already have the
output field, with skip_existing).

Video datasets (fields 'frames.<name>'): every video of the target view is a target, propagated from its
own annotated frames (the frames whose label field is set). Tagged (else selected) videos are prompt
videos besides: their annotated frames are prompts for the other videos too, so a video with no annotated
frame of its own can be propagated from them. `plan.prompts` are then the prompt videos (often none);
which frames get labels is worked out per frame by the run (`videos.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from seggpt_plugins.fiftyone.fields import DETECTIONS, SEGMENTATION, check, field_kind, frame_field, is_video
from seggpt_plugins.fiftyone.options import Options, ParamError


@dataclass
class Plan:
    opts: Options
    kind: str  # SEGMENTATION or DETECTIONS: what the label field holds and the output gets
    prompts: list[str]  # prompt sample ids
    prompt_source: str  # how the prompts were chosen, for people
    targets: object  # the view of the samples to predict
    video: bool = False  # a video dataset: prompts and targets are videos, labels are on frames

    def target_ids(self) -> list[str]:
        return self.targets.values("id")


def make_plan(dataset, params: dict, view, selected=(), fixed_prompts=None, shard: bool = False) -> Plan:
    """Parse and check the params, choose the prompts and the targets; ParamError on bad input.

    view: the target view; selected: sample ids that are the prompts when no tag names them;
    fixed_prompts: the prompt ids chosen when a shard was queued (shard runs: then `selected` is unused).
    """
    opts = Options.from_params(params)
    kind = check(dataset, opts, shard=shard)
    if is_video(dataset):
        return video_plan(dataset, opts, kind, view, selected, fixed_prompts)
    if fixed_prompts is not None:
        how = "the prompts chosen for this shard"
        prompts = check_prompts(dataset, opts, list(fixed_prompts), how)
    else:
        prompt_samples, how = prompt_view(dataset, opts, selected)
        prompts = check_prompts(dataset, opts, prompt_samples.values("id"), how)
    return Plan(opts, kind, prompts, how, target_view(view, prompts, opts))


def prompt_view(dataset, opts: Options, selected=()):
    """The prompt samples and how they were chosen: tagged samples, else the selection, else every sample
    whose label field is filled. Prompts come from the whole dataset, whatever the target view."""
    if opts.prompt_tag is not None:
        return dataset.match_tags(opts.prompt_tag), f"samples tagged '{opts.prompt_tag}'"
    if selected:
        return dataset.select(list(selected)), "selected samples"
    return dataset.exists(opts.label_field), f"samples with '{opts.label_field}' filled"


def prompt_ids(dataset, opts: Options, selected=()) -> list[str]:
    """Ids of the prompt samples; ParamError when there are none or some have no label."""
    view, how = prompt_view(dataset, opts, selected)
    return check_prompts(dataset, opts, view.values("id"), how)


def check_prompts(dataset, opts: Options, ids: list[str], how: str) -> list[str]:
    """The prompt ids if every one exists and has a label whose mask files exist; ParamError otherwise."""
    where = "prompt_tag" if opts.prompt_tag else "label_field"
    if not ids:
        raise ParamError({where: f"no prompt samples: no {how}. Label a few samples in '{opts.label_field}' and tag "
                                 "or select them"})
    present = dataset.select(ids)
    if len(present) != len(set(ids)):
        raise ParamError({where: f"{_some(len(set(ids)) - len(present), len(ids))} ({how}) no longer "
                                 f"{'exists' if len(set(ids)) - len(present) == 1 else 'exist'} in the dataset"})
    missing = present.exists(opts.label_field, False).values("filepath")
    if missing:
        verb = "has" if len(missing) == 1 else "have"
        raise ParamError({where: f"{_some(len(missing), len(ids))} ({how}) {verb} no '{opts.label_field}' label to "
                                 f"learn from: {_names(missing)}"})
    gone = missing_mask_files(dataset, opts.label_field, ids)
    if gone:
        filepath, path = gone[0]
        more = f" (and {len(gone) - 1} more)" if len(gone) > 1 else ""
        raise ParamError({"label_field": f"the mask file {path} of the '{opts.label_field}' label of the prompt "
                                         f"{os.path.basename(filepath)} does not exist{more}"})
    return list(ids)


def _some(count: int, total: int) -> str:
    """'the prompt sample' / 'all 3 prompt samples' / '1 of the 3 prompt samples'."""
    if total == 1:
        return "the prompt sample"
    return f"all {total} prompt samples" if count == total else f"{count} of the {total} prompt samples"


def _names(filepaths: list[str], limit: int = 3) -> str:
    """Up to `limit` file names, for people (sample ids mean nothing in the App)."""
    names = ", ".join(os.path.basename(p) for p in filepaths[:limit])
    return names + (f" and {len(filepaths) - limit} more" if len(filepaths) > limit else "")


def missing_mask_files(dataset, label_field: str, ids: list[str]) -> list[tuple[str, str]]:
    """(sample filepath, mask_path) of the prompts' masks stored on disk whose file is gone (a stat each)."""
    kind = field_kind(dataset, label_field)
    if kind not in (SEGMENTATION, DETECTIONS):
        return []
    view = dataset.select(ids, ordered=True)
    path = f"{label_field}.mask_path" if kind == SEGMENTATION else f"{label_field}.detections.mask_path"
    gone = []
    for filepath, paths in zip(view.values("filepath"), view.values(path)):
        for mask_path in (paths or []) if kind == DETECTIONS else [paths]:
            if mask_path and not os.path.isfile(mask_path):
                gone.append((filepath, mask_path))
    return gone


def target_view(view, prompts, opts: Options):
    """The samples to predict: the target view minus the prompts (and minus samples that already have the
    output field, with skip_existing)."""
    view = view.exclude(list(prompts))
    if opts.skip_existing and view.has_field(opts.output_field):
        view = view.exists(opts.output_field, False)
    return view


def video_plan(dataset, opts: Options, kind: str, view, selected=(), fixed_prompts=None) -> Plan:
    """The plan of a video dataset (see the module's docstring); ParamError when a prompt video has no
    annotated frame, or a target video has none and there is no prompt video to learn from."""
    if fixed_prompts is not None:
        prompts, how = list(fixed_prompts), "the prompt videos chosen for this shard"
    else:
        if opts.prompt_tag is not None:
            found, how = dataset.match_tags(opts.prompt_tag), f"videos tagged '{opts.prompt_tag}'"
        elif selected:
            found, how = dataset.select(list(selected)), "selected videos"
        else:
            found, how = None, None
        prompts = found.values("id") if found is not None else []
        bare = _unannotated(dataset, opts, prompts)
        if bare:
            where = "prompt_tag" if opts.prompt_tag else "label_field"
            verb = "has" if len(bare) == 1 else "have"
            raise ParamError({where: f"{_count(len(bare), 'prompt video')} ({how}) {verb} no frame with "
                                     f"'{opts.label_field}' to learn from: {_names(bare)}"})
    targets = view
    bare = _unannotated(dataset, opts, targets.values("id"))
    if bare and not prompts:
        raise ParamError({"label_field": f"{_count(len(bare), 'video')} {'has' if len(bare) == 1 else 'have'} no "
                                         f"annotated frame ('{opts.label_field}' set) and there are no prompt videos "
                                         f"(tag or select annotated videos to learn from): {_names(bare)}"})
    source = (f"annotated frames of each video, and of the {_count(len(prompts), 'prompt video')} ({how})" if prompts
              else "the annotated frames of each video")
    return Plan(opts, kind, prompts, source, targets, video=True)


def _unannotated(dataset, opts: Options, ids: list[str]) -> list[str]:
    """File paths of the videos among `ids` with no frame whose label field is set."""
    from fiftyone import ViewField as F

    if not ids:
        return []
    view = dataset.select(list(ids), ordered=True)
    annotated = set(view.match_frames(F(frame_field(opts.label_field)) != None).values("id"))  # noqa: E711
    return [path for sample_id, path in zip(*view.values(["id", "filepath"])) if sample_id not in annotated]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def split(ids: list, num_shards: int) -> list[list]:
    """Contiguous, near-equal, non-empty parts (fewer than num_shards when there are fewer ids)."""
    num = max(1, min(num_shards, len(ids)))
    bounds = np.linspace(0, len(ids), num + 1).round().astype(int)
    return [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
