"""Instance-labelled examples (issue 30, item 1): objects from the example's ids as classes vs as objects.

    python benchmarks/eval_instance_examples.py [--model demo] [--out benchmarks/results/eval_instance_examples.json]

Real nuclei: stardist's 2D image (seggpt_plugins/demo/samples, 512x512, 183 nuclei, instance labels). One
tile with its instance label mask is the example, the other tiles of the same size are the targets, as a
person with a StarDist or napari label image works. Each target's objects (`--output instances`) are
scored against its true nuclei: object count / true count, and instance F1 at IoU 0.5. Three ways, in the
same run:

- `classes`: the example's ids read as classes (every id a colour; before issue 30);
- `objects`: the ids read as objects (`example_ids="auto"` finds they are): the example shown as its
  foreground, objects split by the object step (ObjectRule with split_touching);
- `otsu`: Otsu's threshold on the target, polarity from the example, then the same object step.

Splits: 128x128 tiles of the left half are the design split (looked at while choosing example_ids.py's
rule), those of the right half the held-out split (reported); the four 256x256 tiles (the issue's case)
are reported as a third set. Every tile of a split is the example once, the split's other tiles its
targets. One intensity range for all tiles (the image's 0.2-99.8 percentiles).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLES = Path(__file__).resolve().parents[1] / "seggpt_plugins" / "demo" / "samples"


def instance_f1(pred: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> float:
    """F1 of objects matched one to one at IoU > threshold (a match above 0.5 is unique)."""
    n_pred, n_true = int(pred.max()), int(truth.max())
    if not n_pred and not n_true:
        return 1.0
    if not n_pred or not n_true:
        return 0.0
    both = np.bincount(pred.ravel().astype(np.int64) * (n_true + 1) + truth.ravel(),
                       minlength=(n_pred + 1) * (n_true + 1)).reshape(n_pred + 1, n_true + 1)
    area_pred, area_true = both.sum(1), both.sum(0)
    inter = both[1:, 1:]
    iou = inter / np.maximum(area_pred[1:, None] + area_true[None, 1:] - inter, 1)
    matches = int(np.count_nonzero(iou > threshold))
    return 2 * matches / (n_pred + n_true)


def tiles_of(image, truth, size, columns=None):
    out = []
    for r in range(0, image.shape[0], size):
        for c in range(0, image.shape[1], size):
            if columns is None or columns[0] <= c < columns[1]:
                out.append((image[r:r + size, c:c + size], _renumbered(truth[r:r + size, c:c + size])))
    return out


def _renumbered(labels):
    from skimage.segmentation import relabel_sequential

    return relabel_sequential(labels)[0]


def example_radius(labels) -> float:
    """The radius of the example's median object (sqrt(area / pi)), in pixels."""
    areas = np.bincount(np.asarray(labels).ravel())[1:]
    return float(np.sqrt(np.median(areas[areas > 0]) / np.pi))


def run_split(model, tiles, intensity_range, radius_from_example=False, radius_scale=1.0):
    from skimage.filters import threshold_otsu

    from seggpt_plugins.images import to_rgb8
    from seggpt_plugins.instances import ObjectRule

    rows = {"classes": [], "objects": [], "otsu": []}
    for k, (example, example_truth) in enumerate(tiles):
        radius = example_radius(example_truth) * radius_scale if radius_from_example else None
        rule = ObjectRule(min_area=16, object_radius=radius)
        split = ObjectRule(min_area=16, split_touching=True, object_radius=radius)
        targets = [t for j, t in enumerate(tiles) if j != k]
        images = [to_rgb8(t[0], intensity_range) for t in targets]
        rgb = to_rgb8(example, intensity_range)
        for mode, example_ids in (("classes", "classes"), ("objects", "auto")):
            predictions = model.segment(images, rgb, example_truth, quality=None, example_ids=example_ids)
            for prediction, (_, truth) in zip(predictions, targets):
                objects = prediction.objects(rule)  # "objects" predictions split touching ones by themselves
                rows[mode].append(_score(objects.map, truth))
        bright = example[example_truth > 0].mean() >= example[example_truth == 0].mean()
        for image, truth in targets:
            threshold = threshold_otsu(image)
            binary = (image > threshold) if bright else (image < threshold)
            rows["otsu"].append(_score(split.find(binary.astype(np.uint8)).map, truth))
    return {mode: _summary(values) for mode, values in rows.items()}


def _score(pred, truth):
    return {"count_ratio": float(pred.max()) / max(1, int(truth.max())), "f1": instance_f1(pred, truth)}


def _summary(rows):
    ratios = np.array([r["count_ratio"] for r in rows])
    f1 = np.array([r["f1"] for r in rows])
    return {"targets": len(rows), "count_ratio_median": round(float(np.median(ratios)), 3),
            "count_ratio_within_0.8_1.25": round(float(np.mean((ratios >= 0.8) & (ratios <= 1.25))), 3),
            "f1_mean": round(float(f1.mean()), 3), "f1_median": round(float(np.median(f1)), 3)}


def main() -> None:
    import tifffile

    from _report import model_and_args, report
    from seggpt_plugins.example_ids import instance_labelled

    def extra(parser):
        parser.add_argument("--sets", nargs="+", choices=("design", "held-out", "256"),
                            default=["design", "held-out", "256"])
        parser.add_argument("--radius-from-example", action="store_true",
                            help="the object step's radius from the example's median object (objects and otsu)")
        parser.add_argument("--radius-scale", type=float, default=1.0, help="with --radius-from-example: times this")

    model, args = model_and_args(__doc__, extra)
    image = tifffile.imread(SAMPLES / "nuclei2d.tif")
    truth = tifffile.imread(SAMPLES / "nuclei2d_mask.tif")
    intensity_range = tuple(float(v) for v in np.percentile(image, (0.2, 99.8)))
    sets = {"design (128 px tiles, left half)": ("design", tiles_of(image, truth, 128, (0, 256))),
            "held-out (128 px tiles, right half)": ("held-out", tiles_of(image, truth, 128, (256, 512))),
            "256 px tiles (the issue's case)": ("256", tiles_of(image, truth, 256))}
    result = {"model": args.model, "device": args.device, "intensity_range": intensity_range,
              "radius_from_example": args.radius_from_example, "radius_scale": args.radius_scale, "sets": {}}
    for name, (short, tiles) in sets.items():
        if short not in args.sets:
            continue
        detected = sum(instance_labelled([t[1]]) for t in tiles)
        result["sets"][name] = {"examples_read_as_objects": f"{detected} of {len(tiles)}",
                                **run_split(model, tiles, intensity_range, args.radius_from_example,
                                                          args.radius_scale)}
    report(result, args.out)


if __name__ == "__main__":
    main()
