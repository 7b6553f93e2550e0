"""The SegGPT ML backend: shaped like label-studio-ml 2.x (`setup()`, `predict(tasks, context)`, `fit(event, data)`).

`Services` is what one worker process shares between requests: the model (loaded in the worker, in a
background thread, never before gunicorn forks), the reference store, the image and mask caches, the
inference lock and the metrics. `SegGPTBackend` is made per request for one project, as label-studio-ml
makes its model class per project.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .labeling import BRUSH, POLYGON, ConfigError, annotation_to_mask, parse_label_config, prediction_to_results
from .media import MediaError, MediaFetcher
from .references import ByteLRU, Reference, ReferenceStore, embed, most_similar
from .settings import Settings
from .state import MemoryState, SqliteState

log = logging.getLogger("seggpt_plugins.labelstudio")

SETUP_LISTING_TIMEOUT_S = 2.0  # Label Studio gives /setup 3 s (ML_TIMEOUT_SETUP)
DOWNLOAD_THREADS = 8
PARAMS = {  # extra_params a project may set in its ML backend connection, with their checks
    "reference_task_ids": "a list of task ids whose annotations are the prompts (default: all annotated tasks)",
    "max_prompts": "references per target, 1..64 (most similar first)",
    "seg_type": "'instance' or 'semantic'",
    "prefer": "'brush' or 'polygon': the output of a label that both kinds of control have",
    "min_area": "predicted parts smaller than this many pixels are dropped",
    "polygon_tolerance": "polygon simplification in pixels (0: every contour pixel)",
}


class RequestError(ValueError):
    """A request Label Studio (or another client) sent cannot be served; answered with 4xx and this message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ModelNotReady(RuntimeError):
    pass


def parse_project_id(project) -> int:
    """Label Studio sends "<id>.<created timestamp>"; plain ids are accepted too."""
    if isinstance(project, bool):
        raise RequestError(f"'project' must be a project id like \"3.1700000000\", got {project!r}")
    if isinstance(project, int):
        return project
    if isinstance(project, str) and re.fullmatch(r"\d+(\.\d+)?", project.strip()):
        return int(project.strip().split(".")[0])
    raise RequestError(f"'project' must be a project id like \"3.1700000000\", got {str(project)[:80]!r}")


def check_params(extra) -> dict:
    """extra_params from /setup (a dict or a JSON string) -> checked params; RequestError names what is wrong."""
    if extra in (None, "", {}):
        return {}
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except json.JSONDecodeError as exc:
            raise RequestError(f"extra_params is not valid JSON ({exc}); e.g. {{\"max_prompts\": 4}}") from None
    if not isinstance(extra, dict):
        raise RequestError(f"extra_params must be a JSON object, got {type(extra).__name__}")
    unknown = sorted(set(extra) - set(PARAMS))
    if unknown:
        raise RequestError(f"extra_params: unknown key(s) {unknown}; known: "
                           + "; ".join(f"{k}: {v}" for k, v in PARAMS.items()))
    params = {}
    if extra.get("reference_task_ids") is not None:
        ids = extra["reference_task_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i > 0
                                                           for i in ids):
            raise RequestError("extra_params.reference_task_ids must be a non-empty list of task ids (integers)")
        params["reference_task_ids"] = sorted(set(ids))
    if extra.get("max_prompts") is not None:
        value = extra["max_prompts"]
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 64:
            raise RequestError(f"extra_params.max_prompts must be an integer from 1 to 64, got {value!r}")
        params["max_prompts"] = value
    if extra.get("seg_type") is not None:
        if extra["seg_type"] not in ("instance", "semantic"):
            raise RequestError(f"extra_params.seg_type must be 'instance' or 'semantic', got {extra['seg_type']!r}")
        params["seg_type"] = extra["seg_type"]
    if extra.get("prefer") is not None:
        if extra["prefer"] not in ("brush", "polygon"):
            raise RequestError(f"extra_params.prefer must be 'brush' or 'polygon', got {extra['prefer']!r}")
        params["prefer"] = extra["prefer"]
    if extra.get("min_area") is not None:
        value = extra["min_area"]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise RequestError(f"extra_params.min_area must be an integer >= 0, got {value!r}")
        params["min_area"] = value
    if extra.get("polygon_tolerance") is not None:
        value = extra["polygon_tolerance"]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 100:
            raise RequestError(f"extra_params.polygon_tolerance must be a number from 0 to 100, got {value!r}")
        params["polygon_tolerance"] = float(value)
    return params


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.counters: Counter = Counter()
        self.started = time.time()
        self.last_predict: dict = {}

    def add(self, name: str, value: float = 1) -> None:
        with self._lock:
            self.counters[name] += value

    def snapshot(self) -> dict:
        with self._lock:
            return {"uptime_s": round(time.time() - self.started, 1), "pid": os.getpid(),
                    "counters": dict(self.counters), "last_predict": dict(self.last_predict)}


class Services:
    """Shared by all requests of one worker process."""

    def __init__(self, settings: Settings, model=None):
        self.settings = settings
        self.state = SqliteState(settings.state_dir) if settings.state_dir else MemoryState()
        self.store = ReferenceStore(settings.max_references)
        cache = int(settings.cache_mb * (1 << 20))
        self.images = ByteLRU(cache * 3 // 4)
        self.masks = ByteLRU(cache // 4)
        self.metrics = Metrics()
        self.inference_lock = threading.Lock()
        self._model = model
        self._model_error: str | None = None
        self._loaded = threading.Event()
        self._loader: threading.Thread | None = None
        self._fetchers: dict = {}
        self._lock = threading.Lock()
        self.model_tag = None
        if model is not None:
            self._after_load(model)

    # --------------------------------------------------------------------------------------- model

    def start_loading(self) -> None:
        """Load the model in a background thread of this (worker) process."""
        with self._lock:
            if self._loaded.is_set() or self._loader is not None:
                return
            self._loader = threading.Thread(target=self._load, name="seggpt-model-loader", daemon=True)
            self._loader.start()

    def _load(self) -> None:
        started = time.time()
        try:
            from seggpt_plugins import SegGPT

            model = SegGPT.from_pretrained(self.settings.model, device=self.settings.device, dtype=self.settings.dtype)
            self._model = model
            self._after_load(model)
            log.info("loaded %s in %.1f s (pid %d); model version prefix %s", model, time.time() - started,
                     os.getpid(), self.model_tag)
        except Exception as exc:  # reported by /health and every request
            self._model_error = f"{type(exc).__name__}: {exc}"
            log.error("cannot load the model %r: %s", self.settings.model, self._model_error)
        finally:
            self._loaded.set()

    def _after_load(self, model) -> None:
        self.model_tag = f"{model_name(getattr(model, 'source', None) or self.settings.model)}-{model_fingerprint(model)}"
        self._loaded.set()

    def model_status(self) -> tuple[str, str | None]:
        if self._model is not None:
            return "UP", None
        if self._model_error is not None:
            return "ERROR", self._model_error
        return "LOADING", None

    def model(self, wait: float = 0.0):
        if self._model is None and not self._loaded.is_set():
            self.start_loading()
            self._loaded.wait(max(wait, 0.0))
        if self._model is not None:
            return self._model
        if self._model_error is not None:
            raise ModelNotReady(f"the model {self.settings.model!r} failed to load: {self._model_error}")
        raise ModelNotReady(f"the model {self.settings.model!r} is still loading; try again in a moment")

    # ------------------------------------------------------------------------------- Label Studio API

    def api_for(self, record) -> tuple[str, str] | None:
        """(Label Studio URL, API key): the configured ones, else those /setup reported (the creator's token)."""
        base = self.settings.label_studio_url or record.hostname
        key = self.settings.api_key or record.access_token
        if not base or not key:
            return None
        return base.rstrip("/"), key

    def fetcher_for(self, record) -> MediaFetcher:
        api = self.api_for(record)
        base = api[0] if api else (self.settings.label_studio_url or record.hostname)
        key = api[1] if api else None
        with self._lock:
            fetcher = self._fetchers.get((base, key))
            if fetcher is None:
                fetcher = self._fetchers[(base, key)] = MediaFetcher(
                    base, key, max_bytes=int(self.settings.max_download_mb * (1 << 20)),
                    max_pixels=self.settings.max_image_pixels)
            return fetcher


def model_name(source: str) -> str:
    name = Path(str(source).rstrip("/")).name or str(source)
    name = re.sub(r"\.(pth|pt|bin|safetensors)$", "", name)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "model"


def model_fingerprint(model) -> str:
    """A short hash of the weights (a sample of every tensor), so another checkpoint means another version."""
    net = getattr(model, "net", None)
    digest = hashlib.sha256(str(getattr(model, "source", "")).encode())
    if net is not None:
        try:
            for name, tensor in sorted(net.state_dict().items()):
                flat = tensor.detach().reshape(-1)
                digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
                digest.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
        except Exception as exc:  # an unusual network: the source name alone
            log.debug("model fingerprint from the source name only (%s)", exc)
    return digest.hexdigest()[:6]


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
        self.max_prompts = params.get("max_prompts", self.settings.max_prompts)
        self.seg_type = params.get("seg_type", self.settings.seg_type)
        self.prefer = POLYGON if params.get("prefer") == "polygon" else BRUSH
        self.min_area = params.get("min_area", self.settings.min_area)
        self.polygon_tolerance = params.get("polygon_tolerance", self.settings.polygon_tolerance)
        self.params = params
        self.spec = parse_label_config(self.label_config) if self.label_config is not None else None

    # ------------------------------------------------------------------------------------ references

    def refresh_references(self, timeout: float | None = None) -> list[Reference]:
        api = self.services.api_for(self.record)
        status = self.services.store.refresh(self.project_id, self.record.generation, api, self.reference_task_ids,
                                             max_age=self.settings.refresh_seconds, timeout=timeout)
        if status == "webhooks-only":
            log.info("project %s: no Label Studio URL and API key (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY): "
                     "references are the annotations webhooks delivered to this process", self.project_id)
        return self.services.store.references(self.project_id, self.reference_task_ids)

    def model_version(self, refs: list[Reference] | None = None) -> str:
        if refs is None:
            refs = self.services.store.references(self.project_id, self.reference_task_ids)
        digest = hashlib.sha256()
        digest.update(ReferenceStore.fingerprint(refs).encode())
        digest.update(json.dumps(self.params, sort_keys=True).encode())
        digest.update((self.spec.key if self.spec else "").encode())
        refs_part = f"r{len(refs)}-{digest.hexdigest()[:8]}" if refs else "norefs"
        return f"seggpt-{self.services.model_tag or model_name(self.settings.model)}-{refs_part}"

    def _reference_image(self, ref: Reference, view, fetcher: MediaFetcher):
        value = ref.data.get(view.value_key)
        key = ("img", fetcher.base_url, str(value), ref.task_id)
        cached = self.services.images.get(key)
        if cached is None:
            from seggpt_plugins.images import to_rgb8

            rgb = to_rgb8(fetcher.fetch_image(value, ref.task_id), name=f"task {ref.task_id} image")
            cached = {"rgb": rgb, "embedding": embed(rgb)}
            self.services.images.put(key, cached)
        return cached

    def _reference_mask(self, ref: Reference, view, shape) -> np.ndarray:
        key = ("mask", ref.key, self.spec.key, view.image_name, tuple(shape))
        mask = self.services.masks.get(key)
        if mask is None:
            mask = annotation_to_mask(list(ref.result), view, tuple(shape))
            self.services.masks.put(key, mask)
        return mask

    def _prepare_references(self, refs: list[Reference], view, fetcher, deadline: float) -> list[dict]:
        """Image, embedding and mask of each reference that has regions on this view (failures are logged)."""
        relevant = [r for r in refs if any(isinstance(x, dict) and x.get("from_name") in
                                           {c.name for c in view.controls} for x in r.result)]

        def load(ref):
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
            return {"ref": ref, "rgb": image["rgb"], "embedding": image["embedding"], "mask": mask}

        with ThreadPoolExecutor(min(DOWNLOAD_THREADS, max(1, len(relevant)))) as pool:
            return [p for p in pool.map(load, relevant) if p is not None]

    # --------------------------------------------------------------------------------------- predict

    def predict(self, tasks: list[dict], context=None, **kwargs) -> list:
        """One item per task: {"result": [...], "score", "model_version"}, or [] for a task left for later.

        `context` (interactive pre-annotation) is accepted and not used: SegGPT's prompt is the references.
        """
        if self.spec is None:
            raise RequestError("label_config is required to predict")
        settings = self.settings
        started = time.monotonic()
        deadline = started + settings.predict_timeout
        model = self.services.model(wait=min(60.0, settings.predict_timeout / 2))
        refs = self.refresh_references(timeout=max(1.0, min(30.0, (deadline - time.monotonic()) / 3)))
        version = self.model_version(refs)
        empty = {"result": [], "score": 0.0, "model_version": version}
        if not refs:
            log.warning("project %s: no annotated task yet%s: the %d task(s) get an empty prediction. Annotate "
                        "at least one task (brush or polygon regions), then retrieve predictions again.",
                        self.project_id, f" among reference_task_ids {self.reference_task_ids}"
                        if self.reference_task_ids else "", len(tasks))
            self.services.metrics.add("predict_without_references")
            return [dict(empty) for _ in tasks]
        fetcher = self.services.fetcher_for(self.record)
        outcome = [{"regions": [], "scores": [], "failed": False, "missed": False} for _ in tasks]
        for view in self.spec.views:
            prepared = self._prepare_references(refs, view, fetcher, deadline)
            if time.monotonic() > deadline:  # the references took the whole budget (they stay cached)
                for item in outcome:
                    item["missed"] = True
                break
            if not prepared:
                log.warning("project %s: none of the %d annotated task(s) has usable regions on <Image name=%r>",
                            self.project_id, len(refs), view.image_name)
                continue
            self._predict_view(model, tasks, view, prepared, fetcher, outcome, deadline)
        results, left, failed = [], 0, 0
        for item in outcome:
            if item["missed"] and not item["regions"]:
                left += 1
                results.append([])  # not reached in time: no prediction now, a later retrieval does it
            elif item["failed"] and not item["regions"]:
                failed += 1
                results.append([])  # no prediction now (the log says why): a later retrieval tries again
            else:
                score = float(np.mean(item["scores"])) if item["scores"] else 0.0
                results.append({"result": item["regions"], "score": round(score, 4), "model_version": version})
        seconds = time.monotonic() - started
        done = len(tasks) - left - failed
        self.services.metrics.add("tasks_predicted", done)
        self.services.metrics.add("tasks_failed", failed)
        self.services.metrics.add("tasks_left_for_later", left)
        self.services.metrics.last_predict = {"project": self.project_id, "tasks": len(tasks), "predicted": done,
                                              "failed": failed, "left": left, "seconds": round(seconds, 2),
                                              "references": len(refs), "model_version": version}
        log.info("project %s: predicted %d of %d task(s) in %.1f s from %d reference(s) (%s)", self.project_id,
                 done, len(tasks), seconds, len(refs), version)
        if left:
            log.warning("project %s: %d task(s) were not reached within %.0f s (SEGGPT_PREDICT_TIMEOUT) and get no "
                        "prediction now; run 'Retrieve predictions' again (tasks that have one are skipped), or "
                        "raise ML_TIMEOUT_PREDICT in Label Studio's environment and --predict-timeout here",
                        self.project_id, left, settings.predict_timeout)
        return results

    def _predict_view(self, model, tasks, view, prepared, fetcher, outcome, deadline) -> None:
        from seggpt_plugins.images import to_rgb8

        settings = self.settings
        embeddings = np.stack([p["embedding"] for p in prepared])
        label_ids = list(view.label_ids.values())
        chunk = max(1, settings.batch_size)
        last_chunk_s = 0.0
        for start in range(0, len(tasks), chunk):
            if time.monotonic() + 1.2 * last_chunk_s > deadline:
                for i in range(start, len(tasks)):
                    outcome[i]["missed"] = True
                return
            chunk_started = time.monotonic()
            indices = list(range(start, min(start + chunk, len(tasks))))

            def load(i):
                task = tasks[i]
                try:
                    if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
                        raise MediaError("the task has no 'data' object")
                    value = task["data"].get(view.value_key)
                    if value is None:
                        raise MediaError(f"the task data has no {view.value_key!r} field "
                                         f"(<Image name={view.image_name!r} value=\"${view.value_key}\">)")
                    return to_rgb8(fetcher.fetch_image(value, task.get("id")), name=f"task {task.get('id')} image")
                except (MediaError, ValueError) as exc:
                    log.warning("project %s: task %s gets no prediction: %s", self.project_id,
                                task.get("id") if isinstance(task, dict) else "?", exc)
                    return None

            with ThreadPoolExecutor(min(DOWNLOAD_THREADS, len(indices))) as pool:
                images = list(pool.map(load, indices))
            targets, prompt_images, prompt_masks, owners = [], [], [], []
            for i, rgb in zip(indices, images):
                if rgb is None:
                    outcome[i]["failed"] = True
                    continue
                task_id = tasks[i].get("id")
                candidates = [k for k, p in enumerate(prepared) if p["ref"].task_id != task_id]
                if not candidates:  # the task is the only reference: nothing else to learn from
                    continue
                chosen = [candidates[k] for k in most_similar(embed(rgb), embeddings[candidates], self.max_prompts)]
                targets.append(rgb)
                prompt_images.append([prepared[k]["rgb"] for k in chosen])
                prompt_masks.append([prepared[k]["mask"] for k in chosen])
                owners.append(i)
            if targets:
                predictions = self._segment(model, targets, prompt_images, prompt_masks, label_ids, owners, tasks,
                                            deadline)
                if predictions is None:  # other requests held the model until the deadline
                    for i in range(start, len(tasks)):
                        outcome[i]["missed"] = True
                    return
                for i, prediction, masks in zip(owners, predictions, prompt_masks):
                    if prediction is None:
                        outcome[i]["failed"] = True
                        continue
                    shown = np.unique(np.concatenate([np.unique(m) for m in masks]))
                    unseen = np.isin(prediction.labels, shown, invert=True)
                    if unseen.any():  # a label no prompt of this target shows cannot be meant: background
                        prediction.labels[unseen] = 0
                    outcome[i]["regions"].extend(prediction_to_results(
                        prediction.labels, prediction.scores, view, prefer=self.prefer, min_area=self.min_area,
                        tolerance=self.polygon_tolerance))
                    outcome[i]["scores"].append(prediction.confidence if prediction.labels.any() else 0.0)
            last_chunk_s = time.monotonic() - chunk_started

    def _segment(self, model, targets, prompt_images, prompt_masks, label_ids, owners, tasks, deadline):
        """The batched forward passes, one request at a time per process; None if the model stayed busy
        until the deadline. A batch that fails on bad input is retried target by target."""
        from seggpt_plugins import InputError

        kwargs = dict(batch_size=self.settings.batch_size, seg_type=self.seg_type, label_ids=label_ids)
        if not self.services.inference_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return None
        try:
            try:
                return model.segment(targets, prompt_images, prompt_masks, **kwargs)
            except InputError as exc:
                log.warning("project %s: a batch failed (%s); retrying its targets one by one", self.project_id, exc)
            predictions = []
            for target, images, masks, i in zip(targets, prompt_images, prompt_masks, owners):
                try:
                    predictions.append(model.segment([target], [images], [masks], **kwargs)[0])
                except InputError as exc:
                    log.warning("project %s: task %s gets no prediction: %s", self.project_id, tasks[i].get("id"), exc)
                    predictions.append(None)
            return predictions
        finally:
            self.services.inference_lock.release()

    # ------------------------------------------------------------------------------------------- fit

    def fit(self, event: str, data: dict, hint_only: bool = False, **kwargs) -> dict:
        """Webhook events: annotations become, change or stop being references. Nothing is trained.

        hint_only: the payload is not trusted (no credentials): the references are only listed again.
        """
        if hint_only:
            self.services.store.invalidate(self.project_id)
            summary = "references will be listed again (unauthenticated webhook: payload not used)"
        else:
            summary = self.services.store.apply_event(self.project_id, event, data, self.reference_task_ids)
        generation = self.services.state.bump(self.project_id)
        self.record = self.services.state.get(self.project_id)
        log.info("project %s: %s: %s (generation %d)", self.project_id, event, summary, generation)
        return {"event": event, "project": self.project_id, "references": summary}


__all__ = ["SegGPTBackend", "Services", "RequestError", "ModelNotReady", "ConfigError", "check_params",
           "parse_project_id", "PARAMS"]
