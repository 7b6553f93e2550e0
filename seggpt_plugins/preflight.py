"""Checks a run makes before its model loads, each failing in one line that names the file and the problem.

    check_out_of_inputs(out, sources)          # --out is neither an input folder nor inside one
    check_writable(out)                        # files can really be created there (probed)
    code = check_prompts(images, masks)        # readable, one size per pair, ids the colour prompt keeps apart
    bad = unreadable(paths)                    # {path: reason} of targets whose header cannot be read

Headers only: nothing here decodes a whole target image. Numpy and Pillow only (no torch).
"""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .colors import ColorCode
from .errors import InputError
from .example_ids import foreground, ids_are_objects
from .images import TIFF_SUFFIXES


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file from its header (a TIFF stack: of one plane); InputError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: an empty file (0 bytes), not an image")
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tif.series[0].shape
            shape = shape[-3:-1] if shape[-1] in (3, 4) and len(shape) >= 3 else shape[-2:]
            return int(shape[0]), int(shape[1])
        from PIL import Image

        with Image.open(path) as img:
            return (img.width, img.height) if _transposed(img) else (img.height, img.width)
    except Exception as exc:
        raise InputError(f"{path}: not a readable image file ({type(exc).__name__}: {exc})") from None


def _transposed(img) -> bool:
    """Whether the EXIF orientation swaps width and height (as `images.read_image` applies it)."""
    try:
        return img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:
        return False


def unreadable(paths: Iterable) -> dict[str, str]:
    """{path: one-line reason} for the local image files whose header cannot be read (URLs are not probed)."""
    bad = {}
    for path in paths:
        if "://" in str(path):
            continue
        try:
            image_size(path)
        except InputError as exc:
            bad[str(path)] = str(exc)
    return bad


def check_prompts(images: Sequence, masks: Sequence[np.ndarray], annotations: Sequence[np.ndarray] = (),
                  example_ids: str = "classes") -> ColorCode:
    """The colour code of example pairs, checked: each image readable and of its mask's size, the ids few
    enough for the colour prompt, and some foreground in at least one mask.

    Args:
        images: the example images (paths, or arrays).
        masks: their masks, read already (images.to_mask).
        annotations: masks of annotated frames or slices of the target itself (their size checked already).
        example_ids: what the masks' ids mean (example_ids.py): ids that are objects are one class.
    """
    for k, (image, mask) in enumerate(zip(images, masks)):
        if isinstance(image, (str, os.PathLike)):
            height, width = image_size(image)
        else:
            height, width = np.asarray(image).shape[:2]
        if mask.shape[:2] != (height, width):
            raise InputError(f"prompt {k} ({image}): mask size {mask.shape[1]}x{mask.shape[0]} differs from its image "
                             f"size {width}x{height} (width x height)")
    if masks and ids_are_objects(masks, example_ids):
        masks = [foreground(mask) for mask in masks]
    masks = [*masks, *annotations]
    if masks and not any(np.any(mask) for mask in masks):
        raise InputError("every example mask is all background (0): nothing to segment; give a mask that marks "
                         "the objects (label ids > 0)")
    return ColorCode.from_masks(masks)


def check_writable(folder) -> None:
    """InputError unless files can be created in `folder` (or in the folder it would be made in): a probe file
    is created and removed, so read-only mounts and pseudo-filesystems (/proc) are found as well."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{folder}: cannot be a folder, {probe} is a file")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise InputError(f"{folder}: cannot write there ({probe}: {exc.strerror or exc})") from None
    if probe != folder:
        try:  # a folder that cannot be made (e.g. under /proc) fails here rather than after the model
            trial = Path(tempfile.mkdtemp(prefix=".seggpt-probe-", dir=probe))
            trial.rmdir()
        except OSError as exc:
            raise InputError(f"{folder}: cannot be created ({probe}: {exc.strerror or exc})") from None


def input_folders(sources: Iterable[str]) -> list[Path]:
    """The local folders `sources` read from: folders themselves, and a glob's fixed part."""
    folders = []
    for source in map(str, sources):
        if "://" in source:
            continue
        if glob.has_magic(source):
            fixed = []
            for part in Path(source).parts:
                if glob.has_magic(part):
                    break
                fixed.append(part)
            folders.append(Path(*fixed) if fixed else Path("."))
        elif Path(source).is_dir():
            folders.append(Path(source))
    return folders


def check_out_of_inputs(out, sources: Iterable[str]) -> None:
    """InputError when the output folder is an input folder or inside one: its outputs would be the next
    run's inputs."""
    if "://" in str(out):
        return
    target = Path(out).resolve()
    for folder in input_folders(sources):
        root = folder.resolve()
        if target == root or root in target.parents:
            raise InputError(f"--out {out}: is inside the input folder {folder}, so the outputs would be read as "
                             "inputs by the next run; choose an output folder outside it")
