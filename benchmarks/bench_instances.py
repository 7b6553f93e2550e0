"""Objects on real nuclei: instance F1 and matched IoU of the demo model against Otsu, and the split cost.

    python benchmarks/bench_instances.py [--model demo] [--out benchmarks/results/bench_instances_cpu.json]

Data: stardist's 2D DSB-2018 image with its instance ground truth (ships in seggpt_plugins/demo/samples),
cut into 16 tiles of 128x128 as in eval_demo.py. Each tile in turn is the prompt (its foreground mask)
and the other 15 are targets. Both sides use the same object step (`instances.find_instances`,
connected parts, watershed split of touching objects, `--min-area` pixels):
- model: the demo model's foreground;
- baseline: Otsu's threshold on the target tile (polarity from the prompt), then the same object step.
Predicted objects are matched to ground-truth nuclei one to one (Hungarian on IoU): F1 counts matches
with IoU >= 0.5; "matched IoU" is the mean IoU of those matches. The split cost is the time of the
object step per megapixel, on the full 512x512 prediction and on a 4096x4096 mosaic of it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _report import report

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "seggpt_plugins" / "demo" / "samples"
TILE = 128


def matches(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int, list[float]]:
    """(true positives at IoU >= 0.5, predicted objects, true objects, IoUs of the matches)."""
    from scipy.optimize import linear_sum_assignment

    pred_ids = [i for i in np.unique(pred) if i]
    true_ids = [i for i in np.unique(truth) if i]
    if not pred_ids or not true_ids:
        return 0, len(pred_ids), len(true_ids), []
    iou = np.zeros((len(true_ids), len(pred_ids)))
    for a, t in enumerate(true_ids):
        inside = truth == t
        for b, p in enumerate(np.unique(pred[inside])):
            if p == 0:
                continue
            region = pred == p
            iou[a, pred_ids.index(p)] = (inside & region).sum() / (inside | region).sum()
    rows, cols = linear_sum_assignment(-iou)
    good = [iou[r, c] for r, c in zip(rows, cols) if iou[r, c] >= 0.5]
    return len(good), len(pred_ids), len(true_ids), good


def summary(counts) -> dict:
    tp = sum(c[0] for c in counts)
    predicted = sum(c[1] for c in counts)
    true = sum(c[2] for c in counts)
    ious = [v for c in counts for v in c[3]]
    precision = tp / predicted if predicted else 0.0
    recall = tp / true if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1_at_0.5": round(f1, 4), "precision": round(precision, 4), "recall": round(recall, 4),
            "matched_iou": round(float(np.mean(ious)), 4) if ious else 0.0, "true_objects": true,
            "predicted_objects": predicted}


def main() -> None:
    from skimage.filters import threshold_otsu
    from tifffile import imread

    from seggpt_plugins import SegGPT
    from seggpt_plugins.instances import find_instances

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-area", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    image, truth = imread(SAMPLES / "nuclei2d.tif"), imread(SAMPLES / "nuclei2d_mask.tif")
    corners = [(r, c) for r in range(0, image.shape[0], TILE) for c in range(0, image.shape[1], TILE)]
    tiles = [image[r:r + TILE, c:c + TILE] for r, c in corners]
    truths = [truth[r:r + TILE, c:c + TILE] for r, c in corners]
    intensity = (float(np.percentile(image, 0.5)), float(np.percentile(image, 99.8)))
    model = SegGPT.from_pretrained(args.model, device=args.device)
    objects = lambda labels: find_instances(labels, min_area=args.min_area, split_touching=True).map  # noqa: E731

    sides = {"model": [], "otsu": [], "model_no_split": []}
    for k in range(len(tiles)):
        prompt_mask = (truths[k] > 0).astype(np.uint8)
        targets = [j for j in range(len(tiles)) if j != k]
        preds = model.segment([tiles[j] for j in targets], tiles[k], prompt_mask, intensity_range=intensity)
        bright = tiles[k][prompt_mask > 0].mean() >= tiles[k][prompt_mask == 0].mean()
        for j, pred in zip(targets, preds):
            sides["model"].append(matches(objects(pred.labels > 0), truths[j]))
            sides["model_no_split"].append(matches(find_instances(pred.labels > 0, min_area=args.min_area).map,
                                                   truths[j]))
            threshold = threshold_otsu(tiles[j])
            otsu = tiles[j] > threshold if bright else tiles[j] < threshold
            sides["otsu"].append(matches(objects(otsu), truths[j]))

    # split cost: the full image's prediction (from tile 0 as prompt), and a 4096x4096 mosaic of it
    full = model.segment(image, tiles[0], (truths[0] > 0).astype(np.uint8), intensity_range=intensity)[0].labels > 0
    costs = {}
    for name, labels in {"512x512": full, "4096x4096": np.tile(full, (8, 8))}.items():
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            find_instances(labels, min_area=args.min_area, split_touching=True)
            best = min(best, time.perf_counter() - started)
        costs[name] = {"ms_per_megapixel": round(1000 * best / (labels.size / 1e6), 1),
                       "objects": len(find_instances(labels, min_area=args.min_area, split_touching=True))}
    report({"data": "stardist nuclei2d, 16 tiles of 128, each tile the prompt of the other 15 (240 targets)",
            "model": args.model, "device": args.device, "min_area": args.min_area,
            **{side: summary(counts) for side, counts in sides.items()}, "split_cost": costs}, args.out)


if __name__ == "__main__":
    main()
