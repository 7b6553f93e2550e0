"""SegGPTPredictor: the model and the prepared prompts held once, applied to batches of inputs.

The prediction stage of both engines, and a callable class for anyone's Ray Data pipeline:

    ds = ray.data.read_binary_files("s3://bucket/images/", include_paths=True)
    ds = ds.map_batches(SegGPTPredictor, fn_constructor_kwargs=dict(prompts=[("ex.png", "ex_mask.png")]),
                        compute=ray.data.ActorPoolStrategy(size=4), num_gpus=1, batch_size=8)

A batch is a dict of columns (numpy arrays): `bytes` (encoded image files, as `read_binary_files`
gives) or `image` (decoded arrays, as `read_images` gives), and `path`; other columns pass through.
It returns one row per input: path, status ("done" or "failed"), reason (why it failed), labels (the
label map, or the instance map with output="instances"; empty when failed), classes, instances (object
count; -1 when not counted), confidence (Prediction.confidence; NaN when failed), model, prompts (the
examples this input was shown) and annotations (its COCO annotations as JSON, with output="instances").
An input that cannot be decoded or segmented is a failed row, never an exception.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import PurePosixPath

import numpy as np

from ..errors import InputError
from ..export import coco_annotations
from ..images import TIFF_SUFFIXES, _check_pixels, decode_image, to_mask, to_rgb8
from ..instances import ObjectRule
from ..prompts import PromptPool
from ..runner import Runner, Target
from ..vocabulary import AUTO_MODEL
from .sources import read_bytes

STATUS_DONE, STATUS_FAILED = "done", "failed"
OUTPUT_COLUMNS = ("path", "status", "reason", "labels", "classes", "instances", "confidence", "model", "prompts",
                  "annotations")


def decode(data: bytes, name: str, as_mask: bool = False) -> np.ndarray:
    """Image file bytes -> array, as `images.read_image` reads the file (TIFFs through tifffile)."""
    if PurePosixPath(name).suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        try:
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                series = tif.series[0]
                _check_pixels(tuple(series.shape[-3:-1] if series.shape[-1] in (3, 4) else series.shape[-2:]), name)
                return series.asarray()
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{name}: not a readable TIFF image ({exc})") from None
    try:
        return decode_image(data, name=name, as_mask=as_mask)
    except InputError as exc:  # the same words for the same file, in any process: no buffer addresses
        raise InputError(re.sub(r" ?<[^<>]* object at 0x[0-9a-fA-F]+>", "", str(exc))) from None


def read_pair(image: str, mask: str) -> tuple[np.ndarray, np.ndarray]:
    """An example (image array, label mask) from two files or URLs."""
    try:
        image_data, mask_data = read_bytes(image), read_bytes(mask)
    except OSError as exc:
        raise InputError(f"--prompt {image} {mask}: cannot be read ({exc})") from None
    return decode(image_data, image), to_mask(decode(mask_data, mask, as_mask=True), name=f"--prompt {image} {mask}")


class SegGPTPredictor:
    """SegGPT on batches of inputs, model and prompts loaded once (per Ray actor, or per process).

    prompts: example (image, mask) file pairs (local paths or URLs); tuned_prompts: .safetensors files.
    most_similar: show each target only the k examples most alike it (prompts.PromptPool, runner.Runner).
    output: "labels" (class ids) or "instances" (one id per object, with COCO annotations).
    example_ids: what the example masks' ids mean (example_ids.py).
    The other arguments are those of SegGPT.from_pretrained (model, device, dtype, quantize, threads: the
    model comes from the process's cache, model_cache.get_model) and SegGPT.iter_segment. Each batch goes
    through the core's one loop (runner.Runner): an input that cannot be read or segmented fails alone.
    """

    def __init__(self, prompts=(), tuned_prompts=(), *, model: str = AUTO_MODEL, device=None, dtype=None,
                 quantize: str | None = None, threads: int | None = None, most_similar: int | None = None,
                 batch_size: int = 8, seg_type: str = "instance", intensity_range=None, ensemble: str = "feature",
                 tile=None, halo: int = 32, quality: str | None = "fast", output: str = "labels", min_area: int = 16,
                 split_touching: bool = False, example_ids: str = "auto"):
        from ..loading import set_cpu_threads
        from ..model_cache import get_model

        pairs = [read_pair(image, mask) for image, mask in prompts]
        self.names = [str(image) for image, _ in prompts] + [str(t) for t in tuned_prompts]
        if not self.names:
            raise InputError("give at least one example (prompts=[(image, mask)]) or tuned prompt")
        if most_similar is not None and (tuned_prompts or most_similar < 1):
            raise InputError("most_similar chooses among example pairs: a whole number >= 1, without tuned prompts")
        # the process's one model (model_cache.get_model): a driver that loaded it already does not load it again
        self.model = get_model(model, device, dtype, quantize)
        if threads is not None and self.model.device.type == "cpu":
            set_cpu_threads(threads)
        self.output = output
        if most_similar:
            examples = PromptPool.from_pairs(self.names, [(to_rgb8(i, intensity_range, name=n), m)
                                                          for (i, m), n in zip(pairs, self.names)])
        else:
            examples = self.model.prepare_prompts([i for i, _ in pairs] + list(tuned_prompts), [m for _, m in pairs],
                                                  intensity_range, ensemble=ensemble, tile=tile,
                                                  example_ids=example_ids)
        self.runner = Runner(self.model, examples, most_similar=most_similar, batch_size=batch_size,
                             seg_type=seg_type, intensity_range=intensity_range, ensemble=ensemble, tile=tile,
                             halo=halo, quality=quality, example_ids=example_ids,
                             objects=ObjectRule(min_area, split_touching) if output == "instances" else None)

    def __call__(self, batch: dict) -> dict:
        paths = [str(p) for p in batch.get("path", range(len(next(iter(batch.values()), []))))]
        if not paths:
            return {key: np.asarray([], dtype=object) for key in OUTPUT_COLUMNS}
        errors = batch.get("error")
        rows: list[dict | None] = [None] * len(paths)
        targets = []
        for k, path in enumerate(paths):
            if errors is not None and errors[k]:
                rows[k] = self._failed(path, str(errors[k]))
            elif "image" in batch:
                targets.append(Target(k, batch["image"][k], name=path))
            else:
                targets.append(Target(k, lambda data=batch["bytes"][k], path=path: decode(bytes(data), path), name=path))
        for result in self.runner.run(targets):
            k = result.key
            rows[k] = self._row(paths[k], result) if result.ok else self._failed(paths[k], result.error)
        out = {key: np.asarray([row[key] for row in rows]) for key in rows[0] if key != "labels"}
        out["labels"] = _ragged([row["labels"] for row in rows])
        for key, column in batch.items():  # pass through the caller's other columns
            if key not in out and key not in ("bytes", "image", "error"):
                out[key] = column
        return out

    def _row(self, path: str, result) -> dict:
        prediction, instances = result.prediction, result.instances
        return dict(path=path, status=STATUS_DONE, reason="",
                    labels=instances.map if instances is not None else prediction.labels,
                    classes=json.dumps(sorted(int(c) for c in np.unique(prediction.labels) if c)),
                    instances=len(instances) if instances is not None else -1,
                    confidence=round(float(prediction.confidence), 4), model=self.model.source,
                    prompts=json.dumps(list(result.prompts) or self.names),
                    annotations=json.dumps(coco_annotations(instances)) if instances is not None else "")

    def _failed(self, path: str, reason: str) -> dict:
        return dict(path=path, status=STATUS_FAILED, reason=reason, labels=np.zeros((0, 0), np.uint8),
                    classes="[]", instances=-1, confidence=math.nan, model=self.model.source, prompts="[]",
                    annotations="")


def _ragged(maps: list[np.ndarray]) -> np.ndarray:
    """Label maps of different sizes as one object column, in one dtype (the widest of the batch)."""
    dtype = np.result_type(*[m.dtype for m in maps if m.size] or [np.uint8])
    column = np.empty(len(maps), dtype=object)
    for k, labels in enumerate(maps):
        column[k] = labels.astype(dtype, copy=False)
    return column
