"""Generated scenes of moving objects with known truth (numpy): videos and stacks to measure propagation.

    frames, truth = moving_objects("video", seed=3)   # (N, H, W, 3) uint8 and (N, H, W) uint8 ids 1..K

Textured ellipses on a noisy background, each moving in a straight line at 1-2 pixels a frame (far from
where it was annotated by the end), turning slowly. In a "video" the annotated frame is the first; in a
"stack" it is the middle one, and each object also swells and fades through focus (a centre frame and a
thickness), gone where it is out of focus, as nuclei through a z-stack. Two more videos, for tracking:
"crossing", where objects 1 and 2 (alike: one size, one brightness) meet head-on or at an angle at the
middle frame, overlap, and part; and "ending", where the odd-numbered objects vanish for good at a frame
of the middle third (a cell that leaves, a nucleus that ends). Everything is a function of the seed. The
truth is what was drawn: objects that overlap are drawn in id order, the higher on top.
"""

from __future__ import annotations

import numpy as np

KINDS = ("video", "stack", "crossing", "ending")


def annotated_frame(kind: str, num_frames: int) -> int:
    """The frame a scene of this kind is annotated on: the middle of a stack, the first of a video."""
    return num_frames // 2 if kind == "stack" else 0


def moving_objects(kind: str, seed: int = 0, num_frames: int = 31, size: tuple[int, int] = (96, 96),
                   objects: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A generated scene and its truth.

    Args:
        kind: "video" (objects keep their size), "stack" (objects swell and fade through focus), "crossing"
            (a video where objects 1 and 2 cross at the middle frame) or "ending" (a video where the
            odd-numbered objects vanish at a frame of its middle third).
        seed: everything follows from it.
        num_frames: frames (or slices) in the scene.
        size: (height, width) of a frame.
        objects: how many objects (ids 1..objects; at least 2 for "crossing").

    Returns:
        frames (N, H, W, 3) uint8 (grey) and truth (N, H, W) uint8 object ids (0 = background).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "crossing" and objects < 2:
        raise ValueError(f"a crossing needs at least 2 objects, got {objects}")
    rng = np.random.default_rng(seed)
    height, width = size
    yy, xx = np.mgrid[:height, :width]
    background = rng.normal(70, 10, (height, width))
    start = rng.uniform([20, 20], [height - 20, width - 20], (objects, 2))
    direction = rng.normal(0, 1, (objects, 2))
    velocity = direction / np.linalg.norm(direction, axis=1, keepdims=True) * rng.uniform(1.0, 2.0, (objects, 1))
    radius, angle, aspect = rng.uniform(7, 11, objects), rng.uniform(0, np.pi, objects), rng.uniform(0.6, 1.0, objects)
    focus_centre, thickness = rng.uniform(0, num_frames, objects), rng.uniform(num_frames / 3, num_frames, objects)
    texture = rng.normal(0, 12, (height, width))
    origin = annotated_frame(kind, num_frames)
    end = np.full(objects, num_frames)
    if kind == "ending":
        end[::2] = rng.integers(num_frames // 3, 2 * num_frames // 3 + 1, len(end[::2]))
    if kind == "crossing":
        start[:2], velocity[:2], radius[:2], aspect[:2] = _crossing(rng, num_frames // 2 - origin, size)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    truth = np.zeros((num_frames, height, width), np.uint8)
    for t in range(num_frames):
        image = background.copy()
        for k in range(objects):
            if t >= end[k]:
                continue
            steps = t - origin
            cy, cx = (start[k] + velocity[k] * steps) % (height, width)
            r, brightness = radius[k], 160.0
            if kind == "stack":
                focus = 1 - ((t - focus_centre[k]) / thickness[k]) ** 2
                if focus < 0.1:
                    continue
                r, brightness = r * np.sqrt(focus), 80 + 80 * np.sqrt(focus)
            turn = angle[k] + 0.05 * steps
            dy, dx = yy - cy, xx - cx
            u = (dy * np.cos(turn) + dx * np.sin(turn)) / r
            v = (-dy * np.sin(turn) + dx * np.cos(turn)) / (r * aspect[k])
            inside = u * u + v * v < 1
            image[inside] = brightness + texture[inside]
            truth[t][inside] = k + 1
        frames[t] = np.clip(image, 0, 255).astype(np.uint8)[..., None]
    return frames, truth


def _crossing(rng: np.random.Generator, steps_to_meet: int, size: tuple[int, int]):
    """Two alike objects that meet `steps_to_meet` frames after the annotated one, near the middle of the
    frame, their paths 60-180 degrees apart: (start (2, 2), velocity (2, 2), radius (2,), aspect (2,))."""
    meet = np.asarray(size) / 2 + rng.uniform(-6, 6, 2)
    heading = rng.uniform(0, 2 * np.pi) + np.array([0.0, np.pi - rng.uniform(0, 2 * np.pi / 3)])
    speed = rng.uniform(1.2, 1.8)
    velocity = speed * np.stack([np.sin(heading), np.cos(heading)], axis=1)
    radius, aspect = np.full(2, rng.uniform(8, 10)), np.full(2, rng.uniform(0.7, 1.0))
    return meet - velocity * steps_to_meet, velocity, radius, aspect


def parted_frame(truth: np.ndarray, first: int = 1, second: int = 2) -> int:
    """The first frame after the last one in which objects `first` and `second` of a scene's truth (N, H, W)
    touch or overlap (8-connectivity): where "after the crossing" starts. 0 when they never touch."""
    from scipy import ndimage

    touching = [bool((ndimage.binary_dilation(frame == first, np.ones((3, 3), bool)) & (frame == second)).any())
                for frame in truth]
    return max((t + 1 for t, touch in enumerate(touching) if touch), default=0)
