"""How should propagated frames be read under a foreground margin? (section 19)

    cd benchmarks && OMP_NUM_THREADS=2 python eval_margin_memory.py --out results/eval_margin_memory.json

Generated videos of objects moving far from the annotated frame (seggpt_plugins.scenes.moving_objects, the
scene of tests/test_propagation.py, 21 frames), propagated from their first frame by the demo model, its
frames read (propagation.PROPAGATION_MARGIN, which the memory then remembers) with margins 0 and 0.7, with
the memory gate (the default) and without it. Seeds 0-2 are the design split (section 15 chose the memory's
rules on them), seeds 11-13 the report (the tests' seed is 11); stardist's 3D stack, as eval_demo.py
propagates it, is reported too. Per run: the painted share of the frames (first, middle, last) against the
truth's, how many frames joined the memory, and the mean foreground IoU.
"""

from __future__ import annotations

import numpy as np

DESIGN_SEEDS = (0, 1, 2)
REPORT_SEEDS = (11, 12, 13)
MARGINS = (0.0, 0.7)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def video_run(model, seed: int, gate: bool) -> dict:
    from seggpt_plugins.scenes import annotated_frame, moving_objects

    frames, truth = moving_objects("video", seed=seed, num_frames=21)
    origin = annotated_frame("video", len(frames))
    found = list(model.propagate(frames, annotations={origin: truth[origin]}, memory_gate=gate))
    share = [float(np.mean(p.labels > 0)) for p in found]
    true = [float(np.mean(truth[p.index] > 0)) for p in found]
    return {"painted_share": [round(share[k], 3) for k in (0, len(share) // 2, -1)],
            "true_share": [round(true[k], 3) for k in (0, len(true) // 2, -1)],
            "frames_joined": f"{sum(bool(p.joined_memory) for p in found)} of {len(found)}",
            "foreground_iou": round(float(np.mean([iou(p.labels > 0, truth[p.index] > 0) for p in found])), 3)}


def main() -> None:
    import warnings

    from _report import model_and_args, report
    from eval_demo import stardist_3d

    from seggpt_plugins import propagation

    warnings.simplefilter("ignore")
    model, args = model_and_args(__doc__)
    runs, means = [], {}
    for margin in MARGINS:
        propagation.PROPAGATION_MARGIN = margin
        for gate in (True, False):
            for split, seeds in (("design", DESIGN_SEEDS), ("report", REPORT_SEEDS)):
                for seed in seeds:
                    runs.append({"split": split, "seed": seed, "margin": margin, "memory_gate": gate,
                                 **video_run(model, seed, gate)})
                    print(runs[-1], flush=True)
                means[f"margin {margin}, gate {gate}, {split}"] = round(float(np.mean(
                    [r["foreground_iou"] for r in runs[-len(seeds):]])), 3)
        runs.append({"split": "report", "stack": "stardist 3D (eval_demo.py)", "margin": margin, "memory_gate": True,
                     **stardist_3d(model, 16)})
        print(runs[-1], flush=True)
    report({"model": args.model, "device": args.device, "mean_foreground_iou": means, "runs": runs}, args.out)


if __name__ == "__main__":
    main()
