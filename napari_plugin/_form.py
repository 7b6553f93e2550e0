"""The SegGPT dock widget's form: its controls, their tooltips and their layout. No behaviour here.

`build_form(widget)` creates the controls as the widget's attributes (`_image`, `_labels`, ... the
names the widget's code, the screenshot script and the tests use) and adds them to it in order. The
layer and axis choices come from the widget's `_image_choices`, `_labels_choices` and `_axis_choices`.
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
from seggpt_plugins.vocabulary import AUTO_MODEL, DEMO_MODEL, HUB_MODEL, MODEL_ENV, SEG_TYPES

#: The device field's choices; "auto" picks CUDA, then Apple MPS, then the CPU (loading.pick_device).
DEVICES = ("auto", "cpu", "cuda", "mps")


def _row(label: str, *widgets) -> Container:
    row = Container(layout="horizontal", labels=False, label=label, widgets=list(widgets))
    row.margins = (0, 0, 0, 0)
    return row


def build_form(w: Container) -> None:
    """Create the controls of the SegGPT widget `w` (as its attributes) and lay them out."""
    # ---- inputs
    w._image = ComboBox(label="Image", choices=w._image_choices,
                        tooltip="The image to segment (2D, ZYX, TYX or TZYX; grey or RGB).")
    w._labels = ComboBox(label="Examples", choices=w._labels_choices,
                         tooltip="Labels layer holding your example annotation: every slice with any label is "
                                 "an example (prompt) for SegGPT.")
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
    w._target = ComboBox(label="Target image", choices=w._image_choices,
                         tooltip="Another image layer to segment with the examples above.")
    w._other_btn = PushButton(text="Segment another image layer",
                              tooltip="Prompts from the image + examples above, targets: every plane of the "
                                      "target image.")
    w._progress = ProgressBar(min=0, max=1, value=0)
    w._cancel_btn = PushButton(text="Cancel", enabled=False,
                               tooltip="Stop after the batch in flight; results so far are kept.")
    w._status = Label(value="Ready.")
    w._accept_btn = PushButton(text="Accept into example layer",
                               tooltip="Copy '<image> SegGPT' into the Labels layer chosen under 'Examples', only "
                                       "in slices that are still empty there. One undo step takes it back.")
    # ---- settings
    w._model = LineEdit(value=AUTO_MODEL,
                        tooltip=f"'{AUTO_MODEL}': ${MODEL_ENV} when set, else {HUB_MODEL} when its weights are "
                                f"in the Hugging Face cache, else '{DEMO_MODEL}' (the small model shipped with "
                                f"the package). Or a hub id, a transformers directory or a Painter .pth "
                                "checkpoint.")
    w._browse_btn = PushButton(text="Browse…")
    w._device = ComboBox(label="Device", choices=list(DEVICES), value="auto",
                         tooltip="auto: CUDA, then Apple MPS, then CPU.")
    w._num_prompts = SpinBox(label="Prompts", min=1, max=32, value=3,
                             tooltip="How many annotated slices are shown to the model for each target (the "
                                     "nearest ones).")
    w._memory = SpinBox(label="Memory", min=0, max=32, value=4,
                        tooltip="Propagation: how many recent predictions join the prompts (Painter's video "
                                "memory; 0 = annotated slices only).")
    w._mode = RadioButtons(label="Mode", choices=list(SEG_TYPES), value=SEG_TYPES[0], orientation="horizontal",
                           tooltip="SegGPT's task token: instance (objects) or semantic (classes).")
    w._batch = SpinBox(label="Batch size", min=1, max=256, value=8,
                       tooltip="Slices per model call (more: faster on a GPU, more memory).")
    w._ensemble = ComboBox(label="Ensemble", choices=list(ENSEMBLES), value=ENSEMBLES[0],
                           tooltip="How several examples meet the model: feature (one prompt each, averaged), "
                                   "spatial (stitched into one canvas, as the SegGPT paper) or both (canvases "
                                   "of 4 examples, averaged).")
    w._tile = SpinBox(min=0, max=16384, step=16, value=0,
                      tooltip="Segment current slice / another image layer: cut large images into tiles of "
                              "this many pixels, segmented at that scale and stitched back (0 = off).")
    w._tile_auto = CheckBox(text="auto", value=False,
                            tooltip="Tiles of six object diameters of the examples; examples larger than a tile "
                                    "are cut to their most labelled tile, so both are seen at one scale.")
    w._halo = SpinBox(label="Halo", min=0, max=4096, value=32,
                      tooltip="Tiling: pixels each tile overlaps its neighbours by (below half the tile).")
    w._confidence = CheckBox(text="Confidence layer", value=False,
                             tooltip="Also write '<image> SegGPT confidence' (0..1 per pixel).")
    w._objects = CheckBox(text="One id per object", value=False,
                          tooltip="Instances: every object (e.g. each nucleus) gets its own id: connected parts, "
                                  "touching objects split by a watershed. Through a stack each object keeps "
                                  "its id (the annotated slice's own ids when each marks one object).")

    w.extend([
        w._image, w._labels, w._axis, w._slices, w._slices_info,
        w._segment_btn, w._propagate_btn, w._target, w._other_btn,
        _row("Progress", w._progress, w._cancel_btn), w._status, w._accept_btn,
        Label(value="<b>Settings</b>"), _row("Model", w._model, w._browse_btn), w._device, w._num_prompts,
        w._memory, w._mode, w._batch, w._ensemble, _row("Tile", w._tile, w._tile_auto), w._halo,
        w._confidence, w._objects,
    ])
    w._status.native.setWordWrap(True)
    w._slices_info.native.setWordWrap(True)
