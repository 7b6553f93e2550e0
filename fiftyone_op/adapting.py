"""Adapting SegGPT to the labelled samples of a view: the work of the operator `adapt_seggpt`.

    plan = adapt_plan(dataset, params, view)        # AdaptPlan; ParamError naming the parameter at fault
    steps = adapt_view(dataset, plan)               # yields (fraction, label); returns a summary dict

The examples are the samples of the view whose label field is filled (those with the prompt tag, when one is
given), read as the propagate operator reads its prompts (`segment.prompt_pool`); the core's `SegGPT.adapt`
fine-tunes a copy of the model on them, and the adapted model is saved as a model folder under the models
folder (default: the core's `adapted_models_dir()`), never over another one. The propagate operator offers
the models saved there (`models.model_choices`). Nothing is saved when no step beat the model on the
held-out part, or when the run is stopped.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from seggpt_plugins.adapt import AdaptSettings
from seggpt_plugins.errors import InputError
from seggpt_plugins.io import unwritable

from seggpt_plugins.fiftyone.fields import field_kind, type_name
from seggpt_plugins.fiftyone.models import device_problem, model_problem, shown_name
from seggpt_plugins.fiftyone.options import Options, ParamError
from seggpt_plugins.fiftyone.plan import check_prompts

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # a model's folder name


@dataclass
class AdaptPlan:
    opts: Options  # label_field, prompt_tag, model, device, precision, batch_size
    kind: str  # what the label field holds (SEGMENTATION or DETECTIONS)
    examples: list[str]  # the labelled sample ids
    how: str  # how they were chosen, for people
    time_limit: float
    steps: int
    learning_rate: float
    eval_every: int
    out: Path  # the model folder to write

    def settings(self):
        return AdaptSettings(batch_size=self.opts.batch_size, lr=self.learning_rate, eval_every=self.eval_every)


def default_name(dataset_name: str, label_field: str) -> str:
    """'<dataset>-<label field>-<UTC time>': a new folder name for every run."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{dataset_name}-{label_field}").strip("-.") or "seggpt"
    return f"{stem[:80]}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def adapt_plan(dataset, params: dict, view) -> AdaptPlan:
    """Parse and check the params, choose the labelled samples of `view`; ParamError on bad input (before any
    model work)."""
    from seggpt_plugins.adapted import adapted_models_dir

    errors: dict[str, str] = {}
    shared = {k: params.get(k) for k in ("label_field", "prompt_tag", "model", "device", "precision", "batch_size")}
    shared["batch_size"] = 4 if shared["batch_size"] is None else shared["batch_size"]  # adapt's default
    try:
        opts = Options.from_params(shared)
    except ParamError as exc:
        errors.update(exc.errors)
        opts = None

    def number(name, default, kind, low):
        value = params.get(name, default)
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            errors[name] = f"expected a{' whole' * (kind is int)} number, got {value!r}"
        elif value < low or (low == 0 and value == 0):
            errors[name] = f"must be {'above' if low == 0 else '>='} {low}, got {value}"
        else:
            return kind(value)
        return default

    time_limit = number("time_limit", 180.0, float, 0)
    steps = number("steps", 300, int, 1)
    learning_rate = number("learning_rate", AdaptSettings.lr, float, 0)
    eval_every = number("eval_every", 10, int, 1)
    folder = (params.get("models_dir") or "").strip() or None
    folder = Path(os.path.expanduser(folder)) if folder else adapted_models_dir()
    if not folder.is_absolute():
        errors["models_dir"] = f"must be an absolute folder that the App and every worker can reach, got '{folder}'"
    elif unwritable(folder):
        errors["models_dir"] = unwritable(folder)
    name = (params.get("name") or "").strip() or (default_name(dataset.name, opts.label_field) if opts else "")
    if not NAME.match(name or "x"):
        errors["name"] = f"'{name}' is not a usable folder name (letters, digits, '.', '_' and '-')"
    elif "models_dir" not in errors and (folder / name).exists():
        errors["name"] = f"a model named '{name}' exists in {folder}; choose another name (it is never overwritten)"

    kind, examples, how = None, [], ""
    if dataset.media_type != "image":
        errors["view_target"] = f"adapting reads image samples; this dataset holds {dataset.media_type} samples"
    elif opts is not None:
        if not dataset.has_field(opts.label_field):
            errors["label_field"] = f"the dataset has no field '{opts.label_field}'"
        else:
            kind = field_kind(dataset, opts.label_field)
            if kind is None:
                errors["label_field"] = (f"'{opts.label_field}' holds {type_name(dataset, opts.label_field)}; "
                                         "expected Segmentation, or Detections with instance masks")
        for param, problem in (("model", model_problem(opts.model)), ("device", device_problem(opts.device))):
            if problem:
                errors[param] = problem
        if opts.prompt_tag is not None and opts.prompt_tag not in dataset.distinct("tags"):
            errors["prompt_tag"] = f"no sample of the dataset is tagged '{opts.prompt_tag}'"
        if kind is not None and "prompt_tag" not in errors:
            labelled = view.exists(opts.label_field)
            how = f"samples of the view with '{opts.label_field}' filled"
            if opts.prompt_tag is not None:
                labelled, how = labelled.match_tags(opts.prompt_tag), how + f", tagged '{opts.prompt_tag}'"
            examples = labelled.values("id")
            if not examples:
                errors["label_field"] = (f"nothing to adapt to: no {how}. Label one or a few samples (masks or "
                                         "instance masks), then adapt")
            else:
                try:
                    check_prompts(dataset, opts, examples, how)
                except ParamError as exc:
                    errors.update(exc.errors)
    if errors:
        raise ParamError(errors)
    return AdaptPlan(opts, kind, examples, how, time_limit, steps, learning_rate, eval_every, folder / name)


def adapt_view(dataset, plan: AdaptPlan, stop=None):
    """Adapt the plan's model to its labelled samples, save it when a step beat it; yields (fraction, label),
    returns a summary dict. `stop()` returning True stops the run (nothing is saved)."""
    from seggpt_plugins.adapt import read_examples
    from seggpt_plugins.adapted import adapt_steps, progress_fraction, summary_line

    from seggpt_plugins.fiftyone.codecs import make_codec
    from seggpt_plugins.fiftyone.fields import DETECTIONS
    from seggpt_plugins.fiftyone.segment import Progress, load_model, prompt_pool

    opts, count = plan.opts, len(plan.examples)
    what = f"{count} labelled sample{'s' * (count != 1)}"
    yield 0.0, f"Reading {what}"
    codec = make_codec(plan.kind, opts.label_field, "instance" if plan.kind == DETECTIONS else "semantic")
    images, masks = prompt_pool(dataset, plan.examples, codec, opts.label_field).pairs(range(count))
    try:
        examples = read_examples(images, masks, example_ids="classes")  # the codec's ids, as propagate has them
    except InputError as exc:
        raise ParamError({"label_field": str(exc)}) from None
    yield 0.02, f"Loading model {shown_name(opts.model)}"
    model = load_model(opts)
    progress, stopped = Progress(), [False]
    steps = adapt_steps(model, examples, None, time_limit=plan.time_limit, steps=plan.steps,
                        settings=plan.settings(), cancel=lambda: stopped[0] or bool(stop and stop()))
    try:
        while True:
            try:
                p = next(steps)
            except StopIteration as done:
                adapted = done.value
                break
            if progress.due(force=p.step == 0):
                best = f", held-out IoU {p.best_iou:.2f}" if p.best_iou is not None else ""
                yield (0.05 + 0.9 * progress_fraction(p, plan.time_limit),
                       f"Adapting to {what}: step {p.step} / {p.steps}, {p.seconds:.0f} s{best}")
    finally:  # a consumer that stops early (the App's run closed): the training thread stops too
        stopped[0] = True
        steps.close()
    info = adapted.adaptation
    summary = {"examples": count, "improved": info["improved"], "stopped": info["stopped"], "steps": info["steps"],
               "held_out_iou_before": info["held_out_iou_before"], "held_out_iou": info["held_out_iou_best"],
               "seconds": info["seconds"], "base_model": shown_name(opts.model), "model": None,
               "fingerprint": adapted.fingerprint}
    line = summary_line(info, what)
    if info["stopped"] == "cancelled":
        summary["message"] = "Adapting stopped: nothing saved; the propagate operator's models are as they were"
    elif not info["improved"]:
        summary["message"] = f"{line}: nothing saved; propagate with {shown_name(opts.model)} as before"
    else:
        info["fiftyone"] = {"dataset": dataset.name, "label_field": opts.label_field, "samples": count}
        yield 0.97, f"Saving the adapted model to {plan.out}"
        adapted.save_pretrained(plan.out)
        summary["model"] = str(plan.out)
        summary["message"] = (f"{line}; saved as {plan.out}: choose it as the Model of 'Propagate labels with "
                              "SegGPT'")
    yield 1.0, summary["message"]
    return summary
