"""Does propagation's memory hold under a foreground margin? (why the demo does not ship one, section 19)

    cd benchmarks && OMP_NUM_THREADS=1 python eval_margin_memory.py --out results/eval_margin_memory.json

Generated videos of objects moving far from the annotated frame (seggpt_plugins.scenes.moving_objects, the
scene of tests/test_propagation.py: seeds 11-13, 21 frames), propagated from their first frame by the demo
model read with margins 0 and 0.7, with the memory gate (the default) and without it. Per run: the painted
share of the frames (first, middle, last) against the truth's, how many frames joined the memory, and the
mean foreground IoU. Nothing is chosen here.
"""

from __future__ import annotations

import numpy as np

SEEDS = (11, 12, 13)
MARGINS = (0.0, 0.7)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def main() -> None:
    import warnings

    from _report import model_and_args, report

    from seggpt_plugins.scenes import annotated_frame, moving_objects

    warnings.simplefilter("ignore")
    model, args = model_and_args(__doc__)
    runs = []
    for seed in SEEDS:
        frames, truth = moving_objects("video", seed=seed, num_frames=21)
        origin = annotated_frame("video", len(frames))
        for margin in MARGINS:
            model.foreground_margin = margin
            for gate in (True, False):
                found = list(model.propagate(frames, annotations={origin: truth[origin]}, memory_gate=gate))
                share = [float(np.mean(p.labels > 0)) for p in found]
                true = [float(np.mean(truth[p.index] > 0)) for p in found]
                runs.append({"seed": seed, "margin": margin, "memory_gate": gate,
                             "painted_share": [round(share[k], 3) for k in (0, len(share) // 2, -1)],
                             "true_share": [round(true[k], 3) for k in (0, len(true) // 2, -1)],
                             "frames_joined": f"{sum(bool(p.joined_memory) for p in found)} of {len(found)}",
                             "foreground_iou": round(float(np.mean(
                                 [iou(p.labels > 0, truth[p.index] > 0) for p in found])), 3)})
                print(runs[-1], flush=True)
    report({"model": args.model, "device": args.device, "runs": runs}, args.out)


if __name__ == "__main__":
    main()
