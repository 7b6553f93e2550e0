"""Speed and memory of our SegGPT path against transformers' reference pipeline, in one run.

    python benchmarks/bench_core.py [--device cuda|cpu] [--budget 300] [--out bench.json]

Both sides use the same random full-size weights (SegGptConfig() = ViT-L, 370 M parameters) and the
same inputs (512x512 uint8 RGB images, 3-class label masks, so both resize to 448).

- reference: SegGptImageProcessorPil (PIL resize/normalise per image) + SegGptForImageSegmentation
  (eager attention, decoder on the whole canvas, fp32) + post_process_semantic_segmentation. Several
  prompts are run as separate pairs (its feature ensemble differs from Painter's and raises with
  several prompts, transformers #30196): the same pair count and FLOPs.
- ours: SegGPT.segment (device-side pre/post-processing, fused attention, decoder on the target half,
  Painter ensemble; bf16 on CUDA, fp32 on CPU) and SegGPT.propagate.

A pair is one (prompt, target) row: 1.59 TFLOP for ViT-L. Achieved TFLOP/s = 1.59 x pairs/s, against
a measured bf16 matrix-product peak. Sizes: 1, 8, 32 targets x 1, 4, 8 prompts, and a 64-frame stack
with memory 8 (on CPU only the smallest sizes fit in the budget).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

TFLOP_PER_PAIR = 1.59


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device):
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated() / 1e9, 2)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)  # process peak RSS


def timed(fn, device, repeat):
    if device.type == "cuda":
        fn()  # warm-up (kernel selection, compilation); on CPU there is nothing to warm up
        sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def inputs(targets, prompts, seed=0):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(targets + prompts)]
    masks = [np.zeros((512, 512), np.uint8) for _ in range(prompts)]
    for m in masks:
        m[64:256, 64:256], m[300:480, 100:400], m[100:200, 300:500] = 1, 2, 3
    return images[:targets], images[targets:], masks


class Reference:
    """transformers' own pipeline: PIL image processor + model + post-processing, fp32 eager."""

    def __init__(self, net, device):
        from transformers.models.seggpt.image_processing_pil_seggpt import SegGptImageProcessorPil

        self.net, self.device = net, device
        self.processor = SegGptImageProcessorPil()

    def run_pairs(self, target_images, prompt_images, prompt_masks, batch_size):
        """Every (prompt, target) pair through the pipeline, `batch_size` pairs per forward."""
        pairs = [(t, p, m) for t in target_images for p, m in zip(prompt_images, prompt_masks)]
        results = []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            batch = self.processor(images=[c[0] for c in chunk], prompt_images=[c[1] for c in chunk],
                                   prompt_masks=[c[2] for c in chunk], num_labels=3, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with torch.inference_mode():
                outputs = self.net(**batch)
            results += self.processor.post_process_semantic_segmentation(
                outputs, target_sizes=[c[0].shape[:2] for c in chunk], num_labels=3)
        return results


def measure_peak_tflops(device):
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    seconds = timed(lambda: a @ b, device, 10)
    return round(2 * 8192 ** 3 / seconds / 1e12, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--budget", type=float, default=300, help="seconds; later sections are skipped past it")
    parser.add_argument("--kernels", nargs="+", default=None, help="attention kernels to try for our path")
    parser.add_argument("--out", default=None)
    parser.add_argument("--small", action="store_true", help="a small random config (checks the script only)")
    args = parser.parse_args()

    import transformers
    from transformers import SegGptConfig, SegGptForImageSegmentation

    from seggpt_plugins import SegGPT
    from seggpt_plugins.loading import pick_device

    started = time.time()
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference is plain fp32
    torch.manual_seed(0)
    config = SegGptConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                          intermediate_hidden_state_indices=[0, 1, 2, 3], merge_index=0) if args.small else SegGptConfig()
    net = SegGptForImageSegmentation(config).eval()
    for name, param in net.named_parameters():  # non-zero relative positions and tokens, like trained weights
        if "rel_pos" in name or "token" in name:
            torch.nn.init.normal_(param, std=0.02)
    report = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
              "peak_bf16_tflops": measure_peak_tflops(device), "rows": []}
    over = lambda: time.time() - started > args.budget  # noqa: E731

    def row(**r):
        report["rows"].append(r)
        print(json.dumps(r), flush=True)

    reference = Reference(net.to(device), device)
    ours_dtype = torch.bfloat16 if cuda else torch.float32
    kernels = args.kernels or (["folded", "sdpa"] if cuda else ["chunked", "sdpa"])

    # 1. kernel choice for our path (T=8 or 1, P=1)
    t_small = 8 if cuda else 1
    tgt, pim, pms = inputs(t_small, 1)
    best, best_rate = None, 0.0
    for kernel in kernels:
        model = SegGPT(net, device=device, dtype=ours_dtype, attention=kernel)
        try:
            seconds = timed(lambda: model.segment(tgt, pim, pms, batch_size=t_small), device, 3 if cuda else 1)
        except Exception as exc:
            row(kind="ours", kernel=kernel, error=repr(exc)[:200])
            continue
        rate = t_small / seconds
        row(kind="ours-kernel", kernel=kernel, targets=t_small, prompts=1, pairs_per_s=round(rate, 2))
        if rate > best_rate:
            best, best_rate = kernel, rate
        net.float()
    report["kernel"] = best
    ours = SegGPT(net, device=device, dtype=ours_dtype, attention=best)

    # 2. reference vs ours over sizes
    sizes = [(1, 1), (8, 1), (32, 1), (8, 4), (8, 8), (32, 8)] if cuda else [(1, 1), (2, 1), (1, 4)]
    ref_rates = {}
    for targets, prompts in sizes:
        if over():
            row(skipped=f"T={targets} P={prompts}: budget")
            continue
        tgt, pim, pms = inputs(targets, prompts)
        pairs = targets * prompts
        batch = min(32, targets) if cuda else targets
        net.float()
        peak_reset(device)
        ref_s = timed(lambda: reference.run_pairs(tgt, pim, pms, batch_size=max(1, batch)), device, 2 if cuda else 1) \
            if (targets, prompts) in [(1, 1), (8, 1), (8, 4), (32, 1)] or not cuda else None
        ref_peak = peak_gb(device)
        ours.net.to(ours_dtype)
        peak_reset(device)
        our_s = timed(lambda: ours.segment(tgt, pim, pms, batch_size=batch), device, 3 if cuda else 1)
        our_peak = peak_gb(device)
        r = {"targets": targets, "prompts": prompts, "pairs": pairs,
             "ours_pairs_per_s": round(pairs / our_s, 2), "ours_ms_per_pair": round(1e3 * our_s / pairs, 2),
             "ours_peak_gb": our_peak}
        if ref_s:
            ref_rates[pairs] = pairs / ref_s
            r.update(ref_pairs_per_s=round(pairs / ref_s, 2), ref_ms_per_pair=round(1e3 * ref_s / pairs, 2),
                     ref_peak_gb=ref_peak, ratio=round(ref_s / our_s, 2))
        if report["peak_bf16_tflops"]:
            r["ours_tflops"] = round(TFLOP_PER_PAIR * pairs / our_s, 1)
            r["ours_fraction_of_peak"] = round(TFLOP_PER_PAIR * pairs / our_s / report["peak_bf16_tflops"], 3)
        row(kind="segment", **r)

    # 3. propagation through a 64-frame stack, memory 8
    if not over() and cuda:
        rng = np.random.default_rng(1)
        frames = rng.integers(0, 256, (64, 448, 448), dtype=np.uint8)
        mask = np.zeros((448, 448), np.uint8)
        mask[100:200, 100:200], mask[250:400, 200:300] = 1, 2
        pairs = sum(1 + min(k, 8) for k in range(63))
        ours.net.to(ours_dtype)
        peak_reset(device)
        seconds = timed(lambda: list(ours.propagate(frames, annotations={0: mask}, memory=8)), device, 1)
        row(kind="propagate", frames=64, memory=8, pairs=pairs, ours_pairs_per_s=round(pairs / seconds, 2),
            ours_seconds=round(seconds, 2), ours_peak_gb=peak_gb(device))

    report["seconds"] = round(time.time() - started, 1)
    print("\n| T | P | ours pairs/s | ref pairs/s | ratio | ours ms/pair | ours TFLOP/s | ours GB | ref GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        if r.get("kind") == "segment":
            print(f"| {r['targets']} | {r['prompts']} | {r['ours_pairs_per_s']} | {r.get('ref_pairs_per_s', '-')} | "
                  f"{r.get('ratio', '-')} | {r['ours_ms_per_pair']} | {r.get('ours_tflops', '-')} | "
                  f"{r['ours_peak_gb']} | {r.get('ref_peak_gb', '-')} |")
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
