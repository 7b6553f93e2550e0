"""Form parts both FiftyOne operators share (operators.py, adapt_operator.py): the label field choices, the form
of a dataset with nothing to learn from, the tag and model pickers, the Device and Precision fields, and
`field_adder` (fields named in the App's words, marked when the plan names them)."""

from __future__ import annotations

import fiftyone.operators.types as types

from seggpt_plugins.vocabulary import PRECISIONS

from seggpt_plugins.fiftyone.models import device_choices, model_choices
from seggpt_plugins.fiftyone.options import label


def _choices(fields: dict):
    choices = types.Dropdown()
    for name, field_type in fields.items():
        choices.add_choice(name, label=name, description=field_type)
    return choices


def nothing_to_learn_from(inputs, title: str):
    """The form of a dataset with no field to learn from."""
    inputs.view("no_fields", types.Error(
        label="Nothing to learn from",
        description="This dataset has no Segmentation field and no Detections field (other than SegGPT's "
                    "own predictions). Label a few samples first (masks or instance masks), then run this "
                    "operator."))
    inputs.str("label_field", required=True, invalid=True,
               error_message="no Segmentation or Detections field to learn from in this dataset")
    return types.Property(inputs, view=types.View(label=title))


def tag_view(dataset):
    tags = types.Dropdown()
    for tag in sorted(dataset.distinct("tags")):
        tags.add_choice(tag, label=tag)
    return tags


def model_view():
    """The models offered (models.model_choices); a path may be typed too."""
    models = types.AutocompleteView()
    for value, description in model_choices():
        models.add_choice(value, label=value, description=description)
    return models


def device_fields(field, inputs):
    """The Device and Precision fields of both operators."""
    devices = types.Dropdown()
    for device in device_choices():
        devices.add_choice(device, label=device)
    field("device", inputs.str, default="auto", view=devices,
          description="auto: cuda, then mps, then cpu (of the machine that runs the operation)")
    precisions = types.Dropdown()
    for precision in PRECISIONS:
        precisions.add_choice(precision, label=precision)
    field("precision", inputs.str, default="auto", view=precisions,
          description="auto: bfloat16 on a GPU and on CPUs that compute it in hardware, else float32; "
                      "int8: int8 linear layers on the CPU (fastest there, slightly less exact)")


def field_adder(errors: dict):
    """field(name, add, **kwargs): a form field named in the App's words, marked when `errors` names it."""

    def field(name, add, **kwargs):
        message = errors.get(name)
        if message:
            kwargs.update(invalid=True, error_message=message)
        return add(name, label=label(name), **kwargs)

    return field


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
