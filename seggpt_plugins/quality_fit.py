"""Fitting the quality estimate (quality.py) on generated tasks whose truth is known: `seggpt fit-quality`.

    rows, ious = generated_samples(model, 300, FIT_SEED, objects=objects)   # every candidate feature
    save_models("quality.json", fit_models(rows, ious, objects), fitted_on="...")

Each estimate is a fixed blend of standardised features (quality.BLENDS, quality.OBJECT_BLEND); `fit`
fits only the curve that maps the blend to an IoU. The benchmarks judge the fitted estimates on held-out
generated tasks (HELD_OUT_SEED) and real nuclei (benchmarks/eval_quality.py, docs/quality.md).
The runtime estimate never imports this module.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .colors import ColorCode
from .instances import find_instances
from .io import atomic_write
from .quality import (BLENDS, CANDIDATES, FEATURE_GROUPS, OBJECT_BLEND, OBJECT_CANDIDATES, OBJECT_MODEL,
                      QualityModel, agreement, models_document, object_features)
from .synthetic import SyntheticTasks

FIT_SEED = 30_000_000  # generated tasks the estimate is fitted on (training uses seeds far below)
HELD_OUT_SEED = 20_240_403  # the held-out generated tasks every evaluation uses


def fit(rows: list[dict[str, float]], ious: list[float], blend: dict[str, float]) -> QualityModel:
    """Calibrate a fixed blend of features to the true IoUs: the features are standardised over `rows`,
    summed with the `blend` weights, and only the curve's slope and offset are fitted (least squares of
    sigmoid(a * score + b) against the IoUs). Fixed weights keep the estimate from leaning on features
    that predict errors on generated tasks but not on real images (see docs/quality.md)."""
    from scipy.optimize import minimize

    names = tuple(blend)
    x = np.array([[r[n] for n in names] for r in rows], np.float64)
    y = np.asarray(ious, np.float64)
    mean, scale = np.nanmean(x, 0), np.nanstd(x, 0) + 1e-6  # (NaN: a feature that could not be read)
    direction = np.array([blend[n] for n in names], np.float64)
    score = np.nan_to_num((x - mean) / scale) @ direction

    def loss(theta):
        p = 1.0 / (1.0 + np.exp(-(theta[0] * score + theta[1])))
        residual = p - y
        grad_p = 2 * residual * p * (1 - p) / len(y)
        return float((residual ** 2).mean()), np.array([(grad_p * score).sum(), grad_p.sum()])

    slope, bias = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B").x
    return QualityModel(names, mean, scale, slope * direction, float(bias))


def fit_models(rows: list[dict], ious: list[float], objects: list[tuple[dict, float]] | None = None
               ) -> dict[str, QualityModel]:
    """The "fast" and "full" estimates calibrated on the same samples, and the per-object one on `objects`
    ((object features, true IoU) of the same tasks' objects, `generated_samples(objects=...)`) when given."""
    models = {name: fit(rows, ious, blend) for name, blend in BLENDS.items()}
    if objects:
        models[OBJECT_MODEL] = fit([row for row, _ in objects], [iou for _, iou in objects], OBJECT_BLEND)
    return models


def save_models(path, models: dict[str, QualityModel], fitted_on: str) -> None:
    """One file holding the "fast" and "full" estimates fitted for one set of weights, and optionally the
    per-object one (OBJECT_MODEL) (replaced whole); quality.load_models reads it."""
    text = json.dumps(models_document(models, fitted_on), indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"), overwrite=True)


@contextmanager
def reading_every_candidate(model):
    """Within it, the model's estimates are stand-ins that read every candidate feature (what fitting and the
    benchmarks need: `Prediction.quality_features` then holds them all; "fast" reads no mirrored target)."""
    def placeholder(names):
        return QualityModel(names, np.zeros(len(names)), np.ones(len(names)), np.zeros(len(names)), 0.0)

    fast = tuple(n for n in CANDIDATES if n not in FEATURE_GROUPS["flip"])
    saved, model._quality_models = model._quality_models, {"fast": placeholder(fast), "full": placeholder(CANDIDATES),
                                                           OBJECT_MODEL: placeholder(OBJECT_CANDIDATES)}
    try:
        yield model
    finally:
        model._quality_models = saved


def generated_samples(model, count: int, seed: int = FIT_SEED, prompts=(1, 2, 3), objects: list | None = None,
                      quality: str = "full") -> tuple[list[dict], list[float]]:
    """The `quality` ("full": all) features and the true IoU (mean over labels, quality.agreement) of `count`
    generated tasks (synthetic.py, deterministic in `seed`; the prompt count cycles through `prompts`).
    objects: a list that receives (object features, IoU with the true object it overlaps best) of each
    predicted object (Prediction.instances(), defaults), the truth's objects being its connected parts."""
    generator = SyntheticTasks(model.input_size[0], device="cpu")
    to_np = lambda t: t.permute(1, 2, 0).round().clamp(0, 255).byte().numpy()  # noqa: E731
    rows, ious = [], []
    with reading_every_candidate(model):
        for k in range(count):
            count_k = prompts[k % len(prompts)]
            batch = generator.sample(1, prompts=count_k, seed=seed + k)
            images = [to_np(batch.prompt_images[0, i] * 255) for i in range(count_k)]
            masks = [to_np(batch.prompt_masks[0, i]) for i in range(count_k)]
            truth = to_np(batch.target_masks[0])
            if not any(m.any() for m in masks):
                continue  # nothing to learn from: not a task
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # empty example masks of generated tasks
                pred = model.segment(to_np(batch.target_images[0] * 255), images, masks, seg_type=batch.seg_type,
                                     quality=quality)[0]
            code, prompt_code = ColorCode.from_masks(masks + [truth]), ColorCode.from_masks(masks)
            predicted, true_labels = code.labels_of_colors(prompt_code.encode(pred.labels)), code.labels_of_colors(truth)
            rows.append(pred.quality_features)
            ious.append(agreement(predicted, true_labels))
            if objects is not None and pred.object_context is not None:
                found, truth_objects = find_instances(predicted, pred.scores), find_instances(true_labels, min_area=1)
                context = pred.object_context
                values = object_features(found.map, pred.scores, context.foreground / 255, context.stride,
                                         context.diameter)
                matched = object_ious(found.map, truth_objects.map, {o.id: o.class_id for o in found.objects},
                                      {o.id: o.class_id for o in truth_objects.objects})
                objects.extend((values[i], matched[i]) for i in values)
    return rows, ious


def object_ious(predicted: np.ndarray, truth: np.ndarray, predicted_classes: dict[int, int] | None = None,
                true_classes: dict[int, int] | None = None) -> dict[int, float]:
    """{predicted object id: IoU with the true object it overlaps best} of two instance maps of one image
    (objects of another class never match when classes are given; 0 when an object overlaps none)."""
    pred_ids, pred_index = np.unique(predicted, return_inverse=True)
    true_ids, true_index = np.unique(truth, return_inverse=True)
    overlap = np.bincount(pred_index.ravel() * len(true_ids) + true_index.ravel(),
                          minlength=len(pred_ids) * len(true_ids)).reshape(len(pred_ids), len(true_ids))
    union = overlap.sum(1)[:, None] + overlap.sum(0)[None, :] - overlap
    iou = overlap / np.maximum(union, 1)
    iou[:, true_ids == 0] = 0
    if predicted_classes is not None and true_classes is not None:
        same = np.array([[predicted_classes.get(int(p), -1) == true_classes.get(int(t), -2) for t in true_ids]
                         for p in pred_ids])
        iou = np.where(same, iou, 0)
    return {int(p): float(iou[k].max()) if len(true_ids) else 0.0 for k, p in enumerate(pred_ids) if p != 0}
