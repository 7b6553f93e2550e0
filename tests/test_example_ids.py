"""Instance-labelled examples (issue 30, item 1): an example whose ids number objects is shown as its
foreground, and a target's objects come from the object step, not from the example's colours."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from seggpt_plugins.cli import main
from seggpt_plugins.errors import InputError
from seggpt_plugins.example_ids import foreground, ids_are_objects, instance_labelled


def blobs(centres, radius=5, shape=(64, 64), ids=None):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    mask = np.zeros(shape, np.uint16)
    for k, (y, x) in enumerate(centres):
        mask[(yy - y) ** 2 + (xx - x) ** 2 <= radius ** 2] = (ids or range(1, len(centres) + 1))[k]
    return mask


def test_what_reads_as_objects(nuclei2d):
    _, truth = nuclei2d
    assert instance_labelled([truth]) and instance_labelled([truth[:256, :256]])  # stardist's instance labels
    assert not instance_labelled([(truth > 0).astype(np.uint8)])  # one class
    grid = [(12 + 20 * i, 12 + 20 * j) for i in range(3) for j in range(3)]
    assert instance_labelled([blobs(grid)])  # nine apart, one piece each
    assert not instance_labelled([blobs(grid[:3])])  # three apart: a cat, a dog and a car
    stripes = np.repeat(np.arange(1, 7, dtype=np.uint8), 8)[None].repeat(48, 0)  # six parts, all touching
    assert not instance_labelled([stripes])
    two_pieces = blobs(grid, ids=[1, 1, 2, 2, 3, 3, 4, 4, 5])  # each class in two places
    assert not instance_labelled([two_pieces])
    colour = np.zeros((8, 8, 3), np.uint8)
    assert not instance_labelled([colour])
    assert ids_are_objects([blobs(grid[:3])], "instances") and not ids_are_objects([blobs(grid)], "classes")
    assert foreground(blobs(grid)).max() == 1
    with pytest.raises(InputError, match="example ids must be one of auto, classes, instances"):
        ids_are_objects([truth], "objects")
    with pytest.raises(InputError, match="a colour mask's colours are classes"):
        ids_are_objects([colour], "instances")


def tiles(nuclei2d, tmp_path):
    """The 256x256 quarters of stardist's nuclei image: the first with its instance labels as the example."""
    image, truth = nuclei2d
    scaled = np.clip(image / np.percentile(image, 99.8) * 255, 0, 255).astype(np.uint8)
    quarters = [(slice(r, r + 256), slice(c, c + 256)) for r in (0, 256) for c in (0, 256)]
    Image.fromarray(scaled[quarters[0]]).save(tmp_path / "example.png")
    Image.fromarray(truth[quarters[0]].astype(np.uint16)).save(tmp_path / "example_labels.png")
    (tmp_path / "targets").mkdir()
    counts = {}
    for k, box in enumerate(quarters[1:], 1):
        Image.fromarray(scaled[box]).save(tmp_path / "targets" / f"t{k}.png")
        counts[f"t{k}"] = len(np.unique(truth[box])) - 1
    return counts


def coco_counts(out):
    coco = json.loads((out / "coco.json").read_text())
    names = {i["id"]: i["file_name"].rsplit("/", 1)[-1].split(".")[0] for i in coco["images"]}
    counts = dict.fromkeys(names.values(), 0)
    for a in coco["annotations"]:
        counts[names[a["image_id"]]] += 1
    return counts, {c["id"] for c in coco["categories"]}


def test_instance_labelled_example_gives_one_object_per_nucleus(nuclei2d, tmp_path):
    """The issue's case: three tiles gave 2-3x the nuclei (each painted in several of the example's colours)."""
    truth_counts = tiles(nuclei2d, tmp_path)
    base = ["segment", str(tmp_path / "targets"), "--prompt", str(tmp_path / "example.png"),
            str(tmp_path / "example_labels.png"), "--model", "demo", "--output", "instances", "--format", "coco",
            "--quality", "off"]
    assert main([*base, "--out", str(tmp_path / "auto")]) == 0
    counts, categories = coco_counts(tmp_path / "auto")
    assert categories == {1}  # the nuclei are one class
    assert 0.8 <= sum(counts.values()) / sum(truth_counts.values()) <= 1.25, (counts, truth_counts)  # the goal
    for name, count in counts.items():  # the densest tile (40 nuclei, many touching) loses some to merges
        assert 0.65 <= count / truth_counts[name] <= 1.4, (counts, truth_counts)
    assert main([*base, "--out", str(tmp_path / "classes"), "--example-ids", "classes"]) == 0
    as_classes, categories = coco_counts(tmp_path / "classes")
    # as it was: every id a class, and nuclei painted in several of them are cut into more objects
    assert len(categories) > 10 and sum(as_classes.values()) > sum(counts.values())
