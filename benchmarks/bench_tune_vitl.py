"""In-context tuning of the full ViT-L SegGPT (issue 31, item 4): seconds per step and peak memory.

    OMP_NUM_THREADS=2 python benchmarks/bench_tune_vitl.py [--device cpu] [--dtype bfloat16] [--steps 2] \\
        [--out benchmarks/results/bench_tune_vitl_cpu.json]

The real architecture: `SegGptConfig()` (ViT-L, 24 layers, 448x448 per image) with random weights (speed
and memory do not depend on their values), wrapped as the core's SegGPT at --dtype, and
`prompt_tuning.tune_prompt` (what `seggpt tune-prompt` runs: a prompt image and mask learned, the model
frozen) on generated samples (discs on noise, 448 px), at batch 1 and 2. The first step of each batch
size is a warm-up and not timed. Peak memory: on a CPU the process's peak RSS (the weights included;
"weights" is the RSS once the model is built), on CUDA torch's peak allocation.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def samples(size: int, count: int = 4, seed: int = 0):
    """(image, label mask, task) triples: bright discs on smooth noise."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    for _ in range(count):
        labels = np.zeros((size, size), np.uint8)
        for _ in range(6):
            r, c, radius = rng.integers(40, size - 40, 2).tolist() + [int(rng.integers(15, 40))]
            labels[(rows - r) ** 2 + (cols - c) ** 2 <= radius ** 2] = 1
        image = (rng.normal(80, 20, (size, size)) + 100 * labels).clip(0, 255).astype(np.uint8)
        yield image, labels, "discs"


def peak_gb(device) -> float:
    import torch

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)  # kB -> GB


def main() -> None:
    import torch
    from transformers import SegGptConfig, SegGptForImageSegmentation

    from _report import report
    from seggpt_plugins.datasets import PairedSamples
    from seggpt_plugins.engine import SegGPT
    from seggpt_plugins.prompt_tuning import tune_prompt

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per batch size (after one warm-up)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = SegGptConfig()
    model = SegGPT(SegGptForImageSegmentation(config).eval(), device=args.device, dtype=args.dtype, source="vit-l-random")
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    weights = peak_gb(model.device)
    data = PairedSamples(samples(config.image_size[1]), config.image_size[1])
    rows = []
    for batch_size in args.batch_sizes:
        tune_prompt(model, data, steps=1, batch_size=batch_size, progress=False)  # warm-up
        started = time.perf_counter()
        _, log = tune_prompt(model, data, steps=args.steps, batch_size=batch_size, progress=False)
        seconds = (time.perf_counter() - started) / args.steps
        rows.append({"batch_size": batch_size, "s_per_step": round(seconds, 2),
                     "pairs_per_s": round(batch_size / seconds, 3), "peak_gb": peak_gb(model.device),
                     "losses": [r["loss"] for r in log]})
        print(rows[-1], flush=True)
    report({"model": "SegGptConfig() (ViT-L), random weights", "device": str(model.device),
            "dtype": str(model.dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "parameters_m": round(sum(p.numel() for p in model.net.parameters()) / 1e6, 1),
            "input": list(config.image_size), "rss_after_build_gb": weights, "tuning": rows}, args.out)


if __name__ == "__main__":
    main()
