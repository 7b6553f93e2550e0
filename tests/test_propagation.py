"""Propagation without drift (issue 33, items 1-2), with the demo model on real and generated data: the
memory is held to the examples (propagation.py), and a slice painted over whole ranks with the worst."""

import numpy as np
import pytest

from seggpt_plugins.scenes import annotated_frame, moving_objects

from .conftest import SAMPLES


def iou(a, b) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@pytest.fixture(scope="module")
def nuclei_stack():
    from tifffile import imread

    stack, truth = imread(SAMPLES / "nuclei3d.tif"), imread(SAMPLES / "nuclei3d_mask.tif")
    middle = len(stack) // 2
    return stack, truth, {middle: (truth[middle] > 0).astype(np.uint8)}


def test_the_default_memory_does_not_paint_whole_slices(demo_model, nuclei_stack):
    """From the middle slice of stardist's 3D stack, the memory as it was paints the end slices over whole
    (mean slice IoU 0.48 against 0.63 without memory); the default now does at least as well as no memory."""
    stack, truth, annotation = nuclei_stack
    runs = {name: {p.index: p for p in demo_model.propagate(stack, annotations=annotation, **options)}
            for name, options in {"default": {}, "no memory": dict(memory=0),
                                  "before": dict(memory=8, memory_gate=False)}.items()}
    mean_iou = {name: np.mean([iou(p.labels > 0, truth[z] > 0) for z, p in found.items()])
                for name, found in runs.items()}
    painted = {name: max(np.mean(p.labels > 0) for p in found.values()) for name, found in runs.items()}
    assert painted["before"] > 0.9 and mean_iou["before"] < mean_iou["no memory"] - 0.05  # the drift, measured
    assert painted["default"] <= 0.9
    assert mean_iou["default"] >= mean_iou["no memory"] - 0.005


def test_a_drifting_run_ranks_its_whole_painted_slices_worst(demo_model, nuclei_stack):
    """The review list of the drifting run (the memory as it was): the slices painted over 90% fill the
    worst third by confidence (they sat at the bottom of "worst first" before quality.gross_error)."""
    stack, truth, annotation = nuclei_stack
    found = {p.index: p for p in demo_model.propagate(stack, annotations=annotation, memory=8, memory_gate=False)}
    slices = sorted(found, key=lambda z: found[z].confidence)
    painted = {z for z in slices if np.mean(found[z].labels > 0) > 0.9}
    third = len(slices) // 3
    assert len(painted) >= third  # (the drift this test needs)
    worst = set(slices[:third])
    assert len(worst & painted) >= third * 0.75, (sorted(worst), sorted(painted))
    assert not painted & set(slices[-third:])  # none among the best third
    assert all(found[z].quality_features["gross_error"] < 1 for z in painted)


@pytest.mark.parametrize("kind", ["video", "stack"])
def test_the_memory_still_follows_objects_that_move_far(demo_model, kind):
    """On generated scenes of objects moving far from where they were annotated (what the memory is for),
    the default keeps the ids and the foreground at least as well as the memory as it was, and the memory
    still helps the ids (against none)."""
    frames, truth = moving_objects(kind, seed=11, num_frames=21)
    origin = annotated_frame(kind, len(frames))
    ids = [i for i in np.unique(truth[origin]) if i]
    scores = {}
    for name, options in {"default": {}, "no memory": dict(memory=0), "before": dict(memory_gate=False)}.items():
        found = list(demo_model.propagate(frames, annotations={origin: truth[origin]}, **options))
        objects = [iou(p.labels == i, truth[p.index] == i) for p in found for i in ids
                   if (truth[p.index] == i).any() or (p.labels == i).any()]
        scores[name] = (np.mean(objects), np.mean([iou(p.labels > 0, truth[p.index] > 0) for p in found]))
    assert scores["default"][0] >= scores["before"][0] - 0.01, scores  # ids: per-object IoU
    assert scores["default"][1] >= scores["before"][1] - 0.01, scores  # foreground IoU
    assert scores["default"][0] > scores["no memory"][0], scores  # the memory still helps the ids


def test_propagated_frames_are_read_plain_whatever_margin_the_model_reads_still_images_with():
    """A model whose config sets a foreground margin reads a still image with it, but propagated frames with
    the plain nearest colour (remembered, margined frames shrink the next ones: BENCHMARKS.md section 19)."""
    from seggpt_plugins import SegGPT
    from seggpt_plugins.loading import load_network

    frames, truth = moving_objects("video", seed=11, num_frames=8)
    models = []
    for margin in (0.7, 0.0):
        net = load_network("demo")
        net.config.foreground_margin = margin
        models.append(SegGPT(net, device="cpu"))
    still = [m.segment([frames[3]], frames[0], truth[0])[0].labels for m in models]
    assert np.count_nonzero(still[0]) < np.count_nonzero(still[1])
    runs = [list(m.propagate(frames, annotations={0: truth[0]})) for m in models]
    assert [p.index for p in runs[0]] == [p.index for p in runs[1]]
    assert all(np.array_equal(a.labels, b.labels) and a.joined_memory == b.joined_memory for a, b in zip(*runs))


def test_each_frame_is_a_target_of_the_runner_colour_mode_included(demo_model, nuclei_stack):
    """Propagation paints its frames through the one loop (runner.Runner), so a colour stack shown grey
    examples is made grey first, as `segment` does a colour target (images.one_colour_mode): the same ids
    as the stack made grey by hand, and the example's ids followed from the annotated slice."""
    from seggpt_plugins.images import to_grey, to_rgb8

    stack, truth, _ = nuclei_stack
    frames = np.stack([to_rgb8(s) for s in stack[:6]]) * np.array([1.0, 0.55, 0.3])  # tinted orange
    frames = frames.round().astype(np.uint8)
    example, mask = to_rgb8(stack[8]), (truth[8] > 0).astype(np.uint8)
    found = [p.labels for p in demo_model.propagate(frames, [example], [mask], memory=2)]
    by_hand = [p.labels for p in demo_model.propagate(to_grey(frames), [example], [mask], memory=2)]
    assert all(np.array_equal(a, b) for a, b in zip(found, by_hand))
    assert np.mean([iou(f > 0, truth[z] > 0) for z, f in enumerate(found)]) > 0.3


def _instance_f1(found: np.ndarray, truth: np.ndarray) -> float:
    """Objects matched at IoU above 0.5 (each object at most one match above 0.5), as F1."""
    predicted = [i for i in np.unique(found) if i]
    true = [i for i in np.unique(truth) if i]
    matched = sum(any(iou(found == p, truth == t) > 0.5 for t in true) for p in predicted)
    return 2 * matched / max(len(predicted) + len(true), 1)


def test_instance_labelled_annotations_are_shown_as_their_foreground_and_followed(demo_model, nuclei3d):
    """An annotated slice of nuclei, each its own id (StarDist's labels), is read as objects of one class,
    as `segment` reads such examples: shown as its foreground, each nucleus followed by its track, ids kept.
    On these slices that finds the nuclei better than each id shown in its own colour, as before (on the
    design half of the stack: instance F1 0.48 -> 0.63; BENCHMARKS.md section 18)."""
    stack, truth = nuclei3d[0][10:21], nuclei3d[1][10:21]
    annotation = {5: truth[5]}
    found = {name: {p.index: p for p in demo_model.propagate(stack, annotations=annotation, example_ids=ids)}
             for name, ids in (("auto", "auto"), ("colours", "classes"))}
    assert set().union(*(np.unique(p.labels) for p in found["auto"].values())) <= set(np.unique(truth[5]))
    assert not any(p.ids_are_objects for p in found["auto"].values())  # followed: each id is one object
    f1 = {name: np.mean([_instance_f1(p.labels, truth[z]) for z, p in runs.items()]) for name, runs in found.items()}
    assert f1["auto"] > f1["colours"] + 0.05, f1
    no_tracks = list(demo_model.propagate(stack, annotations=annotation, follow_objects=False, memory=0))
    assert all(p.ids_are_objects and set(np.unique(p.labels)) <= {0, 1} for p in no_tracks)  # the rule splits


def test_propagate_cli_names_one_category_for_instance_labels_and_refuses_a_png_stack(tmp_path, nuclei3d):
    import json

    import tifffile

    from seggpt_plugins.cli import main

    stack, truth = nuclei3d
    tifffile.imwrite(tmp_path / "stack.tif", stack[12:19])
    tifffile.imwrite(tmp_path / "z3.tif", truth[15])
    args = ["propagate", str(tmp_path / "stack.tif"), "--prompt-slice", "3", str(tmp_path / "z3.tif"), "--model",
            "demo", "--device", "cpu", "--output", "instances", "--format", "tiff", "coco"]
    assert main(args + ["--out", str(tmp_path / "objects.png")]) == 2
    assert not list(tmp_path.glob("objects*"))
    assert main(args + ["--out", str(tmp_path / "objects.tif")]) == 0
    coco = json.loads((tmp_path / "objects_coco.json").read_text())
    assert coco["categories"] == [{"id": 1, "name": "object", "supercategory": ""}]
    assert {a["category_id"] for a in coco["annotations"]} == {1} and len(coco["annotations"]) > 7 * 5
    assert main(args + ["--out", str(tmp_path / "colours.tif"), "--example-ids", "classes"]) == 0
    assert len(json.loads((tmp_path / "colours_coco.json").read_text())["categories"]) > 5  # one per id
