"""Host time of the quality estimate on one thread: per 512x512 target, and per 512x512 example prepared.

    OMP_NUM_THREADS=1 python benchmarks/bench_quality_host.py --out benchmarks/results/bench_quality_host_cpu.json

(a) the default ("fast") estimate of one 512x512 target on a finished prediction, the way the runner
    calls it (`SegGPT.assess`: features, the curve, and the object context the per-object estimate keeps);
(b) one 512x512 example's host statistics (`ExampleStats.of` and the naive model's lookup tables, made
    on first use), and the whole of `prepare_prompts` for it on this CPU (which adds the colour code, the
    colour mask and the resize to the model's input).
Bars (issue 28, item 4): (a) at most 5 ms, (b) at most 20 ms. Each against the implementation before it
(quality.py at --before, loaded from git into a temporary module: same predictions, same examples).
Two cases each: stardist's 512x512 nuclei field (grey; its example: the field turned a quarter, with its
mask) and a generated 512x512 task (quality_fit.HELD_OUT_SEED). Best and median of --repeats runs.
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from _report import ROOT, report  # noqa: E402

BEFORE = "9c16bf0"  # the commit issue 28 measured
BARS_MS = {"estimate_per_target": 5.0, "example_prepared": 20.0}


def module_at(commit: str, path: str = "seggpt_plugins/quality.py", name: str = "seggpt_plugins._quality_before"):
    """A package module as it was at `commit`, imported from a temporary file under the package's name (its
    relative imports resolve against today's package)."""
    text = subprocess.run(["git", "show", f"{commit}:{path}"], capture_output=True, text=True, cwd=ROOT,
                          check=True).stdout
    file = Path(tempfile.mkdtemp()) / Path(path).name
    file.write_text(text)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def estimate_with(module, models, prediction, examples, rgb) -> float:
    """SegGPT.assess's "fast" path written against any version of quality.py (features, object context, curve)."""
    estimate, maps = models["fast"], {}
    values = module.features(prediction.labels, prediction.scores, examples, rgb, names=estimate.names, maps=maps)
    if "foreground" in maps:
        module.ObjectContext(np.round(maps["foreground"] * 255).astype(np.uint8), maps["stride"], examples.diameter,
                             models.get("object"))
    return estimate.predict(values)


def timed(function, repeats: int) -> dict:
    function()  # warm: caches, lookup tables, allocator
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(1000 * (time.perf_counter() - started))
    return {"best_ms": round(min(times), 2), "median_ms": round(float(np.median(times)), 2)}


def cases(model):
    """{name: (target rgb, example rgb, example label mask)}, all 512x512."""
    from tifffile import imread

    from eval_quality import SAMPLES, scaled
    from seggpt_plugins.quality_fit import HELD_OUT_SEED
    from seggpt_plugins.synthetic import SyntheticTasks

    field = np.repeat(scaled(imread(SAMPLES / "nuclei2d.tif"))[..., None], 3, -1)
    mask = (imread(SAMPLES / "nuclei2d_mask.tif") > 0).astype(np.uint8)
    out = {"nuclei_512": (field, np.ascontiguousarray(np.rot90(field)), np.ascontiguousarray(np.rot90(mask)))}
    batch = SyntheticTasks(512, device="cpu").sample(1, prompts=1, seed=HELD_OUT_SEED + 1)
    to_np = lambda t: t.permute(1, 2, 0).round().clamp(0, 255).byte().numpy()  # noqa: E731
    example_mask = to_np(batch.prompt_masks[0, 0])
    labels = model.prepare_prompts([to_np(batch.prompt_images[0, 0] * 255)], [example_mask]).code.labels_of_colors(
        example_mask)
    out["generated_512"] = (to_np(batch.target_images[0] * 255), to_np(batch.prompt_images[0, 0] * 255), labels)
    return out


def main() -> None:
    import torch

    from seggpt_plugins import SegGPT, engine
    from seggpt_plugins.example_stats import ExampleStats
    from seggpt_plugins.quality import models_for

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--before", default=BEFORE, help="the commit whose quality.py is the reference")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    before = module_at(args.before)
    model = SegGPT.from_pretrained("demo", device="cpu")
    models = models_for("demo")  # the same curves for both (the file beside the demo weights)
    results = {}
    for name, (target, example, mask) in cases(model).items():
        prompts = model.prepare_prompts([example], [mask])
        prediction = model.segment(target, prompts, quality=None)[0]
        old_stats = before.ExampleStats.of([mask], [example])
        row = {"estimate_per_target": {
            "now": timed(lambda: model.assess(prediction, prompts.examples, target, "fast"), args.repeats),
            "before": timed(lambda: estimate_with(before, models, prediction, old_stats, target), args.repeats),
            "estimate": {"now": round(model.assess(prediction, prompts.examples, target, "fast"), 4),
                         "before": round(estimate_with(before, models, prediction, old_stats, target), 4)}}}

        def stats_now():
            stats = ExampleStats.of([mask], [example])
            stats.label_by_word, stats.foreground_by_bin  # noqa: B018  (made on first use: counted here)

        row["example_prepared"] = {"now": timed(stats_now, args.repeats),
                                   "before": timed(lambda: before.ExampleStats.of([mask], [example]), args.repeats)}
        row["prepare_prompts"] = {"now": timed(lambda: model.prepare_prompts([example], [mask]), args.repeats)}
        saved, engine.ExampleStats = engine.ExampleStats, before.ExampleStats
        try:
            row["prepare_prompts"]["before"] = timed(lambda: model.prepare_prompts([example], [mask]), args.repeats)
        finally:
            engine.ExampleStats = saved
        results[name] = row
        for what, figures in row.items():
            if "now" not in figures or "best_ms" not in figures["now"]:
                continue
            bar = BARS_MS.get(what)
            now = figures["now"]
            print(f"{name:14s} {what:20s} now {now['best_ms']:7.2f} ms (median {now['median_ms']:.2f})"
                  f"  before {figures['before']['best_ms']:7.2f} ms" + (f"  bar {bar:.0f} ms: "
                  f"{'met' if now['best_ms'] <= bar else 'NOT met'}" if bar else ""), flush=True)
    report({"threads": 1, "repeats": args.repeats, "before": args.before, "bars_ms": BARS_MS, "results": results},
           args.out)


if __name__ == "__main__":
    main()
