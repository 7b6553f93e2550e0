"""Probe a GPU before a long run: kernel numerics in bf16, demo-config training throughput, ViT-L speed.

    PYTHONPATH=. python benchmarks/gpu_probe.py [--out probe.json]

Prints a short table; writes all numbers to --out.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def timed(fn, repeat=5, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def kernels(results):
    from transformers import SegGptConfig
    from transformers.models.seggpt.modeling_seggpt import SegGptAttention

    from seggpt_plugins import modeling as M

    torch.manual_seed(0)
    attention = SegGptAttention(SegGptConfig()).cuda().eval()
    torch.nn.init.normal_(attention.rel_pos_h, std=0.02)
    torch.nn.init.normal_(attention.rel_pos_w, std=0.02)
    x = torch.randn(32, 56, 28, 1024, device="cuda")
    with torch.no_grad():
        reference = M.attention_forward(attention.double(), x.double(), "eager").float()
        attention.float()
        out = {}
        for dtype in (torch.float32, torch.bfloat16):
            attention.to(dtype)
            for kernel in ("eager", "sdpa", "folded"):
                try:
                    y = M.attention_forward(attention, x.to(dtype), kernel).float()
                    err = ((y - reference).norm() / reference.norm()).item()
                    seconds = timed(lambda: M.attention_forward(attention, x.to(dtype), kernel))
                    out[f"{kernel}/{str(dtype)[6:]}"] = {"rel_err": err, "ms_per_32": seconds * 1e3}
                except Exception as exc:  # report and go on
                    out[f"{kernel}/{str(dtype)[6:]}"] = {"error": repr(exc)[:300]}
            attention.float()
    results["attention_vit_l_32rows"] = out


def training_throughput(results):
    from seggpt_plugins.synthetic import SyntheticTasks
    from seggpt_plugins.training import forward_batch, make_config, painting_loss
    from transformers import SegGptForImageSegmentation

    torch.backends.cuda.matmul.allow_tf32 = True
    net = SegGptForImageSegmentation(make_config("demo")).cuda().train()
    results["demo_params_M"] = sum(p.numel() for p in net.parameters()) / 1e6
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    gen = SyntheticTasks(128, device="cuda")
    out = {}
    for batch_size in (64, 128, 256):
        for prompts in (1, 3):
            rows = batch_size // prompts
            gen_s = timed(lambda: gen.sample(rows, prompts, seed=1), repeat=3, warmup=1)
            data = gen.sample(rows, prompts, seed=1)

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    pred = forward_batch(net, data, "folded")
                loss = painting_loss(pred, data.target_masks)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

            torch.cuda.reset_peak_memory_stats()
            step_s = timed(step, repeat=5, warmup=2)
            out[f"b{batch_size}_p{prompts}"] = {"gen_ms": gen_s * 1e3, "step_ms": step_s * 1e3,
                                                "targets_per_s": rows / (gen_s + step_s),
                                                "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
    results["demo_training"] = out


def vit_large(results):
    from seggpt_plugins import modeling as M
    from transformers import SegGptConfig, SegGptForImageSegmentation

    torch.manual_seed(0)
    net = SegGptForImageSegmentation(SegGptConfig()).cuda().eval().to(torch.bfloat16)
    out = {}
    for targets in (8, 32):
        t = torch.randn(targets, 3, 448, 448, device="cuda", dtype=torch.bfloat16)
        owner = torch.arange(targets, device="cuda")
        for kernel in ("sdpa", "folded"):
            with torch.inference_mode():
                seconds = timed(lambda: M.paint(net, t, t, t, owner, "instance", kernel), repeat=3, warmup=1)
            out[f"{kernel}_t{targets}"] = {"pairs_per_s": targets / seconds, "tflops": 1.59 * targets / seconds}
    results["vit_large_bf16"] = out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="probe.json")
    args = parser.parse_args()
    import transformers

    results = {"torch": torch.__version__, "transformers": transformers.__version__,
               "gpu": torch.cuda.get_device_name()}
    for section in (kernels, training_throughput, vit_large):
        started = time.time()
        try:
            section(results)
        except Exception as exc:
            results[section.__name__ + "_error"] = repr(exc)[:500]
        results[section.__name__ + "_seconds"] = round(time.time() - started, 1)
        print(json.dumps({k: v for k, v in results.items()}, indent=1, default=str), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
