"""Feature vs spatial vs both context ensembles, at K = 1, 2, 4, 8, 16 examples, with the demo model.

    python benchmarks/eval_ensembles.py [--model demo] [--tasks 48] [--out benchmarks/results/eval_ensembles_cpu.json]

1. Held-out generated tasks (semantic family, fixed seeds never used in training): mIoU over the
   prompts' classes, the target read through the prompts' colour code.
2. Real nuclei (stardist's 2D image, 16 tiles of 128x128): 8 target tiles; for each, the K examples are
   the next K tiles (cyclically) with their foreground masks; foreground IoU against ground truth.
Each side is timed per target (the same targets, the same machine, in the same run).

The paper's figure leaves the target half of the spatial ensemble open. Three layouts are measured at
K = 4 and 16 (see docs/ensembles.md): `full` (the target at full size, what the engine does), `cell`
(the target tiled in the same grid as the examples, the prediction read from its first cell) and
`average` (the same, the paintings of all cells averaged).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from _report import report

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "seggpt_plugins" / "demo" / "samples"
TILE = 128


def generated_tasks(model, count: int, examples: int, seed: int = 20_240_403):
    """[(target rgb, [prompt rgb], [prompt colour mask], truth colour mask)] of held-out semantic tasks."""
    from seggpt_plugins.synthetic import SyntheticTasks

    generator = SyntheticTasks(model.input_size[0], device="cpu")
    to_np = lambda t: t.permute(1, 2, 0).round().clamp(0, 255).byte().numpy()  # noqa: E731
    tasks = []
    for k in range(count):
        batch = generator.sample(1, prompts=examples, seed=seed + k, family="semantic")
        tasks.append((to_np(batch.target_images[0] * 255), [to_np(batch.prompt_images[0, i] * 255)
                                                             for i in range(examples)],
                      [to_np(batch.prompt_masks[0, i]) for i in range(examples)], to_np(batch.target_masks[0])))
    return tasks


def miou(predicted, truth, ids) -> list[float]:
    out = []
    for i in ids:
        union = np.logical_or(predicted == i, truth == i).sum()
        if union:
            out.append(float(np.logical_and(predicted == i, truth == i).sum() / union))
    return out


def predict(model, target, images, masks, ensemble: str, layout: str = "full"):
    """Labels of `target` (in the prompts' colour code) with one ensemble and target layout."""
    import torch

    from seggpt_plugins.colors import ColorCode, snap
    from seggpt_plugins.ensembles import cells, grid_side, stitch_examples

    if layout == "full" or len(images) == 1:
        return model.segment(target, images, masks, ensemble=ensemble, seg_type="semantic")[0].labels
    side = grid_side(len(images))
    prompts = model.prepare_prompts(images, masks, ensemble="spatial")
    canvas, _ = stitch_examples([target] * side * side, [np.zeros_like(target)] * side * side, model.input_size)
    painting = model.segment(canvas, prompts, seg_type="semantic", with_painting=True)[0].painting
    grid = cells(model.input_size, side)
    crops = [painting[r0:r1, c0:c1] for r0, r1, c0, c1 in (grid[:1] if layout == "cell" else grid)]
    size = (target.shape[1], target.shape[0])
    from PIL import Image

    mean = np.mean([np.asarray(Image.fromarray(c).resize(size, Image.BILINEAR), np.float32) for c in crops], axis=0)
    code = prompts.code
    colors = torch.as_tensor(code.all_colors, dtype=torch.float32)[None]
    index, _ = snap(torch.from_numpy(mean).permute(2, 0, 1)[None], colors)
    return code.all_ids[index[0].numpy()]


def main() -> None:
    from tifffile import imread

    from seggpt_plugins import SegGPT
    from seggpt_plugins.colors import ColorCode

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", type=int, default=48)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = SegGPT.from_pretrained(args.model, device=args.device)

    image, truth = imread(SAMPLES / "nuclei2d.tif"), imread(SAMPLES / "nuclei2d_mask.tif") > 0
    lo, hi = np.percentile(image, (0.5, 99.8))
    image8 = np.clip((image.astype(np.float32) - lo) / (hi - lo) * 255 + 0.5, 0, 255).astype(np.uint8)
    corners = [(r, c) for r in range(0, 512, TILE) for c in range(0, 512, TILE)]
    tiles = [np.repeat(image8[r:r + TILE, c:c + TILE, None], 3, -1) for r, c in corners]
    masks = [truth[r:r + TILE, c:c + TILE].astype(np.uint8) for r, c in corners]
    targets = list(range(0, 16, 2))

    def run(count: int, ensemble: str, layout: str, tasks) -> dict:
        scores, nuclei, seconds, calls = [], [], 0.0, 0
        for target, images, prompt_masks, truth_rgb in tasks:
            code = ColorCode.from_masks(prompt_masks + [truth_rgb])
            started = time.perf_counter()
            labels = predict(model, target, images, prompt_masks, ensemble, layout)
            seconds += time.perf_counter() - started
            calls += 1
            predicted = code.labels_of_colors(ColorCode.from_masks(prompt_masks).encode(labels))
            scores += miou(predicted, code.labels_of_colors(truth_rgb), code.ids)
        for t in targets:
            examples = [(t + 1 + j) % 16 for j in range(count)]
            started = time.perf_counter()
            labels = predict(model, tiles[t], [tiles[j] for j in examples], [masks[j] for j in examples], ensemble,
                             layout)
            seconds += time.perf_counter() - started
            calls += 1
            union = np.logical_or(labels > 0, masks[t] > 0).sum()
            nuclei.append(float(np.logical_and(labels > 0, masks[t] > 0).sum() / union) if union else 1.0)
        return {"generated_miou": round(float(np.mean(scores)), 4), "nuclei_foreground_iou": round(float(np.mean(nuclei)), 4),
                "ms_per_target": round(1000 * seconds / calls, 1)}

    results = {}
    for count in args.counts:
        tasks = generated_tasks(model, args.tasks, count)
        row = {ensemble: run(count, ensemble, "full", tasks) for ensemble in ("feature", "spatial", "both")}
        if count in (4, 16):
            for layout in ("cell", "average"):
                row[f"spatial_{layout}"] = run(count, "spatial", layout, tasks)
        results[str(count)] = row
        print(count, json.dumps(row), flush=True)
    report({"model": args.model, "device": args.device, "generated_tasks": args.tasks, "nuclei_targets": len(targets),
            "results": results}, args.out)


if __name__ == "__main__":
    main()
