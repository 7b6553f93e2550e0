"""Objects and exports (issue 13): one id per object, identity through a stack, COCO and panoptic files."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image

from seggpt_plugins.errors import InputError
from seggpt_plugins.export import (Category, CocoWriter, PanopticWriter, check_ids_fit, load_label_names,
                                   panoptic_segments, rgb_to_segment_ids, segment_ids_to_rgb)
from seggpt_plugins.instances import find_instances
from seggpt_plugins.tracking import StackTracker, annotated_objects, match_objects, track_stack


def discs(shape, centres, radius):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return [((yy - cy) ** 2 + (xx - cx) ** 2) <= radius ** 2 for cy, cx in centres]


def best_iou(region, instance_map):
    ids, counts = np.unique(instance_map[region], return_counts=True)
    best = ids[np.argmax(counts)]
    found = instance_map == best
    return (region & found).sum() / (region | found).sum(), int(best)


def test_touching_discs_are_separated_into_their_objects():
    truth = discs((100, 170), [(50, 40), (50, 70), (50, 130)], 16)  # the first two overlap
    labels = np.any(truth, axis=0).astype(np.uint8) * 3
    merged = find_instances(labels)
    assert len(merged) == 2  # connected components alone join the touching pair
    split = find_instances(labels, split_touching=True)
    assert len(split) == 3 and {o.class_id for o in split.objects} == {3}
    matches = [best_iou(disc, split.map) for disc in truth]
    assert all(iou > 0.85 for iou, _ in matches) and len({obj for _, obj in matches}) == 3


def test_ids_are_new_objects_not_the_prompt_ids_by_position():
    """Two colours painted on one object part by part: small parts join, ids count objects, classes stay."""
    labels = np.zeros((40, 60), np.uint8)
    labels[5:25, 5:25] = 5
    labels[5:25, 25:28] = 1  # a thin sliver of another colour on the same object
    labels[30:38, 40:58] = 1
    found = find_instances(labels, min_area=80)
    assert len(found) == 2 and sorted(o.id for o in found.objects) == [1, 2]
    first = found.map[10, 10]
    assert found.map[10, 26] == first  # the sliver joined the object it touches
    assert found.class_map()[10, 10] == 5 and found.class_map()[34, 50] == 1
    assert find_instances(labels, min_area=80, classes={5: 1, 1: 1}).class_map()[10, 10] == 1


def test_identity_is_kept_through_a_moving_sequence():
    frames, truth_ids = [], []
    for t in range(10):  # two objects cross the frame in opposite directions; a third appears at t=5
        centres = [(20, 10 + 5 * t), (45, 85 - 5 * t)] + ([(10, 80)] if t >= 5 else [])
        frames.append(np.any(discs((64, 96), centres, 6), axis=0).astype(np.uint8))
    annotated = np.zeros((64, 96), np.uint16)
    top, bottom = discs((64, 96), [(20, 10), (45, 85)], 6)
    annotated[top], annotated[bottom] = 7, 9
    found = {t: find_instances(frames[t], min_area=4) for t in range(1, 10)}
    tracked = track_stack(found, annotated_objects({0: annotated}), 10)
    for t in range(1, 10):
        assert tracked[t].map[20, 10 + 5 * t] == 7 and tracked[t].map[45, 85 - 5 * t] == 9
    newcomer = {int(tracked[t].map[10, 80]) for t in range(5, 10)}
    assert len(newcomer) == 1 and newcomer.isdisjoint({0, 7, 9})  # a new id, kept, never a recycled one
    assert match_objects(annotated, np.zeros_like(annotated)) == {}


def test_the_stack_tracker_holds_only_the_maps_still_to_be_matched():
    """Annotated in the middle, a stack runs both ways: at most one map per run is held, none at the end."""
    frames = [np.any(discs((64, 96), [(32, 10 + 5 * t)], 6), axis=0).astype(np.uint8) for t in range(12)]
    annotated = annotated_objects({5: frames[5] * 3})
    tracker = StackTracker(12, annotated)
    held = []
    for t in tracker.order:
        tracked = tracker.follow(t, find_instances(frames[t], min_area=4))
        assert tracked.map[32, 10 + 5 * t] == 3
        held.append(len(tracker.maps))
    assert max(held) <= 2 and held[-1] == 0 and len(tracker.order) == 11


def test_coco_export_reads_back_with_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools import mask as mask_utils

    labels = np.zeros((50, 80), np.uint8)
    for region, cls in zip(discs((50, 80), [(15, 15), (30, 50), (40, 15)], 8), (1, 2, 1)):
        labels[region] = cls
    objects = find_instances(labels, np.full(labels.shape, 0.75, np.float32), min_area=1)
    writer = CocoWriter(tmp_path / "coco.json", {1: Category(1, "cell"), 2: Category(2, "debris")})
    writer.add("a.png", objects)
    writer.add("b.png", find_instances(np.zeros((10, 10), np.uint8)))
    writer.close()
    coco = COCO(str(tmp_path / "coco.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["cell", "debris"]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[1]))
    assert len(anns) == 3 and not coco.getAnnIds(imgIds=[2])
    rebuilt = np.zeros(labels.shape, np.int64)
    for ann in anns:
        rebuilt[coco.annToMask(ann) > 0] = ann["id"]
        assert ann["area"] == coco.annToMask(ann).sum() and ann["score"] == 0.75
    assert np.array_equal(rebuilt > 0, objects.map > 0)
    assert len(np.unique(rebuilt)) == 4  # three objects and background
    assert mask_utils.decode(anns[0]["segmentation"]).shape == labels.shape


def test_panoptic_round_trip(tmp_path):
    labels = np.zeros((40, 40), np.uint8)
    labels[:10] = 3  # stuff: sky
    for region in discs((40, 40), [(25, 10), (25, 30)], 5):
        labels[region] = 1  # things: two cells
    categories = {1: Category(1, "cell"), 3: Category(3, "sky", thing=False)}
    segments, info = panoptic_segments(labels, find_instances(labels, min_area=1), categories)
    assert sorted(s["category_id"] for s in info) == [1, 1, 3]
    png = segment_ids_to_rgb(segments)
    Image.fromarray(png).save(tmp_path / "p.png")
    assert np.array_equal(rgb_to_segment_ids(np.asarray(Image.open(tmp_path / "p.png"))), segments)
    writer = PanopticWriter(tmp_path / "panoptic.json", categories)
    writer.add("a.png", "p.png", labels.shape, info)
    data = json.loads(writer.close().read_text())
    assert data["annotations"][0]["segments_info"] == info
    assert {c["name"]: c["isthing"] for c in data["categories"]} == {"cell": 1, "sky": 0}


@pytest.mark.parametrize("text, suffix, words", [
    ("{not json", ".json", ["names.json", "not valid JSON"]),
    ('{"0": "background"}', ".json", ["0 is background"]),
    ("1 nucleus\nx cell\n", ".txt", ["line 2", "whole numbers"]),
    ("1 nucleus maybe\n", ".txt", ["line 1", "thing"]),
])
def test_label_name_files_that_do_not_parse_name_the_problem(tmp_path, text, suffix, words):
    path = tmp_path / f"names{suffix}"
    path.write_text(text)
    with pytest.raises(InputError) as error:
        load_label_names(path)
    assert all(w in str(error.value) for w in words)


def test_label_name_files_in_every_format_and_id_limits(tmp_path):
    (tmp_path / "n.json").write_text('{"1": "cell", "3": {"name": "sky", "thing": false}}')
    (tmp_path / "n.txt").write_text("# id name kind\n1 cell\n3 sky stuff\n")
    for path in (tmp_path / "n.json", tmp_path / "n.txt"):
        assert load_label_names(path) == {1: Category(1, "cell"), 3: Category(3, "sky", thing=False)}
    with pytest.raises(InputError, match="16-bit PNG"):
        check_ids_fit("png", 70000, "x.png")
    check_ids_fit("tiff", 70000, "x.tif")


def seggpt(*args):
    return subprocess.run([sys.executable, "-m", "seggpt_plugins.cli", *map(str, args)], capture_output=True,
                          text=True)


@pytest.fixture
def nuclei_tiles(tmp_path, nuclei2d):
    image, truth = nuclei2d
    scaled = np.clip(image / np.percentile(image, 99.8) * 255, 0, 255).astype(np.uint8)
    (tmp_path / "data" / "more").mkdir(parents=True)
    Image.fromarray(scaled[:128, :128]).save(tmp_path / "prompt.png")
    Image.fromarray((truth[:128, :128] > 0).astype(np.uint8)).save(tmp_path / "prompt_mask.png")
    Image.fromarray(scaled[128:256, 128:256]).save(tmp_path / "data" / "a.png")
    Image.fromarray(scaled[256:384, 256:384]).save(tmp_path / "data" / "more" / "b.png")
    (tmp_path / "names.txt").write_text("1 nucleus\n")
    return tmp_path


def test_cli_instances_coco_and_review_for_a_folder(nuclei_tiles):
    from pycocotools.coco import COCO

    out = nuclei_tiles / "out"
    result = seggpt("segment", "--model", "demo", "--prompt", nuclei_tiles / "prompt.png",
                    nuclei_tiles / "prompt_mask.png", nuclei_tiles / "data", "--out", out, "--output", "instances",
                    "--format", "png", "coco", "--label-names", nuclei_tiles / "names.txt", "--split-touching",
                    "--review")
    assert result.returncode == 0, result.stderr
    maps = {name: np.asarray(Image.open(out / name)) for name in ("a_instances.png", "more/b_instances.png")}
    coco = COCO(str(out / "coco.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["nucleus"]
    for image in coco.loadImgs(coco.getImgIds()):
        instance_map = maps["a_instances.png" if image["file_name"].endswith("a.png") else "more/b_instances.png"]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert len(anns) == len(np.unique(instance_map)) - 1 > 3  # several nuclei, one annotation each
        union = np.zeros(instance_map.shape, bool)
        for ann in anns:
            union |= coco.annToMask(ann) > 0
        assert np.array_equal(union, instance_map > 0)
    rows = [json.loads(line) for line in (out / "review.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["model"] == "demo" and r["instances"] > 3 for r in rows)
    assert all(r["confidence_is"] == "predicted IoU" and 0 < r["confidence"] < 1 for r in rows)
    assert rows[0]["confidence"] <= rows[1]["confidence"]  # worst first
    again = seggpt("segment", "--model", "demo", "--prompt", nuclei_tiles / "prompt.png",
                   nuclei_tiles / "prompt_mask.png", nuclei_tiles / "data", "--out", out, "--output", "instances",
                   "--skip-existing")
    assert again.returncode == 0 and "skipping 2" in again.stderr


@pytest.mark.parametrize("extra, words", [
    (["--output", "instances", "--seg-type", "semantic"], ["--output instances", "semantic"]),
    (["--format", "coco"], ["--format coco", "--output instances"]),
    (["--output", "instances", "--format", "coco", "--label-names", "{names}"], ["label id(s) [1]"]),
])
def test_cli_export_requests_that_cannot_work_fail_before_the_model(nuclei_tiles, extra, words):
    names = nuclei_tiles / "other_names.txt"
    names.write_text("2 cell\n")
    extra = [str(names) if e == "{names}" else e for e in extra]
    result = seggpt("segment", "--model", "demo", "--prompt", nuclei_tiles / "prompt.png",
                    nuclei_tiles / "prompt_mask.png", nuclei_tiles / "data" / "a.png", "--out", nuclei_tiles / "o",
                    *extra)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert all(w in result.stderr for w in words) and "loaded SegGPT" not in result.stderr


def test_cli_propagate_keeps_object_ids_through_the_stack(tmp_path, nuclei3d):
    from pycocotools.coco import COCO

    stack, truth = nuclei3d
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    tifffile.imwrite(tmp_path / "z15.tif", truth[15])
    result = seggpt("propagate", tmp_path / "stack.tif", "--prompt-slice", 15, tmp_path / "z15.tif",
                    "--out", tmp_path / "objects.tif", "--model", "demo", "--output", "instances",
                    "--format", "tiff", "coco", "--memory", 2)
    assert result.returncode == 0, result.stderr
    objects = tifffile.imread(tmp_path / "objects.tif")
    assert objects.shape == stack.shape
    assert np.array_equal(objects[15], truth[15])  # the annotated slice keeps the user's own object ids
    for z in (14, 16):  # next to it, most of its objects are found again under their own ids
        kept = [i for i in np.unique(truth[15]) if i and np.any(objects[z][truth[15] == i] == i)]
        assert len(kept) >= 0.5 * (len(np.unique(truth[15])) - 1)
    coco = COCO(str(tmp_path / "objects_coco.json"))
    assert len(coco.getImgIds()) == stack.shape[0]


# ------------------------------------------------------------------------------------------ issue 29, item 6


def disc_scene(path, centres, ids=None, colours=None, size=96, radius=11):
    """A dark image with bright discs, saved as `path`.png, and its mask as `path`_mask.png: label ids (`ids`,
    default all 1) or, with `colours`, an RGB colour mask."""
    image = np.full((size, size, 3), 30, np.uint8)
    mask = np.zeros((size, size, 3) if colours else (size, size), np.uint16 if max(ids or [1]) > 255 else np.uint8)
    for k, disc in enumerate(discs((size, size), centres, radius)):
        image[disc] = (230, 200, 60)
        mask[disc] = colours[k] if colours else (ids[k] if ids else 1)
    Image.fromarray(image).save(f"{path}.png")
    Image.fromarray(mask).save(f"{path}_mask.png")
    return f"{path}.png", f"{path}_mask.png"


def segment_run(tmp_path, example, out, *extra, targets=None):
    from seggpt_plugins.cli import main

    targets = targets or [disc_scene(tmp_path / "target", [(25, 65), (70, 28)])[0]]
    return main(["segment", *map(str, targets), "--prompt", *example, "--out", str(tmp_path / out), "--model",
                 "demo", "--device", "cpu", *map(str, extra)])


def read_map(path):
    return tifffile.imread(path) if path.suffix == ".tif" else np.asarray(Image.open(path))


def test_the_maps_of_a_segment_run_share_the_dtype_the_readme_gives(tmp_path):
    from pathlib import Path

    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert ("every map of one run has one dtype, the annotated frames of `propagate` included: labels the smallest "
            "that holds the examples' largest id (uint8 up to 255, else uint16), instance and panoptic segment ids "
            "uint16") in readme
    targets = [disc_scene(tmp_path / f"t{k}", [(25, 20 + 20 * k), (70, 70 - 20 * k)])[0] for k in range(2)]
    runs = [("labels", [1, 1], ["png", "tiff"], np.uint8), ("labels", [1, 300], ["png", "tiff"], np.uint16),
            ("instances", [1, 1], ["png", "tiff"], np.uint16), ("panoptic", [1, 1], ["tiff"], np.uint16)]
    for output, ids, formats, dtype in runs:
        example = disc_scene(tmp_path / f"ex{ids[-1]}", [(30, 30), (65, 70)], ids=ids)
        out = f"{output}{ids[-1]}"
        assert segment_run(tmp_path, example, out, "--output", output, "--format", *formats, targets=targets) == 0
        maps = sorted(p for p in (tmp_path / out).iterdir() if p.suffix in (".png", ".tif"))
        assert len(maps) == 2 * len(formats)
        assert {read_map(p).dtype for p in maps} == {np.dtype(dtype)}, (output, ids)


def test_an_exporter_writes_every_map_in_the_runs_dtype(tmp_path):
    """Objects uint16 whatever dtype a map comes in; ids past 65535 (in a TIFF) widen the run, with a warning."""
    from seggpt_plugins.export import ExportOptions, Exporter
    from seggpt_plugins.instances import Instances
    from seggpt_plugins.io import OutputSet
    from seggpt_plugins.prediction import Prediction

    exporter = Exporter(tmp_path, ["a", "b", "c"], ExportOptions(output="instances", formats=("tiff",)))
    outputs = OutputSet(exporter.paths())
    with outputs:
        exporter.open(outputs, {}, top_id=1)
        for i, (top, dtype) in enumerate([(2, np.uint8), (70000, np.uint32), (3, np.uint16)]):
            objects = np.zeros((4, 4), dtype)
            objects[0, 0], objects[3, 3] = 1, top
            prediction = Prediction(labels=(objects > 0).astype(np.uint8), scores=np.ones((4, 4), np.float32))
            if top > 65535:
                with pytest.warns(UserWarning, match="ids up to 70000 need uint32"):
                    exporter.write(i, prediction, f"{i}.png", Instances.of_map(objects))
            else:
                exporter.write(i, prediction, f"{i}.png", Instances.of_map(objects))
        exporter.close()
    assert [tifffile.imread(tmp_path / f"{s}_instances.tif").dtype for s in "abc"] == [np.uint16, np.uint32,
                                                                                      np.uint32]


def test_segment_overlay_of_instances_colours_each_object_apart(tmp_path):
    example = disc_scene(tmp_path / "ex", [(30, 30), (65, 70)])  # two objects, one class
    assert segment_run(tmp_path, example, "out", "--output", "instances", "--overlay") == 0
    objects = np.asarray(Image.open(tmp_path / "out" / "target_instances.png"))
    overlay = np.asarray(Image.open(tmp_path / "out" / "target_overlay.png"))
    assert objects[25, 65] and objects[70, 28] and objects[25, 65] != objects[70, 28]  # the two discs found
    assert not np.array_equal(overlay[25, 65], overlay[70, 28])
    assert segment_run(tmp_path, example, "classes", "--overlay") == 0  # labels: one class, one colour
    overlay = np.asarray(Image.open(tmp_path / "classes" / "target_overlay.png"))
    assert np.array_equal(overlay[25, 65], overlay[70, 28])


def test_default_category_names_say_where_each_class_came_from():
    from seggpt_plugins.export import categories_for

    assert categories_for([0, 1], None) == {1: Category(1, "label 1")}
    assert [c.name for c in categories_for([2, 255], None).values()] == ["label 2", "label 255"]
    assert [c.name for c in categories_for([1, 2], None, {1: (0, 255, 0), 2: (255, 0, 0)}).values()] == [
        "#00ff00", "#ff0000"]
    assert categories_for([1], None, objects=True) == {1: Category(1, "object")}
    names = {1: Category(1, "nucleus"), 2: Category(2, "debris")}
    assert categories_for([1, 2], names, {1: (0, 255, 0), 2: (255, 0, 0)}, objects=True) == names  # --label-names wins


@pytest.mark.parametrize("engine", [[], ["--engine", "local"]])
def test_coco_categories_are_named_after_the_examples(tmp_path, engine):
    centres = [(15, 15), (15, 50), (15, 80), (50, 20), (80, 20), (80, 75)]
    examples = {"binary": ({"ids": [255, 255]}, ["label 255"]),
                "classes": ({"ids": [1, 2]}, ["label 1", "label 2"]),
                "colours": ({"colours": [(255, 0, 0), (0, 255, 0)]}, ["#00ff00", "#ff0000"]),
                "objects": ({"ids": list(range(1, 7))}, ["object"])}
    for name, (kind, expected) in examples.items():
        example = disc_scene(tmp_path / name, centres if name == "objects" else centres[:2], radius=6, **kind)
        assert segment_run(tmp_path, example, name, "--output", "instances", "--format", "coco", *engine) == 0
        coco = json.loads((tmp_path / name / "coco.json").read_text())
        assert [c["name"] for c in coco["categories"]] == expected, name
