"""The per-request predictor, shaped like label-studio-ml 2.x (`setup()`, `predict(tasks, context)`, `fit()`).

`SegGPTBackend` is made per request for one project, as label-studio-ml makes its model class per
project; what it shares with other requests is in `Services`. For each view (an <Image> with its label
controls) the project's references become a `PromptPool`, and the tasks go through the core's one loop
(`runner.Runner`): each is shown the `max_prompts` references that look most alike (never itself), each
distinct choice is prepared once, downloads run ahead of the model, the deadline is checked between
batches and tiles, and the objects and their confidences are the core's, as in every host.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from seggpt_plugins.ensembles import tile_size
from seggpt_plugins.errors import InputError
from seggpt_plugins.images import to_rgb8
from seggpt_plugins.instances import ObjectRule
from seggpt_plugins.prompts import PromptPool, describe
from seggpt_plugins.run_control import Missed
from seggpt_plugins.runner import Runner, Target

from .adapting import ADAPT_EVENTS
from .labeling import BRUSH, POLYGON, View, annotation_to_mask, parse_label_config, prediction_to_results
from .media import MediaError, MediaFetcher, OutOfTime, PixelBudget
from .params import NOT_IN_VERSION, RequestError, task_id_of
from .references import Reference, ReferenceStore, usable_annotation
from .services import Services, model_name

log = logging.getLogger("seggpt_plugins.labelstudio")

TARGET_DOWNLOADS = 4  # task images a request downloads and decodes ahead of the model


@dataclass(frozen=True)
class PreparedReference:
    """A reference ready to be a prompt on one view: its image, appearance descriptor and label mask."""

    ref: Reference
    rgb: np.ndarray
    descriptor: np.ndarray
    mask: np.ndarray


@dataclass
class TaskOutcome:
    """What one /predict made of one task, over all views."""

    regions: list = field(default_factory=list)
    scores: list = field(default_factory=list)  # one confidence per view predicted
    failed: bool = False  # its image (or its batch) could not be used
    missed: bool = False  # not reached before the deadline
    reference: bool = False  # an annotated task the predictions learn from: never predicted

    @property
    def left_for_later(self) -> bool:
        return self.missed and not self.regions

    def item(self, version: str):
        """The response item: a prediction, or [] (no prediction: a reference task, nothing to predict from
        on any view, or a task a later retrieval tries again)."""
        if self.reference or not self.scores or self.left_for_later or (self.failed and not self.regions):
            return []
        score = float(np.mean(self.scores)) if self.scores else 0.0
        return {"result": self.regions, "score": round(score, 4), "model_version": version}


class SegGPTBackend:
    """One project's view of the backend, as label-studio-ml 2.x's LabelStudioMLBase subclasses."""

    def __init__(self, project_id: int, label_config: str | None = None, services: Services | None = None,
                 params: dict | None = None):
        self.project_id = int(project_id)
        self.label_config = label_config
        self.services = services
        self.settings = services.settings
        self._params_override = params
        self.setup()

    def setup(self) -> None:
        """Read the project's settings (from its last /setup) and parse the labeling config."""
        self.record = self.services.state.get(self.project_id)
        params = dict(self.record.params if self._params_override is None else self._params_override)
        self.reference_task_ids = params.get("reference_task_ids")
        self.ground_truth_only = params.get("references") == "ground_truth"  # only the tasks marked ground truth
        self.max_prompts = params.get("max_prompts", self.settings.max_prompts)
        self.seg_type = params.get("seg_type", self.settings.seg_type)
        self.prefer = POLYGON if params.get("prefer") == "polygon" else BRUSH
        self.min_area = params.get("min_area", self.settings.min_area)
        self.polygon_tolerance = params.get("polygon_tolerance", self.settings.polygon_tolerance)
        self.objects = params.get("objects", False)
        self.object_rule = ObjectRule(min_area=self.min_area, split_touching=params.get("split_touching", False))
        self.ensemble = params.get("ensemble", self.settings.ensemble)
        self.tile, self.halo = params.get("tile", self.settings.tile), params.get("halo", self.settings.halo)
        try:  # a project's halo with the backend's SEGGPT_TILE (or its tile with SEGGPT_HALO)
            tile_size(self.tile, self.halo)
        except InputError as exc:
            raise RequestError(f"extra_params.tile/halo (with SEGGPT_TILE/SEGGPT_HALO): {exc}") from None
        self.params = params
        self.budget = PixelBudget(self.settings.max_request_pixels)  # decoded pixels this request holds at once
        self.deadline: float | None = None  # time.monotonic() by which predict() answers
        self.spec = parse_label_config(self.label_config) if self.label_config is not None else None
        if self.label_config is not None:  # what an adaptation after a webhook (which carries none) reads
            self.services.label_configs[self.project_id] = self.label_config

    # ------------------------------------------------------------------------------------ references

    def refresh_references(self, timeout: float | None = None) -> list[Reference]:
        api = self.services.api_for(self.record)
        status = self.services.store.refresh(self.project_id, self.record.generation, api, self.reference_task_ids,
                                             max_age=self.settings.refresh_seconds, timeout=timeout)
        if status == "webhooks-only":
            log.info("project %s: no Label Studio URL and API key (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY): "
                     "references are the annotations webhooks delivered", self.project_id)
        return self.chosen(self.services.store.references(self.project_id, self.reference_task_ids))

    def chosen(self, refs: list[Reference]) -> list[Reference]:
        """The references this project's params choose: with `references: "ground_truth"` only the tasks whose
        annotation is marked ground truth (a task's ground truth is its reference when it has one)."""
        return [r for r in refs if r.ground_truth] if self.ground_truth_only else list(refs)

    def model_version(self, refs: list[Reference] | None = None) -> str:
        if refs is None:
            refs = self.chosen(self.services.store.references(self.project_id, self.reference_task_ids))
        digest = hashlib.sha256()
        digest.update(ReferenceStore.fingerprint(refs).encode())
        digest.update(json.dumps({k: v for k, v in self.params.items() if k not in NOT_IN_VERSION},
                                 sort_keys=True).encode())
        digest.update((self.spec.key if self.spec else "").encode())
        refs_part = f"r{len(refs)}-{digest.hexdigest()[:8]}" if refs else "norefs"
        tag = self.services.project_tag(self.project_id) or model_name(self.settings.model)
        return f"seggpt-{tag}-{refs_part}"

    def prediction_name(self, version: str) -> str:
        """The model_version Label Studio is given (/setup, /predict, `seggpt labelstudio predict`): the Name of
        the project's model connection when /setup found it (Services.connection_name), which is what the
        Prediction score column and prelabeling select; else `version`, this backend's own version."""
        return self.record.name or version

    def _reference_image(self, ref: Reference, view: View, fetcher: MediaFetcher) -> dict:
        value = ref.data.get(view.value_key)
        key = ("img", fetcher.base_url, str(value), ref.task_id)
        cached = self.services.images.get(key)
        if cached is None:
            image = fetcher.fetch_image(value, ref.task_id, self.budget, self.deadline)
            rgb = to_rgb8(image, name=f"task {ref.task_id} image")
            cached = {"rgb": rgb, "descriptor": describe(rgb)}
            self.services.images.put(key, cached)
        return cached

    def _reference_mask(self, ref: Reference, view: View, shape) -> np.ndarray:
        key = ("mask", ref.key, self.spec.key, view.image_name, tuple(shape))
        mask = self.services.masks.get(key)
        if mask is None:
            mask = annotation_to_mask(list(ref.result), view, tuple(shape))
            self.services.masks.put(key, mask)
        return mask

    def _prepare_references(self, refs: list[Reference], view: View, fetcher: MediaFetcher,
                            deadline: float) -> list[PreparedReference]:
        """The references that have regions on this view, ready as prompts (failures are logged)."""
        controls = {c.name for c in view.controls}
        relevant = [r for r in refs if any(isinstance(x, dict) and x.get("from_name") in controls for x in r.result)]

        def load(ref: Reference) -> PreparedReference | None:
            if time.monotonic() > deadline:
                return None
            try:
                image = self._reference_image(ref, view, fetcher)
                mask = self._reference_mask(ref, view, image["rgb"].shape[:2])
            except (MediaError, ValueError) as exc:
                log.warning("project %s: reference task %s is skipped: %s", self.project_id, ref.task_id, exc)
                return None
            if not mask.any():
                log.info("project %s: reference task %s has no regions of <Image name=%r> with current labels",
                         self.project_id, ref.task_id, view.image_name)
                return None
            return PreparedReference(ref, image["rgb"], image["descriptor"], mask)

        if not relevant:
            return []
        return [p for p in self.services.downloads.map(load, relevant) if p is not None]

    # --------------------------------------------------------------------------------------- predict

    def predict(self, tasks: list[dict], context=None, started: float | None = None, **kwargs) -> list:
        """One item per task: {"result": [...], "score", "model_version"}, or [] for a task left for later.
        model_version is prediction_name(): the connection's Name when known (the version is in the log).

        started: when the request arrived (time.monotonic()); the predict timeout counts from then and covers
        everything: waiting for the model, listing references, downloads and the wait for the model lock.
        `context` (interactive pre-annotation) is accepted and not used: SegGPT's prompt is the references.
        """
        if self.spec is None:
            raise RequestError("label_config is required to predict")
        settings = self.settings
        started = time.monotonic() if started is None else started
        deadline = self.deadline = started + settings.predict_timeout
        model = self.services.model(wait=max(0.0, deadline - time.monotonic()))  # still loading: within the deadline
        model = self.services.adaptations.model_for(self.project_id, model)  # adapted to its annotations, if it was
        refs = self.refresh_references(timeout=max(0.5, min(30.0, (deadline - time.monotonic()) / 3)))
        version = self.model_version(refs)
        if not refs:
            log.warning("project %s: no %s yet%s: the %d task(s) get no prediction now. %s; a task is predicted "
                        "when opened or retrieved after that.", self.project_id,
                        "annotation marked ground truth" if self.ground_truth_only else "annotated task",
                        f" among reference_task_ids {self.reference_task_ids}" if self.reference_task_ids else "",
                        len(tasks), "Mark an annotation as ground truth (extra param references: ground_truth)"
                        if self.ground_truth_only else "Annotate at least one task (brush or polygon regions)")
            self.services.metrics.add("predict_without_references")
            return [[] for _ in tasks]
        fetcher = self.services.fetcher_for(self.record)
        reference_ids = {ref.task_id for ref in refs}
        # references and other annotated tasks (not chosen as references) are never predicted
        outcomes = [TaskOutcome(reference=isinstance(task, dict) and (task_id_of(task.get("id")) in reference_ids
                                                                      or _annotated(task)))
                    for task in tasks]
        targets = {i: task for i, task in enumerate(tasks) if not outcomes[i].reference}
        for view in self.spec.views:
            if not targets:
                break
            prepared = self._prepare_references(refs, view, fetcher, deadline)
            if time.monotonic() > deadline:  # the references took the whole budget (they stay cached)
                for outcome in outcomes:
                    outcome.missed = True
                break
            if not prepared:
                log.warning("project %s: none of the %d annotated task(s) has usable regions on <Image name=%r>",
                            self.project_id, len(refs), view.image_name)
                continue
            self._predict_view(model, targets, view, prepared, fetcher, outcomes, deadline)
        name = self.prediction_name(version)
        self._report(tasks, outcomes, refs, version, name, started)
        items = [outcome.item(name) for outcome in outcomes]
        if not self.params.get("keep_old_predictions", False):
            self._remove_older(tasks, items, name, deadline)
        return items

    def _remove_older(self, tasks: list, items: list, name: str, deadline: float) -> None:
        """Delete, through the API, this backend's predictions of older versions (services.older_own_prediction)
        of the tasks predicted now, as Label Studio listed them in the request: it saves the new one after this
        answer, and they would pile up one per version. Other backends' predictions stay; the extra param
        keep_old_predictions keeps them all. Best effort, within the deadline."""
        from .services import older_own_prediction

        stale = [p["id"] for task, item in zip(tasks, items) if item and isinstance(task, dict)
                 for p in task.get("predictions") or () if isinstance(p, dict) and _is_id(p.get("id"))
                 and older_own_prediction(p.get("model_version"), name)]
        api = self.services.api_for(self.record) if stale else None
        if api is None:
            return
        client = self.services.store.client(*api)
        removed = 0
        for prediction_id in stale:
            left = deadline - time.monotonic()
            if left < 0.5:
                break
            try:
                client.predictions.delete(id=prediction_id, request_options={"timeout": min(10.0, left),
                                                                              "max_retries": 0})
                removed += 1
            except Exception as exc:  # an HTTP error status (404: gone already), or httpx's transport errors
                log.info("project %s: cannot delete the older prediction %s (%s)", self.project_id, prediction_id,
                         getattr(exc, "status_code", None) or type(exc).__name__)
        if removed:
            self.services.metrics.add("older_predictions_removed", removed)
            log.info("project %s: removed %d older prediction(s) of this backend from the tasks predicted now "
                     "(extra param keep_old_predictions keeps them)", self.project_id, removed)

    def _report(self, tasks, outcomes: list[TaskOutcome], refs, version: str, name: str, started: float) -> None:
        left = sum(o.left_for_later and not o.reference for o in outcomes)
        failed = sum(o.failed and not o.regions and not o.left_for_later and not o.reference for o in outcomes)
        done = sum(bool(o.item("")) for o in outcomes)
        references = sum(o.reference for o in outcomes)
        seconds = time.monotonic() - started
        metrics = self.services.metrics
        metrics.add("tasks_predicted", done)
        metrics.add("tasks_failed", failed)
        metrics.add("tasks_left_for_later", left)
        metrics.add("reference_tasks_not_predicted", references)
        metrics.last_predict = {"project": self.project_id, "tasks": len(tasks), "predicted": done, "failed": failed,
                                "left": left, "reference_tasks": references, "seconds": round(seconds, 2),
                                "references": len(refs), "model_version": name, "version": version}
        log.info("project %s: predicted %d of %d task(s) in %.1f s from %d reference(s) (%s%s)%s", self.project_id,
                 done, len(tasks), seconds, len(refs), version, f", named {name!r}" if name != version else "",
                 f"; {references} reference task(s) are not predicted" if references else "")
        if left:
            log.warning("project %s: %d task(s) were not reached within %.0f s (SEGGPT_PREDICT_TIMEOUT) and get no "
                        "prediction now; run 'Retrieve predictions' again (tasks that have one are skipped), or "
                        "raise ML_TIMEOUT_PREDICT in Label Studio's environment and --predict-timeout here",
                        self.project_id, left, self.settings.predict_timeout)

    def _load_target(self, task, view: View, fetcher: MediaFetcher) -> np.ndarray:
        """A task's image for one view (downloaded within the request's pixel budget and deadline);
        MediaError (the task gets no prediction) names what is wrong."""
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise MediaError("the task has no 'data' object")
        value = task["data"].get(view.value_key)
        if value is None:
            raise MediaError(f"the task data has no {view.value_key!r} field "
                             f"(<Image name={view.image_name!r} value=\"${view.value_key}\">)")
        try:
            return fetcher.fetch_image(value, task.get("id"), self.budget, self.deadline)
        except OutOfTime as exc:  # not failed: the runner leaves it for the next retrieval
            raise Missed(str(exc)) from exc

    def _predict_view(self, model, tasks: dict, view: View, prepared: list[PreparedReference],
                      fetcher: MediaFetcher, outcomes: list[TaskOutcome], deadline: float) -> None:
        """Every task ({index in outcomes: task}) through the core's runner: shown the `max_prompts` most
        similar references, its objects by the core's rule, one request at a time on the model."""
        pool = PromptPool.from_pairs([p.ref.task_id for p in prepared], [(p.rgb, p.mask) for p in prepared],
                                     descriptors=np.stack([p.descriptor for p in prepared]))
        runner = Runner(model, pool, most_similar=self.max_prompts, label_ids=list(view.label_ids.values()),
                        batch_size=max(1, self.settings.batch_size), seg_type=self.seg_type, ensemble=self.ensemble,
                        tile=self.tile, halo=self.halo, quality=self.settings.quality, objects=self.object_rule,
                        example_ids="classes",  # the masks' values are the config's labels
                        readers=TARGET_DOWNLOADS, read_ahead=0)  # the pixel budget counts one batch
        targets = [Target(i, lambda task=task: self._load_target(task, view, fetcher),
                          name=f"task {str(task.get('id') if isinstance(task, dict) else '?')[:40]} image",
                          exclude=(task_id_of(task.get("id")) if isinstance(task, dict) else None,))
                   for i, task in tasks.items()]
        if not self.services.inference_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            for outcome in outcomes:  # other requests held the model until the deadline
                outcome.missed = True
            return
        try:
            def on_event(event) -> None:  # tiles painted: /metrics shows how far a large image got
                if event.kind == "tile":
                    self.services.metrics.add("tiles_painted")

            for result in runner.run(targets, deadline=deadline, on_event=on_event):
                outcome = outcomes[result.key]
                if result.ok:
                    self.budget.give(result.prediction.labels.size)
                    outcome.regions.extend(prediction_to_results(result.instances, view, prefer=self.prefer,
                                                                 tolerance=self.polygon_tolerance,
                                                                 objects=self.objects))
                    outcome.scores.append(result.confidence if result.prediction.labels.any() else 0.0)
                elif result.missed:
                    outcome.missed = True  # not reached, or its download cut by the deadline: the next retrieval
                elif not result.skipped:  # skipped: no example but the task itself (references never reach here)
                    outcome.failed = True
                    task = tasks[result.key]
                    log.warning("project %s: task %s gets no prediction: %s", self.project_id,
                                str(task.get("id") if isinstance(task, dict) else "?")[:40],
                                result.exception if isinstance(result.exception, MediaError) else result.error)
        finally:
            self.services.inference_lock.release()

    # ------------------------------------------------------------------------------------------- fit

    def fit(self, event: str, data: dict, hint_only: bool = False, **kwargs) -> dict:
        """Webhook events: annotations become, change or stop being references; with --adapt-seconds, an
        annotation (or START_TRAINING) also asks for the model to be adapted to the references, in the
        background (adapting.py).

        hint_only: the payload is not trusted: the references are only listed again.
        """
        if hint_only:
            self.services.store.invalidate(self.project_id)
            summary = "references will be listed again (unauthenticated webhook: payload not used)"
        else:
            summary = self.services.store.apply_event(self.project_id, event, data, self.reference_task_ids)
        generation = self.services.state.bump(self.project_id)
        self.record = self.services.state.get(self.project_id)
        log.info("project %s: %s: %s (generation %d)", self.project_id, event, summary, generation)
        answer = {"event": event, "project": self.project_id, "references": summary}
        if event in ADAPT_EVENTS and self.services.adaptations.enabled:
            project = data.get("project") if not hint_only else None
            config = (self.label_config or (project.get("label_config") if isinstance(project, dict) else None)
                      or self.services.label_configs.get(self.project_id))
            services, project_id = self.services, self.project_id
            answer["adaptation"] = self.services.adaptations.request(
                project_id, config if isinstance(config, str) else None,
                lambda label_config: SegGPTBackend(project_id, label_config, services).training_pairs())
            log.info("project %s: %s", self.project_id, answer["adaptation"])
        return answer

    def training_pairs(self, seconds: float = 300.0) -> tuple[list, list]:
        """The references' images and label masks on the first <Image> that has any: what an adaptation
        learns from (downloads within `seconds`)."""
        if self.spec is None:
            return [], []
        self.deadline = deadline = time.monotonic() + seconds
        refs = self.refresh_references(timeout=30.0)
        fetcher = self.services.fetcher_for(self.record)
        for view in self.spec.views:
            prepared = self._prepare_references(refs, view, fetcher, deadline)
            if prepared:
                return [p.rgb for p in prepared], [p.mask for p in prepared]
        return [], []


def _annotated(task: dict) -> bool:
    """The task as Label Studio sent it has an annotation (not cancelled, with regions)."""
    annotations = task.get("annotations")
    return isinstance(annotations, list) and any(isinstance(a, dict) and usable_annotation(a) for a in annotations)


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


__all__ = ["SegGPTBackend", "TaskOutcome", "PreparedReference"]
