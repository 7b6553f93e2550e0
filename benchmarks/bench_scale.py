"""Labelling at scale on this machine: in-process vs Ray Data (1 and 2 actors), Ray's overheads, memory.

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py [--tiles 64] [--rss 1000 10000]
                                                       [--out benchmarks/results/bench_scale_cpu.json]

Data, made first and not timed: 32x32 PNG tiles of stardist's nuclei image (shipped in the package)
and one example pair (a 128x128 crop and its nuclei mask).

Throughput: the same `--tiles` inputs through `seggpt_plugins.scale.run` with the demo model and
`--output instances --format png coco` (label maps, records, COCO and review.parquet written), first
in-process, then on a local Ray started here (`ray.init(address="local", num_cpus=2)`, timed on its own)
with one actor and with two. For each: the wall time of the whole run, and the steady rate, from the
first input's record to the last (model loading and actor start-up left out). Ray's per-image
overhead is the difference of the steady per-image times against in-process.

Memory: peak RSS of a whole in-process run (a child process, `resource.getrusage`) over 1k and 10k
tiles with a tiny random model (the model's size is not the point: the pipeline's memory is, and
flat means the 10k run peaks where the 1k run does).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _report import ROOT, report

sys.path.insert(0, str(ROOT))


def make_tiles(folder: Path, count: int, size: int = 32) -> Path:
    import tifffile
    from PIL import Image

    samples = ROOT / "seggpt_plugins" / "demo" / "samples"
    image, truth = tifffile.imread(samples / "nuclei2d.tif"), tifffile.imread(samples / "nuclei2d_mask.tif")
    scaled = np.clip(image / np.percentile(image, 99.8) * 255, 0, 255).astype(np.uint8)
    Image.fromarray(scaled[:128, :128]).save(folder / "prompt.png")
    Image.fromarray((truth[:128, :128] > 0).astype(np.uint8)).save(folder / "prompt_mask.png")
    corners = [(r, c) for r in range(128, 512 - size + 1, 8) for c in range(0, 512 - size + 1, 8)]
    for k in range(count):
        r, c = corners[k % len(corners)]
        row = folder / "tiles" / f"{k // 1000:03d}"
        row.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scaled[r:r + size, c:c + size]).save(row / f"{k:06d}.png")
    return folder


def steady_rate(out: Path) -> float:
    """Inputs per second from the first record written to the last."""
    times = sorted(p.stat().st_mtime for p in (out / ".seggpt-run" / "records").rglob("*.json"))
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")


def throughput(folder: Path, engine: str, actors: int = 1) -> dict:
    from seggpt_plugins.export import ExportOptions
    from seggpt_plugins.scale import run

    out = folder / f"out-{engine}-{actors}"
    started = time.perf_counter()
    summary = run([str(folder / "tiles")], [(str(folder / "prompt.png"), str(folder / "prompt_mask.png"))], str(out),
                  engine=engine, actors=actors, cpus_per_actor=1 if actors == 1 else 0.9, model="demo",
                  device="cpu", options=ExportOptions(output="instances", formats=("png", "coco")), progress=False)
    wall = time.perf_counter() - started
    assert summary.done == summary.inputs, summary
    return {"engine": engine, "actors": actors if engine == "ray" else None, "inputs": summary.inputs,
            "wall_s": round(wall, 2), "images_per_s_end_to_end": round(summary.inputs / wall, 2),
            "images_per_s_steady": round(steady_rate(out), 2)}


def peak_rss_child(folder: Path, model: Path) -> float:
    """Peak RSS (MB) of one in-process run over the tiles of `folder`, in a fresh child process."""
    code = (f"import resource, sys; sys.path.insert(0, {str(ROOT)!r}); "
            "from seggpt_plugins.scale import run; from seggpt_plugins.export import ExportOptions; "
            f"s = run([{str(folder / 'tiles')!r}], [({str(folder / 'prompt.png')!r}, {str(folder / 'prompt_mask.png')!r})], "
            f"{str(folder / 'out')!r}, model={str(model)!r}, device='cpu', batch_size=8, quality=None, "
            "options=ExportOptions(output='instances', formats=('png', 'coco')), progress=False); "
            "print(s.inputs, s.seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    inputs, seconds, rss = result.stdout.split()[-3:]
    return {"inputs": int(inputs), "seconds": float(seconds), "peak_rss_mb": round(float(rss), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=64, help="inputs of the throughput runs (demo model)")
    parser.add_argument("--rss", type=int, nargs="*", default=[1000, 10000], help="input counts of the memory runs")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    args = parser.parse_args()
    result = {"tiles": args.tiles, "tile_size": 32, "model": "demo", "threads": os.environ.get("OMP_NUM_THREADS")}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        folder = make_tiles(Path(tmp), args.tiles)
        runs = [throughput(folder, "local")]
        import ray

        started = time.perf_counter()
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        result["ray_start_s"] = round(time.perf_counter() - started, 2)
        try:
            runs += [throughput(folder, "ray", 1), throughput(folder, "ray", 2)]
        finally:
            ray.shutdown()
        result["runs"] = runs
        local = runs[0]["images_per_s_steady"]
        result["ray_overhead_ms_per_image"] = {
            f"{r['actors']} actor(s)": round(1000 * (1 / r["images_per_s_steady"] - 1 / local), 1) for r in runs[1:]}
        result["peak_rss"] = []
        if args.rss:
            from tests.conftest import random_net

            model = Path(tmp) / "tiny-model"
            random_net(seed=1, image_size=[128, 64], patch_size=8, pretrain_image_size=64).save_pretrained(model)
            for count in args.rss:
                memory = Path(tmp) / f"rss-{count}"
                memory.mkdir()
                make_tiles(memory, count)
                result["peak_rss"].append(peak_rss_child(memory, model))
    print(f"{'run':<22}{'inputs':>7}{'wall s':>9}{'img/s (end to end)':>20}{'img/s (steady)':>16}")
    for r in result["runs"]:
        name = "in-process" if r["engine"] == "local" else f"ray, {r['actors']} actor(s)"
        print(f"{name:<22}{r['inputs']:>7}{r['wall_s']:>9}{r['images_per_s_end_to_end']:>20}{r['images_per_s_steady']:>16}")
    print(f"ray start-up: {result['ray_start_s']} s; ray overhead per image (steady, vs in-process): "
          + ", ".join(f"{k}: {v} ms" for k, v in result["ray_overhead_ms_per_image"].items()))
    for r in result["peak_rss"]:
        print(f"peak RSS, {r['inputs']} inputs (tiny model, in-process): {r['peak_rss_mb']} MB ({r['seconds']} s)")
    report(result, args.out)


if __name__ == "__main__":
    main()
