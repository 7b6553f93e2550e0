"""Image series: a folder of images becomes napari layers the widget can label and segment.

Images of one shape become one stack of 2D images (axis "image"), the file names kept in the layer's
metadata (so Export writes one file per image, under its own name); images of several shapes become
one layer each. Files are read with the core's `images.read_image` (EXIF orientation, 16-bit, TIFF).
No Qt here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seggpt_plugins.vocabulary import IMAGE_SUFFIXES
from seggpt_plugins.errors import InputError
from seggpt_plugins.images import read_image

SERIES_KEY = "seggpt_series"  # image layer metadata: the file names of a stack of 2D images


@dataclass
class Series:
    """The images of a folder, in file name order."""

    folder: Path
    names: list[str]  # file names, relative to the folder
    images: list[np.ndarray]

    @property
    def stackable(self) -> bool:
        """All images have one shape and dtype: they can be one stack of 2D images."""
        return len({(im.shape, im.dtype) for im in self.images}) == 1


def image_files(folder) -> list[Path]:
    """The image files directly in `folder` (sorted by name; hidden files left out)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise InputError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def read_series(folder) -> Series:
    """Every image of `folder`, each a 2D grey or RGB(A) image; InputError names a file that is not."""
    files = image_files(folder)
    images = []
    for path in files:
        image = read_image(path)
        rgb = image.ndim == 3 and image.shape[-1] in (3, 4)
        if image.ndim != 2 and not rgb:
            raise InputError(f"{path}: shape {image.shape} is not a 2D image (grey or RGB); a series holds "
                             "2D images, open stacks on their own")
        images.append(image)
    return Series(Path(folder), [p.name for p in files], images)
