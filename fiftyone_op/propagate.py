"""The work behind the FiftyOne operator, independent of the App: checks, prompt choice, prediction, commit.

    opts = Options.from_params({"label_field": "ground_truth", "output_field": "seggpt", ...})
    kind = check(dataset, opts)                        # ParamError naming the parameter at fault
    prompts = prompt_ids(dataset, opts, selected=[])   # tag > selection > every labelled sample
    targets = target_view(view, prompts, opts).values("id")
    summary = yield from propagate(dataset, opts, prompts, targets, kind=kind)  # yields (fraction, label)

Nothing is written to the dataset until every target has been predicted: predictions are staged as PNG
files (in a temporary folder, or next to `mask_dir` so the final move is a rename), then committed in
chunks. A failure before the commit removes the staged files and leaves the dataset as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from seggpt_plugins.errors import InputError

DEFAULT_MODEL = "BAAI/seggpt-vit-large"
SEG_TYPES = ("semantic", "instance")
CONFIDENCE_SUFFIX = "_confidence"  # per-sample mean score, to sort the review queue by
EVAL_SUFFIX = "_eval"  # evaluation key of a run with gt_field (not in shard runs: see evaluate())
READ_CHUNK = 32  # targets read (and grouped by their prompts) at a time; at least one batch
COMMIT_CHUNK = 256  # samples per database write
PROMPT_CACHE = 64  # decoded prompt pairs kept in memory (the pool may be large; descriptors are all kept)
MIN_INSTANCE_PIXELS = 4  # predicted connected components smaller than this are not made Detections
DESCRIPTOR_SIZE = 16 * 16 + 32  # see describe()
PROGRESS_INTERVAL = 1.0  # seconds between progress reports (besides the first and last)
RESERVED_FIELDS = {"id", "_id", "filepath", "tags", "metadata", "created_at", "last_modified_at", "media_type",
                   "frames", "group"}

SEGMENTATION, DETECTIONS = "Segmentation", "Detections"


class ParamError(InputError):
    """Bad operator parameters: `errors` maps each parameter name to what is wrong with it."""

    def __init__(self, errors: dict[str, str]):
        self.errors = dict(errors)
        super().__init__("; ".join(f"{name}: {msg}" for name, msg in self.errors.items()))


# ------------------------------------------------------------------------------------------------ options


@dataclass
class Options:
    label_field: str
    output_field: str
    prompt_tag: str | None = None
    max_prompts: int = 4
    embedding_type: str | None = None  # SegGPT's type token; None: semantic for Segmentation, instance for Detections
    batch_size: int = 8
    model: str = DEFAULT_MODEL
    device: str | None = None
    mask_dir: str | None = None
    skip_existing: bool = True
    num_shards: int = 1
    gt_field: str | None = None

    @property
    def confidence_field(self) -> str:
        return self.output_field + CONFIDENCE_SUFFIX

    @property
    def eval_key(self) -> str:
        return self.output_field + EVAL_SUFFIX

    @classmethod
    def from_params(cls, params: dict) -> "Options":
        """Parse the operator's params (types as the App or a script sends them); ParamError if unusable."""
        errors: dict[str, str] = {}

        def text(name, required=False, default=None):
            value = params.get(name, default)
            if value is None or (isinstance(value, str) and not value.strip()):
                if required:
                    errors[name] = "required"
                return default
            if not isinstance(value, str):
                errors[name] = f"expected a string, got {type(value).__name__}"
                return None
            return value.strip()

        def integer(name, default, low=1):
            value = params.get(name, default)
            if value is None:
                return default
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
                errors[name] = f"expected a whole number, got {value!r}"
                return default
            if value < low:
                errors[name] = f"must be >= {low}, got {int(value)}"
                return default
            return int(value)

        label_field = text("label_field", required=True)
        output_field = text("output_field") or (f"{label_field}_seggpt" if label_field else None)
        embedding_type = text("embedding_type")
        if embedding_type is not None and embedding_type not in SEG_TYPES:
            errors["embedding_type"] = f"must be one of {SEG_TYPES}, got {embedding_type!r}"
        device = text("device")
        if device is not None and device.lower() == "auto":
            device = None
        mask_dir = text("mask_dir")
        if mask_dir is not None:
            mask_dir = os.path.expanduser(mask_dir)
            if not os.path.isabs(mask_dir):
                errors["mask_dir"] = (f"must be an absolute path that the App and every worker can reach, got "
                                      f"{mask_dir!r}")
        skip_existing = params.get("skip_existing", True)
        if skip_existing is None:
            skip_existing = True
        if not isinstance(skip_existing, bool):
            errors["skip_existing"] = f"expected true or false, got {skip_existing!r}"
        opts = cls(label_field=label_field, output_field=output_field, prompt_tag=text("prompt_tag"),
                   max_prompts=integer("max_prompts", 4), embedding_type=embedding_type,
                   batch_size=integer("batch_size", 8), model=text("model") or DEFAULT_MODEL, device=device,
                   mask_dir=mask_dir, skip_existing=bool(skip_existing), num_shards=integer("num_shards", 1),
                   gt_field=text("gt_field"))
        if errors:
            raise ParamError(errors)
        return opts


# ------------------------------------------------------------------------------------------------- fields


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


def label_fields(dataset) -> dict[str, str]:
    """Top-level fields SegGPT can learn from: {name: SEGMENTATION | DETECTIONS}."""
    import fiftyone as fo

    schema = dataset.get_field_schema(embedded_doc_type=[fo.Segmentation, fo.Detections])
    return {name: field_kind(dataset, name) for name in sorted(schema)}


def _type_name(dataset, name: str) -> str:
    field = dataset.get_field(name)
    doc_type = getattr(field, "document_type", None)
    return doc_type.__name__ if isinstance(doc_type, type) else type(field).__name__


def check(dataset, opts: Options, shard: bool = False) -> str:
    """Check fields and paths against the dataset; returns the source kind; ParamError on bad input."""
    import fiftyone as fo

    errors: dict[str, str] = {}
    if dataset.media_type != "image":
        errors["view_target"] = f"SegGPT propagates image labels; this dataset holds {dataset.media_type} samples"
    kind = None
    if not dataset.has_field(opts.label_field):
        errors["label_field"] = f"the dataset has no field '{opts.label_field}'"
    else:
        kind = field_kind(dataset, opts.label_field)
        if kind is None:
            errors["label_field"] = (f"'{opts.label_field}' holds {_type_name(dataset, opts.label_field)}; expected "
                                     "Segmentation, or Detections with instance masks")

    out = opts.output_field
    if not out or "." in out or out.startswith("_") or out in RESERVED_FIELDS or not out.replace("_", "a").isalnum():
        errors["output_field"] = (f"'{out}' is not a usable field name (letters, digits and underscores, not "
                                  "starting with an underscore, not a built-in field)")
    elif out == opts.label_field:
        errors["output_field"] = "must differ from label_field: the prompts' labels are never overwritten"
    elif out == opts.gt_field:
        errors["output_field"] = "must differ from gt_field"
    elif dataset.has_field(out) and kind is not None and field_kind(dataset, out) != kind:
        errors["output_field"] = (f"'{out}' exists and holds {_type_name(dataset, out)}, but the predictions are "
                                  f"{kind}; choose another output field")
    elif dataset.has_field(opts.confidence_field) and not isinstance(dataset.get_field(opts.confidence_field),
                                                                     fo.FloatField):
        errors["output_field"] = (f"'{opts.confidence_field}' (where the per-sample confidence goes) exists and is "
                                  f"not a float field; choose another output field")

    if opts.gt_field is not None:
        if not dataset.has_field(opts.gt_field):
            errors["gt_field"] = f"the dataset has no field '{opts.gt_field}'"
        elif kind == DETECTIONS:
            errors["gt_field"] = ("evaluation uses evaluate_segmentations, which compares Segmentation fields; the "
                                  "predictions here are Detections (use evaluate_detections(use_masks=True) instead)")
        elif field_kind(dataset, opts.gt_field) != SEGMENTATION:
            errors["gt_field"] = (f"'{opts.gt_field}' holds {_type_name(dataset, opts.gt_field)}; evaluation needs a "
                                  "Segmentation field")

    if opts.prompt_tag is not None and not shard and opts.prompt_tag not in dataset.distinct("tags"):
        errors["prompt_tag"] = f"no sample of the dataset is tagged '{opts.prompt_tag}'"
    if opts.mask_dir is not None:
        problem = _unwritable(Path(opts.mask_dir))
        if problem:
            errors["mask_dir"] = problem
    if errors:
        raise ParamError(errors)
    return kind


def _unwritable(path: Path) -> str | None:
    """Why masks could not be written under `path` (None: they can); creates nothing."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


# ------------------------------------------------------------------------------------- prompts and targets


def prompt_view(dataset, opts: Options, selected=()):
    """The prompt samples and how they were chosen: tagged samples, else the selection, else every sample
    whose label field is filled. Prompts come from the whole dataset, whatever the target view."""
    if opts.prompt_tag is not None:
        return dataset.match_tags(opts.prompt_tag), f"samples tagged '{opts.prompt_tag}'"
    if selected:
        return dataset.select(list(selected)), "selected samples"
    return dataset.exists(opts.label_field), f"samples with '{opts.label_field}' filled"


def prompt_ids(dataset, opts: Options, selected=()) -> list[str]:
    """Ids of the prompt samples; ParamError when there are none or some have no label."""
    view, how = prompt_view(dataset, opts, selected)
    return check_prompts(dataset, opts, view.values("id"), how)


def check_prompts(dataset, opts: Options, ids: list[str], how: str) -> list[str]:
    where = "prompt_tag" if opts.prompt_tag else "label_field"
    if not ids:
        raise ParamError({where: f"no prompt samples: no {how}. Label a few samples in '{opts.label_field}' and tag "
                                 "or select them"})
    present = dataset.select(ids)
    if len(present) != len(set(ids)):
        raise ParamError({where: f"{len(set(ids)) - len(present)} of the {len(ids)} prompt samples ({how}) no longer "
                                 "exist in the dataset"})
    missing = present.exists(opts.label_field, False).values("id")
    if missing:
        raise ParamError({where: f"{len(missing)} of the {len(ids)} prompt samples ({how}) have no "
                                 f"'{opts.label_field}' label to learn from, e.g. {', '.join(missing[:3])}"})
    return list(ids)


def target_view(view, prompts, opts: Options):
    """The samples to predict: the target view minus the prompts (and minus samples that already have the
    output field, with skip_existing)."""
    view = view.exclude(list(prompts))
    if opts.skip_existing and view.has_field(opts.output_field):
        view = view.exists(opts.output_field, False)
    return view


def split(ids: list, num_shards: int) -> list[list]:
    """Contiguous, near-equal, non-empty parts (fewer than num_shards when there are fewer ids)."""
    num = max(1, min(num_shards, len(ids)))
    bounds = np.linspace(0, len(ids), num + 1).round().astype(int)
    return [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


# --------------------------------------------------------------------------------------- similarity


def describe(rgb8: np.ndarray) -> np.ndarray:
    """A small appearance descriptor (unit vector): a standardised 16x16 grey thumbnail and a 32-bin
    intensity histogram (square-rooted), weighted equally. Dot products rank prompts by similarity."""
    from PIL import Image

    grey = rgb8.astype(np.float32).mean(axis=-1)
    thumb = np.array(Image.fromarray(grey).resize((16, 16), Image.BILINEAR), np.float32).ravel()
    thumb -= thumb.mean()
    thumb /= np.linalg.norm(thumb) or 1.0
    hist = np.sqrt(np.histogram(grey, bins=32, range=(0, 256))[0].astype(np.float32))
    hist /= np.linalg.norm(hist) or 1.0
    return np.concatenate([thumb, hist]) / np.sqrt(2.0)


def most_similar(descriptor: np.ndarray, pool: np.ndarray, k: int) -> tuple[int, ...]:
    """Indices of the k pool rows most similar to `descriptor` (all of them when k >= len(pool)), sorted."""
    if k >= len(pool):
        return tuple(range(len(pool)))
    scores = pool @ descriptor
    order = np.argsort(-scores, kind="stable")[:k]
    return tuple(sorted(int(i) for i in order))


# ----------------------------------------------------------------------------------------- label codecs


def _resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize (FiftyOne stretches a mask over its image when their sizes differ)."""
    if mask.shape[:2] == (height, width):
        return mask
    rows = np.minimum((np.arange(height) + 0.5) * mask.shape[0] / height, mask.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(width) + 0.5) * mask.shape[1] / width, mask.shape[1] - 1).astype(int)
    return mask[rows][:, cols]


class SegmentationCodec:
    """Segmentation <-> label map: the mask's own ids (or RGB colours) are the prompt's ids."""

    kind = SEGMENTATION

    def __init__(self, field: str):
        self.field = field
        self.rgb = False  # RGB colour masks (mask_targets keyed by hex colours)

    def prepare(self, labels: list) -> None:
        pass

    def encode(self, label, height: int, width: int, name: str) -> np.ndarray:
        from seggpt_plugins.images import to_mask

        mask = label.get_mask() if label is not None else None
        if mask is None:
            raise InputError(f"{name}: its '{self.field}' Segmentation has neither a mask nor a mask_path")
        mask = _resize_nearest(to_mask(mask, name=f"{name} '{self.field}' mask"), height, width)
        self.rgb = self.rgb or mask.ndim == 3
        return mask

    def decode(self, pred) -> tuple[np.ndarray, Any]:
        """Prediction -> (array to stage as PNG, metadata kept in memory)."""
        labels = pred.labels
        top = int(labels.max()) if labels.size else 0
        if self.rgb:  # ids 1..K stand for the prompts' colours
            lut = np.zeros((max(top, max(pred.colors, default=0)) + 1, 3), np.uint8)
            for label_id, color in pred.colors.items():
                lut[label_id] = color
            return lut[labels], None
        if top > 65535:
            raise InputError(f"label ids up to {top} do not fit a 16-bit mask")
        return labels.astype(np.uint8 if top <= 255 else np.uint16), None

    def label(self, staged: np.ndarray, meta, mask_path: str | None):
        import fiftyone as fo

        return fo.Segmentation(mask_path=mask_path) if mask_path else fo.Segmentation(mask=staged)


class DetectionsCodec:
    """Detections with instance masks <-> label map.

    Instance encoding (type token "instance", when it fits SegGPT's colour budget): every class gets a
    range of ids as wide as its largest object count in one prompt, each object its own id in its class's
    range, so a painted colour tells both the object and its class. Class encoding ("semantic", or too
    many objects): one id per class. Either way each predicted id region is split into connected
    components, one Detection each, labelled with the id's class.
    """

    kind = DETECTIONS

    def __init__(self, field: str, seg_type: str):
        self.field = field
        self.seg_type = seg_type
        self.classes: list = []
        self.offsets: np.ndarray = np.zeros(0, np.int64)
        self.widths: np.ndarray = np.zeros(0, np.int64)

    def prepare(self, labels: list) -> None:
        """Fix the class order and id ranges from all prompt labels (before encoding any of them)."""
        from seggpt_plugins.colors import MAX_CLASSES

        counts: list[dict] = []
        for label in labels:
            per_class: dict = {}
            for det in (label.detections if label is not None else []):
                per_class[det.label] = per_class.get(det.label, 0) + 1
            counts.append(per_class)
        self.classes = sorted({c for per_class in counts for c in per_class}, key=lambda c: (c is None, str(c)))
        widths = np.array([max(pc.get(c, 0) for pc in counts) for c in self.classes], np.int64)
        if self.seg_type != "instance" or widths.sum() > MAX_CLASSES:
            widths = np.ones(len(self.classes), np.int64)
        self.widths = widths
        self.offsets = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.int64)

    @property
    def instance_ids(self) -> bool:
        return bool(np.any(self.widths > 1))

    def encode(self, label, height: int, width: int, name: str) -> np.ndarray:
        import fiftyone as fo

        index = {c: i for i, c in enumerate(self.classes)}
        canvas = np.zeros((height, width), np.uint8)
        seen = np.zeros(len(self.classes), np.int64)
        for det in (label.detections if label is not None else []):
            mask = det.get_mask()
            if mask is None:
                raise InputError(f"{name}: a detection ('{det.label}') in '{self.field}' has no instance mask; "
                                 "SegGPT needs masks, not only boxes")
            c = index[det.label]
            target = int(self.offsets[c] + seen[c] % self.widths[c] + 1)
            seen[c] += 1
            fo.Detection(bounding_box=det.bounding_box, mask=np.asarray(mask).astype(bool)).to_segmentation(
                mask=canvas, target=target)
        return canvas

    def class_of(self, label_id: int):
        c = int(np.searchsorted(self.offsets, label_id - 1, side="right")) - 1
        return self.classes[c]

    def decode(self, pred) -> tuple[np.ndarray, list]:
        """Prediction -> (instance map 1..N, [(class, confidence)] per instance)."""
        from scipy import ndimage

        labels, scores = pred.labels, pred.scores
        instances = np.zeros(labels.shape, np.uint16)
        meta = []
        for label_id in np.unique(labels):
            if label_id == 0:
                continue
            components, count = ndimage.label(labels == label_id)
            for k, region in enumerate(ndimage.find_objects(components), 1):
                inside = components[region] == k
                if inside.sum() < MIN_INSTANCE_PIXELS:
                    continue
                if len(meta) >= 65535:
                    raise InputError("more than 65535 predicted instances in one image")
                meta.append((self.class_of(int(label_id)), float(scores[region][inside].mean())))
                instances[region][inside] = len(meta)
        return instances, meta

    def label(self, staged: np.ndarray, meta: list, mask_path: str | None, final_dir: str | None = None):
        """With mask_path (a folder), one PNG per detection is written there, referenced as final_dir/k.png."""
        import fiftyone as fo
        from scipy import ndimage

        from seggpt_plugins.io import write_png

        height, width = staged.shape
        detections = []
        for k, region in enumerate(ndimage.find_objects(staged, max_label=len(meta)), 1):
            if region is None:
                continue
            ys, xs = region
            box = [xs.start / width, ys.start / height, (xs.stop - xs.start) / width, (ys.stop - ys.start) / height]
            crop = staged[region] == k
            cls, confidence = meta[k - 1]
            if mask_path:
                write_png(os.path.join(mask_path, f"{k}.png"), crop.astype(np.uint8) * 255, overwrite=True)
                det = fo.Detection(label=cls, bounding_box=box, confidence=confidence,
                                   mask_path=os.path.join(final_dir or mask_path, f"{k}.png"))
            else:
                det = fo.Detection(label=cls, bounding_box=box, mask=crop, confidence=confidence)
            detections.append(det)
        return fo.Detections(detections=detections)


def make_codec(kind: str, field: str, seg_type: str):
    return SegmentationCodec(field) if kind == SEGMENTATION else DetectionsCodec(field, seg_type)


# ---------------------------------------------------------------------------------------------- model

_MODELS: dict = {}


def load_model(source: str, device: str | None):
    """One SegGPT kept per process (the App server or a delegated worker): reused while model and device
    stay the same, replaced (freeing its memory) when they change."""
    from seggpt_plugins import SegGPT

    key = (source, device)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = SegGPT.from_pretrained(source, device=device)
    return _MODELS[key]


# ----------------------------------------------------------------------------------------- the run


def _media_error(sample_id: str, filepath: str, exc: Exception) -> InputError:
    return InputError(f"sample {sample_id} ({filepath}): {exc}")


class _Prompts:
    """The prompt pool: descriptors for all, decoded (image, mask) pairs in a small LRU cache."""

    def __init__(self, dataset, ids: list[str], codec, label_field: str):
        self.dataset, self.ids, self.codec, self.field = dataset, list(ids), codec, label_field
        view = dataset.select(self.ids, ordered=True)
        self.filepaths = view.values("filepath")
        labels = view.values(label_field)
        codec.prepare(labels)
        self.cache: OrderedDict = OrderedDict()
        self.descriptors = np.zeros((len(self.ids), DESCRIPTOR_SIZE), np.float32)
        for i, label in enumerate(labels):
            pair = self._decode(i, label)
            self.descriptors[i] = describe(pair[0])
            self._remember(i, pair)

    def _decode(self, i: int, label=None):
        from seggpt_plugins.images import to_rgb8

        sample_id, filepath = self.ids[i], self.filepaths[i]
        try:
            rgb = to_rgb8(filepath, name="image")
        except InputError as exc:
            raise _media_error(sample_id, filepath, exc) from None
        if label is None:
            label = self.dataset.select(sample_id).values(self.field)[0]
        mask = self.codec.encode(label, rgb.shape[0], rgb.shape[1], name=f"prompt sample {sample_id}")
        return rgb, mask

    def _remember(self, i: int, pair) -> None:
        self.cache[i] = pair
        self.cache.move_to_end(i)
        while len(self.cache) > PROMPT_CACHE:
            self.cache.popitem(last=False)

    def pairs(self, indices) -> tuple[list, list]:
        images, masks = [], []
        for i in indices:
            pair = self.cache.get(i)
            if pair is None:
                pair = self._decode(i)
            self._remember(i, pair)
            images.append(pair[0])
            masks.append(pair[1])
        return images, masks


class _Progress:
    """Rate-limited (fraction, label) reports."""

    def __init__(self):
        self.last = 0.0

    def due(self, force: bool = False) -> bool:
        now = time.monotonic()
        if force or now - self.last >= PROGRESS_INTERVAL:
            self.last = now
            return True
        return False


def propagate(dataset, opts: Options, prompts: list[str], targets: list[str], *, kind: str,
              declare: bool = True, eval_ids: list[str] | None = None, eval_key: str | None = None,
              model=None) -> Iterator[tuple[float, str]]:
    """Predict every target, then write the output field; yields (fraction, label); returns a summary dict.

    declare: set the output field's mask_targets/classes (off in shard runs: the run that queued the
    shards did it once, so that concurrent workers never edit the dataset document).
    eval_ids: with opts.gt_field, the samples to evaluate afterwards (None: the targets).
    """
    started = time.monotonic()
    seg_type = opts.embedding_type or ("semantic" if kind == SEGMENTATION else "instance")
    codec = make_codec(kind, opts.label_field, seg_type)
    summary: dict[str, Any] = {"output_field": opts.output_field, "confidence_field": opts.confidence_field,
                               "prompts": len(prompts), "targets": len(targets), "embedding_type": seg_type}
    yield 0.0, f"Reading {len(prompts)} prompt sample{'' if len(prompts) == 1 else 's'}"
    pool = _Prompts(dataset, prompts, codec, opts.label_field) if targets else None
    if targets:
        if model is None:
            yield 0.0, f"Loading model {opts.model}"
            model = load_model(opts.model, opts.device)
        staging = _Staging(opts)
        try:
            meta: dict[str, Any] = {}  # per target: what the codec needs besides the staged PNG
            confidence: dict[str, float] = {}
            used: dict[str, list[str]] = {}  # per target: the prompt samples it was predicted from
            yield from _predict(model, dataset, opts, seg_type, pool, codec, targets, staging, meta, confidence,
                                used)
            yield 0.95, f"Saving {len(targets)} predictions to '{opts.output_field}'"
            _commit(dataset, opts, codec, targets, staging, meta, confidence, used, declare=declare)
        finally:
            staging.cleanup()
        summary["mean_confidence"] = float(np.mean(list(confidence.values())))
        if kind == DETECTIONS:
            summary["instances"] = int(sum(len(m) for m in meta.values()))
    if opts.gt_field is not None:
        yield 0.98, f"Evaluating '{opts.output_field}' against '{opts.gt_field}'"
        summary["evaluation"] = evaluate(dataset, opts, targets if eval_ids is None else eval_ids, eval_key)
        summary["gt_field"] = opts.gt_field
        summary["miou"] = summary["evaluation"].get("miou")
    summary["seconds"] = round(time.monotonic() - started, 3)
    yield 1.0, f"Done: {len(targets)} samples written to '{opts.output_field}'"
    return summary


def _predict(model, dataset, opts, seg_type, pool, codec, targets, staging, meta, confidence, used):
    from seggpt_plugins.images import to_rgb8

    progress = _Progress()
    done = 0
    chunk_size = max(opts.batch_size, READ_CHUNK)
    for start in range(0, len(targets), chunk_size):
        ids = targets[start:start + chunk_size]
        filepaths = dataset.select(ids, ordered=True).values("filepath")
        images = []
        for sample_id, filepath in zip(ids, filepaths):
            try:
                images.append(to_rgb8(filepath, name="image"))
            except InputError as exc:
                raise _media_error(sample_id, filepath, exc) from None
        chosen = [most_similar(describe(image), pool.descriptors, opts.max_prompts) for image in images]
        if len(set(chosen)) == 1:  # one prompt set for the chunk: prepared once by the model
            prompt_images, prompt_masks = pool.pairs(chosen[0])
        else:  # each target its own most similar prompts (lists of lists), still batched together
            pairs = [pool.pairs(c) for c in chosen]
            prompt_images, prompt_masks = [p[0] for p in pairs], [p[1] for p in pairs]
        for pred in model.iter_segment(images, prompt_images, prompt_masks, batch_size=opts.batch_size,
                                       seg_type=seg_type):
            sample_id = ids[pred.index]
            staged, info = codec.decode(pred)
            staging.write(sample_id, staged)
            meta[sample_id] = info
            confidence[sample_id] = float(pred.confidence)
            used[sample_id] = [pool.ids[i] for i in chosen[pred.index]]
            done += 1
            if progress.due(force=done in (1, len(targets))):
                yield 0.95 * done / len(targets), f"Predicted {done}/{len(targets)} samples"


class _Staging:
    """Where predictions wait for the commit: PNG label maps named by sample id.

    With mask_dir the staging folder sits inside `mask_dir/<output_field>/` so the final move is a rename
    on the same file system; otherwise it is a private temporary folder.
    """

    def __init__(self, opts: Options):
        if opts.mask_dir:
            self.final = Path(opts.mask_dir, opts.output_field)
            self.final.mkdir(parents=True, exist_ok=True)
            self.root = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.final))
        else:
            self.final = None
            self.root = Path(tempfile.mkdtemp(prefix="seggpt-fiftyone-"))

    def path(self, sample_id: str) -> Path:
        return self.root / f"{sample_id}.png"

    def write(self, sample_id: str, arr: np.ndarray) -> None:
        from seggpt_plugins.io import write_png

        write_png(self.path(sample_id), arr, overwrite=True)

    def read(self, sample_id: str) -> np.ndarray:
        from seggpt_plugins.images import read_image

        return read_image(self.path(sample_id))

    def publish(self, sample_id: str) -> str | None:
        """Segmentation: move the staged mask to mask_dir/<output_field>/<id>.png (None: inline masks)."""
        if self.final is None:
            return None
        final = self.final / f"{sample_id}.png"
        os.replace(self.path(sample_id), final)
        return str(final)

    def folder(self, sample_id: str) -> tuple[Path, Path]:
        """Detections: (staged folder to fill with one PNG per instance, its final place)."""
        staged = self.root / sample_id
        staged.mkdir(exist_ok=True)
        return staged, self.final / sample_id

    def publish_folder(self, sample_id: str) -> None:
        """Swap the sample's staged folder of instance PNGs into place (replacing an earlier one)."""
        staged, final = self.root / sample_id, self.final / sample_id
        old = None
        if final.exists():
            old = self.root / f"{sample_id}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(staged, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _commit(dataset, opts: Options, codec, targets, staging: _Staging, meta, confidence, used,
            declare: bool) -> None:
    """Write the staged predictions to the dataset in chunks; on a failure undo what was written.

    Each label also records `prompt_ids`, the prompt samples it was predicted from (for review)."""
    created = [f for f in (opts.output_field, opts.confidence_field) if not dataset.has_field(f)]
    written: list[str] = []
    try:
        for start in range(0, len(targets), COMMIT_CHUNK):
            ids = targets[start:start + COMMIT_CHUNK]
            labels = {}
            for sample_id in ids:
                staged = staging.read(sample_id)
                if codec.kind == SEGMENTATION:
                    labels[sample_id] = codec.label(staged, meta[sample_id], staging.publish(sample_id))
                elif staging.final is None:
                    labels[sample_id] = codec.label(staged, meta[sample_id], None)
                else:
                    folder, final = staging.folder(sample_id)
                    labels[sample_id] = codec.label(staged, meta[sample_id], str(folder), str(final))
                    staging.publish_folder(sample_id)
                labels[sample_id]["prompt_ids"] = used[sample_id]
            dataset.set_values(opts.output_field, labels, key_field="id")
            dataset.set_values(opts.confidence_field, {i: confidence[i] for i in ids}, key_field="id")
            written.extend(ids)
        if declare:
            _declare_targets(dataset, opts, codec.kind)
    except BaseException:
        _undo(dataset, opts, written, created)
        raise


def _declare_targets(dataset, opts: Options, kind: str) -> None:
    """Carry the source field's mask_targets (Segmentation) or classes (Detections) over to the output."""
    if kind == SEGMENTATION:
        targets = dataset.mask_targets.get(opts.label_field)
        if targets and dataset.mask_targets.get(opts.output_field) != targets:
            dataset.mask_targets[opts.output_field] = dict(targets)
            dataset.save()
    else:
        classes = dataset.classes.get(opts.label_field)
        if classes and dataset.classes.get(opts.output_field) != classes:
            dataset.classes[opts.output_field] = list(classes)
            dataset.save()


def declare_output(dataset, opts: Options, kind: str) -> None:
    """Declare the output fields and their targets once, before shards run concurrently (so that no two
    workers edit the dataset's schema at the same time)."""
    import fiftyone as fo

    if not dataset.has_field(opts.output_field):
        dataset.add_sample_field(opts.output_field, fo.EmbeddedDocumentField,
                                 embedded_doc_type=fo.Segmentation if kind == SEGMENTATION else fo.Detections)
    if not dataset.has_field(opts.confidence_field):
        dataset.add_sample_field(opts.confidence_field, fo.FloatField)
    _declare_targets(dataset, opts, kind)


def _undo(dataset, opts: Options, written: list[str], created: list[str]) -> None:
    """Best effort: clear what this run wrote, and drop fields that it created."""
    try:
        if written:
            view = dataset.select(written)
            for field in (opts.output_field, opts.confidence_field):
                if dataset.has_field(field):
                    view.set_field(field, None).save(field)
        for field in created:
            if dataset.has_field(field) and not dataset.exists(field).count():
                dataset.delete_sample_field(field)
    except Exception:  # the original error matters more
        pass


# ------------------------------------------------------------------------------------------- evaluation


def iou_from_confusion(matrix: np.ndarray, classes) -> tuple[dict, float | None]:
    """Per-class IoU = diag / (row + col - diag) (rows: ground truth, columns: prediction), over the
    classes present in either; mIoU is their mean (background included when it is a class)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - tp
    iou = {str(c): float(tp[i] / union[i]) for i, c in enumerate(classes) if union[i] > 0}
    return iou, (float(np.mean(list(iou.values()))) if iou else None)


def evaluate(dataset, opts: Options, sample_ids: list[str], eval_key: str | None) -> dict:
    """evaluate_segmentations over the given samples that have both fields; mIoU from its confusion matrix.

    eval_key: store the evaluation (per-sample accuracy/precision/recall fields and the run) under this key,
    replacing an earlier one; None computes without writing (shard runs: workers must not edit the schema
    concurrently).
    """
    import fiftyone.core.fields as fof

    view = dataset.select(sample_ids).exists(opts.output_field).exists(opts.gt_field)
    count = len(view)
    if not count:
        return {"samples": 0, "note": f"no sample has both '{opts.output_field}' and '{opts.gt_field}'"}
    targets = (dataset.mask_targets.get(opts.gt_field) or dataset.mask_targets.get(opts.output_field)
               or dataset.default_mask_targets or None)
    if targets:
        targets = dict(targets)
        if fof.is_rgb_mask_targets(targets):
            targets = {k.lower(): v for k, v in targets.items()}
            targets.setdefault("#000000", "background")
        else:
            targets.setdefault(0, "background")
    if eval_key is not None and eval_key in dataset.list_evaluations():
        dataset.delete_evaluation(eval_key)
    results = view.evaluate_segmentations(opts.output_field, gt_field=opts.gt_field, eval_key=eval_key,
                                          mask_targets=targets, progress=False)
    iou, miou = iou_from_confusion(results.pixel_confusion_matrix, results.classes)
    metrics = results.metrics()
    return {"samples": count, "eval_key": eval_key, "miou": miou, "iou": iou,
            "accuracy": float(metrics["accuracy"]), "precision": float(metrics["precision"]),
            "recall": float(metrics["recall"]), "fscore": float(metrics["fscore"])}
