"""How the per-image blend was chosen: each candidate feature alone, and a grid of blends (docs/quality.md).

    OMP_NUM_THREADS=1 python benchmarks/eval_quality_features.py --out benchmarks/results/eval_quality_features.json

Four sets, every candidate of quality.CANDIDATES read on the demo model's proposals ("full": the mirrored
target too): generated tasks from quality_fit.FIT_SEED (the choice set: 150 tasks), held-out generated tasks
(quality_fit.HELD_OUT_SEED, 600), and the two real sets of eval_quality.py (stardist 2D tiles, 3D slices).
Printed per set: Spearman's rank correlation of each candidate with the true IoU. Then every blend of a
small weight grid over six candidates (a standardised weighted sum, each set standardised on its own) is
ranked by its worst Spearman over the choice set and the two real sets, and the ten best are printed with
their held-out score. The real sets take part in the choice: their figures are evidence of a design, not a
blind test; the held-out generated tasks are not looked at to choose.
"""

from __future__ import annotations

import argparse
import itertools
import warnings

import numpy as np
from _report import report
from eval_quality import nuclei_2d, nuclei_3d, real_samples

GRID = {"snap_foreground": (0, 0.5, 1), "boundary_edges": (0, 0.5, 1, 1.5), "texture_agreement": (0, 0.5, 1, 1.5),
        "appearance_agreement": (0, 0.5, 1), "appearance_fit_foreground": (0, 0.5), "flip_agreement": (0, 0.25, 0.5)}


def spearman(x, y) -> float:
    """Spearman's rho, a feature that could not be read (NaN) counted as the set's average."""
    from scipy.stats import spearmanr

    x = np.asarray(x, np.float64)
    return round(float(spearmanr(np.where(np.isnan(x), np.nanmean(x), x), y)[0]), 3)


def main() -> None:
    from seggpt_plugins import SegGPT
    from seggpt_plugins.quality import CANDIDATES
    from seggpt_plugins.quality_fit import FIT_SEED, HELD_OUT_SEED, generated_samples

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--choice-tasks", type=int, default=150)
    parser.add_argument("--held-out-tasks", type=int, default=600)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    model = SegGPT.from_pretrained("demo", device="cpu")
    sets = {"choice": generated_samples(model, args.choice_tasks, FIT_SEED),
            "held_out": generated_samples(model, args.held_out_tasks, HELD_OUT_SEED),
            "nuclei_2d": real_samples(model, nuclei_2d()), "nuclei_3d": real_samples(model, nuclei_3d())}
    alone = {name: {c: spearman([r[c] for r in rows], ious) for c in CANDIDATES} for name, (rows, ious) in sets.items()}
    for name, values in alone.items():
        print(name, values, flush=True)

    names = list(GRID)
    standardised = {}
    for name, (rows, ious) in sets.items():
        x = np.array([[r[c] for c in names] for r in rows], np.float64)
        standardised[name] = (np.nan_to_num((x - np.nanmean(x, 0)) / (np.nanstd(x, 0) + 1e-9)), ious)
    blends = []
    for weights in itertools.product(*GRID.values()):
        w = np.array(weights, np.float64)
        if not w.any():
            continue
        scores = {name: spearman(z @ w, ious) for name, (z, ious) in standardised.items()}
        worst = min(scores["choice"], scores["nuclei_2d"], scores["nuclei_3d"])
        blends.append({"weights": dict(zip(names, weights)), "worst_of_choice_and_real": worst, **scores})
    blends.sort(key=lambda b: -b["worst_of_choice_and_real"])
    for blend in blends[:10]:
        print(blend, flush=True)
    report({"model": "demo", "tasks": {"choice": args.choice_tasks, "held_out": args.held_out_tasks},
            "alone": alone, "best_blends": blends[:10], "blends_tried": len(blends)}, args.out)


if __name__ == "__main__":
    main()
