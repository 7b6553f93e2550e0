"""What every benchmark script shares: its command line and model (`model_and_args`), and its end (`report`:
the result with the machine and the commit, printed and saved)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]


def model_and_args(doc: str, extra: Callable[[argparse.ArgumentParser], None] | None = None
                   ) -> tuple[Any, argparse.Namespace]:
    """(the model, the parsed command line) of an eval script: --model (default demo), --device (cpu), --out
    (where the JSON goes; default: printed only) and --foreground-margin (default: the model's own), described
    by `doc`'s first line; `extra(parser)` adds the script's own options. The model is
    `SegGPT.from_pretrained(--model, device=--device)`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--foreground-margin", type=float, default=None,
                        help="read the paintings with this margin, not the model's own (0: the plain nearest colour)")
    parser.add_argument("--out", default=None)
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    from seggpt_plugins.engine import SegGPT

    model = SegGPT.from_pretrained(args.model, device=args.device)
    if args.foreground_margin is not None:
        model.foreground_margin = args.foreground_margin
    return model, args


def commit() -> str:
    """The checkout's short commit; where the tree has no git history (a copy on a device machine), the
    SEGGPT_COMMIT environment variable the caller set (benchmarks/device_checks.sh)."""
    try:
        found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    except OSError:  # no git there
        found = ""
    return found.strip() or os.environ.get("SEGGPT_COMMIT", "unknown")


def report(result: dict, out: str | None) -> None:
    """Add the machine and the commit to `result`, print it as JSON, and write it to `out` if given."""
    machine = f"{platform.processor() or platform.machine()}, {platform.system()}"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name()}"
    result = {**result, "machine": machine, "commit": commit()}
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
