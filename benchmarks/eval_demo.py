"""Accuracy of a model (default: the shipped demo model) on generated and on real data, against Otsu.

    python benchmarks/eval_demo.py [--model demo] [--device cpu] [--out results.json]

1. Held-out generated tasks (fixed seeds, never used in training): 1-shot and 3-shot mIoU.
2. Real nuclei (stardist's 2D DSB-2018 image that ships in seggpt_plugins/demo/samples): the image is
   cut into 16 tiles of 128x128; each tile in turn is the prompt (its ground-truth mask, nuclei vs
   background) and the other 15 are targets: foreground IoU against ground truth. 3-shot: three
   tiles are prompts, the other 13 targets. Baseline in the same run: Otsu's threshold on each target
   tile, polarity taken from the prompt (are its objects brighter than its background?).
3. Real 3D stack (stardist's nuclei stack): the middle slice annotated with its ground-truth
   instance labels, propagated through the stack (memory 8); per-instance IoU (ids kept?) and
   foreground IoU against ground truth, with per-slice Otsu as the foreground baseline.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _report import report

SAMPLES = Path(__file__).resolve().parents[1] / "seggpt_plugins" / "demo" / "samples"
TILE = 128


def foreground_iou(pred, truth) -> float:
    union = np.logical_or(pred, truth).sum()
    return float(np.logical_and(pred, truth).sum() / union) if union else 1.0


def otsu_mask(image, prompt_image, prompt_mask):
    from skimage.filters import threshold_otsu

    bright = prompt_image[prompt_mask > 0].mean() >= prompt_image[prompt_mask == 0].mean()
    threshold = threshold_otsu(image)
    return image > threshold if bright else image < threshold


def stardist_2d(model, batch_size):
    from tifffile import imread

    image, truth = imread(SAMPLES / "nuclei2d.tif"), imread(SAMPLES / "nuclei2d_mask.tif") > 0
    corners = [(r, c) for r in range(0, image.shape[0], TILE) for c in range(0, image.shape[1], TILE)]
    tiles = [image[r:r + TILE, c:c + TILE] for r, c in corners]
    masks = [truth[r:r + TILE, c:c + TILE].astype(np.uint8) for r, c in corners]
    intensity = (float(np.percentile(image, 0.5)), float(np.percentile(image, 99.8)))
    results = {}
    for shots in (1, 3):
        model_ious, otsu_ious = [], []
        prompt_sets = [[k] for k in range(len(tiles))] if shots == 1 else \
            [[k, (k + 5) % 16, (k + 10) % 16] for k in range(len(tiles))]
        for prompts in prompt_sets:
            targets = [k for k in range(len(tiles)) if k not in prompts]
            preds = model.segment([tiles[k] for k in targets], [tiles[k] for k in prompts],
                                  [masks[k] for k in prompts], batch_size=batch_size, intensity_range=intensity)
            for k, pred in zip(targets, preds):
                model_ious.append(foreground_iou(pred.labels > 0, masks[k] > 0))
                otsu_ious.append(foreground_iou(otsu_mask(tiles[k], tiles[prompts[0]], masks[prompts[0]]), masks[k] > 0))
        results[f"{shots}-shot"] = {"seggpt_iou": round(float(np.mean(model_ious)), 4),
                                    "otsu_iou": round(float(np.mean(otsu_ious)), 4),
                                    "pairs": len(model_ious), "seggpt_wins": int(np.sum(np.array(model_ious) > otsu_ious))}
    return results


def stardist_3d(model, batch_size):
    from tifffile import imread

    stack, truth = imread(SAMPLES / "nuclei3d.tif"), imread(SAMPLES / "nuclei3d_mask.tif")
    middle = stack.shape[0] // 2
    labels = np.zeros_like(truth)
    labels[middle] = truth[middle]
    for pred in model.propagate(stack, annotations={middle: truth[middle]}, memory=8, batch_size=batch_size):
        labels[pred.index] = pred.labels
    ids = [i for i in np.unique(truth[middle]) if i]
    others = [z for z in range(stack.shape[0]) if z != middle]
    per_id = []
    for i in ids:
        union = np.logical_or(labels[others] == i, truth[others] == i).sum()
        if union:
            per_id.append(np.logical_and(labels[others] == i, truth[others] == i).sum() / union)
    # foreground: only objects of the annotated slice can be propagated; compare on them and on all
    known = np.isin(truth, ids)
    fg = [foreground_iou(labels[z] > 0, known[z]) for z in others]
    otsu = [foreground_iou(otsu_mask(stack[z], stack[middle], truth[middle]), truth[z] > 0) for z in others]
    fg_all = [foreground_iou(labels[z] > 0, truth[z] > 0) for z in others]
    return {"instance_miou_ids_kept": round(float(np.mean(per_id)), 4), "instances": len(ids),
            "foreground_iou_of_annotated_objects": round(float(np.mean(fg)), 4),
            "foreground_iou_all_objects": round(float(np.mean(fg_all)), 4),
            "otsu_foreground_iou_all_objects": round(float(np.mean(otsu)), 4)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default=None)
    parser.add_argument("--tasks", type=int, default=96, help="generated held-out tasks")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--foreground-margin", type=float, default=None,
                        help="read the paintings with this margin instead of the model's own (0: plain nearest colour)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from seggpt_plugins import SegGPT
    from seggpt_plugins.evaluation import evaluate_generated

    model = SegGPT.from_pretrained(args.model, device=args.device, dtype="float32")
    if args.foreground_margin is not None:
        model.foreground_margin = args.foreground_margin
    started = time.time()
    results = {"model": args.model, "device": str(model.device), "foreground_margin": model.foreground_margin}
    results["generated"] = {f"{p}-shot": evaluate_generated(model, tasks=args.tasks, prompts=p) for p in (1, 3)}
    results["stardist_2d_tiles"] = stardist_2d(model, args.batch_size)
    results["stardist_3d_propagation"] = stardist_3d(model, args.batch_size)
    results["seconds"] = round(time.time() - started, 1)
    report(results, args.out)


if __name__ == "__main__":
    main()
