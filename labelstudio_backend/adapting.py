"""Adapting the model to a project's annotations: Label Studio's ml-backend `fit` convention (issue 31).

With `--adapt-seconds S` (SEGGPT_ADAPT_SECONDS; 0, the default, leaves the model as it is), an annotation
event (ANNOTATION_CREATED, ANNOTATION_UPDATED, START_TRAINING) asks for the project's model to be adapted to
its references (the core's `SegGPT.adapt`, at most S seconds, always from the loaded model). One thread
per worker process runs the adaptations, one at a time; /predict never waits for them and keeps the model
it has until an adaptation beats it on its held-out corner. From then on the project's predictions come
from the adapted model and its fingerprint is in the backend's model version. Events during a run ask for
one more run after it. The adapted model is saved in the state directory (adapted/project-<id>), so that
a restart, or another worker process, uses it too.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("seggpt_plugins.labelstudio")

ADAPT_EVENTS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "START_TRAINING"})
ADAPTED = "adapted"  # under the state directory: one model directory per project
#: what a run learns from: (label config) -> (images, label masks); made by the server per request
PairsFor = Callable[[str], "tuple[list, list]"]


class ProjectAdaptations:
    """The adapted models of one worker process's projects, and the thread that makes them.

    Args:
        seconds: the time limit of one adaptation; 0 turns adaptation off.
        base: returns the loaded model (waiting for it), from which every adaptation starts.
        load: loads a saved model directory the way the base model was loaded.
        folder: where adapted models are saved (None: kept in memory only).
        metrics: the process's Metrics (adaptations_started / _kept / _not_better / _failed).
        steps: the step cap of one adaptation (the learning-rate schedule spans it).
    """

    def __init__(self, seconds: float, base: Callable[[], Any], load: Callable[[str], Any],
                 folder: str | Path | None, metrics, steps: int = 300) -> None:
        self.seconds, self.base, self.load, self.metrics = float(seconds), base, load, metrics
        self.steps = int(steps)
        self.folder = Path(folder) / ADAPTED if folder else None
        self._pending: dict[int, tuple[str, PairsFor]] = {}
        self._models: dict[int, tuple[int | None, Any]] = {}  # project -> (saved stamp, model)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.running: int | None = None  # the project being adapted now
        self.last: dict[int, str] = {}  # project -> its last adaptation's one-line summary

    @property
    def enabled(self) -> bool:
        return self.seconds > 0

    def request(self, project_id: int, label_config: str | None, pairs_for: PairsFor) -> str:
        """Ask for the project to be adapted to its references (as soon as the thread is free); returns what
        happens, for the log."""
        if not self.enabled:
            return "no adaptation (--adapt-seconds 0)"
        if not label_config:
            return "no adaptation yet: the project's labeling config is not known (it comes with /setup or /predict)"
        with self._lock:
            self._pending[project_id] = (label_config, pairs_for)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="seggpt-adapt", daemon=True)
                self._thread.start()
            running = self.running
        self._wake.set()
        return ("adaptation queued after the one running" if running is not None
                else f"adaptation queued (at most {self.seconds:g} s)")

    def model_for(self, project_id: int, base):
        """The project's adapted model when it has one (made here, or saved by this or another worker
        process), else `base`."""
        saved = self._saved_stamp(project_id)
        with self._lock:
            known = self._models.get(project_id)
        if known is not None and (saved is None or known[0] == saved):
            return known[1]
        if saved is None:
            return base
        try:
            model = self.load(str(self._path(project_id)))
        except Exception as exc:  # a half-written or foreign directory: the base model goes on
            log.warning("project %s: the adapted model in %s cannot be loaded (%s: %s); using the loaded model",
                        project_id, self._path(project_id), type(exc).__name__, exc)
            return base
        with self._lock:
            self._models[project_id] = (saved, model)
        return model

    def known(self, project_id: int):
        """The project's adapted model when this process holds one (nothing is loaded), else None."""
        with self._lock:
            known = self._models.get(project_id)
        return known[1] if known else None

    # ------------------------------------------------------------------------------------------ thread

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            with self._lock:
                if not self._pending:
                    self._wake.clear()
                    continue
                project_id = next(iter(self._pending))
                label_config, pairs_for = self._pending.pop(project_id)
                self.running = project_id
            try:
                self._adapt(project_id, label_config, pairs_for)
            except Exception as exc:  # the next event tries again; predictions go on with the model they have
                self.metrics.add("adaptations_failed")
                self.last[project_id] = f"failed: {type(exc).__name__}: {exc}"
                log.warning("project %s: adaptation failed: %s: %s", project_id, type(exc).__name__, exc)
            finally:
                with self._lock:
                    self.running = None

    def _adapt(self, project_id: int, label_config: str, pairs_for: PairsFor) -> None:
        from seggpt_plugins.adapted import summary_line

        base = self.base()
        images, masks = pairs_for(label_config)
        if not images:
            self.last[project_id] = "nothing to adapt to: no reference with regions"
            log.info("project %s: no adaptation: no reference with regions on an <Image>", project_id)
            return
        self.metrics.add("adaptations_started")
        started = time.monotonic()
        adapted = base.adapt(images, masks, time_limit=self.seconds, steps=self.steps,
                             example_ids="classes")  # labels, as /predict
        info = adapted.adaptation
        line = summary_line(info, f"{len(images)} reference(s)")
        if not info["improved"]:
            self.last[project_id] = line
            self.metrics.add("adaptations_not_better")
            log.info("project %s: %s; predictions keep the model they have", project_id, line)
            return
        stamp = None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            adapted.save_pretrained(self._path(project_id), overwrite=True)  # written beside, renamed into place
            stamp = self._saved_stamp(project_id)
        with self._lock:
            self._models[project_id] = (stamp, adapted)
        self.metrics.add("adaptations_kept")
        self.last[project_id] = line  # said once the adapted model is in place (saved and serving)
        log.info("project %s: %s (%.0f s); its predictions now come from the adapted model (%s)", project_id, line,
                 time.monotonic() - started, getattr(adapted, "fingerprint", "?"))

    def _path(self, project_id: int) -> Path | None:
        return self.folder / f"project-{int(project_id)}" if self.folder is not None else None

    def _saved_stamp(self, project_id: int) -> int | None:
        """When the project's adapted model was saved (adaptation.json's mtime), None when it has none."""
        path = self._path(project_id)
        try:
            return (path / "adaptation.json").stat().st_mtime_ns if path is not None else None
        except OSError:
            return None


__all__ = ["ADAPT_EVENTS", "ProjectAdaptations"]
