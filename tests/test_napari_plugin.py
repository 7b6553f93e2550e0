"""The napari plugin through its real widget, in a real viewer (pytest-qt, `make_napari_viewer`).

Needs a display: run under Xvfb (`xvfb-run -a python -m pytest tests/test_napari_*.py`);
QT_QPA_PLATFORM=offscreen fails here (no OpenGL for vispy).
"""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

napari = pytest.importorskip("napari")
pytest.importorskip("pytestqt")
tifffile = pytest.importorskip("tifffile")

if sys.platform.startswith("linux") and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
    pytest.skip("napari needs a display: run under `xvfb-run -a` (offscreen Qt fails here)", allow_module_level=True)

import seggpt_plugins  # noqa: E402
from napari.utils.notifications import notification_manager  # noqa: E402

from seggpt_plugins import model_cache as _models  # noqa: E402
from seggpt_plugins.napari._widget import SegGPTWidget  # noqa: E402

pytestmark = pytest.mark.slow  # a real viewer (see the markers in pyproject.toml)

SAMPLES = Path(seggpt_plugins.__file__).parent / "demo" / "samples"
PROMPT_SLICE = 15
RUN_TIMEOUT_MS = 300_000  # a whole stack on a busy 2-core machine


@pytest.fixture(scope="module")
def stack():
    return tifffile.imread(SAMPLES / "nuclei3d.tif"), tifffile.imread(SAMPLES / "nuclei3d_mask.tif")


def open_widget(viewer) -> SegGPTWidget:
    _dock, widget = viewer.window.add_plugin_dock_widget("seggpt-plugins", "SegGPT")
    assert isinstance(widget, SegGPTWidget)
    return widget


def fast(widget, memory=0, prompts=1, batch=8):
    widget._memory.value = memory
    widget._num_prompts.value = prompts
    widget._batch.value = batch


def click(button):
    button.native.click()


def wait_done(qtbot, widget, timeout=RUN_TIMEOUT_MS):
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)
    assert widget.last_run is not None


def foreground_iou(truth, pred):
    truth, pred = truth > 0, pred > 0
    return (truth & pred).sum() / max((truth | pred).sum(), 1)


def id_agreement(truth, pred, ids):
    """Share of ground-truth objects (among `ids`) whose most frequent predicted id is their own id."""
    hits = [np.bincount(pred[truth == i].astype(np.int64)).argmax() == i for i in ids if np.any(truth == i)]
    return float(np.mean(hits))


def new_notifications(start):
    return [(str(n.severity), n.message) for n in notification_manager.records[start:]]


def add_stack(viewer, image, labels, name="nuclei"):
    image_layer = viewer.add_image(image, name=name)
    labels_layer = viewer.add_labels(labels, name=f"{name} labels")
    return image_layer, labels_layer


# ----------------------------------------------------------------------------- propagation


def test_propagate_through_stack_from_one_annotated_slice(make_napari_viewer, qtbot, stack):
    from qtpy.QtCore import QTimer

    image, truth = stack
    annotation = np.zeros_like(truth)
    annotation[PROMPT_SLICE] = truth[PROMPT_SLICE]
    viewer = make_napari_viewer()
    _img, labels = add_stack(viewer, image, annotation.copy())
    widget = open_widget(viewer)
    assert widget._image.value is _img and widget._labels.value is labels
    assert widget._slices.value == [PROMPT_SLICE]
    fast(widget, memory=1, prompts=1, batch=8)

    progress = []
    widget._progress.changed.connect(progress.append)
    ticks = []  # the UI thread must keep running while the model works
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.monotonic()))
    timer.start(50)
    click(widget._propagate_btn)
    assert widget.running and not widget._propagate_btn.enabled and widget._cancel_btn.enabled
    wait_done(qtbot, widget)
    timer.stop()

    run = widget.last_run
    total = image.shape[0] - 1
    assert run["error"] is None and not run["cancelled"]
    assert run["done"] == run["total"] == total
    result_layer = viewer.layers["nuclei SegGPT"]
    result = result_layer.data
    assert result.shape == truth.shape
    # every slice got a result, except the annotated one, which the run leaves alone
    has_labels = np.any(result, axis=(1, 2))
    assert has_labels.sum() == total and not has_labels[PROMPT_SLICE]
    assert sorted(key[0] for key in run["keys"]) == [z for z in range(image.shape[0]) if z != PROMPT_SLICE]
    # the user's layer is untouched: annotated slice as painted, the others still empty
    np.testing.assert_array_equal(labels.data, annotation)
    # label ids are the prompt's own ids (no renumbering), with the prompt layer's colours
    prompt_ids = set(np.unique(truth[PROMPT_SLICE]).tolist()) - {0}
    found = set(np.unique(result).tolist()) - {0}
    assert found <= prompt_ids and len(found) >= len(prompt_ids) // 2
    for label_id in found:
        np.testing.assert_allclose(result_layer.colormap.map(label_id), labels.colormap.map(label_id))
    # a real segmentation: the neighbours of the example match the ground truth, objects keep their ids
    for z in (PROMPT_SLICE - 1, PROMPT_SLICE + 1):
        assert foreground_iou(truth[z], result[z]) > 0.3, z
        assert id_agreement(truth[z], result[z], prompt_ids) >= 0.5, z
    # progress went slice by slice up to the total; the progress bar shows it
    done_values = [v for v in progress if v > 0]
    assert done_values == list(range(1, total + 1))
    assert widget._progress.value == widget._progress.max == total
    assert widget._status.value.startswith(f"Done: {total} slices")
    # the viewer stayed responsive (the work ran in a thread)
    assert len(ticks) > 10 and np.diff(ticks).max() < 3.0
    assert widget._propagate_btn.enabled and not widget._cancel_btn.enabled


def test_cancel_stops_within_one_batch(make_napari_viewer, qtbot, stack):
    image, truth = stack
    annotation = np.zeros_like(truth)
    annotation[PROMPT_SLICE] = truth[PROMPT_SLICE]
    viewer = make_napari_viewer()
    add_stack(viewer, image, annotation)
    widget = open_widget(viewer)
    batch = 2
    fast(widget, memory=0, prompts=1, batch=batch)
    cancelled_at = []

    def on_progress(value):
        if value == 2 and not cancelled_at:
            cancelled_at.append(value)
            click(widget._cancel_btn)

    widget._progress.changed.connect(on_progress)
    click(widget._propagate_btn)
    wait_done(qtbot, widget)
    run = widget.last_run
    assert cancelled_at == [2]
    assert run["cancelled"] and run["error"] is None
    assert run["done"] < run["total"] == image.shape[0] - 1
    assert run["done"] - cancelled_at[0] <= batch  # at most the batch in flight finishes
    result = viewer.layers["nuclei SegGPT"].data
    assert int(np.any(result, axis=(1, 2)).sum()) == run["done"]  # results so far are kept
    assert widget._status.value.startswith(f"Cancelled: {run['done']} of {run['total']}")
    assert widget._propagate_btn.enabled and not widget._cancel_btn.enabled


def test_model_loads_once_with_progress_then_is_cached(make_napari_viewer, qtbot, stack):
    image, truth = stack
    annotation = np.zeros_like(truth)
    annotation[PROMPT_SLICE] = truth[PROMPT_SLICE]
    viewer = make_napari_viewer()
    add_stack(viewer, image, annotation)
    widget = open_widget(viewer)
    _models.clear()
    seen = []
    widget.status_changed.connect(lambda text: seen.append((text, widget._progress.max)))
    viewer.dims.set_current_step(0, PROMPT_SLICE + 1)
    click(widget._segment_btn)
    wait_done(qtbot, widget)
    assert ("Loading model 'demo' (first run only)…", 0) in seen  # busy bar while loading
    model = _models.cached("demo", "auto")
    assert model is not None
    assert widget.last_run["keys"] == [(PROMPT_SLICE + 1,)]
    seen.clear()
    viewer.dims.set_current_step(0, PROMPT_SLICE + 2)
    click(widget._segment_btn)
    wait_done(qtbot, widget)
    assert not any("Loading" in text for text, _ in seen)
    assert _models.cached("demo", "auto") is model
    result = viewer.layers["nuclei SegGPT"].data
    assert np.any(result[PROMPT_SLICE + 2])  # a run's proposals are its own: the first run's slice is cleared
    assert not np.any(np.delete(result, [PROMPT_SLICE + 2], axis=0))


# --------------------------------------------------------------------------------- accept


def test_accept_is_one_undoable_step_and_spares_painted_slices(make_napari_viewer, qtbot, stack):
    """Accept copies the run's proposals into empty slices only, as one undo step; then the accepted labels
    are what is shown (result hidden, labels layer active), the list of annotated slices is in order, and
    undo refreshes it (defect 3)."""
    image, truth = stack
    sub = image[PROMPT_SLICE - 2:PROMPT_SLICE + 3]  # 5 slices, annotated at 2
    annotation = np.zeros(sub.shape, truth.dtype)
    annotation[2] = truth[PROMPT_SLICE]
    viewer = make_napari_viewer()
    img, labels = add_stack(viewer, sub, annotation.copy())
    widget = open_widget(viewer)
    fast(widget, prompts=1)
    widget._targets.value = [img]  # the image itself: its slices that are not annotated
    click(widget._targets_btn)
    wait_done(qtbot, widget)
    result_layer = viewer.layers["nuclei SegGPT"]
    result = result_layer.data.copy()
    assert np.any(result, axis=(1, 2)).tolist() == [True, True, False, True, True]
    # the user fixes slice 3 by hand before accepting: Accept must not touch it
    labels.data_setitem((np.array([3]), np.array([3]), np.array([4])), 99)
    before = labels.data.copy()
    qtbot.waitUntil(lambda: widget._slices.value == [2, 3], timeout=5000)  # the painted slice joined

    click(widget._accept_btn)
    after = labels.data.copy()
    for z in (0, 1, 4):
        np.testing.assert_array_equal(after[z], result[z])
    np.testing.assert_array_equal(after[2], annotation[2])
    np.testing.assert_array_equal(after[3], before[3])
    assert "Accepted 3 slices into 'nuclei labels'" in widget._status.value
    assert not result_layer.visible and viewer.layers.selection.active == labels  # the accepted labels show
    qtbot.waitUntil(lambda: widget._slices.value == [0, 1, 2, 3, 4], timeout=5000)
    assert [widget._slices.native.item(k).text() for k in range(5)] == [f"slice {z}" for z in range(5)]
    labels.undo()  # one step takes the whole accept back, and the list follows
    np.testing.assert_array_equal(labels.data, before)
    qtbot.waitUntil(lambda: widget._slices.value == [2, 3], timeout=5000)
    labels.redo()
    np.testing.assert_array_equal(labels.data, after)


# ------------------------------------------------------------------------- classes, 2D


def test_multiclass_labels_keep_their_ids(make_napari_viewer, qtbot, stack):
    image, truth = stack
    prompt = truth[PROMPT_SLICE]
    ids, areas = np.unique(prompt[prompt > 0], return_counts=True)
    small = ids[areas < np.median(areas)]
    classes = np.where(prompt == 0, 0, np.where(np.isin(prompt, small), 3, 7)).astype(np.uint8)
    annotation = np.zeros(truth.shape, np.uint8)
    annotation[PROMPT_SLICE] = classes
    viewer = make_napari_viewer()
    add_stack(viewer, image, annotation)
    widget = open_widget(viewer)
    fast(widget)
    widget._mode.value = "semantic"
    widget._confidence.value = True
    viewer.dims.set_current_step(0, PROMPT_SLICE + 1)
    click(widget._segment_btn)
    wait_done(qtbot, widget)
    result = viewer.layers["nuclei SegGPT"].data[PROMPT_SLICE + 1]
    assert set(np.unique(result).tolist()) == {0, 3, 7}
    assert foreground_iou(truth[PROMPT_SLICE + 1], result) > 0.3
    # the optional confidence layer: scores in [0, 1] on the segmented slice only
    confidence = viewer.layers["nuclei SegGPT confidence"].data
    assert confidence.dtype == np.float32 and confidence.shape == truth.shape
    scores = confidence[PROMPT_SLICE + 1]
    assert 0 <= scores.min() and scores.max() <= 1 and scores.mean() > 0.3
    assert not np.any(np.delete(confidence, PROMPT_SLICE + 1, axis=0))


def test_one_id_per_object_kept_through_the_stack(make_napari_viewer, qtbot, stack):
    """'One id per object': the annotated slice's nuclei keep their ids in the slices next to it, and
    objects get ids of their own (a wide dtype), never the prompt's ids by position."""
    image, truth = stack
    annotation = np.zeros(truth.shape, np.uint16)
    annotation[PROMPT_SLICE] = truth[PROMPT_SLICE]
    viewer = make_napari_viewer()
    _img, labels = add_stack(viewer, image, annotation)
    widget = open_widget(viewer)
    fast(widget, memory=1)
    widget._output.value = "instances"
    click(widget._propagate_btn)
    wait_done(qtbot, widget)
    assert widget.last_run["error"] is None
    result = viewer.layers["nuclei SegGPT"].data
    assert result.dtype == np.uint32 and not result[PROMPT_SLICE].any()
    prompt_ids = [i for i in np.unique(truth[PROMPT_SLICE]) if i]
    for z in (PROMPT_SLICE - 1, PROMPT_SLICE + 1):
        assert id_agreement(truth[z], result[z], prompt_ids) >= 0.5, z
        for object_id in np.unique(result[z]):  # each id is one connected object
            if object_id:
                assert ndimage.label(result[z] == object_id, structure=np.ones((3, 3)))[1] == 1
    new = set(np.unique(result).tolist()) - set(prompt_ids) - {0}
    assert not new or min(new) > max(prompt_ids)  # new objects get new ids, above the user's


def test_segment_another_image_layer_stack(make_napari_viewer, qtbot, stack):
    image, truth = stack
    source = image[PROMPT_SLICE - 3:PROMPT_SLICE + 4]  # 7 slices, annotated at 3
    annotation = np.zeros(source.shape, truth.dtype)
    annotation[3] = truth[PROMPT_SLICE]
    viewer = make_napari_viewer()
    source_layer, labels = add_stack(viewer, source, annotation)
    other = viewer.add_image(image[PROMPT_SLICE + 1:PROMPT_SLICE + 4], name="other")
    widget = open_widget(viewer)
    fast(widget)
    widget._image.value, widget._labels.value = source_layer, labels

    widget._targets.value = [source_layer]  # the same image: every plane but the annotated one
    click(widget._targets_btn)
    wait_done(qtbot, widget)
    assert widget.last_run["keys"] == [(0,), (1,), (2,), (4,), (5,), (6,)]
    same = viewer.layers["nuclei SegGPT"].data
    assert np.any(same, axis=(1, 2)).tolist() == [True, True, True, False, True, True, True]

    widget._targets.value = [other]
    click(widget._targets_btn)
    wait_done(qtbot, widget)
    assert "nuclei SegGPT" not in viewer.layers  # the last run's proposals are gone with it
    result = viewer.layers["other SegGPT"].data
    assert result.shape == other.data.shape and np.all(np.any(result, axis=(1, 2)))
    assert set(np.unique(result).tolist()) - {0} <= set(np.unique(truth[PROMPT_SLICE]).tolist())
    assert foreground_iou(truth[PROMPT_SLICE + 1], result[0]) > 0.3
    np.testing.assert_array_equal(labels.data, annotation)  # prompts are only read


def test_tile_and_ensemble_settings_reach_the_core(make_napari_viewer, qtbot, stack, monkeypatch):
    """Settings 'Ensemble' and 'Tile' / 'Halo': every action passes the ensemble; both segment actions tile
    (with 'auto', the default, only planes larger than the model's canvas: not these 61x57 slices)."""
    from seggpt_plugins.engine import SegGPT
    from seggpt_plugins.runner import Runner

    calls = []
    for owner, name in ((Runner, "__init__"), (SegGPT, "prepare_prompts"), (SegGPT, "propagate")):
        original = getattr(owner, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls.append((_name, {k: kwargs.get(k) for k in ("ensemble", "tile", "halo")}))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(owner, name, spy)

    image, truth = stack  # the sample nuclei stack, 31 x 61 x 57
    annotation = np.zeros_like(truth)
    annotation[PROMPT_SLICE - 2] = truth[PROMPT_SLICE - 2]
    annotation[PROMPT_SLICE] = truth[PROMPT_SLICE]
    viewer = make_napari_viewer()
    img, _labels = add_stack(viewer, image, annotation)
    other = viewer.add_image(image[PROMPT_SLICE + 1:PROMPT_SLICE + 3], name="other")
    widget = open_widget(viewer)
    fast(widget, prompts=2)
    assert (widget._ensemble.value, widget._tile.value, widget._tile_auto.value, widget._halo.value) == (
        "feature", 0, True, 32)  # defaults: feature ensemble, auto tiles
    widget._ensemble.value = "spatial"
    widget._tile_auto.value = False
    assert widget._tile.enabled
    widget._tile.value, widget._halo.value = 32, 4

    viewer.dims.set_current_step(0, PROMPT_SLICE + 1)
    click(widget._segment_btn)
    wait_done(qtbot, widget)
    assert widget.last_run["error"] is None
    assert ("prepare_prompts", dict(ensemble="spatial", tile=32, halo=None)) in calls
    assert ("__init__", dict(ensemble="spatial", tile=32, halo=4)) in calls  # the core's Runner
    result = viewer.layers["nuclei SegGPT"].data
    assert result.shape == truth.shape and np.any(result[PROMPT_SLICE + 1])
    assert set(np.unique(result).tolist()) - {0} <= set(np.unique(truth[PROMPT_SLICE - 2:PROMPT_SLICE + 1]).tolist())

    calls.clear()
    widget._tile_auto.value = True  # these planes fit the model's canvas: seen whole
    widget._targets.value = [other]
    click(widget._targets_btn)
    wait_done(qtbot, widget)
    assert widget.last_run["error"] is None and widget.last_run["done"] == 2
    assert ("prepare_prompts", dict(ensemble="spatial", tile=None, halo=None)) in calls
    assert ("__init__", dict(ensemble="spatial", tile=None, halo=4)) in calls
    result = viewer.layers["other SegGPT"].data
    assert result.shape == other.data.shape and np.all(np.any(result, axis=(1, 2)))

    calls.clear()
    widget._ensemble.value = "both"
    click(widget._propagate_btn)
    wait_done(qtbot, widget)
    assert widget.last_run["error"] is None and widget.last_run["done"] == image.shape[0] - 2
    assert calls[0] == ("propagate", dict(ensemble="both", tile=None, halo=None))
    assert viewer.layers["nuclei SegGPT"].data.shape == truth.shape

    # a halo that leaves no core: a clear message before any run
    widget._tile_auto.value, widget._halo.value = False, 16
    start = len(notification_manager.records)
    click(widget._segment_btn)
    assert not widget.running
    assert any(sev == "error" and "halo" in msg for sev, msg in new_notifications(start))


def test_sample_data_and_segment_another_image_layer(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.open_sample("seggpt-plugins", "nuclei3d")
    stack_labels = viewer.layers["nuclei3d annotations"]
    assert viewer.layers["nuclei3d"].data.shape == stack_labels.data.shape == (31, 61, 57)
    assert np.flatnonzero(np.any(stack_labels.data, axis=(1, 2))).tolist() == [5, 15, 25]
    truth3d = tifffile.imread(SAMPLES / "nuclei3d_mask.tif")
    np.testing.assert_array_equal(stack_labels.data[15], truth3d[15])

    widget = open_widget(viewer)
    assert widget._axis_choices() == [("z (axis 0)", 0)]
    assert [widget._slices.native.item(k).text() for k in range(3)] == ["z = 5", "z = 15", "z = 25"]

    viewer.open_sample("seggpt-plugins", "nuclei2d")
    for name in ("nuclei2d example", "nuclei2d example labels", "nuclei2d target"):
        assert name in viewer.layers
    widget._image.value = viewer.layers["nuclei2d example"]
    assert widget._labels.value is viewer.layers["nuclei2d example labels"]  # picked by shape
    assert widget._slices.value == [0] and not widget._axis.visible
    # a 2D example: only "Segment targets" is offered, and the target is the other 2D image, not itself
    assert not widget._targets_btn.native.isHidden()
    assert widget._segment_btn.native.isHidden() and widget._propagate_btn.native.isHidden()
    target = viewer.layers["nuclei2d target"]
    assert [name for name, _ in widget._target_choices()] == ["nuclei3d", "nuclei2d target"]
    assert widget._targets.value == [target]
    click(widget._targets_btn)
    wait_done(qtbot, widget)
    assert widget.last_run["error"] is None and widget.last_run["keys"] == [()]
    result_layer = viewer.layers["nuclei2d target SegGPT"]
    np.testing.assert_allclose(result_layer.translate, target.translate)  # drawn over the target
    truth = tifffile.imread(SAMPLES / "nuclei2d_mask.tif")[:, 256:]
    example_ids = set(np.unique(viewer.layers["nuclei2d example labels"].data).tolist())
    assert set(np.unique(result_layer.data).tolist()) <= example_ids
    assert foreground_iou(truth, result_layer.data) > 0.35

    # Accept after segmenting another image: into the target's own Labels layer, created over it (defect 2)
    click(widget._accept_btn)
    own = viewer.layers["nuclei2d target labels"]
    np.testing.assert_array_equal(own.data, result_layer.data)
    np.testing.assert_allclose(own.translate, target.translate)
    assert "Accepted 1 image into 'nuclei2d target labels'" in widget._status.value
    assert not result_layer.visible and viewer.layers.selection.active == own
    full_truth = tifffile.imread(SAMPLES / "nuclei2d_mask.tif")
    np.testing.assert_array_equal(viewer.layers["nuclei2d example labels"].data, full_truth[:, :256])  # only read
    own.undo()  # one step
    assert not np.any(own.data)


# ---------------------------------------------------------------- dtypes, RGB, 4D, dask


@pytest.mark.parametrize("kind", ["uint8", "float32", "rgb"])
def test_dtypes_rgb_and_contrast_limits(make_napari_viewer, qtbot, stack, monkeypatch, kind):
    from seggpt_plugins.runner import Runner

    image, truth = stack
    scaled = (image.astype(np.float32) - image.min()) / (image.max() - image.min())
    data = {"uint8": (scaled * 255).astype(np.uint8), "float32": scaled,
            "rgb": np.stack([(scaled * 255).astype(np.uint8)] * 3, axis=-1)}[kind]
    annotation = np.zeros_like(truth)
    annotation[PROMPT_SLICE] = truth[PROMPT_SLICE]
    viewer = make_napari_viewer()
    layer, _ = add_stack(viewer, data, annotation)
    assert layer.rgb == (kind == "rgb")
    limits = {"uint8": (0.0, 255.0), "float32": (0.0, 1.0), "rgb": (0.0, 255.0)}[kind]
    layer.contrast_limits = limits
    calls = []
    original = Runner.__init__

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("intensity_range"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Runner, "__init__", spy)
    widget = open_widget(viewer)
    fast(widget)
    viewer.dims.set_current_step(0, PROMPT_SLICE + 1)
    click(widget._segment_btn)
    wait_done(qtbot, widget)
    assert calls == [limits]  # the model sees what the user sees
    result = viewer.layers["nuclei SegGPT"].data[PROMPT_SLICE + 1]
    assert foreground_iou(truth[PROMPT_SLICE + 1], result) > 0.3


def test_4d_choose_axis(make_napari_viewer, qtbot, stack):
    image, truth = stack
    # two time points of a 7-slice stack; at t=1 the nuclei have moved on by one slice
    frames = np.stack([image[PROMPT_SLICE - 4:PROMPT_SLICE + 3], image[PROMPT_SLICE - 3:PROMPT_SLICE + 4]])
    truths = np.stack([truth[PROMPT_SLICE - 4:PROMPT_SLICE + 3], truth[PROMPT_SLICE - 3:PROMPT_SLICE + 4]])
    annotation = np.zeros_like(truths)
    annotation[1, 3] = truths[1, 3]
    viewer = make_napari_viewer()
    add_stack(viewer, frames, annotation)
    viewer.dims.axis_labels = ("t", "z", "y", "x")
    widget = open_widget(viewer)
    assert [name for name, _ in widget._axis_choices()] == ["t (axis 0)", "z (axis 1)"]
    assert widget._axis.value == 1  # Z by default
    fast(widget)
    viewer.dims.set_current_step(0, 1)
    qtbot.waitUntil(lambda: widget._slices.value == [3], timeout=5000)
    click(widget._propagate_btn)
    wait_done(qtbot, widget)
    result = viewer.layers["nuclei SegGPT"].data
    assert not np.any(result[0])  # the other time point is left alone
    assert np.any(result[1], axis=(1, 2)).tolist() == [True, True, True, False, True, True, True]
    assert foreground_iou(truths[1, 2], result[1, 2]) > 0.3

    # along T at z=3: the annotated (t=1, z=3) is the example for t=0
    widget._axis.value = 0
    viewer.dims.set_current_step(1, 3)
    qtbot.waitUntil(lambda: widget._slices.value == [1], timeout=5000)
    assert widget._slices.choices == (1,) and "t = 1" in widget._slices.native.item(0).text()
    viewer.dims.set_current_step(0, 0)
    click(widget._segment_btn)
    wait_done(qtbot, widget)
    assert widget.last_run["keys"] == [(0, 3)]
    assert foreground_iou(truths[0, 3], result[0, 3]) > 0.3


def test_dask_stack_is_read_plane_by_plane(make_napari_viewer, qtbot, stack):
    da = pytest.importorskip("dask.array")
    import dask
    from dask.callbacks import Callback

    image, truth = stack
    sub, sub_truth = image[10:21], truth[10:21]
    loads = []
    lock = threading.Lock()

    def load(z):
        with lock:
            loads.append(z)
        return sub[z]

    lazy = da.stack([da.from_delayed(dask.delayed(load)(z), sub.shape[1:], sub.dtype) for z in range(len(sub))])
    annotation = np.zeros_like(sub_truth)
    annotation[5] = sub_truth[5]
    viewer = make_napari_viewer()
    add_stack(viewer, lazy, annotation)
    widget = open_widget(viewer)
    fast(widget)
    per_compute = []

    class Count(Callback):  # planes loaded by each dask compute (main thread or worker)
        def _start(self, dsk):
            with lock:
                self.mark = len(loads)

        def _finish(self, dsk, state, errored):
            with lock:
                per_compute.append(len(loads) - self.mark)

    loads.clear()
    with Count():
        click(widget._propagate_btn)
        wait_done(qtbot, widget)
    assert widget.last_run["done"] == len(sub) - 1
    assert per_compute and max(per_compute) <= 1  # never more than one plane at once
    assert sorted(set(loads)) == list(range(len(sub)))
    result = viewer.layers["nuclei SegGPT"].data
    assert np.any(result, axis=(1, 2)).sum() == len(sub) - 1
    assert foreground_iou(sub_truth[4], result[4]) > 0.3


# ------------------------------------------------------------------------- bad input


def test_bad_input_gives_clear_notifications(make_napari_viewer, qtbot, stack, tmp_path):
    image, truth = stack
    viewer = make_napari_viewer()
    img, labels = add_stack(viewer, image, np.zeros_like(truth))
    widget = open_widget(viewer)
    fast(widget)

    def attempt(button, expected):
        start = len(notification_manager.records)
        click(button)
        if widget.running:
            wait_done(qtbot, widget)
        notes = new_notifications(start)
        assert any(sev == "error" and expected in msg for sev, msg in notes), notes
        assert expected in widget._status.value
        assert not widget.running

    attempt(widget._propagate_btn, "No annotation")
    assert "nuclei SegGPT" not in viewer.layers

    wrong = viewer.add_labels(np.zeros((31, 60, 57), np.uint8), name="wrong shape")
    wrong.data[3, 4, 5] = 1
    widget._labels.value = wrong
    attempt(widget._propagate_btn, "Shape mismatch")

    five_d = viewer.add_image(np.zeros((2, 2, 3, 16, 16), np.uint8), name="5d")
    widget._image.value = five_d
    attempt(widget._segment_btn, "Unsupported dimensions")

    flat = viewer.add_image(image[0], name="flat")
    flat_labels = viewer.add_labels(truth[0].copy(), name="flat labels")
    widget._image.value, widget._labels.value = flat, flat_labels
    assert widget._propagate_btn.native.isHidden()  # not offered for a 2D image; called anyway, it says why
    start = len(notification_manager.records)
    widget.propagate()
    assert any(sev == "error" and "2D image" in msg for sev, msg in new_notifications(start))
    widget._targets.value = []
    attempt(widget._targets_btn, "No target")

    widget._image.value, widget._labels.value = img, labels
    crowded = np.zeros(truth.shape[1:], np.uint16)  # 130 ids: more than SegGPT's colours can separate
    crowded.reshape(-1)[:130 * 8] = np.repeat(np.arange(1, 131), 8)
    labels.data[PROMPT_SLICE] = crowded
    widget._refresh_annotated()
    widget._mode.value = "semantic"  # classes cannot be merged: the core's message, raised in the worker
    viewer.dims.set_current_step(viewer.dims.ndim - 3, PROMPT_SLICE + 1)  # Z of the stack (the 5D layer is there)
    attempt(widget._segment_btn, "124")
    widget._mode.value = "instance"

    labels.data[PROMPT_SLICE] = truth[PROMPT_SLICE]
    widget._refresh_annotated()
    widget._model.value = str(tmp_path / "missing-model")
    attempt(widget._propagate_btn, "no such file or directory")
    assert widget.last_run["error"] and widget._propagate_btn.enabled


# ------------------------------------------------------------------ manifest, menus


def test_manifest_validates():
    npe2 = Path(sys.executable).with_name("npe2")
    command = [str(npe2)] if npe2.exists() else [sys.executable, "-m", "npe2"]
    done = subprocess.run(command + ["validate", "seggpt-plugins", "--imports"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid" in done.stdout


def test_widget_opens_from_the_plugins_menu(make_napari_viewer, qtbot):
    from qtpy.QtWidgets import QMenu

    viewer = make_napari_viewer()

    def actions(menu):
        for action in menu.actions():
            if action.menu() is not None:
                yield from actions(action.menu())
            else:
                yield action

    menu = viewer.window.plugins_menu
    assert isinstance(menu, QMenu)
    menu.aboutToShow.emit()  # app-model menus fill on show
    hits = [a for a in actions(menu) if "SegGPT" in a.text().replace("&", "")]
    assert hits, [a.text() for a in actions(menu)]
    hits[0].trigger()
    qtbot.waitUntil(lambda: any(isinstance(w, SegGPTWidget) for w in viewer.window.dock_widgets.values()),
                    timeout=5000)
    name, widget = next((n, w) for n, w in viewer.window.dock_widgets.items() if isinstance(w, SegGPTWidget))
    assert "SegGPT" in name
    assert widget._image.value is None and "No image layer" in widget._slices_info.value
