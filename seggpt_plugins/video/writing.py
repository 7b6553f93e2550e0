"""Overlay videos for review: `VideoWriter` (H.264 or MPEG-4 through PyAV), `write_overlay_video`, `id_colors`."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputError
from .frames import Frames
from .readers import DEFAULT_FPS, import_av


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
        av = import_av()
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
    from ..images import overlay, to_rgb8

    time_base = frames.reader.time_base
    with VideoWriter(path, fps=frames.fps / max(1, frames.indices.step), time_base=time_base) as out:
        for frame in frames.iter_frames():
            image = to_rgb8(frame.image, intensity_range, name=f"{frames.path} frame {frame.index}")
            labels = labels_of(frame.index)
            if labels is not None:
                image = overlay(image, labels, colors or id_colors(np.unique(labels)))
            out.write(image, frame.time - frames.time(0))
    return Path(path)
