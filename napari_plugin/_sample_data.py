"""Sample data: the real nuclei images shipped with seggpt_plugins (from the stardist wheel, BSD-3).

Only tifffile and numpy are needed here: opening a sample does not load torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: Slices of the 3D stack that the sample annotates from the ground truth (the rest is left to SegGPT).
ANNOTATED_SLICES = (5, 15, 25)


def samples_dir() -> Path:
    import seggpt_plugins

    return Path(seggpt_plugins.__file__).parent / "demo" / "samples"


def _read(name: str) -> np.ndarray:
    import tifffile

    return tifffile.imread(samples_dir() / name)


def nuclei3d():
    """31x61x57 uint16 nuclei stack; the Labels layer holds the ground truth of three slices only."""
    image = _read("nuclei3d.tif")
    truth = _read("nuclei3d_mask.tif")
    labels = np.zeros_like(truth)
    for z in ANNOTATED_SLICES:
        labels[z] = truth[z]
    return [
        (image, {"name": "nuclei3d", "axis_labels": ("z", "y", "x")}, "image"),
        (labels, {"name": "nuclei3d annotations", "opacity": 0.6, "axis_labels": ("z", "y", "x")}, "labels"),
    ]


def nuclei2d():
    """512x512 uint16 nuclei image split in two: the left half with its labels is the example,
    the right half is the target for "Segment targets"."""
    image = _read("nuclei2d.tif")
    truth = _read("nuclei2d_mask.tif")
    half = image.shape[1] // 2
    return [
        (image[:, :half].copy(), {"name": "nuclei2d example"}, "image"),
        (truth[:, :half].copy(), {"name": "nuclei2d example labels", "opacity": 0.6}, "labels"),
        (image[:, half:].copy(), {"name": "nuclei2d target", "translate": (0, half + 16)}, "image"),
    ]
