"""Readers of one source's frames: TIFF stacks and image folders page by page, videos (PyAV) and animated
images (Pillow) decoded on demand from keyframes behind a cache bounded in bytes.

Videos are indexed by one pass over their packets (no decoding): the exact frame count, every frame's
timestamp and the keyframes to seek to. Frames are then decoded on demand: a read just ahead of a
decoder continues it, any other read seeks to the keyframe before the frame and decodes forward,
keeping the frames just before it in a cache bounded in bytes (each dropped once read), so a run that
goes backwards decodes each keyframe interval about once per cache-full. Memory is at most the cache
plus a few decoders, whatever the length of the video; a run going forwards holds no cache at all.
"""

from __future__ import annotations

import re
import time as _time
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import InputError
from ..images import tiff_warnings_quiet

#: Containers read through PyAV (FFmpeg).
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".wmv", ".flv")
#: Animated images read through Pillow.
ANIMATED_SUFFIXES = (".gif",)
TIFF_SUFFIXES = (".tif", ".tiff")
#: Still images a frame folder may hold.
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
#: Frame rate of sources without timestamps (TIFF stacks, folders).
DEFAULT_FPS = 25.0
#: Default bound of the decoded-frame cache (bytes).
CACHE_BYTES = 256 << 20


def natural_key(name: str):
    """Sort key that puts frame2 before frame10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


class Reader:
    """All frames of one file or folder: `count`, `size` (h, w), `fps`, `time(i)`, `read(i)`; statistics
    `decoded` (frames decoded, including those decoded only to reach another) and `seconds` (spent reading)."""

    path: Path
    count: int
    size: tuple[int, int]
    fps: float = DEFAULT_FPS
    time_base: Fraction | None = None  # of the timestamps, when the source has its own

    def __init__(self, path):
        self.path = Path(path)
        self.decoded = 0
        self.seconds = 0.0

    def time(self, i: int) -> float:
        return i / self.fps

    def read(self, i: int) -> np.ndarray:
        started = _time.perf_counter()
        try:
            return self._read(i)
        finally:
            self.seconds += _time.perf_counter() - started

    def _read(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def check(self) -> None:
        """Read the first and the last frame (a truncated or undecodable file fails here, early)."""
        self.read(0)
        self.read(self.count - 1)

    def close(self) -> None:
        pass


class TiffReader(Reader):
    """A TIFF stack (T, Y, X) or (T, Y, X, C), one page per frame."""

    def __init__(self, path):
        import tifffile

        super().__init__(path)
        try:
            with tiff_warnings_quiet():
                self._tif = tifffile.TiffFile(self.path)
                series = self._tif.series[0]
            shape = tuple(series.shape)
            self._pages = series.pages
        except Exception as exc:  # tifffile raises many types for broken files
            raise InputError(f"{self.path}: not a readable TIFF ({exc})") from None
        rgb = len(shape) == 4 and shape[-1] in (3, 4)
        if len(shape) != 3 and not rgb:
            self._tif.close()
            raise InputError(f"{self.path}: expected frames (T, Y, X) or (T, Y, X, C), got shape {shape}")
        if len(self._pages) != shape[0]:
            self._tif.close()
            raise InputError(f"{self.path}: {shape[0]} frames stored in {len(self._pages)} pages; expected one page "
                             "per frame (save it as a plain T, Y, X stack)")
        self.count, self.size = shape[0], shape[1:3]

    def _read(self, i: int) -> np.ndarray:
        self.decoded += 1
        try:
            return self._pages[i].asarray()
        except Exception as exc:
            raise InputError(f"{self.path}: frame {i} cannot be read ({exc})") from None

    def close(self) -> None:
        self._tif.close()


class FolderReader(Reader):
    """A folder of image files, one per frame, in natural name order (frame2 before frame10)."""

    def __init__(self, path):
        from PIL import Image

        super().__init__(path)
        self.files = sorted((p for p in self.path.iterdir() if p.is_file() and not p.name.startswith(".")
                             and p.suffix.lower() in FRAME_SUFFIXES), key=lambda p: natural_key(p.name))
        if not self.files:
            raise InputError(f"{self.path}: a folder with no frame images ({', '.join(FRAME_SUFFIXES)})")
        self.count = len(self.files)
        sizes = {}
        for file in self.files:  # headers only: every frame must have the first one's size
            try:
                with Image.open(file) as img:
                    sizes[file] = (img.height, img.width)
            except Exception as exc:
                raise InputError(f"{file}: not a readable image ({type(exc).__name__}: {exc})") from None
        self.size = sizes[self.files[0]]
        odd = next((f for f in self.files if sizes[f] != self.size), None)
        if odd is not None:
            raise InputError(f"{odd}: frame size {sizes[odd][1]}x{sizes[odd][0]} differs from the first frame's "
                             f"{self.size[1]}x{self.size[0]} ({self.files[0].name}); all frames must have one size")

    def _read(self, i: int) -> np.ndarray:
        from ..images import read_image

        self.decoded += 1
        image = read_image(self.files[i])
        if image.shape[:2] != self.size:
            raise InputError(f"{self.files[i]}: frame size {image.shape[1]}x{image.shape[0]} differs from the first "
                             f"frame's {self.size[1]}x{self.size[0]}")
        return image


@dataclass(eq=False)
class _Cursor:
    """One decoder and where it is: `frames` yields (index, decoded frame); `next` is the index it gives next."""

    handle: Any
    frames: Iterator | None = None
    next: int = 0


class SequentialReader(Reader):
    """Frames that decode one after another from keyframes, behind two caches: the frames decoded on the
    way to a frame asked for (kept for a run going backwards, bounded in bytes, each dropped once read)
    and the few frames read last.

    Subclasses give `keyframes` (sorted indices decoding may start at, 0 included), `_open()` (a new
    decoder handle), `_frames_from(handle, key)` (decoded frames from keyframe `key` on, as (index, raw))
    and `_convert(raw)` (a raw frame as an array).
    """

    keyframes: list[int]

    def __init__(self, path, cache_bytes: int = CACHE_BYTES, max_cursors: int = 4):
        super().__init__(path)
        self.cache_bytes = cache_bytes
        self.max_cursors = max(1, max_cursors)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()  # decoded on the way, not read yet
        self._recent: OrderedDict[int, np.ndarray] = OrderedDict()  # read lately (one per decoder)
        self._cursors: list[_Cursor] = []

    def _open(self):
        raise NotImplementedError

    def _frames_from(self, handle, key: int) -> Iterator[tuple[int, Any]]:
        raise NotImplementedError

    def _convert(self, raw) -> np.ndarray:
        raise NotImplementedError

    @property
    def cache_frames(self) -> int:
        """How many decoded frames the cache holds."""
        return max(2, self.cache_bytes // max(1, self.size[0] * self.size[1] * 3))

    def _remember(self, cache: OrderedDict, i: int, image: np.ndarray, size: int) -> None:
        cache[i] = image
        cache.move_to_end(i)
        while len(cache) > size:
            cache.popitem(last=False)

    def _read(self, i: int) -> np.ndarray:
        if not 0 <= i < self.count:
            raise IndexError(f"frame {i} is outside 0..{self.count - 1}")
        image = self._cache.pop(i, None)
        if image is None:
            image = self._recent.get(i)
        if image is None:
            key = self.keyframes[bisect_right(self.keyframes, i) - 1]
            cursor = self._cursor_for(i, key)
            image = self._decode_to(cursor, i)
            if image is None and key > 0:  # the seek landed after the frame: decode from the start once
                self._restart(cursor, 0)
                image = self._decode_to(cursor, i)
            if image is None:
                raise InputError(f"{self.path}: frame {i} cannot be decoded (the file may be truncated or corrupt)")
        self._remember(self._recent, i, image, self.max_cursors)
        return image

    def _cursor_for(self, i: int, key: int) -> _Cursor:
        """The decoder that reaches frame i soonest: one at or before it and past its keyframe continues.
        Else one restarts at the keyframe: the one just past frame i (a run going backwards keeps its own
        decoder), or a new one (a run going forwards gets its own), or the least recently used."""
        ahead = [c for c in self._cursors if c.frames is not None and key <= c.next <= i]
        past = [c for c in self._cursors if c.next > i]
        if ahead:
            cursor = max(ahead, key=lambda c: c.next)
        else:
            if past:
                cursor = min(past, key=lambda c: c.next)
            elif len(self._cursors) < self.max_cursors:
                cursor = _Cursor(self._open())
            else:
                cursor = self._cursors[0]
            self._restart(cursor, key)
        if cursor in self._cursors:
            self._cursors.remove(cursor)
        self._cursors.append(cursor)  # most recently used last
        return cursor

    def _restart(self, cursor: _Cursor, key: int) -> None:
        cursor.frames, cursor.next = self._frames_from(cursor.handle, key), key

    def _decode_to(self, cursor: _Cursor, i: int) -> np.ndarray | None:
        """Decode on to frame i, caching the frames just before it (this decoder's share of the cache)."""
        keep_from = i - self.cache_frames // len(self._cursors)
        for index, raw in cursor.frames:
            self.decoded += 1
            cursor.next = index + 1
            if index > i:
                break
            if index == i:
                return self._convert(raw)
            if index >= keep_from and index not in self._recent:
                self._remember(self._cache, index, self._convert(raw), self.cache_frames)
        else:
            cursor.frames = None  # exhausted
        return None

    def check(self) -> None:
        super().check()
        self.close()  # the decoders of the check would take shares of the cache

    def close(self) -> None:
        for cursor in self._cursors:
            self._close(cursor.handle)
        self._cursors.clear()
        self._cache.clear()
        self._recent.clear()

    def _close(self, handle) -> None:
        pass


def import_av():
    try:
        import av
    except ImportError:
        raise InputError('reading video files needs PyAV: pip install "seggpt-plugins[video]" (or pip install av)') \
            from None
    return av


class VideoReader(SequentialReader):
    """A video file through PyAV: the first video stream, as RGB."""

    def __init__(self, path, cache_bytes: int = CACHE_BYTES, max_cursors: int = 4):
        super().__init__(path, cache_bytes, max_cursors)
        self._av = import_av()
        container = self._open()
        try:
            self._index(container)
        finally:
            self._close(container)

    def _open(self):
        try:
            container = self._av.open(str(self.path))
        except self._av.FFmpegError as exc:
            raise InputError(f"{self.path}: not a readable video ({_reason(exc)})") from None
        if not container.streams.video:
            container.close()
            raise InputError(f"{self.path}: has no video stream")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            container.close()
            raise InputError(f"{self.path}: its video codec cannot be decoded by this FFmpeg build (PyAV "
                             f"{self._av.__version__}); convert it, e.g. ffmpeg -i {self.path.name} -c:v libx264 "
                             "out.mp4")
        stream.thread_type = "AUTO"
        return container

    def _close(self, container) -> None:
        container.close()

    def _index(self, container) -> None:
        """One pass over the packets (no decoding): timestamps in presentation order, keyframes, size, rate."""
        stream = container.streams.video[0]
        stamps, keys = [], []
        try:
            for packet in container.demux(stream):
                stamp = packet.pts if packet.pts is not None else packet.dts
                if packet.size == 0 or stamp is None:
                    continue
                stamps.append(stamp)
                if packet.is_keyframe:
                    keys.append(stamp)
        except self._av.FFmpegError as exc:
            raise InputError(f"{self.path}: corrupt after {len(stamps)} frames ({_reason(exc)})") from None
        if not stamps:
            raise InputError(f"{self.path}: holds no video frames")
        self.pts = sorted(stamps)
        if len(set(self.pts)) != len(self.pts):
            raise InputError(f"{self.path}: several frames share one timestamp; remux it "
                             "(ffmpeg -i IN -c copy OUT.mkv)")
        self._frame_of = {stamp: i for i, stamp in enumerate(self.pts)}
        self.keyframes = sorted({0, *(self._frame_of[k] for k in keys)})
        self.count = len(self.pts)
        self.time_base = stream.time_base
        self.size = (stream.codec_context.height, stream.codec_context.width)
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate else DEFAULT_FPS
        self._check_length(stream)

    def _check_length(self, stream) -> None:
        """InputError when the header announces more than the packets hold (a truncated file)."""
        if stream.frames and self.count < stream.frames:
            raise InputError(f"{self.path}: truncated or corrupt: the header announces {stream.frames} frames but "
                             f"{self.count} can be read")
        announced = float(stream.duration * stream.time_base) if stream.duration else _tag_seconds(stream.metadata)
        if announced:
            end = self.time(self.count - 1) + 1 / self.fps
            if end < announced - max(0.5, 3 / self.fps):
                raise InputError(f"{self.path}: truncated or corrupt: the header announces {announced:.2f} s of "
                                 f"video but frames end at {end:.2f} s")

    def time(self, i: int) -> float:
        return float((self.pts[i] - self.pts[0]) * self.time_base)

    def _frames_from(self, container, key: int):
        stream = container.streams.video[0]
        index = key
        try:
            container.seek(self.pts[key], stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                stamp = frame.pts if frame.pts is not None else frame.dts
                index = self._frame_of.get(stamp, -1)
                if index >= key:  # earlier frames: where the seek landed, or leading frames of an open GOP
                    yield index, frame
        except self._av.FFmpegError as exc:
            raise InputError(f"{self.path}: frame {index} cannot be decoded ({_reason(exc)})") from None

    def _convert(self, frame) -> np.ndarray:
        return frame.to_ndarray(format="rgb24")


class AnimatedReader(SequentialReader):
    """An animated image (GIF) through Pillow: each frame decodes from the one before it."""

    def __init__(self, path, cache_bytes: int = CACHE_BYTES, max_cursors: int = 2):
        super().__init__(path, cache_bytes, max_cursors)
        img = self._open()
        try:
            self.count = getattr(img, "n_frames", 1)
            self.size = (img.height, img.width)
            self._starts = [0.0]
            for i in range(self.count - 1):
                img.seek(i)
                self._starts.append(self._starts[-1] + float(img.info.get("duration") or 1000 / DEFAULT_FPS) / 1000)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{self.path}: not a readable animated image ({type(exc).__name__}: {exc})") from None
        finally:
            img.close()
        self.fps = (self.count - 1) / self._starts[-1] if self.count > 1 and self._starts[-1] > 0 else DEFAULT_FPS
        self.time_base = Fraction(1, 1000)
        self.keyframes = [0]

    def _open(self):
        from PIL import Image

        try:
            return Image.open(self.path)
        except Exception as exc:
            raise InputError(f"{self.path}: not a readable image ({type(exc).__name__}: {exc})") from None

    def _close(self, img) -> None:
        img.close()

    def time(self, i: int) -> float:
        return self._starts[i]

    def _frames_from(self, img, key: int):
        for i in range(key, self.count):
            try:
                img.seek(i)
            except Exception as exc:
                raise InputError(f"{self.path}: frame {i} cannot be decoded ({type(exc).__name__}: {exc})") from None
            yield i, img

    def _convert(self, img) -> np.ndarray:
        return np.asarray(img.convert("RGB"))


def _reason(exc) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def _tag_seconds(metadata) -> float | None:
    """A Matroska track's DURATION tag (HH:MM:SS.fraction) in seconds."""
    value = (metadata or {}).get("DURATION") or (metadata or {}).get("duration")
    match = re.fullmatch(r"(\d+):(\d+):(\d+(?:\.\d+)?)", value or "")
    return int(match[1]) * 3600 + int(match[2]) * 60 + float(match[3]) if match else None
