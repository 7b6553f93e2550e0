"""Committing a run's predictions: the old values or the new ones, whatever happens (a failure, a kill).

    commit = Commit(dataset, opts, kind, declare=True)   # journal entry + staging folder
    commit.stage(sample_id, staged, meta, confidence, prompt_ids)   # per prediction (PNG + memory)
    # video datasets: Commit(..., frames=True), one key per frame: frame_key(sample_id, frame_number)
    commit.run(codec, targets)                            # the commit (below)
    commit.close()                                        # staging removed (rolled back if not committed)
    recover(dataset)                                      # at the start of every run on the dataset

The commit: (1) every sample's new label AND confidence are written together, as one document per
sample, into a staging collection (the dataset is untouched); (2) the journal entry of the run says
"moving"; (3) one server-side `$merge` moves all of them into the visible fields (one command, one update
per sample: never a label without its confidence); (4) staged mask files are moved into `mask_dir`;
(5) staging documents, folder and journal entry are removed. A run killed before (2) is rolled back by
the next run on the dataset (staged values, staging folder and fields it created are removed); a run
killed after (2) is rolled forward (the merge and the file moves are repeated: both are idempotent).
The journal is a small collection of FiftyOne's database, one document per run, so that concurrent
shard workers never edit a shared document; a run is only recovered once its process is gone.

Frame fields (video datasets) take the same path: frames live in their own collection, one document per
(video, frame number) with a unique index on the pair, and a frame without any field has no document
yet. So a staged frame is (video id, frame number, values), and the move `$merge`s on that pair: an
existing frame document gets the two fields set (nothing else touched), a missing one is inserted.
Still one command, idempotent, never a label without its confidence.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

import numpy as np

from seggpt_plugins.fiftyone.app import present
from seggpt_plugins.fiftyone.fields import SEGMENTATION, adopt, declare_fields, delete_field, frame_field
from seggpt_plugins.fiftyone.options import Options

JOURNAL = "seggpt_fiftyone_journal"  # collection: one document per run whose commit is not finished
PENDING = "seggpt_fiftyone_pending"  # collection: the staged values, one document per sample and run
COMMIT_CHUNK = 256  # samples per write to the staging collection
STALE_SECONDS = 3600  # a run of another machine that gave no sign of life for this long is recovered
HEARTBEAT_SECONDS = 60.0  # how often a run updates its sign of life
PAUSE_ENV = "SEGGPT_FIFTYONE_PAUSE_AT"  # tests: "<step>:<marker file>" sleeps at that step (to be killed)
_ACTIVE: set[str] = set()  # runs of this process whose commit is in progress


def _db():
    from fiftyone.core.odm import get_db_conn

    return get_db_conn()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _process_start(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


def _pause(step: str) -> None:
    """Test hook: with SEGGPT_FIFTYONE_PAUSE_AT=<step>:<file>, write <file> at <step> and wait to be killed."""
    setting = os.environ.get(PAUSE_ENV, "")
    if setting.split(":", 1)[0] == step and ":" in setting:
        import time

        Path(setting.split(":", 1)[1]).write_text(step)
        while True:
            time.sleep(1)


class Staging:
    """Where predictions wait for the commit: PNG label maps named by sample id.

    With mask_dir the staging folder sits inside `mask_dir/<output_field>/` so that the final move is a
    rename on the same file system; otherwise it is a temporary folder. Either way it is named after the
    run, and the journal records it.
    """

    def __init__(self, opts: Options, run_id: str, root: str | None = None):
        if opts.mask_dir:
            self.final = Path(opts.mask_dir, opts.output_field)
            self.root = Path(root) if root else self.final / f".staging-{run_id}"
        else:
            self.final = None
            self.root = Path(root) if root else Path(tempfile.gettempdir(), f"seggpt-fiftyone-{run_id}")

    def create(self) -> None:
        if self.final is not None:
            self.final.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sample_id: str) -> Path:
        return self.root / f"{sample_id}.png"

    def write(self, sample_id: str, arr: np.ndarray) -> None:
        from seggpt_plugins.io import write_png

        write_png(self.path(sample_id), arr, overwrite=True)

    def read(self, sample_id: str) -> np.ndarray:
        from seggpt_plugins.images import read_image

        return read_image(self.path(sample_id), as_mask=True)

    def final_path(self, sample_id: str) -> str | None:
        """Segmentation: where the mask will be (None: inline masks)."""
        return None if self.final is None else str(self.final / f"{sample_id}.png")

    def folder(self, sample_id: str) -> tuple[Path, Path]:
        """Detections: (staged folder to fill with one PNG per instance, its final place)."""
        staged = self.root / sample_id
        staged.mkdir(exist_ok=True)
        return staged, self.final / sample_id

    def publish(self, kind: str) -> None:
        """Move every staged mask (Segmentation) or instance folder (Detections) into place. Idempotent:
        what was moved already is no longer staged."""
        if self.final is None or not self.root.is_dir():
            return
        for entry in sorted(self.root.iterdir()):
            if kind == SEGMENTATION and entry.is_file() and entry.suffix == ".png" and not entry.name.startswith("."):
                os.replace(entry, self.final / entry.name)
            elif kind != SEGMENTATION and entry.is_dir() and ".old-" not in entry.name:
                final = self.final / entry.name
                old = None
                if final.exists():
                    old = self.root / f"{entry.name}.old-{uuid.uuid4().hex[:8]}"
                    os.replace(final, old)
                os.replace(entry, final)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class Commit:
    """One run's staged predictions and their commit (see the module's docstring)."""

    def __init__(self, dataset, opts: Options, kind: str, declare: bool = True, frames: bool = False):
        self.dataset, self.opts, self.kind, self.declare, self.frames = dataset, opts, kind, declare, frames
        self.run_id = uuid.uuid4().hex
        self.staging = Staging(opts, self.run_id)
        self.meta: dict = {}  # per target: what the codec needs besides the staged PNG
        self.confidence: dict[str, float] = {}
        self.used: dict[str, list[str]] = {}  # per target: the prompt samples it was predicted from
        self.moved = False
        self.beat = _now()
        _ACTIVE.add(self.run_id)
        _db()[PENDING].create_index("run")  # idempotent; the move and the clean-up select by run
        _db()[JOURNAL].insert_one({
            "_id": self.run_id, "dataset_id": str(dataset._doc.id), "dataset_name": dataset.name,
            "output_field": opts.output_field, "confidence_field": opts.confidence_field, "kind": kind,
            "mask_dir": opts.mask_dir, "staging": str(self.staging.root), "state": "predicting", "created": [],
            "frames": frames,
            "host": socket.gethostname(), "pid": os.getpid(), "pid_started": _process_start(os.getpid()),
            "heartbeat": self.beat})
        self.staging.create()

    def heartbeat(self) -> None:
        """A sign of life in the journal (at most one write a minute), for runs on other machines."""
        now = _now()
        if (now - self.beat).total_seconds() >= HEARTBEAT_SECONDS:
            self.beat = now
            _db()[JOURNAL].update_one({"_id": self.run_id}, {"$set": {"heartbeat": now}})

    def stage(self, sample_id: str, staged: np.ndarray, meta, confidence: float, used: list[str]) -> None:
        """sample_id: the sample's id, or `frame_key(video id, frame number)` for frames."""
        self.staging.write(sample_id, staged)
        self.meta[sample_id] = meta
        self.confidence[sample_id] = confidence
        self.used[sample_id] = used

    def run(self, codec, targets: list[str]) -> None:
        """Stage the values in the database, then move them into place (see the module's docstring)."""
        from bson import ObjectId

        dataset, opts, db = self.dataset, self.opts, _db()
        journal = db[JOURNAL]
        missing = [f for f in (opts.output_field, opts.confidence_field) if not dataset.has_field(f)]
        journal.update_one({"_id": self.run_id}, {"$set": {"state": "staging", "created": missing,
                                                           "heartbeat": _now()}})
        declare_fields(dataset, opts, self.kind)
        label_field = dataset.get_field(opts.output_field)
        output, confidence = _stored_name(opts.output_field), _stored_name(opts.confidence_field)
        for start in range(0, len(targets), COMMIT_CHUNK):
            docs = []
            for key in targets[start:start + COMMIT_CHUNK]:
                label = self._label(codec, key)
                label["prompt_ids"] = self.used[key]
                sample_id, frame = _parse_key(key) if self.frames else (key, None)
                doc = {"run": self.run_id, "sample": ObjectId(sample_id),
                       "values": {output: label_field.to_mongo(label), confidence: float(self.confidence[key])}}
                if frame is not None:
                    doc["frame"] = frame
                docs.append(doc)
            db[PENDING].insert_many(docs, ordered=False)
            _pause("staging")
        if self.declare:
            _declare_targets(dataset, opts, self.kind)
        journal.update_one({"_id": self.run_id}, {"$set": {"state": "moving", "heartbeat": _now()}})
        self.moved = True
        _move(dataset, self.run_id, self.frames)
        _pause("moved")
        self.staging.publish(self.kind)
        _finish(self.run_id)
        _reload(dataset)
        if self.declare and opts.overwrite_field:  # written by this operator from now on
            adopt(dataset, (opts.output_field, opts.confidence_field))
        if self.declare:
            present(dataset, opts, self.kind)

    def _label(self, codec, sample_id: str):
        staged = self.staging.read(sample_id)
        if codec.kind == SEGMENTATION:
            return codec.label(staged, self.meta[sample_id], self.staging.final_path(sample_id))
        if self.staging.final is None:
            return codec.label(staged, self.meta[sample_id], None)
        folder, final = self.staging.folder(sample_id)
        return codec.label(staged, self.meta[sample_id], str(folder), str(final))

    def close(self) -> None:
        """After the run (committed or not): a commit that did not reach its move is rolled back."""
        try:
            if not self.moved:
                _roll_back(self.dataset, _db()[JOURNAL].find_one({"_id": self.run_id}) or {"_id": self.run_id})
        except Exception:  # the original error matters more; the next run recovers what is left
            pass
        finally:
            _ACTIVE.discard(self.run_id)


def _declare_targets(dataset, opts: Options, kind: str) -> None:
    """Carry the source field's mask_targets (Segmentation) or classes (Detections) over to the output.
    (The dicts are replaced, not edited in place: FiftyOne cannot save an in-place edit under a
    'frames.<name>' key.)"""
    if kind == SEGMENTATION:
        targets = dataset.mask_targets.get(opts.label_field)
        if targets and dataset.mask_targets.get(opts.output_field) != targets:
            dataset.mask_targets = {**dataset.mask_targets, opts.output_field: dict(targets)}
            dataset.save()
    else:
        classes = dataset.classes.get(opts.label_field)
        if classes and dataset.classes.get(opts.output_field) != classes:
            dataset.classes = {**dataset.classes, opts.output_field: list(classes)}
            dataset.save()


def declare_output(dataset, opts: Options, kind: str) -> None:
    """Declare the output fields (marked as this operator's) and their targets once, before shards run
    concurrently (so that no two workers edit the dataset's schema at the same time), and how the App
    shows them (`app.present`: the confidence index and colours)."""
    declare_fields(dataset, opts, kind)
    if opts.overwrite_field:
        adopt(dataset, (opts.output_field, opts.confidence_field))
    _declare_targets(dataset, opts, kind)
    present(dataset, opts, kind)


# ------------------------------------------------------------------------------------------ the steps


def frame_key(sample_id: str, frame_number: int) -> str:
    """The staging key (and file name) of one frame of a video sample."""
    return f"{sample_id}-{int(frame_number):06d}"


def _parse_key(key: str) -> tuple[str, int]:
    sample_id, frame = key.rsplit("-", 1)
    return sample_id, int(frame)


def _stored_name(path: str) -> str:
    """The name a field has in its documents: 'frames.x' is 'x' in the frame documents."""
    return frame_field(path) or path


def _move(dataset, run_id: str, frames: bool = False) -> None:
    """One server-side command: every staged (label, confidence) of the run into the sample documents (or
    the frame documents, see the module's docstring)."""
    if frames:
        _move_frames(dataset, run_id)
        return
    _db()[PENDING].aggregate([
        {"$match": {"run": run_id}},
        {"$replaceRoot": {"newRoot": {"$mergeObjects": [{"_id": "$sample", "last_modified_at": "$$NOW"},
                                                        "$values"]}}},
        {"$merge": {"into": dataset._sample_collection_name, "on": "_id", "whenMatched": "merge",
                    "whenNotMatched": "discard"}},
    ])


def _move_frames(dataset, run_id: str) -> None:
    """The frames' `$merge`: on (video, frame number), the staged fields set on an existing frame document,
    a new frame document inserted where there is none."""
    db = _db()
    staged = db[PENDING].find_one({"run": run_id}, {"values": 1})
    if staged is None:
        return
    assign = {name: f"$$new.{name}" for name in staged["values"]}
    db[PENDING].aggregate([
        {"$match": {"run": run_id}},
        {"$replaceRoot": {"newRoot": {"$mergeObjects": [
            {"_sample_id": "$sample", "frame_number": "$frame", "_dataset_id": dataset._doc.id,
             "created_at": "$$NOW", "last_modified_at": "$$NOW"}, "$values"]}}},
        {"$merge": {"into": dataset._frame_collection_name, "on": ["_sample_id", "frame_number"],
                    "whenMatched": [{"$set": {**assign, "last_modified_at": "$$new.last_modified_at"}}],
                    "whenNotMatched": "insert"}},
    ])


def _finish(run_id: str) -> None:
    db = _db()
    entry = db[JOURNAL].find_one({"_id": run_id})
    db[PENDING].delete_many({"run": run_id})
    if entry and entry.get("staging"):
        shutil.rmtree(entry["staging"], ignore_errors=True)
    db[JOURNAL].delete_one({"_id": run_id})


def _roll_back(dataset, entry: dict) -> None:
    """Undo a commit that did not reach its move: staged values and files, and the fields it created."""
    db = _db()
    db[PENDING].delete_many({"run": entry["_id"]})
    if entry.get("staging"):
        shutil.rmtree(entry["staging"], ignore_errors=True)
    if dataset is not None:
        dataset.reload()
        for field in entry.get("created", []):
            if dataset.has_field(field) and not dataset.count(field):
                delete_field(dataset, field)
    db[JOURNAL].delete_one({"_id": entry["_id"]})


def _roll_forward(dataset, entry: dict) -> None:
    """Finish a commit that was killed during or after its move (both steps are idempotent)."""
    if dataset is not None:
        _move(dataset, entry["_id"], bool(entry.get("frames")))
        if entry.get("mask_dir"):
            staging = Staging(Options(label_field="", output_field=entry["output_field"], mask_dir=entry["mask_dir"]),
                              entry["_id"], root=entry["staging"])
            staging.publish(entry.get("kind", SEGMENTATION))
    _finish(entry["_id"])


def _reload(dataset) -> None:
    try:  # samples already in memory see the values written by the merge
        dataset._reload_docs(hard=True)
    except Exception:
        pass


def _alive(entry: dict) -> bool:
    """Whether the run of a journal entry may still be going on (then it is left alone)."""
    if entry["_id"] in _ACTIVE:
        return True
    if entry.get("host") == socket.gethostname():
        pid = entry.get("pid")
        if pid == os.getpid():
            return False  # this process, but not an active run: a run that failed to clean up
        started = _process_start(pid) if pid else None
        return started is not None and (entry.get("pid_started") is None
                                        or abs(started - entry["pid_started"]) < 1.0)
    beat = entry.get("heartbeat")
    if beat is None:
        return False
    if beat.tzinfo is None:
        beat = beat.replace(tzinfo=datetime.timezone.utc)
    return (_now() - beat).total_seconds() < STALE_SECONDS


def _dataset_exists(db, dataset_id) -> bool:
    from bson import ObjectId

    try:
        return db["datasets"].count_documents({"_id": ObjectId(dataset_id)}, limit=1) > 0
    except Exception:
        return True  # when in doubt, leave it


def recover(dataset, opts: Options | None = None) -> list[str]:
    """Finish or undo the commits of runs on this dataset that were killed, and remove staging folders
    under `opts.mask_dir/<output_field>` that belong to no unfinished run; returns what was done."""
    db = _db()
    done = []
    for entry in list(db[JOURNAL].find({"dataset_id": str(dataset._doc.id)})):
        if _alive(entry):
            continue
        if entry.get("state") == "moving":
            _roll_forward(dataset, entry)
            done.append(f"finished the commit of run {entry['_id']} to '{entry.get('output_field')}'")
        else:
            _roll_back(dataset, entry)
            done.append(f"undid the unfinished commit of run {entry['_id']} to '{entry.get('output_field')}'")
    for entry in list(db[JOURNAL].find({"dataset_id": {"$ne": str(dataset._doc.id)}})):
        if not _alive(entry) and not _dataset_exists(db, entry.get("dataset_id")):
            _roll_back(None, entry)  # the dataset was deleted: only the staged values and files are left
    if opts is not None and opts.mask_dir:
        final = Path(opts.mask_dir, opts.output_field)
        known = {str(e.get("staging")) for e in db[JOURNAL].find({}, {"staging": 1})}
        for folder in (final.glob(".staging-*") if final.is_dir() else []):
            if folder.is_dir() and str(folder) not in known:
                shutil.rmtree(folder, ignore_errors=True)
                done.append(f"removed the stale staging folder {folder}")
    if done:
        _reload(dataset)
    return done
