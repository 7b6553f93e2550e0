"""`seggpt propagate`: annotated slices through a TIFF stack (one stack out), or annotated frames through a
video, GIF, folder of frames or TIFF (frames mode: one label file per frame, written as it comes)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import (add_ensemble, add_example_ids, add_export, add_inference, add_model, add_quality,
                      check_model_options, check_numbers, example_ids_option, export_options, intensity_option,
                      load_model, prompt_ids, quality_option, require_files)


def register(sub) -> None:
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
    add_model(p)
    add_inference(p)
    add_ensemble(p, tiles=False)
    add_export(p, stack=True)
    add_example_ids(p)
    add_quality(p, ["fast", "off"])
    p.set_defaults(handler=cmd_propagate)


def cmd_propagate(args: argparse.Namespace) -> int:
    if _frames_mode(args):
        return _propagate_frames(args)
    import numpy as np
    from tqdm import tqdm

    from ..errors import InputError
    from ..export import CocoWriter, ReviewTable, map_dtype
    from ..images import read_image, to_mask
    from ..io import OutputSet
    from ..preflight import check_prompts, check_writable

    check_numbers(args, batch_size=1, memory=0, max_prompts=1)
    options = export_options(args, "tiff")
    if not set(options.formats) <= {"tiff", "coco"} or options.output == "panoptic":
        raise InputError("propagate writes a TIFF stack (--format tiff) and, with --output instances, COCO "
                         "(--format coco); --output panoptic and PNG are for `seggpt segment`")
    inputs = [args.stack, *(m for _, m in args.prompt_slice), *(p for pair in args.prompt for p in pair)]
    require_files(inputs)
    out = Path(args.out)
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise InputError(f"--out {out}: propagate writes a stack as one TIFF; name it .tif or .tiff")
    check_writable(out.parent)
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
        if z in annotations:
            raise InputError(f"--prompt-slice {z}: given twice (one mask per slice)")
        annotation = to_mask(mask, name=f"--prompt-slice {z} {mask}")
        if annotation.ndim != 2 or annotation.shape != (height, width):
            raise InputError(f"--prompt-slice {z} {mask}: a label mask of {width}x{height} (width x height) is "
                             f"needed, like the slices of {args.stack}; got shape {annotation.shape}")
        annotations[z] = annotation
    prompt_masks = [to_mask(m, name=f"--prompt {i} {m}") for i, m in args.prompt]
    check_prompts([i for i, _ in args.prompt], prompt_masks, list(annotations.values()),
                  mask_names=[m for _, m in args.prompt])
    check_model_options(args)  # after the inputs: a bad input is named even with a bad --model
    ids = prompt_ids([*annotations.values(), *prompt_masks])
    one_class = _objects_shown(args, annotations)
    categories = _categories(ids, options, prompt_masks, annotations, one_class) if options.objects else {}
    model = load_model(args)
    labels = np.zeros(stack.shape[:3], dtype=map_dtype("labels", max(ids, default=0)))
    for z, mask in annotations.items():
        labels[z] = mask
    predictions = model.propagate(stack, [i for i, _ in args.prompt], prompt_masks,
                                  annotations=annotations, memory=args.memory, max_prompts=args.max_prompts,
                                  batch_size=args.batch_size, seg_type=args.seg_type,
                                  intensity_range=intensity_option(args), ensemble=args.ensemble,
                                  quality=quality_option(args), example_ids=example_ids_option(args))
    todo = depth - len(annotations)
    found, remembered = {}, 0
    for prediction in tqdm(predictions, total=todo, desc="propagating", unit="slice"):
        labels[prediction.index] = prediction.labels
        remembered += bool(prediction.joined_memory)
        if options.objects or options.review:
            found[prediction.index] = prediction
    with outputs:
        picture = labels
        if options.objects:
            picture, objects = _tracked_instances(found, annotations, depth, options)
            if one_class:  # every object of the one class the annotation's ids number (example_ids.py)
                objects = {z: o.with_classes(dict.fromkeys(ids, 1)) for z, o in objects.items()}
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
    print(f"wrote {out} ({depth} slices, {todo} predicted; {options.output})"
          + _memory_note(args.memory, remembered, todo, "slices"))
    return 0


def _tracked_instances(predictions: dict, annotations: dict, depth: int, options):
    """Objects of every slice by the run's rule (`Prediction.objects(options.rule)`, each with its predicted
    IoU), with ids kept through the stack (tracking.track_stack, from the annotated slices' own objects).
    Returns (id stack, {slice: Instances})."""
    import numpy as np

    from ..export import map_dtype
    from ..tracking import annotated_objects, track_stack

    annotated = annotated_objects(annotations)
    found = {z: p.objects(options.rule) for z, p in predictions.items()}
    tracked = {**track_stack(found, annotated, depth), **annotated}
    top = max((int(o.map.max()) for o in tracked.values()), default=0)
    dtype = map_dtype("instances")  # uint16, wider only for ids past it (a TIFF; the whole stack alike)
    if top > np.iinfo(dtype).max:
        dtype = map_dtype("labels", top)
    stack = np.zeros((depth, *next(iter(tracked.values())).map.shape), dtype)
    for z, objects in tracked.items():
        stack[z] = objects.map
    return stack, tracked


def _colours(prompt_masks: list, annotations: dict) -> dict | None:
    """{label id: colour} when the examples are colour masks (their categories are named by colour), else None."""
    from ..colors import ColorCode

    if annotations or not prompt_masks or prompt_masks[0].ndim != 3:
        return None
    return ColorCode.from_masks(prompt_masks).as_dict()


# ------------------------------------------------------------------------------------------ frames mode


def _frames_mode(args: argparse.Namespace) -> bool:
    """Whether `propagate` reads frames (a video, GIF or folder, or a TIFF with --prompt-frame): one label
    file per frame in a folder; else one TIFF stack in, one out. InputError for options of the other mode."""
    from ..errors import InputError
    from ..video import is_video

    frames = bool(args.prompt_frame) or is_video(args.stack)
    if frames and args.prompt_slice:
        raise InputError(f"--prompt-slice is for TIFF stacks; annotate frames of {args.stack} with "
                         "--prompt-frame N MASK")
    used = [f"--{name}" for name in ("start", "stop", "every") if getattr(args, name) is not None]
    if not frames and (used or args.overlay):
        raise InputError(f"{', '.join(used + ['--overlay'] * args.overlay)}: for frames (a video, GIF or folder, or "
                         "a TIFF with --prompt-frame); a stack with --prompt-slice is propagated whole")
    return frames


def _propagate_frames(args: argparse.Namespace) -> int:
    """`propagate` over frames: one label file per frame (named by its index) written as it comes, so
    memory stays flat however long the video; an overlay video made from them at the end."""
    from tqdm import tqdm

    from ..errors import InputError
    from ..export import Exporter
    from ..images import to_mask
    from ..io import OutputSet
    from ..preflight import check_prompts, check_writable
    from ..propagation import stack_intensity_range
    from ..video import open_frames, propagate_video

    check_numbers(args, batch_size=1, memory=0, max_prompts=1, start=0, stop=1, every=1)
    options = export_options(args, "tiff")
    if not args.prompt_frame and not args.prompt:
        raise InputError("give at least one --prompt-frame N MASK or --prompt IMAGE MASK")
    files = [*(m for _, m in args.prompt_frame), *(p for pair in args.prompt for p in pair)]
    require_files(files)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file; for frames, --out names the output folder")
    check_writable(out)
    with open_frames(args.stack, start=args.start or 0, stop=args.stop, every=args.every or 1) as frames:
        annotations = _frame_annotations(args, frames)
        width = max(6, len(str(frames.count - 1)))
        exporter = Exporter(out, [f"{i:0{width}d}" for i in frames.indices], options)
        overlay_path = out / "overlay.mp4"
        outputs = OutputSet(exporter.paths() + [overlay_path] * args.overlay, inputs=[args.stack, *files],
                            overwrite=args.overwrite)
        prompt_masks = [to_mask(m, name=f"--prompt {i} {m}") for i, m in args.prompt]
        check_prompts([i for i, _ in args.prompt], prompt_masks, list(annotations.values()),
                      mask_names=[m for _, m in args.prompt])
        check_model_options(args)
        ids = prompt_ids([*annotations.values(), *prompt_masks])
        one_class = _objects_shown(args, annotations)
        categories = _categories(ids, options, prompt_masks, annotations, one_class) if options.objects else {}
        model = load_model(args)
        intensity = intensity_option(args) or stack_intensity_range(frames)
        results = propagate_video(model, frames, annotations, [i for i, _ in args.prompt], prompt_masks,
                                  objects=options.rule if options.objects else None, memory=args.memory,
                                  max_prompts=args.max_prompts, batch_size=args.batch_size, seg_type=args.seg_type,
                                  intensity_range=intensity, ensemble=args.ensemble,
                                  quality=quality_option(args), example_ids=example_ids_option(args))
        with outputs:
            exporter.open(outputs, categories, max(ids, default=0))  # annotated and predicted frames alike
            remembered = 0
            with _FrameMaps(out if args.overlay else None) as maps:
                for result in tqdm(results, total=len(frames), desc="propagating", unit="frame"):
                    remembered += bool(result.prediction.joined_memory)
                    instances = result.instances
                    if one_class and instances is not None:
                        instances = instances.with_classes(dict.fromkeys(ids, 1))
                    exporter.write(frames.indices.index(result.index), result.prediction,
                                   f"{Path(args.stack).name}#frame{result.index}", instances,
                                   frame=result.index, time=round(result.time, 4), annotated=result.annotated,
                                   model=model.source)
                    maps.put(result.index, result.prediction.labels if options.output == "labels"
                             else result.instances.map)
                exporter.close()
                if args.overlay:
                    from ..video import write_overlay_video

                    write_overlay_video(outputs.stage(overlay_path), frames, maps.get, intensity)
    print(f"wrote {len(frames)} frames' {options.output} to {out} ({len(frames) - len(annotations)} predicted, "
          f"{len(annotations)} annotated; {', '.join(options.formats)})" + ("; overlay.mp4" if args.overlay else "")
          + _memory_note(args.memory, remembered, len(frames) - len(annotations), "frames"))
    return 0


def _objects_shown(args: argparse.Namespace, annotations: dict) -> bool:
    """Whether the annotated slices' ids number objects of one class (--example-ids; example_ids.py): then
    propagate shows them as their foreground and the objects are of one category, `object`."""
    from ..example_ids import ids_are_objects

    if not annotations or args.prompt:
        return False
    return ids_are_objects(list(annotations.values()), example_ids_option(args))


def _categories(ids, options, prompt_masks: list, annotations: dict, one_class: bool) -> dict:
    """The COCO categories: one, `object` (or --label-names' id 1), when the ids number objects; else one
    per id (names that miss the ids of annotated slices that look instance-labelled suggest --example-ids
    instances: only annotated slices can be read as objects)."""
    from ..example_ids import instance_labelled
    from ..export import categories_for

    if one_class:
        return categories_for([1], options.names, objects=True)
    instance_like = bool(options.names) and not prompt_masks and instance_labelled(list(annotations.values()))
    return categories_for(ids, options.names, _colours(prompt_masks, annotations), instance_like=instance_like)


def _memory_note(memory: int, remembered: int, predicted: int, unit: str) -> str:
    """What the memory took in (propagation.py: a predicted frame painted far from the examples stays out)."""
    from ..propagation import MEMORY_SHARE_FACTOR

    if not memory or not predicted:
        return ""
    note = f"\n{remembered} of {predicted} predicted {unit} joined the memory"
    if remembered < predicted:
        note += (f"; the other {predicted - remembered} painted over {MEMORY_SHARE_FACTOR:g}x or under "
                 f"1/{MEMORY_SHARE_FACTOR:g} of the examples' share and were kept out of it (no drift)")
    return note


def _frame_annotations(args: argparse.Namespace, frames) -> dict:
    """{frame index: label mask} of --prompt-frame, each checked against the chosen frames and their size."""
    from ..errors import InputError
    from ..images import to_mask

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


class _FrameMaps:
    """Each frame's label map kept on disk until the overlay video is made (in order, at the end), in a
    hidden staging folder inside `out` that is removed on exit (and by a later run, if this one is killed).
    With `out` None, nothing is kept."""

    def __init__(self, out):
        self.out, self.folder = out, None

    def __enter__(self) -> "_FrameMaps":
        import os
        import tempfile

        from ..io import STAGING_PREFIX

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
