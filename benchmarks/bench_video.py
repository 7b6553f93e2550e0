"""Video propagation on this machine: frames per second, memory as the video grows, decoding's share.

    OMP_NUM_THREADS=1 python benchmarks/bench_video.py [--frames 100 1000] [--memory 8] [--size 640 360]
                                                       [--out benchmarks/results/bench_video_cpu.json]

Data: a synthetic H.264 video (libx264, its default keyframe interval of 250 and B-frames), written
first and not timed: three bright disks crossing a noisy background, one leaving the frame and
coming back. Frame 0's mask is the annotation, so one run goes forward through the whole video.

Timed, as `seggpt propagate VIDEO --prompt-frame 0 MASK --out DIR` runs it: `video.open_frames`
(one pass over the packets, then the first and last frames decoded), `video.propagate_video` with
the demo model (memory K, the paper's video setting; fp32 on CPU), and each frame's label PNG written
to disk as it comes. At each checkpoint (frames done): elapsed time, frames/s, the process's current
RSS, and the share of the time spent reading and decoding frames (`Frames.stats`). Flat memory means
the RSS at 1,000 frames is the RSS at 100.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from _report import report


def scene(n: int, height: int, width: int, seed: int = 0):
    """Frames (one at a time) and frame 0's mask: three disks crossing a noisy background."""
    rng = np.random.default_rng(seed)
    background = rng.normal(60, 8, (height, width)).clip(0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:height, :width]
    disks = [(0.25, 0.1, 0.0004, 0.003, 0.06), (0.7, 0.8, -0.0005, -0.002, 0.08), (0.5, 0.5, 0.0, 0.0045, 0.05)]

    def frame(t):
        image, mask = background.copy(), np.zeros((height, width), np.uint8)
        for k, (y0, x0, vy, vx, r) in enumerate(disks, 1):
            cy, cx = (y0 + vy * t) % 1 * height, (x0 + vx * t) % 1.2 * width  # leaves and comes back
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 < (r * height) ** 2
            image[disk], mask[disk] = 200, k
        return np.repeat(image[..., None], 3, -1), mask

    return frame


def encode(path: Path, frame, n: int) -> None:
    import av

    first = frame(0)[0]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = first.shape[1], first.shape[0], "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "18"}
        for t in range(n):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame(t)[0], format="rgb24")))
        container.mux(stream.encode(None))


def rss_mb() -> float:
    import psutil

    return round(psutil.Process().memory_info().rss / 2**20, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[100, 500, 1000],
                        help="checkpoints (frames done); the largest is the video's length")
    parser.add_argument("--memory", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=[640, 360], metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    from seggpt_plugins import SegGPT
    from seggpt_plugins.io import write_png
    from seggpt_plugins.video import open_frames, propagate_video

    length = max(args.frames)
    width, height = args.size
    frame = scene(length, height, width)
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "clip.mp4"
        encode(video, frame, length)
        model = SegGPT.from_pretrained(args.model, device=args.device)
        rss_loaded = rss_mb()
        started = time.perf_counter()
        frames = open_frames(video)
        opened = time.perf_counter() - started
        checkpoints, done = [], 0
        results = propagate_video(model, frames, {0: frame(0)[1]}, memory=args.memory, batch_size=args.batch_size)
        for result in results:
            write_png(Path(tmp) / f"{result.index:06d}_labels.png", result.prediction.labels)
            done += 1
            if done in args.frames:
                elapsed = time.perf_counter() - started
                checkpoints.append({"frames": done, "seconds": round(elapsed, 1),
                                    "frames_per_s": round(done / elapsed, 3), "rss_mb": rss_mb(),
                                    "decode_share": round(frames.stats["seconds"] / elapsed, 4),
                                    "frames_decoded": frames.stats["decoded"]})
                print(checkpoints[-1], flush=True)
        frames.close()

    report({"what": "seggpt propagate over a video: demo model, one forward run from frame 0, labels streamed to PNG",
            "video": f"synthetic H.264 {width}x{height}, 25 fps, {length} frames (libx264 veryfast crf 18, keyint 250)",
            "model": args.model, "device": args.device, "torch_threads": torch.get_num_threads(),
            "memory": args.memory, "batch_size": args.batch_size, "open_seconds": round(opened, 3),
            "rss_after_model_load_mb": rss_loaded, "checkpoints": checkpoints}, args.out)


if __name__ == "__main__":
    main()
