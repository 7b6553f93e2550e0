"""`seggpt labelstudio predict`, the posting stage (bulk.py runs the stages): the predictions imported in
batches, then this backend's predictions of older versions on those tasks deleted."""

from __future__ import annotations

import logging

from .bulk_project import _field

log = logging.getLogger("seggpt_plugins.labelstudio")


class Posting:
    """ProjectPredictor's posting stage (a mixin: the state is ProjectPredictor's)."""

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
