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
import re
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .colors import ColorCode
from .errors import InputError
from .example_ids import foreground, ids_are_objects
from .images import TIFF_SUFFIXES, read_image, tiff_warnings_quiet


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

            with tiff_warnings_quiet(), tifffile.TiffFile(path) as tif:
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
                  example_ids: str = "classes", mask_names: Sequence | None = None) -> ColorCode:
    """The colour code of example pairs, checked: each image readable (a file: decoded whole, as the examples
    are few) and of its mask's size, the ids few enough for the colour prompt, and some foreground in at
    least one mask.

    Args:
        images: the example images (paths, or arrays).
        masks: their masks, read already (images.to_mask).
        annotations: masks of annotated frames or slices of the target itself (their size checked already).
        example_ids: what the masks' ids mean (example_ids.py): ids that are objects are one class.
        mask_names: the masks' files, named beside the image's in a size error.
    """
    for k, (image, mask) in enumerate(zip(images, masks)):
        if isinstance(image, (str, os.PathLike)):
            height, width = image_size(image)
            read_image(image)  # (a header can read well in a file cut short)
        else:
            height, width = np.asarray(image).shape[:2]
        if mask.shape[:2] != (height, width):
            which = f"{image}, mask {mask_names[k]}" if mask_names else f"{image}"
            raise InputError(f"prompt {k} ({which}): mask size {mask.shape[1]}x{mask.shape[0]} differs from its image "
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
        raise InputError(f"{folder}: cannot write there: {_why_not_writable(probe, exc)}") from None
    if probe != folder:
        try:  # a folder that cannot be made (e.g. under /proc) fails here rather than after the model
            trial = Path(tempfile.mkdtemp(prefix=".seggpt-probe-", dir=probe))
            trial.rmdir()
        except OSError as exc:
            raise InputError(f"{folder}: cannot be created: {_why_not_writable(probe, exc)}") from None


PSEUDO_FILESYSTEMS = {"proc", "sysfs", "devtmpfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs",
                      "configfs", "pstore", "bpf", "efivarfs"}


def _why_not_writable(folder: Path, exc: OSError) -> str:
    """Why files cannot be created in the existing `folder`, for people (its errno read plainly: /proc
    answers 'No such file or directory', which misleads)."""
    import errno

    fs = _filesystem_type(folder)
    if fs in PSEUDO_FILESYSTEMS:
        return f"{folder} is on a {fs} pseudo-filesystem, where files cannot be created"
    if exc.errno == errno.EROFS:
        return f"{folder} is on a read-only filesystem"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"you have no permission to create files in {folder}"
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device of {folder}"
    if exc.errno == errno.ENOENT:
        return f"{folder} does not accept new files" + (f" (a {fs} filesystem)" if fs else "")
    return f"{folder}: {exc.strerror or exc}"


def _filesystem_type(folder: Path) -> str | None:
    """The type of the filesystem `folder` is on, from /proc/self/mounts (None where that cannot be read)."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    resolved, best, kind = str(Path(folder).resolve()), "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])  # a space is \040
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


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
