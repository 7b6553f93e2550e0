"""Propagation without drift (issue 33, items 1-2): the memory held to the examples, against no memory and
the memory as it was.

    python benchmarks/eval_propagation_drift.py [--model demo] [--out benchmarks/results/eval_propagation_drift.json]

Three runs of `SegGPT.propagate` per scene, on this machine's CPU with the demo model:
- `memory 0`: the fixed prompts alone;
- `memory 8, before`: memory_gate=False, every predicted frame joins the memory and weighs as an example;
- `memory 8` (the default now): the memory weighs at most as much as the fixed prompts, and a frame whose
  painted share is beyond MEMORY_SHARE_FACTOR of the examples' does not join it.

Scenes:
- stardist's 3D nuclei stack (ships in seggpt_plugins/demo/samples), its middle slice annotated with its
  foreground mask (as the issue measured); mean slice IoU of the foreground, the largest painted share of a
  slice, and per-slice Otsu (polarity from the annotated slice) in the same run; memory 4 too (napari's
  default). The ranking of item 2 on the drifting run (`memory 8, before`): how many of the slices painted
  over 90% are in the worst third by confidence, with the gross-error factor (quality.gross_error) and
  without it (the estimate divided by the factor), and the Spearman of confidence with the true IoU.
- generated scenes (seggpt_plugins/scenes.py): "video" (annotated first frame, objects moving 1-2 px a
  frame) and "stack" (annotated middle slice; objects also swell and fade through focus), 31 frames of
  96x96, 4 objects. Seeds 0-2 chose the design (the weight and the share factor); seeds 3-9 are held out
  and reported. Foreground IoU and per-object IoU with ids kept (over the frames where the object is in
  the truth or the prediction), averaged per scene, then over scenes.
"""

from __future__ import annotations

import numpy as np
from _report import model_and_args, report
from eval_demo import SAMPLES, otsu_mask
from eval_demo import foreground_iou as iou

DESIGN_SEEDS, HELD_OUT_SEEDS = (0, 1, 2), (3, 4, 5, 6, 7, 8, 9)
RUNS = {"memory 0": dict(memory=0), "memory 8, before": dict(memory=8, memory_gate=False),
        "memory 8": dict(memory=8)}


def run(model, frames, annotations, **options) -> dict:
    return {p.index: p for p in model.propagate(frames, annotations=annotations, **options)}


def stardist(model) -> dict:
    from tifffile import imread

    stack, truth = imread(SAMPLES / "nuclei3d.tif"), imread(SAMPLES / "nuclei3d_mask.tif")
    middle = len(stack) // 2
    annotation = (truth[middle] > 0).astype(np.uint8)
    out = {"slices": len(stack), "annotated": middle}
    options = {**RUNS, "memory 4, before": dict(memory=4, memory_gate=False), "memory 4": dict(memory=4)}
    for name, option in options.items():
        found = run(model, stack, {middle: annotation}, **option)
        ious = [iou(p.labels > 0, truth[z] > 0) for z, p in found.items()]
        shares = [float(np.mean(p.labels > 0)) for p in found.values()]
        out[name] = {"mean_slice_iou": round(float(np.mean(ious)), 3), "max_painted_share": round(max(shares), 2),
                     "joined_memory": int(sum(bool(p.joined_memory) for p in found.values()))}
        if name == "memory 8, before":
            out["ranking_on_the_drifting_run"] = ranking(found, truth)
    others = [z for z in range(len(stack)) if z != middle]
    out["otsu_mean_slice_iou"] = round(float(np.mean(
        [iou(otsu_mask(stack[z], stack[middle], annotation), truth[z] > 0) for z in others])), 3)
    out["truth_painted_share"] = [round(float(truth[z].astype(bool).mean()), 2) for z in (0, middle, len(stack) - 1)]
    return out


def ranking(found: dict, truth) -> dict:
    from scipy.stats import spearmanr

    slices = sorted(found)
    true = np.array([iou(found[z].labels > 0, truth[z] > 0) for z in slices])
    painted = {z for z in slices if np.mean(found[z].labels > 0) > 0.9}
    out = {"slices_painted_over_90pct": len(painted), "worst_third": len(slices) // 3}
    for name, score in (("with gross_error", [found[z].quality for z in slices]),
                        ("without", [found[z].quality / found[z].quality_features["gross_error"] for z in slices])):
        worst = {slices[i] for i in np.argsort(score, kind="stable")[:len(slices) // 3]}
        out[name] = {"painted_in_worst_third": len(worst & painted),
                     "spearman": round(float(spearmanr(score, true)[0]), 3)}
    return out


def generated(model, kind: str, seeds) -> dict:
    from seggpt_plugins.scenes import annotated_frame, moving_objects

    per_run = {name: {"foreground_iou": [], "object_iou": [], "max_painted_share": []} for name in RUNS}
    for seed in seeds:
        frames, truth = moving_objects(kind, seed)
        origin = annotated_frame(kind, len(frames))
        ids = [i for i in np.unique(truth[origin]) if i]
        for name, option in RUNS.items():
            found = run(model, frames, {origin: truth[origin]}, **option)
            scores = per_run[name]
            scores["foreground_iou"].append(np.mean([iou(p.labels > 0, truth[z] > 0) for z, p in found.items()]))
            scores["object_iou"].append(np.mean([iou(p.labels == i, truth[z] == i) for z, p in found.items()
                                                 for i in ids if (truth[z] == i).any() or (p.labels == i).any()]))
            scores["max_painted_share"].append(max(float(np.mean(p.labels > 0)) for p in found.values()))
    return {name: {key: round(float(np.mean(values) if key != "max_painted_share" else np.max(values)), 3)
                   for key, values in scores.items()} for name, scores in per_run.items()}


def main() -> None:
    from seggpt_plugins.propagation import MEMORY_SHARE_FACTOR
    from seggpt_plugins.quality import GROSS_SHARE

    model, args = model_and_args(__doc__)
    result = {"model": args.model, "device": args.device, "memory_share_factor": MEMORY_SHARE_FACTOR,
              "gross_share": GROSS_SHARE, "stardist_3d": stardist(model)}
    for kind in ("video", "stack"):
        result[f"generated {kind}, design seeds {list(DESIGN_SEEDS)}"] = generated(model, kind, DESIGN_SEEDS)
        result[f"generated {kind}, held-out seeds {list(HELD_OUT_SEEDS)}"] = generated(model, kind, HELD_OUT_SEEDS)
    report(result, args.out)


if __name__ == "__main__":
    main()
