"""The `seggpt` command line. Imports stay lazy: `seggpt --help` loads neither torch nor transformers.

Adapters add subcommands through the entry-point group `seggpt_plugins.cli` (a function that takes
the subparsers object), so the core never imports them by name.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .vocabulary import AUTO_MODEL, DEMO_MODEL, HUB_MODEL, MODEL_ENV, SEG_TYPES

DEMO_SAMPLES = Path(__file__).parent / "demo" / "samples"
LABELS_SUFFIX = "_labels"  # output names never equal an input's name


def _common(parser: argparse.ArgumentParser, model_default: str = AUTO_MODEL) -> None:
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


def _ensemble(parser: argparse.ArgumentParser, tiles: bool = True) -> None:
    group = parser.add_argument_group("examples and large images")
    group.add_argument("--ensemble", choices=["feature", "spatial", "both"], default="feature",
                       help="several examples: feature (Painter's feature ensemble, one prompt each), spatial "
                            "(stitched into one prompt canvas, the paper's spatial ensemble), both (canvases of 4, "
                            "combined by the feature ensemble) (default: %(default)s)")
    if tiles:
        group.add_argument("--tile", nargs="+", default=None, metavar="PIXELS",
                           help="cut large targets into tiles: H W, one size for both, or 'auto' (six object "
                                "diameters of the examples); larger examples are cut to their most labelled "
                                "tile, so both are seen at one scale")
        group.add_argument("--halo", type=int, default=32, help="overlap of neighbouring tiles, pixels (default: 32)")


def _tile(args):
    """--tile as segment() takes it, checked before any work."""
    from .ensembles import tile_size
    from .errors import InputError

    if args.tile is None:
        return None
    if args.tile == ["auto"]:
        return "auto"
    try:
        numbers = [int(v) for v in args.tile]
    except ValueError:
        raise InputError(f"--tile takes H W, one size, or 'auto'; got {' '.join(args.tile)}") from None
    if len(numbers) not in (1, 2):
        raise InputError(f"--tile takes H W, one size, or 'auto'; got {' '.join(args.tile)}")
    return tile_size(tuple(numbers * 2 if len(numbers) == 1 else numbers), args.halo)


def _inference(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seg-type", choices=list(SEG_TYPES), default="instance",
                        help="SegGPT's type token (default: %(default)s, as Painter)")
    parser.add_argument("--intensity-range", nargs=2, type=float, metavar=("LOW", "HIGH"),
                        help="map this intensity range to 0..255 (default: robust percentiles for non-8-bit images)")
    parser.add_argument("--overwrite", action="store_true", help="replace output files that exist")


def _export(parser: argparse.ArgumentParser, stack: bool = False) -> None:
    group = parser.add_argument_group("outputs")
    group.add_argument("--output", choices=["labels", "instances", "panoptic"], default="labels",
                       help="labels: class ids; instances: one id per object" + (" (kept through the stack)" if stack
                            else "") + "; panoptic: objects of 'thing' classes, regions of 'stuff' classes "
                       "(default: %(default)s)")
    group.add_argument("--format", nargs="+", dest="formats", default=None, metavar="FORMAT",
                       help="png, tiff, coco (COCO instances JSON with RLE masks), panoptic (COCO panoptic PNG + "
                            "JSON); several at once (default: " + ("tiff" if stack else "png") + ")")
    group.add_argument("--label-names", default=None, metavar="FILE",
                       help="class names for the export: JSON/YAML {id: name} or text lines `ID NAME [thing|stuff]`")
    group.add_argument("--min-area", type=int, default=16,
                       help="objects: parts smaller than this (pixels) join a neighbour or are dropped (default: 16)")
    group.add_argument("--split-touching", action="store_true",
                       help="objects: separate touching objects (watershed on the distance transform)")
    group.add_argument("--review", action="store_true",
                       help="also write review.jsonl: one row per image (classes, objects, confidence, model), "
                            "worst first")


def _quality(parser: argparse.ArgumentParser, choices: list[str]) -> None:
    parser.add_argument("--quality", choices=choices, default="fast",
                        help="estimate each proposal's IoU (the confidence of --review, worst first): fast (nearly "
                             "free)" + (", full (also segments each target mirrored: twice the time)" if "full" in
                                        choices else "") + " or off (default: %(default)s)")


def _scale(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("at scale (seggpt_plugins.scale; docs/scale.md)")
    group.add_argument("--engine", choices=["local", "ray"], default=None,
                       help="run the resumable pipeline: local (in this process; the default when a TARGET is a "
                            "manifest .csv/.jsonl/.parquet or a URL such as s3://) or ray (Ray Data: a local Ray, or "
                            "the cluster of --ray-address / $RAY_ADDRESS). Each input's files are written as it is "
                            "done, a rerun finishes an interrupted run, review.parquet has one row per input, and "
                            "failed inputs make the exit status 1. Without it: one in-process run whose outputs "
                            "appear all together at the end")
    group.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="ray: an existing Ray cluster (implies --engine ray; default: $RAY_ADDRESS, else a local "
                            "Ray started for the run)")
    group.add_argument("--actors", type=int, default=1, help="ray: model copies (actors) (default: %(default)s)")
    group.add_argument("--gpus-per-actor", type=float, default=0, help="ray: GPUs per actor (default: %(default)s)")
    group.add_argument("--cpus-per-actor", type=float, default=1, help="ray: CPUs per actor (default: %(default)s)")
    group.add_argument("--most-similar", type=int, default=None, metavar="K",
                       help="show each target only the K examples (of --prompt) most alike it")


def _quality_option(args):
    """--quality as segment()/propagate() take it."""
    return None if args.quality == "off" else args.quality


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seggpt", description="In-context segmentation with SegGPT.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="run the whole pipeline offline on sample images that ship with the package")
    p.add_argument("--out", default="seggpt-demo", help="output folder (default: %(default)s)")
    _common(p, model_default=DEMO_MODEL)
    _inference(p)

    p = sub.add_parser("segment", help="segment target images from example image/mask pairs")
    p.add_argument("targets", nargs="+", metavar="TARGET",
                   help="target image files, folders (searched recursively; the output tree mirrors them) or "
                        "globs such as 'data/**/*.png'")
    p.add_argument("--prompt", nargs=2, action="append", default=[], metavar=("IMAGE", "MASK"),
                   help="an example image and its mask (label map, or RGB colour mask); repeat for more")
    p.add_argument("--tuned-prompt", action="append", default=[], metavar="FILE",
                   help="a prompt learned by `seggpt tune-prompt` (in place of an example pair)")
    p.add_argument("--out", required=True, help=f"output folder: one label PNG per target (<name>{LABELS_SUFFIX}.png)")
    p.add_argument("--overlay", action="store_true", help="also write a colour overlay PNG per target")
    p.add_argument("--scores", action="store_true", help="also write the confidence map as a float TIFF")
    p.add_argument("--skip-existing", action="store_true",
                   help="leave out targets whose outputs exist (resume an interrupted run)")
    _common(p)
    _inference(p)
    _ensemble(p)
    _export(p)
    _quality(p, ["fast", "full", "off"])
    _scale(p)

    p = sub.add_parser("propagate", help="propagate annotated slices/frames through a 3D or time stack, or a video")
    p.add_argument("stack", metavar="STACK_OR_VIDEO",
                   help="a TIFF stack (Z, Y, X) or (Z, Y, X, C); or frames: a video (mp4, mov, avi, mkv, webm; "
                        "needs the [video] extra), an animated GIF, a folder of frame images, or a TIFF stack "
                        "with --prompt-frame")
    p.add_argument("--prompt-slice", nargs=2, action="append", default=[], metavar=("Z", "MASK"),
                   help="an annotated slice index and its label mask file; repeat for more")
    p.add_argument("--prompt-frame", nargs=2, action="append", default=[], metavar=("N", "MASK"),
                   help="frames: an annotated frame (N counts from 0) and its label mask file; repeat for more")
    p.add_argument("--prompt", nargs=2, action="append", default=[], metavar=("IMAGE", "MASK"),
                   help="an example pair from outside the stack; repeat for more")
    p.add_argument("--out", required=True, help="stack: output label TIFF (Z, Y, X); frames: output folder, one "
                   "label file per frame named by its frame index (000042_labels.tif)")
    p.add_argument("--memory", type=int, default=8, help="recent predictions used as extra prompts (default: 8)")
    p.add_argument("--max-prompts", type=int, default=None, help="use at most this many fixed prompts per slice")
    group = p.add_argument_group("frames (videos)")
    group.add_argument("--start", type=int, default=None, help="first frame to use (default: 0)")
    group.add_argument("--stop", type=int, default=None, help="use frames before this one (default: the end)")
    group.add_argument("--every", type=int, default=None, help="use every K-th frame from --start (default: 1)")
    group.add_argument("--overlay", action="store_true",
                       help="also write overlay.mp4 for review: the frames with their labels, at their own times")
    _common(p)
    _inference(p)
    _ensemble(p, tiles=False)
    _export(p, stack=True)
    _quality(p, ["fast", "off"])

    p = sub.add_parser("convert", help="write an original Painter checkpoint as a transformers directory")
    p.add_argument("checkpoint", help="e.g. seggpt_vit_large.pth")
    p.add_argument("out_dir")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("train", help="in-context training from scratch on generated tasks or a folder")
    p.add_argument("--config", default="demo", help="demo, tiny, vit-large or a config JSON (default: %(default)s)")
    _train_args(p)

    p = sub.add_parser("finetune", help="fine-tune a checkpoint on a folder of images and label masks, or on generated tasks")
    p.add_argument("--model", required=True, help="the model to start from (any --model source)")
    p.add_argument("--trainable", default="all", help="all, decoder, or last:N (decoder + last N blocks)")
    _train_args(p)

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

    p = sub.add_parser("fit-quality", help="fit the quality estimate (predicted IoU) for a model's weights on "
                                           "generated tasks")
    p.add_argument("--out", required=True,
                   help="the estimate file to write (put it beside the weights as quality.json, or point "
                        "$SEGGPT_QUALITY_MODEL at it)")
    p.add_argument("--tasks", type=int, default=600, help="generated tasks to fit on (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true")
    _common(p, model_default=DEMO_MODEL)

    p = sub.add_parser("evaluate", help="mIoU of a model on held-out generated tasks")
    p.add_argument("--prompts", type=int, nargs="+", default=[1, 3])
    p.add_argument("--tasks", type=int, default=96)
    _common(p, model_default=DEMO_MODEL)

    for entry_point in _plugin_entry_points():
        try:
            entry_point.load()(sub)
        except Exception as exc:  # a broken adapter must not take the core CLI down
            print(f"seggpt: the {entry_point.name!r} commands are unavailable ({exc})", file=sys.stderr)
    return parser


def _plugin_entry_points():
    from importlib.metadata import entry_points

    return sorted(entry_points(group="seggpt_plugins.cli"), key=lambda e: e.name)


def _train_args(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--variant", default="v1", help="generated-task variant: v1, or v2 (adds stack-like tracking "
                   "and low-resolution imaging) (default: %(default)s)")
    p.add_argument("--no-resume", action="store_true", help="start over even if the run folder has a checkpoint")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation at the end")
    p.add_argument("--device", default=None)
    p.add_argument("--half", action="store_true", help="export the final weights as float16")


# ------------------------------------------------------------------------------------------ commands


def _load(args):
    from .engine import SegGPT

    started = time.time()
    model = SegGPT.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                   quantize=getattr(args, "quantize", None), threads=getattr(args, "threads", None))
    print(f"loaded {model} in {time.time() - started:.1f} s", file=sys.stderr)
    return model


def _intensity(args):
    return tuple(args.intensity_range) if args.intensity_range else None


def _check_numbers(args, **limits) -> None:
    """Whole-number options against their lower bounds, before any work (InputError names the flag)."""
    from .errors import InputError

    for name, low in limits.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise InputError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def _require_files(paths) -> None:
    """Every input file exists (checked before the model loads; reading them tells what else is wrong)."""
    from .errors import InputError

    for path in paths:
        if not Path(path).is_file():
            raise InputError(f"{path}: no such file" if not Path(path).exists() else f"{path}: is not a file")


def _expand_targets(targets: list[str]) -> list[tuple[Path, str]]:
    """(file, output stem) per target: files as they are; folders searched recursively and globs expanded,
    their files' stems relative to the folder (or the glob's fixed part), so the output tree mirrors them."""
    from .scale.sources import local_targets

    return local_targets(targets)


def _export_options(args, default_format: str):
    from .export import ExportOptions, load_label_names

    options = ExportOptions(output=args.output, formats=tuple(args.formats or [default_format]),
                            min_area=args.min_area, split_touching=args.split_touching, review=args.review,
                            names=load_label_names(args.label_names) if args.label_names else None)
    options.check(args.seg_type)
    return options


def _prompt_ids(masks) -> list[int]:
    """The label ids of the prompt masks (colour masks: 1..K in sorted colour order, as the model labels them)."""
    import numpy as np

    from .colors import ColorCode

    return [int(i) for i in ColorCode.from_masks(masks).ids] if masks else []


def _at_scale(args) -> bool:
    """Whether `segment` runs the resumable pipeline (seggpt_plugins.scale): --engine, --ray-address or
    --most-similar given, or a target only it reads (a manifest or a URL)."""
    from .scale.sources import is_manifest, is_url

    return (args.engine is not None or args.ray_address is not None or args.most_similar is not None
            or any(is_url(t) or is_manifest(t) for t in args.targets))


def _segment_at_scale(args) -> int:
    from .errors import InputError
    from .scale import run

    used = [flag for flag, on in (("--overlay", args.overlay), ("--scores", args.scores),
                                  ("--skip-existing", args.skip_existing), ("--review", args.review)) if on]
    if used:
        raise InputError(f"{', '.join(used)}: not with --engine (a scaled run resumes by itself and always writes "
                         "review.parquet)")
    if args.engine == "local" and args.ray_address:
        raise InputError("--ray-address names a Ray cluster: use it with --engine ray")
    _check_numbers(args, batch_size=1, actors=1, most_similar=1)
    engine = args.engine or ("ray" if args.ray_address else "local")
    summary = run(args.targets, args.prompt, args.out, tuned_prompts=args.tuned_prompt, engine=engine,
                  ray_address=args.ray_address, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                  cpus_per_actor=args.cpus_per_actor, model=args.model, device=args.device, dtype=args.dtype,
                  quantize=getattr(args, "quantize", None), threads=getattr(args, "threads", None),
                  batch_size=args.batch_size, most_similar=args.most_similar, seg_type=args.seg_type,
                  intensity_range=_intensity(args), ensemble=args.ensemble, tile=_tile(args), halo=args.halo,
                  quality=_quality_option(args), options=_export_options(args, "png"), overwrite=args.overwrite)
    print(f"{summary.done} of {summary.inputs} input(s) labelled into {summary.out} ({summary.labelled_now} by this "
          f"run, {summary.seconds:.1f} s, engine {summary.engine}); review: {summary.review}")
    if summary.failed:
        print(f"seggpt segment: {summary.failed} input(s) failed; their reasons are in {summary.review}",
              file=sys.stderr)
        return 1
    return 0


def cmd_segment(args) -> int:
    if _at_scale(args):
        return _segment_at_scale(args)
    import numpy as np
    from tqdm import tqdm

    from .errors import InputError
    from .export import Exporter, categories_for
    from .images import display_colors, overlay, to_mask, to_rgb8
    from .io import OutputSet

    if not args.prompt and not args.tuned_prompt:
        raise InputError("give at least one --prompt IMAGE MASK or --tuned-prompt FILE")
    _check_numbers(args, batch_size=1)
    tile = _tile(args)
    options = _export_options(args, "png")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file; --out names the output folder")
    prompt_files = [*(p for pair in args.prompt for p in pair), *args.tuned_prompt]
    _require_files(prompt_files)
    targets = _expand_targets(args.targets)
    _require_files([f for f, _ in targets])
    exporter = Exporter(out, [stem for _, stem in targets], options)
    if args.skip_existing:
        if options.review or {"coco", "panoptic"} & set(options.formats):
            raise InputError("--skip-existing resumes per-image files; a run-wide file (--format coco/panoptic, "
                             "--review) covers every target: run those without --skip-existing")
        keep = [i for i in range(len(targets)) if not all(exporter.map_path(i, f).exists()
                                                            for f in options.formats)]
        print(f"skipping {len(targets) - len(keep)} target(s) whose outputs exist", file=sys.stderr)
        targets = [targets[i] for i in keep]
        exporter = Exporter(out, [stem for _, stem in targets], options)
        if not targets:
            return 0
    stems = exporter.stems
    overlays = [out / f"{stem}_overlay.png" for stem in stems] if args.overlay else []
    scores = [out / f"{stem}_scores.tif" for stem in stems] if args.scores else []
    files = [f for f, _ in targets]
    outputs = OutputSet(exporter.paths() + overlays + scores, inputs=[*files, *prompt_files], overwrite=args.overwrite)
    prompt_masks = [to_mask(mask, name=f"--prompt {image} {mask}") for image, mask in args.prompt]
    if options.objects:
        categories_for(_prompt_ids(prompt_masks), options.names)  # names checked before the model loads
    model = _load(args)
    prompts = model.prepare_prompts([image for image, _ in args.prompt] + list(args.tuned_prompt), prompt_masks,
                                    _intensity(args), ensemble=args.ensemble, tile=tile)
    categories = categories_for(prompts.code.ids, options.names) if options.objects else {}
    predictions = model.iter_segment(files, prompts, batch_size=args.batch_size, seg_type=args.seg_type,
                                     intensity_range=_intensity(args), tile=tile, halo=args.halo,
                                     quality=_quality_option(args))
    with outputs:
        exporter.open(outputs, categories)
        for prediction in tqdm(predictions, total=len(files), desc="segmenting", unit="image"):
            i = prediction.index
            exporter.write(i, prediction, str(files[i]), model=model.source, prompts=len(prompts))
            if args.overlay:
                image = to_rgb8(files[i], _intensity(args))
                outputs.write_png(overlays[i], overlay(image, prediction.labels, display_colors(prediction.colors)))
            if args.scores:
                outputs.write_tiff(scores[i], prediction.scores.astype(np.float32))
        exporter.close()
    print(f"wrote the {options.output} of {len(files)} image(s) to {out} ({', '.join(options.formats)})")
    return 0


def cmd_propagate(args) -> int:
    if _frames_mode(args):
        return _propagate_frames(args)
    import numpy as np
    from tqdm import tqdm

    from .errors import InputError
    from .export import CocoWriter, ReviewTable, categories_for
    from .images import label_dtype, read_image, to_mask
    from .io import OutputSet

    _check_numbers(args, batch_size=1, memory=0, max_prompts=1)
    options = _export_options(args, "tiff")
    if not set(options.formats) <= {"tiff", "coco"} or options.output == "panoptic":
        raise InputError("propagate writes a TIFF stack (--format tiff) and, with --output instances, COCO "
                         "(--format coco); --output panoptic and PNG are for `seggpt segment`")
    inputs = [args.stack, *(m for _, m in args.prompt_slice), *(p for pair in args.prompt for p in pair)]
    _require_files(inputs)
    out = Path(args.out)
    extra = {"coco": out.with_name(f"{out.stem}_coco.json"), "review": out.with_name(f"{out.stem}_review.jsonl")}
    outputs = OutputSet([out] + [extra["coco"]] * ("coco" in options.formats) + [extra["review"]] * options.review,
                        inputs=inputs, overwrite=args.overwrite)
    if not args.prompt_slice and not args.prompt:
        raise InputError("give at least one --prompt-slice Z MASK or --prompt IMAGE MASK")
    stack = read_image(args.stack)
    if stack.ndim not in (3, 4) or (stack.ndim == 4 and stack.shape[-1] not in (3, 4)):
        raise InputError(f"{args.stack}: expected a stack (Z, Y, X) or (Z, Y, X, C), got shape {stack.shape}")
    depth, height, width = stack.shape[:3]
    annotations = {}
    for z, mask in args.prompt_slice:
        try:
            z = int(z)
        except ValueError:
            raise InputError(f"--prompt-slice: slice index must be an integer, got {z!r}") from None
        if not 0 <= z < depth:
            raise InputError(f"--prompt-slice {z}: {args.stack} has {depth} slices (0..{depth - 1})")
        annotation = to_mask(mask, name=f"--prompt-slice {z} {mask}")
        if annotation.ndim != 2 or annotation.shape != (height, width):
            raise InputError(f"--prompt-slice {z} {mask}: a label mask of {width}x{height} (width x height) is "
                             f"needed, like the slices of {args.stack}; got shape {annotation.shape}")
        annotations[z] = annotation
    prompt_masks = [to_mask(m, name=f"--prompt {i} {m}") for i, m in args.prompt]
    categories = categories_for(_prompt_ids([*annotations.values(), *prompt_masks]), options.names) \
        if options.objects else {}
    model = _load(args)
    ids = [np.unique(m) for m in [*annotations.values(), *prompt_masks]]
    labels = np.zeros(stack.shape[:3], dtype=label_dtype(int(max(i.max() for i in ids))))
    for z, mask in annotations.items():
        labels[z] = mask
    predictions = model.propagate(stack, [i for i, _ in args.prompt], prompt_masks,
                                  annotations=annotations, memory=args.memory, max_prompts=args.max_prompts,
                                  batch_size=args.batch_size, seg_type=args.seg_type, intensity_range=_intensity(args),
                                  ensemble=args.ensemble, quality=_quality_option(args))
    todo = depth - len(annotations)
    found = {}
    for prediction in tqdm(predictions, total=todo, desc="propagating", unit="slice"):
        labels[prediction.index] = prediction.labels
        if options.objects or options.review:
            found[prediction.index] = prediction
    with outputs:
        picture = labels
        if options.objects:
            picture, objects = _tracked_instances(found, annotations, depth, options)
        if "tiff" in options.formats:
            outputs.write_tiff(out, picture)
        if "coco" in options.formats:
            coco = CocoWriter(outputs.stage(extra["coco"]), categories)
            for z in range(depth):
                coco.add(f"{Path(args.stack).name}#z{z}", objects[z])
            coco.close()
        if options.review:
            review = ReviewTable(outputs.stage(extra["review"]))
            for z, prediction in sorted(found.items()):
                review.add_prediction(f"{args.stack}#z{z}", prediction, objects[z] if options.objects else None,
                                      slice=z, model=model.source)
            review.close()
    print(f"wrote {out} ({depth} slices, {todo} predicted; {options.output})")
    return 0


def _frames_mode(args) -> bool:
    """Whether `propagate` reads frames (a video, GIF or folder, or a TIFF with --prompt-frame): one label
    file per frame in a folder; else one TIFF stack in, one out. InputError for options of the other mode."""
    from .errors import InputError
    from .video import is_video

    frames = bool(args.prompt_frame) or is_video(args.stack)
    if frames and args.prompt_slice:
        raise InputError(f"--prompt-slice is for TIFF stacks; annotate frames of {args.stack} with "
                         "--prompt-frame N MASK")
    used = [f"--{name}" for name in ("start", "stop", "every") if getattr(args, name) is not None]
    if not frames and (used or args.overlay):
        raise InputError(f"{', '.join(used + ['--overlay'] * args.overlay)}: for frames (a video, GIF or folder, or "
                         "a TIFF with --prompt-frame); a stack with --prompt-slice is propagated whole")
    return frames


def _frame_annotations(args, frames) -> dict:
    """{frame index: label mask} of --prompt-frame, each checked against the chosen frames and their size."""
    from .errors import InputError
    from .images import to_mask

    annotations = {}
    for n, mask in args.prompt_frame:
        name = f"--prompt-frame {n} {mask}"
        try:
            n = int(n)
        except ValueError:
            raise InputError(f"--prompt-frame: the frame index must be an integer (from 0), got {n!r}") from None
        if n in annotations:
            raise InputError(f"{name}: frame {n} is annotated twice")
        frames.position(n, name=name)
        annotation = to_mask(mask, name=name)
        if annotation.ndim != 2 or annotation.shape != frames.size:
            raise InputError(f"{name}: a label mask of {frames.size[1]}x{frames.size[0]} (width x height) is needed, "
                             f"like the frames of {args.stack}; got shape {annotation.shape}")
        annotations[n] = annotation
    return annotations


def _propagate_frames(args) -> int:
    """`propagate` over frames: one label file per frame (named by its index) written as it comes, so
    memory stays flat however long the video; an overlay video made from them at the end."""
    from tqdm import tqdm

    from .errors import InputError
    from .export import Exporter, categories_for
    from .images import to_mask
    from .io import OutputSet
    from .propagation import stack_intensity_range
    from .video import open_frames, propagate_video

    _check_numbers(args, batch_size=1, memory=0, max_prompts=1, start=0, stop=1, every=1)
    options = _export_options(args, "tiff")
    if not args.prompt_frame and not args.prompt:
        raise InputError("give at least one --prompt-frame N MASK or --prompt IMAGE MASK")
    files = [*(m for _, m in args.prompt_frame), *(p for pair in args.prompt for p in pair)]
    _require_files(files)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file; for frames, --out names the output folder")
    with open_frames(args.stack, start=args.start or 0, stop=args.stop, every=args.every or 1) as frames:
        annotations = _frame_annotations(args, frames)
        width = max(6, len(str(frames.count - 1)))
        exporter = Exporter(out, [f"{i:0{width}d}" for i in frames.indices], options)
        overlay_path = out / "overlay.mp4"
        outputs = OutputSet(exporter.paths() + [overlay_path] * args.overlay, inputs=[args.stack, *files],
                            overwrite=args.overwrite)
        prompt_masks = [to_mask(m, name=f"--prompt {i} {m}") for i, m in args.prompt]
        categories = categories_for(_prompt_ids([*annotations.values(), *prompt_masks]), options.names) \
            if options.objects else {}
        model = _load(args)
        intensity = _intensity(args) or stack_intensity_range(frames)
        results = propagate_video(model, frames, annotations, [i for i, _ in args.prompt], prompt_masks,
                                  objects=options.objects, min_area=options.min_area,
                                  split_touching=options.split_touching, memory=args.memory,
                                  max_prompts=args.max_prompts, batch_size=args.batch_size, seg_type=args.seg_type,
                                  intensity_range=intensity, ensemble=args.ensemble,
                                  quality=_quality_option(args))
        with outputs:
            exporter.open(outputs, categories)
            with _FrameMaps(out if args.overlay else None) as maps:
                for result in tqdm(results, total=len(frames), desc="propagating", unit="frame"):
                    exporter.write(frames.indices.index(result.index), result.prediction,
                                   f"{Path(args.stack).name}#frame{result.index}", result.instances,
                                   frame=result.index, time=round(result.time, 4), annotated=result.annotated,
                                   model=model.source)
                    maps.put(result.index, result.prediction.labels if options.output == "labels"
                             else result.instances.map)
                exporter.close()
                if args.overlay:
                    from .video import write_overlay_video

                    write_overlay_video(outputs.stage(overlay_path), frames, maps.get, intensity)
    print(f"wrote {len(frames)} frames' {options.output} to {out} ({len(frames) - len(annotations)} predicted, "
          f"{len(annotations)} annotated; {', '.join(options.formats)})" + ("; overlay.mp4" if args.overlay else ""))
    return 0


class _FrameMaps:
    """Each frame's label map kept on disk until the overlay video is made (in order, at the end), in a
    hidden staging folder inside `out` that is removed on exit (and by a later run, if this one is killed).
    With `out` None, nothing is kept."""

    def __init__(self, out):
        self.out, self.folder = out, None

    def __enter__(self) -> "_FrameMaps":
        import os
        import tempfile

        from .io import STAGING_PREFIX

        if self.out is not None:
            Path(self.out).mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-maps-", dir=self.out))
        return self

    def put(self, index: int, labels) -> None:
        import io
        import zlib

        import numpy as np

        if self.folder is not None:  # label maps compress well: a 4K frame's is tens of kB
            buffer = io.BytesIO()
            np.save(buffer, labels)
            (self.folder / f"{index}.npy.z").write_bytes(zlib.compress(buffer.getvalue(), 1))

    def get(self, index: int):
        import io
        import zlib

        import numpy as np

        return np.load(io.BytesIO(zlib.decompress((self.folder / f"{index}.npy.z").read_bytes())))

    def __exit__(self, *exc) -> None:
        import shutil

        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def _tracked_instances(predictions: dict, annotations: dict, depth: int, options):
    """Objects of every slice with ids kept through the stack (instances.track_stack, from the annotated
    slices' own objects). Returns (id stack, {slice: Instances})."""
    import numpy as np

    from .instances import annotated_objects, find_instances, track_stack

    annotated = annotated_objects(annotations)
    found = {z: p.with_object_quality(find_instances(p.labels, p.scores, min_area=options.min_area,
                                                     split_touching=options.split_touching))
             for z, p in predictions.items()}
    tracked = {**track_stack(found, annotated, depth), **annotated}
    top = max((int(o.map.max()) for o in tracked.values()), default=0)
    stack = np.zeros((depth, *next(iter(tracked.values())).map.shape), np.uint16 if top < 65536 else np.uint32)
    for z, objects in tracked.items():
        stack[z] = objects.map
    return stack, tracked


def cmd_demo(args) -> int:
    import numpy as np

    from .images import display_colors, overlay, read_image, scale_to_uint8
    from .io import OutputSet
    from .training import iou_per_label

    _check_numbers(args, batch_size=1)
    image = read_image(DEMO_SAMPLES / "nuclei2d.tif")
    truth = read_image(DEMO_SAMPLES / "nuclei2d_mask.tif")
    tile = 128
    tiles = [(r, c) for r in range(0, image.shape[0], tile) for c in range(0, image.shape[1], tile)]
    prompt_tile, target_tiles = tiles[0], tiles[5:9]
    out = Path(args.out)
    overlay_path = out / "demo_overlay.png"
    label_paths = [out / f"tile_{r}_{c}_labels.png" for r, c in target_tiles]
    outputs = OutputSet([overlay_path, *label_paths], overwrite=args.overwrite)
    crop = lambda a, rc: a[rc[0]:rc[0] + tile, rc[1]:rc[1] + tile]  # noqa: E731
    intensity = tuple(args.intensity_range) if args.intensity_range else (float(image.min()), float(np.percentile(image, 99.8)))
    model = _load(args)
    started = time.time()
    prompt_mask = (crop(truth, prompt_tile) > 0).astype(np.uint8)  # nuclei vs background
    predictions = model.segment([crop(image, rc) for rc in target_tiles], crop(image, prompt_tile), prompt_mask,
                                batch_size=args.batch_size, seg_type=args.seg_type, intensity_range=intensity)
    seconds = time.time() - started
    colors = display_colors(predictions[0].colors)
    panels = [overlay(scale_to_uint8(crop(image, prompt_tile), intensity)[..., None].repeat(3, -1), prompt_mask, colors)]
    ious = []
    for rc, prediction in zip(target_tiles, predictions):
        panels.append(overlay(scale_to_uint8(crop(image, rc), intensity)[..., None].repeat(3, -1), prediction.labels,
                              colors))
        ious.append(iou_per_label(prediction.labels, (crop(truth, rc) > 0).astype(np.uint8), [1]).get(1, 0.0))
    gap = np.full((2 * tile, 6, 3), 255, np.uint8)
    panels = [p.repeat(2, axis=0).repeat(2, axis=1) for p in panels]  # 2x, nearest: small tiles read better
    strip = np.concatenate(sum(([p, gap] for p in panels), [])[:-1], axis=1)
    with outputs:
        outputs.write_png(overlay_path, strip)
        for path, prediction in zip(label_paths, predictions):
            outputs.write_png(path, prediction.labels)
    print(f"prompt: tile {prompt_tile} of the stardist nuclei image with its mask; targets: tiles {target_tiles}")
    print(f"segmented {len(predictions)} tiles in {seconds:.2f} s on {model.device}; "
          f"IoU against ground truth: {', '.join(f'{v:.3f}' for v in ious)} (mean {np.mean(ious):.3f})")
    print(f"wrote {overlay_path} (left: the prompt with its mask; then each target with SegGPT's prediction)")
    return 0


def cmd_convert(args) -> int:
    from .loading import convert

    out = convert(args.checkpoint, args.out_dir, overwrite=args.overwrite)
    print(f"wrote transformers model to {out}")
    return 0


def _settings(args, **extra):
    from .training import TrainSettings

    return TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                         foreground_weight=args.foreground_weight, seed=args.seed, save_every=args.save_every,
                         eval_every=args.eval_every, time_limit=args.time_limit * 60 if args.time_limit else None,
                         stop_after=args.stop_after, variant=args.variant, **extra)


def _report(out_dir, net, summary, half) -> int:
    import json

    from .training import export

    if half and (Path(out_dir) / "model" / "config.json").is_file():
        export(net, Path(out_dir) / "model", half=True)
    print(json.dumps(summary, indent=1))
    if not summary["finished"]:
        print(f"stopped at step {summary['steps']}; run the same command again to resume", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    from .training import train

    net, summary = train(args.out, config=args.config, data=args.data, settings=_settings(args), device=args.device,
                         resume=not args.no_resume, evaluate_at_end=not args.no_eval)
    return _report(args.out, net, summary, args.half)


def cmd_finetune(args) -> int:
    from .loading import load_network
    from .training import train

    net, summary = train(args.out, net=load_network(args.model), data=args.data,
                         settings=_settings(args, trainable=args.trainable), device=args.device,
                         resume=not args.no_resume, evaluate_at_end=not args.no_eval)
    return _report(args.out, net, summary, args.half)


def cmd_tune_prompt(args) -> int:
    import json

    from .engine import SegGPT
    from .errors import InputError
    from .training import PairedSamples, evaluate_samples, tune_prompt

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


def cmd_evaluate(args) -> int:
    import json

    from .training import evaluate_generated

    model = _load(args)
    print(json.dumps({f"{p}-shot": evaluate_generated(model, tasks=args.tasks, prompts=p) for p in args.prompts},
                     indent=1))
    return 0


def cmd_fit_quality(args) -> int:
    import json

    from .errors import InputError
    from .io import check_outputs
    from .quality import FIT_SEED, fit_models, generated_samples, save_models

    out = Path(args.out)
    if args.tasks < 20:
        raise InputError(f"--tasks must be at least 20 to fit an estimate, got {args.tasks}")
    check_outputs([out], overwrite=args.overwrite)
    model = _load(args)
    objects: list = []  # (object features, true IoU) of every predicted object: the per-object estimate
    rows, ious = generated_samples(model, args.tasks, FIT_SEED, objects=objects)
    save_models(out, fit_models(rows, ious, objects), fitted_on=f"{model.source}: {len(rows)} generated tasks from seed "
                                                        f"{FIT_SEED}; per-object: {len(objects)} objects of those tasks")
    print(json.dumps({"tasks": len(rows), "mean_iou": round(float(sum(ious) / len(ious)), 4)}))
    print(f"wrote {out}")
    return 0


COMMANDS = {"demo": cmd_demo, "segment": cmd_segment, "propagate": cmd_propagate, "convert": cmd_convert,
            "train": cmd_train, "finetune": cmd_finetune, "tune-prompt": cmd_tune_prompt, "evaluate": cmd_evaluate,
            "fit-quality": cmd_fit_quality}


def _one_line_warnings() -> None:
    """Warnings as one line each (`seggpt: warning: ...`), without the source line Python adds."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"seggpt: warning: {message}", file=sys.stderr if file is None else file)

    warnings.showwarning = show


def main(argv=None) -> int:
    _one_line_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(f"seggpt-plugins {__version__}")
        return 0
    handler = COMMANDS.get(args.command) or getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    from .errors import SegGPTError

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


if __name__ == "__main__":
    sys.exit(main())
