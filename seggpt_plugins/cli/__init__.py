"""The `seggpt` command line, one module per command. Imports stay lazy: `seggpt --help` loads neither
torch nor transformers.

  main.py         build_parser (core commands, then the adapters' from the `seggpt_plugins.cli`
                  entry-point group) and main (runs a command's handler, errors as one line)
  options.py      the options several commands share: model, ensemble and tiles, inference, outputs,
                  quality; reading them back (numbers, files, --tile, --intensity-range, export options)
  segment.py      seggpt segment (in process, or the scale pipeline with --engine)
  propagate.py    seggpt propagate (a TIFF stack, or frames: a video, GIF, folder)
  demo.py, convert.py, training.py (train, finetune, tune-prompt), adapt.py, evaluate.py, fit_quality.py
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
