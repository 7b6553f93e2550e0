"""Cutting large painted pieces by the example's object size: tried for issue 30 item 1, not shipped.

    cd benchmarks && OMP_NUM_THREADS=2 python eval_instance_split_area.py [--sets design held-out 256 160 stack]
        [--out results/eval_instance_split_area.json]

Objects painted from an instance-labelled example come from the foreground, split by the object step
(instances.ObjectRule with split_touching: a watershed at the painted parts' median radius). Where most parts
are clumps of touching nuclei the watershed leaves them whole and the count falls under 0.8x the truth
(BENCHMARKS.md section 13). The example says how large one object is, so this script tries, after the object
step: every piece of at least FACTOR times the example's median object area is cut into round(area / that
area) objects by k-means on its pixels' coordinates. The example's object area is the median over all its
objects ("all") or over those that do not touch its border ("inner": an object cut by the tile's edge does not
show an object's size; all of them when every object touches it).

Sets, each tile in turn the example (its instance labels, `example_ids="auto"`) and the set's other tiles the
targets, the demo model on this machine's CPU; per target, objects / true nuclei and instance F1 at IoU 0.5,
and Otsu's threshold plus the same steps in the same run (as eval_instance_examples.py):
- design: stardist's 2D image, 128 px tiles of the left half (where the factors were chosen);
- held-out: 128 px tiles of the right half; 256: the four 256 px tiles (section 13's report sets);
- 160: 160 px tiles of the image's top-left 480x480 (a tiling no rule had been tried on);
- stack: stardist's 3D stack, each slice with its nuclei the example, the other slices the targets (only the
  pairs whose example is read as objects count).
"""

from __future__ import annotations

import numpy as np

from eval_demo import otsu_mask
from eval_instance_examples import SAMPLES, _renumbered, instance_f1, tiles_of

FACTORS = (2.5, 3.0, 3.5, 4.0)


def object_area(labels: np.ndarray, inner: bool) -> float:
    """The median area of an instance label image's objects (with `inner`, of those off its border)."""
    from skimage.segmentation import clear_border

    areas = np.bincount(np.asarray(labels).ravel())[1:]
    if inner:
        off_border = np.bincount(clear_border(np.asarray(labels)).ravel())[1:]
        if np.any(off_border > 0):
            areas = off_border
    return float(np.median(areas[areas > 0]))


def cut_large(objects: np.ndarray, area: float, factor: float) -> np.ndarray:
    """Pieces of at least factor x area cut into round(piece area / area) by k-means on their pixels."""
    from scipy import ndimage
    from scipy.cluster.vq import kmeans2
    from skimage.segmentation import relabel_sequential

    out, next_id = objects.copy(), int(objects.max()) + 1
    areas = np.bincount(objects.ravel())
    for object_id, box in enumerate(ndimage.find_objects(objects), 1):
        if box is None or areas[object_id] < factor * area:
            continue
        pieces = max(2, int(round(areas[object_id] / area)))
        pixels = np.argwhere(objects[box] == object_id)
        _, nearest = kmeans2(pixels.astype(np.float64), pieces, minit="++", seed=0)
        region = out[box]
        for k in range(1, pieces):
            chosen = pixels[nearest == k]
            region[chosen[:, 0], chosen[:, 1]] = next_id
            next_id += 1
    return relabel_sequential(out)[0]


def predictions(model, tiles, intensity_range):
    """Per (example, target) pair: the objects of the painted labels and of Otsu's mask by the shipped object step
    (ObjectRule with split_touching), the truth and the example's index."""
    from seggpt_plugins.images import to_rgb8
    from seggpt_plugins.instances import ObjectRule

    rule = ObjectRule(min_area=16, split_touching=True)
    rows = []
    for k, (example, example_truth) in enumerate(tiles):
        targets = [t for j, t in enumerate(tiles) if j != k]
        found = model.segment([to_rgb8(t[0], intensity_range) for t in targets], to_rgb8(example, intensity_range),
                              example_truth, quality=None, example_ids="auto")
        for prediction, (image, truth) in zip(found, targets):
            if not prediction.ids_are_objects:
                continue
            otsu = otsu_mask(image, example, example_truth).astype(np.uint8)
            rows.append({"labels": rule.find(prediction.labels).map, "otsu": rule.find(otsu).map, "truth": truth,
                         "example": k})
    return rows


def summary(rows, key, areas=None, factor=None) -> dict:
    """Objects / true nuclei and instance F1 of `key`'s objects ("labels" or "otsu"), cut by `areas` x `factor`."""
    ratios, f1 = [], []
    for row in rows:
        objects = row[key]
        if areas is not None:
            objects = cut_large(objects, areas[row["example"]], factor)
        ratios.append(objects.max() / max(1, int(row["truth"].max())))
        f1.append(instance_f1(objects, row["truth"]))
    ratios = np.array(ratios)
    return {"count_ratio_median": round(float(np.median(ratios)), 3),
            "within_0.8_1.25": round(float(np.mean((ratios >= 0.8) & (ratios <= 1.25))), 3),
            "under_0.8": int(np.sum(ratios < 0.8)), "over_1.25": int(np.sum(ratios > 1.25)),
            "f1_mean": round(float(np.mean(f1)), 3)}


def main() -> None:
    import tifffile

    from _report import model_and_args, report

    def extra(parser):
        parser.add_argument("--sets", nargs="+", choices=("design", "held-out", "256", "160", "stack"),
                            default=["design", "held-out", "256", "160", "stack"])

    model, args = model_and_args(__doc__, extra)
    image, truth = tifffile.imread(SAMPLES / "nuclei2d.tif"), tifffile.imread(SAMPLES / "nuclei2d_mask.tif")
    stack, stack_truth = tifffile.imread(SAMPLES / "nuclei3d.tif"), tifffile.imread(SAMPLES / "nuclei3d_mask.tif")
    image_range = tuple(float(v) for v in np.percentile(image, (0.2, 99.8)))
    sets = {"design": (tiles_of(image, truth, 128, (0, 256)), image_range),
            "held-out": (tiles_of(image, truth, 128, (256, 512)), image_range),
            "256": (tiles_of(image, truth, 256), image_range),
            "160": (tiles_of(image[:480, :480], truth[:480, :480], 160), image_range),
            "stack": ([(stack[z], _renumbered(stack_truth[z])) for z in range(len(stack))],
                      tuple(float(v) for v in np.percentile(stack, (0.2, 99.8))))}
    result = {"factors": FACTORS, "sets": {}}
    for name in args.sets:
        tiles, intensity_range = sets[name]
        rows = predictions(model, tiles, intensity_range)
        out = {"pairs": len(rows), "shipped": {key: summary(rows, key) for key in ("labels", "otsu")}}
        for reading in ("all", "inner"):
            areas = [object_area(labels, reading == "inner") for _, labels in tiles]
            for factor in FACTORS:
                out[f"cut {reading} x{factor:g}"] = {key: summary(rows, key, areas, factor)
                                                     for key in ("labels", "otsu")}
        result["sets"][name] = out
        print(name, out, flush=True)
    report(result, args.out)


if __name__ == "__main__":
    main()
