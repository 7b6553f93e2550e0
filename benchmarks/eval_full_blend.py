"""How the "full" estimate's blend was chosen (issue 30, item 5): blends ranked on the design runs

    cd benchmarks && OMP_NUM_THREADS=2 python eval_full_blend.py --out results/eval_full_blend.json

The 16-tile protocol of eval_run_ranking.py (stardist's 2D image, each 128 px tile in turn the example of
the other 15; design runs: examples in the left half), every candidate feature of every target read once
(quality_fit.reading_every_candidate). Blends of snap_foreground, boundary_edges, texture_agreement and
flip_agreement over a small grid of weights, standardised on the generated tasks the estimate is fitted on
(FIT_SEED, 300 tasks, as `seggpt fit-quality`), are ranked by their median per-run Spearman on the design runs
only; the held-out runs are not read here (eval_run_ranking.py --quality full reports them).
"""

from __future__ import annotations

import itertools

import numpy as np
from eval_quality import SAMPLES, scaled

TILE = 128
NAMES = ("snap_foreground", "boundary_edges", "texture_agreement", "flip_agreement")
GRID = ((0, .5, 1), (1,), (0, .5, 1), (0, .25, .5, 1, 1.5, 2, 3))  # weights per name, edges fixed at 1


def design_runs(model) -> list[tuple[np.ndarray, list[float]]]:
    """(features (targets, NAMES), true foreground IoUs) of each design run."""
    import tifffile

    from seggpt_plugins.quality import agreement
    from seggpt_plugins.quality_fit import reading_every_candidate

    image, truth = scaled(tifffile.imread(SAMPLES / "nuclei2d.tif")), tifffile.imread(SAMPLES / "nuclei2d_mask.tif")
    boxes = [(r, c) for r in range(0, 512, TILE) for c in range(0, 512, TILE)]
    tiles = [(image[r:r + TILE, c:c + TILE], truth[r:r + TILE, c:c + TILE]) for r, c in boxes]
    runs = []
    with reading_every_candidate(model):
        for k, (_, c) in enumerate(boxes):
            if c >= 256:
                continue  # a held-out run
            targets = [t for j, t in enumerate(tiles) if j != k]
            preds = model.segment([t[0] for t in targets], tiles[k][0], (tiles[k][1] > 0).astype(np.uint8),
                                  seg_type="semantic", quality="full")
            runs.append((np.array([[p.quality_features[n] for n in NAMES] for p in preds]),
                         [float(agreement(p.labels != 0, t[1] > 0)) for p, t in zip(preds, targets)]))
    return runs


def main() -> None:
    import warnings

    from scipy.stats import spearmanr

    from _report import model_and_args, report
    from seggpt_plugins.quality_fit import FIT_SEED, generated_samples

    warnings.simplefilter("ignore")
    model, args = model_and_args(__doc__)
    rows, _ = generated_samples(model, 300, seed=FIT_SEED, quality="full")
    fitted = np.array([[r[n] for n in NAMES] for r in rows])
    mean, scale = np.nanmean(fitted, 0), np.nanstd(fitted, 0) + 1e-6
    runs = design_runs(model)

    def median_rho(weights: np.ndarray) -> float:
        return float(np.median([spearmanr(np.nan_to_num((x - mean) / scale) @ weights, iou)[0] for x, iou in runs]))

    ranked = sorted(((median_rho(np.array(w, float)), w) for w in itertools.product(*GRID)), key=lambda r: -r[0])
    blend = lambda w: dict(zip(NAMES, map(float, w)))  # noqa: E731
    report({"model": args.model, "device": args.device, "design_runs": len(runs), "blends": len(ranked),
            "best": [{"design_median_spearman": round(rho, 3), "blend": blend(w)} for rho, w in ranked[:10]],
            "blend_before (fast's three, flip 0.25)": round(median_rho(np.array([1, 1, 1, 0.25])), 3),
            "fast (fast's three)": round(median_rho(np.array([1, 1, 1, 0])), 3)}, args.out)


if __name__ == "__main__":
    main()
