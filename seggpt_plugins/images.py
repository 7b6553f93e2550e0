"""Reading images and masks (files, bytes, arrays), intensity scaling to 8-bit RGB, label maps, overlays.

Images are read as a viewer shows them: EXIF orientation applied, palette (mode P) images as RGB.
Masks keep what they store: palette indices are label ids. Writing is in `io`. Numpy and Pillow only.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

#: Images with more pixels than this are refused (decompression bombs). Override with SEGGPT_MAX_PIXELS.
MAX_PIXELS = int(os.environ.get("SEGGPT_MAX_PIXELS", 2**27))  # 134 M pixels, e.g. 11585 x 11585

#: Percentiles used to scale images that are not 8-bit when no intensity range is given.
ROBUST_PERCENTILES = (0.5, 99.8)

TIFF_SUFFIXES = {".tif", ".tiff"}


def _check_pixels(shape: tuple[int, ...], name: str) -> None:
    pixels = int(np.prod(shape[:2])) if len(shape) >= 2 else 0
    if pixels > MAX_PIXELS:
        raise InputError(
            f"{name}: {shape[1]}x{shape[0]} = {pixels} pixels is more than the limit of {MAX_PIXELS} "
            "(refused as a possible decompression bomb; raise SEGGPT_MAX_PIXELS to allow it)"
        )


@contextmanager
def tiff_warnings_quiet():
    """tifffile logs what it finds wrong in a broken file (as errors) before it raises; within this, only the
    one-line error that names the file is said (its logger's level is restored after)."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_image(path: str | os.PathLike, as_mask: bool = False) -> np.ndarray:
    """Read an image file: (H, W), (H, W, C) or, for TIFF stacks, (Z, H, W[, C]); EXIF orientation applied.

    as_mask: keep palette indices (label ids) instead of converting a palette image to RGB.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        try:
            with tiff_warnings_quiet(), tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                _check_pixels(tuple(series.shape[-3:-1] if series.shape[-1] in (3, 4) else series.shape[-2:]), str(path))
                return series.asarray()
        except InputError:
            raise
        except Exception as exc:  # tifffile raises many types for broken files
            raise InputError(f"{path}: not a readable TIFF image ({exc})") from None
    return _decode(path, str(path), MAX_PIXELS, as_mask)


def decode_image(data: bytes, name: str = "image", max_pixels: int | None = None, as_mask: bool = False) -> np.ndarray:
    """Image file bytes (PNG, JPEG, TIFF page, ...) -> array, as `read_image` reads a file.

    Refused with InputError before decoding when the header announces more than `max_pixels` pixels.
    """
    return _decode(io.BytesIO(data), name, MAX_PIXELS if max_pixels is None else int(max_pixels), as_mask)


def _decode(source, name: str, max_pixels: int, as_mask: bool) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = max(MAX_PIXELS, max_pixels)
            with Image.open(source) as img:
                if img.width * img.height > max_pixels:
                    raise InputError(f"{name}: {img.width}x{img.height} = {img.width * img.height} pixels is more "
                                     f"than the limit of {max_pixels} (refused as a possible decompression bomb; "
                                     "raise SEGGPT_MAX_PIXELS to allow it)")
                img.load()
                return pil_to_array(ImageOps.exif_transpose(img), as_mask)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{name}: refused as a possible decompression bomb ({exc})") from None
    except Exception as exc:
        raise InputError(f"{name}: not a readable image file ({type(exc).__name__}: {exc})") from None


def pil_to_array(img, as_mask: bool = False) -> np.ndarray:
    """A PIL image as an array, keeping 16-bit and float data; palette images as RGB (images) or as their
    indices (masks, `as_mask`: the indices are the label ids)."""
    if img.mode in ("1",):
        return np.asarray(img, dtype=np.uint8)
    if img.mode in ("P", "PA"):
        if as_mask:
            return np.asarray(img.convert("P") if img.mode == "PA" else img)
        return np.asarray(img.convert("RGB"))
    if img.mode in ("L", "I", "F", "RGB", "RGBA", "LA", "I;16", "I;16B", "I;16L"):
        arr = np.asarray(img)
        return arr[..., 0] if img.mode == "LA" else arr
    return np.asarray(img.convert("RGB"))


def as_array(obj: Any, name: str = "image", as_mask: bool = False) -> np.ndarray:
    """Numpy array from a path, a PIL image, an array-like (numpy, dask, zarr, torch on CPU)."""
    if isinstance(obj, (str, os.PathLike)):
        return read_image(obj, as_mask)
    if type(obj).__module__.startswith("PIL."):
        return pil_to_array(obj, as_mask)
    try:
        arr = np.asarray(obj)
    except Exception as exc:
        raise InputError(f"{name}: cannot be read as an array ({type(obj).__name__}: {exc})") from None
    if arr.dtype == object:
        raise InputError(f"{name}: expected an image (array, PIL image or path), got {type(obj).__name__}")
    return arr


def robust_range(arr: np.ndarray) -> tuple[float, float]:
    """Intensity range by robust percentiles, ignoring NaN and infinities."""
    finite = arr[np.isfinite(arr)] if np.issubdtype(arr.dtype, np.floating) else arr
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, ROBUST_PERCENTILES)
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    return float(lo), float(hi)


def shared_range(images) -> tuple[float, float] | None:
    """One intensity range for a run's images that are not 8-bit (robust percentiles of their pixels pooled):
    the examples and every target of a run, or the frames of a stack, then share one mapping, where each
    image stretched by its own percentiles would not (a dim target's background painted as an example's
    nuclei). None when every image is 8-bit (or boolean), which is used as it is."""
    wide = [a for a in (np.asarray(i) for i in images) if a.dtype not in (np.uint8, np.bool_)]
    return robust_range(np.concatenate([a.ravel() for a in wide])) if wide else None


def scale_to_uint8(arr: np.ndarray, intensity_range: tuple[float, float] | None = None) -> np.ndarray:
    """Map any numeric array to uint8: as is for uint8, else linearly from `intensity_range` (or percentiles)."""
    if arr.dtype == np.uint8 and intensity_range is None:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    lo, hi = intensity_range if intensity_range is not None else robust_range(arr)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputError(f"intensity range must be two finite numbers, got ({lo}, {hi})")
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8) if hi == lo and not np.any(arr > lo) else np.full(arr.shape, 255, np.uint8)
    out = (np.nan_to_num(arr.astype(np.float32), nan=lo) - lo) * (255.0 / (hi - lo))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def to_rgb8(obj: Any, intensity_range: tuple[float, float] | None = None, name: str = "image") -> np.ndarray:
    """Any image as (H, W, 3) uint8 RGB: grayscale is repeated, alpha dropped, 16-bit/float scaled."""
    arr = as_array(obj, name)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(scale_to_uint8(arr, intensity_range)[..., None], 3, axis=-1)
    elif arr.ndim == 3 and arr.shape[-1] in (2, 3, 4):
        if arr.shape[-1] == 2:  # gray + alpha
            arr = np.repeat(arr[..., :1], 3, axis=-1)
        arr = scale_to_uint8(arr[..., :3], intensity_range)
    else:
        raise InputError(
            f"{name}: expected a 2D image (H, W) or (H, W, 3|4), got an array of shape {tuple(arr.shape)}"
        )
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise InputError(f"{name}: image of shape {tuple(arr.shape)} is too small")
    _check_pixels(arr.shape, name)
    return np.ascontiguousarray(arr)


#: A pixel whose channels differ by more than this (0..255) is coloured; an image with fewer than
#: GREY_SHARE of such pixels is grey (JPEG chroma noise and bf16 rounding stay below it).
GREY_SPREAD, GREY_SHARE = 8, 0.01


def looks_grey(rgb: np.ndarray) -> bool:
    """Whether (..., H, W, 3) pixels in 0..255 look grey: their three channels (nearly) one (unlike
    example_stats.is_grey, which asks for equal channels, a few coloured pixels are tolerated)."""
    arr = np.asarray(rgb)
    spread = arr.max(axis=-1).astype(np.int16) - arr.min(axis=-1)
    return np.count_nonzero(spread > GREY_SPREAD) <= GREY_SHARE * spread.size


def to_grey(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) colour -> its brightest channel (HSV's value) in all three channels. A fluorescence channel
    shown in colour keeps its own intensities (luminance would dim green to 59%, blue to 11%): on stardist's
    nuclei, a green, magenta or cyan example on the grey other half matches 28-30 of 57 nuclei this way (as
    grey to grey: 30), 20-27 by luminance."""
    return np.repeat(np.asarray(rgb).max(axis=-1)[..., None], 3, axis=-1)


def one_colour_mode(target: np.ndarray, examples: np.ndarray,
                    grey_examples: list[bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A target (H, W, 3) and its examples (P, h, w, 3), uint8, brought to one colour mode: colour examples
    of a grey target are made grey, a colour target of grey examples is made grey (SegGPT copies what the
    examples look like: a colour example finds little in a grey image, and the other way round). Returns
    the arrays given where nothing changes, so `is` tells what did. grey_examples: looks_grey of each
    example, when known already (a run's examples meet many targets)."""
    grey_target = looks_grey(target)
    if grey_examples is None:
        grey_examples = [looks_grey(e) for e in examples]
    if grey_target and not all(grey_examples):
        return target, np.stack([e if g else to_grey(e) for e, g in zip(examples, grey_examples)])
    if not grey_target and grey_examples and all(grey_examples):
        return to_grey(target), examples
    return target, examples


def to_mask(obj: Any, name: str = "mask") -> np.ndarray:
    """A prompt mask as (H, W) integer labels or (H, W, 3) uint8 colours."""
    arr = as_array(obj, name, as_mask=True)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.ndim == 2:
        if arr.dtype == bool:
            return arr.astype(np.uint8)
        if np.issubdtype(arr.dtype, np.floating):
            if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                raise InputError(f"{name}: a label mask must hold whole numbers, got non-integer floats")
            arr = arr.astype(np.int64)
        if not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"{name}: expected integer labels, got dtype {arr.dtype}")
        if arr.size and arr.min() < 0:
            raise InputError(f"{name}: label ids must be >= 0 (0 is background), found {arr.min()}")
        return arr
    if arr.ndim == 3 and arr.shape[-1] == 3:
        if arr.dtype != np.uint8:
            if arr.size and (arr.min() < 0 or arr.max() > 255):
                raise InputError(f"{name}: an RGB colour mask needs values in 0..255")
            arr = arr.astype(np.uint8)
        return arr
    raise InputError(f"{name}: expected a label mask (H, W) or a colour mask (H, W, 3), got shape {tuple(arr.shape)}")


# ------------------------------------------------------------------------------------------ label maps


def label_dtype(max_id: int):
    """The smallest unsigned dtype for label ids up to `max_id`."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_id <= np.iinfo(dtype).max:
            return dtype
    return np.int64


def resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a label map (H, W) or colour mask (H, W, C): values are kept exactly."""
    if mask.shape[:2] == (height, width):
        return mask
    rows = np.minimum((np.arange(height) + 0.5) * mask.shape[0] / height, mask.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(width) + 0.5) * mask.shape[1] / width, mask.shape[1] - 1).astype(int)
    return mask[rows][:, cols]


# ---------------------------------------------------------------------------------------------- display


def display_colors(ids) -> dict[int, tuple[int, int, int]]:
    """Vivid, well-separated colours for showing labels to people (golden-ratio hues)."""
    import colorsys

    out = {}
    for k, label_id in enumerate(sorted(int(i) for i in ids if int(i) != 0)):
        r, g, b = colorsys.hsv_to_rgb((0.12 + k * 0.618034) % 1.0, 0.85, 1.0)
        out[label_id] = (int(r * 255), int(g * 255), int(b * 255))
    return out


def distinct_values(values: np.ndarray, return_counts: bool = False):
    """The sorted distinct values of an array (and how often each occurs, with `return_counts`), as
    np.unique gives them. A label mask (bool, or integers from 0 below 65536 or an eighth of its size: the
    counts take at most a byte per value) is counted with one bincount instead of a sort: about 10x faster
    on a 512x512 mask, which preparing an example reads several times."""
    values = np.asarray(values)
    small = values.size and (values.dtype == bool or (
        values.dtype.kind in "ui" and values.min() >= 0 and values.max() < max(1 << 16, values.size // 8)))
    if not small:
        return np.unique(values, return_counts=return_counts)
    counts = np.bincount(values.ravel().astype(np.intp, copy=False))
    present = np.flatnonzero(counts)
    return (present, counts[present]) if return_counts else present


def label_boundaries(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels of a label map with a 4-neighbour of another label, on both sides."""
    edge = np.zeros(labels.shape, bool)
    vertical, horizontal = labels[:-1] != labels[1:], labels[:, :-1] != labels[:, 1:]
    edge[:-1] |= vertical
    edge[1:] |= vertical
    edge[:, :-1] |= horizontal
    edge[:, 1:] |= horizontal
    return edge


def overlay(image_rgb8: np.ndarray, labels: np.ndarray, colors: dict[int, tuple[int, int, int]] | None = None,
            alpha=0.45, outline=True) -> np.ndarray:
    """Colour the labelled pixels of an RGB image, with an outline around each label region
    (`colors`: label id -> RGB; default: display_colors of the ids present)."""
    if colors is None:
        colors = display_colors(np.unique(labels))
    out = image_rgb8.astype(np.float32).copy()
    for label_id, color in colors.items():
        region = labels == label_id
        if not region.any():
            continue
        out[region] = (1 - alpha) * out[region] + alpha * np.asarray(color, np.float32)
    if outline:
        edge = label_boundaries(labels)
        for label_id, color in colors.items():
            out[edge & (labels == label_id)] = color
    return np.clip(out, 0, 255).astype(np.uint8)
