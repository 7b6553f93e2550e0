"""Large images: a whole microscopy field segmented tiled vs downscaled, with the demo model.

    python benchmarks/eval_tiling.py [--model demo] [--out benchmarks/results/eval_tiling_cpu.json]

Data: stardist's full 512x512 nuclei field (ships in seggpt_plugins/demo/samples). The example is its
top-left 128x128 tile with the foreground mask; the target is the whole field. Foreground IoU against
the ground truth (all of it, the example tile included), and time per megapixel (best of two, the
settings alternated), for: the field downscaled to the model's canvas (no tiling), `tile="auto"` (the
example's size, 128, halo 16) and 160-pixel tiles (halo 16).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _report import report

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "seggpt_plugins" / "demo" / "samples"


def main() -> None:
    from tifffile import imread

    from seggpt_plugins import SegGPT
    from seggpt_plugins.ensembles import tile_grid

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = SegGPT.from_pretrained(args.model, device=args.device)
    image, truth = imread(SAMPLES / "nuclei2d.tif"), imread(SAMPLES / "nuclei2d_mask.tif") > 0
    intensity = (float(np.percentile(image, 0.5)), float(np.percentile(image, 99.8)))
    prompts = model.prepare_prompts(image[:128, :128], (truth[:128, :128]).astype(np.uint8), intensity)
    settings = {"downscaled": dict(tile=None), "tile_auto_128": dict(tile="auto", halo=16),
                "tile_160": dict(tile=160, halo=16)}
    best = {name: float("inf") for name in settings}
    ious = {}
    for _ in range(2):
        for name, options in settings.items():
            started = time.perf_counter()
            labels = model.segment(image, prompts, intensity_range=intensity, **options)[0].labels > 0
            best[name] = min(best[name], time.perf_counter() - started)
            ious[name] = float((labels & truth).sum() / (labels | truth).sum())
    megapixels = image.size / 1e6
    results = {name: {"foreground_iou": round(ious[name], 4), "s_per_megapixel": round(best[name] / megapixels, 2),
                      "tiles": len(tile_grid(image.shape, (128, 128) if name == "tile_auto_128" else (160, 160), 16))
                      if name != "downscaled" else 1} for name in settings}
    report({"model": args.model, "device": args.device, "image": "stardist nuclei2d, 512x512", "results": results},
           args.out)


if __name__ == "__main__":
    main()
