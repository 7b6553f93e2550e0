"""The stages around the predictor, the same for both engines: fetch inputs, write outputs, merge.

Every input gets a record, `.seggpt-run/records/<stem>.json` in the output folder, written (whole,
see storage.Store) after its label map: the record is the input's "done" marker and its shard of the
run-wide files. So a run killed at any point and started again skips exactly the inputs whose record
says done, redoes the rest (a redone input replaces its own files), and the merge at the end builds
coco.json and review.parquet from one record per input, in input order: none lost, none twice.

    fetch(group, out)              # {uri, stem} -> {path, stem, bytes, error, done}; nothing when all done
    write_results(batch, out, ...) # predictor rows -> label maps + records; -> {path, status}
    merge(items, out, ...)         # records -> coco.json, review.parquet; -> counts
"""

from __future__ import annotations

import io
import json
import math
import tempfile
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..export import CocoWriter, coco_file_name
from .predictor import STATUS_DONE, STATUS_FAILED
from .sources import read_bytes
from .storage import Store

RUN_FOLDER = ".seggpt-run"
RECORDS = f"{RUN_FOLDER}/records"
SETTINGS = f"{RUN_FOLDER}/run.json"
REVIEW_FILE, COCO_FILE = "review.parquet", "coco.json"
MAP_SUFFIXES = {"labels": "_labels", "instances": "_instances"}
REVIEW_ROWS_PER_GROUP = 8192


def record_name(stem: str, clash_of: str | None = None) -> str:
    """Where an input's record is; `clash_of`: the input whose output name another input already has
    (its failed record goes beside, so that it never replaces the other's)."""
    if clash_of is None:
        return f"{RECORDS}/{stem}.json"
    import hashlib

    return f"{RECORDS}/{stem}.clash-{hashlib.sha1(clash_of.encode()).hexdigest()[:12]}.json"


def map_name(stem: str, output: str, fmt: str) -> str:
    """A label map's path in the output folder (as export.Exporter names them)."""
    return f"{stem}{MAP_SUFFIXES[output]}.{'png' if fmt == 'png' else 'tif'}"


def encode_map(labels: np.ndarray, fmt: str) -> bytes:
    """A label map as PNG (8/16-bit, as io.write_png writes it) or zlib TIFF bytes."""
    from ..export import check_ids_fit
    from ..images import label_dtype

    top = int(labels.max()) if labels.size else 0
    check_ids_fit(fmt, top, "a label map")
    buffer = io.BytesIO()
    if fmt == "png":
        from PIL import Image

        if labels.dtype not in (np.uint8, np.uint16):
            labels = labels.astype(label_dtype(top))
        Image.fromarray(labels).save(buffer, format="PNG")
    else:
        import tifffile

        tifffile.imwrite(buffer, labels, compression="zlib")
    return buffer.getvalue()


def fetch(batch: dict, out: str) -> dict:
    """One group of inputs ({uri, stem} columns: one model batch) with their bytes, or why they could not
    be read: {path, stem, bytes, error, done}. A group whose inputs are all done is left out (empty
    columns); otherwise all of it is read again, so that the model sees the very batch of the first try
    (results can depend on the batch on some hardware), and `done` marks the inputs not to write again.
    An output name already taken by another input is an error."""
    store = Store(out)
    rows = {"path": [], "stem": [], "bytes": [], "error": [], "done": []}
    for uri, stem in zip(batch["uri"], batch["stem"]):
        uri, stem = str(uri), str(stem)
        record = _load_record(store, stem)
        error = ""
        if record is not None and record.get("path") != uri:
            error = f"{uri}: its output name {stem!r} is taken by another input ({record.get('path')})"
        rows["done"].append(record is not None and record.get("path") == uri and record.get("status") == STATUS_DONE)
        rows["path"].append(uri)
        rows["stem"].append(stem)
        rows["error"].append(error)
    if all(rows["done"]):
        return {key: np.asarray([], dtype=object) for key in rows}
    for uri, error in zip(rows["path"], rows["error"]):
        data = b""
        if not error:
            try:
                data = read_bytes(uri)
            except OSError as exc:
                rows["error"][len(rows["bytes"])] = f"{uri}: cannot be read ({exc.strerror or exc})"
        rows["bytes"].append(data)
    return {key: np.asarray(value, dtype=bool if key == "done" else object) for key, value in rows.items()}


def group_done(group: dict, store: Store) -> bool:
    """Whether every input of a group ({uri, stem} columns) has its `done` record: a resumed run lists only
    the other groups (and with none left, starts no model at all)."""
    for uri, stem in zip(group["uri"], group["stem"]):
        record = _load_record(store, str(stem))
        if record is None or record.get("path") != str(uri) or record.get("status") != STATUS_DONE:
            return False
    return True


def write_results(batch: dict, out: str, output: str, formats) -> dict:
    """Write each predicted row's label map(s), then its record (rows marked `done` by `fetch` were
    written before and are left alone); returns {path, status} of the rows written."""
    store = Store(out)
    paths, statuses = [], []
    for k, path in enumerate(batch["path"]):
        if "done" in batch and batch["done"][k]:
            continue
        stem = str(batch["stem"][k])
        record = {key: _plain(batch[key][k]) for key in ("path", "status", "reason", "instances", "confidence",
                                                          "model")}
        record.update(stem=stem, classes=json.loads(str(batch["classes"][k])),
                      prompts=json.loads(str(batch["prompts"][k])))
        owner = _load_record(store, stem)
        clash = owner is not None and owner.get("path") != record["path"]
        if clash and record["status"] == STATUS_DONE:  # e.g. a.png and a.tif of one folder, in one group
            record.update(status=STATUS_FAILED, confidence=math.nan,
                          reason=f"{path}: its output name {stem!r} is taken by another input ({owner.get('path')})")
        if record["status"] == STATUS_DONE:
            labels = batch["labels"][k]
            try:
                for fmt in formats:
                    if fmt in ("png", "tiff"):
                        store.put(map_name(stem, output, fmt), encode_map(labels, fmt))
            except InputError as exc:
                record.update(status=STATUS_FAILED, reason=f"{path}: {exc}", confidence=math.nan)
            else:
                record.update(height=int(labels.shape[0]), width=int(labels.shape[1]),
                              annotations=json.loads(str(batch["annotations"][k]) or "[]"))
        store.put(record_name(stem, record["path"] if clash else None), json.dumps(record, allow_nan=True).encode())
        paths.append(str(path))
        statuses.append(record["status"])
    return {"path": np.asarray(paths, dtype=object), "status": np.asarray(statuses, dtype=object)}


def _load_record(store: Store, stem: str, clash_of: str | None = None) -> dict | None:
    data = store.get(record_name(stem, clash_of))
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:  # cannot happen with whole-file writes; treat as not done
        return None


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


FAILURES_LISTED = 50  # failed inputs a run names at its end (all of them are rows of review.parquet)


def merge(items, out: str, categories: dict, write_coco: bool) -> dict:
    """review.parquet (one row per input) and, with `write_coco`, coco.json (one image per done input)
    from the records of `items`, in their order; returns {"inputs", "done", "failed", "missing"} counts and
    "failures": (path, reason) of the first FAILURES_LISTED failed inputs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = Store(out)
    schema = pa.schema([("path", pa.string()), ("stem", pa.string()), ("status", pa.string()),
                        ("reason", pa.string()), ("classes", pa.list_(pa.int64())), ("instances", pa.int64()),
                        ("confidence", pa.float64()), ("model", pa.string()), ("prompts", pa.list_(pa.string()))])
    counts = {"inputs": 0, STATUS_DONE: 0, STATUS_FAILED: 0, "missing": 0, "failures": []}
    with tempfile.TemporaryDirectory(prefix="seggpt-merge-") as tmp:
        review_path = Path(tmp) / REVIEW_FILE
        coco = CocoWriter(Path(tmp) / COCO_FILE, categories) if write_coco else None
        rows: list[dict] = []
        with pq.ParquetWriter(review_path, schema) as review:
            for item in items:
                counts["inputs"] += 1
                record = _load_record(store, item.stem)
                if record is not None and record.get("path") != item.uri:
                    record = _load_record(store, item.stem, clash_of=item.uri)
                if record is None or record.get("path") != item.uri:
                    counts["missing"] += 1
                    continue
                counts[record["status"]] += 1
                done = record["status"] == STATUS_DONE
                if not done and len(counts["failures"]) < FAILURES_LISTED:
                    counts["failures"].append((record["path"], record["reason"] or "failed"))
                rows.append(dict(path=record["path"], stem=item.stem, status=record["status"],
                                 reason=record["reason"] or None, classes=record["classes"],
                                 instances=record["instances"] if record["instances"] >= 0 else None,
                                 confidence=record["confidence"] if done else None, model=record["model"],
                                 prompts=record["prompts"]))
                if coco is not None and done:
                    coco.add_encoded(coco_file_name(record["path"], item.stem), record["height"], record["width"],
                                     record.get("annotations", []))
                if len(rows) == REVIEW_ROWS_PER_GROUP:
                    review.write_table(pa.Table.from_pylist(rows, schema))
                    rows.clear()
            if rows:
                review.write_table(pa.Table.from_pylist(rows, schema))
        store.put_file(REVIEW_FILE, review_path)
        if coco is not None:
            store.put_file(COCO_FILE, coco.close())
    return counts
