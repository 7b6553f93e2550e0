"""Sample fields: which kinds SegGPT reads and writes, the checks of a run's fields, and the mark that says
a field was written by this operator (only such fields are written into without `overwrite_field`).
"""

from __future__ import annotations

from pathlib import Path

from seggpt_plugins.io import unwritable

from seggpt_plugins.fiftyone.models import device_problem, model_problem
from seggpt_plugins.fiftyone.options import CONFIDENCE_DESCRIPTION, Options, ParamError, label

SEGMENTATION, DETECTIONS = "Segmentation", "Detections"
RESERVED_FIELDS = {"id", "_id", "filepath", "tags", "metadata", "created_at", "last_modified_at", "media_type",
                   "frames", "group"}
RESERVED_FRAME_FIELDS = {"id", "_id", "frame_number", "created_at", "last_modified_at", "_sample_id", "_dataset_id"}
FRAMES = "frames."  # FiftyOne's prefix of a video dataset's frame fields
OWNER = "@seggpt/seggpt/propagate_labels"  # the mark in the `info` of the fields this operator creates
OWNER_KEY = "written_by"


def is_video(dataset) -> bool:
    return dataset.media_type == "video"


def frame_field(path: str | None) -> str | None:
    """'frames.gt' -> 'gt' (the frame field's own name); None for a sample field."""
    return path[len(FRAMES):] if path and path.startswith(FRAMES) else None


def add_field(dataset, path: str, ftype, **kwargs) -> None:
    """Add a sample field, or a frame field when `path` is 'frames.<name>'."""
    name = frame_field(path)
    if name is None:
        dataset.add_sample_field(path, ftype, **kwargs)
    else:
        dataset.add_frame_field(name, ftype, **kwargs)


def delete_field(dataset, path: str) -> None:
    """Delete a sample field, or a frame field when `path` is 'frames.<name>'."""
    name = frame_field(path)
    if name is None:
        dataset.delete_sample_field(path)
    else:
        dataset.delete_frame_field(name)


def field_kind(dataset, name: str) -> str | None:
    """SEGMENTATION, DETECTIONS, or None (missing or another type) for a top-level sample field."""
    import fiftyone as fo

    field = dataset.get_field(name) if name else None
    doc_type = getattr(field, "document_type", None)
    if isinstance(field, fo.EmbeddedDocumentField) and isinstance(doc_type, type):
        if issubclass(doc_type, fo.Segmentation):
            return SEGMENTATION
        if issubclass(doc_type, fo.Detections):
            return DETECTIONS
    return None


def label_fields(dataset, learnable: bool = False) -> dict[str, str]:
    """Top-level fields SegGPT can read: {name: SEGMENTATION | DETECTIONS} (frame fields, as 'frames.<name>',
    for video datasets); learnable: without the fields this operator wrote (earlier predictions are not
    offered as labels to learn from)."""
    import fiftyone as fo

    kinds = [fo.Segmentation, fo.Detections]
    if is_video(dataset):
        schema = [FRAMES + name for name in dataset.get_frame_field_schema(embedded_doc_type=kinds) or {}]
    else:
        schema = dataset.get_field_schema(embedded_doc_type=kinds)
    return {name: field_kind(dataset, name) for name in sorted(schema) if not (learnable and is_ours(dataset, name))}


def masked_count(view, name: str, kind: str) -> int:
    """How many samples of the view have masks in the field (Detections: at least one detection with one)."""
    from fiftyone import ViewField as F

    if frame_field(name) is not None:  # video datasets: frames with a label
        return view.count(name)
    has_mask = (F("mask") != None) | (F("mask_path") != None)  # noqa: E711 (a database expression)
    if kind == DETECTIONS:
        return view.match(F(f"{name}.detections").filter(has_mask).length() > 0).count()
    return view.match((F(f"{name}.mask") != None) | (F(f"{name}.mask_path") != None)).count()  # noqa: E711


def best_label_field(dataset, fields: dict[str, str], prompts=None) -> str | None:
    """The field to learn from by default: one with masks on the prompt candidates (`prompts`: the tagged
    or selected samples; None: any sample), preferring a field that is not filled everywhere (labels a
    person made on a few samples, not a ground truth or earlier output), then the most prompts, then
    Segmentation, then by name."""
    if not fields:
        return None
    total = dataset.count("frames") if is_video(dataset) else len(dataset)
    filled = {name: masked_count(dataset, name, kind) for name, kind in fields.items()}
    on_prompts = filled if prompts is None else {name: masked_count(prompts, name, kind)
                                                 for name, kind in fields.items()}
    return min(fields, key=lambda name: (on_prompts[name] == 0, filled[name] >= total, -on_prompts[name],
                                         filled[name], fields[name] != SEGMENTATION, name))


def type_name(dataset, name: str) -> str:
    field = dataset.get_field(name)
    doc_type = getattr(field, "document_type", None)
    return doc_type.__name__ if isinstance(doc_type, type) else type(field).__name__


# ----------------------------------------------------------------------------------------- ownership


def owner_info() -> dict:
    return {OWNER_KEY: OWNER}


def is_ours(dataset, name: str) -> bool:
    """Whether the field carries this operator's mark (it was created, or adopted, by a run of it)."""
    info = getattr(dataset.get_field(name), "info", None)
    return isinstance(info, dict) and info.get(OWNER_KEY) == OWNER


def adopt(dataset, names) -> None:
    """Mark existing fields as written by this operator (after a run with overwrite_field wrote them)."""
    for name in names:
        if dataset.has_field(name) and not is_ours(dataset, name):
            field = dataset.get_field(name)
            field.info = {**(field.info or {}), **owner_info()}
            field.save()


def declare_fields(dataset, opts: Options, kind: str) -> list[str]:
    """Add the output and confidence fields (marked as ours) where missing; returns those it added."""
    import fiftyone as fo

    added = []
    if not dataset.has_field(opts.output_field):
        add_field(dataset, opts.output_field, fo.EmbeddedDocumentField,
                  embedded_doc_type=fo.Segmentation if kind == SEGMENTATION else fo.Detections, info=owner_info())
        added.append(opts.output_field)
    if not dataset.has_field(opts.confidence_field):
        add_field(dataset, opts.confidence_field, fo.FloatField, info=owner_info(), description=CONFIDENCE_DESCRIPTION)
        added.append(opts.confidence_field)
    return added


# -------------------------------------------------------------------------------------------- checks


def check(dataset, opts: Options, shard: bool = False) -> str:
    """Check fields and paths against the dataset; returns the source kind; ParamError on bad input."""
    import fiftyone as fo

    errors: dict[str, str] = {}
    video = is_video(dataset)
    if dataset.media_type not in ("image", "video"):
        errors["view_target"] = (f"SegGPT propagates image and video labels; this dataset holds "
                                 f"{dataset.media_type} samples")
    errors.update(_media_problems(dataset, opts))
    kind = None
    if "label_field" in errors:
        pass
    elif not dataset.has_field(opts.label_field):
        errors["label_field"] = f"the dataset has no field '{opts.label_field}'"
    else:
        kind = field_kind(dataset, opts.label_field)
        if kind is None:
            errors["label_field"] = (f"'{opts.label_field}' holds {type_name(dataset, opts.label_field)}; expected "
                                     "Segmentation, or Detections with instance masks")

    out = opts.output_field
    name, reserved = (frame_field(out), RESERVED_FRAME_FIELDS) if video else (out, RESERVED_FIELDS)
    if "output_field" in errors:
        pass
    elif (not name or "." in name or name.startswith("_") or name in reserved
            or not name.replace("_", "a").isalnum()):
        errors["output_field"] = (f"'{out}' is not a usable field name (letters, digits and underscores, not "
                                  "starting with an underscore, not a built-in field"
                                  + (", after 'frames.')" if video else ")"))
    elif out == opts.label_field:
        errors["output_field"] = (f"must differ from the {label('label_field')} ('{out}'): the labels learnt "
                                  "from are never overwritten")
    elif out == opts.gt_field:
        errors["output_field"] = f"must differ from the {label('gt_field')} ('{out}'), the ground truth"
    elif dataset.has_field(out) and kind is not None and field_kind(dataset, out) != kind:
        errors["output_field"] = (f"'{out}' exists and holds {type_name(dataset, out)}, but the predictions are "
                                  f"{kind}; choose another output field")
    elif dataset.has_field(opts.confidence_field) and not isinstance(dataset.get_field(opts.confidence_field),
                                                                     fo.FloatField):
        errors["output_field"] = (f"'{opts.confidence_field}' (where the predicted IoU goes) exists and is not a "
                                  "float field; choose another output field")
    elif not opts.overwrite_field:
        foreign = [f for f in (out, opts.confidence_field) if dataset.has_field(f) and not is_ours(dataset, f)]
        if foreign:
            errors["output_field"] = (f"'{foreign[0]}' exists and was not written by this operator (it may hold "
                                      "human labels); choose another output field, or turn on "
                                      f"{label('overwrite_field')} to write into it anyway")

    if opts.gt_field is not None:
        if video:
            errors["gt_field"] = "evaluation of video datasets is not supported; leave it empty"
        elif not dataset.has_field(opts.gt_field):
            errors["gt_field"] = f"the dataset has no field '{opts.gt_field}'"
        elif kind == DETECTIONS:
            errors["gt_field"] = ("evaluation uses evaluate_segmentations, which compares Segmentation fields; the "
                                  "predictions here are Detections (use evaluate_detections(use_masks=True) instead)")
        elif field_kind(dataset, opts.gt_field) != SEGMENTATION:
            errors["gt_field"] = (f"'{opts.gt_field}' holds {type_name(dataset, opts.gt_field)}; evaluation needs a "
                                  "Segmentation field")

    if opts.prompt_tag is not None and not shard and opts.prompt_tag not in dataset.distinct("tags"):
        errors["prompt_tag"] = f"no sample of the dataset is tagged '{opts.prompt_tag}'"
    for name, problem in (("model", model_problem(opts.model)), ("device", device_problem(opts.device))):
        if problem:
            errors[name] = problem
    if opts.mask_dir is not None:
        problem = unwritable(Path(opts.mask_dir))
        if problem:
            errors["mask_dir"] = problem
    if video and opts.tile is not None:
        errors["tile"] = "tiles are for images; video frames are propagated whole (leave it empty)"
    if video and opts.quality != "fast":
        errors["quality"] = f"video datasets are propagated, which reads the fast estimate only, got {opts.quality!r}"
    if errors:
        raise ParamError(errors)
    return kind


def _media_problems(dataset, opts: Options) -> dict[str, str]:
    """Frame fields ('frames.<name>') on a video dataset, sample fields on an image dataset."""
    problems = {}
    for param in ("label_field", "output_field"):
        path = getattr(opts, param)
        if not path:
            continue
        if is_video(dataset) and frame_field(path) is None:
            problems[param] = (f"'{path}' is a sample field, but this is a video dataset: labels live on frames; "
                               f"give a frame field as 'frames.{path}'")
        elif dataset.media_type == "image" and frame_field(path) is not None:
            problems[param] = (f"'{path}' is a frame field, but this dataset holds images; give a sample field "
                               f"(without 'frames.')")
    return problems
