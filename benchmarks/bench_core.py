"""Speed and memory of our SegGPT path against transformers' reference pipeline, in one run.

    python benchmarks/bench_core.py [--device cuda|cpu] [--budget 300] [--out bench.json]
    python benchmarks/bench_core.py --device cpu --precisions float32 bfloat16 int8 --contention [--out ...]

Both sides use the same random full-size weights (SegGptConfig() = ViT-L, 370 M parameters) and the
same inputs (512x512 uint8 RGB images, 3-class label masks, so both resize to 448).

- reference: SegGptImageProcessorPil (PIL resize/normalise per image) + SegGptForImageSegmentation
  (eager attention, decoder on the whole canvas, fp32) + post_process_semantic_segmentation. Several
  prompts are run as separate pairs (its feature ensemble differs from Painter's and raises with
  several prompts, transformers #30196): the same pair count and FLOPs.
- ours: SegGPT.segment (device-side pre/post-processing, fused attention, decoder on the target half,
  Painter ensemble; bf16 on CUDA, fp32 on CPU) and SegGPT.propagate.

A pair is one (prompt, target) row: 1.59 TFLOP for ViT-L in transformers' forward. Ours runs fewer
(the decoder on the target half; with P prompts the target half is encoded once, not P times): both
are counted with FlopCounterMode and printed first. Achieved TFLOP/s counts the FLOPs our path really
runs, against a measured bf16 matrix-product peak. Sizes: 1, 8, 32 targets x 1, 4, 8 prompts, and a 64-frame stack
with memory 8 (on CPU only the smallest sizes fit in the budget).

On CPU, --precisions times our path at each precision (float32, bfloat16, int8 = int8 linear layers)
against the same float32 reference, and --contention repeats the sweep with a second process burning
one core for the whole phase (started and stopped by the script): the ratio under contention next to
the quiet one shows whether our lead survives a busy desktop. int8 keeps the rest of the model at the
default dtype (bf16 on CPUs with bf16 hardware); to time a CPU without bf16 or AMX on one that has them:
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI SEGGPT_DTYPE=float32 python benchmarks/bench_core.py --device cpu \
        --precisions float32 int8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch


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


#: sizes at which the accelerator's sweep also times our path with quality=None (issue 28 item 5: the default
#: within 10% of it)
QUALITY_NONE_SIZES = ((8, 1), (32, 8))


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


def count_tflop_per_pair(config, prompts: int) -> dict:
    """FLOPs per (prompt, target) pair, counted by torch's FlopCounterMode on the meta device (no compute).

    transformers' forward is one pair; ours is one target with `prompts` prompts (Painter's ensemble
    carries the target half once per target, so only attention is paid per prompt).
    """
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import SegGptForImageSegmentation

    from seggpt_plugins import modeling

    with torch.device("meta"):
        net = SegGptForImageSegmentation(config).eval()
        h, w = modeling.half_size(config)
        half = torch.zeros(prompts, 3, h, w)
        owner = torch.zeros(prompts, dtype=torch.long)

    def count(fn):
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            fn()
        return counter.get_total_flops() / 1e12

    return {"prompts": prompts,
            "reference": round(count(lambda: net(pixel_values=half[:1], prompt_pixel_values=half[:1],
                                                 prompt_masks=half[:1])), 3),
            "ours": round(count(lambda: modeling.paint(net, half[:1], half, half, owner, kernel="eager")) / prompts, 3)}


def measure_peak_tflops(device, dtype):
    """The device's matrix-product rate in `dtype` (8192^3 on CUDA, 4096^3 on CPU): the ceiling we compare to."""
    n = 8192 if device.type == "cuda" else 4096
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    seconds = timed(lambda: a @ b, device, 10 if device.type == "cuda" else 3)
    return round(2 * n ** 3 / seconds / 1e12, 3)


def burn_one_core():
    """A second process spinning on one core until stopped (the contended phase)."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def cpu_sweep(net, reference, sizes, precisions, contention, flops, peaks, row, quality=None):
    """CPU: the reference (fp32) and our path at each precision, at each size, quiet and (with
    `contention`) with one core taken by another process. Each side is timed once per phase, sides
    interleaved size by size, so both see the same machine. quality: "fast" times the default path as a
    user meets it (the quality estimate, the examples prepared on each call); None the forward alone."""
    import copy

    from seggpt_plugins import SegGPT
    from seggpt_plugins.loading import precision_options

    models = {p: SegGPT(net if p == "float32" else copy.deepcopy(net), device="cpu", **precision_options(p))
              for p in precisions}
    tgt, pim, pms = inputs(1, 1)
    for model in models.values():  # oneDNN builds its bf16/int8 kernels on first use
        model.segment(tgt, pim, pms, quality=None)
    ref_threads = torch.get_num_threads()  # the reference runs as torch sets itself up (ours may follow the load)
    for phase in ["quiet"] + (["contended"] if contention else []):
        burner = burn_one_core() if phase == "contended" else None
        try:
            for targets, prompts in sizes:
                tgt, pim, pms = inputs(targets, prompts)
                pairs = targets * prompts
                torch.set_num_threads(ref_threads)
                ref_s = timed(lambda: reference.run_pairs(tgt, pim, pms, batch_size=targets), torch.device("cpu"), 1)
                for precision, model in models.items():
                    our_s = timed(lambda: model.segment(tgt, pim, pms, batch_size=targets, quality=quality),
                                  torch.device("cpu"), 1)
                    executed = flops[prompts]["ours"] * pairs / our_s
                    peak = peaks.get(precision)  # int8: no int8 peak is measured
                    row(kind="segment", phase=phase, precision=precision, quality=quality, targets=targets,
                        prompts=prompts,
                        pairs=pairs, ours_s_per_pair=round(our_s / pairs, 2), ref_s_per_pair=round(ref_s / pairs, 2),
                        ratio=round(ref_s / our_s, 2), ours_tflops=round(executed, 3),
                        ours_fraction_of_peak=round(executed / peak, 3) if peak else None,
                        ours_threads=torch.get_num_threads(), ref_threads=ref_threads)
        finally:
            if burner is not None:
                burner.kill()
                burner.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--budget", type=float, default=300, help="seconds; later sections are skipped past it")
    parser.add_argument("--kernels", nargs="+", default=None, help="attention kernels to try for our path")
    parser.add_argument("--compile", default=None,
                        help="torch.compile mode for our path (reduce-overhead: CUDA graphs)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--small", action="store_true", help="a small random config (checks the script only)")
    parser.add_argument("--precisions", nargs="+", default=None, choices=["float32", "bfloat16", "int8"],
                        help="CPU: our path at each of these precisions (default: float32)")
    parser.add_argument("--contention", action="store_true",
                        help="CPU: repeat the sweep with a second process burning one core")
    parser.add_argument("--quality", choices=["fast", "off"], default="off",
                        help="CPU: our path with the quality estimate (fast: the default path) or without (off)")
    parser.add_argument("--gpu-sweep", action="store_true",
                        help="the accelerator's sweep on any device (with --small on a CPU: checks that part of the "
                             "script)")
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
    small = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                 intermediate_hidden_state_indices=[0, 1, 2, 3], merge_index=0)
    config = SegGptConfig(**small) if args.small else SegGptConfig()
    net = SegGptForImageSegmentation(config).eval()
    for name, param in net.named_parameters():  # non-zero relative positions and tokens, like trained weights
        if "rel_pos" in name or "token" in name:
            torch.nn.init.normal_(param, std=0.02)
    from _report import commit

    report = {"commit": commit(),
              "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
              "rows": []}
    over = lambda: time.time() - started > args.budget  # noqa: E731

    def row(**r):
        report["rows"].append(r)
        print(json.dumps(r), flush=True)

    flops = {p: count_tflop_per_pair(config, p) for p in (1, 4, 8)}
    for p in flops.values():
        row(kind="tflop-per-pair", **p)
    reference = Reference(net.to(device), device)
    if not cuda and not args.gpu_sweep:
        from seggpt_plugins.loading import cpu_has_native_bf16

        peaks = {"float32": measure_peak_tflops(device, torch.float32)}
        if cpu_has_native_bf16():
            peaks["bfloat16"] = measure_peak_tflops(device, torch.bfloat16)
        else:
            peaks["bfloat16"] = peaks["float32"]
        from seggpt_plugins.quantization import int8_kernel

        report.update(peak_tflops=peaks, native_bf16=cpu_has_native_bf16(), cpu_count=os.cpu_count(),
                      int8_kernel=int8_kernel(), onednn_max_cpu_isa=os.environ.get("ONEDNN_MAX_CPU_ISA"),
                      seggpt_dtype=os.environ.get("SEGGPT_DTYPE"))
        sizes = [(1, 1), (2, 1), (1, 4)]
        cpu_sweep(net, reference, sizes, args.precisions or ["float32"], args.contention, flops, peaks, row,
                  quality=None if args.quality == "off" else args.quality)
        report["seconds"] = round(time.time() - started, 1)
        print_cpu_table(report["rows"])
        print(json.dumps({k: v for k, v in report.items() if k != "rows"}))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
        return
    ours_dtype = torch.bfloat16 if cuda else torch.float32
    report.update(peak_dtype=str(ours_dtype).removeprefix("torch."),
                  peak_tflops=measure_peak_tflops(device, ours_dtype))
    kernels = args.kernels or (["folded", "sdpa"] if cuda else ["chunked", "sdpa"])

    # 1. kernel choice for our path (T=8 or 1, P=1)
    t_small = 8 if cuda else 1
    tgt, pim, pms = inputs(t_small, 1)
    best, best_rate = None, 0.0
    for kernel in kernels:
        model = SegGPT(net, device=device, dtype=ours_dtype, attention=kernel, compile=args.compile)
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
    report.update(kernel=best, compile=args.compile)
    ours = SegGPT(net, device=device, dtype=ours_dtype, attention=best, compile=args.compile)

    # 2. reference vs ours over sizes
    accelerator = cuda or args.gpu_sweep
    sizes = [(1, 1), (8, 1), (32, 1), (8, 4), (8, 8), (32, 8)] if accelerator else [(1, 1), (2, 1), (1, 4)]
    for targets, prompts in sizes:
        if over():
            row(skipped=f"T={targets} P={prompts}: budget")
            continue
        tgt, pim, pms = inputs(targets, prompts)
        pairs = targets * prompts
        batch = min(32, targets) if cuda else targets
        run_ref = lambda: reference.run_pairs(tgt, pim, pms, batch_size=max(1, batch))  # noqa: E731
        run_ours = lambda: ours.segment(tgt, pim, pms, batch_size=batch)  # noqa: E731
        none_s = None
        if accelerator:  # each side alone, for its peak memory; median of a few after a warm-up
            net.float()
            peak_reset(device)
            ref_s = timed(run_ref, device, 2) if (targets, prompts) in [(1, 1), (8, 1), (8, 4), (32, 1)] else None
            ref_peak = peak_gb(device)
            ours.net.to(ours_dtype)
            peak_reset(device)
            our_s = timed(run_ours, device, 3)
            our_peak = peak_gb(device)
            if (targets, prompts) in QUALITY_NONE_SIZES:  # the default path against the forward alone
                none_s = timed(lambda: ours.segment(tgt, pim, pms, batch_size=batch, quality=None), device, 3)
        else:  # a shared machine drifts: alternate the sides, twice, and keep each one's best time
            ref_times, our_times = [], []
            for _ in range(2):
                ref_times.append(timed(run_ref, device, 1))
                our_times.append(timed(run_ours, device, 1))
            ref_s, our_s = min(ref_times), min(our_times)
            ref_peak = our_peak = None  # only the process's peak RSS is known: not separable by side
        r = {"targets": targets, "prompts": prompts, "pairs": pairs,
             "ours_pairs_per_s": round(pairs / our_s, 3), "ours_ms_per_pair": round(1e3 * our_s / pairs, 2),
             "ours_peak_gb": our_peak}
        if ref_s:
            r.update(ref_pairs_per_s=round(pairs / ref_s, 3), ref_ms_per_pair=round(1e3 * ref_s / pairs, 2),
                     ref_peak_gb=ref_peak, ratio=round(ref_s / our_s, 2))
        executed = flops[prompts]["ours"] * pairs / our_s  # the FLOPs our path really runs, per second
        r.update(ours_tflops=round(executed, 3), ours_fraction_of_peak=round(executed / report["peak_tflops"], 3))
        if ref_s:
            r["ref_tflops"] = round(flops[prompts]["reference"] * pairs / ref_s, 3)
        if none_s:
            r.update(quality_none_pairs_per_s=round(pairs / none_s, 3),
                     default_over_quality_none=round(none_s / our_s, 3))
        row(kind="segment", **r)

    # 3. propagation through a 64-frame stack, memory 8
    if not over() and accelerator:
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
    report["issue_28_item_5"] = item_5_bars(report["rows"])
    print("\n| T | P | ours pairs/s | ref pairs/s | ratio | ours ms/pair | ours TFLOP/s (of peak) | ref TFLOP/s "
          "| ours GB | ref GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        if r.get("kind") == "segment":
            print(f"| {r['targets']} | {r['prompts']} | {r['ours_pairs_per_s']} | {r.get('ref_pairs_per_s', '-')} | "
                  f"{r.get('ratio', '-')} | {r['ours_ms_per_pair']} | {r['ours_tflops']} "
                  f"({r['ours_fraction_of_peak']:.0%}) | {r.get('ref_tflops', '-')} | {r['ours_peak_gb']} "
                  f"| {r.get('ref_peak_gb', '-')} |")
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


def item_5_bars(rows) -> dict:
    """Issue 28 item 5's bars, read from the accelerator sweep's rows: each figure, its bar and whether it holds
    (None where the row is missing)."""
    segment = {(r["targets"], r["prompts"]): r for r in rows if r.get("kind") == "segment"}
    large, small = segment.get((32, 8), {}), segment.get((8, 1), {})
    checks = {"pairs_per_s_32x8": (large.get("ours_pairs_per_s"), ">=", 250),
              "ratio_8x1": (small.get("ratio"), ">=", 10),
              "peak_gb_32x8": (large.get("ours_peak_gb"), "<=", 35)}
    for size, r in (("8x1", small), ("32x8", large)):
        checks[f"default_over_quality_none_{size}"] = (r.get("default_over_quality_none"), ">=", 0.9)
    return {name: {"value": value, "bar": f"{sign} {bar}",
                   "holds": None if value is None else (value >= bar if sign == ">=" else value <= bar)}
            for name, (value, sign, bar) in checks.items()}


def print_cpu_table(rows):
    """The CPU sweep as a table: s/pair and the ratio against the reference, quiet and contended."""
    segment = [r for r in rows if r.get("kind") == "segment"]
    phases = sorted({r["phase"] for r in segment}, key=["quiet", "contended"].index)
    print("\n| T x P | precision | " + " | ".join(f"{p}: ours s/pair | ref s/pair | ratio" for p in phases)
          + (" | contended / quiet ratio |" if len(phases) == 2 else " |"))
    print("|---|---|" + "---|---|---|" * len(phases) + ("---|" if len(phases) == 2 else ""))
    keys = list(dict.fromkeys((r["targets"], r["prompts"], r["precision"]) for r in segment))
    for t, p, precision in keys:
        cells, ratios = [], []
        for phase in phases:
            r = next(r for r in segment
                     if (r["targets"], r["prompts"], r["precision"], r["phase"]) == (t, p, precision, phase))
            cells.append(f"{r['ours_s_per_pair']} | {r['ref_s_per_pair']} | **{r['ratio']}**")
            ratios.append(r["ratio"])
        tail = f" | {ratios[1] / ratios[0]:.2f}" if len(ratios) == 2 else ""
        print(f"| {t} x {p} | {precision} | " + " | ".join(cells) + tail + " |")


if __name__ == "__main__":
    main()
