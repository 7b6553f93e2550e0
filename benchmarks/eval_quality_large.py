"""Large targets: does the estimate read on a bounded view rank 512x512 proposals as reading every pixel did?

    OMP_NUM_THREADS=1 python benchmarks/eval_quality_large.py --out benchmarks/results/eval_quality_large_cpu.json

The sets of eval_quality.py hold targets of at most 128 pixels a side, which the estimate reads whole. Here
every target is about 512 pixels a side. Each is segmented once by the demo model (quality off), then
judged by the fast estimate (the shipped curves) with its features read
- at every pixel: quality.py as it was at --before (its FEATURE_SIDE was 512), with its own ExampleStats;
- on a view of at most S pixels a side, for each S of --sides: today's quality.py with FEATURE_SIDE = S.
Sets: generated tasks drawn at 512x512 (synthetic.py; "choice": quality_fit.FIT_SEED, the set the side is
chosen on; "held_out": quality_fit.HELD_OUT_SEED; 1-3 examples, mean IoU over labels), and eval_quality's
stardist 2D tiles enlarged 4x and 3D slices enlarged 8x (bilinear images, nearest masks; examples alike;
foreground IoU). Per set and reading: Spearman with the true IoU, the worst 10% found among the lowest 20%,
and the median ms per target of the estimate (features, object context, curve) on one thread.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from _report import report
from bench_quality_host import estimate_with, module_at
from eval_quality import judge, nuclei_2d, nuclei_3d


def generated_cases(model, count: int, seed: int, size: int = 512):
    """[(target rgb, example rgbs, example masks, seg_type, IoU of a prediction's labels)] of `count` tasks."""
    from seggpt_plugins.colors import ColorCode
    from seggpt_plugins.quality import agreement
    from seggpt_plugins.synthetic import SyntheticTasks

    generator = SyntheticTasks(size, device="cpu")
    to_np = lambda t: t.permute(1, 2, 0).round().clamp(0, 255).byte().numpy()  # noqa: E731
    cases = []
    for k in range(count):
        count_k = (1, 2, 3)[k % 3]
        batch = generator.sample(1, prompts=count_k, seed=seed + k)
        images = [to_np(batch.prompt_images[0, i] * 255) for i in range(count_k)]
        masks = [to_np(batch.prompt_masks[0, i]) for i in range(count_k)]
        truth = to_np(batch.target_masks[0])
        if not any(m.any() for m in masks):
            continue  # not a task (as quality_fit.generated_samples)
        code, prompt_code = ColorCode.from_masks(masks + [truth]), ColorCode.from_masks(masks)
        true_labels = code.labels_of_colors(truth)

        def iou(labels, code=code, prompt_code=prompt_code, true_labels=true_labels):
            return agreement(code.labels_of_colors(prompt_code.encode(labels)), true_labels)

        cases.append((to_np(batch.target_images[0] * 255), images, masks, batch.seg_type, iou))
    return cases


def enlarged(cases, factor: int):
    """eval_quality's real cases, every image `factor` times larger (bilinear), masks alike (nearest)."""
    from scipy import ndimage

    from seggpt_plugins.quality import agreement

    out = []
    for target, example, mask, truth in cases:
        grow = lambda image, order: ndimage.zoom(image, factor, order=order)  # noqa: E731
        big_truth = grow(truth.astype(np.uint8), 0) > 0
        out.append((grow(target, 1), [grow(example, 1)], [grow(mask, 0)], "semantic",
                    lambda labels, big_truth=big_truth: agreement(labels != 0, big_truth)))
    return out


def judged(model, before, cases, sides) -> dict:
    """Every reading of the fast estimate on each case's prediction, against the true IoUs."""
    from seggpt_plugins import quality

    models = quality.models_for("demo")
    readings = {"every_pixel": [], **{f"side_{s}": [] for s in sides}}
    times = {name: [] for name in readings}
    ious, snaps = [], []
    for target, images, masks, seg_type, iou in cases:
        prompts = model.prepare_prompts(images, masks)
        prediction = model.segment(target, prompts, seg_type=seg_type, quality=None)[0]
        rgb = np.repeat(target[..., None], 3, -1) if target.ndim == 2 else target
        label_masks = [prompts.code.labels_of_colors(m) if m.ndim == 3 else m for m in masks]
        rgbs = [np.repeat(i[..., None], 3, -1) if i.ndim == 2 else i for i in images]
        old_stats = before.ExampleStats.of(label_masks, rgbs)
        ious.append(iou(prediction.labels))
        snaps.append(prediction.snap_confidence)
        for name in readings:
            module, stats = (before, old_stats) if name == "every_pixel" else (quality, prompts.examples)
            saved = quality.FEATURE_SIDE
            quality.FEATURE_SIDE = int(name.split("_")[1]) if name != "every_pixel" else saved
            try:
                started = time.perf_counter()
                readings[name].append(estimate_with(module, models, prediction, stats, rgb))
                times[name].append(1000 * (time.perf_counter() - started))
            finally:
                quality.FEATURE_SIDE = saved
    out = {"targets": len(ious), "mean_iou": round(float(np.mean(ious)), 3),
           "snap": judge(snaps, ious, calibrated=False)}
    for name, scores in readings.items():
        out[name] = {**judge(scores, ious, calibrated=False), "ms_per_target": round(float(np.median(times[name])), 2)}
    return out


def main() -> None:
    import torch

    from seggpt_plugins import SegGPT
    from seggpt_plugins.quality_fit import FIT_SEED, HELD_OUT_SEED

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--choice-tasks", type=int, default=90)
    parser.add_argument("--held-out-tasks", type=int, default=150)
    parser.add_argument("--sides", type=int, nargs="+", default=[128, 192, 256])
    parser.add_argument("--before", default="9c16bf0")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    model = SegGPT.from_pretrained("demo", device="cpu")
    before = module_at(args.before)
    sets = {"choice": lambda: generated_cases(model, args.choice_tasks, FIT_SEED),
            "held_out": lambda: generated_cases(model, args.held_out_tasks, HELD_OUT_SEED),
            "nuclei_2d_x4": lambda: enlarged(nuclei_2d(), 4), "nuclei_3d_x8": lambda: enlarged(nuclei_3d(), 8)}
    results = {}
    for name, make in sets.items():
        results[name] = judged(model, before, make(), args.sides)
        print(name, results[name], flush=True)
    report({"model": "demo", "before": args.before, "sides": args.sides, "results": results}, args.out)


if __name__ == "__main__":
    main()
