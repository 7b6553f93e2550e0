"""Does a foreground margin help whatever the examples' ids are read as? (section 19)

    cd benchmarks && OMP_NUM_THREADS=2 python eval_margin_classes.py --out results/eval_margin_classes.json

Stardist's 2D image (ships in seggpt_plugins/demo/samples) in 16 tiles of 128 px, each tile in turn the one
example with its instance labels (a nucleus, an id), the other 15 the targets; the demo model read with
margins 0 and 0.7 (colors.favour_background; the margin measured against the nearest label's colour, and
against the nearest blend of the two nearest labels' colours, colors.MARGIN_AGAINST_BLENDS), the example's
ids read three ways: as the foreground (one class, eval_demo.py's case), as objects (`example_ids=
"instances"`: shown as their foreground, section 13) and as classes (`example_ids="classes"`: each nucleus
its own colour, what Label Studio's and FiftyOne's label maps and napari's "labels" output pass). Mean
foreground IoU of the targets; examples in the left half of the image are the design runs, in the right
half the report (section 13's split). And, as eval_foreground_margin.py chose the margin, generated tasks
from seed 40,000,000 (120, 1 and 3 examples, mIoU; some tasks have several classes), a design set for both.
"""

from __future__ import annotations

import numpy as np

MARGINS = (0.0, 0.7)
RULES = (False, True)  # colors.MARGIN_AGAINST_BLENDS
READINGS = {"foreground": None, "objects": "instances", "classes": "classes"}


def main() -> None:
    import warnings

    from _report import model_and_args, report
    from eval_demo import SAMPLES, TILE, foreground_iou
    from tifffile import imread

    from seggpt_plugins import colors
    from seggpt_plugins.evaluation import evaluate_generated

    warnings.simplefilter("ignore")
    model, args = model_and_args(__doc__)
    image, truth = imread(SAMPLES / "nuclei2d.tif"), imread(SAMPLES / "nuclei2d_mask.tif")
    corners = [(r, c) for r in range(0, image.shape[0], TILE) for c in range(0, image.shape[1], TILE)]
    tiles = [image[r:r + TILE, c:c + TILE] for r, c in corners]
    labels = [truth[r:r + TILE, c:c + TILE] for r, c in corners]
    intensity = (float(np.percentile(image, 0.5)), float(np.percentile(image, 99.8)))
    split = ["design" if c < image.shape[1] // 2 else "report" for _, c in corners]
    means = {}
    for margin, blends in [(0.0, False)] + [(m, rule) for m in MARGINS if m for rule in RULES]:
        model.foreground_margin, colors.MARGIN_AGAINST_BLENDS = margin, blends
        name = f"margin {margin}" + (", against blends" if blends else "")
        for reading, example_ids in READINGS.items():
            ious = {"design": [], "report": []}
            for k in range(len(tiles)):
                example = (labels[k] > 0).astype(np.uint8) if example_ids is None else labels[k]
                targets = [j for j in range(len(tiles)) if j != k]
                found = model.segment([tiles[j] for j in targets], tiles[k], example, batch_size=16,
                                      intensity_range=intensity, example_ids=example_ids or "auto")
                ious[split[k]] += [foreground_iou(p.labels > 0, labels[j] > 0) for j, p in zip(targets, found)]
            for half, values in ious.items():
                means[f"{name}, {reading}, {half}"] = round(float(np.mean(values)), 3)
            print({key: value for key, value in means.items() if key.startswith(f"{name}, {reading}")}, flush=True)
        for shots in (1, 3):
            means[f"{name}, generated {shots}-shot mIoU, design"] = evaluate_generated(
                model, tasks=120, prompts=shots, seed=40_000_000)["miou"]
        print({key: value for key, value in means.items() if key.startswith(f"{name}, generated")}, flush=True)
    report({"model": args.model, "device": args.device, "mean_foreground_iou": means}, args.out)


if __name__ == "__main__":
    main()
