"""Which foreground margin should a model's paintings be read with? A sweep, chosen on generated tasks only.

    OMP_NUM_THREADS=1 python benchmarks/eval_foreground_margin.py --out benchmarks/results/eval_foreground_margin.json

A model trained with foreground pixels weighted x10 (training.painting_loss) paints a halo of blends around
its objects; `foreground_margin` m gives a pixel a label only when its painting is nearer that label's colour
than black by m (colors.favour_background). For each m of --margins:

- choice: generated tasks from seed 40,000,000 (--tasks, 1 and 3 examples), a range used neither in training
  nor in eval_demo.py's held-out figures; the margin chosen is the one with the best 1-shot mIoU here;
- report, not looked at for the choice: stardist's 2D tiles and 3D stack as eval_demo.py measures them
  (foreground IoU, Otsu in the same run).
"""

from __future__ import annotations

import argparse
import time

CHOICE_SEED = 40_000_000


def main() -> None:
    from _report import report
    from eval_demo import stardist_2d, stardist_3d

    from seggpt_plugins import SegGPT
    from seggpt_plugins.evaluation import evaluate_generated

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--margins", type=float, nargs="+", default=[0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--tasks", type=int, default=120, help="generated tasks for the choice")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = SegGPT.from_pretrained(args.model, device="cpu", dtype="float32")  # as eval_demo.py
    shipped = model.foreground_margin
    rows = []
    for margin in args.margins:
        started = time.time()
        model.foreground_margin = margin
        choice = {shots: evaluate_generated(model, tasks=args.tasks, prompts=shots, seed=CHOICE_SEED) for shots in (1, 3)}
        row = {"margin": margin, "choice_generated_1shot_miou": choice[1]["miou"],
               "choice_generated_3shot_miou": choice[3]["miou"],
               "report_stardist_2d": stardist_2d(model, 16), "report_stardist_3d": stardist_3d(model, 16),
               "seconds": round(time.time() - started, 1)}
        print(row, flush=True)
        rows.append(row)
    best = max(rows, key=lambda r: r["choice_generated_1shot_miou"])["margin"]
    report({"benchmark": "eval_foreground_margin", "model": args.model, "shipped_margin": shipped,
            "chosen_on_generated": best, "choice_seed": CHOICE_SEED, "tasks": args.tasks, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
