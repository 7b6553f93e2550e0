"""Instance-labelled annotations in propagate: which reading keeps crossing objects apart (issue 30)?

    python benchmarks/eval_instances_crossing.py [--out benchmarks/results/eval_instances_crossing.json]

Generated "crossing" videos (seggpt_plugins/scenes.py, 4 objects, 31 frames of 96x96; objects 1 and 2 meet
at the middle frame and part), annotated on frame 0 with their ids read as instances
(`example_ids="instances"`, what "auto" gives for instance labels of 5 ids or more), against the ids read as
classes (each its own colour, as before). Three propagations with the demo model on this machine's CPU:
- colours + tracks: `example_ids="classes"` (each id painted in its own colour, followed: object_tracks.py);
- foreground + tracks: `example_ids="instances"` (shown as one class, the tracks tell the objects apart: now);
- foreground, no tracks: `example_ids="instances", follow_objects=False` (the object rule splits the
  foreground, as napari's stacks do).
Each frame's objects then go the way every host takes them: `Prediction.objects(ObjectRule())` and
`tracking.StackTracker` from the annotated objects. Per-object IoU of objects 1 and 2 after they part, and
of all objects over all frames. Seeds 0-2 are the design scenes, 3-9 reported (BENCHMARKS.md section 18).
"""

from __future__ import annotations

import numpy as np
from _report import model_and_args, report

READINGS = {"colours + tracks (classes)": dict(example_ids="classes"),
            "foreground + tracks (instances, now)": dict(example_ids="instances"),
            "foreground, no tracks (instances, split)": dict(example_ids="instances", follow_objects=False)}
SPLITS = {"design (seeds 0-2)": (0, 1, 2), "reported (seeds 3-9)": (3, 4, 5, 6, 7, 8, 9)}


def iou(a, b) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def main() -> None:
    from seggpt_plugins.instances import ObjectRule
    from seggpt_plugins.scenes import moving_objects, parted_frame
    from seggpt_plugins.tracking import StackTracker, annotated_objects

    model, args = model_and_args(__doc__)
    result = {"objects": 4, "readings": {}}
    for name, options in READINGS.items():
        out = result["readings"][name] = {}
        for split, seeds in SPLITS.items():
            after_parting, everywhere = [], []
            for seed in seeds:
                frames, truth = moving_objects("crossing", seed=seed, objects=4)
                annotation = {0: truth[0]}
                found = {p.index: p for p in model.propagate(frames, annotations=annotation, **options)}
                tracker = StackTracker(len(frames), annotated_objects(annotation))
                maps = {z: tracker.follow(z, found[z].objects(ObjectRule())).map for z in tracker.order if z in found}
                parted = parted_frame(truth)
                after_parting.append(np.mean([iou(maps[z] == i, truth[z] == i) for z in range(parted, len(frames))
                                              for i in (1, 2)]))
                everywhere.append(np.mean([iou(maps[z] == i, truth[z] == i) for z in maps for i in range(1, 5)]))
            out[split] = {"crossing_objects_iou_after_parting": round(float(np.mean(after_parting)), 3),
                          "all_objects_iou": round(float(np.mean(everywhere)), 3)}
        print(name, out, flush=True)
    report(result, args.out)


if __name__ == "__main__":
    main()
