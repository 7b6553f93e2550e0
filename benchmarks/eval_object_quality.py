"""Does each object's predicted IoU find the wrong objects? The per-object estimate against the snap score.

    OMP_NUM_THREADS=1 python benchmarks/eval_object_quality.py --fit 300 --write seggpt_plugins/demo/model/quality.json
    OMP_NUM_THREADS=1 python benchmarks/eval_object_quality.py --tasks 150 --out benchmarks/results/eval_object_quality_cpu.json

--fit N: fit the per-object estimate (quality.OBJECT_BLEND, calibrated) on the objects of N generated tasks
from quality_fit.FIT_SEED and write it into the estimate file `--write` (its "fast"/"full" estimates kept;
`seggpt fit-quality` fits all three when it passes `objects=` to quality_fit.generated_samples).

Every predicted object (Prediction.instances(), defaults: 8-connected parts of 16+ pixels) is scored by
its IoU with the true object it overlaps best (quality_fit.object_ious; 0 when it overlaps none). Sets, none
used for fitting:
- generated: held-out generated tasks (quality_fit.HELD_OUT_SEED), 1-3 examples; the truth's objects are the
  connected parts of each label, matched within their class;
- nuclei 2D / 3D: the tiles and slices of benchmarks/eval_quality.py (semantic, one example each), the
  truth's objects being stardist's instance masks.

Per set: Spearman between the object's confidence and its true IoU for the snap score (the object's mean
snap score, `Instance.score`) and the estimate (`Instance.quality`), the share of the worst 10% of
objects found among the lowest-scored 20%, the calibration error and reliability table (eval_quality.judge),
and each candidate feature's own Spearman (how the blend was chosen). Plus the per-object estimate's time
(Prediction.instances() with and without it).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
from _report import report
from eval_quality import ROOT, SAMPLES, judge, nuclei_2d, nuclei_3d


def real_objects(model, cases, truth_maps):
    """(object features, predicted IoU, true IoU) of every predicted object of (target, example, mask, _)."""
    from seggpt_plugins.quality import object_features
    from seggpt_plugins.quality_fit import object_ious

    out = []
    for (target, example, mask, _), truth in zip(cases, truth_maps):
        pred = model.segment(target, example, mask, seg_type="semantic", quality="fast")[0]
        found = pred.instances()
        context = pred.object_context
        values = object_features(found.map, pred.scores, context.foreground / 255, context.stride, context.diameter)
        matched = object_ious(found.map, truth)
        out.extend((values[o.id], o.quality, matched[o.id]) for o in found.objects)
    return out


def tile_truths():
    from tifffile import imread

    truth = imread(SAMPLES / "nuclei2d_mask.tif")
    return [truth[r:r + 128, c:c + 128] for r in range(0, 512 - 128 + 1, 64) for c in range(0, 512 - 128 + 1, 64)]


def slice_truths():
    from tifffile import imread

    return list(imread(SAMPLES / "nuclei3d_mask.tif"))


def generated_objects(model, count: int, seed: int):
    from seggpt_plugins.quality_fit import generated_samples

    objects = []
    generated_samples(model, count, seed, objects=objects, quality="fast")
    return objects


def timing(model, cases, repeats: int = 2) -> dict:
    """ms per target of Prediction.instances() without and with the per-object estimate (best of `repeats`)."""
    preds = model.segment([c[0] for c in cases], [cases[0][1]], [cases[0][2]], seg_type="semantic")
    best = {"instances": float("inf"), "instances + object quality": float("inf")}
    for _ in range(repeats):
        for name in best:
            started = time.perf_counter()
            for pred in preds:
                context = pred.object_context
                if name == "instances":
                    pred.object_context = None
                pred.instances()
                pred.object_context = context
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: round(1000 * t / len(preds), 2) for name, t in best.items()}


def main() -> None:
    from scipy.stats import spearmanr

    from seggpt_plugins import SegGPT
    from seggpt_plugins.quality import OBJECT_BLEND, OBJECT_CANDIDATES, OBJECT_MODEL, SHIPPED, load_models
    from seggpt_plugins.quality_fit import FIT_SEED, HELD_OUT_SEED, fit, save_models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", type=int, default=150, help="held-out generated tasks to judge on")
    parser.add_argument("--fit", type=int, default=0, help="fit the estimate on this many generated tasks first")
    parser.add_argument("--write", default=None, help="with --fit: the estimate file to add it to")
    parser.add_argument("--estimate", default=str(SHIPPED), help="the estimate file to judge")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    model = SegGPT.from_pretrained(args.model, device=args.device)
    if args.fit:
        objects = generated_objects(model, args.fit, FIT_SEED)
        target = Path(args.write or args.estimate)
        models = load_models(target)
        models[OBJECT_MODEL] = fit([row for row, _ in objects], [iou for _, iou in objects], OBJECT_BLEND)
        before = json.loads(target.read_text())["fitted_on"].split("; per-object")[0]
        save_models(target, models, fitted_on=f"{before}; per-object: {len(objects)} objects of {args.fit} "
                                              f"generated tasks from seed {FIT_SEED}")
        print(f"fitted the per-object estimate on {len(objects)} objects; wrote {args.write or args.estimate}")
        if not args.tasks:
            return
    import os

    os.environ["SEGGPT_QUALITY_MODEL"] = args.estimate
    model._quality_models = None
    estimate = load_models(args.estimate)[OBJECT_MODEL]
    generated = [(row, estimate.predict(row), iou) for row, iou in generated_objects(model, args.tasks, HELD_OUT_SEED)]
    sets = {"generated": generated, "nuclei_2d": real_objects(model, nuclei_2d(), tile_truths()),
            "nuclei_3d": real_objects(model, nuclei_3d(), slice_truths())}
    results = {}
    for name, rows in sets.items():
        ious = [iou for _, _, iou in rows]
        features = {f: round(float(spearmanr([r[f] for r, _, _ in rows], ious)[0]), 3) for f in OBJECT_CANDIDATES}
        results[name] = {"objects": len(rows), "mean_iou": round(float(np.mean(ious)), 3),
                         "snap": judge([r["object_snap"] for r, _, _ in rows], ious, False),
                         "estimate": judge([q for _, q, _ in rows], ious, True), "feature_spearman": features}
    report({"model": args.model, "device": args.device, "estimate": str(Path(args.estimate).resolve()).replace(f"{ROOT}/", ""),
            "blend": OBJECT_BLEND, "results": results, "ms_per_target_nuclei_2d": timing(model, nuclei_2d())},
           args.out)


if __name__ == "__main__":
    main()
