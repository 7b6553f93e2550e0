"""A large image through `seggpt segment --tile auto` as a user runs it (issue 30, item 3).

    OMP_NUM_THREADS=1 python benchmarks/eval_large_image.py [--model demo] [--out benchmarks/results/eval_large_image.json]

Data: stardist's 512x512 nuclei field (seggpt_plugins/demo/samples, instance labels) enlarged (linear;
the labels nearest) to a large image; a corner crop of it, with its labels, is the example. The CLI is
run in a subprocess (`--tile auto --output instances`), the label PNG it writes read back. Per case:
- the tiling the CLI printed, and whether it showed a tile bar;
- the object count against the true count (goal 0.8-1.25x) and instance F1 at IoU 0.5;
- seams: foreground IoU on the pixels within SEAM px of a tile core's border, against IoU elsewhere
  (goal: within 0.05);
- Otsu with the same object step (ObjectRule(min_area=16, split_touching=True)) in the same run.
Two ways to give the example: its instance labels (read as objects) and its foreground mask with
--split-touching. Cases: the issue's (2000x2000, example the top-left 500x500) and another scale and
corner (1600x1600, example the bottom-right 400x400); nothing was tuned on either.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from eval_instance_examples import SAMPLES, instance_f1

SEAM = 4  # px either side of a tile core's border
CASES = {"2000x2000, example top-left 500 (the issue's)": (2000, 500, "top-left"),
         "1600x1600, example bottom-right 400": (1600, 400, "bottom-right")}


def enlarged(size: int):
    import tifffile
    from skimage.transform import resize

    image = tifffile.imread(SAMPLES / "nuclei2d.tif")
    truth = tifffile.imread(SAMPLES / "nuclei2d_mask.tif")
    big = resize(image.astype(np.float32), (size, size), order=1, preserve_range=True).astype(image.dtype)
    labels = resize(truth, (size, size), order=0, preserve_range=True, anti_aliasing=False).astype(np.uint16)
    return big, labels


def seam_band(shape, tile: int, halo: int) -> np.ndarray:
    """The pixels within SEAM of a border between two tile cores."""
    from seggpt_plugins.ensembles import tile_grid

    band = np.zeros(shape, bool)
    for t in tile_grid(shape, (tile, tile), halo):
        r0, r1, c0, c1 = t.core
        for r in (r0, r1):
            if 0 < r < shape[0]:
                band[max(0, r - SEAM):r + SEAM, c0:c1] = True
        for c in (c0, c1):
            if 0 < c < shape[1]:
                band[r0:r1, max(0, c - SEAM):c + SEAM] = True
    return band


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return round(float((a & b).sum() / max(1, (a | b).sum())), 3)


def judged(found: np.ndarray, truth: np.ndarray, band: np.ndarray | None) -> dict:
    count = len(np.unique(found)) - 1
    out = {"objects": count, "count_ratio": round(count / (len(np.unique(truth)) - 1), 3),
           "instance_f1": round(instance_f1(found, truth), 3)}
    if band is not None:
        out.update(iou_at_seams=iou((found > 0) & band, (truth > 0) & band),
                   iou_elsewhere=iou((found > 0) & ~band, (truth > 0) & ~band))
    return out


def run_case(model: str, size: int, crop: int, corner: str, folder: Path) -> dict:
    import tifffile
    from PIL import Image
    from skimage.filters import threshold_otsu
    from skimage.segmentation import relabel_sequential

    from seggpt_plugins.instances import ObjectRule

    big, truth = enlarged(size)
    window = (slice(0, crop), slice(0, crop)) if corner == "top-left" else (slice(-crop, None), slice(-crop, None))
    tifffile.imwrite(folder / "target.tif", big)
    tifffile.imwrite(folder / "example.tif", big[window])
    tifffile.imwrite(folder / "example_ids.tif", truth[window])
    tifffile.imwrite(folder / "example_mask.tif", (truth[window] > 0).astype(np.uint8))
    out = {"true_objects": len(np.unique(truth)) - 1}
    for name, mask, extra in (("instance labels", "example_ids.tif", []),
                              ("foreground mask, --split-touching", "example_mask.tif", ["--split-touching"])):
        run = subprocess.run([sys.executable, "-m", "seggpt_plugins.cli", "segment", "target.tif", "--prompt",
                              "example.tif", mask, "--tile", "auto", "--output", "instances", "--model", model,
                              "--out", "out", "--overwrite", *extra], cwd=folder, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(run.stderr)
        said = re.search(r"target\.tif: (\d+) tiles of (\d+)x(\d+) px, halo (\d+)", run.stderr)
        tile, halo = int(said.group(2)), int(said.group(4))
        found = relabel_sequential(np.asarray(Image.open(folder / "out" / "target_instances.png")).astype(np.int64))[0]
        out[name] = {"printed": said.group(0), "tile_bar_shown": "tiles:" in run.stderr,
                     **judged(found, truth, seam_band(truth.shape, tile, halo))}
    example, example_truth = big[window], truth[window] > 0
    threshold = threshold_otsu(big)
    bright = example[example_truth].mean() >= example[~example_truth].mean()
    binary = (big > threshold) if bright else (big < threshold)
    otsu = ObjectRule(min_area=16, split_touching=True).find(binary.astype(np.uint8)).map
    out["otsu, same object step"] = judged(otsu, truth, None)
    return out


def main() -> None:
    from _report import report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = {}
    for name, (size, crop, corner) in CASES.items():
        with tempfile.TemporaryDirectory() as folder:
            results[name] = run_case(args.model, size, crop, corner, Path(folder))
    report({"model": args.model, "seam_px": SEAM, "cases": results}, args.out)


if __name__ == "__main__":
    main()
