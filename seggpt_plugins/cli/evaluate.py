"""`seggpt evaluate`: mIoU of a model on held-out generated tasks."""

from __future__ import annotations

import argparse

from ..vocabulary import DEMO_MODEL
from .options import add_model, check_numbers, load_model


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="mIoU of a model on held-out generated tasks")
    p.add_argument("--prompts", type=int, nargs="+", default=[1, 3])
    p.add_argument("--tasks", type=int, default=96)
    add_model(p, model_default=DEMO_MODEL)
    p.set_defaults(handler=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from ..errors import InputError
    from ..evaluation import evaluate_generated

    check_numbers(args, tasks=1)
    if min(args.prompts) < 1:
        raise InputError(f"--prompts must be >= 1, got {min(args.prompts)}")
    model = load_model(args)
    print(json.dumps({f"{p}-shot": evaluate_generated(model, tasks=args.tasks, prompts=p) for p in args.prompts},
                     indent=1))
    return 0
