"""Exporting labelled images: class names, COCO instances (RLE), COCO panoptic, and a review table.

Writers stream: each image's entries go to disk as they come, and the final file is assembled and
renamed into place at the end (inside an `io.OutputSet`, so a failed run leaves no file at all), so
a folder of 100k images never holds its COCO file in memory.

    names = load_label_names("names.json")                  # {id: Category}
    with outputs:
        coco = CocoWriter(outputs.stage(out / "coco.json"), names)
        coco.add("a.png", instances)                        # objects.Instances
        coco.close()
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from .errors import InputError
from .images import distinct_values
from .instances import Instances, ObjectRule
from .vocabulary import IMAGE_SUFFIXES, OUTPUT_FORMATS

FORMATS = OUTPUT_FORMATS
OUTPUTS = ("labels", "instances", "panoptic")


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    thing: bool = True  # things get one id per object; stuff stays one region per class (panoptic)


class LabelNames(dict):
    """{label id: Category} read from a file (`path`), so errors about the names can name it."""

    def __init__(self, names: dict[int, Category], path: Path) -> None:
        super().__init__(names)
        self.path = path


def load_label_names(path) -> LabelNames:
    """Class names from a file: JSON or YAML ({"1": "nucleus"} or {"1": {"name": "sky", "thing": false}}),
    or text, one class a line: `ID NAME [thing|stuff]`. InputError names the file and line at fault."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file (--label-names)")
    text = path.read_text(errors="replace")
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                try:
                    import yaml
                except ImportError:
                    raise InputError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or give JSON or "
                                     "text") from None
                data = yaml.safe_load(text)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{path}: not valid {path.suffix[1:].upper()} ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise InputError(f"{path}: expected a mapping of label id to name, e.g. {{\"1\": \"nucleus\"}}")
        entries = [(key, value, f"key {key!r}") for key, value in data.items()]
    else:
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            words = line.split("#")[0].split()
            if not words:
                continue
            if len(words) < 2 or len(words) > 3:
                raise InputError(f"{path}, line {number}: expected `ID NAME [thing|stuff]`, got {line.strip()!r}")
            kind = words[2] if len(words) == 3 else "thing"
            entries.append((words[0], {"name": words[1], "thing": kind}, f"line {number}"))
    names: dict[int, Category] = {}
    for key, value, where in entries:
        try:
            label_id = int(key)
        except (TypeError, ValueError):
            raise InputError(f"{path}, {where}: label ids are whole numbers > 0, got {key!r}") from None
        if label_id <= 0:
            raise InputError(f"{path}, {where}: label ids are whole numbers > 0 (0 is background), got {label_id}")
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"].strip():
            raise InputError(f"{path}, {where}: expected a name, or {{\"name\": ..., \"thing\": true|false}}")
        thing = value.get("thing", True)
        if isinstance(thing, str):
            if thing.lower() not in ("thing", "stuff", "true", "false"):
                raise InputError(f"{path}, {where}: the kind is 'thing' or 'stuff', got {thing!r}")
            thing = thing.lower() in ("thing", "true")
        names[label_id] = Category(label_id, value["name"].strip(), bool(thing))
    if not names:
        raise InputError(f"{path}: names no class")
    return LabelNames(names, path)


def categories_for(ids, names: dict[int, Category] | None, colors: dict | None = None,
                   objects: bool = False, instance_like: bool = False) -> dict[int, Category]:
    """A category per label id: the given names (--label-names, which must cover every id), else a name that
    says where the id came from: `label <id>` (the value the example masks mark it with, e.g. `label 255`
    for a 0/255 mask), the colour `#rrggbb` of colour masks (`colors`: {id: (r, g, b)}), or `object` when
    the examples' ids numbered objects (`objects`: shown as one class, example_ids.py). `instance_like`:
    the example masks look instance-labelled, so names that miss ids suggest `--example-ids instances`."""
    ids = sorted(int(i) for i in ids if int(i) != 0)
    if names:
        missing = [i for i in ids if i not in names]
        if missing:
            source = f"{names.path} (--label-names)" if isinstance(names, LabelNames) else "--label-names"
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            hint = ("; the example masks look instance-labelled (many ids, each one object): pass --example-ids "
                    "instances to show their objects as one class, named by id 1" if instance_like and not objects
                    else "")
            raise InputError(f"{source}: no name for label id(s) {missing[:10]}{more} found in the example masks"
                             f"{hint}")
        return {i: names[i] for i in ids}
    if objects:
        return {i: Category(i, "object") for i in ids}
    if colors:
        return {i: Category(i, "#{:02x}{:02x}{:02x}".format(*colors[i]) if i in colors else f"label {i}")
                for i in ids}
    return {i: Category(i, f"label {i}") for i in ids}


def map_dtype(output: str, top_id: int = 0) -> np.dtype:
    """The one dtype of every map a run writes: class labels (`output` "labels") the smallest unsigned type
    that holds the largest id the prompts can give (`top_id`, known before the run: uint8 up to 255, else
    uint16); object and panoptic segment ids, whose count is known only as each image is done, uint16."""
    from .images import label_dtype

    return np.dtype(label_dtype(top_id) if output == "labels" else np.uint16)


def check_ids_fit(fmt: str, top_id: int, where: str) -> None:
    """InputError when label or instance ids up to `top_id` cannot be stored in format `fmt`."""
    if fmt == "png" and top_id > 65535:
        raise InputError(f"{where}: ids up to {top_id} do not fit a 16-bit PNG; use --format tiff")


def _rle(binary: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(binary.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _box(box: tuple[slice, slice]) -> list[float]:
    rows, cols = box
    return [float(cols.start), float(rows.start), float(cols.stop - cols.start), float(rows.stop - rows.start)]


class _JsonArrays:
    """Items of several JSON arrays streamed to temporary files, assembled into one JSON object at the end."""

    def __init__(self, path, arrays: tuple[str, ...]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._files = {name: tempfile.TemporaryFile("w+", dir=self.path.parent) for name in arrays}
        self._counts = {name: 0 for name in arrays}

    def append(self, array: str, item: dict) -> None:
        file = self._files[array]
        if self._counts[array]:
            file.write(",\n")
        file.write(json.dumps(item, separators=(",", ":")))
        self._counts[array] += 1

    def close(self, head: dict) -> Path:
        with open(self.path, "w") as out:
            out.write(json.dumps(head)[:-1] + (", " if head else ""))
            for k, (name, file) in enumerate(self._files.items()):
                file.seek(0)
                out.write(("" if k == 0 else ", ") + json.dumps(name) + ": [\n")
                while chunk := file.read(1 << 20):
                    out.write(chunk)
                out.write("\n]")
                file.close()
            out.write("}\n")
        return self.path


def coco_annotations(instances: Instances) -> list[dict]:
    """One image's COCO annotations (RLE masks, areas and boxes from pycocotools; ids are given by the
    writer). Each `score` is the object's confidence (its predicted IoU when estimated, else its mean snap
    score, which `snap_score` always holds)."""
    from pycocotools import mask as mask_utils

    annotations = []
    for obj in instances.objects:
        rle = _rle(instances.map == obj.id)
        annotations.append({"category_id": int(obj.class_id), "segmentation": rle, "area": float(mask_utils.area(rle)),
                            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
                            "score": round(float(obj.confidence), 4), "snap_score": round(float(obj.score), 4)})
    return annotations


def coco_file_name(source: str, stem: str) -> str:
    """The one `file_name` rule of every COCO file written for input files: the input's path relative to the
    folder (or glob, or object-store prefix) it was found under, i.e. its output stem with the input's own
    suffix, as COCO tools read it against an image root (`data_path`). A source that is not an image file
    (a video frame `clip.mp4#frame3`) is its own name."""
    suffix = PurePosixPath(str(source).split("?")[0]).suffix
    return f"{stem}{suffix}" if suffix.lower() in IMAGE_SUFFIXES else str(source)


class CocoWriter:
    """COCO instance segmentation JSON, written as it goes (file names as given: see `coco_file_name`)."""

    def __init__(self, path, categories: dict[int, Category], description: str = "seggpt-plugins"):
        self._arrays = _JsonArrays(path, ("images", "annotations"))
        self.categories = categories
        self.description = description
        self._images = 0
        self._annotations = 0

    def add(self, file_name: str, instances: Instances) -> int:
        """One image and its objects (`Instance.class_id` must be a category id); returns the image id."""
        height, width = instances.map.shape
        return self.add_encoded(file_name, height, width, coco_annotations(instances))

    def add_encoded(self, file_name: str, height: int, width: int, annotations: list[dict]) -> int:
        """One image and its annotations as `coco_annotations` made them (e.g. in another process)."""
        for annotation in annotations:
            if annotation["category_id"] not in self.categories:
                raise InputError(f"{file_name}: object of class {annotation['category_id']}, which has no category")
        self._images += 1
        self._arrays.append("images", {"id": self._images, "file_name": file_name,
                                       "height": int(height), "width": int(width)})
        for annotation in annotations:
            self._annotations += 1
            self._arrays.append("annotations", {"id": self._annotations, "image_id": self._images, **annotation})
        return self._images

    def close(self) -> Path:
        head = {"info": {"description": self.description},
                "categories": [{"id": c.id, "name": c.name, "supercategory": ""} for c in self.categories.values()]}
        return self._arrays.close(head)


def panoptic_segments(labels: np.ndarray, instances: Instances, categories: dict[int, Category]):
    """(segment id map (H, W) uint32, segments_info): things as their objects, stuff as one region a class."""
    from scipy import ndimage

    segments = np.zeros(labels.shape, np.uint32)
    info = []
    for obj in instances.objects:
        category = categories.get(obj.class_id)
        if category is None or not category.thing:
            continue
        inside = instances.map == obj.id
        segments[inside] = len(info) + 1
        info.append({"id": len(info) + 1, "category_id": obj.class_id, "area": int(inside.sum()),
                     "bbox": _box(obj.box), "iscrowd": 0})
    for category in categories.values():
        if category.thing:
            continue
        inside = labels == category.id
        if not inside.any():
            continue
        segments[inside] = len(info) + 1
        box = ndimage.find_objects(inside.astype(np.uint8))[0]
        info.append({"id": len(info) + 1, "category_id": category.id, "area": int(inside.sum()),
                     "bbox": _box(box), "iscrowd": 0})
    return segments, info


def segment_ids_to_rgb(segments: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG encoding: id = R + 256 G + 256^2 B."""
    segments = segments.astype(np.uint32)
    return np.stack([segments & 255, (segments >> 8) & 255, (segments >> 16) & 255], -1).astype(np.uint8)


def rgb_to_segment_ids(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


class PanopticWriter:
    """COCO panoptic JSON; the segment PNGs are written by the caller (`segment_ids_to_rgb`)."""

    def __init__(self, path, categories: dict[int, Category]):
        self._arrays = _JsonArrays(path, ("images", "annotations"))
        self.categories = categories
        self._images = 0

    def add(self, file_name: str, png_name: str, shape: tuple[int, int], segments_info: list[dict]) -> int:
        self._images += 1
        self._arrays.append("images", {"id": self._images, "file_name": file_name, "height": int(shape[0]),
                                       "width": int(shape[1])})
        self._arrays.append("annotations", {"image_id": self._images, "file_name": png_name,
                                            "segments_info": segments_info})
        return self._images

    def close(self) -> Path:
        head = {"info": {"description": "seggpt-plugins"},
                "categories": [{"id": c.id, "name": c.name, "isthing": int(c.thing), "supercategory": ""}
                               for c in self.categories.values()]}
        return self._arrays.close(head)


class ReviewTable:
    """One JSON line per image, worst first: sorted by `confidence` (the predicted IoU where it was
    estimated, quality.py), lowest first, so a reviewer starts where the proposals are least likely right."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rows: list[dict] = []

    def add(self, **row) -> None:
        self._rows.append(row)

    def add_prediction(self, path: str, prediction, instances: Instances | None = None, **extra) -> None:
        """The row of one prediction: classes found, objects (when counted) with the lowest object quality
        (`worst_object`, when estimated), its confidence (the predicted IoU, or the mean snap score when
        quality was not estimated) and the snap score."""
        qualities = [o.quality for o in instances.objects if o.quality is not None] if instances is not None else []
        self.add(path=path, classes=[int(c) for c in distinct_values(prediction.labels) if c],
                 instances=len(instances) if instances is not None else None,
                 worst_object=round(float(min(qualities)), 4) if qualities else None,
                 confidence=round(float(prediction.confidence), 4),
                 confidence_is="predicted IoU" if prediction.quality is not None else "mean snap score",
                 snap_score=round(float(prediction.snap_confidence), 4), **extra)

    def close(self) -> Path:
        rows = sorted(self._rows, key=lambda r: (r.get("confidence") is None, r.get("confidence") or 0.0))
        with open(self.path, "w") as file:
            for row in rows:
                file.write(json.dumps(row, default=_plain) + "\n")
        return self.path


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (Path, os.PathLike)):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# ------------------------------------------------------------------------------------- a run's outputs


@dataclass(frozen=True)
class ExportOptions:
    """What a run writes: the kind of map (`output`), the formats, and how objects are found."""

    output: str = "labels"  # labels (class ids) | instances (one id per object) | panoptic
    formats: tuple[str, ...] = ("png",)
    min_area: int = 16  # objects: smaller parts join a neighbour or are dropped
    split_touching: bool = False  # objects: watershed split of touching objects
    review: bool = False  # review.jsonl: one row per image
    names: dict | None = None  # {label id: Category} from --label-names

    def check(self, seg_type: str) -> None:
        """InputError for combinations that cannot work, before any model work."""
        if self.output not in OUTPUTS:
            raise InputError(f"--output must be one of {', '.join(OUTPUTS)}, got {self.output!r}")
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise InputError(f"--format takes {', '.join(FORMATS)}, got {' '.join(self.formats) or 'nothing'}")
        if self.output != "labels" and seg_type != "instance":
            raise InputError(f"--output {self.output} needs objects, which SegGPT paints with --seg-type instance; "
                             "a semantic request gives classes only (use --output labels)")
        if "coco" in self.formats and self.output == "labels":
            raise InputError("--format coco writes objects: use it with --output instances (or panoptic)")
        if "panoptic" in self.formats and self.output != "panoptic":
            raise InputError("--format panoptic writes COCO panoptic: use it with --output panoptic")
        if self.min_area < 0:
            raise InputError(f"--min-area must be >= 0, got {self.min_area}")

    @property
    def objects(self) -> bool:
        return self.output != "labels"

    @property
    def rule(self) -> ObjectRule:
        """How objects are found (instances.ObjectRule): --min-area, --split-touching."""
        return ObjectRule(min_area=self.min_area, split_touching=self.split_touching)


class Exporter:
    """The files of one run and how each prediction is written into them (inside an io.OutputSet).

        exporter = Exporter(out_dir, stems, options)      # stems: output names relative to out_dir
        outputs = OutputSet(exporter.paths(), inputs, overwrite)
        with outputs:
            exporter.open(outputs, categories, top_id)    # top_id: the prompts' largest id (map_dtype)
            exporter.write(i, prediction, source)         # instances=: e.g. tracked through a video
            exporter.close()
    """

    def __init__(self, out_dir, stems: list[str], options: ExportOptions):
        self.out = Path(out_dir)
        self.stems = list(stems)
        self.options = options
        self._coco = self._panoptic = self._review = None
        self._outputs = None
        self.dtype = map_dtype(options.output)  # set by `open`

    def map_path(self, i: int, fmt: str) -> Path:
        suffix = {"labels": "_labels", "instances": "_instances", "panoptic": "_panoptic"}[self.options.output]
        return self.out / f"{self.stems[i]}{suffix}.{'png' if fmt == 'png' else 'tif'}"

    def paths(self) -> list[Path]:
        paths = []
        for i in range(len(self.stems)):
            paths += [self.map_path(i, f) for f in self.options.formats if f in ("png", "tiff")]
            if "panoptic" in self.options.formats and "png" not in self.options.formats:
                paths.append(self.map_path(i, "png"))
        if "coco" in self.options.formats:
            paths.append(self.out / "coco.json")
        if "panoptic" in self.options.formats:
            paths.append(self.out / "panoptic.json")
        if self.options.review:
            paths.append(self.out / "review.jsonl")
        return paths

    def open(self, outputs, categories: dict[int, Category], top_id: int = 0) -> None:
        """Start writing into `outputs`; `top_id`: the largest label id the prompts can give (`map_dtype`)."""
        self._outputs, self.categories = outputs, categories
        self.dtype = map_dtype(self.options.output, top_id)
        if "coco" in self.options.formats:
            self._coco = CocoWriter(outputs.stage(self.out / "coco.json"), categories)
        if "panoptic" in self.options.formats:
            self._panoptic = PanopticWriter(outputs.stage(self.out / "panoptic.json"), categories)
        if self.options.review:
            self._review = ReviewTable(outputs.stage(self.out / "review.jsonl"))

    def instances_of(self, prediction) -> Instances:
        """The objects of a prediction, with their predicted IoU when its quality was estimated."""
        return prediction.objects(self.options.rule)

    def write(self, i: int, prediction, source: str, instances: Instances | None = None, **review) -> np.ndarray:
        """Write target i's maps and entries; `instances` (e.g. tracked through a stack) or found here.
        Returns the map written (labels, object ids or panoptic segment ids), in the run's dtype."""
        if self.options.objects and instances is None:
            instances = self.instances_of(prediction)
        elif instances is not None and all(o.quality is None for o in instances.objects):
            instances = prediction.with_object_quality(instances)  # e.g. tracked: the same objects, new ids
        if self.options.output == "labels":
            picture = prediction.labels
        elif self.options.output == "instances":
            picture = instances.map
        else:
            segments, segments_info = panoptic_segments(prediction.labels, instances, self.categories)
            picture = segments
        top = int(picture.max()) if picture.size else 0
        for fmt in self.options.formats:
            if fmt in ("png", "tiff"):
                check_ids_fit(fmt, top, str(self.map_path(i, fmt)))
        picture = self._in_run_dtype(picture, top, i)
        for fmt in self.options.formats:
            if fmt in ("png", "tiff"):
                path = self.map_path(i, fmt)
                data = segment_ids_to_rgb(picture) if self.options.output == "panoptic" and fmt == "png" else picture
                (self._outputs.write_png if fmt == "png" else self._outputs.write_tiff)(path, data)
        if self._panoptic is not None:
            png = self.map_path(i, "png")
            if "png" not in self.options.formats:
                self._outputs.write_png(png, segment_ids_to_rgb(picture))
            self._panoptic.add(source, str(png.relative_to(self.out)), picture.shape, segments_info)
        if self._coco is not None:
            self._coco.add(coco_file_name(source, self.stems[i]), instances)
        if self._review is not None:
            self._review.add_prediction(source, prediction, instances, **review)
        return picture

    def _in_run_dtype(self, picture: np.ndarray, top: int, i: int) -> np.ndarray:
        """`picture` in the run's dtype; ids past it (over 65535 objects, in a TIFF) widen it for this map and
        the later ones, with a warning."""
        if top > np.iinfo(self.dtype).max:
            wider = map_dtype("labels", top)
            warnings.warn(f"{self.stems[i]}: ids up to {top} need {wider.name}: this map and the later ones are "
                          f"{wider.name}, the earlier ones {self.dtype.name}", stacklevel=3)
            self.dtype = wider
        return picture.astype(self.dtype, copy=False)

    def close(self) -> None:
        for writer in (self._coco, self._panoptic, self._review):
            if writer is not None:
                writer.close()
