"""The SegGPT dock widget's form: its controls, their tooltips and their layout. No behaviour here.

`build_form(widget)` creates the controls as the widget's attributes (`_image`, `_labels`, ... the
names the widget's code, the screenshot script and the tests use) and adds them to it in order. The
layer and axis choices come from the widget's `_image_choices`, `_labels_choices`, `_target_choices`
and `_axis_choices`.
"""

from __future__ import annotations

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    RadioButtons,
    Select,
    SpinBox,
)

from seggpt_plugins.ensembles import ENSEMBLES
from seggpt_plugins.vocabulary import AUTO_MODEL, DEMO_MODEL, HUB_MODEL, MODEL_ENV, PRECISIONS, SEG_TYPES

#: The device field's choices; "auto" picks CUDA, then Apple MPS, then the CPU (loading.pick_device).
DEVICES = ("auto", "cpu", "cuda", "mps")


def _row(label: str, *widgets) -> Container:
    row = Container(layout="horizontal", labels=False, label=label, widgets=list(widgets))
    row.margins = (0, 0, 0, 0)
    return row


#: Mode choices, named by what the user gets (the value is SegGPT's task token).
MODES = [("objects (instance)", "instance"), ("classes (semantic)", "semantic")]
#: Output choices: the example's own ids, or one id per object.
OUTPUTS = [("labels: your ids", "labels"), ("instances: one id per object", "instances")]


def build_form(w: Container) -> None:
    """Create the controls of the SegGPT widget `w` (as its attributes) and lay them out."""
    # ---- inputs
    w._image = ComboBox(label="Image", choices=w._image_choices,
                        tooltip="The image with your examples (2D, ZYX, TYX or TZYX; grey or RGB; or a series "
                                "of 2D images opened with 'Open image series…').")
    w._labels = ComboBox(label="Examples", choices=w._labels_choices,
                         tooltip="Labels layer holding your example annotation: every slice with any label is "
                                 "an example (prompt) for SegGPT.")
    w._series_btn = PushButton(text="Open image series…",
                               tooltip="A folder of 2D images: one stack of images when they share a size (label "
                                       "one or a few, segment the rest as 'Targets'), else one layer each.")
    w._axis = ComboBox(label="Stack axis", choices=w._axis_choices,
                       tooltip="Axis to go through (for 4D TZYX: T or Z; the other stays at the current slider "
                               "position).")
    w._slices = Select(label="Annotated", choices=[], allow_multiple=True,
                       tooltip="Slices found with labels. Deselect one to leave it out of the prompts.")
    w._slices.native.setMaximumHeight(96)
    w._slices_info = Label(value="")
    # ---- actions
    w._segment_btn = PushButton(text="Segment current slice",
                                tooltip="Segment the slice shown, from the nearest annotated slices.")
    w._propagate_btn = PushButton(text="Propagate through stack",
                                  tooltip="Segment every slice that is not annotated, going outward in both "
                                          "directions from the annotated slices.")
    w._targets = Select(label="Targets", choices=w._target_choices, allow_multiple=True,
                        tooltip="Image layers to segment with the examples above (several: each gets its own "
                                "result). The example image itself: its slices or images that are not annotated.")
    w._targets.native.setMaximumHeight(80)
    w._targets_btn = PushButton(text="Segment targets",
                              tooltip="Prompts from the image + examples above; every plane of each target is "
                                      "segmented into '<target> SegGPT'.")
    w._progress = ProgressBar(min=0, max=1, value=0)
    w._cancel_btn = PushButton(text="Cancel", enabled=False,
                               tooltip="Stop after the batch in flight; results so far are kept.")
    w._status = Label(value="Ready.")
    w._review = Select(label="Review", choices=[], allow_multiple=False,
                       tooltip="The last run's slices, least confident first (the predicted quality of each "
                               "proposal). Click one to go there.")
    w._review.native.setMaximumHeight(96)
    w._accept_btn = PushButton(text="Accept proposals",
                               tooltip="Copy the last run's proposals you can see ('<image> SegGPT') into the "
                                       "image's own Labels layer (the examples layer; for another image, "
                                       "'<target> labels', created if needed), only in slices still empty there. "
                                       "One undo step per layer takes it back.")
    w._export_btn = PushButton(text="Export labels…",
                               tooltip="Write the examples layer and the layers accepted into as label TIFFs and "
                                       "COCO instances (coco.json) into a folder (files already there are not "
                                       "overwritten unless 'Overwrite' is ticked).")
    w._overwrite = CheckBox(text="Overwrite", value=False,
                            tooltip="Export: replace the label TIFFs and coco.json of the same names already in the "
                                    "folder (else such a folder is refused and nothing is written).")
    # ---- settings
    w._model = LineEdit(value=AUTO_MODEL,
                        tooltip=f"'{AUTO_MODEL}': ${MODEL_ENV} when set, else {HUB_MODEL} when its weights are "
                                f"in the Hugging Face cache, else '{DEMO_MODEL}' (the small model shipped with "
                                f"the package). Or a hub id, a transformers directory or a Painter .pth "
                                "checkpoint.")
    w._browse_btn = PushButton(text="Browse…")
    w._adapt_btn = PushButton(text="Adapt to my labels",
                              tooltip="Fine-tune a copy of the model on the annotated slices (images) chosen under "
                                      "'Annotated', for at most the seconds beside; a corner of the largest one is "
                                      "held out, and the weights that segment it best are kept. The next runs use "
                                      "the adapted model when it beat the model on that corner. Cancel keeps the "
                                      "model in use.")
    w._adapt_time = SpinBox(min=5, max=7200, step=5, value=120,
                            tooltip="The most seconds adapting may take (a minute or three on a GPU is typical).")
    w._unadapt_btn = PushButton(text="Use the shipped model", enabled=False,
                                tooltip="Go back from the adapted model to the model named above (the adapted one is "
                                        "in memory only: 'Save adapted model…' keeps it).")
    w._save_model_btn = PushButton(text="Save adapted model…", enabled=False,
                                   tooltip="Write the adapted model into an empty or new folder: give that folder as "
                                           "Model (here, or --model of the seggpt commands) to use it again.")
    w._device = ComboBox(label="Device", choices=list(DEVICES), value="auto",
                         tooltip="auto: CUDA, then Apple MPS, then CPU.")
    w._precision = ComboBox(label="Precision", choices=list(PRECISIONS), value="auto",
                            tooltip="auto: bfloat16 on a GPU and on CPUs that compute it in hardware (recent "
                                    "Intel Xeon, AMD Zen 4+), else float32. int8: int8 layers on the CPU, the "
                                    "fastest there, slightly less exact.")
    w._num_prompts = SpinBox(label="Prompts", min=1, max=32, value=3,
                             tooltip="How many annotated slices are shown to the model for each target (the "
                                     "nearest ones).")
    w._memory = SpinBox(label="Memory", min=0, max=32, value=4,
                        tooltip="Propagation: how many recent predictions join the prompts (Painter's video "
                                "memory; 0 = annotated slices only).")
    w._mode = RadioButtons(label="Mode", choices=MODES, value=SEG_TYPES[0], orientation="horizontal",
                           tooltip="objects: each object you painted is followed as itself (its own id and "
                                   "colour): nuclei, cells. classes: every pixel gets the class it looks like "
                                   "(e.g. nucleus vs. cytoplasm); touching objects of one class merge.")
    w._output = ComboBox(label="Output", choices=OUTPUTS, value="labels",
                         tooltip="labels: your example's ids and colours. instances: every object (e.g. each "
                                 "nucleus) gets its own id; with mode 'objects' the examples are shown as one "
                                 "class (any number of objects), each object found is a connected part, "
                                 "touching objects split by a watershed; through a stack each object keeps its "
                                 "id (the annotated slice's own ids when each marks one object). Export writes "
                                 "instances as objects of class 'object', labels as classes.")
    w._batch = SpinBox(label="Batch size", min=1, max=256, value=8,
                       tooltip="Slices per model call (more: faster on a GPU, more memory).")
    w._ensemble = ComboBox(label="Ensemble", choices=list(ENSEMBLES), value=ENSEMBLES[0],
                           tooltip="How several examples meet the model: feature (one prompt each, averaged), "
                                   "spatial (stitched into one canvas, as the SegGPT paper) or both (canvases "
                                   "of 4 examples, averaged).")
    w._tile = SpinBox(min=0, max=16384, step=16, value=0, enabled=False,
                      tooltip="Segment current slice / targets: cut large images into tiles of this many "
                              "pixels, segmented at that scale and stitched back (0 = off).")
    w._tile_auto = CheckBox(text="auto", value=True,
                            tooltip="Images larger than the model's canvas are tiled at six object diameters of "
                                    "the examples (examples larger than a tile are cut to their most labelled "
                                    "tile), so both are seen at one scale; smaller images are not tiled.")
    w._halo = SpinBox(label="Halo", min=0, max=4096, value=32,
                      tooltip="Tiling: pixels each tile overlaps its neighbours by (below half the tile; with "
                              "auto tiles, at most a quarter of the tile).")
    w._confidence = CheckBox(text="Confidence layer", value=False,
                             tooltip="Also write '<image> SegGPT confidence' (0..1 per pixel).")

    w.extend([
        w._image, w._labels, w._series_btn, w._axis, w._slices, w._slices_info,
        w._segment_btn, w._propagate_btn, w._targets, w._targets_btn,
        _row("Progress", w._progress, w._cancel_btn), w._status, w._review, w._accept_btn,
        _row("", w._export_btn, w._overwrite),
        Label(value="<b>Settings</b>"), _row("Model", w._model, w._browse_btn),
        _row("Adapt", w._adapt_btn, w._adapt_time, Label(value="s")), _row("", w._unadapt_btn, w._save_model_btn),
        w._device, w._precision,
        w._num_prompts, w._memory, w._mode, w._output, w._batch, w._ensemble, _row("Tile", w._tile, w._tile_auto),
        w._halo, w._confidence,
    ])
    w._status.native.setWordWrap(True)
    w._slices_info.native.setWordWrap(True)
