"""`seggpt train`, `finetune` and `tune-prompt`: in-context training, fine-tuning a checkpoint, and learning a
prompt with the model frozen."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..vocabulary import SEG_TYPES
from .options import check_numbers, check_positive


def register(sub) -> None:
    p = sub.add_parser("train", help="in-context training from scratch on generated tasks or a folder")
    p.add_argument("--config", default="demo", help="demo, tiny, vit-large or a config JSON (default: %(default)s)")
    _add_train_args(p)
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("finetune", help="fine-tune a checkpoint on a folder of images and label masks, or on generated tasks")
    p.add_argument("--model", required=True, help="the model to start from (any --model source)")
    p.add_argument("--trainable", default="all", help="all, decoder, or last:N (decoder + last N blocks)")
    _add_train_args(p)
    p.set_defaults(handler=cmd_finetune)

    p = sub.add_parser("tune-prompt", help="learn a prompt for a dataset with the model frozen (in-context tuning)")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="folder with images/ and masks/ (same stems)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seg-type", choices=list(SEG_TYPES), default="semantic")
    p.add_argument("--device", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=cmd_tune_prompt)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None,
                   help="folder with images/ and masks/ (default for train: procedurally generated tasks)")
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, log.jsonl, model/, eval.json")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32, help="targets per step")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--foreground-weight", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=None, help="minutes; stop with a checkpoint when exceeded")
    p.add_argument("--stop-after", type=int, default=None, help="stop at this step (the schedule spans --steps)")
    p.add_argument("--variant", default="v1", choices=["v1", "v2"],
                   help="generated-task variant: v1, or v2 (adds stack-like tracking and low-resolution imaging) "
                        "(default: %(default)s)")
    p.add_argument("--no-resume", action="store_true", help="start over even if the run folder has a checkpoint")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation at the end")
    p.add_argument("--device", default=None)
    p.add_argument("--half", action="store_true", help="export the final weights as float16")


def cmd_train(args: argparse.Namespace) -> int:
    from ..training import train

    net, summary = train(args.out, config=args.config, data=args.data, settings=_settings(args), device=args.device,
                         resume=not args.no_resume, evaluate_at_end=not args.no_eval)
    return _report(args.out, net, summary, args.half)


def cmd_finetune(args: argparse.Namespace) -> int:
    from ..loading import load_network
    from ..training import train

    settings = _settings(args, trainable=args.trainable)  # (checked before the weights load)
    net, summary = train(args.out, net=load_network(args.model), data=args.data, settings=settings, device=args.device,
                         resume=not args.no_resume, evaluate_at_end=not args.no_eval)
    return _report(args.out, net, summary, args.half)


def _settings(args: argparse.Namespace, **extra):
    from ..errors import InputError
    from ..training import TrainSettings

    check_numbers(args, steps=1, batch_size=1)
    check_positive(args, "lr")
    if args.data and args.variant != "v1":
        raise InputError(f"--variant {args.variant} names a kind of generated task: not with --data")

    return TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                         foreground_weight=args.foreground_weight, seed=args.seed, save_every=args.save_every,
                         eval_every=args.eval_every, time_limit=args.time_limit * 60 if args.time_limit else None,
                         stop_after=args.stop_after, variant=args.variant, **extra)


def _report(out_dir, net, summary, half) -> int:
    import json

    from ..training import export

    if half and (Path(out_dir) / "model" / "config.json").is_file():
        export(net, Path(out_dir) / "model", half=True)
    print(json.dumps(summary, indent=1))
    if not summary["finished"]:
        print(f"stopped at step {summary['steps']}; run the same command again to resume", file=sys.stderr)
    return 0


def cmd_tune_prompt(args: argparse.Namespace) -> int:
    import json

    from ..engine import SegGPT
    from ..errors import InputError
    from ..datasets import PairedSamples
    from ..evaluation import evaluate_samples
    from ..prompt_tuning import tune_prompt

    check_numbers(args, steps=1, batch_size=1)
    check_positive(args, "lr")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise InputError(f"{out}: a tuned prompt is saved as a .safetensors file")
    if out.exists() and not args.overwrite:
        raise InputError(f"{out}: exists; pass --overwrite to replace it")
    model = SegGPT.from_pretrained(args.model, device=args.device, dtype="float32")
    samples = PairedSamples.from_folder(args.data, model.input_size[0])
    train_part, held_out = samples.split(0.2, args.seed)
    tuned, log = tune_prompt(model, train_part, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                             seed=args.seed, seg_type=args.seg_type)
    tuned.save(out)
    result = {"loss_first": log[0]["loss"], "loss_last": log[-1]["loss"]}
    if held_out.tasks:
        result["held_out_tuned"] = evaluate_samples(model, train_part, held_out, tuned=tuned)
        result["held_out_one_example"] = evaluate_samples(model, train_part, held_out)
    print(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0
