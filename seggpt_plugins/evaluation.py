"""How good a model is: mIoU on held-out generated tasks (`evaluate_generated`) and on held-out samples of a
dataset (`evaluate_samples`), through the public `SegGPT.segment`."""

from __future__ import annotations

import numpy as np

from .datasets import PairedSamples


def iou_per_label(pred: np.ndarray, truth: np.ndarray, ids) -> dict[int, float]:
    """IoU of each label id present in truth or prediction (ids absent from both are skipped)."""
    out = {}
    for i in ids:
        p, t = pred == i, truth == i
        union = np.logical_or(p, t).sum()
        if union:
            out[int(i)] = float(np.logical_and(p, t).sum() / union)
    return out


def evaluate_generated(net_or_model, tasks: int = 96, prompts: int = 1, seed: int = 20_240_403, device=None,
                       family: str | None = None) -> dict:
    """mIoU on a fixed held-out set of generated tasks (seeds outside the training range).

    Each task goes through the public `SegGPT.segment` with its RGB colour prompts; labels are the
    prompt's colours in sorted order, and the target's truth is read through the same colour code.
    """
    from .colors import ColorCode
    from .engine import SegGPT
    from .synthetic import SyntheticTasks

    model = net_or_model if isinstance(net_or_model, SegGPT) else SegGPT(net_or_model, device=device, dtype="float32")
    generator = SyntheticTasks(model.input_size[0], device="cpu")
    per_family: dict[str, list[float]] = {"semantic": [], "tracking": []}
    for k in range(tasks):
        fam = family or ("tracking" if k % 3 == 2 else "semantic")
        batch = generator.sample(1, prompts=prompts, seed=seed + k, family=fam)
        to_np = lambda t: t.permute(1, 2, 0).round().clamp(0, 255).byte().numpy()  # noqa: E731
        prompt_images = [to_np(batch.prompt_images[0, i] * 255) for i in range(prompts)]
        prompt_masks = [to_np(batch.prompt_masks[0, i]) for i in range(prompts)]
        truth_rgb = to_np(batch.target_masks[0])
        code = ColorCode.from_masks(prompt_masks + [truth_rgb])
        if len(code) == 0:
            continue
        prediction = model.segment(to_np(batch.target_images[0] * 255), prompt_images, prompt_masks,
                                   seg_type=batch.seg_type)[0]
        # prediction ids follow the prompts' colour code; read them back through the joint code by colour
        predicted = code.labels_of_colors(ColorCode.from_masks(prompt_masks).encode(prediction.labels))
        truth = code.labels_of_colors(truth_rgb)
        scores = iou_per_label(predicted, truth, code.ids)
        per_family[fam].extend(scores.values())
    all_scores = per_family["semantic"] + per_family["tracking"]
    return {"miou": round(float(np.mean(all_scores)), 4) if all_scores else 0.0,
            "miou_semantic": round(float(np.mean(per_family["semantic"])), 4) if per_family["semantic"] else None,
            "miou_tracking": round(float(np.mean(per_family["tracking"])), 4) if per_family["tracking"] else None,
            "tasks": tasks, "prompts": prompts, "seed": seed}


def evaluate_samples(net_or_model, prompts_from: PairedSamples, held_out: PairedSamples, prompts: int = 1,
                     device=None, tuned=None) -> dict:
    """mIoU per class on held-out samples, with prompts from the training samples of the same task."""
    from .engine import SegGPT

    model = net_or_model if isinstance(net_or_model, SegGPT) else SegGPT(net_or_model, device=device, dtype="float32")
    per_class: dict[int, list[float]] = {}
    for task, items in held_out.tasks.items():
        examples = prompts_from.tasks.get(task, [])[:prompts]
        if tuned is not None:
            prompt_images, prompt_masks = [tuned], None
        elif examples:
            prompt_images, prompt_masks = [e[0] for e in examples], [e[1] for e in examples]
        else:
            continue
        predictions = model.segment([image for image, _ in items], prompt_images, prompt_masks,
                                    label_ids=None if tuned is not None else held_out.ids)
        for prediction, (_, truth) in zip(predictions, items):
            for label, value in iou_per_label(prediction.labels, truth, held_out.ids).items():
                per_class.setdefault(label, []).append(value)
    means = {str(k): round(float(np.mean(v)), 4) for k, v in sorted(per_class.items())}
    return {"miou": round(float(np.mean(list(means.values()))), 4) if means else 0.0, "iou_per_class": means}
