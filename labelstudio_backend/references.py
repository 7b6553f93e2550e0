"""References: the project's own annotated tasks, which become SegGPT's prompts.

They are listed through the Label Studio SDK (all annotated tasks, or the `reference_task_ids` named in the
ML backend's extra params), kept up to date by webhooks, and their images and masks are cached in memory
so one batch of predictions downloads each reference once. Which references a target is shown is the
core's choice (`seggpt_plugins.prompts`: the most alike appearance descriptors).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .params import task_id_of

log = logging.getLogger("seggpt_plugins.labelstudio")

ANNOTATED_FILTER = {"conjunction": "and", "items": [
    {"filter": "filter:tasks:total_annotations", "operator": "greater", "type": "Number", "value": 0}]}


@dataclass(frozen=True)
class Reference:
    task_id: int
    annotation_id: object
    updated: str
    data: dict
    result: tuple  # the annotation's regions (as sent by Label Studio)
    ground_truth: bool = False

    @property
    def key(self) -> tuple:
        return (self.task_id, self.annotation_id, self.updated)


def _field(obj, name, default=None):
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def usable_annotation(annotation) -> bool:
    return (not _field(annotation, "was_cancelled", False)) and bool(_field(annotation, "result") or [])


def pick_annotation(annotations):
    """The annotation of a task that serves as its reference: ground truth first, then the latest one."""
    usable = [a for a in annotations or [] if usable_annotation(a)]
    if not usable:
        return None
    return max(usable, key=lambda a: (bool(_field(a, "ground_truth", False)),
                                      str(_field(a, "updated_at", "") or _field(a, "created_at", "") or ""),
                                      _numeric(_field(a, "id", 0))))


def _numeric(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def reference_from(task, annotation) -> Reference | None:
    task_id = task_id_of(_field(task, "id"))
    data = _field(task, "data")
    if task_id is None or not isinstance(data, dict) or annotation is None:
        return None
    updated = str(_field(annotation, "updated_at", "") or _field(annotation, "created_at", "") or "")
    annotation_id = _field(annotation, "id")
    annotation_id = annotation_id if isinstance(annotation_id, (int, str)) else None
    return Reference(task_id, annotation_id, updated, dict(data),
                     tuple(_field(annotation, "result") or ()), bool(_field(annotation, "ground_truth", False)))


# ------------------------------------------------------------------------------------------- caches


class ByteLRU:
    """A thread-safe LRU cache bounded by the bytes of its values (numpy arrays, or tuples/dicts of them)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def _size(value) -> int:
        if isinstance(value, np.ndarray):
            return value.nbytes
        if isinstance(value, dict):
            return sum(ByteLRU._size(v) for v in value.values())
        if isinstance(value, (tuple, list)):
            return sum(ByteLRU._size(v) for v in value)
        return 64

    def get(self, key):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key][0]
            self.misses += 1
            return None

    def put(self, key, value) -> None:
        size = self._size(value)
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            if size > self.max_bytes:
                return
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes and self._items:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped

    def stats(self) -> dict:
        with self._lock:
            return {"items": len(self._items), "bytes": self._bytes, "hits": self.hits, "misses": self.misses}


# ------------------------------------------------------------------------------------------ the store


@dataclass
class ProjectReferences:
    refs: dict = field(default_factory=dict)  # task id -> Reference
    listed_at: float = 0.0  # time.monotonic() of the last listing through the API (0: never)
    generation: int = -1  # the shared generation that listing saw
    params_key: str = ""  # which reference_task_ids / max_references it was listed for
    dirty: bool = False  # a webhook changed something since the listing
    saved: str = ""  # the fingerprint of the references last written to the state directory
    lock: threading.Lock = field(default_factory=threading.Lock)


def reference_to_json(ref: Reference) -> dict:
    return {"task_id": ref.task_id, "annotation_id": ref.annotation_id, "updated": ref.updated, "data": ref.data,
            "result": list(ref.result), "ground_truth": ref.ground_truth}


def reference_from_json(item: dict) -> Reference | None:
    try:
        return Reference(int(item["task_id"]), item.get("annotation_id"), str(item.get("updated", "")),
                         dict(item["data"]), tuple(item.get("result") or ()), bool(item.get("ground_truth")))
    except (KeyError, TypeError, ValueError):
        return None


class ReferenceStore:
    """The references of each project, in memory; with a persistent state (a state directory) also written
    there, so they survive a restart and reach the other workers (see state.SqliteState)."""

    def __init__(self, max_references: int = 256, state=None):
        self.max_references = max_references
        self.persist = state if getattr(state, "persistent", False) else None
        self._projects: dict[int, ProjectReferences] = {}
        self._lock = threading.Lock()
        self._clients: dict = {}
        self.listings = 0

    def project(self, project_id: int) -> ProjectReferences:
        with self._lock:
            state = self._projects.get(project_id)
            if state is None:
                state = self._projects[project_id] = ProjectReferences()
                self._load(project_id, state)
            return state

    def _load(self, project_id: int, state: ProjectReferences) -> None:
        """The references the state directory holds (after a restart, or written by another worker)."""
        if self.persist is None:
            return
        items = self.persist.load_references(project_id)
        if items is None:
            return
        refs = [r for r in (reference_from_json(i) for i in items if isinstance(i, dict)) if r is not None]
        state.refs = {r.task_id: r for r in refs}
        state.saved = self.fingerprint(refs)

    def _save(self, project_id: int, state: ProjectReferences) -> None:
        if self.persist is None:
            return
        refs = list(state.refs.values())
        fingerprint = self.fingerprint(refs)
        if fingerprint != state.saved:
            self.persist.save_references(project_id, [reference_to_json(r) for r in refs])
            state.saved = fingerprint

    # ------------------------------------------------------------------------------------ listing

    def client(self, base_url: str, api_key: str):
        """The SDK client for a Label Studio URL and key (one per pair, reused)."""
        from label_studio_sdk import LabelStudio

        with self._lock:
            client = self._clients.get((base_url, api_key))
            if client is None:
                client = self._clients[(base_url, api_key)] = LabelStudio(base_url=base_url, api_key=api_key,
                                                                          timeout=30)
            return client

    def list_annotated(self, project_id: int, base_url: str, api_key: str, task_ids=None,
                       timeout: float | None = None) -> dict:
        """{task id: Reference} of the project's annotated tasks (or of `task_ids`), most recent first."""
        query = {"filters": ANNOTATED_FILTER}
        if task_ids:
            query["selectedItems"] = {"all": False, "included": [int(i) for i in task_ids]}
        options = {"timeout": timeout, "max_retries": 0} if timeout else None
        refs = {}
        pager = self.client(base_url, api_key).tasks.list(project=project_id, query=json.dumps(query), fields="all",
                                                           page_size=100, request_options=options)
        for task in pager:
            ref = reference_from(task, pick_annotation(_field(task, "annotations")))
            if ref is not None:
                refs[ref.task_id] = ref
        self.listings += 1
        return self._newest(refs)

    def connections(self, project_id: int, base_url: str, api_key: str, timeout: float | None = None) -> list:
        """The project's model connections (title, url, model_version), as the Prelabeling choice lists them.

        From /api/projects/<id>/model-versions (which the SDK has no method for): /api/ml would make Label
        Studio call every connected backend's /setup first, and this is called from /setup.
        """
        options = {"timeout": timeout, "max_retries": 0} if timeout else None
        response = self.client(base_url, api_key)._client_wrapper.httpx_client.request(
            f"api/projects/{int(project_id)}/model-versions/", method="GET",
            params={"extended": True, "include_live_models": True, "limit": 1}, request_options=options)
        if not 200 <= response.status_code < 300:
            raise LookupError(f"HTTP {response.status_code} from /api/projects/{int(project_id)}/model-versions/")
        live = response.json().get("live")
        return live if isinstance(live, list) else []

    def _newest(self, refs: dict) -> dict:
        if len(refs) <= self.max_references:
            return refs
        keep = sorted(refs.values(), key=lambda r: (r.ground_truth, r.updated, r.task_id), reverse=True)
        log.info("using the %d most recently annotated of %d reference tasks (SEGGPT_MAX_REFERENCES)",
                 self.max_references, len(refs))
        return {r.task_id: r for r in keep[: self.max_references]}

    def refresh(self, project_id: int, generation: int, api, task_ids=None, max_age: float = 10.0,
                timeout: float | None = None) -> str:
        """List the references again unless the last listing is recent, of this generation, and not dirty.

        api: (base_url, api_key) or None (then the references are what webhooks delivered). Returns
        "fresh", "listed", "webhooks-only" or "failed" (the previous references stay in use).
        """
        state = self.project(project_id)
        params_key = json.dumps(sorted(int(i) for i in task_ids) if task_ids else None)
        if api is None:
            with state.lock:
                if state.generation != generation:  # a webhook reached another worker (or came before a restart)
                    self._load(project_id, state)
                    state.generation = generation
            return "webhooks-only"
        with state.lock:
            if (state.listed_at and time.monotonic() - state.listed_at < max_age and state.generation == generation
                    and not state.dirty and state.params_key == params_key):
                return "fresh"
            try:
                refs = self.list_annotated(project_id, api[0], api[1], task_ids, timeout=timeout)
            except Exception as exc:
                log.warning("project %s: cannot list the annotated tasks through the Label Studio API (%s: %s); "
                            "using the %d references known so far", project_id, type(exc).__name__,
                            str(exc)[:300], len(state.refs))
                return "failed"
            state.refs, state.listed_at, state.generation = refs, time.monotonic(), generation
            state.params_key, state.dirty = params_key, False
            self._save(project_id, state)
            return "listed"

    def references(self, project_id: int, task_ids=None) -> list[Reference]:
        state = self.project(project_id)
        with state.lock:
            refs = list(state.refs.values())
        if task_ids:
            wanted = {int(i) for i in task_ids}
            refs = [r for r in refs if r.task_id in wanted]
        return sorted(refs, key=lambda r: r.task_id)

    @staticmethod
    def fingerprint(refs: list[Reference]) -> str:
        digest = hashlib.sha256()
        for ref in sorted(refs, key=lambda r: r.task_id):
            digest.update(f"{ref.task_id}:{ref.annotation_id}:{ref.updated}:".encode())
            digest.update(hashlib.sha256(json.dumps(ref.result, sort_keys=True, default=str).encode()).digest())
        return digest.hexdigest()[:10]

    # ----------------------------------------------------------------------------------- webhooks

    def invalidate(self, project_id: int) -> None:
        state = self.project(project_id)
        with state.lock:
            state.dirty = True

    def apply_event(self, project_id: int, action: str, payload: dict, task_ids=None) -> str:
        """Update the project's references from a webhook payload; returns what changed, for the log."""
        state = self.project(project_id)
        with state.lock:
            self._load(project_id, state)  # what the other workers wrote since
            summary = self._apply(state, action, payload, task_ids)
            self._save(project_id, state)
            return summary

    def _apply(self, state: ProjectReferences, action: str, payload: dict, task_ids=None) -> str:
        wanted = {int(i) for i in task_ids} if task_ids else None
        state.dirty = True
        if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"):
            annotations = payload.get("annotation")
            tasks = payload.get("task")
            annotations = annotations if isinstance(annotations, list) else [annotations]
            tasks = tasks if isinstance(tasks, list) else [tasks]
            by_id = {task_id_of(_field(t, "id")): t for t in tasks if isinstance(t, dict)}
            changed = 0
            for annotation in annotations:
                if not isinstance(annotation, dict):
                    continue
                task_id = annotation.get("task")
                task_id = task_id_of(task_id.get("id") if isinstance(task_id, dict) else task_id)
                task = by_id.get(task_id) or (tasks[0] if len(tasks) == 1 and isinstance(tasks[0], dict) else None)
                tid = task_id_of(task.get("id")) if task is not None else None
                if tid is None or (wanted is not None and tid not in wanted):
                    continue
                current = state.refs.get(tid)
                if not usable_annotation(annotation):
                    if current is not None and current.annotation_id == annotation.get("id"):
                        del state.refs[current.task_id]
                        changed += 1
                    continue
                ref = reference_from(task, annotation)
                if ref is None or (current is not None and current.ground_truth and not ref.ground_truth
                                   and current.annotation_id != ref.annotation_id):
                    continue
                state.refs[ref.task_id] = ref
                changed += 1
            return f"{changed} reference(s) added or updated"
        if action == "ANNOTATIONS_DELETED":
            listed = payload.get("annotations") if isinstance(payload.get("annotations"), list) else []
            gone = {_field(a, "id") for a in listed if isinstance(a, dict) and isinstance(_field(a, "id"), (int, str))}
            dropped = [t for t, r in state.refs.items() if r.annotation_id in gone]
            for task_id in dropped:
                del state.refs[task_id]
            return f"{len(dropped)} reference(s) removed"
        if action == "TASKS_DELETED":
            listed = payload.get("tasks") if isinstance(payload.get("tasks"), list) else []
            gone = {task_id_of(_field(t, "id")) for t in listed if isinstance(t, dict)}
            dropped = [t for t in state.refs if t in gone]
            for task_id in dropped:
                del state.refs[task_id]
            return f"{len(dropped)} reference(s) removed"
        return "references will be listed again"
