"""Segmenting a view: the prompt pool, prediction of every target, then one commit (see `commit.py`).

    plan = make_plan(dataset, params, view)             # plan.py
    steps = segment_view(dataset, plan.opts, plan.prompts, plan.target_ids(), kind=plan.kind)
    summary = yield from steps                           # yields (fraction, label); returns a summary dict

Nothing is written to the dataset until every target has been predicted: predictions are staged as PNG
files, then committed so that the visible fields change in one database command (a failure or a kill
leaves the old values or the new ones; the next run on the dataset finishes or undoes a killed commit).
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterator

import numpy as np

from seggpt_plugins.errors import InputError, ModelSourceError
from seggpt_plugins.images import to_rgb8
from seggpt_plugins.loading import precision_options
from seggpt_plugins.model_cache import get_model
from seggpt_plugins.prompts import PromptPool
from seggpt_plugins.runner import Runner, Target

from seggpt_plugins.fiftyone.codecs import MAX_INSTANCES, OBJECTS, make_codec
from seggpt_plugins.fiftyone.commit import Commit, recover
from seggpt_plugins.fiftyone.evaluation import evaluate
from seggpt_plugins.fiftyone.fields import DETECTIONS, SEGMENTATION
from seggpt_plugins.fiftyone.models import shown_name
from seggpt_plugins.fiftyone.options import Options, ParamError

PROGRESS_INTERVAL = 1.0  # seconds between progress reports (besides the first and last)


def load_model(opts: Options):
    """The model of the run; a load failure names the Model (or Device) field, in the App's words."""
    try:
        return get_model(opts.model, opts.device, **precision_options(opts.precision))
    except ModelSourceError as exc:
        text = str(exc).split(" Alternatives:")[0].replace("use --device cpu", "choose Device cpu")
        text = text.replace("use dtype bfloat16", "choose Precision bfloat16")
        name = "device" if text.startswith("device ") else "precision" if text.startswith("quantize ") else "model"
        raise ParamError({name: text}) from None


def prompt_pool(dataset, ids: list[str], codec, label_field: str) -> PromptPool:
    """The core PromptPool over the prompt samples: (image, mask) pair i is decoded from sample ids[i]."""
    view = dataset.select(list(ids), ordered=True)
    filepaths = view.values("filepath")
    first = dict(enumerate(view.values(label_field)))  # used once, while the pool describes every pair
    codec.prepare(list(first.values()))

    def load(i: int):
        sample_id, filepath = ids[i], filepaths[i]
        rgb = to_rgb8(filepath, name=f"prompt image {filepath}")
        label = first.pop(i) if i in first else dataset.select(sample_id).values(label_field)[0]
        name = f"prompt {os.path.basename(filepath)}"
        try:
            mask = codec.encode(label, rgb.shape[0], rgb.shape[1], name=name)
        except InputError:
            raise
        except Exception as exc:  # e.g. a mask file that went away, or broke, after the plan's check
            raise InputError(f"{name}: cannot read the mask of its '{label_field}' label: "
                             f"{type(exc).__name__}: {exc}") from None
        return rgb, mask

    return PromptPool(ids, load)


class Progress:
    """Rate-limited (fraction, label) reports."""

    def __init__(self):
        self.last = 0.0

    def due(self, force: bool = False) -> bool:
        now = time.monotonic()
        if force or now - self.last >= PROGRESS_INTERVAL:
            self.last = now
            return True
        return False


def segment_view(dataset, opts: Options, prompts: list[str], targets: list[str], *, kind: str,
                 declare: bool = True, eval_ids: list[str] | None = None, eval_key: str | None = None,
                 model=None) -> Iterator[tuple[float, str]]:
    """Predict every target, then commit the output field; yields (fraction, label); returns a summary dict.

    declare: set the output field's mask_targets/classes (off in shard runs: the run that queued the
    shards did it once, so that concurrent workers never edit the dataset document).
    eval_ids: with opts.gt_field, the samples to evaluate afterwards (None: the targets).
    """
    started = time.monotonic()
    seg_type = opts.embedding_type or ("semantic" if kind == SEGMENTATION else "instance")
    codec = make_codec(kind, opts.label_field, seg_type)
    summary: dict[str, Any] = {"output_field": opts.output_field, "confidence_field": opts.confidence_field,
                               "prompts": len(prompts), "targets": len(targets), "embedding_type": seg_type}
    recover(dataset, opts)  # a commit left half done by a killed run on this dataset: finished or undone first
    yield 0.0, f"Reading {len(prompts)} prompt sample{'' if len(prompts) == 1 else 's'}"
    pool = prompt_pool(dataset, prompts, codec, opts.label_field) if targets else None
    if targets:
        if model is None:
            yield 0.0, f"Loading model {shown_name(opts.model)}"
            model = load_model(opts)
        summary["model_fingerprint"] = model.fingerprint  # which weights predicted (an adapted model's own)
        commit = Commit(dataset, opts, kind, declare=declare)
        try:
            yield from _predict(model, dataset, opts, seg_type, pool, codec, targets, commit)
            yield 0.95, f"Saving {len(targets)} predictions to '{opts.output_field}'"
            commit.run(codec, targets)
        finally:
            commit.close()
        summary["mean_confidence"] = float(np.mean(list(commit.confidence.values())))
        if kind == DETECTIONS:
            summary["instances"] = int(sum(len(m) for m in commit.meta.values()))
    if opts.gt_field is not None:
        yield 0.98, f"Evaluating '{opts.output_field}' against '{opts.gt_field}'"
        summary["evaluation"] = evaluate(dataset, opts, targets if eval_ids is None else eval_ids, eval_key)
        summary["gt_field"] = opts.gt_field
        summary["miou"] = summary["evaluation"].get("miou")
    summary["seconds"] = round(time.monotonic() - started, 3)
    yield 1.0, f"Done: {len(targets)} samples written to '{opts.output_field}'"
    return summary


def _predict(model, dataset, opts, seg_type, pool: PromptPool, codec, targets, commit: Commit):
    """Predict the targets through the core's runner, each shown its most similar prompts; stage every
    prediction (Detections: the runner's objects, by the core's rule)."""
    progress = Progress()
    runner = Runner(model, pool, most_similar=opts.max_prompts, batch_size=opts.batch_size, seg_type=seg_type,
                    ensemble=opts.ensemble, tile=opts.tile, halo=opts.halo, quality=opts.quality,
                    example_ids="classes",  # the codec's
                    objects=OBJECTS if codec.kind == DETECTIONS else None)
    filepaths = dataset.select(targets, ordered=True).values("filepath")
    items = [Target(sample_id, filepath, name=f"image {filepath}") for sample_id, filepath in zip(targets, filepaths)]
    done = 0
    for result in runner.run(items, errors="raise"):
        try:
            staged, info = codec.decode(result.prediction, result.instances)
        except ValueError:  # the object rule's max_instances
            raise InputError(f"image {filepaths[result.index]}: more than {MAX_INSTANCES} predicted instances") from None
        commit.stage(result.key, staged, info, result.confidence, list(result.prompts))
        done += 1
        if progress.due(force=done in (1, len(targets))):
            commit.heartbeat()
            yield 0.95 * done / len(targets), f"Predicted {done}/{len(targets)} samples"
