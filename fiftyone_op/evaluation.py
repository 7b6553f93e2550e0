"""Evaluation of a run's predictions against a Segmentation ground truth: evaluate_segmentations and mIoU."""

from __future__ import annotations

import numpy as np

from seggpt_plugins.fiftyone.options import Options

METRIC = "@seggpt/seggpt/miou"  # the id of the mIoU among the evaluation's custom metrics
BACKGROUND_COUNTED = True  # the mIoU averages every class, background included


def iou_from_confusion(matrix: np.ndarray, classes) -> tuple[dict, float | None]:
    """Per-class IoU = diag / (row + col - diag) (rows: ground truth, columns: prediction), over the
    classes present in either; mIoU is their mean (background included when it is a class)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - tp
    iou = {str(c): float(tp[i] / union[i]) for i, c in enumerate(classes) if union[i] > 0}
    return iou, (float(np.mean(list(iou.values()))) if iou else None)


def store_iou(results, iou: dict, miou: float | None) -> None:
    """Keep the mIoU and per-class IoU with a stored evaluation: as custom metrics of its results (the
    Model Evaluation panel lists them, `results.metrics()` has them) and in its config
    (`dataset.get_evaluation_info(key).config.miou`, `.class_iou`, `.miou_counts_background`)."""
    counted = "background counted" if BACKGROUND_COUNTED else "background not counted"
    metrics = {METRIC: {"key": "miou", "value": miou, "label": f"mIoU ({counted})", "lower_is_better": False}}
    for name, value in iou.items():
        metrics[f"{METRIC}/{name}"] = {"key": f"iou_{name}", "value": value, "label": f"IoU {name}",
                                       "lower_is_better": False}
    results.custom_metrics = {**(results.custom_metrics or {}), **metrics}
    results.save()
    results.config.miou = miou
    results.config.class_iou = dict(iou)
    results.config.miou_counts_background = BACKGROUND_COUNTED
    results.save_config()


def evaluate(dataset, opts: Options, sample_ids: list[str], eval_key: str | None) -> dict:
    """evaluate_segmentations over the given samples that have both fields; mIoU from its confusion matrix.

    eval_key: store the evaluation (per-sample accuracy/precision/recall fields and the run) under this key,
    replacing an earlier one; None computes without writing (shard runs: workers must not edit the schema
    concurrently).
    """
    import fiftyone.core.fields as fof

    view = dataset.select(sample_ids).exists(opts.output_field).exists(opts.gt_field)
    count = len(view)
    if not count:
        return {"samples": 0, "note": f"no sample has both '{opts.output_field}' and '{opts.gt_field}'"}
    targets = (dataset.mask_targets.get(opts.gt_field) or dataset.mask_targets.get(opts.output_field)
               or dataset.default_mask_targets or None)
    if targets:
        targets = dict(targets)
        if fof.is_rgb_mask_targets(targets):
            targets = {k.lower(): v for k, v in targets.items()}
            targets.setdefault("#000000", "background")
        else:
            targets.setdefault(0, "background")
    if eval_key is not None and eval_key in dataset.list_evaluations():
        dataset.delete_evaluation(eval_key)
    results = view.evaluate_segmentations(opts.output_field, gt_field=opts.gt_field, eval_key=eval_key,
                                          mask_targets=targets, progress=False)
    iou, miou = iou_from_confusion(results.pixel_confusion_matrix, results.classes)
    if eval_key is not None:
        store_iou(results, iou, miou)
    metrics = results.metrics()
    return {"samples": count, "eval_key": eval_key, "miou": miou, "iou": iou,
            "accuracy": float(metrics["accuracy"]), "precision": float(metrics["precision"]),
            "recall": float(metrics["recall"]), "fscore": float(metrics["fscore"])}
