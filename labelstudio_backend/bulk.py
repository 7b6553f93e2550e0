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
import logging

from .bulk_post import Posting
from .bulk_project import POST_BATCH, TASK_PAGE, BulkError, BulkSummary, ProjectReading, _api_error, _field
from .bulk_segment import Segmenting
from .labeling import ConfigError
from .params import RequestError

log = logging.getLogger("seggpt_plugins.labelstudio")


class ProjectPredictor(ProjectReading, Segmenting, Posting):
    """One project's bulk pre-annotation. `check()` does everything that can fail cheaply; `run()` the rest.
    The stages' steps live in bulk_project.py (reading the project), bulk_segment.py (prompts, targets, the
    scale run) and bulk_post.py (importing, removing older predictions)."""

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


def predict_project(settings, project_id: int, **options) -> BulkSummary:
    """Check, then segment and post (see the module docstring). BulkError before any model work."""
    predictor = ProjectPredictor(settings, project_id, **options)
    predictor.check()
    return predictor.run()


__all__ = ["POST_BATCH", "TASK_PAGE", "BulkError", "BulkSummary", "ProjectPredictor", "predict_project"]
