"""`build_parser` and `main`: the commands of this package in help order, then the adapters' commands.

Adapters add subcommands through the entry-point group `seggpt_plugins.cli` (a function that takes the
subparsers object), so the core never imports them by name. Every command sets its handler with
`set_defaults(handler=...)`; `main` runs it and turns the core's errors into one-line messages.
"""

from __future__ import annotations

import argparse
import sys

from . import adapt, convert, demo, evaluate, fit_quality, propagate, segment, training

COMMANDS = (demo, segment, propagate, convert, training, adapt, fit_quality, evaluate)  # the order of `seggpt --help`


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seggpt", description="In-context segmentation with SegGPT.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    for entry_point in _plugin_entry_points():
        try:
            entry_point.load()(sub)
        except Exception as exc:  # a broken adapter must not take the core CLI down
            print(f"seggpt: the {entry_point.name!r} commands are unavailable ({exc})", file=sys.stderr)
    return parser


def _plugin_entry_points():
    from importlib.metadata import entry_points

    return sorted(entry_points(group="seggpt_plugins.cli"), key=lambda e: e.name)


def main(argv: list[str] | None = None) -> int:
    _one_line_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from .. import __version__

        print(f"seggpt-plugins {__version__}")
        return 0
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    from ..errors import SegGPTError

    try:
        return handler(args)
    except SegGPTError as exc:
        print(f"seggpt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the disk filled up, a folder vanished, ...: what failed, in one line
        print(f"seggpt {args.command}: error: {exc.strerror or exc}"
              + (f": {exc.filename}" if getattr(exc, "filename", None) else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"seggpt {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line_warnings() -> None:
    """Warnings as one line each (`seggpt: warning: ...`), without the source line Python adds."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"seggpt: warning: {message}", file=sys.stderr if file is None else file)

    warnings.showwarning = show
