"""Does adapting the demo model to ONE annotated tile beat Otsu on the other tiles of the same image?

    python benchmarks/eval_adapt.py [--examples 9 12] [--time-limit 180] [--out benchmarks/results/eval_adapt.json]

stardist's 2D nuclei image (seggpt_plugins/demo/samples) cut into 16 tiles of 128x128 (row-major). Tiles 0-7
are for choosing settings, tiles 8-15 for reporting: each example tile (from 8-15) is annotated with its
ground truth (nuclei vs background), the demo model is adapted on it alone (SegGPT.adapt, at most
--time-limit seconds on this machine), and then both the shipped and the adapted model segment the other
report tiles with that tile as the example; foreground IoU against ground truth, with Otsu's threshold on
each target (polarity from the example) as the baseline, as in eval_demo.py. With --design, the example
tiles and their targets are the design tiles 0-7 instead (how the settings were chosen).

With --every-reference (what tests/test_labelstudio_e2e.py's adaptation test meets): the seven 128 px tiles
that test imports (8-bit, as it scales them), each in turn the one reference; the demo model adapted on it for
--steps steps (the learning-rate schedule spans them; the time limit does not bind), kept or not by its
held-out corner as the hosts keep it, then the mean foreground IoU of the six other tiles with that
reference as the example, before and after. Does "kept" mean "better on the other images"?

With --stack: stardist's 3D stack instead, its middle slice annotated (foreground), the demo model adapted
on that slice alone, then `propagate` with its defaults (the shipped and the adapted model); mean slice
IoU over the other slices against per-slice Otsu (polarity from the annotated slice), as
eval_propagation_drift.py measures it. Nothing was chosen on the stack.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _report import report
from eval_demo import SAMPLES, TILE, foreground_iou, otsu_mask
from seggpt_plugins.adapt import AdaptSettings, check_foreground_weight

DESIGN_TILES = list(range(8))
REPORT_TILES = list(range(8, 16))


def adapt_settings(args, seed: int = 0):
    """The AdaptSettings of the command line: --lr, --batch-size, --foreground-weight, --fit-margin (else
    adapt's own)."""
    weight = ({} if args.foreground_weight is None
              else {"foreground_weight": check_foreground_weight(args.foreground_weight)})
    return AdaptSettings(lr=args.lr, batch_size=args.batch_size, seed=seed,
                         fit_margin=args.fit_margin, **weight)


def painted_over_true(predictions, truths) -> float:
    """The pixels the predictions paint over the true foreground pixels, summed over the targets."""
    return round(sum(int((p.labels > 0).sum()) for p in predictions) / sum(int((t > 0).sum()) for t in truths), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, nargs="+", default=[9, 12],
                        help="example tiles (of 8-15; of 0-7 with --design)")
    parser.add_argument("--time-limit", type=float, default=180.0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=AdaptSettings.lr, help="default: adapt's (%(default)s)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="adapt's seeds (its crops and their order): each example is adapted once per seed, and "
                             "the JSON gives each example's mean over them (one run per example is a noisy figure)")
    parser.add_argument("--foreground-weight", default=None,
                        help="the loss's weight on foreground pixels: a number or 'balanced' (default: AdaptSettings')")
    parser.add_argument("--fit-margin", action="store_true",
                        help="adapt chooses the foreground margin on its held-out square (AdaptSettings.fit_margin); "
                             "the 2D runs also read the adapted weights at the base model's margin "
                             "('adapted_base_margin')")
    parser.add_argument("--design", action="store_true", help="example and target tiles of the design tiles 0-7")
    parser.add_argument("--stack", action="store_true", help="the 3D stack's middle slice (see above)")
    parser.add_argument("--every-reference", action="store_true",
                        help="the Label Studio test's seven tiles, each the one reference in turn (see above)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.stack:
        return stack(args)
    if args.every_reference:
        return every_reference(args)
    from tifffile import imread

    from seggpt_plugins import SegGPT

    image, truth = imread(SAMPLES / "nuclei2d.tif"), imread(SAMPLES / "nuclei2d_mask.tif") > 0
    corners = [(r, c) for r in range(0, image.shape[0], TILE) for c in range(0, image.shape[1], TILE)]
    tiles = [image[r:r + TILE, c:c + TILE] for r, c in corners]
    masks = [truth[r:r + TILE, c:c + TILE].astype(np.uint8) for r, c in corners]
    base = SegGPT.from_pretrained("demo", device="cpu", dtype="float32")
    runs = []
    split = DESIGN_TILES if args.design else REPORT_TILES
    for k in args.examples:
        if k not in split:
            raise SystemExit(f"example tile {k} is not a {'design' if args.design else 'report'} tile "
                             f"({split[0]}-{split[-1]})")
        targets = [t for t in split if t != k]
        for seed in args.seeds:
            runs.append(adapt_and_score(base, tiles, masks, k, targets, args, seed))
    summary = [{"example_tile": k, "seeds": args.seeds,
                **{key: round(float(np.mean([r[key] for r in runs if r["example_tile"] == k])), 4)
                   for key in ("shipped_iou", "adapted_iou", "otsu_iou", "adapted_minus_otsu", "steps")
                   + ("adapted_base_margin_iou",) * args.fit_margin}}
               for k in args.examples]
    report({"benchmark": "eval_adapt", "image": "stardist nuclei2d, 16 tiles of 128 px; "
            + ("design tiles 0-7" if args.design else "report tiles 8-15"),
            "base_foreground_margin": base.foreground_margin,
            "time_limit_s": args.time_limit, "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
            "foreground_weight": adapt_settings(args).foreground_weight, "seeds": args.seeds,
            "mean_over_seeds": summary, "runs": runs}, args.out)


def adapt_and_score(base, tiles, masks, k, targets, args, seed) -> dict:
    """Adapt `base` on tile k with `seed`; the shipped model, the adapted one and Otsu on the target tiles."""
    started = time.time()
    adapted = base.adapt([tiles[k]], [masks[k]], time_limit=args.time_limit, steps=args.steps,
                         settings=adapt_settings(args, seed))
    seconds = time.time() - started
    scores, painted = {}, {}
    readings = [("shipped", base, None), ("adapted", adapted, None)]
    if args.fit_margin:  # the same weights read as the base model reads
        readings.append(("adapted_base_margin", adapted, base.foreground_margin))
    for name, model, margin in readings:
        chosen = model.foreground_margin
        model.foreground_margin = chosen if margin is None else margin
        preds = model.segment([tiles[t] for t in targets], tiles[k], masks[k], quality=None)
        model.foreground_margin = chosen
        scores[name] = [foreground_iou(p.labels > 0, masks[t] > 0) for p, t in zip(preds, targets)]
        painted[name] = painted_over_true(preds, [masks[t] for t in targets])
    scores["otsu"] = [foreground_iou(otsu_mask(tiles[t], tiles[k], masks[k]), masks[t] > 0) for t in targets]
    info = adapted.adaptation
    run = {"example_tile": k, "seed": seed, "targets": targets, "adapt_seconds": round(seconds, 1),
           **{f"{name}_iou": round(float(np.mean(v)), 4) for name, v in scores.items()},
           "adapted_minus_otsu": round(float(np.mean(scores["adapted"]) - np.mean(scores["otsu"])), 4),
           "steps": info["steps"], "best_step": info["best_step"], "stopped": info["stopped"],
           "held_out_iou_before": info["held_out_iou_before"], "held_out_iou_best": info["held_out_iou_best"],
           "foreground_margin": info["foreground_margin"], "foreground_weight": info["foreground_weight"],
           "painted_over_true": painted,
           "per_target": {name: [round(v, 4) for v in vals] for name, vals in scores.items()}}
    print(run, flush=True)
    return run


def stack(args) -> None:
    from tifffile import imread

    from seggpt_plugins import SegGPT

    frames, truth = imread(SAMPLES / "nuclei3d.tif"), imread(SAMPLES / "nuclei3d_mask.tif") > 0
    middle = len(frames) // 2
    annotation = truth[middle].astype(np.uint8)
    others = [z for z in range(len(frames)) if z != middle]
    base = SegGPT.from_pretrained("demo", device="cpu", dtype="float32")

    def mean_slice_iou(model) -> float:
        found = {p.index: p for p in model.propagate(frames, annotations={middle: annotation})}
        return round(float(np.mean([foreground_iou(found[z].labels > 0, truth[z]) for z in others])), 4)

    shipped = mean_slice_iou(base)
    otsu = round(float(np.mean(
        [foreground_iou(otsu_mask(frames[z], frames[middle], annotation), truth[z]) for z in others])), 4)
    runs = []
    for seed in args.seeds:
        started = time.time()
        adapted = base.adapt([frames[middle]], [annotation], time_limit=args.time_limit, steps=args.steps,
                             settings=adapt_settings(args, seed))
        info = adapted.adaptation
        run = {"seed": seed, "adapt_seconds": round(time.time() - started, 1),
               "adapted_mean_slice_iou": mean_slice_iou(adapted),
               **{k: info[k] for k in ("improved", "steps", "best_step", "stopped", "held_out_iou_before",
                                       "held_out_iou_best", "base_foreground_margin", "foreground_margin",
                                       "foreground_weight")}}
        run["adapted_minus_otsu"] = round(run["adapted_mean_slice_iou"] - otsu, 4)
        print(run, flush=True)
        runs.append(run)
    adapted_mean = round(float(np.mean([r["adapted_mean_slice_iou"] for r in runs])), 4)
    report({"benchmark": "eval_adapt --stack", "stack": "stardist nuclei3d, middle slice annotated",
            "time_limit_s": args.time_limit, "step_cap": args.steps, "lr": args.lr, "batch_size": args.batch_size,
            "seeds": args.seeds, "shipped_mean_slice_iou": shipped, "otsu_mean_slice_iou": otsu,
            "adapted_mean_slice_iou": adapted_mean, "adapted_minus_otsu": round(adapted_mean - otsu, 4),
            "runs": runs}, args.out)


LS_TILES = [(0, 0), (0, 256), (128, 128), (128, 384), (256, 0), (256, 256), (384, 128)]  # as in that test


def every_reference(args) -> None:
    from tifffile import imread

    from seggpt_plugins import SegGPT

    image, truth = imread(SAMPLES / "nuclei2d.tif"), imread(SAMPLES / "nuclei2d_mask.tif") > 0
    low, high = float(image.min()), float(np.percentile(image, 99.8))
    image8 = np.clip((image.astype(np.float64) - low) / (high - low) * 255, 0, 255).astype(np.uint8)
    tiles = [image8[r:r + 128, c:c + 128] for r, c in LS_TILES]
    masks = [truth[r:r + 128, c:c + 128].astype(np.uint8) for r, c in LS_TILES]
    base = SegGPT.from_pretrained("demo", device="cpu", dtype="float32")
    runs = []
    for k in range(len(tiles)):
        others = [t for t in range(len(tiles)) if t != k]

        def mean_iou(model):  # (and the share of the other tiles' nuclei it paints)
            preds = model.segment([tiles[t] for t in others], tiles[k], masks[k], quality=None)
            return (round(float(np.mean([foreground_iou(p.labels > 0, masks[t] > 0) for p, t in zip(preds, others)])),
                          4), painted_over_true(preds, [masks[t] for t in others]))

        adapted = base.adapt([tiles[k]], [masks[k]], time_limit=None, steps=args.steps, example_ids="classes",
                             settings=adapt_settings(args))
        info = adapted.adaptation
        (before, painted_before) = mean_iou(base)
        (after, painted_after) = mean_iou(adapted) if info["improved"] else (before, painted_before)
        run = {"reference": f"tile_{LS_TILES[k][0]}_{LS_TILES[k][1]}", "kept": info["improved"],
               "held_out_iou_before": info["held_out_iou_before"], "held_out_iou_best": info["held_out_iou_best"],
               "best_step": info["best_step"], "foreground_weight": info["foreground_weight"],
               "others_iou_before": before, "others_iou_after": after, "change": round(after - before, 4),
               "others_painted_over_true": [painted_before, painted_after]}
        print(run, flush=True)
        runs.append(run)
    kept = [r for r in runs if r["kept"]]
    report({"benchmark": "eval_adapt --every-reference", "tiles": "tests/test_labelstudio_e2e.py TILES, 8-bit",
            "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "runs": runs,
            "kept": len(kept), "kept_and_better": sum(r["change"] > 0 for r in kept),
            "kept_and_worse": sum(r["change"] < 0 for r in kept)}, args.out)


if __name__ == "__main__":
    main()
