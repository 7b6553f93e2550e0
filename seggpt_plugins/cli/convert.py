"""`seggpt convert`: an original Painter checkpoint written as a transformers directory."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("convert", help="write an original Painter checkpoint as a transformers directory")
    p.add_argument("checkpoint", help="e.g. seggpt_vit_large.pth")
    p.add_argument("out_dir")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from ..loading import convert

    out = convert(args.checkpoint, args.out_dir, overwrite=args.overwrite)
    print(f"wrote transformers model to {out}")
    return 0
