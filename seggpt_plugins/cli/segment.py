"""`seggpt segment`: target images from example image/mask pairs, in this process or with the scale pipeline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .options import (add_ensemble, add_example_ids, add_export, add_inference, add_model, add_quality,
                      check_model_options, check_numbers, example_ids_option, export_options, intensity_option,
                      load_model, quality_option, read_tuned_prompts, require_files, tile_option)

LABELS_SUFFIX = "_labels"  # output names never equal an input's name


def register(sub) -> None:
    p = sub.add_parser("segment", help="segment target images from example image/mask pairs")
    p.add_argument("targets", nargs="+", metavar="TARGET",
                   help="target image files, folders (searched recursively; the output tree mirrors them) or "
                        "globs such as 'data/**/*.png'")
    p.add_argument("--prompt", nargs=2, action="append", default=[], metavar=("IMAGE", "MASK"),
                   help="an example image and its mask (label map, or RGB colour mask); repeat for more")
    p.add_argument("--tuned-prompt", action="append", default=[], metavar="FILE",
                   help="a prompt learned by `seggpt tune-prompt` (in place of an example pair)")
    p.add_argument("--out", required=True, help=f"output folder: one label PNG per target (<name>{LABELS_SUFFIX}.png)")
    p.add_argument("--overlay", action="store_true",
                   help="also write a colour overlay PNG per target (classes in their colours; with --output "
                        "instances or panoptic, each object in a colour of its own)")
    p.add_argument("--scores", action="store_true", help="also write the confidence map as a float TIFF")
    p.add_argument("--skip-existing", action="store_true",
                   help="leave out targets whose outputs exist (resume an interrupted run)")
    add_model(p)
    add_inference(p)
    add_ensemble(p)
    add_export(p)
    add_example_ids(p)
    add_quality(p, ["fast", "full", "off"])
    _add_scale(p)
    p.set_defaults(handler=cmd_segment)


def _add_scale(parser: argparse.ArgumentParser) -> None:
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
    group.add_argument("--cpus-per-actor", type=float, default=None,
                       help="ray: CPUs per actor (default: 1, or on a local Ray an equal share of the machine when "
                            "the actors would not fit)")
    group.add_argument("--ray-logs", action="store_true", help="ray: show Ray's own log lines (default: errors only)")
    group.add_argument("--most-similar", type=int, default=None, metavar="K",
                       help="show each target only the K examples (of --prompt) most alike it")


def cmd_segment(args: argparse.Namespace) -> int:
    if _at_scale(args):
        return _segment_at_scale(args)
    import numpy as np
    from tqdm import tqdm

    from ..errors import InputError
    from ..example_ids import instance_labelled
    from ..export import Exporter, categories_for
    from ..images import display_colors, overlay, to_mask
    from ..instances import ObjectRule
    from ..io import OutputSet
    from ..runner import Runner, Target
    from ..preflight import check_out_of_inputs, check_prompts, check_writable, unreadable
    from ..video import id_colors

    if not args.prompt and not args.tuned_prompt:
        raise InputError("give at least one --prompt IMAGE MASK or --tuned-prompt FILE")
    check_numbers(args, batch_size=1)
    check_model_options(args)
    tile = tile_option(args)
    options = export_options(args, "png")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file; --out names the output folder")
    check_out_of_inputs(out, args.targets)
    check_writable(out)
    prompt_files = [*(p for pair in args.prompt for p in pair), *args.tuned_prompt]
    require_files(prompt_files)
    tuned = read_tuned_prompts(args.tuned_prompt)  # (read once, before the model loads)
    prompt_masks = [to_mask(mask, name=f"--prompt {image} {mask}") for image, mask in args.prompt]
    shown_ids = []  # the ids the examples are shown with (instance ids are one class: example_ids.py)
    if args.prompt:
        shown_ids = [int(i) for i in check_prompts([image for image, _ in args.prompt], prompt_masks,
                                                   example_ids=example_ids_option(args),
                                                   mask_names=[mask for _, mask in args.prompt]).ids]
    targets = _expand_targets(args.targets, exclude=prompt_files)
    require_files([f for f, _ in targets])
    exporter = Exporter(out, [stem for _, stem in targets], options)
    if args.skip_existing:
        if options.review or {"coco", "panoptic"} & set(options.formats):
            raise InputError("--skip-existing resumes per-image files; a run-wide file (--format coco/panoptic, "
                             "--review) covers every target: run those without --skip-existing")
        extras = [suffix for suffix, on in (("_overlay.png", args.overlay), ("_scores.tif", args.scores)) if on]
        keep = [i for i in range(len(targets)) if not (all(exporter.map_path(i, f).exists() for f in options.formats)
                                                        and all((out / f"{exporter.stems[i]}{suffix}").exists()
                                                                for suffix in extras))]
        print(f"skipping {len(targets) - len(keep)} target(s) whose outputs exist", file=sys.stderr)
        targets = [targets[i] for i in keep]
        exporter = Exporter(out, [stem for _, stem in targets], options)
        if not targets:
            return 0
    files = [f for f, _ in targets]
    bad = unreadable(files)  # known before the model loads: listed with the other failures at the end
    if len(bad) == len(files):
        raise InputError(f"none of the {len(files)} target(s) can be read; the first: {next(iter(bad.values()))}")
    stems = exporter.stems
    overlays = [out / f"{stem}_overlay.png" for stem in stems] if args.overlay else []
    scores = [out / f"{stem}_scores.tif" for stem in stems] if args.scores else []
    outputs = OutputSet(exporter.paths() + overlays + scores, inputs=[*files, *prompt_files], overwrite=args.overwrite)
    if options.objects:  # names checked before the model loads
        categories_for(shown_ids, options.names, instance_like=bool(options.names) and instance_labelled(prompt_masks))
    model = load_model(args)
    prompts = model.prepare_prompts([image for image, _ in args.prompt] + tuned, prompt_masks,
                                    intensity_option(args), ensemble=args.ensemble, tile=tile,
                                    example_ids=example_ids_option(args))
    if prompts.intensity_range is not None:
        low, high = prompts.intensity_range
        print(f"16-bit/float images read with one intensity range, {low:g}..{high:g} (from the examples); "
              "--intensity-range sets another", file=sys.stderr)
    colour_masks = any(m.ndim == 3 for m in prompt_masks) and not args.tuned_prompt
    categories = categories_for(prompts.code.ids, options.names, prompts.code.as_dict() if colour_masks else None,
                                prompts.ids_are_objects) if options.objects else {}
    runner = Runner(model, prompts, batch_size=args.batch_size, seg_type=args.seg_type,
                    intensity_range=intensity_option(args), tile=tile, halo=args.halo, quality=quality_option(args),
                    keep_images=args.overlay,
                    objects=ObjectRule(options.min_area, options.split_touching) if options.objects else None)
    failed: dict[int, str] = {}
    with outputs, tqdm(total=len(files), desc="segmenting", unit="image") as bar:
        exporter.open(outputs, categories, int(prompts.code.ids.max()) if len(prompts.code) else 0)
        readable = [Target(i, f, name=str(f)) for i, f in enumerate(files) if str(f) not in bad]
        failed.update({i: bad[str(f)] for i, f in enumerate(files) if str(f) in bad})
        bar.update(len(failed))
        for result in runner.run(readable, on_event=TileProgress(files, bar)):
            bar.update(1)
            i = result.key
            if not result.ok:
                failed[i] = result.error
                continue
            written = exporter.write(i, result.prediction, str(files[i]), instances=result.instances,
                                     model=model.source, prompts=len(prompts))
            if args.overlay:  # classes in their prompt colours; objects each in a colour of its own, as in video
                shown, colors = ((written, id_colors(np.unique(written))) if options.objects else
                                 (result.prediction.labels, display_colors(result.prediction.colors)))
                outputs.write_png(overlays[i], overlay(result.rgb, shown, colors))
            if args.scores:
                outputs.write_tiff(scores[i], result.prediction.scores.astype(np.float32))
        exporter.close()
    done = len(files) - len(failed)
    print(f"wrote the {options.output} of {done} image(s) to {out} ({', '.join(options.formats)})")
    if failed:
        for i in sorted(failed):
            print(f"seggpt segment: failed: {failed[i]}", file=sys.stderr)
        again = ("run the same command with --skip-existing to retry only them" if not options.review
                 and not {"coco", "panoptic"} & set(options.formats) else "fix or remove them and run again")
        print(f"seggpt segment: {len(failed)} of {len(files)} image(s) failed and have no output; {again}",
              file=sys.stderr)
        return 1
    return 0


class TileProgress:
    """A run's events as the CLI shows them: a tile bar under the image bar while a large target is
    painted tile by tile, and how targets are cut, said once per cut (the tile, the halo, whether "auto"
    chose it).

    Args:
        files: the run's target files, by key.
        bar: the image bar (tqdm), whose lock the tile bar shares.
    """

    def __init__(self, files: list, bar) -> None:
        self.files, self.bar, self.tiles, self.said = files, bar, None, set()

    def __call__(self, event) -> None:
        if event.kind != "tile":
            return
        from tqdm import tqdm

        if event.tiling not in self.said:
            self.said.add(event.tiling)
            tqdm.write(f"{self.files[event.key]}: {event.tiling}" + ("; targets cut alike are not named again"
                                                                     if len(self.files) > 1 else ""),
                       file=sys.stderr)
        if self.tiles is None:
            self.tiles = tqdm(desc="  tiles", unit="tile", leave=False, position=1, file=sys.stderr)
        if event.done == 1:
            self.tiles.reset(total=event.total)
        self.tiles.update(1)
        if event.done == event.total:
            self.tiles.refresh()


def _expand_targets(targets: list[str], exclude=()) -> list[tuple[Path, str]]:
    """(file, output stem) per target: files as they are; folders searched recursively and globs expanded,
    their files' stems relative to the folder (or the glob's fixed part), so the output tree mirrors them.
    The example files (`exclude`) are not targets, even inside a target folder."""
    from ..scale.sources import local_targets

    return local_targets(targets, exclude=exclude)


def _at_scale(args: argparse.Namespace) -> bool:
    """Whether `segment` runs the resumable pipeline (seggpt_plugins.scale): --engine, --ray-address or
    --most-similar given, or a target only it reads (a manifest or a URL)."""
    from ..scale.sources import is_manifest, is_url

    return (args.engine is not None or args.ray_address is not None or args.most_similar is not None
            or any(is_url(t) or is_manifest(t) for t in args.targets))


def _segment_at_scale(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..scale import run

    used = [flag for flag, on in (("--overlay", args.overlay), ("--scores", args.scores),
                                  ("--skip-existing", args.skip_existing), ("--review", args.review)) if on]
    if used:
        raise InputError(f"{', '.join(used)}: not with --engine (a scaled run resumes by itself and always writes "
                         "review.parquet)")
    if args.engine == "local" and args.ray_address:
        raise InputError("--ray-address names a Ray cluster: use it with --engine ray")
    check_numbers(args, batch_size=1, actors=1, most_similar=1)
    check_model_options(args)
    read_tuned_prompts(args.tuned_prompt)  # (checked here; the engine reads them where it runs)
    engine = args.engine or ("ray" if args.ray_address else "local")
    summary = run(args.targets, args.prompt, args.out, tuned_prompts=args.tuned_prompt, engine=engine,
                  ray_address=args.ray_address, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                  cpus_per_actor=args.cpus_per_actor, ray_logs=args.ray_logs, model=args.model, device=args.device,
                  dtype=args.dtype,
                  quantize=getattr(args, "quantize", None), threads=getattr(args, "threads", None),
                  batch_size=args.batch_size, most_similar=args.most_similar, seg_type=args.seg_type,
                  intensity_range=intensity_option(args), ensemble=args.ensemble, tile=tile_option(args),
                  halo=args.halo, quality=quality_option(args), options=export_options(args, "png"),
                  example_ids=example_ids_option(args),
                  overwrite=args.overwrite)
    print(f"{summary.done} of {summary.inputs} input(s) labelled into {summary.out} ({summary.labelled_now} by this "
          f"run, {summary.seconds:.1f} s, engine {summary.engine}); review: {summary.review}")
    if summary.failed:
        for path, reason in summary.failures:
            print(f"seggpt segment: failed: {path}: {reason}" if path not in reason else
                  f"seggpt segment: failed: {reason}", file=sys.stderr)
        more = summary.failed - len(summary.failures)
        print(f"seggpt segment: {summary.failed} input(s) failed" + (f" ({more} not listed here)" if more else "")
              + f"; their reasons are in {summary.review}; running the same command again retries only them",
              file=sys.stderr)
        return 1
    return 0
