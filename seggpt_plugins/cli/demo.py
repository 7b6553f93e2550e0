"""`seggpt demo`: the whole pipeline offline, on the sample image and the demo model that ship with the package."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..vocabulary import DEMO_MODEL
from .options import add_inference, add_model, check_model_options, check_numbers, load_model

DEMO_SAMPLES = Path(__file__).resolve().parent.parent / "demo" / "samples"


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline offline on sample images that ship with the package")
    p.add_argument("--out", default="seggpt-demo", help="output folder (default: %(default)s)")
    add_model(p, model_default=DEMO_MODEL)
    add_inference(p)
    p.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from ..images import display_colors, overlay, read_image, scale_to_uint8
    from ..io import OutputSet
    from ..evaluation import iou_per_label

    check_numbers(args, batch_size=1)
    check_model_options(args)
    image = read_image(DEMO_SAMPLES / "nuclei2d.tif")
    truth = read_image(DEMO_SAMPLES / "nuclei2d_mask.tif")
    tile = 128
    tiles = [(r, c) for r in range(0, image.shape[0], tile) for c in range(0, image.shape[1], tile)]
    prompt_tile, target_tiles = tiles[0], tiles[5:9]
    out = Path(args.out)
    overlay_path = out / "demo_overlay.png"
    label_paths = [out / f"tile_{r}_{c}_labels.png" for r, c in target_tiles]
    outputs = OutputSet([overlay_path, *label_paths], overwrite=args.overwrite)
    crop = lambda a, rc: a[rc[0]:rc[0] + tile, rc[1]:rc[1] + tile]  # noqa: E731
    intensity = tuple(args.intensity_range) if args.intensity_range else (float(image.min()), float(np.percentile(image, 99.8)))
    model = load_model(args)
    started = time.time()
    prompt_mask = (crop(truth, prompt_tile) > 0).astype(np.uint8)  # nuclei vs background
    predictions = model.segment([crop(image, rc) for rc in target_tiles], crop(image, prompt_tile), prompt_mask,
                                batch_size=args.batch_size, seg_type=args.seg_type, intensity_range=intensity)
    seconds = time.time() - started
    colors = display_colors(predictions[0].colors)
    panels = [overlay(scale_to_uint8(crop(image, prompt_tile), intensity)[..., None].repeat(3, -1), prompt_mask, colors)]
    ious = []
    for rc, prediction in zip(target_tiles, predictions):
        panels.append(overlay(scale_to_uint8(crop(image, rc), intensity)[..., None].repeat(3, -1), prediction.labels,
                              colors))
        ious.append(iou_per_label(prediction.labels, (crop(truth, rc) > 0).astype(np.uint8), [1]).get(1, 0.0))
    gap = np.full((2 * tile, 6, 3), 255, np.uint8)
    panels = [p.repeat(2, axis=0).repeat(2, axis=1) for p in panels]  # 2x, nearest: small tiles read better
    strip = np.concatenate(sum(([p, gap] for p in panels), [])[:-1], axis=1)
    with outputs:
        outputs.write_png(overlay_path, strip)
        for path, prediction in zip(label_paths, predictions):
            outputs.write_png(path, prediction.labels)
    print(f"prompt: tile {prompt_tile} of the stardist nuclei image with its mask; targets: tiles {target_tiles}")
    print(f"segmented {len(predictions)} tiles in {seconds:.2f} s on {model.device}; "
          f"IoU against ground truth: {', '.join(f'{v:.3f}' for v in ious)} (mean {np.mean(ious):.3f})")
    print(f"wrote {overlay_path} (left: the prompt with its mask; then each target with SegGPT's prediction)")
    return 0
