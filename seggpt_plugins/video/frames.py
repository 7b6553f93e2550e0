"""The chosen frames of one source as a lazy Sequence (`Frames`), opened by `open_frames`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import InputError
from .readers import (ANIMATED_SUFFIXES, CACHE_BYTES, TIFF_SUFFIXES, VIDEO_SUFFIXES, AnimatedReader, FolderReader,
                      Reader, TiffReader, VideoReader)


def is_video(path) -> bool:
    """Whether `path` is read as frames by this package rather than as one image or stack: a video or
    animated-image file (by suffix) or a folder."""
    path = Path(path)
    return path.is_dir() or path.suffix.lower() in VIDEO_SUFFIXES + ANIMATED_SUFFIXES


@dataclass(frozen=True)
class Frame:
    index: int  # in the file, from 0
    time: float  # seconds from the first frame
    image: np.ndarray  # (H, W, 3) uint8 for videos; as stored for TIFF stacks and image folders


class Frames(Sequence):
    """Chosen frames of one source as a lazy Sequence: `frames[k]` decodes (or reads) frame
    `frames.indices[k]` of the file when asked, so `SegGPT.propagate` and `propagate_video` touch frames as
    they go. Arrays may be shared with the cache: do not modify them."""

    def __init__(self, reader: Reader, indices: range):
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
        reader = FolderReader(path)
    elif suffix in TIFF_SUFFIXES:
        reader = TiffReader(path)
    elif suffix in ANIMATED_SUFFIXES:
        reader = AnimatedReader(path, cache_bytes)
    elif suffix in VIDEO_SUFFIXES:
        reader = VideoReader(path, cache_bytes, max_decoders)
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
