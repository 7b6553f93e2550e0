"""Objects of a propagated stack (issue 30): the one object rule with and without split_touching, in each
host's propagation.

    python benchmarks/eval_propagation_objects.py [--model demo] [--out benchmarks/results/eval_propagation_objects.json]

Stardist's 3D nuclei stack (ships in seggpt_plugins/demo/samples, 31 slices of 61x57), its middle slice
annotated with its instance labels (each nucleus its own id), the demo model on this machine's CPU. Two
propagations, as the hosts run them:

- `instance ids` (`seggpt propagate --output instances`, FiftyOne's Detections): the annotation's own ids
  propagated (memory 8, the stack's intensity range), each nucleus followed by `SegGPT.propagate`;
- `foreground` (napari with Output "instances"): the annotation shown as one class (`_actions._examples`),
  memory 4 (the form's default), the stack's min-max as the intensity range (a new layer's contrast limits);
- and, as a cross-check that the answer follows the annotation's reading rather than the other settings,
  each reading with the other host's memory and intensity range.

Each predicted slice's objects are `Prediction.objects(ObjectRule(split_touching=...))`, tracked from the
annotated slice's nuclei (`tracking.StackTracker`), and scored against the true nuclei of that slice: object
count / true count, instance F1 at IoU 0.5 (eval_instance_examples.instance_f1), and the share of matched
annotated nuclei that carry their own id. Slices below the middle are the design half (where the choice is
made), those above it are reported.
"""

from __future__ import annotations

import numpy as np
from _report import model_and_args, report
from eval_instance_examples import SAMPLES, instance_f1

HOSTS = {"instance ids, CLI settings (the CLI, FiftyOne)": dict(foreground=False, memory=8, napari_range=False),
         "instance ids as colours, CLI settings (example_ids='classes', as before)":
             dict(foreground=False, memory=8, napari_range=False, example_ids="classes"),
         "foreground, napari settings (napari)": dict(foreground=True, memory=4, napari_range=True),
         "instance ids, napari settings (cross-check)": dict(foreground=False, memory=4, napari_range=True),
         "foreground, CLI settings (cross-check)": dict(foreground=True, memory=8, napari_range=False)}


def propagated(model, stack, annotation, foreground: bool, memory: int, napari_range: bool,
               example_ids: str = "auto") -> dict:
    shown = (annotation > 0).astype(np.uint8) if foreground else annotation
    middle = len(stack) // 2
    intensity = (float(stack.min()), float(stack.max())) if napari_range else None
    return {p.index: p for p in model.propagate(stack, annotations={middle: shown}, memory=memory,
                                                intensity_range=intensity, example_ids=example_ids)}


def tracked(predictions: dict, annotation, depth: int, split_touching: bool) -> dict:
    from seggpt_plugins.instances import ObjectRule
    from seggpt_plugins.tracking import StackTracker, annotated_objects

    rule = ObjectRule(split_touching=split_touching)
    tracker = StackTracker(depth, annotated_objects({depth // 2: annotation}))
    return {z: tracker.follow(z, predictions[z].objects(rule)) for z in tracker.order if z in predictions}


def score(found, truth, annotated_ids) -> dict:
    """Count ratio, instance F1 @0.5 and, of the matched nuclei that the annotation holds, how many carry
    their own id."""
    from skimage.segmentation import relabel_sequential

    pred, _, back = relabel_sequential(found.astype(np.int64))
    true, _, true_back = relabel_sequential(truth.astype(np.int64))
    n_pred, n_true = int(pred.max()), int(true.max())
    both = np.bincount(pred.ravel() * (n_true + 1) + true.ravel(),
                       minlength=(n_pred + 1) * (n_true + 1)).reshape(n_pred + 1, n_true + 1)
    inter = both[1:, 1:]
    iou = inter / np.maximum(both.sum(1)[1:, None] + both.sum(0)[None, 1:] - inter, 1)
    matched = [(int(back[p + 1]), int(true_back[t + 1])) for p, t in zip(*np.nonzero(iou > 0.5))]
    known = [(p, t) for p, t in matched if t in annotated_ids]
    return {"count_ratio": n_pred / max(n_true, 1), "f1": instance_f1(pred, true),
            "known": len(known), "own_id": sum(p == t for p, t in known)}


def summary(rows: list[dict]) -> dict:
    ratios = np.array([r["count_ratio"] for r in rows])
    known = sum(r["known"] for r in rows)
    return {"slices": len(rows), "count_ratio_median": round(float(np.median(ratios)), 3),
            "count_ratio_mean": round(float(ratios.mean()), 3),
            "count_ratio_within_0.8_1.25": round(float(np.mean((ratios >= 0.8) & (ratios <= 1.25))), 3),
            "f1_mean": round(float(np.mean([r["f1"] for r in rows])), 3),
            "matched_annotated_nuclei": known,
            "own_id_share": round(sum(r["own_id"] for r in rows) / max(known, 1), 3)}


def main() -> None:
    from tifffile import imread

    model, args = model_and_args(__doc__)
    stack, truth = imread(SAMPLES / "nuclei3d.tif"), imread(SAMPLES / "nuclei3d_mask.tif")
    depth, middle = len(stack), len(stack) // 2
    annotation = truth[middle]
    annotated_ids = {int(i) for i in np.unique(annotation) if i}
    result = {"model": args.model, "device": args.device, "slices": depth, "annotated": middle,
              "nuclei_annotated": len(annotated_ids),
              "true_nuclei_per_slice": [int(len(np.unique(t)) - 1) for t in truth], "hosts": {}}
    halves = {"design (slices below the middle)": range(0, middle),
              "reported (slices above the middle)": range(middle + 1, depth)}
    for host, options in HOSTS.items():
        predictions = propagated(model, stack, annotation, **options)
        out = result["hosts"][host] = {"memory": options["memory"]}
        for split in (False, True):
            found = tracked(predictions, annotation, depth, split)
            rows = {z: score(found[z].map, truth[z], annotated_ids) for z in found}
            out[f"split_touching={split}"] = {name: summary([rows[z] for z in zs]) for name, zs in halves.items()}
    report(result, args.out)


if __name__ == "__main__":
    main()
