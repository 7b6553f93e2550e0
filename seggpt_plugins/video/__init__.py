"""Frames of videos, animated images and image folders, read one at a time; propagation through them;
overlay videos written.

    frames = open_frames("clip.mp4", start=0, stop=None, every=1)  # a lazy Sequence of (H, W, 3) uint8
    len(frames), frames.indices[k], frames.times[k], frames[k]     # frames[k]: decoded on demand
    for frame in frames.iter_frames(): frame.index, frame.time, frame.image
    for result in propagate_video(model, frames, {0: mask}): ...   # every chosen frame once

Sources: videos (mp4, mov, avi, mkv, webm, ...) through PyAV (`pip install "seggpt-plugins[video]"`,
imported on first use); animated GIFs through Pillow; TIFF stacks (T, Y, X[, C]) page by page through
tifffile; folders of image files (natural name order). Frame indices count from 0 in the file; times
are seconds from the first frame (the container's timestamps for videos, variable frame rates
included; GIF frame durations; 1 / fps for TIFFs and folders).

Modules, each importing only those above it: `readers` (one reader per kind of source; videos decoded
on demand from keyframes behind a bounded cache), `frames` (`Frames`, `open_frames`, `is_video`),
`writing` (`VideoWriter`, `write_overlay_video`), `propagate` (`propagate_video`).
"""

from .frames import Frame, Frames, is_video, open_frames
from .propagate import FrameResult, propagate_video
from .readers import (ANIMATED_SUFFIXES, CACHE_BYTES, DEFAULT_FPS, FRAME_SUFFIXES, TIFF_SUFFIXES, VIDEO_SUFFIXES,
                      natural_key)
from .writing import VideoWriter, id_colors, write_overlay_video

__all__ = ["ANIMATED_SUFFIXES", "CACHE_BYTES", "DEFAULT_FPS", "FRAME_SUFFIXES", "TIFF_SUFFIXES", "VIDEO_SUFFIXES",
           "Frame", "FrameResult", "Frames", "VideoWriter", "id_colors", "is_video", "natural_key", "open_frames",
           "propagate_video", "write_overlay_video"]
