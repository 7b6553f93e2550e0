"""Generated scenes of moving objects with known truth (numpy): videos and stacks to measure propagation.

    frames, truth = moving_objects("video", seed=3)   # (N, H, W, 3) uint8 and (N, H, W) uint8 ids 1..K

Textured ellipses on a noisy background, each moving in a straight line at 1-2 pixels a frame (far from
where it was annotated by the end), turning slowly. In a "video" the annotated frame is the first; in a
"stack" it is the middle one, and each object also swells and fades through focus (a centre frame and a
thickness), gone where it is out of focus, as nuclei through a z-stack. Everything is a function of the
seed. The truth is what was drawn: objects that overlap are drawn in id order, the higher on top.
"""

from __future__ import annotations

import numpy as np

KINDS = ("video", "stack")


def annotated_frame(kind: str, num_frames: int) -> int:
    """The frame a scene of this kind is annotated on: the first of a video, the middle of a stack."""
    return 0 if kind == "video" else num_frames // 2


def moving_objects(kind: str, seed: int = 0, num_frames: int = 31, size: tuple[int, int] = (96, 96),
                   objects: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A generated scene and its truth.

    Args:
        kind: "video" (objects keep their size) or "stack" (objects swell and fade through focus).
        seed: everything follows from it.
        num_frames: frames (or slices) in the scene.
        size: (height, width) of a frame.
        objects: how many objects (ids 1..objects).

    Returns:
        frames (N, H, W, 3) uint8 (grey) and truth (N, H, W) uint8 object ids (0 = background).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
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
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    truth = np.zeros((num_frames, height, width), np.uint8)
    for t in range(num_frames):
        image = background.copy()
        for k in range(objects):
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
