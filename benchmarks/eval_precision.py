"""What each CPU precision costs in accuracy: float32 (the reference), bfloat16 and int8 linear layers.

    OMP_NUM_THREADS=1 python benchmarks/eval_precision.py [--tasks 96] [--skip-full] [--out results.json]

1. The painting's relative error against float32 on the full-size random model (SegGptConfig() = ViT-L,
   relative positions and tokens drawn non-zero, as bench_core.py): ||p - p_fp32|| / ||p_fp32|| over the
   raw painting tensor of one 512x512 target with one 3-class prompt, and the share of pixels whose label
   differs from float32's.
2. mIoU with the shipped demo model at each precision: held-out generated tasks (1-shot, the fixed seeds
   of `evaluation.evaluate_generated`) and stardist's 2D nuclei cut into 16 tiles of 128x128, each tile in
   turn the prompt of the other 15 (foreground IoU, as eval_demo.py). A precision that costs more than
   0.5 mIoU points is not a default (issue 19).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import report  # noqa: E402

PRECISIONS = ("float32", "bfloat16", "int8")  # through loading.precision_options


def full_size_errors() -> dict:
    """Painting error against fp32 on the random ViT-L, one pair per precision."""
    import torch
    from bench_core import inputs
    from transformers import SegGptConfig, SegGptForImageSegmentation

    from seggpt_plugins import SegGPT
    from seggpt_plugins.loading import precision_options

    torch.manual_seed(0)
    net = SegGptForImageSegmentation(SegGptConfig()).eval()
    for name, param in net.named_parameters():
        if "rel_pos" in name or "token" in name:
            torch.nn.init.normal_(param, std=0.02)
    targets, prompt_images, prompt_masks = inputs(1, 1)
    rows, reference = {}, None
    for name in PRECISIONS:
        model = SegGPT(copy.deepcopy(net), device="cpu", **precision_options(name))
        prompts = model.prepare_prompts(prompt_images, prompt_masks)
        encoded = model.encode_images(targets)
        with torch.inference_mode():
            painting = model.paint_targets(encoded, [prompts], "instance").float()
        labels = model.segment(targets, prompts)[0].labels
        if reference is None:
            reference = painting, labels
        rows[name] = {"painting_relative_error": round(float((painting - reference[0]).norm() / reference[0].norm()), 5),
                      "labels_changed": round(float((labels != reference[1]).mean()), 5)}
        print(name, rows[name], flush=True)
        del model
    return rows


def nuclei_tiles_iou(model) -> float:
    """Mean foreground IoU on stardist's 2D nuclei: 16 tiles of 128x128, each in turn the prompt of the
    other 15 (eval_demo.py's 1-shot protocol, without the quality estimate)."""
    from eval_demo import SAMPLES, TILE, foreground_iou
    from tifffile import imread

    image, truth = imread(SAMPLES / "nuclei2d.tif"), imread(SAMPLES / "nuclei2d_mask.tif") > 0
    corners = [(r, c) for r in range(0, image.shape[0], TILE) for c in range(0, image.shape[1], TILE)]
    tiles = [image[r:r + TILE, c:c + TILE] for r, c in corners]
    masks = [truth[r:r + TILE, c:c + TILE].astype(np.uint8) for r, c in corners]
    intensity = (float(np.percentile(image, 0.5)), float(np.percentile(image, 99.8)))
    ious = []
    for k in range(len(tiles)):
        targets = [j for j in range(len(tiles)) if j != k]
        preds = model.segment([tiles[j] for j in targets], tiles[k], masks[k], batch_size=15,
                              intensity_range=intensity, quality=None)
        ious += [foreground_iou(pred.labels > 0, masks[j] > 0) for j, pred in zip(targets, preds)]
    return round(float(np.mean(ious)), 4)


def demo_accuracy(tasks: int) -> dict:
    """mIoU of the demo model at each precision on generated and on real tasks."""
    from seggpt_plugins import SegGPT
    from seggpt_plugins.loading import precision_options
    from seggpt_plugins.evaluation import evaluate_generated

    rows = {}
    for name in PRECISIONS:
        model = SegGPT.from_pretrained("demo", device="cpu", **precision_options(name))
        started = time.perf_counter()
        rows[name] = {"generated_miou": evaluate_generated(model, tasks=tasks, prompts=1)["miou"],
                      "stardist_2d_iou": nuclei_tiles_iou(model), "seconds": round(time.perf_counter() - started, 1)}
        print(name, rows[name], flush=True)
    base = rows["float32"]
    for row in rows.values():
        row["generated_points"] = round(100 * (row["generated_miou"] - base["generated_miou"]), 2)
        row["stardist_2d_points"] = round(100 * (row["stardist_2d_iou"] - base["stardist_2d_iou"]), 2)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=96, help="held-out generated tasks (default: %(default)s)")
    parser.add_argument("--skip-full", action="store_true", help="leave out the full-size model's painting error")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    from seggpt_plugins.loading import cpu_has_native_bf16

    result = {"threads": torch.get_num_threads(), "torch": torch.__version__, "native_bf16": cpu_has_native_bf16()}
    if not args.skip_full:
        result["full_size_random_vit_l"] = full_size_errors()
    result["demo_model"] = demo_accuracy(args.tasks)
    print("\n| precision | painting rel. error (ViT-L) | labels changed | generated mIoU (points) "
          "| stardist 2D IoU (points) |")
    print("|---|---|---|---|---|")
    for name in PRECISIONS:
        full = result.get("full_size_random_vit_l", {}).get(name, {})
        demo = result["demo_model"][name]
        print(f"| {name} | {full.get('painting_relative_error', '-')} | {full.get('labels_changed', '-')} | "
              f"{demo['generated_miou']} ({demo['generated_points']:+}) | {demo['stardist_2d_iou']} "
              f"({demo['stardist_2d_points']:+}) |")
    report(result, args.out)


if __name__ == "__main__":
    main()
