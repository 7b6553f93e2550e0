"""One intensity scale for a run (issue 30, item 2): 16-bit examples and targets read with one range.

    python benchmarks/eval_intensity_range.py [--model demo] [--out benchmarks/results/eval_intensity_range.json]

Stardist's 2D nuclei image (uint16, ships in seggpt_plugins/demo/samples) cut into tiles; each tile in turn
is the example (its foreground mask), the other tiles the targets; foreground IoU against the truth, the
demo model on this machine's CPU. Three readings of the 16-bit pixels, in the same run:

- `each_own`: every image stretched by its own 0.2-99.8 percentiles (before: a dim tile's background
  stretched up to look like an example's nuclei);
- `default`: the run's default now, one range from the examples (images.shared_range) for the example
  and every target that is not 8-bit;
- `whole_image`: the percentiles of the whole image (what a person would choose with --intensity-range).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLES = Path(__file__).resolve().parents[1] / "seggpt_plugins" / "demo" / "samples"


def tiles_of(image, truth, size):
    return [(image[r:r + size, c:c + size], truth[r:r + size, c:c + size] > 0)
            for r in range(0, image.shape[0], size) for c in range(0, image.shape[1], size)]


def iou(a, b) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def main() -> None:
    import tifffile

    from _report import model_and_args, report
    from seggpt_plugins.images import robust_range, to_rgb8

    model, args = model_and_args(__doc__)
    image = tifffile.imread(SAMPLES / "nuclei2d.tif")
    truth = tifffile.imread(SAMPLES / "nuclei2d_mask.tif")
    whole = robust_range(image)
    result = {"model": args.model, "device": args.device, "whole_image_range": whole, "sets": {}}
    for size in (128, 256):
        tiles = tiles_of(image, truth, size)
        scores = {"each_own": [], "default": [], "whole_image": []}
        for k, (example, mask) in enumerate(tiles):
            targets = [t for j, t in enumerate(tiles) if j != k]
            runs = {"each_own": dict(images=[to_rgb8(t) for t, _ in targets], example=to_rgb8(example)),
                    "default": dict(images=[t for t, _ in targets], example=example),
                    "whole_image": dict(images=[t for t, _ in targets], example=example, intensity_range=whole)}
            for mode, run in runs.items():
                predictions = model.segment(run["images"], run["example"], mask.astype(np.uint8), quality=None,
                                            intensity_range=run.get("intensity_range"))
                scores[mode] += [iou(p.labels > 0, t) for p, (_, t) in zip(predictions, targets)]
        result["sets"][f"{size} px tiles"] = {"targets": len(scores["default"]),
                                              **{f"iou_{m}": round(float(np.mean(v)), 3) for m, v in scores.items()}}
    report(result, args.out)


if __name__ == "__main__":
    main()
