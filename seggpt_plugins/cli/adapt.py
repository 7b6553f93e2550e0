"""`seggpt adapt`: fine-tune a model on a few labelled examples and save it as a model directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("adapt", help="adapt a model to a few labelled examples (minutes) and save it as a model "
                                     "directory for --model")
    p.add_argument("--model", default="auto", help="the model to start from (any --model source; default: auto)")
    p.add_argument("--prompt", nargs=2, action="append", default=[], metavar=("IMAGE", "MASK"),
                   help="an example image and its label mask (repeat for several)")
    p.add_argument("--out", required=True, help="the model directory to write")
    p.add_argument("--time-limit", type=float, default=180.0, help="seconds, evaluations included (default: 180)")
    p.add_argument("--steps", type=int, default=300, help="the step cap (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="tasks per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: adapt's, 3e-5)")
    p.add_argument("--trainable", default="auto",
                   help="auto (all weights under 60 M parameters, else decoder + last 4 blocks), all, decoder, last:N")
    p.add_argument("--foreground-weight", default=None,
                   help="the loss's weight on the examples' foreground pixels: 'balanced' (adapt's default: their "
                        "background share over their foreground share, 1..10) or a number (10 as the demo was trained)")
    p.add_argument("--eval-every", type=int, default=10, help="steps between held-out evaluations (default: 10)")
    p.add_argument("--patience", type=int, default=6,
                   help="stop after this many evaluations without improvement (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--example-ids", choices=["auto", "classes", "instances"], default="auto",
                   help="what the masks' ids mean (as in seggpt segment; default: auto)")
    p.add_argument("--intensity-range", nargs=2, type=float, metavar=("LOW", "HIGH"),
                   help="map this intensity range to 0..255 (default: one robust range from the examples)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="the precision of the model used for the result (training is float32)")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists and is not empty")
    p.set_defaults(handler=cmd_adapt)


def cmd_adapt(args: argparse.Namespace) -> int:
    import json

    from ..adapt import AdaptSettings, check_foreground_weight, read_examples
    from ..errors import InputError
    from .options import check_model_options, check_numbers, check_positive, require_files

    if not args.prompt:
        raise InputError("give at least one --prompt IMAGE MASK")
    check_numbers(args, steps=1, batch_size=1, eval_every=1, patience=1)
    if args.time_limit is not None and args.time_limit <= 0:
        raise InputError(f"--time-limit must be positive seconds, got {args.time_limit}")
    check_positive(args, "lr")
    chosen = {}  # what the command line sets; the rest is AdaptSettings' defaults
    if args.lr is not None:
        chosen["lr"] = args.lr
    if args.foreground_weight is not None:
        try:
            chosen["foreground_weight"] = check_foreground_weight(args.foreground_weight)
        except InputError:
            raise InputError(f"--foreground-weight must be a positive number or 'balanced', "
                             f"got {args.foreground_weight!r}") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file; --out names the model directory to write")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise InputError(f"{out}: exists and is not empty; pass --overwrite to replace it")
    require_files([f for pair in args.prompt for f in pair])
    settings = AdaptSettings(steps=args.steps, time_limit=args.time_limit, batch_size=args.batch_size,
                             trainable=args.trainable, eval_every=args.eval_every, patience=args.patience,
                             seed=args.seed, **chosen)
    if settings.trainable not in ("auto", "all", "decoder") and not settings.trainable.startswith("last:"):
        raise InputError(f"--trainable must be auto, all, decoder or last:N, got {settings.trainable!r}")
    examples = read_examples([image for image, _ in args.prompt], [mask for _, mask in args.prompt],
                             tuple(args.intensity_range) if args.intensity_range else None, args.example_ids,
                             settings.holdout)
    check_model_options(args)
    from ..engine import SegGPT

    model = SegGPT.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    print(f"adapting {model} on {len(examples.images)} example(s) for at most {args.time_limit:g} s, "
          f"{args.steps} steps", file=sys.stderr)

    from tqdm import tqdm

    with tqdm(total=args.steps, desc="adapting", unit="step", file=sys.stderr) as bar:
        def show(p) -> None:
            """A step moves the bar (its loss beside it); an evaluation is a line above it."""
            bar.update(p.step - bar.n)
            if p.loss is not None:
                bar.set_postfix(loss=f"{p.loss:.4f}", refresh=False)
            if p.held_out_iou is not None:
                tqdm.write(f"step {p.step}/{p.steps}  {p.seconds:.0f} s  held-out IoU {p.held_out_iou:.4f} (best "
                           f"{p.best_iou:.4f} at step {p.best_step})", file=sys.stderr)

        adapted = model.adapt(examples, None, time_limit=args.time_limit, steps=args.steps, settings=settings,
                              progress=show)
    adapted.save_pretrained(out, overwrite=args.overwrite)
    summary = {k: v for k, v in adapted.adaptation.items() if k not in ("settings", "history")}
    print(json.dumps(summary, indent=1))
    if not adapted.adaptation["improved"]:
        print("no step beat the base weights on the held-out square: the base weights were saved", file=sys.stderr)
    print(f"wrote {out} (fingerprint {adapted.fingerprint}; base {model.fingerprint}); use it with --model {out}",
          file=sys.stderr)
    return 0
