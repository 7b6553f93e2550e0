"""'Adapt to my labels' in the napari widget (issue 31, item 3), in a real viewer with the demo model: the
adapted model is the one the next runs use, Cancel keeps the model in use, 'Use the shipped model' goes
back, 'Save adapted model…' writes a model folder, and bad examples are refused before any training.

Needs a display: run under Xvfb (`xvfb-run -a python -m pytest tests/test_napari_adapt.py`).
"""

import json

import numpy as np
import pytest

from .test_napari_plugin import click, new_notifications, notification_manager, open_widget, wait_done

pytestmark = pytest.mark.slow  # a real viewer

TILE = 128


def settings():
    """A few quick steps that beat the demo model on the held-out corner of a nuclei tile (the widget's wiring
    is under test here, not adapt's defaults, so the loss's weight is fixed too)."""
    from seggpt_plugins.adapt import AdaptSettings

    return AdaptSettings(eval_every=2, batch_size=2, lr=1e-3, foreground_weight=10.0)


def wait_adapted(qtbot, widget, timeout=300_000):
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)
    assert widget.last_adapt is not None


def segment_target(qtbot, widget) -> str:
    """'Segment targets' once; the fingerprint of the model that ran."""
    click(widget._targets_btn)
    wait_done(qtbot, widget)
    assert widget.last_run["done"] == 1 and not widget.last_run["error"]
    return widget.last_run["model"]


def test_adapted_model_is_used_by_the_next_run_until_reset(make_napari_viewer, qtbot, nuclei2d, tmp_path):
    image, truth = nuclei2d
    viewer = make_napari_viewer()
    example = viewer.add_image(image[:TILE, :TILE], name="tile")
    viewer.add_labels((truth[:TILE, :TILE] > 0).astype(np.uint8), name="tile labels")
    target = viewer.add_image(image[TILE:2 * TILE, TILE:2 * TILE], name="target")
    widget = open_widget(viewer)
    widget._image.value = example
    widget._targets.value = [target]
    widget._model.value = "demo"
    base = segment_target(qtbot, widget)
    assert not widget._unadapt_btn.enabled and not widget._save_model_btn.enabled

    widget.adapt_steps, widget.adapt_settings = 6, settings()
    widget._adapt_time.value = 600
    lines, bar = [], []
    widget.status_changed.connect(lines.append)
    widget._progress.changed.connect(bar.append)
    click(widget._adapt_btn)
    assert widget.running and not widget._targets_btn.enabled
    wait_adapted(qtbot, widget)
    info = widget.last_adapt["adaptation"]
    assert widget.last_adapt["used"] and info["improved"] and info["examples"] == 1
    assert any(line.startswith("Adapting to 1 annotated image: step 6 / 6") for line in lines), lines
    assert bar and max(bar) == 1000 and bar == sorted(bar)
    status = widget._status.value
    assert status.startswith("Adapted to 1 annotated image in ") and "the next runs use it" in status, status
    assert widget._unadapt_btn.enabled and widget._save_model_btn.enabled

    adapted = segment_target(qtbot, widget)
    assert adapted == info["fingerprint"] != base
    assert widget._status.value.endswith("(adapted model)")

    # Cancel during a second adaptation: the adapted model stays the one in use
    lines.clear()

    def cancel_at_first_step(line):
        if line.startswith("Adapting to") and widget.running and widget._cancel_btn.enabled:
            click(widget._cancel_btn)

    widget.status_changed.connect(cancel_at_first_step)
    widget.adapt_steps = 300
    click(widget._adapt_btn)
    wait_adapted(qtbot, widget)
    widget.status_changed.disconnect(cancel_at_first_step)
    assert widget.last_adapt["cancelled"] and not widget.last_adapt["used"]
    assert widget._status.value == "Adapting cancelled: the runs keep using the adapted model."
    assert segment_target(qtbot, widget) == adapted

    # Save: a model folder any Model field loads; a folder that is not empty is refused in one line
    folder = widget.save_adapted_model(folder=tmp_path / "adapted")
    assert json.loads((folder / "adaptation.json").read_text())["fingerprint"] == adapted
    start = len(notification_manager.records)
    assert widget.save_adapted_model(folder=folder) is None
    assert new_notifications(start) == [("error", f"'{folder}' is not empty: choose an empty or new folder for the "
                                                  "adapted model.")]

    click(widget._unadapt_btn)
    assert widget._status.value == "Back to 'demo': the next runs use it (the adapted model was dropped)."
    assert not widget._unadapt_btn.enabled
    assert segment_target(qtbot, widget) == base
    widget._model.value = str(folder)  # the saved folder, named as Model, is the adapted model
    assert segment_target(qtbot, widget) == adapted


@pytest.mark.parametrize("case, expected", [
    ("empty", "No annotation: Labels 'tile labels' is empty. Paint the objects on the image: it is the example "
              "SegGPT copies."),
    ("small", "Cannot adapt to Labels 'tile labels': example 0: 12x12 is too small to hold out a square of 8 px for "
              "early stopping; give a larger example"),
])
def test_bad_examples_are_refused_before_any_training(make_napari_viewer, qtbot, monkeypatch, case, expected):
    from seggpt_plugins import SegGPT

    calls = []
    monkeypatch.setattr(SegGPT, "adapt", lambda *a, **k: calls.append(a))
    size = 12 if case == "small" else 64
    labels = np.zeros((size, size), np.uint8)
    if case == "small":
        labels[4:8, 4:8] = 1
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((size, size), np.uint8), name="tile")
    viewer.add_labels(labels, name="tile labels")
    widget = open_widget(viewer)
    start = len(notification_manager.records)
    click(widget._adapt_btn)
    assert not widget.running and widget.last_adapt is None and not calls
    assert widget._status.value == expected
    assert new_notifications(start) == [("error", expected)]
