"""`seggpt fit-quality`: the quality estimate (predicted IoU) fitted for a model's weights on generated tasks."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..vocabulary import DEMO_MODEL
from .options import add_model, load_model


def register(sub) -> None:
    p = sub.add_parser("fit-quality", help="fit the quality estimate (predicted IoU) for a model's weights on "
                                           "generated tasks")
    p.add_argument("--out", required=True,
                   help="the estimate file to write (put it beside the weights as quality.json, or point "
                        "$SEGGPT_QUALITY_MODEL at it)")
    p.add_argument("--tasks", type=int, default=600, help="generated tasks to fit on (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true")
    add_model(p, model_default=DEMO_MODEL)
    p.set_defaults(handler=cmd_fit_quality)


def cmd_fit_quality(args: argparse.Namespace) -> int:
    import json

    from ..errors import InputError
    from ..io import check_outputs
    from ..quality_fit import FIT_SEED, fit_models, generated_samples, save_models

    out = Path(args.out)
    if args.tasks < 20:
        raise InputError(f"--tasks must be at least 20 to fit an estimate, got {args.tasks}")
    check_outputs([out], overwrite=args.overwrite)
    model = load_model(args)
    objects: list = []  # (object features, true IoU) of every predicted object: the per-object estimate
    rows, ious = generated_samples(model, args.tasks, FIT_SEED, objects=objects)
    save_models(out, fit_models(rows, ious, objects), fitted_on=f"{model.source}: {len(rows)} generated tasks from seed "
                                                        f"{FIT_SEED}; per-object: {len(objects)} objects of those tasks")
    print(json.dumps({"tasks": len(rows), "mean_iou": round(float(sum(ious) / len(ious)), 4)}))
    print(f"wrote {out}")
    return 0
