"""Frames of videos, animated images and image folders, read one at a time; overlay videos written.

    frames = open_frames("clip.mp4", start=0, stop=None, every=1)  # a lazy Sequence of (H, W, 3) uint8
    len(frames), frames.indices[k], frames.times[k], frames[k]     # frames[k]: decoded on demand
    for frame in frames.iter_frames(): frame.index, frame.time, frame.image
    for result in propagate_video(model, frames, {0: mask}): ...   # every chosen frame once

Sources: videos (mp4, mov, avi, mkv, webm, ...) through PyAV (`pip install "seggpt-plugins[video]"`,
imported on first use); animated GIFs through Pillow; TIFF stacks (T, Y, X[, C]) page by page through
tifffile; folders of image files (natural name order). Frame indices count from 0 in the file; times
are seconds from the first frame (the container's timestamps for videos, variable frame rates
included; GIF frame durations; 1 / fps for TIFFs and folders).

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
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .errors import InputError

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


def is_video(path) -> bool:
    """Whether `path` is read as frames by this module rather than as one image or stack: a video or
    animated-image file (by suffix) or a folder."""
    path = Path(path)
    return path.is_dir() or path.suffix.lower() in VIDEO_SUFFIXES + ANIMATED_SUFFIXES


def natural_key(name: str):
    """Sort key that puts frame2 before frame10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


# ------------------------------------------------------------------------------------------ readers


class _Reader:
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


class _TiffReader(_Reader):
    """A TIFF stack (T, Y, X) or (T, Y, X, C), one page per frame."""

    def __init__(self, path):
        import tifffile

        super().__init__(path)
        try:
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


class _FolderReader(_Reader):
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
        from .images import read_image

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


class _SequentialReader(_Reader):
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


def _import_av():
    try:
        import av
    except ImportError:
        raise InputError('reading video files needs PyAV: pip install "seggpt-plugins[video]" (or pip install av)') \
            from None
    return av


class _VideoReader(_SequentialReader):
    """A video file through PyAV: the first video stream, as RGB."""

    def __init__(self, path, cache_bytes: int = CACHE_BYTES, max_cursors: int = 4):
        super().__init__(path, cache_bytes, max_cursors)
        self._av = _import_av()
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


class _AnimatedReader(_SequentialReader):
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


# ------------------------------------------------------------------------------------------ frames


@dataclass(frozen=True)
class Frame:
    index: int  # in the file, from 0
    time: float  # seconds from the first frame
    image: np.ndarray  # (H, W, 3) uint8 for videos; as stored for TIFF stacks and image folders


class Frames(Sequence):
    """Chosen frames of one source as a lazy Sequence: `frames[k]` decodes (or reads) frame
    `frames.indices[k]` of the file when asked, so `SegGPT.propagate` and `propagate_video` touch frames as
    they go. Arrays may be shared with the cache: do not modify them."""

    def __init__(self, reader: _Reader, indices: range):
        self.reader = reader
        self.indices = indices

    # the source
    @property
    def path(self) -> Path:
        return self.reader.path

    @property
    def count(self) -> int:
        """Frames in the whole file."""
        return self.reader.count

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of every frame."""
        return tuple(self.reader.size)

    @property
    def fps(self) -> float:
        """The source's frame rate (its average for variable rates)."""
        return self.reader.fps

    @property
    def stats(self) -> dict:
        """{"decoded": frames decoded so far, "seconds": time spent reading and decoding}."""
        return {"decoded": self.reader.decoded, "seconds": self.reader.seconds}

    # the chosen frames
    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return Frames(self.reader, self.indices[k])
        return self.reader.read(self.indices[k])

    @property
    def times(self) -> list[float]:
        return [self.reader.time(i) for i in self.indices]

    def time(self, k: int) -> float:
        return self.reader.time(self.indices[k])

    def position(self, index: int, name: str = "frame") -> int:
        """Where frame `index` of the file is among the chosen frames; InputError (naming `name`) when it is
        past the end or not chosen."""
        if not 0 <= index < self.count:
            raise InputError(f"{name}: frame {index} is past the end of {self.path}, which has {self.count} frames "
                             f"(0..{self.count - 1})")
        if index not in self.indices:
            first, step = self.indices.start, self.indices.step
            raise InputError(f"{name}: frame {index} is not among the chosen frames of {self.path} ({first}, "
                             f"{first + step}, ... up to {self.indices[-1] if len(self.indices) else first}; "
                             "see --start/--stop/--every)")
        return self.indices.index(index)

    def select(self, start: int = 0, stop: int | None = None, every: int = 1) -> "Frames":
        """Frames start, start + every, ... before stop (indices of the file; stop past the end is the end)."""
        if every < 1 or start < 0 or (stop is not None and stop <= start):
            raise InputError(f"frames: need start >= 0, stop > start and every >= 1 (got start {start}, stop {stop}, "
                             f"every {every})")
        if start >= self.count:
            raise InputError(f"start frame {start} is past the end of {self.path}, which has {self.count} frames "
                             f"(0..{self.count - 1})")
        stop = self.count if stop is None else min(stop, self.count)
        return Frames(self.reader, range(start, stop, every))

    def iter_frames(self) -> Iterator[Frame]:
        """The chosen frames in order, each decoded once (a decoder running forward)."""
        for i in self.indices:
            yield Frame(i, self.reader.time(i), self.reader.read(i))

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> "Frames":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Frames({str(self.path)!r}, {len(self)} of {self.count} frames, {self.size[1]}x{self.size[0]}, "
                f"{self.fps:.3g} fps)")


def open_frames(path, start: int = 0, stop: int | None = None, every: int = 1, *, cache_bytes: int = CACHE_BYTES,
                max_decoders: int = 4, check: bool = True) -> Frames:
    """The frames of a video file, an animated GIF, a TIFF stack (T, Y, X[, C]) or a folder of images,
    chosen by `start`, `stop` (exclusive) and `every`, as a lazy `Frames` sequence.

    cache_bytes bounds the decoded frames kept for reads that go backwards; max_decoders, how many decoders
    may stay open at once (one per run that goes forwards). check: decode the first and the last frame now,
    so a truncated or undecodable file fails before any work. InputError names the file and the problem.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if path.is_dir():
        reader = _FolderReader(path)
    elif suffix in TIFF_SUFFIXES:
        reader = _TiffReader(path)
    elif suffix in ANIMATED_SUFFIXES:
        reader = _AnimatedReader(path, cache_bytes)
    elif suffix in VIDEO_SUFFIXES:
        reader = _VideoReader(path, cache_bytes, max_decoders)
    else:
        raise InputError(f"{path}: not a video ({', '.join(VIDEO_SUFFIXES + ANIMATED_SUFFIXES + TIFF_SUFFIXES)}) "
                         "or a folder of frames")
    try:
        frames = Frames(reader, range(reader.count)).select(start, stop, every)
        if check:
            reader.check()
    except BaseException:
        reader.close()
        raise
    return frames


# ------------------------------------------------------------------------------------------ propagation


@dataclass
class FrameResult:
    """One chosen frame's labels: `prediction.labels` (the annotation itself for annotated frames, with
    scores 1) and, with objects, `instances` whose ids follow each object through the video."""

    index: int  # frame index in the file (prediction.index too)
    time: float  # seconds from the first frame
    prediction: Any  # engine.Prediction
    instances: Any = None  # instances.Instances when objects were asked for
    annotated: bool = False


def propagate_video(model, frames: Frames, annotations: dict | None = None, prompt_images=None, prompt_masks=None,
                    *, objects: bool = False, min_area: int = 16, split_touching: bool = False,
                    **options) -> Iterator[FrameResult]:
    """Every chosen frame once: the annotated frames first (as given), then SegGPT's predictions as
    `model.propagate` yields them (runs outward from the annotated frames, both ways; in order without).

    annotations: {frame index in the file: label mask (H, W)}; each must be a chosen frame of `frames`.
    objects: also find each frame's objects (min_area, split_touching as instances.find_instances) with ids
    that stay with them, from the annotated frames' objects outward. options: model.propagate's (memory,
    batch_size, seg_type, intensity_range, max_prompts, ensemble, ...). Only the current frames and the last
    object map of each run are held, so memory stays flat however long the video.
    """
    from .engine import Prediction
    from .images import to_mask
    from .instances import StackTracker, annotated_objects

    masks = {}
    for index, mask in sorted((annotations or {}).items()):
        position = frames.position(int(index), name=f"annotation of frame {index}")
        mask = to_mask(mask, name=f"annotation of frame {index}")
        if mask.ndim != 2 or mask.shape != frames.size:
            raise InputError(f"annotation of frame {index}: a label mask of {frames.size[1]}x{frames.size[0]} (width x "
                             f"height) is needed, like the frames of {frames.path}; got shape {mask.shape}")
        masks[position] = mask
    tracker = StackTracker(len(frames), annotated_objects(masks)) if objects else None
    predictions = model.propagate(frames, prompt_images, prompt_masks, annotations=masks, **options)
    for position, mask in masks.items():
        index = frames.indices[position]
        prediction = Prediction(labels=mask, scores=np.ones(mask.shape, np.float32), index=index)
        yield FrameResult(index, frames.time(position), prediction,
                          tracker.annotated[position] if objects else None, annotated=True)
    for prediction in predictions:
        position = prediction.index
        prediction.index = frames.indices[position]
        instances = None
        if objects:
            instances = tracker.follow(position, prediction.instances(min_area=min_area, split_touching=split_touching))
        yield FrameResult(prediction.index, frames.time(position), prediction, instances)


# ------------------------------------------------------------------------------------------ writing


def id_colors(ids) -> dict[int, tuple[int, int, int]]:
    """A colour per label id that depends on the id alone (stable through a video as objects come and go)."""
    import colorsys

    out = {}
    for label_id in (int(i) for i in ids):
        if label_id:
            r, g, b = colorsys.hsv_to_rgb((0.12 + (label_id - 1) * 0.618034) % 1.0, 0.85, 1.0)
            out[label_id] = (int(r * 255), int(g * 255), int(b * 255))
    return out


class VideoWriter:
    """RGB frames to a video file (the container from the suffix): H.264 (libx264) where this FFmpeg build
    has it, else MPEG-4 part 2; frames keep the times they are given (variable rates too).

        with VideoWriter("overlay.mp4", fps=25) as out:
            out.write(rgb, time=0.04)
    """

    CODECS = ("libx264", "h264", "mpeg4")

    def __init__(self, path, fps: float = DEFAULT_FPS, time_base: Fraction | None = None):
        av = _import_av()
        self._av = av
        self.path = Path(path)
        self.fps = Fraction(fps).limit_denominator(1001) if fps and fps > 0 else Fraction(int(DEFAULT_FPS))
        fine = time_base is not None and time_base.denominator <= 65535  # MPEG-4 part 2's limit
        self.time_base = time_base if fine else (Fraction(1, 1000) if time_base else 1 / self.fps)
        self.codec = next((c for c in self.CODECS if _has_encoder(av, c)), None)
        if self.codec is None:
            raise InputError(f"{self.path}: this FFmpeg build (PyAV {av.__version__}) has no H.264 or MPEG-4 encoder")
        self._container = av.open(str(self.path), "w")
        self._stream = None
        self._last_pts = -1

    def _start(self, height: int, width: int) -> None:
        stream = self._container.add_stream(self.codec, rate=self.fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = self.time_base
        if self.codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        self._stream = stream

    def write(self, image: np.ndarray, time: float | None = None) -> None:
        """Add one (H, W, 3) uint8 frame at `time` seconds (default: one frame after the last)."""
        image = _even(np.ascontiguousarray(image[..., :3], dtype=np.uint8))
        if self._stream is None:
            self._start(*image.shape[:2])
        pts = self._last_pts + 1 if time is None else max(self._last_pts + 1, round(Fraction(time) / self.time_base))
        frame = self._av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts, frame.time_base = pts, self.time_base
        self._last_pts = pts
        self._container.mux(self._stream.encode(frame))

    def close(self) -> None:
        if self._stream is not None:
            self._container.mux(self._stream.encode(None))
        self._container.close()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, kind, *rest) -> None:
        self.close()


def _has_encoder(av, name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except Exception:
        return False
    return True


def _even(image: np.ndarray) -> np.ndarray:
    """Pad an image by its edge to even height and width (yuv420p needs them)."""
    pad = (image.shape[0] % 2, image.shape[1] % 2)
    return np.pad(image, ((0, pad[0]), (0, pad[1]), (0, 0)), mode="edge") if any(pad) else image


def write_overlay_video(path, frames: Frames, labels_of: Callable[[int], np.ndarray | None],
                        intensity_range=None, colors: dict | None = None) -> Path:
    """An overlay video of the chosen frames for review: each frame with its labels (`labels_of(index)`,
    None for none) in colours per id (`colors`, default `id_colors`), at the frames' own times."""
    from .images import overlay, to_rgb8

    time_base = frames.reader.time_base
    with VideoWriter(path, fps=frames.fps / max(1, frames.indices.step), time_base=time_base) as out:
        for frame in frames.iter_frames():
            image = to_rgb8(frame.image, intensity_range, name=f"{frames.path} frame {frame.index}")
            labels = labels_of(frame.index)
            if labels is not None:
                image = overlay(image, labels, colors or id_colors(np.unique(labels)))
            out.write(image, frame.time - frames.time(0))
    return Path(path)
