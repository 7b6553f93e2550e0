"""`seggpt labelstudio predict`, the segmenting stage (bulk.py runs the stages): per view of the config, the
annotated tasks written as (image, mask) prompt files and the targets' images downloaded into the working
folder, then seggpt_plugins.scale.run over a manifest of them, its objects read back as Label Studio
regions."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np

from seggpt_plugins.io import atomic_write, write_png

from .bulk_project import _field
from .labeling import View, annotation_to_mask, prediction_to_results
from .media import MediaError

log = logging.getLogger("seggpt_plugins.labelstudio")


class Segmenting:
    """ProjectPredictor's segmenting stage (a mixin: the state is ProjectPredictor's)."""

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
                       quality=settings.quality,  # SEGGPT_QUALITY
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


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40] or "image"
