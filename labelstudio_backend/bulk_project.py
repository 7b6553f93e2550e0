"""`seggpt labelstudio predict`, the project's side (bulk.py runs the stages): what the command reads from Label
Studio before and around the run: the errors and the summary, the project's model connection, its extra
params and the predictions' name, the model loaded once, the project's tasks and predictions listed, and the
working folder."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field

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


class ProjectReading:
    """ProjectPredictor's reading of the project (a mixin: the state is ProjectPredictor's)."""

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

    def _work_folder(self, version: str) -> str:
        root = self.work_root
        if not root:
            base = self.settings.state_dir or tempfile.gettempdir()
            root = os.path.join(base, "bulk", f"project-{self.project_id}")
        folder = os.path.join(os.path.abspath(os.path.expanduser(root)), version)
        os.makedirs(folder, exist_ok=True)
        return folder


def _compact(params: dict) -> str:
    return json.dumps(params, sort_keys=True) if params else "{} (the defaults)"

