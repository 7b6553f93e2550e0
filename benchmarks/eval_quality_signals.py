"""Per-image quality: candidate signals measured and not adopted (docs/quality.md, "four more signals").

    OMP_NUM_THREADS=1 python benchmarks/eval_quality_signals.py [--tasks 150] [--out results.json]

On the sets of eval_quality.py (held-out generated tasks, stardist 2D tiles, 3D slices), the Spearman
rank correlation with the true IoU of: today's fast estimate; the per-object estimates of
`Prediction.instances()` pooled per image (area-weighted, plain mean, rank sum with the fast estimate);
cycle consistency (the example segmented back from the target and its proposal, against the example's
own mask; real sets only); the proposal's IoU with the naive model's soft foreground, and the share of
the target that model expects to be foreground; and the likeness
of target and example (the histogram and thumbnail parts of `prompts.describe`). Also, on the 3D slices,
how the IoU follows the true and the example's foreground area.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
from _report import report
from eval_quality import nuclei_2d, nuclei_3d


def pooled(pred) -> dict[str, float]:
    objects = [o for o in pred.instances().objects if o.quality is not None]
    if not objects:
        return {"objects_area_mean": 0.0, "objects_mean": 0.0}
    quality, area = np.array([o.quality for o in objects]), np.array([o.area for o in objects], float)
    return {"objects_area_mean": float((quality * area).sum() / area.sum()), "objects_mean": float(quality.mean())}


def soft_iou(pred) -> float:
    """The proposal's IoU with the naive model's P(foreground), read as a soft mask."""
    context = pred.object_context
    if context is None:
        return 0.5
    p = context.foreground.astype(np.float64) / 255
    painted = (pred.labels[::context.stride, ::context.stride] != 0)[: p.shape[0], : p.shape[1]]
    union = painted.sum() + p[~painted].sum()
    return float(p[painted].sum() / union) if union else 1.0


def naive_share(pred) -> float:
    """The share of the target the naive model expects to be foreground (mean P(foreground))."""
    context = pred.object_context
    return float(context.foreground.mean() / 255) if context is not None else 0.5


def likeness(target, examples) -> dict[str, float]:
    from seggpt_plugins.prompts import describe

    t = describe(target)
    parts = {"likeness_thumbnail": slice(0, 256), "likeness_histogram": slice(256, 288),
             "likeness_gradients": slice(288, None)}
    return {name: float(np.mean([np.dot(t[part], describe(e)[part]) for e in examples])) for name, part in parts.items()}


def real_rows(model, cases) -> list[dict]:
    from seggpt_plugins.quality import agreement

    rows = []
    for target, example, mask, truth in cases:
        pred = model.segment(target, example, mask, seg_type="semantic", quality="fast")[0]
        painted = (pred.labels != 0).astype(np.uint8)
        back = model.segment(example, target, painted, seg_type="semantic", quality=None)[0] if painted.any() else None
        rows.append({"iou": agreement(pred.labels != 0, truth), "fast": pred.quality, **pooled(pred),
                     "cycle": agreement(back.labels != 0, mask > 0) if back is not None else 0.0,
                     "soft_iou": soft_iou(pred), "naive_share": naive_share(pred), **likeness(target, [example]),
                     "truth_area": float(truth.sum()), "example_area": float((mask > 0).sum()),
                     "painted_area": float(painted.sum())})
    return rows


def generated_rows(model, count: int) -> list[dict]:
    from seggpt_plugins.colors import ColorCode
    from seggpt_plugins.quality import agreement
    from seggpt_plugins.quality_fit import HELD_OUT_SEED
    from seggpt_plugins.synthetic import SyntheticTasks

    generator = SyntheticTasks(model.input_size[0], device="cpu")
    to_np = lambda t: t.permute(1, 2, 0).round().clamp(0, 255).byte().numpy()  # noqa: E731
    rows = []
    for k in range(count):
        prompts = (1, 2, 3)[k % 3]
        batch = generator.sample(1, prompts=prompts, seed=HELD_OUT_SEED + k)
        images = [to_np(batch.prompt_images[0, i] * 255) for i in range(prompts)]
        masks = [to_np(batch.prompt_masks[0, i]) for i in range(prompts)]
        truth = to_np(batch.target_masks[0])
        if not any(m.any() for m in masks):
            continue
        target = to_np(batch.target_images[0] * 255)
        pred = model.segment(target, images, masks, seg_type=batch.seg_type, quality="fast")[0]
        code, prompt_code = ColorCode.from_masks(masks + [truth]), ColorCode.from_masks(masks)
        iou = agreement(code.labels_of_colors(prompt_code.encode(pred.labels)), code.labels_of_colors(truth))
        rows.append({"iou": iou, "fast": pred.quality, **pooled(pred), "soft_iou": soft_iou(pred),
                     "naive_share": naive_share(pred), **likeness(target, images)})
    return rows


def spearmans(rows: list[dict]) -> dict[str, float]:
    from scipy.stats import rankdata, spearmanr

    iou = [r["iou"] for r in rows]
    out = {name: round(float(spearmanr([r[name] for r in rows], iou)[0]), 3)
           for name in rows[0] if name not in ("iou", "truth_area", "example_area", "painted_area")}
    ranks = rankdata([r["fast"] for r in rows]) + rankdata([r["objects_mean"] for r in rows])
    out["fast_plus_objects_mean"] = round(float(spearmanr(ranks, iou)[0]), 3)
    if "truth_area" in rows[0]:
        for name in ("truth_area", "example_area"):
            out[f"{name}_vs_iou"] = round(float(spearmanr([r[name] for r in rows], iou)[0]), 3)
        ratio = [r["example_area"] / max(r["truth_area"], 1.0) for r in rows]
        out["example_over_truth_area_vs_iou"] = round(float(spearmanr(ratio, iou)[0]), 3)
        out["painted_area_range"] = [min(r["painted_area"] for r in rows), max(r["painted_area"] for r in rows)]
    return out


def main() -> None:
    from seggpt_plugins import SegGPT

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=150, help="held-out generated tasks (0: the real sets only)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    model = SegGPT.from_pretrained("demo", device="cpu")
    results = {"nuclei_2d": spearmans(real_rows(model, nuclei_2d())),
               "nuclei_3d": spearmans(real_rows(model, nuclei_3d()))}
    if args.tasks:
        results["generated"] = spearmans(generated_rows(model, args.tasks))
    for name, values in results.items():
        print(name, values, flush=True)
    report({"sets": results, "tasks": args.tasks, "model": "demo"}, args.out)


if __name__ == "__main__":
    main()
