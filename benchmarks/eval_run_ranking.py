"""Does the confidence rank a run's targets? (issue 30, item 5: the 16-tile protocol)

    cd benchmarks && OMP_NUM_THREADS=1 python eval_run_ranking.py --out results/eval_run_ranking.json
    (the same with `--quality full --out results/eval_run_ranking_full.json`: the full estimate; with `--stack`:
    the 3D stack's runs, below)

A person reviews one run at a time. Stardist's 2D nuclei image (seggpt_plugins/demo/samples, 512x512) is cut
into 16 tiles of 128 px; each tile in turn is the example (its foreground mask) and the other 15 are the
targets: 16 runs. Per run:
- per image: Spearman's rho between each target's confidence (`Prediction.confidence`, the estimate that
  --quality names: fast, the default, or full, which reads the mirrored target too) and its true foreground IoU;
- per object: Spearman's rho between each predicted object's confidence (`Prediction.objects()`, its
  predicted IoU) and its IoU with the true nucleus it overlaps best (quality_fit.object_ious), over all
  the run's objects.
Figures: the median over runs, and the pooled rho over a split's pairs (which mixes runs; the issue measured
0.36 per run and 0.62 pooled over all 16 runs, commit 9c16bf0).
Also per image, two candidates read from the objects (not what ships; a question the per-object score's
0.6 raised): the area-weighted mean of a target's object confidences ("objects"), and the mean of that and
the image's confidence ("image and objects"); a target without objects keeps its image confidence.

Splits: the runs whose example lies in the left half of the image (8) are the design split, those in the
right half (8) are held out; the targets of every run are the other 15 tiles, so the splits share targets,
not examples. One intensity scale for all tiles (eval_quality.scaled: the image's percentiles).

--stack: stardist's 3D stack (31 slices of 61x57) the same way, each slice in turn the example and the other
30 the targets (31 runs, one scale for the stack); no estimate was chosen on these runs: all are held out.
"""

from __future__ import annotations

import numpy as np
from eval_quality import SAMPLES, scaled

TILE = 128


def run(model, tiles, k: int, quality: str = "fast") -> dict:
    """(the run with tile k as the example, summed up; its (confidence, IoU) pairs of targets and of objects)."""
    from scipy.stats import spearmanr

    from seggpt_plugins.quality import agreement
    from seggpt_plugins.quality_fit import object_ious

    example, example_truth = tiles[k]
    targets = [t for j, t in enumerate(tiles) if j != k]
    predictions = model.segment([t[0] for t in targets], example, (example_truth > 0).astype(np.uint8),
                                seg_type="semantic", quality=quality)
    iou = [float(agreement(p.labels != 0, truth > 0)) for p, (_, truth) in zip(predictions, targets)]
    confidence = [float(p.confidence) for p in predictions]
    object_iou, object_confidence, from_objects = [], [], []
    for p, (_, truth) in zip(predictions, targets):
        found = p.objects()
        matched = object_ious(found.map, truth)
        object_iou += [float(matched[o.id]) for o in found.objects]
        object_confidence += [float(o.confidence) for o in found.objects]
        areas = [o.area for o in found.objects]
        from_objects.append(float(np.average([o.confidence for o in found.objects], weights=areas))
                            if sum(areas) else float(p.confidence))
    both = [(a + b) / 2 for a, b in zip(confidence, from_objects)]
    row = {"example": k, "image_spearman": round(float(spearmanr(confidence, iou)[0]), 3),
           "object_spearman": round(float(spearmanr(object_confidence, object_iou)[0]), 3),
           "image_from_objects_spearman": round(float(spearmanr(from_objects, iou)[0]), 3),
           "image_and_objects_spearman": round(float(spearmanr(both, iou)[0]), 3),
           "objects": len(object_iou), "iou": np.round(iou, 3).tolist(), "confidence": np.round(confidence, 3).tolist()}
    return row, (confidence, iou, object_confidence, object_iou)


def summary(results: list) -> dict:
    from scipy.stats import spearmanr

    runs, pairs = [r for r, _ in results], [p for _, p in results]

    def pooled(score: int, truth: int) -> float:  # Spearman over every run's pairs together
        scores = [v for p in pairs for v in p[score]]
        truths = [v for p in pairs for v in p[truth]]
        return round(float(spearmanr(scores, truths)[0]), 3)

    return {"runs": len(runs), "mean_iou": round(float(np.mean([np.mean(r["iou"]) for r in runs])), 3),
            "image_median_spearman": round(float(np.median([r["image_spearman"] for r in runs])), 3),
            "image_pooled_spearman": pooled(0, 1),
            "object_median_spearman": round(float(np.median([r["object_spearman"] for r in runs])), 3),
            "object_pooled_spearman": pooled(2, 3),
            "image_from_objects_median_spearman": round(float(np.median([r["image_from_objects_spearman"]
                                                                         for r in runs])), 3),
            "image_and_objects_median_spearman": round(float(np.median([r["image_and_objects_spearman"]
                                                                        for r in runs])), 3),
            "examples": [r["example"] for r in runs]}


def main() -> None:
    import warnings

    import tifffile

    from _report import model_and_args, report

    warnings.simplefilter("ignore")
    def options(parser) -> None:
        parser.add_argument("--quality", choices=["fast", "full"], default="fast",
                            help="the per-image estimate (default: fast)")
        parser.add_argument("--stack", action="store_true", help="the 3D stack's slices, not the 2D image's tiles")

    model, args = model_and_args(__doc__, options)
    common = {"model": args.model, "device": args.device, "foreground_margin": model.foreground_margin,
              "quality": args.quality}
    if args.stack:
        stack, truth = scaled(tifffile.imread(SAMPLES / "nuclei3d.tif")), tifffile.imread(SAMPLES / "nuclei3d_mask.tif")
        results = [run(model, list(zip(stack, truth)), z, args.quality) for z in range(len(stack))]
        report({**common, "set": "stardist 3D stack: each slice the example of the other 30",
                "splits": {"all 31 runs (held out: none chose the estimate)": summary(results)},
                "runs": [r for r, _ in results]}, args.out)
        return
    image, truth = scaled(tifffile.imread(SAMPLES / "nuclei2d.tif")), tifffile.imread(SAMPLES / "nuclei2d_mask.tif")
    boxes = [(r, c) for r in range(0, 512, TILE) for c in range(0, 512, TILE)]
    tiles = [(image[r:r + TILE, c:c + TILE], truth[r:r + TILE, c:c + TILE]) for r, c in boxes]
    results = [run(model, tiles, k, args.quality) for k in range(len(tiles))]
    left = [r for r, (_, c) in zip(results, boxes) if c < 256]
    right = [r for r, (_, c) in zip(results, boxes) if c >= 256]
    report({**common, "set": "stardist 2D image: 16 tiles of 128 px, each the example of the other 15",
            "splits": {"design (examples in the left half)": summary(left),
                       "held-out (examples in the right half)": summary(right),
                       "all 16 runs (the issue's figure)": summary(results)},
            "runs": [r for r, _ in results]}, args.out)


if __name__ == "__main__":
    main()
