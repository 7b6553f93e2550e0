"""Does the confidence predict errors? The quality estimate (predicted IoU) against today's snap score.

    seggpt fit-quality --model demo --out seggpt_plugins/demo/model/quality.json --overwrite   # (re)fit
    OMP_NUM_THREADS=1 python benchmarks/eval_quality.py --baseline benchmarks/baselines/quality_appearance.json \
        --out benchmarks/results/eval_quality_cpu.json

Three sets, none used for fitting (the estimate is fitted on generated tasks from quality_fit.FIT_SEED):
- generated: held-out generated tasks (quality_fit.HELD_OUT_SEED), 1-3 examples, mean IoU over labels (600 by
  default: Spearman's rho over 150 tasks has a standard error near 0.07);
- nuclei 2D: stardist's 512x512 field as 49 tiles of 128x128 (stride 64), each segmented from one other
  tile (chosen at random, not overlapping it) with its foreground mask; foreground IoU;
- nuclei 3D: each slice of stardist's 3D stack segmented from a slice 1-7 planes away; foreground IoU.

Per set and per confidence (snap: the mean snap score over the foreground, what `confidence` was;
fast; full; and with --baseline, the fast and full estimates of another quality.json, judged on the same
predictions): Spearman's rank correlation with the true IoU, the share of the worst 10% (by true IoU)
found among the lowest-scored 20%, the calibration error (mean |predicted - true| over 5 equal-count
bins, for the estimates) and a reliability table. Time per target of segment() on the 2D tiles with
quality off, fast and full (best of five, alternated), with the extra time of each option, and the fast
estimate's own time (its features and curve on a finished prediction).
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


def scaled(image: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image, (0.5, 99.8))
    return np.clip((image.astype(np.float32) - lo) / (hi - lo) * 255 + 0.5, 0, 255).astype(np.uint8)


def nuclei_2d():
    """[(target, example, example mask, truth)] of the 2D field's tiles."""
    from tifffile import imread

    image, truth = scaled(imread(SAMPLES / "nuclei2d.tif")), imread(SAMPLES / "nuclei2d_mask.tif") > 0
    rng = np.random.default_rng(0)
    cases = []
    for r in range(0, 512 - TILE + 1, 64):
        for c in range(0, 512 - TILE + 1, 64):
            while True:
                pr, pc = (int(v) for v in rng.integers(0, 512 - TILE + 1, 2))
                if abs(pr - r) >= TILE or abs(pc - c) >= TILE:
                    break
            cases.append((image[r:r + TILE, c:c + TILE], image[pr:pr + TILE, pc:pc + TILE],
                          truth[pr:pr + TILE, pc:pc + TILE].astype(np.uint8), truth[r:r + TILE, c:c + TILE]))
    return cases


def nuclei_3d():
    from tifffile import imread

    stack, truth = scaled(imread(SAMPLES / "nuclei3d.tif")), imread(SAMPLES / "nuclei3d_mask.tif") > 0
    rng = np.random.default_rng(1)
    cases = []
    for z in range(len(stack)):
        d = int(rng.integers(1, 8)) * (1 if z < len(stack) // 2 else -1)
        cases.append((stack[z], stack[z + d], truth[z + d].astype(np.uint8), truth[z]))
    return cases


def real_samples(model, cases):
    """Every candidate feature ("full") and the foreground IoU of each (target, example, mask, truth)."""
    from seggpt_plugins.quality import agreement
    from seggpt_plugins.quality_fit import reading_every_candidate

    rows, ious = [], []
    with reading_every_candidate(model):  # (the baseline estimate reads features the shipped one does not)
        for target, example, mask, truth in cases:
            pred = model.segment(target, example, mask, seg_type="semantic", quality="full")[0]
            rows.append({**pred.quality_features, "snap_confidence": pred.snap_confidence})  # the old confidence
            ious.append(agreement(pred.labels != 0, truth))
    return rows, ious


def scores_of(models, rows, baseline=None) -> dict[str, list[float]]:
    scores = {"snap": [r.get("snap_confidence", r["snap_foreground"]) for r in rows],  # (the same on these sets)
              "fast": [models["fast"].predict(r) for r in rows], "full": [models["full"].predict(r) for r in rows]}
    for name in ("fast", "full") if baseline else ():
        scores[f"baseline_{name}"] = [baseline[name].predict(r) for r in rows]
    return scores


def judge(score: list[float], iou: list[float], calibrated: bool) -> dict:
    from scipy.stats import spearmanr

    score, iou = np.asarray(score), np.asarray(iou)
    n = len(iou)
    worst = set(np.argsort(iou, kind="stable")[:max(1, round(0.1 * n))].tolist())
    lowest = set(np.argsort(score, kind="stable")[:max(1, round(0.2 * n))].tolist())
    out = {"spearman": round(float(spearmanr(score, iou)[0]), 3),
           "worst10_in_lowest20": round(len(worst & lowest) / len(worst), 3)}
    if calibrated:
        order = np.argsort(score, kind="stable")
        table = []
        for part in np.array_split(order, 5):
            table.append({"predicted": round(float(score[part].mean()), 3), "true": round(float(iou[part].mean()), 3),
                          "n": int(len(part))})
        out["calibration_error"] = round(float(np.sum([abs(t["predicted"] - t["true"]) * t["n"] for t in table]) / n), 3)
        out["reliability"] = table
    return out


def timing(model, cases, repeats: int = 5) -> dict:
    """segment() per target with quality off, fast and full (best of `repeats`, the settings alternated),
    and the estimate alone (SegGPT.assess on the predictions, the forward passes left out)."""
    targets = [c[0] for c in cases]
    examples, masks = [cases[0][1]], [cases[0][2]]
    prompts = model.prepare_prompts(examples, masks)
    best = {q: float("inf") for q in ("off", "fast", "full")}
    for _ in range(repeats):
        for q in best:
            started = time.perf_counter()
            model.segment(targets, prompts, seg_type="semantic", quality=None if q == "off" else q)
            best[q] = min(best[q], time.perf_counter() - started)
    ms = {q: 1000 * t / len(targets) for q, t in best.items()}
    predictions = model.segment(targets, prompts, seg_type="semantic", quality=None)
    rgbs = [np.repeat(t[..., None], 3, -1) if t.ndim == 2 else t for t in targets]
    estimate = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for prediction, rgb in zip(predictions, rgbs):
            model.assess(prediction, prompts.examples, rgb, "fast")
        estimate = min(estimate, time.perf_counter() - started)
    return {"ms_per_target": {q: round(v, 1) for q, v in ms.items()},
            "extra_vs_off": {q: f"{ms[q] / ms['off'] - 1:+.0%}" for q in ("fast", "full")},
            "fast_estimate_alone_ms": round(1000 * estimate / len(targets), 2)}


def main() -> None:
    import warnings

    from seggpt_plugins import SegGPT
    from seggpt_plugins.quality import SHIPPED, load_models
    from seggpt_plugins.quality_fit import HELD_OUT_SEED, generated_samples

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", type=int, default=600, help="held-out generated tasks")
    parser.add_argument("--estimate", default=str(SHIPPED), help="the quality estimate file to judge")
    parser.add_argument("--baseline", default=None, help="another quality estimate file, judged on the same predictions")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    model = SegGPT.from_pretrained(args.model, device=args.device)
    models = load_models(args.estimate)
    baseline = load_models(args.baseline) if args.baseline else None
    sets = {"generated": generated_samples(model, args.tasks, HELD_OUT_SEED),
            "nuclei_2d": real_samples(model, nuclei_2d()), "nuclei_3d": real_samples(model, nuclei_3d())}
    results = {}
    for name, (rows, ious) in sets.items():
        scores = scores_of(models, rows, baseline)
        results[name] = {"targets": len(ious), "mean_iou": round(float(np.mean(ious)), 3),
                         **{kind: judge(score, ious, kind != "snap") for kind, score in scores.items()}}
    report({"model": args.model, "device": args.device, "estimate": in_repo(args.estimate),
            "baseline": in_repo(args.baseline), "results": results, "time_nuclei_2d": timing(model, nuclei_2d())},
           args.out)


def in_repo(path: str | None) -> str | None:
    """A path as the repository names it, where it lies inside."""
    if path and Path(path).resolve().is_relative_to(ROOT):
        return str(Path(path).resolve().relative_to(ROOT))
    return path

if __name__ == "__main__":
    main()
