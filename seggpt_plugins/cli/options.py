"""The options several commands share: their argument groups, and reading them back (checked before any work).

Imports stay lazy: adding the arguments loads argparse and the vocabulary only.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from ..vocabulary import AUTO_MODEL, HUB_MODEL, MODEL_ENV, OUTPUT_FORMATS, SEG_TYPES


# ------------------------------------------------------------------------------------------ arguments


def add_model(parser: argparse.ArgumentParser, model_default: str = AUTO_MODEL) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=model_default,
                       help=f"hub id, transformers directory, Painter .pth checkpoint, 'demo', or 'auto' (default: "
                            f"%(default)s; auto = ${MODEL_ENV}, else {HUB_MODEL} when cached, else demo)")
    group.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    group.add_argument("--dtype", default=None,
                       help="float32, bfloat16 or float16 (default: $SEGGPT_DTYPE, else bf16 on CUDA and on CPUs "
                            "that compute bf16 in hardware (AVX512_BF16, AMX), else fp32)")
    group.add_argument("--quantize", choices=["int8"], default=None,
                       help="CPU: int8 linear layers (on CPUs with AMX oneDNN's kernels, the rest at --dtype; "
                            "elsewhere torch's dynamic quantization, the rest float32; slightly less exact; "
                            "default: $SEGGPT_QUANTIZE, else none)")
    group.add_argument("--threads", type=int, default=None,
                       help="CPU threads (default: $SEGGPT_THREADS, else the CPUs this process may use)")
    group.add_argument("--batch-size", type=int, default=8, help="targets per forward pass (default: %(default)s)")


def add_ensemble(parser: argparse.ArgumentParser, tiles: bool = True) -> None:
    group = parser.add_argument_group("examples and large images")
    group.add_argument("--ensemble", choices=["feature", "spatial", "both"], default="feature",
                       help="several examples: feature (Painter's feature ensemble, one prompt each), spatial "
                            "(stitched into one prompt canvas, the paper's spatial ensemble), both (canvases of 4, "
                            "combined by the feature ensemble) (default: %(default)s)")
    if tiles:
        group.add_argument("--tile", nargs="+", default=None, metavar="PIXELS", type=tile_value,
                           help="cut large targets into tiles: H W, one size for both, or 'auto' (six object "
                                "diameters of the examples); larger examples are cut to their most labelled "
                                "tile, so both are seen at one scale. 0 (the default): no tiling, targets are "
                                "resized to the model's canvas")
        group.add_argument("--halo", type=int, default=32, help="overlap of neighbouring tiles, pixels (default: 32)")


class IntensityRange(argparse.Action):
    """--intensity-range LOW HIGH: two finite numbers, LOW below HIGH (checked as the arguments are read)."""

    def __call__(self, parser, namespace, values, option_string=None):
        low, high = values
        if not (math.isfinite(low) and math.isfinite(high)):
            parser.error(f"argument {option_string}: LOW and HIGH must be finite numbers, got {low:g} {high:g}")
        if low >= high:
            parser.error(f"argument {option_string}: LOW must be below HIGH, got {low:g} {high:g}")
        setattr(namespace, self.dest, [low, high])


def tile_value(value: str) -> str:
    """One value of --tile: pixels or 'auto' (what else is wrong with them, tile_option says)."""
    if value != "auto" and not value.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a tile size (pixels, or 'auto')")
    return value


def add_inference(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seg-type", choices=list(SEG_TYPES), default="instance",
                        help="SegGPT's type token (default: %(default)s, as Painter)")
    parser.add_argument("--intensity-range", nargs=2, type=float, metavar=("LOW", "HIGH"), action=IntensityRange,
                        help="map this intensity range to 0..255 (default: robust percentiles for non-8-bit images)")
    parser.add_argument("--overwrite", action="store_true", help="replace output files that exist")


def add_export(parser: argparse.ArgumentParser, stack: bool = False) -> None:
    group = parser.add_argument_group("outputs")
    group.add_argument("--output", choices=["labels", "instances", "panoptic"], default="labels",
                       help="labels: class ids; instances: one id per object" + (" (kept through the stack)" if stack
                            else "") + "; panoptic: objects of 'thing' classes, regions of 'stuff' classes "
                       "(default: %(default)s)")
    group.add_argument("--format", nargs="+", dest="formats", default=None, metavar="FORMAT",
                       choices=OUTPUT_FORMATS,
                       help="png, tiff, coco (COCO instances JSON with RLE masks), panoptic (COCO panoptic PNG + "
                            "JSON); several at once (default: " + ("tiff" if stack else "png") + ")")
    group.add_argument("--label-names", default=None, metavar="FILE",
                       help="class names for the export: JSON/YAML {id: name} or text lines `ID NAME [thing|stuff]` "
                            "(default: named after the examples: 'label <id>', a colour mask's '#rrggbb', or "
                            "'object' for examples whose ids number objects)")
    group.add_argument("--min-area", type=int, default=16,
                       help="objects: parts smaller than this (pixels) join a neighbour or are dropped (default: 16)")
    group.add_argument("--split-touching", action="store_true",
                       help="objects: separate touching objects (watershed on the distance transform)")
    group.add_argument("--review", action="store_true",
                       help="also write review.jsonl: one row per image (classes, objects, confidence, model), "
                            "worst first")


def add_quality(parser: argparse.ArgumentParser, choices: list[str]) -> None:
    parser.add_argument("--quality", choices=choices, default="fast",
                        help="estimate each proposal's IoU (the confidence of --review, worst first): fast (nearly "
                             "free)" + (", full (also segments each target mirrored: twice the time; ranks the "
                                        "targets of one run better)" if "full" in choices else "")
                             + " or off (default: %(default)s)")


# ------------------------------------------------------------------------------------------ reading them


def check_numbers(args: argparse.Namespace, **limits: int) -> None:
    """Whole-number options against their lower bounds, before any work (InputError names the flag)."""
    from ..errors import InputError

    for name, low in limits.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise InputError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Options that must be above 0 (a learning rate), before any work (InputError names the flag; None: unset)."""
    from ..errors import InputError

    for name in names:
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {value:g}")


def check_model_options(args: argparse.Namespace) -> None:
    """--threads, --model and --device, checked before anything is read or loaded (the model's source is
    found, not loaded; a GPU asked for is looked for)."""
    from ..errors import InputError

    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be a whole number >= 1, got {threads}")
    if getattr(args, "model", None) is not None:
        from ..loading import check_source, resolve_source

        args.model = resolve_source(args.model)  # "auto" decided (and its warning given) once
        check_source(args.model)
    device = getattr(args, "device", None)
    if device not in (None, "auto", "cpu"):
        from ..loading import pick_device

        pick_device(device)


def require_files(paths) -> None:
    """Every input file exists (checked before the model loads; reading them tells what else is wrong)."""
    from ..errors import InputError

    for path in paths:
        if not Path(path).is_file():
            raise InputError(f"{path}: no such file" if not Path(path).exists() else f"{path}: is not a file")


def read_tuned_prompts(paths) -> list:
    """The --tuned-prompt files read (TunedPrompt), before the model loads: each must be a .safetensors file that
    `seggpt tune-prompt` wrote."""
    from ..errors import InputError
    from ..prompts import TUNED_PROMPT_SUFFIX, TunedPrompt

    for path in paths:
        if not str(path).endswith(TUNED_PROMPT_SUFFIX):  # (as prompts.is_tuned tells them apart)
            raise InputError(f"{path}: not a tuned prompt (a {TUNED_PROMPT_SUFFIX} file written by `seggpt "
                             "tune-prompt`)")
    return [TunedPrompt.load(path) for path in paths]


def tile_option(args: argparse.Namespace):
    """--tile as segment() takes it, checked before any work; 0 is no tiling, as in every host's settings."""
    from ..ensembles import tile_size
    from ..errors import InputError

    if args.tile is None:
        return None
    if args.tile == ["auto"]:
        return "auto"
    try:
        numbers = [int(v) for v in args.tile]
    except ValueError:
        raise InputError(f"--tile takes H W, one size, 'auto' or 0 (no tiling); got {' '.join(args.tile)}") from None
    if len(numbers) not in (1, 2):
        raise InputError(f"--tile takes H W, one size, 'auto' or 0 (no tiling); got {' '.join(args.tile)}")
    if not any(numbers):
        return None
    if 0 in numbers:
        raise InputError(f"--tile {' '.join(args.tile)}: 0 is not a size; --tile 0 alone turns tiling off")
    return tile_size(tuple(numbers * 2 if len(numbers) == 1 else numbers), args.halo)


def quality_option(args: argparse.Namespace) -> str | None:
    """--quality as segment()/propagate() take it."""
    return None if args.quality == "off" else args.quality


def intensity_option(args: argparse.Namespace) -> tuple[float, float] | None:
    return tuple(args.intensity_range) if args.intensity_range else None


def export_options(args: argparse.Namespace, default_format: str):
    """The export.ExportOptions of the output arguments, checked against --seg-type."""
    from ..export import ExportOptions, load_label_names

    options = ExportOptions(output=args.output, formats=tuple(args.formats or [default_format]),
                            min_area=args.min_area, split_touching=args.split_touching, review=args.review,
                            names=load_label_names(args.label_names) if args.label_names else None)
    options.check(args.seg_type)
    return options


def add_example_ids(parser: argparse.ArgumentParser) -> None:
    from ..example_ids import EXAMPLE_IDS

    parser.add_argument("--example-ids", choices=EXAMPLE_IDS, default="auto",
                        help="what the example masks' ids mean: classes, or instances (objects of one class, as in "
                             "a StarDist, Cellpose or napari label image: the example is shown as its foreground and "
                             "objects are split by --split-touching's step). auto (default): instances when there are "
                             "several ids, each one piece and most apart; classes with --label-names")


def example_ids_option(args: argparse.Namespace) -> str:
    """--example-ids, where "auto" with --label-names means classes (named ids are classes)."""
    return "classes" if args.example_ids == "auto" and getattr(args, "label_names", None) else args.example_ids


def prompt_ids(masks) -> list[int]:
    """The label ids of the prompt masks (colour masks: 1..K in sorted colour order, as the model labels them)."""
    from ..colors import ColorCode

    return [int(i) for i in ColorCode.from_masks(masks).ids] if masks else []


def load_model(args: argparse.Namespace):
    """The model of the model arguments, its load time reported on stderr."""
    from ..engine import SegGPT

    started = time.time()
    model = SegGPT.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                   quantize=getattr(args, "quantize", None), threads=getattr(args, "threads", None))
    print(f"loaded {model} in {time.time() - started:.1f} s", file=sys.stderr)
    return model
