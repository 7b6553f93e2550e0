"""The FiftyOne operator `@seggpt/seggpt/adapt_seggpt`: the model fine-tuned on the labelled samples of a view
(the work: `adapting.py`); `Propagate labels with SegGPT` (operators.py) then offers the adapted model.

From Python:

    import fiftyone.operators as foo
    adapt = foo.get_operator("@seggpt/seggpt/adapt_seggpt")
    adapt(view, "ground_truth", model="demo", name="v1")  # saved as adapted.adapted_models_dir() / "v1"
"""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from seggpt_plugins.adapt import AdaptSettings
from seggpt_plugins.vocabulary import ADAPTED_ENV, AUTO_MODEL

from seggpt_plugins.fiftyone.adapting import adapt_plan, adapt_view
from seggpt_plugins.fiftyone.fields import best_label_field, label_fields
from seggpt_plugins.fiftyone.forms import (_choices, _count, device_fields, field_adder, model_view,
                                           nothing_to_learn_from, tag_view)
from seggpt_plugins.fiftyone.options import ParamError
from seggpt_plugins.fiftyone.progress import _drain, _relay, _stopped

ADAPT_LABEL = "Adapt SegGPT to labelled samples"
ADAPT_ADVANCED = ("batch_size", "learning_rate", "eval_every", "device", "precision")


class AdaptSeggpt(foo.Operator):
    """Fine-tune SegGPT on the labelled samples of a view (adapting.py); the propagate operator then offers the
    adapted model."""

    @property
    def config(self):
        return foo.OperatorConfig(
            name="adapt_seggpt",
            label=ADAPT_LABEL,
            description="Fine-tune SegGPT on the labelled samples of a view (minutes); 'Propagate labels with "
                        "SegGPT' then offers the adapted model",
            dynamic=True,
            execute_as_generator=True,
            allow_immediate_execution=True,
            allow_delegated_execution=True,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        target = inputs.view_target(ctx, action_description="Adapt to the labelled samples of")
        fields = label_fields(ctx.dataset, learnable=True)
        if not fields:
            return nothing_to_learn_from(inputs, ADAPT_LABEL)
        summary = None
        try:
            plan = adapt_plan(ctx.dataset, ctx.params, ctx.target_view())
            errors = {}
            summary = f"{_count(len(plan.examples), 'labelled sample')} ({plan.how}) -> model folder {plan.out}"
        except ParamError as exc:  # "required": a form still being filled in, not an error to show
            errors = {k: v for k, v in exc.errors.items() if v != "required"}
        if errors.get("view_target"):
            target.invalid, target.error_message = True, errors["view_target"]
        field = field_adder(errors)
        field("label_field", inputs.str, required=True, view=_choices(fields),
              default=ctx.params.get("label_field") or best_label_field(ctx.dataset, fields),
              description="What SegGPT adapts to: Segmentation, or Detections with instance masks; the samples of "
                          "the view where it is filled are the examples")
        field("prompt_tag", inputs.str, required=False, view=tag_view(ctx.dataset),
              description="Only the labelled samples with this tag. Empty: every labelled sample of the view")
        field("model", inputs.str, default=AUTO_MODEL, view=model_view(), description="The model to start from")
        field("time_limit", inputs.float, default=180.0, min=1,
              description="Seconds at most (a few minutes on a GPU; the best weights so far are kept)")
        field("steps", inputs.int, default=300, min=1, description="Training steps at most")
        field("name", inputs.str, required=False,
              description="The adapted model's folder name. Empty: <dataset>-<label field>-<time>")
        field("models_dir", inputs.str, required=False,
              description=f"Absolute folder the models go into (every worker must reach it). Empty: {ADAPTED_ENV}, "
                          "else the user's cache folder (seggpt-plugins/adapted); 'Propagate labels with SegGPT' "
                          "offers the models there")
        inputs.bool("advanced", default=False, label="Advanced settings", view=types.SwitchView(),
                    description="Batch size, learning rate, evaluations, device, precision")
        if ctx.params.get("advanced") or any(k in errors for k in ADAPT_ADVANCED):
            field("batch_size", inputs.int, default=4, min=1, description="Training tasks per step")
            field("learning_rate", inputs.float, default=AdaptSettings.lr, description="AdamW's learning rate")
            field("eval_every", inputs.int, default=10, min=1,
                  description="Steps between evaluations on the held-out corner (the best weights are kept)")
            device_fields(field, inputs)
        if summary:
            inputs.view("plan", types.Notice(label=summary))
        other = {k: v for k, v in errors.items() if k not in inputs.properties or k == "view_target"}
        if other:
            inputs.view("problems", types.Error(label="Cannot run", description="; ".join(other.values())))
        return types.Property(inputs, view=types.View(label=ADAPT_LABEL))

    def resolve_run_name(self, ctx):
        return f"{ADAPT_LABEL} ({ctx.params.get('label_field') or '?'})"

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("message", label="SegGPT")
        outputs.str("model", label="Adapted model")
        outputs.float("held_out_iou", label="Held-out IoU")
        return types.Property(outputs, view=types.View(label=ADAPT_LABEL))

    def execute(self, ctx):
        run = self._run(ctx)
        return _drain(run) if ctx.delegated else run

    def _run(self, ctx):
        try:
            plan = adapt_plan(ctx.dataset, ctx.params, ctx.target_view())
            summary = yield from _relay(ctx, adapt_view(ctx.dataset, plan))
        except Exception as exc:
            if not ctx.delegated:
                yield from _stopped(ctx, exc)
            raise
        if not ctx.delegated:
            yield ctx.ops.notify(summary["message"], variant="success" if summary["model"] else "warning")
        return summary

    def __call__(self, sample_collection, label_field, *, prompt_tag=None, model=AUTO_MODEL, time_limit=180.0,
                 steps=300, name=None, models_dir=None, batch_size=4, learning_rate=None, eval_every=10,
                 device=None, precision=None, view_target=None, delegate=False):
        """Run on a dataset or view from Python (through `execute_operator`, as the App does); returns the
        `ExecutionResult` (of a delegated run: its summary, with `model`, the saved folder, or None, is the
        operation's result once a worker ran it). The folder: `models_dir` (default
        adapted.adapted_models_dir()) / `name`."""
        params = dict(label_field=label_field, prompt_tag=prompt_tag, model=model, time_limit=time_limit,
                      steps=steps, name=name, models_dir=models_dir, batch_size=batch_size,
                      learning_rate=learning_rate, eval_every=eval_every, device=device, precision=precision)
        params = {k: v for k, v in params.items() if v is not None}
        if view_target is not None:
            params["view_target"] = view_target
        return foo.execute_operator(self.uri, dict(view=sample_collection.view(), params=params),
                                    request_delegation=delegate)
