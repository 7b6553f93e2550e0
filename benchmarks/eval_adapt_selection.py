"""Which of adapt's evaluations should it keep? Held-out square vs the other tiles, step by step (design tiles).

    cd benchmarks && OMP_NUM_THREADS=2 python eval_adapt_selection.py --examples 0 1 2 3 5 \
        [--foreground-weight balanced] [--steps 90] [--out results/eval_adapt_selection.json]

`SegGPT.adapt` keeps the weights of the evaluation that scored best on a held-out corner square of the
example (32x32 px of a 128 px tile). With one small example that score is noisy, and the best of noisy
scores favours an early lucky evaluation (eval_adapt.py's tile 8 kept step 10 of 70). This script runs
adapt as eval_adapt.py does on the design tiles 0-7 (one tile the example, the other seven the targets;
the learning-rate schedule over adapt's step cap of 300, or over `--schedule-steps`) for `--steps` steps,
about what 180 s gives on this CPU, with early stopping off, and at every evaluation also segments the
other seven tiles with the current weights (the whole example tile as the prompt, as eval_adapt.py reads
the result). Then it replays
selection rules on each trace, with the patience of 6 evaluations adapt uses:

- best: the first evaluation with the highest held-out score (adapt as it was);
- latest within d: the latest evaluation whose score is within d of the best so far (d = 0.005 .. 0.03);
- last: the last evaluation (no selection).

The figure is the other tiles' mean foreground IoU of the weights each rule keeps, per example and averaged.
With `--ema D` every evaluation reads a running average of the trained weights (decay D per step) instead.
Only design tiles are read: the choice is made here and checked on the report tiles by eval_adapt.py.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager

import numpy as np

from _report import report
from eval_adapt import DESIGN_TILES, adapt_settings, painted_over_true
from eval_demo import SAMPLES, TILE, foreground_iou
from seggpt_plugins.adapt import AdaptSettings

PATIENCE = 6
TOLERANCES = (0.005, 0.01, 0.02, 0.03)


def replay(trace: list[dict], rule: str, tolerance: float = 0.0, patience: int = PATIENCE) -> dict:
    """The evaluation `rule` keeps on a trace [{step, held_out_iou, other_iou}, ...] (step 0 = the base
    weights), stopping as adapt does after `patience` evaluations that do not beat the best."""
    best, kept, stale = trace[0]["held_out_iou"], trace[0], 0
    for point in trace[1:]:
        score = point["held_out_iou"]
        if rule == "last":
            kept = point
        elif score > best:
            best, kept, stale = score, point, 0
        else:
            stale += 1
            if rule == "within" and score >= best - tolerance:
                kept = point
        if rule != "last" and stale >= patience:
            break
    return kept


def update_average(net, average: dict, decay: float) -> None:
    """average <- decay * average + (1 - decay) * the trained weights (their first values the first time)."""
    import torch

    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.requires_grad:
                if name in average:
                    average[name].mul_(decay).add_(p.detach(), alpha=1 - decay)
                else:
                    average[name] = p.detach().clone()


@contextmanager
def averaged_weights(net, average: dict):
    """The network with the averaged weights in place of its own, for the time of the block (none: as is)."""
    import torch

    params = dict(net.named_parameters())
    live = {name: params[name].detach().clone() for name in average}
    with torch.no_grad():
        for name, value in average.items():
            params[name].copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in live.items():
                params[name].copy_(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, nargs="+", default=[0, 1, 2, 3, 5])
    parser.add_argument("--steps", type=int, default=90, help="steps run")
    parser.add_argument("--schedule-steps", type=int, default=300,
                        help="the steps the learning-rate schedule spans (adapt's step cap; 300 as adapt's default, "
                             "--steps: annealed over the steps run)")
    parser.add_argument("--lr", type=float, default=AdaptSettings.lr, help="default: adapt's (%(default)s)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--foreground-weight", default=None)
    parser.add_argument("--ema", type=float, default=0.0,
                        help="evaluate (and so keep) a running average of the weights with this decay per step "
                             "(0: the weights as trained)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from tifffile import imread

    import seggpt_plugins.adapt as adapt_module
    import seggpt_plugins.training as training_module
    from seggpt_plugins import SegGPT

    image, truth = imread(SAMPLES / "nuclei2d.tif"), imread(SAMPLES / "nuclei2d_mask.tif") > 0
    corners = [(r, c) for r in range(0, image.shape[0], TILE) for c in range(0, image.shape[1], TILE)]
    tiles = [image[r:r + TILE, c:c + TILE] for r, c in corners]
    masks = [truth[r:r + TILE, c:c + TILE].astype(np.uint8) for r, c in corners]
    base = SegGPT.from_pretrained("demo", device="cpu", dtype="float32")
    held_out_iou, train_step = adapt_module.held_out_iou, training_module.train_step
    runs = []
    for k in args.examples:
        if k not in DESIGN_TILES:
            raise SystemExit(f"example tile {k} is not a design tile (0-7)")
        targets = [t for t in DESIGN_TILES if t != k]
        trace: list[dict] = []

        average: dict = {}  # --ema: the running average of the trained weights, by name

        def traced(evaluator, regions, held, ids, batch_size=2):  # adapt's score, and the other tiles' IoU
            with averaged_weights(evaluator.net, average):
                score = held_out_iou(evaluator, regions, held, ids, batch_size)
                preds = evaluator.segment([tiles[t] for t in targets], tiles[k], masks[k], quality=None)
            other = float(np.mean([foreground_iou(p.labels > 0, masks[t] > 0) for p, t in zip(preds, targets)]))
            trace.append({"held_out_iou": round(score, 4), "other_iou": round(other, 4),
                          "painted_over_true": painted_over_true(preds, [masks[t] for t in targets])})
            return score

        def averaging_step(net, *step_args):  # training.train_step, then the average follows the weights
            loss = train_step(net, *step_args)
            update_average(net, average, args.ema)
            return loss

        steps_done = [0]

        def progress(p):
            steps_done[0] = p.step

        settings = adapt_settings(args)
        settings.patience = 10 ** 6  # replayed below
        adapt_module.held_out_iou = traced
        if args.ema:
            training_module.train_step = averaging_step
        try:
            adapted = base.adapt([tiles[k]], [masks[k]], time_limit=None, steps=args.schedule_steps,
                                 settings=settings, progress=progress, cancel=lambda: steps_done[0] >= args.steps)
        finally:
            adapt_module.held_out_iou = held_out_iou
            training_module.train_step = train_step
        for point, entry in zip(trace, adapted.adaptation["history"]):
            point["step"] = entry["step"]
        rules = {"best": replay(trace, "best"), "last": replay(trace, "last"),
                 **{f"within {d:g}": replay(trace, "within", d) for d in TOLERANCES}}
        run = {"example_tile": k, "targets": targets, "foreground_weight": adapted.adaptation["foreground_weight"],
               "trace": trace, "kept": {name: {"step": p["step"], "other_iou": p["other_iou"]}
                                        for name, p in rules.items()}}
        print({key: run[key] for key in ("example_tile", "foreground_weight", "kept")}, flush=True)
        runs.append(run)
    names = list(runs[0]["kept"])
    means = {name: round(float(np.mean([r["kept"][name]["other_iou"] for r in runs])), 4) for name in names}
    print("mean other-tile IoU of the kept weights, by rule:", means, flush=True)
    report({"benchmark": "eval_adapt_selection", "image": "stardist nuclei2d, design tiles 0-7 of 128 px",
            "steps": args.steps, "schedule_steps": args.schedule_steps, "ema": args.ema, "lr": args.lr,
            "batch_size": args.batch_size, "patience": PATIENCE,
            "foreground_weight": adapt_settings(args).foreground_weight, "mean_by_rule": means,
            "runs": runs}, args.out)


if __name__ == "__main__":
    main()
