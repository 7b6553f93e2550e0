"""The FiftyOne operators `@seggpt/seggpt/propagate_labels` (here: the App form, execution modes and sharding) and
`@seggpt/seggpt/adapt_seggpt` (the model fine-tuned on the labelled samples of a view: `adapt_operator.py`, the
work in `adapting.py`; re-exported here). `forms.py` holds the form parts both share, `progress.py` how their
runs talk to the App.

The work itself is in the other modules: `plan.py` (checks, prompts and targets: one plan for the form and
the run), `segment.py` (prediction), `commit.py` (staging and commit), `evaluation.py`; `app.py` (how the
App shows the output), `runs.py` (where scheduled runs are), `models.py` (the models offered). (Not named
`operator.py`: that would shadow the standard library module for code run from this folder.) Every module
is imported as `seggpt_plugins.fiftyone.*`, whatever name FiftyOne gave the plugin folder.

From Python:

    import fiftyone.operators as foo
    propagate = foo.get_operator("@seggpt/seggpt/propagate_labels")
    propagate(dataset, "ground_truth", "seggpt", prompt_tag="prompt", model="demo")            # now
    propagate(view, "ground_truth", "seggpt", num_shards=4, delegate=True)                       # queued
    propagate(videos, "frames.gt", "frames.seggpt", model="demo")        # video datasets: frame fields
    adapt = foo.get_operator("@seggpt/seggpt/adapt_seggpt")
    adapt(view, "ground_truth", model="demo", name="v1")  # saved as adapted.adapted_models_dir() / "v1"

Video datasets: see `plan.py` (prompts and targets) and `videos.py` (the run); shards are sets of whole videos.
"""

from __future__ import annotations

import copy

import fiftyone.operators as foo
import fiftyone.operators.types as types
from fiftyone.operators.constants import ViewTarget

from seggpt_plugins.vocabulary import AUTO_MODEL

from seggpt_plugins.fiftyone.adapt_operator import ADAPT_ADVANCED, ADAPT_LABEL, AdaptSeggpt
from seggpt_plugins.fiftyone.app import colour_fields, shown_fields
from seggpt_plugins.fiftyone.commit import declare_output
from seggpt_plugins.fiftyone.fields import DETECTIONS, SEGMENTATION, best_label_field, label_fields
from seggpt_plugins.fiftyone.forms import (_choices, _count, device_fields, field_adder, model_view,
                                           nothing_to_learn_from, tag_view)
from seggpt_plugins.fiftyone.options import CONFIDENCE_DESCRIPTION, CONFIDENCE_SUFFIX, Options, ParamError
from seggpt_plugins.fiftyone.plan import make_plan, split
from seggpt_plugins.fiftyone.progress import _drain, _relay, _stopped
from seggpt_plugins.fiftyone.runs import LAUNCH, scheduled_runs
from seggpt_plugins.fiftyone.segment import segment_view
from seggpt_plugins.fiftyone.videos import segment_videos

URI = "@seggpt/seggpt/propagate_labels"
LABEL = "Propagate labels with SegGPT"
IMMEDIATE_LIMIT = 200  # the App suggests delegated execution for more targets than this
SHARD_PARAM = "_shard"  # [index, count] in the params of a queued shard
PROMPTS_PARAM = "_prompt_ids"  # the prompt samples, fixed when the shards were queued
ADVANCED = ("max_prompts", "embedding_type", "ensemble", "tile", "halo", "memory", "quality", "batch_size", "device",
            "precision", "mask_dir", "skip_existing", "overwrite_field", "num_shards",
            "gt_field")  # behind the Advanced settings switch
# request params of the run that queues shards that must not reach the shards themselves
_NOT_FOR_SHARDS = {"selected", "selected_samples", "selected_labels", "current_sample", "extended_selection",
                   "run_doc", "results", "request_delegation", "filters", "extended", "view_name", "target",
                   "num_distributed_tasks"}

__all__ = ["ADAPT_ADVANCED", "ADAPT_LABEL", "ADVANCED", "IMMEDIATE_LIMIT", "LABEL", "PROMPTS_PARAM", "SHARD_PARAM",
           "URI", "AdaptSeggpt", "PropagateLabels", "run_name"]


class PropagateLabels(foo.Operator):
    """Propagate Segmentation (or Detections with masks) labels from a few prompt samples to a view."""

    @property
    def config(self):
        return foo.OperatorConfig(
            name="propagate_labels",
            label=LABEL,
            description="Propose masks for a view from a few labelled samples (SegGPT in-context segmentation)",
            dynamic=True,
            execute_as_generator=True,
            allow_immediate_execution=True,
            allow_delegated_execution=True,
        )

    # ----------------------------------------------------------------------------------------- form

    def resolve_input(self, ctx):
        """The essentials (which samples, what to learn from, where to write, the model), then the rest
        behind the Advanced settings switch (the pattern of FiftyOne's zoo operators)."""
        inputs = types.Object()
        params = ctx.params
        default_target = None
        if self._selection_prompts(ctx):  # selected samples are the prompts: propagate to the view, not to them
            default_target = ViewTarget.CURRENT_VIEW if ctx.has_custom_view else ViewTarget.DATASET
        target = inputs.view_target(ctx, action_description="Propagate labels to", default_target=default_target)

        fields = label_fields(ctx.dataset, learnable=True)
        if not fields:
            return nothing_to_learn_from(inputs, LABEL)

        errors, summary, kind = self._validate(ctx)
        label_field = params.get("label_field") or best_label_field(ctx.dataset, fields, self._prompt_candidates(ctx))
        kind = kind or label_fields(ctx.dataset).get(label_field)
        if errors.get("view_target"):
            target.invalid, target.error_message = True, errors["view_target"]

        field = field_adder(errors)
        self._essentials(ctx, field, inputs, fields, label_field, kind)
        inputs.bool("advanced", default=False, label="Advanced settings", view=types.SwitchView(),
                    description="Prompts per target, segmentation type, ensemble, tiles, batch size, device, mask "
                                "folder, shards, evaluation against a ground truth")
        if params.get("advanced") or any(name in errors for name in ADVANCED):
            self._advanced(ctx, field, inputs, label_field, kind)

        if summary:
            inputs.view("plan", types.Notice(label=summary))
        runs = scheduled_runs(ctx.dataset.name)
        if runs:
            inputs.view("runs", types.Notice(label="Scheduled runs on this dataset (newest first)",
                                             description="; ".join(runs)))
        other = {k: v for k, v in errors.items() if k not in inputs.properties or k == "view_target"}
        if other:
            inputs.view("problems", types.Error(label="Cannot run", description="; ".join(other.values())))
        return types.Property(inputs, view=types.View(label=LABEL))

    def _essentials(self, ctx, field, inputs, fields, label_field, kind):
        """What to learn from, where to write, and with which model."""
        choices = _choices(fields)
        if label_field not in fields and label_field in label_fields(ctx.dataset):  # one of SegGPT's own
            choices.add_choice(label_field, label=label_field, description="written by SegGPT")
        video = ctx.dataset.media_type == "video"
        field("label_field", inputs.str, required=True, default=label_field, view=choices,
              description=("What SegGPT learns from: a frame field (frames.<name>), Segmentation or Detections "
                           "with instance masks, set on the annotated frames of each video" if video else
                           "What SegGPT learns from: Segmentation, or Detections with instance masks, filled on "
                           "the prompt samples"))
        field("prompt_tag", inputs.str, required=False, view=tag_view(ctx.dataset),
              description=("Videos with this tag are prompt videos: their annotated frames are prompts for the "
                           "other videos too. Empty: the selected videos, else each video learns from its own "
                           "annotated frames only" if video else
                           "Samples with this tag are the prompts. Empty: the selected samples when there is a "
                           "selection (and it is not what is propagated to), else every sample with the label "
                           "field"))
        field("output_field", inputs.str, required=True, default=f"{label_field}_seggpt",
              description=f"Where the predictions go ({kind or 'same type as the label field'}"
                          f"{', a frame field: frames.<name>' if video else ''}); <output field>{CONFIDENCE_SUFFIX} "
                          f"gets each {'frame' if video else 'sample'}'s {CONFIDENCE_DESCRIPTION}")
        field("model", inputs.str, default=AUTO_MODEL, view=model_view(),
              description="A listed model (auto, demo, SegGPT weights downloaded on this machine, models adapted by "
                          f"'{ADAPT_LABEL}'), or the path of a transformers folder or Painter .pth checkpoint on "
                          "this machine")

    def _advanced(self, ctx, field, inputs, label_field, kind):
        """Everything with a good default."""
        field("max_prompts", inputs.int, min=1, default=4,
              description="Prompts per target: each target uses this many prompt samples, the most similar first")
        kinds = types.RadioGroup()
        kinds.add_choice("semantic", label="semantic", description="colours are classes")
        kinds.add_choice("instance", label="instance", description="colours are objects (SegGPT's default)")
        field("embedding_type", inputs.enum, values=kinds.values(), view=kinds,
              default="instance" if kind == DETECTIONS else "semantic", description="SegGPT's type token")
        ensembles = types.RadioGroup()
        ensembles.add_choice("feature", label="feature", description="one prompt each, averaged (Painter's)")
        ensembles.add_choice("spatial", label="spatial", description="prompts stitched into one canvas (the "
                                                                     "SegGPT paper's spatial ensemble)")
        ensembles.add_choice("both", label="both", description="canvases of 4 prompts, averaged")
        field("ensemble", inputs.enum, values=ensembles.values(), view=ensembles, default="feature",
              description="How several prompts meet the model")
        field("tile", inputs.str, required=False,
              description="Cut large targets into tiles of this many pixels (or 'auto': six object diameters of "
                          "the prompts; larger prompts are cut to their most labelled tile), segmented at that "
                          "scale and stitched back. Empty: no tiling")
        field("halo", inputs.int, min=0, default=32,
              description="Pixels each tile overlaps its neighbours by (below half the tile)")
        if ctx.dataset.media_type == "video":
            field("memory", inputs.int, min=0, default=8,
                  description="Video datasets: the last predicted frames that join each frame's prompts (SegGPT's "
                              "video mode; 0: the annotated frames alone)")
        qualities = types.RadioGroup()
        qualities.add_choice("fast", label="fast", description="nearly free")
        qualities.add_choice("full", label="full", description="image datasets: each image segmented mirrored too "
                                                               "(twice the time); ranks the images of one run better")
        field("quality", inputs.enum, values=qualities.values(), view=qualities, default="fast",
              description="The confidence that orders the review (the confidence field)")
        field("batch_size", inputs.int, min=1, default=8, description="Targets per forward pass")
        device_fields(field, inputs)
        field("mask_dir", inputs.str, required=False,
              description="Absolute folder for mask PNGs (mask_path; <folder>/<output field>/<file>.png). "
                          "Empty: masks inline in the database (fine for small views)")
        field("skip_existing", inputs.bool, default=True,
              description="Leave samples that already have the output field alone")
        field("overwrite_field", inputs.bool, default=False,
              description="Write into an existing output field not made by SegGPT (off: such a field, human "
                          "labels say, is refused)")
        field("num_shards", inputs.int, min=1, default=1,
              description="Above 1: schedule this many operations, each on a part of the targets, for parallel "
                          "`fiftyone delegated launch` workers sharing this database")
        ground_truths = types.Dropdown()
        for name, field_type in label_fields(ctx.dataset, learnable=True).items():
            if field_type == SEGMENTATION:
                ground_truths.add_choice(name, label=name)
        field("gt_field", inputs.str, required=False, view=ground_truths,
              description="Optional Segmentation ground truth: evaluate the targets (the Model Evaluation panel "
                          "shows mIoU, background counted, and IoU per class)")

    def _prompt_candidates(self, ctx):
        """The samples the prompts will come from: tagged, else selected, else None (any with the field)."""
        tag = ctx.params.get("prompt_tag")
        if tag:
            return ctx.dataset.match_tags(tag)
        if self._selection_prompts(ctx):
            return ctx.dataset.select(list(ctx.selected))
        return None

    def _selection_prompts(self, ctx) -> bool:
        return bool(ctx.selected) and not ctx.params.get("prompt_tag")

    def _validate(self, ctx):
        """(errors by parameter, a one-line plan, source kind) for the form; never raises for bad input."""
        try:
            plan = self._plan(ctx)
        except ParamError as exc:  # "required": a form still being filled in, not an error to show
            return {k: v for k, v in exc.errors.items() if v != "required"}, None, None
        opts = plan.opts
        targets = plan.targets.count()
        if plan.video:
            summary = f"{plan.prompt_source} -> every other frame of {_count(targets, 'video')}"
        else:
            summary = (f"{_count(len(plan.prompts), 'prompt sample')} ({plan.prompt_source}) -> "
                       f"{_count(targets, 'target sample')}")
        if opts.num_shards > 1:
            summary += f" in {_count(min(opts.num_shards, targets), 'shard')}"
        if not targets:
            summary += " (nothing to do" + (": all have the output field)" if opts.skip_existing else ")")
        elif targets > IMMEDIATE_LIMIT or opts.num_shards > 1:
            summary += (f". Schedule it: a worker runs it (`{LAUNCH}`), and this form lists it with its "
                        "progress")
        return {}, summary, plan.kind

    def _plan(self, ctx):
        """The run's plan (options, kind, prompts, targets, how the prompts were chosen): one for the form and
        the run. ParamError names the parameters at fault."""
        fixed = ctx.params.get(PROMPTS_PARAM)  # a shard: the prompts chosen when it was queued
        return make_plan(ctx.dataset, ctx.params, ctx.target_view(), selected=self._selection(ctx),
                         fixed_prompts=fixed, shard=SHARD_PARAM in ctx.params)

    def resolve_execution_options(self, ctx):
        from fiftyone.operators.executor import ExecutionOptions

        many = False
        try:
            opts = Options.from_params(ctx.params)
            many = opts.num_shards > 1 or len(ctx.target_view()) > IMMEDIATE_LIMIT
        except Exception:  # a form still being filled in
            pass
        return ExecutionOptions(allow_immediate_execution=True, allow_delegated_execution=True,
                                default_choice_to_delegated=many)

    def resolve_run_name(self, ctx):
        """The label of a scheduled run, as `fiftyone delegated list` and this form's run list show it."""
        return run_name(ctx.params)

    def resolve_output(self, ctx):
        results = ctx.results or {}
        outputs = types.Object()
        if "shards" in results:
            outputs.list("shards", types.String(), label="Scheduled shard operations")
        else:
            outputs.int("targets", label="Samples predicted")
            outputs.float("mean_confidence", label="Mean predicted IoU")
            if results.get("miou") is not None:
                outputs.float("miou", label="mIoU (background counted)")
        return types.Property(outputs, view=types.View(label="SegGPT"))

    # ---------------------------------------------------------------------------------------- running

    def execute(self, ctx):
        run = self._run(ctx)
        if ctx.delegated:
            return _drain(run)  # progress went through ctx.set_progress; the summary is the op's result
        return run  # immediate: a generator of progress messages for the App

    def _run(self, ctx):
        try:
            plan = self._plan(ctx)
            opts, dataset = plan.opts, ctx.dataset
            shard = ctx.params.get(SHARD_PARAM)
            targets = plan.target_ids()
            if shard is None and opts.num_shards > 1 and len(targets) > 1:
                summary = self._queue_shards(ctx, plan, targets)
                message = (f"SegGPT: scheduled {len(summary['shards'])} operations for {len(targets)} "
                           f"{'videos' if plan.video else 'samples'} "
                           f"({', '.join(summary['shards'])}); they run when workers run `{LAUNCH}`, and this "
                           "operator's form lists them with their progress")
            elif plan.video:
                steps = segment_videos(dataset, opts, plan.prompts, targets, kind=plan.kind, declare=shard is None)
                summary = yield from _relay(ctx, steps)
                message = _describe(summary, shard)
            else:
                eval_ids = ctx.target_view().exclude(plan.prompts).values("id") if opts.gt_field else None
                steps = segment_view(dataset, opts, plan.prompts, targets, kind=plan.kind, declare=shard is None,
                                     eval_ids=eval_ids, eval_key=opts.eval_key if shard is None else None)
                summary = yield from _relay(ctx, steps)
                message = _describe(summary, shard)
        except Exception as exc:
            if not ctx.delegated:
                yield from _stopped(ctx, exc)
            raise
        if not ctx.delegated:
            yield ctx.ops.notify(message, variant="success")
            yield ctx.ops.reload_dataset()
            if summary.get("targets") and "shards" not in summary:  # the new field: coloured and switched on
                yield ctx.trigger("set_color_scheme", {"fields": colour_fields(dataset)})
                yield ctx.ops.set_active_fields(shown_fields(ctx.active_fields, opts))
        return summary

    def _selection(self, ctx):
        """The App's selection are the prompts (unless a tag names them: see plan.prompt_view) when the
        selection is not the target."""
        target = ctx.request_params.get("view_target") or ctx.params.get("view_target")
        if target == ViewTarget.SELECTED_SAMPLES:
            return []
        return list(ctx.selected)

    def _queue_shards(self, ctx, plan, targets):
        """Queue one delegated operation per part of the targets; each selects its samples by id, so the
        parts cover the targets exactly once whatever happens to the view meanwhile."""
        from fiftyone.operators.delegated import DelegatedOperationService

        dataset, opts, prompts = ctx.dataset, plan.opts, plan.prompts
        declare_output(dataset, opts, plan.kind)
        parts = split(targets, opts.num_shards)
        service = DelegatedOperationService()
        ops = []
        for index, ids in enumerate(parts):
            request = copy.deepcopy({k: v for k, v in ctx.request_params.items() if k not in _NOT_FOR_SHARDS})
            request["params"] = {**copy.deepcopy(ctx.params), SHARD_PARAM: [index, len(parts)],
                                 PROMPTS_PARAM: list(prompts)}
            request["view"] = dataset.select(ids)._serialize()
            request["view_target"] = ViewTarget.CURRENT_VIEW
            request["delegated"] = True
            op = service.queue_operation(
                operator=self.uri, label=f"{run_name(ctx.params)} ({index + 1}/{len(parts)})",
                delegation_target=ctx.delegation_target, context={"request_params": request},
                metadata={"inputs_schema": None, "outputs_schema": None}, rerunnable=True)
            ops.append(str(op.id))
        return {"shards": ops, "targets": len(targets), "shard_sizes": [len(p) for p in parts],
                "output_field": opts.output_field}

    # ----------------------------------------------------------------------------------------- Python

    def __call__(self, sample_collection, label_field, output_field=None, *, prompt_tag=None, max_prompts=4,
                 embedding_type=None, batch_size=8, model=AUTO_MODEL, device=None, precision=None, mask_dir=None,
                 skip_existing=True, num_shards=1, gt_field=None, overwrite_field=False, ensemble=None,
                 tile=None, halo=None, memory=None, quality=None, view_target=None, selected=None, delegate=False):
        """Run on a dataset or view from Python (through `execute_operator`, as the App does).

        view_target: a `fiftyone.operators.constants.ViewTarget` value (default: the given collection);
        selected: sample ids playing the App's selection; delegate: queue instead of running now.
        ensemble ("feature", "spatial", "both"), tile (pixels or "auto") and halo: see the core's segment.
        Video datasets: label_field and output_field are frame fields ("frames.<name>"); memory: the last
        predicted frames that join each frame's prompts (see the core's propagate). quality: the confidence,
        "fast" (default) or "full" (image datasets: the mirrored image too, twice the time; see the core's segment).
        Returns the `ExecutionResult` (for a delegated run, `.result` describes the queued operation).
        """
        params = dict(label_field=label_field, output_field=output_field, prompt_tag=prompt_tag,
                      max_prompts=max_prompts, embedding_type=embedding_type, batch_size=batch_size, model=model,
                      device=device, precision=precision, mask_dir=mask_dir, skip_existing=skip_existing,
                      num_shards=num_shards,
                      gt_field=gt_field, overwrite_field=overwrite_field, ensemble=ensemble,
                      tile=None if tile is None else str(tile), halo=halo,  # the form's tile is text
                      memory=memory, quality=quality)
        params = {k: v for k, v in params.items() if v is not None}
        if view_target is not None:
            params["view_target"] = view_target
        ctx = dict(view=sample_collection.view(), params=params)
        if selected:
            ctx["selected"] = list(selected)
        return foo.execute_operator(self.uri, ctx, request_delegation=delegate)


def run_name(params: dict) -> str:
    """'Propagate labels with SegGPT -> <output field>': how runs are named in the queue."""
    try:
        return f"{LABEL} -> {Options.from_params(params).output_field}"
    except ParamError:
        return LABEL


def _describe(summary, shard) -> str:
    where = f" (shard {shard[0] + 1}/{shard[1]})" if shard else ""
    unit = summary.get("unit", "samples")
    text = f"SegGPT{where}: {summary['targets']} {unit} written to '{summary['output_field']}'"
    if unit == "frames":
        text += f" ({summary.get('videos', 0)} videos)"
    if summary["targets"]:
        text += (f", mean predicted IoU {summary['mean_confidence']:.3f} (sort by "
                 f"'{summary['confidence_field']}' to review the lowest first)")
    evaluation = summary.get("evaluation")
    if evaluation and evaluation.get("miou") is not None:
        text += (f"; mIoU {evaluation['miou']:.3f} (background counted) on {evaluation['samples']} samples vs "
                 f"'{summary.get('gt_field')}'")
    return text
