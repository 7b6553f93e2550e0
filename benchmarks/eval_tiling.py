"""Large images: a whole microscopy field segmented tiled vs downscaled, and how "auto" picks the tile.

    OMP_NUM_THREADS=1 python benchmarks/eval_tiling.py [--model demo] [--out benchmarks/results/eval_tiling_cpu.json]

Data: stardist's full 512x512 nuclei field (ships in seggpt_plugins/demo/samples); foreground IoU against
its ground truth. Two setups, each run with the demo model in one process:

- small example: the field's top-left 128x128 tile with its mask is the example, the whole field the
  target (IoU over the whole field, the example tile included). Downscaled to the model's canvas vs
  tiled (`tile="auto"`, 160, with halo 16), with time per megapixel (best of two, settings alternated).
- large example: the whole annotated left half (512x256) is the example, the right half the target
  (IoU on the right half only). Here the examples' own size is the target's size, so "tile at the
  examples' size" is the downscaled run; `tile="auto"` cuts both to a few object diameters
  (`OBJECTS_PER_TILE`, swept 4..12 here), and "tile 128, example whole" tiles the target but shows the
  example downscaled (what prompt windows fix).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from _report import model_and_args, report

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "seggpt_plugins" / "demo" / "samples"
HALO = 16


def iou(labels: np.ndarray, truth: np.ndarray) -> float:
    return round(float((labels & truth).sum() / (labels | truth).sum()), 4)


def small_example(model, image, truth, intensity) -> dict:
    from seggpt_plugins.ensembles import object_tile

    example = (image[:128, :128], truth[:128, :128].astype(np.uint8))
    settings = {"downscaled": None, "tile_auto": "auto", "tile_160": 160}
    best, ious = {name: float("inf") for name in settings}, {}
    for _ in range(2):
        for name, tile in settings.items():
            prompts = model.prepare_prompts(*example, intensity, tile=tile)
            started = time.perf_counter()
            labels = model.segment(image, prompts, intensity_range=intensity, tile=tile, halo=HALO)[0].labels > 0
            best[name] = min(best[name], time.perf_counter() - started)
            ious[name] = iou(labels, truth)
    megapixels = image.size / 1e6
    return {"auto_tile": object_tile([example[1]]),
            **{name: {"foreground_iou": ious[name], "s_per_megapixel": round(best[name] / megapixels, 2)}
               for name in settings}}


def large_example(model, image, truth, intensity) -> dict:
    from seggpt_plugins.ensembles import object_diameter, object_tile

    example = (image[:, :256], truth[:, :256].astype(np.uint8))
    target, target_truth = image[:, 256:], truth[:, 256:]
    run = lambda prompts, tile: iou(model.segment(  # noqa: E731
        target, prompts, intensity_range=intensity, tile=tile, halo=HALO)[0].labels > 0, target_truth)
    results = {"object_diameter": round(object_diameter([example[1]]), 1),
               "downscaled (= tile at the example's size)": run(model.prepare_prompts(*example, intensity), None),
               "tile 128, example whole": run(model.prepare_prompts(*example, intensity), 128)}
    for per_tile in (4, 6, 8, 12):
        tile = object_tile([example[1]], per_tile)
        results[f"auto, {per_tile} objects per tile ({tile[0]} px)"] = run(
            model.prepare_prompts(*example, intensity, tile=tile), tile)
    return results


def main() -> None:
    from tifffile import imread

    model, args = model_and_args(__doc__)
    image, truth = imread(SAMPLES / "nuclei2d.tif"), imread(SAMPLES / "nuclei2d_mask.tif") > 0
    intensity = (float(np.percentile(image, 0.5)), float(np.percentile(image, 99.8)))
    report({"model": args.model, "device": args.device, "image": "stardist nuclei2d, 512x512", "halo": HALO,
            "small_example": small_example(model, image, truth, intensity),
            "large_example": large_example(model, image, truth, intensity)}, args.out)


if __name__ == "__main__":
    main()
