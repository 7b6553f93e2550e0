"""Does "worst first" put an instance run's worst images first? (issue 33, item 2: a series of tiles)

    python benchmarks/eval_review_ranking.py [--model demo] [--out benchmarks/results/eval_review_ranking.json]

A person reviews one run at a time: a series of tiles of stardist's 2D nuclei (seggpt_plugins/demo/samples,
512x512, instance labels), one tile annotated with its instance labels (each nucleus its own id: the
examples' ids are read as objects), the others proposed with their objects. The issue's case: four 256 px
tiles, the worst (16 of 40 nuclei matched) ranked last of its run.

Per run, the targets' instance F1 at IoU 0.5 (the objects of `Prediction.objects`) against their image
confidence, two ways, in the same run:
- `with giant objects`: the confidence as shipped (quality.gross_error with its giant-objects term:
  images whose painted pixels lie mostly in parts over GIANT_OBJECT times the examples' object area, i.e.
  objects run together, rank lower);
- `without`: the same confidence with that term divided out (as before).
Figures: the median over runs of Spearman's rho (confidence vs F1), and the share of runs whose worst
target (by F1) is in the run's lowest-confidence third.

Splits: the 128 px tiles of the left half (every tile the example once, the other seven the targets) chose
GIANT_OBJECT and GIANT_ALLOWED (the largest allowance that kept the design ranking); the right half's are
held out; the four 256 px tiles are the issue's case. One intensity range for all tiles (the image's
0.2-99.8 percentiles).
"""

from __future__ import annotations

import math

import numpy as np
from eval_instance_examples import SAMPLES, instance_f1, tiles_of


def run_split(model, tiles, intensity_range) -> dict:
    from scipy.stats import spearmanr

    from seggpt_plugins.images import to_rgb8
    from seggpt_plugins.instances import ObjectRule
    from seggpt_plugins.quality import GIANT_ALLOWED

    rule = ObjectRule(min_area=16)
    rhos = {"with giant objects": [], "without": []}
    worst_found = {name: [] for name in rhos}
    runs = []
    for k, (example, example_truth) in enumerate(tiles):
        targets = [t for j, t in enumerate(tiles) if j != k]
        predictions = model.segment([to_rgb8(t[0], intensity_range) for t in targets],
                                    to_rgb8(example, intensity_range), example_truth, quality="fast")
        f1 = np.array([instance_f1(p.objects(rule).map, truth) for p, (_, truth) in zip(predictions, targets)])
        giant = np.array([p.quality_features["giant_objects"] for p in predictions])
        shipped = np.array([p.quality for p in predictions])
        scores = {"with giant objects": shipped,
                  "without": shipped / np.exp(-2 * np.maximum(0.0, giant - GIANT_ALLOWED))}
        third = math.ceil(len(targets) / 3)
        for name, score in scores.items():
            rhos[name].append(float(spearmanr(score, f1)[0]))
            worst_found[name].append(int(np.argmin(f1)) in np.argsort(score, kind="stable")[:third])
        runs.append({"example": k, "f1": np.round(f1, 3).tolist(), "giant_objects": np.round(giant, 3).tolist(),
                     "confidence": np.round(shipped, 3).tolist()})
    return {"runs": len(tiles), "targets_per_run": len(tiles) - 1,
            **{name: {"median_spearman": round(float(np.median(rhos[name])), 3),
                      "worst_in_lowest_third": f"{sum(worst_found[name])} of {len(tiles)}"} for name in rhos},
            "per_run": runs}


def main() -> None:
    import warnings

    import tifffile

    from _report import model_and_args, report

    warnings.simplefilter("ignore")
    model, args = model_and_args(__doc__)
    image = tifffile.imread(SAMPLES / "nuclei2d.tif")
    truth = tifffile.imread(SAMPLES / "nuclei2d_mask.tif")
    intensity_range = tuple(float(v) for v in np.percentile(image, (0.2, 99.8)))
    sets = {"design (128 px tiles, left half)": tiles_of(image, truth, 128, (0, 256)),
            "held-out (128 px tiles, right half)": tiles_of(image, truth, 128, (256, 512)),
            "256 px tiles (the issue's case)": tiles_of(image, truth, 256)}
    report({"model": args.model, "device": args.device,
            "sets": {name: run_split(model, tiles, intensity_range) for name, tiles in sets.items()}}, args.out)


if __name__ == "__main__":
    main()
