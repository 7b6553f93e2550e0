"""Image I/O: reading images and masks, intensity scaling to 8-bit RGB, atomic writes, overlays.

Everything here works on numpy arrays; nothing imports torch.
"""

from __future__ import annotations

import os
import tempfile
import warnings
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


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as it is stored: (H, W), (H, W, C) or, for TIFF stacks, (Z, H, W[, C])."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                _check_pixels(tuple(series.shape[-3:-1] if series.shape[-1] in (3, 4) else series.shape[-2:]), str(path))
                return series.asarray()
        except InputError:
            raise
        except Exception as exc:  # tifffile raises many types for broken files
            raise InputError(f"{path}: not a readable TIFF image ({exc})") from None
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = MAX_PIXELS
            with Image.open(path) as img:
                _check_pixels((img.height, img.width), str(path))
                return pil_to_array(img)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{path}: refused as a possible decompression bomb ({exc})") from None
    except Exception as exc:
        raise InputError(f"{path}: not a readable image file ({type(exc).__name__}: {exc})") from None


def pil_to_array(img) -> np.ndarray:
    """A PIL image as an array, keeping 16-bit and float data and palette indices."""
    if img.mode in ("1",):
        return np.asarray(img, dtype=np.uint8)
    if img.mode == "P":
        return np.asarray(img)  # palette indices: a label map
    if img.mode in ("L", "I", "F", "RGB", "RGBA", "LA", "I;16", "I;16B", "I;16L"):
        arr = np.asarray(img)
        return arr[..., 0] if img.mode == "LA" else arr
    return np.asarray(img.convert("RGB"))


def as_array(obj: Any, name: str = "image") -> np.ndarray:
    """Numpy array from a path, a PIL image, an array-like (numpy, dask, zarr, torch on CPU)."""
    if isinstance(obj, (str, os.PathLike)):
        return read_image(obj)
    if type(obj).__module__.startswith("PIL."):
        return pil_to_array(obj)
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


def to_mask(obj: Any, name: str = "mask") -> np.ndarray:
    """A prompt mask as (H, W) integer labels or (H, W, 3) uint8 colours."""
    arr = as_array(obj, name)
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


# --------------------------------------------------------------------------------------------- writing


def _atomic_write(path: Path, write, overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path}: exists; pass --overwrite (overwrite=True) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def label_dtype(max_id: int):
    """The smallest unsigned dtype for label ids up to `max_id`."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_id <= np.iinfo(dtype).max:
            return dtype
    return np.int64


def write_png(path, arr: np.ndarray, overwrite: bool = False) -> Path:
    """Write uint8/uint16 gray or RGB as PNG, atomically (temp name, then rename)."""
    from PIL import Image

    arr = np.asarray(arr)
    if arr.ndim == 2 and arr.dtype not in (np.uint8, np.uint16):
        if arr.size and arr.max() > 65535:
            raise InputError(f"{path}: label ids above 65535 do not fit a PNG; write a TIFF instead")
        arr = arr.astype(label_dtype(int(arr.max()) if arr.size else 0))
    img = Image.fromarray(arr)
    return _atomic_write(Path(path), lambda tmp: img.save(tmp, format="PNG"), overwrite)


def write_tiff(path, arr: np.ndarray, overwrite: bool = False) -> Path:
    """Write an array as a zlib-compressed TIFF, atomically."""
    import tifffile

    return _atomic_write(
        Path(path), lambda tmp: tifffile.imwrite(tmp, np.asarray(arr), compression="zlib"), overwrite
    )


def display_colors(ids) -> dict[int, tuple[int, int, int]]:
    """Vivid, well-separated colours for showing labels to people (golden-ratio hues)."""
    import colorsys

    out = {}
    for k, label_id in enumerate(sorted(int(i) for i in ids if int(i) != 0)):
        r, g, b = colorsys.hsv_to_rgb((0.12 + k * 0.618034) % 1.0, 0.85, 1.0)
        out[label_id] = (int(r * 255), int(g * 255), int(b * 255))
    return out


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
        edge = np.zeros(labels.shape, bool)
        edge[:-1] |= labels[:-1] != labels[1:]
        edge[1:] |= labels[:-1] != labels[1:]
        edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
        edge[:, 1:] |= labels[:, :-1] != labels[:, 1:]
        for label_id, color in colors.items():
            out[edge & (labels == label_id)] = color
    return np.clip(out, 0, 255).astype(np.uint8)
