"""`seggpt labelstudio predict`: pre-annotate a whole Label Studio project outside Label Studio.

"Retrieve predictions" is one synchronous /predict call, cut after Label Studio's ML_TIMEOUT_PREDICT; for
big projects Label Studio's maintainers advise computing predictions outside and importing them. This does
that with the backend's own parts and the core's scale pipeline:

    check      Label Studio answers, the key works, the project exists, its config has a brush/polygon
               control, it has annotated tasks (one line each, exit 2, before any model work);
    prompts    the annotated tasks as (image, mask) files (references.py, media.py, labeling.py);
    targets    the tasks with no annotation and no prediction of this name, downloaded;
    run        seggpt_plugins.scale.run over a manifest of them (local or Ray), in a working folder;
    post       each image's objects (the run's instance map and records: the core's objects with their
               own confidences) as the regions /predict would give (labeling.prediction_to_results),
               imported in batches with the prediction's confidence, named as `serve` names them (the
               project's model connection's Name, else the backend's version); then this backend's
               predictions of older versions on those tasks are deleted (unless asked to keep them).

The project settings are the extra params of the project's model connection, read from Label Studio
(or --extra-params). Every stage shows its progress on stderr.

The working folder is keyed by the backend's version (weights, references, project settings, config): a
killed run started again resumes where it stopped, and tasks already posted are skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from seggpt_plugins.io import atomic_write, write_png

from .labeling import ConfigError, View, annotation_to_mask, prediction_to_results
from .media import MediaError
from .params import RequestError

log = logging.getLogger("seggpt_plugins.labelstudio")

POST_BATCH = 100  # predictions per import request
TASK_PAGE = 100


class BulkError(ValueError):
    """A bad input found before any model work (the message is the one line the command prints)."""


@dataclass
class BulkSummary:
    project: int
    model_version: str = ""  # the name the predictions carry
    version: str = ""  # the backend's version (weights, references, settings): the working folder's name
    seen: int = 0  # tasks of the project
    references: int = 0  # annotated tasks (the prompts)
    predicted: int = 0  # predictions posted by this run
    segmented: int = 0  # images this run segmented (the others were done by an earlier, killed run)
    skipped: int = 0  # tasks that already had a prediction of this name
    failed: int = 0
    removed: int = 0  # this backend's older predictions deleted (of other versions)
    reasons: list = field(default_factory=list)  # (task id, why), for the failed ones
    work: str = ""

    def line(self) -> str:
        return (f"project {self.project}: {self.seen} tasks seen, {self.predicted} predicted now, {self.skipped} "
                f"skipped (already predicted by {self.model_version}), {self.failed} failed; "
                f"{self.references} annotated task(s) as prompts, {self.segmented} image(s) segmented by this run"
                + (f", {self.removed} older prediction(s) of this backend removed" if self.removed else ""))


def _field(obj, name, default=None):
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def _api_error(exc: Exception, url: str, project_id: int) -> BulkError:
    """One line for what the first API calls can meet: no server, a refused key, no such project."""
    status = getattr(exc, "status_code", None)
    if status in (401, 403):
        return BulkError(f"Label Studio at {url} refused the API key (HTTP {status}): set LABEL_STUDIO_API_KEY to "
                         "an access token of that server (Account & Settings: legacy token or personal access token)")
    if status == 404:
        return BulkError(f"project {project_id} does not exist in Label Studio at {url} (or this key cannot see it)")
    if status is not None:
        return BulkError(f"Label Studio at {url} answered HTTP {status} for project {project_id}")
    return BulkError(f"cannot reach Label Studio at {url} ({type(exc).__name__}: {str(exc)[:200]}); check "
                     "--label-studio-url / LABEL_STUDIO_URL and that the server is up")


class ProjectPredictor:
    """One project's bulk pre-annotation. `check()` does everything that can fail cheaply; `run()` the rest."""

    def __init__(self, settings, project_id: int, *, work: str | None = None, engine: str = "local",
                 ray_address: str | None = None, actors: int = 1, gpus_per_actor: float = 0,
                 cpus_per_actor: float = 1, threads: int | None = None, progress: bool = True,
                 post_batch: int = POST_BATCH, extra_params=None, keep_old_predictions: bool | None = None,
                 say=None):
        """extra_params: the project settings to use (a JSON object, as a model connection's extra params);
        None: the project's connection's, read from Label Studio. keep_old_predictions: None: as the params say.
        say: where the command's notes go (one line each; default: the log)."""
        self.settings = settings
        self.explicit_params = extra_params
        self.keep_old = keep_old_predictions
        self.say = say or (lambda line: log.warning("%s", line))
        self.project_id = int(project_id)
        self.work_root = work
        self.run_options = dict(engine=engine, ray_address=ray_address, actors=actors, gpus_per_actor=gpus_per_actor,
                                cpus_per_actor=cpus_per_actor, threads=threads)
        self.progress = progress
        self.post_batch = max(1, int(post_batch))
        self.summary = BulkSummary(self.project_id)

    # ------------------------------------------------------------------------------------------ check

    def check(self) -> None:
        """Label Studio, the key, the project, its config and its annotated tasks; BulkError otherwise."""
        from label_studio_sdk import LabelStudio

        from .backend import SegGPTBackend
        from .services import Services

        url, key = self.settings.label_studio_url, self.settings.api_key
        if not url or not key:
            raise BulkError("set LABEL_STUDIO_URL (or --label-studio-url) and LABEL_STUDIO_API_KEY: predictions are "
                            "read from and posted to that Label Studio")
        url = url.rstrip("/")
        if self.project_id < 1:
            raise BulkError(f"--project must be a project id (a whole number >= 1), got {self.project_id}")
        self.client = LabelStudio(base_url=url, api_key=key, timeout=60)
        try:
            project = self.client.projects.get(id=self.project_id, request_options={"max_retries": 0, "timeout": 30})
        except Exception as exc:  # the SDK's ApiError (HTTP status) or httpx's transport errors
            raise _api_error(exc, url, self.project_id) from None
        # The version needs the weights' fingerprint, so the driver loads the model: with the local engine it
        # is the very model the run uses (the process's cache); with Ray the driver never holds a GPU model.
        local = self.run_options["engine"] == "local"
        self.services = Services(self.settings if local else dataclasses.replace(self.settings, device="cpu"))
        record = self.services.state.get(self.project_id)
        self.connection = self._connection(record.name)
        params = self._params(record)
        try:
            self.backend = SegGPTBackend(self.project_id, project.label_config or "", self.services, params=params)
        except ConfigError as exc:
            raise BulkError(f"project {self.project_id}: {exc}") from None
        except RequestError as exc:
            raise BulkError(f"project {self.project_id}: {exc}") from None
        if self.keep_old is None:
            self.keep_old = bool(params.get("keep_old_predictions", False))
        try:
            refs = self.services.store.list_annotated(self.project_id, url, key, self.backend.reference_task_ids)
        except Exception as exc:
            raise _api_error(exc, url, self.project_id) from None
        self.refs = self.backend.chosen(sorted(refs.values(), key=lambda r: r.task_id))
        if not self.refs and self.backend.ground_truth_only:
            raise BulkError(f"project {self.project_id} has no annotation marked ground truth, and its extra params "
                            "say references: ground_truth: mark the annotations to learn from as ground truth")
        if not self.refs:
            raise BulkError(f"project {self.project_id} has no annotated task: annotate at least one task with brush "
                            "or polygon regions (the examples SegGPT learns from), then run this again")
        self.summary.references = len(self.refs)
        self.fetcher = self.services.fetcher_for(self.services.state.get(self.project_id))

    # -------------------------------------------------------------------------------------------- run

    def run(self) -> BulkSummary:
        self._load_model()
        version = self.summary.version = self.backend.model_version(self.refs)
        name = self.summary.model_version = self._name(version)
        tasks = self._tasks()
        self.summary.seen = len(tasks)
        predictions = self._predictions()
        done = {task_id for task_id, named in predictions.items() if name in named.values()}
        annotated = {r.task_id for r in self.refs}
        targets = []
        for task in tasks:
            task_id = int(_field(task, "id"))
            if task_id in annotated or (_field(task, "total_annotations", 0) or 0) > 0:
                continue
            if task_id in done:
                self.summary.skipped += 1
            else:
                targets.append(task)
        self.work = self._work_folder(version)
        self.summary.work = self.work
        posted = set()
        if targets:
            outcomes = self._segment(targets)
            posted = self._post(targets, outcomes, name)
        if not self.keep_old:
            self._remove_older(predictions, done | posted, name)
        return self.summary

    def _connection(self, known_name: str | None) -> dict | None:
        """The project's model connection to this backend, as Label Studio lists it (title, url, extra_params,
        model_version): the one named as `serve` named it (kept in the state directory), else the one whose
        model version is its own Name (as `serve` answers /setup). None: none, or Label Studio cannot say.

        Read from /api/projects/<id>/model-versions (the connections with MLBackendSerializer's fields, as
        /api/ml?project=<id> has them): /api/ml would also make Label Studio call every connected backend."""
        from .services import pick_connection

        try:
            connections = self.services.store.connections(self.project_id, self.settings.label_studio_url.rstrip("/"),
                                                          self.settings.api_key, timeout=30)
        except Exception as exc:  # not fatal: the params and the name then come from the state directory
            log.warning("project %s: cannot read the project's model connections (%s: %s)", self.project_id,
                        type(exc).__name__, str(exc)[:200])
            return None
        title = known_name if any(c.get("title") == known_name for c in connections if isinstance(c, dict)) \
            else pick_connection(connections)
        return next((c for c in connections if isinstance(c, dict) and title and c.get("title") == title), None)

    def _params(self, record) -> dict:
        """The project settings this run uses, said in one line: --extra-params when given (with a warning
        when the connection's differ), else the project's model connection's extra params from Label Studio,
        else those of the backend's last /setup (the state directory), else the defaults."""
        from .params import check_params

        where = f"project {self.project_id}"
        connected = None
        if self.connection is not None:
            title = self.connection.get("title")
            try:
                connected = check_params(self.connection.get("extra_params"))
            except RequestError as exc:
                if self.explicit_params is None:
                    raise BulkError(f"{where}: the model connection {title!r} (Settings > Model): {exc}") from None
        if self.explicit_params is not None:
            try:
                params = check_params(self.explicit_params)
            except RequestError as exc:
                raise BulkError(f"--extra-params: {exc}") from None
            if connected is not None and connected != params:
                self.say(f"warning: {where}: --extra-params {_compact(params)} differ from the extra params of its "
                         f"model connection {self.connection.get('title')!r} ({_compact(connected)}), which Retrieve "
                         "Predictions uses; using --extra-params")
            else:
                self.say(f"{where}: extra params {_compact(params)} (--extra-params)")
            return params
        if connected is not None:
            self.say(f"{where}: extra params {_compact(connected)} of its model connection "
                     f"{self.connection.get('title')!r} (Label Studio)")
            return connected
        if record.params:
            self.say(f"{where}: extra params {_compact(record.params)} of the backend's last /setup (the state "
                     f"directory {self.settings.state_dir}); no model connection to it found in Label Studio")
        return dict(record.params)

    def _name(self, version: str) -> str:
        """The name `serve` gives: the connection's Name it found (kept in the state directory), else the
        project's connection to it (`_connection`), else `version`."""
        record = self.services.state.get(self.project_id)
        if not record.name and self.connection is not None:
            record.name = self.connection.get("title")
        self.backend.record = record
        return self.backend.prediction_name(version)

    def _load_model(self) -> None:
        """Load the model here once: its weights' fingerprint names the version, as in `serve`."""
        from .services import ModelNotReady

        quiet = log.level
        log.setLevel(logging.CRITICAL)  # the loader logs its failure; here it is the command's one line
        try:
            self.services.model(wait=3600)
        except ModelNotReady:
            detail = getattr(self.services, "_model_error", None) or "see the log"
            raise BulkError(f"the model {self.settings.model!r} cannot be loaded ({detail})") from None
        finally:
            log.setLevel(quiet)

    def _bar(self, total: int | None, desc: str, unit: str, iterable=None):
        """A progress bar on stderr, in the style of the scale run's ("segmenting"); none with --quiet."""
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not self.progress, file=sys.stderr)

    def _tasks(self) -> list:
        total = _field(self.client.projects.get(id=self.project_id), "task_number", None)
        tasks = []
        with self._bar(total, "listing tasks", "task") as bar:
            for task in self.client.tasks.list(project=self.project_id, page_size=TASK_PAGE):
                tasks.append(task)
                bar.update(1)
        return tasks

    def _predictions(self) -> dict:
        """{task id: {prediction id: model_version}} of the project's predictions."""
        out: dict = {}
        with self._bar(None, "listing predictions", "prediction") as bar:
            for prediction in self.client.predictions.list(project=self.project_id):
                task_id, prediction_id = _field(prediction, "task"), _field(prediction, "id")
                if task_id is not None and prediction_id is not None:
                    out.setdefault(int(task_id), {})[int(prediction_id)] = _field(prediction, "model_version")
                bar.update(1)
        return out

    def _remove_older(self, predictions: dict, tasks: set, name: str) -> None:
        """Delete this backend's older predictions (other versions: services.older_own_prediction) of the tasks
        that have one named `name` now, so they do not pile up one per version (--keep-old-predictions keeps
        them). Other backends' predictions stay."""
        from .services import older_own_prediction

        title = self.connection.get("title") if self.connection else None
        names = (title,) if title else ()
        stale = [(task_id, pid) for task_id in sorted(tasks) for pid, version in predictions.get(task_id, {}).items()
                 if older_own_prediction(version, name, names)]
        if not stale:
            return
        with self._bar(len(stale), "removing older predictions", "prediction") as bar:
            for task_id, prediction_id in stale:
                try:
                    self.client.predictions.delete(id=prediction_id)
                    self.summary.removed += 1
                except Exception as exc:
                    status = getattr(exc, "status_code", None)
                    if status != 404:  # 404: gone already
                        log.warning("project %s: task %s: cannot delete its older prediction %s (%s)", self.project_id,
                                    task_id, prediction_id, f"HTTP {status}" if status else type(exc).__name__)
                bar.update(1)

    def _work_folder(self, version: str) -> str:
        root = self.work_root
        if not root:
            base = self.settings.state_dir or tempfile.gettempdir()
            root = os.path.join(base, "bulk", f"project-{self.project_id}")
        folder = os.path.join(os.path.abspath(os.path.expanduser(root)), version)
        os.makedirs(folder, exist_ok=True)
        return folder

    # ---------------------------------------------------------------------------------------- segment

    def _segment(self, targets: list) -> dict:
        """{task id: TaskOutcome} over every view of the config."""
        from .backend import TaskOutcome

        outcomes = {int(_field(t, "id")): TaskOutcome() for t in targets}
        for number, view in enumerate(self.backend.spec.views):
            folder = os.path.join(self.work, f"view-{number}-{_safe(view.image_name)}")
            prompts = self._write_prompts(view, folder)
            if not prompts:  # the tasks are failed, not posted empty: a later run tries them again
                reason = (f"none of the {len(self.refs)} annotated task(s) has usable regions on <Image "
                          f"name={view.image_name!r}> (or their images cannot be read: see the warnings)")
                for task_id, outcome in outcomes.items():
                    outcome.failed = True
                    self.summary.reasons.append((task_id, reason))
                continue
            ready = self._write_targets(view, folder, targets, outcomes)
            if not ready:
                continue
            manifest = os.path.join(folder, "manifest.csv")
            text = "path\n" + "".join(f"{name}\n" for name in ready.values())
            atomic_write(manifest, lambda tmp: Path(tmp).write_text(text), overwrite=True)
            self._run_pipeline(view, folder, manifest, prompts, ready, outcomes)
        return outcomes

    def _write_prompts(self, view: View, folder: str) -> list[tuple[str, str]]:
        """The references with regions on `view` as (image.png, mask.png) files of the working folder."""
        from seggpt_plugins.images import to_rgb8

        controls = {c.name for c in view.controls}
        os.makedirs(os.path.join(folder, "prompts"), exist_ok=True)
        pairs = []
        refs = [r for r in self.refs if any(isinstance(x, dict) and x.get("from_name") in controls for x in r.result)]
        for ref in self._bar(len(refs), "downloading references", "image", refs):
            image_path = os.path.join(folder, "prompts", f"task_{ref.task_id}.png")
            mask_path = os.path.join(folder, "prompts", f"task_{ref.task_id}_mask.png")
            if not (os.path.exists(image_path) and os.path.exists(mask_path)):
                try:
                    rgb = to_rgb8(self.fetcher.fetch_image(ref.data.get(view.value_key), ref.task_id),
                                  name=f"task {ref.task_id} image")
                except (MediaError, ValueError) as exc:
                    log.warning("project %s: reference task %s is skipped: %s", self.project_id, ref.task_id, exc)
                    continue
                mask = annotation_to_mask(list(ref.result), view, rgb.shape[:2])
                if not mask.any():
                    continue
                write_png(mask_path, mask, overwrite=True)
                write_png(image_path, rgb, overwrite=True)  # last: the pair is whole when the image exists
            pairs.append((image_path, mask_path))
        return pairs

    def _write_targets(self, view: View, folder: str, targets: list, outcomes: dict) -> dict:
        """Download the targets' images on `view` (those not already in the working folder), in parallel.
        Returns {task id: path relative to the folder}; a task whose image cannot be used is failed."""
        from seggpt_plugins.images import to_rgb8

        os.makedirs(os.path.join(folder, "images"), exist_ok=True)

        def download(task) -> tuple[int, str | None]:
            task_id = int(_field(task, "id"))
            name = f"images/task_{task_id}.png"
            path = os.path.join(folder, name)
            if os.path.exists(path):
                return task_id, name
            try:
                data = _field(task, "data") or {}
                value = data.get(view.value_key) if isinstance(data, dict) else None
                if value is None:
                    raise MediaError(f"the task data has no {view.value_key!r} field "
                                     f"(<Image name={view.image_name!r} value=\"${view.value_key}\">)")
                rgb = to_rgb8(self.fetcher.fetch_image(value, task_id), name=f"task {task_id} image")
            except (MediaError, ValueError) as exc:
                outcomes[task_id].failed = True
                self.summary.reasons.append((task_id, str(exc)))
                return task_id, None
            write_png(path, rgb, overwrite=True)
            return task_id, name

        with self._bar(len(targets), "downloading images", "image") as bar:
            lock = threading.Lock()

            def counted(task):
                try:
                    return download(task)
                finally:
                    with lock:
                        bar.update(1)

            return {task_id: name for task_id, name in self.services.downloads.map(counted, targets) if name}

    def _run_pipeline(self, view: View, folder: str, manifest: str, prompts: list, ready: dict,
                      outcomes: dict) -> None:
        import pyarrow.parquet as pq

        from seggpt_plugins.export import ExportOptions
        from seggpt_plugins.scale import run

        backend, settings = self.backend, self.settings
        options = dict(model=settings.model, device=settings.device, dtype=settings.dtype, quantize=settings.quantize,
                       batch_size=settings.batch_size, threads=self.run_options["threads"],
                       most_similar=backend.max_prompts if len(prompts) > backend.max_prompts else None,
                       seg_type=backend.seg_type, ensemble=backend.ensemble, tile=backend.tile, halo=backend.halo,
                       example_ids="classes")  # the masks' values are the config's labels, as in /predict
        # the objects by the backend's rule, each with its own confidence (as /predict gives them)
        export = ExportOptions(output="instances", min_area=backend.object_rule.min_area,
                               split_touching=backend.object_rule.split_touching)
        # one output folder per set of run options: a rerun with other flags starts its own, never a clash
        key = hashlib.sha256(json.dumps(dict(options, output=export.output, min_area=export.min_area,
                                             split_touching=export.split_touching),
                                        sort_keys=True, default=str).encode()).hexdigest()[:8]
        summary = run([manifest], prompts, os.path.join(folder, f"out-{key}"), progress=self.progress,
                      options=export, **options, **{k: v for k, v in self.run_options.items() if k != "threads"})
        self.summary.segmented += summary.labelled_now
        by_stem = {os.path.splitext(name)[0]: task_id for task_id, name in ready.items()}
        columns = ["stem", "status", "reason", "confidence"]
        review = pq.read_table(summary.review, columns=columns).to_pylist()
        for row in review:
            task_id = by_stem.get(row["stem"])
            if task_id is None:
                continue
            outcome = outcomes[task_id]
            if row["status"] != "done":
                outcome.failed = True
                self.summary.reasons.append((task_id, row["reason"] or "segmentation failed"))
                continue
            try:
                instances = _objects(summary.out, row["stem"])
            except (OSError, ValueError, KeyError) as exc:
                outcome.failed = True
                self.summary.reasons.append((task_id, f"the run's outputs cannot be read ({exc})"))
                continue
            outcome.regions.extend(prediction_to_results(instances, view, prefer=backend.prefer,
                                                         tolerance=backend.polygon_tolerance, objects=backend.objects))
            outcome.scores.append(float(row["confidence"] or 0.0) if len(instances) else 0.0)

    # ------------------------------------------------------------------------------------------- post

    def _post(self, targets: list, outcomes: dict, name: str) -> set:
        """Import the predictions in batches; a failed task with no regions is not posted (a later run tries
        it again), and counts as failed. Returns the ids of the tasks posted."""
        posted: set = set()
        items = []
        for task in targets:
            task_id = int(_field(task, "id"))
            item = outcomes[task_id].item(name)
            if not item:
                self.summary.failed += 1
                continue
            items.append(dict(item, task=task_id))
        with self._bar(len(items), "posting predictions", "prediction") as bar:
            for start in range(0, len(items), self.post_batch):
                batch = items[start:start + self.post_batch]
                if self._import(batch):
                    posted.update(p["task"] for p in batch)
                bar.update(len(batch))
        return posted

    def _import(self, batch: list) -> bool:
        try:
            self.client.projects.import_predictions(id=self.project_id, request=batch)
        except Exception as exc:
            status = getattr(exc, "status_code", None)
            detail = f"HTTP {status}: {str(getattr(exc, 'body', ''))[:200]}" if status else f"{type(exc).__name__}: {exc}"
            self.summary.failed += len(batch)
            self.summary.reasons.extend((p["task"], f"posting the prediction failed ({detail})") for p in batch)
            return False
        self.summary.predicted += len(batch)
        return True


def _objects(out: str, stem: str):
    """A segmented image's objects as the run wrote them: its instance map (one id per object) with, from its
    record's COCO annotations (in id order), each object's class and confidence (its predicted IoU when
    estimated): the core's `Instances`, as the runner gives /predict."""
    from dataclasses import replace

    from PIL import Image

    from seggpt_plugins.instances import Instances
    from seggpt_plugins.scale.records import map_name, record_name

    ids = np.array(Image.open(os.path.join(out, map_name(stem, "instances", "png"))))
    record = json.loads(Path(out, record_name(stem)).read_text())
    annotations = record.get("annotations") or []
    found = Instances.of_map(ids)
    if len(found.objects) != len(annotations) or any(o.area != round(a["area"]) for o, a in zip(found.objects,
                                                                                                annotations)):
        raise ValueError(f"{stem}: its instance map and its record's {len(annotations)} object(s) differ")
    return Instances(found.map, [replace(o, class_id=int(a["category_id"]), quality=float(a["score"]))
                                 for o, a in zip(found.objects, annotations)])


def _compact(params: dict) -> str:
    return json.dumps(params, sort_keys=True) if params else "{} (the defaults)"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40] or "image"


def predict_project(settings, project_id: int, **options) -> BulkSummary:
    """Check, then segment and post (see the module docstring). BulkError before any model work."""
    predictor = ProjectPredictor(settings, project_id, **options)
    predictor.check()
    return predictor.run()


__all__ = ["BulkError", "BulkSummary", "ProjectPredictor", "predict_project"]
