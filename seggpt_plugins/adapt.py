"""Adapting a model to a person's few labelled examples (`SegGPT.adapt`, `seggpt adapt`).

A thin orchestration over training.py: the examples are read as `prepare_prompts` reads them (one
intensity range, instance ids as one class), one corner square of the largest example is held out,
and the network is fine-tuned (training.make_optimizer / train_step, the painting loss) on in-context
tasks cut from the rest only: a prompt (the whole remaining region, or a crop of it) and a target crop,
each flipped, cropped at a random scale and jittered in intensity, coloured with the inference colour
code or random colours. Every `eval_every` steps the held-out square is segmented through the public
`SegGPT.segment` with the remaining regions as examples; the weights with the best held-out IoU are
kept (the base weights count as step 0), and the run stops after `patience` evaluations without
improvement, at `steps`, at `time_limit` (steps since the last evaluation are then evaluated, past it), or
when `cancel()` says so. Last, with `AdaptSettings(fit_margin=True)`, the foreground margin (how the paintings
are read, colors.favour_background) is chosen on the same square for the kept weights (`fit_margin`).
Memory stays bounded: one batch of crops at a time and one copy of the trainable parameters (the best state).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from .errors import InputError

MIN_HELD_OUT = 8  # pixels: the held-out square's side at least
MARGINS = tuple(k / 10 for k in range(10))  # the foreground margins tried on the held-out square (0 .. 0.9)
MARGIN_GAIN = 0.005  # held-out IoU another margin must add over the base model's to replace it


@dataclass
class AdaptSettings:
    """How `adapt` trains. trainable: "auto" (all weights for models under 60 M parameters, else the
    decoder and the last 4 blocks, which bounds the optimiser's memory), or as `seggpt finetune --trainable`."""

    steps: int = 300  # the step cap (the learning-rate schedule spans it)
    time_limit: float | None = 180.0  # seconds, evaluations included; None: no limit
    batch_size: int = 4
    # at 1e-4 (the earlier default) a few examples swing the weights between over- and under-painting from one
    # evaluation to the next; 3e-5 keeps more from the design tiles (BENCHMARKS.md section 16)
    lr: float = 3e-5
    warmup: int = 10
    weight_decay: float = 0.05
    # the loss's weight on the examples' foreground pixels (training.painting_loss): "balanced"
    # (balanced_foreground_weight: the training regions' background share over their foreground share, 1..10),
    # or a number (10 as the demo was trained, which teaches a few examples to over-paint). From two of seven
    # 8-bit tiles "balanced" still teaches the model to paint 0.75-0.9x the nuclei of the other tiles while its
    # held-out square improves (BENCHMARKS.md section 16)
    foreground_weight: float | str = "balanced"
    trainable: str = "auto"
    holdout: float = 0.25  # the held-out square's share of the largest example's shorter side, squared
    eval_every: int = 10
    patience: int = 6  # evaluations without improvement before stopping
    min_scale: float = 0.5  # crop side, as a share of the region's shorter side
    intensity_jitter: float = 0.25
    seed: int = 0
    # choose the foreground margin for the kept weights on the held-out square (fit_margin). Off by default:
    # a margin helps examples of few classes and costs a little on examples read as many (one colour per
    # object), and propagation reads plain whatever it is (BENCHMARKS.md section 19)
    fit_margin: bool = False


@dataclass
class AdaptProgress:
    """What `adapt` reports to its `progress` callback after every step and every evaluation."""

    step: int
    steps: int
    loss: float | None
    seconds: float
    held_out_iou: float | None = None  # of the latest evaluation
    best_iou: float | None = None
    best_step: int = 0


@dataclass
class Examples:
    """The examples as `adapt` trains on them: 8-bit RGB images and label masks (classes), read and checked."""

    images: list[np.ndarray]
    masks: list[np.ndarray]
    ids: np.ndarray  # label ids > 0 present in the masks
    intensity_range: tuple[float, float] | None
    ids_are_objects: bool
    names: list[str] = field(default_factory=list)


def read_examples(images: Sequence, masks: Sequence, intensity_range=None, example_ids: str = "auto",
                  holdout: float = 0.25) -> Examples:
    """Read and check example pairs for adaptation (numpy and PIL only: done before a model loads).

    Args:
        images: example images (arrays, PIL images or paths), any bit depth.
        masks: their label masks (H, W) or colour masks (H, W, 3), one per image.
        intensity_range: how images that are not 8-bit become 8-bit (None: one range from the examples).
        example_ids: "auto", "classes" or "instances" (instance ids become one class, as in prepare_prompts).
        holdout: the held-out share (checked here: the largest example must leave a usable square).
    """
    from .colors import ColorCode
    from .example_ids import foreground, ids_are_objects
    from .images import as_array, shared_range, to_mask, to_rgb8

    images, masks = list(images), list(masks)
    if not images:
        raise InputError("no examples given: adapting needs at least one example image with its mask")
    if len(images) != len(masks):
        raise InputError(f"got {len(images)} example images but {len(masks)} masks; give one mask per image")
    if not 0 < holdout < 1:
        raise InputError(f"holdout must be between 0 and 1, got {holdout}")
    names = [f"example {k}" + (f" ({image})" if isinstance(image, (str, os.PathLike)) else "")
             for k, image in enumerate(images)]
    arrays = [as_array(image, f"{name} image") for image, name in zip(images, names)]
    shared = shared_range(arrays) if intensity_range is None else None
    rgbs, labels = [], []
    for array, mask, name in zip(arrays, masks, names):
        rgb = to_rgb8(array, intensity_range if shared is None or array.dtype == np.uint8 else shared,
                      name=f"{name} image")
        mask_name = f"{name} mask" + (f" ({mask})" if isinstance(mask, (str, os.PathLike)) else "")
        label = to_mask(mask, name=mask_name)
        if label.shape[:2] != rgb.shape[:2]:
            raise InputError(f"{mask_name}: mask size {label.shape[1]}x{label.shape[0]} differs from its image size "
                             f"{rgb.shape[1]}x{rgb.shape[0]} (width x height)")
        rgbs.append(rgb)
        labels.append(label)
    if any(m.ndim == 3 for m in labels):  # colour masks: their colours as labels 1..K
        code = ColorCode.from_masks(labels)
        labels = [code.labels_of_colors(m) for m in labels]
    objects = ids_are_objects(labels, example_ids)
    if objects:
        labels = [foreground(m) for m in labels]
    labels = [np.asarray(m).astype(np.int64) for m in labels]
    ids = np.unique(np.concatenate([np.unique(m) for m in labels]))
    ids = ids[ids != 0]
    if not ids.size:
        raise InputError("every example mask is all background (0): nothing to adapt to; give masks that mark "
                         "the objects (label ids > 0)")
    largest = max(range(len(rgbs)), key=lambda k: rgbs[k].shape[0] * rgbs[k].shape[1])
    side = _held_out_side(rgbs[largest].shape[:2], holdout)
    if side < MIN_HELD_OUT:
        h, w = rgbs[largest].shape[:2]
        raise InputError(f"{names[largest]}: {w}x{h} is too small to hold out a square of {MIN_HELD_OUT} px for "
                         "early stopping; give a larger example")
    return Examples(rgbs, labels, ids, shared if intensity_range is None else tuple(intensity_range), objects, names)


def _held_out_side(shape: tuple[int, int], holdout: float) -> int:
    return int(round(math.sqrt(holdout) * min(shape)))


def split_examples(examples: Examples, holdout: float = 0.25):
    """(training regions [(rgb, labels)], held-out (rgb, labels)): a corner square of the largest example
    (the corner whose foreground share is nearest the example's) is held out; that example contributes
    the two rectangles beside the square (full height, full width), the others come whole."""
    largest = max(range(len(examples.images)), key=lambda k: examples.images[k].size)
    rgb, mask = examples.images[largest], examples.masks[largest]
    h, w = mask.shape
    s = _held_out_side((h, w), holdout)
    share = float(np.mean(mask > 0))
    corners = [(r, c) for r in (0, h - s) for c in (0, w - s)]
    r, c = min(corners, key=lambda rc: (abs(float(np.mean(mask[rc[0]:rc[0] + s, rc[1]:rc[1] + s] > 0)) - share),
                                        rc))
    held = (rgb[r:r + s, c:c + s], mask[r:r + s, c:c + s])
    cols = slice(s, w) if c == 0 else slice(0, w - s)  # beside the square, full height
    rows = slice(s, h) if r == 0 else slice(0, h - s)  # above or below it, full width
    regions = [(rgb[:, cols], mask[:, cols]), (rgb[rows], mask[rows])]
    regions += [(examples.images[k], examples.masks[k]) for k in range(len(examples.images)) if k != largest]
    return [reg for reg in regions if min(reg[1].shape) >= MIN_HELD_OUT], held


def balanced_foreground_weight(regions) -> float:
    """The loss's foreground weight that balances the training regions' [(rgb, labels)] foreground pixels
    against their background pixels: background share / foreground share, clipped to 1..10 (10: the demo's
    training weight; a region with no foreground gives 10)."""
    foreground = sum(int(np.count_nonzero(labels)) for _, labels in regions)
    total = sum(labels.size for _, labels in regions)
    return float(np.clip((total - foreground) / foreground, 1.0, 10.0)) if foreground else 10.0


def check_foreground_weight(weight) -> float | str:
    """A foreground weight as AdaptSettings takes it (a positive number or "balanced"); InputError otherwise."""
    if weight == "balanced":
        return weight
    try:
        value = float(weight)
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0:
        raise InputError(f"foreground weight must be a positive number or 'balanced', got {weight!r}")
    return value


class CropTasks:
    """In-context tasks cut from the training regions: `sample(batch, prompts=1, seed=) -> TaskBatch`.

    Prompt: a whole region (as at inference) or a crop; target: a crop of a region, another one when
    there are several. Crops are squares of `min_scale`..1 of the region's shorter side (a scale jitter
    once resized to the model's input), flipped at random, each jittered in contrast, brightness and
    gamma on its own. Colours: the inference code half the time, random colours otherwise."""

    def __init__(self, regions, ids: np.ndarray, size: tuple[int, int], min_scale: float = 0.5,
                 intensity_jitter: float = 0.25):
        from .colors import ColorCode

        self.regions, self.ids, self.size = regions, ids, size
        self.min_scale, self.jitter = min_scale, intensity_jitter
        code = ColorCode.for_ids(ids)
        self.colors = code.colors.astype(np.float32)
        self.areas = np.array([m.size for _, m in regions], np.float64)

    def _crop(self, rng, k: int, whole: bool):
        rgb, mask = self.regions[k]
        h, w = mask.shape
        if not whole:
            side = int(round(min(h, w) * rng.uniform(self.min_scale, 1.0)))
            ch = min(h, max(MIN_HELD_OUT, int(round(side * rng.uniform(0.8, 1.25)))))
            cw = min(w, max(MIN_HELD_OUT, side))
            r, c = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            rgb, mask = rgb[r:r + ch, c:c + cw], mask[r:r + ch, c:c + cw]
        if rng.random() < 0.5:
            rgb, mask = rgb[:, ::-1], mask[:, ::-1]
        if rng.random() < 0.5:
            rgb, mask = rgb[::-1], mask[::-1]
        return self._resize(rgb, mask, rng)

    def _resize(self, rgb, mask, rng):
        from PIL import Image

        height, width = self.size
        image = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((width, height), Image.BICUBIC),
                           np.float32) / 255.0
        labels = np.asarray(Image.fromarray(np.ascontiguousarray(mask).astype(np.int32)).resize(
            (width, height), Image.NEAREST)).astype(np.int64)
        j = self.jitter
        if j:
            gamma = math.exp(rng.uniform(-j, j) * 1.5)
            image = np.clip(image, 0, 1) ** gamma
            image = (image - 0.5) * math.exp(rng.uniform(-j, j)) + 0.5 + rng.uniform(-j, j) * 0.4
            image = np.clip(image, 0, 1)
        return image, labels

    def sample(self, batch: int, prompts: int = 1, seed: int = 0):
        import torch

        from .colors import palette
        from .synthetic import TaskBatch

        rng = np.random.default_rng(seed)
        p_img, p_mask, t_img, t_mask = [], [], [], []
        weights = self.areas / self.areas.sum()
        for _ in range(batch):
            table = np.zeros((int(self.ids.max()) + 1, 3), np.float32)
            table[self.ids] = self.colors if rng.random() < 0.5 else (
                palette(124)[rng.permutation(124)[:len(self.ids)]])
            pairs = []
            for _ in range(prompts):
                image, labels = self._crop(rng, int(rng.choice(len(self.regions), p=weights)), rng.random() < 0.5)
                pairs.append((image, table[labels]))
            k = int(rng.choice(len(self.regions), p=weights))
            image, labels = self._crop(rng, k, False)
            p_img.append(np.stack([p[0] for p in pairs]))
            p_mask.append(np.stack([p[1] for p in pairs]))
            t_img.append(image)
            t_mask.append(table[labels])
        chw = lambda a: torch.from_numpy(np.ascontiguousarray(np.stack(a))).float().movedim(-1, -3)  # noqa: E731
        return TaskBatch(chw(p_img), chw(p_mask), chw(t_img), chw(t_mask), "instance")


def _trainable(net, choice: str) -> str:
    if choice != "auto":
        return choice
    return "all" if sum(p.numel() for p in net.parameters()) < 60_000_000 else "last:4"


def held_out_iou(evaluator, regions, held, ids, batch_size: int = 2) -> float:
    """Mean IoU over the classes on the held-out square (and its mirror image), segmented through
    `SegGPT.segment` with the training regions as examples."""
    from .evaluation import iou_per_label

    rgb, mask = held
    targets = [rgb, np.ascontiguousarray(rgb[:, ::-1])]
    truths = [mask, mask[:, ::-1]]
    predictions = evaluator.segment(targets, [r for r, _ in regions], [m for _, m in regions], batch_size=batch_size,
                                    label_ids=ids, quality=None, example_ids="classes")
    scores = []
    for prediction, truth in zip(predictions, truths):
        per_label = iou_per_label(prediction.labels, truth, ids)
        scores.append(float(np.mean(list(per_label.values()))) if per_label else 1.0)
    return float(np.mean(scores))


def fit_margin(evaluator, regions, held, ids, base_margin: float) -> tuple[float, dict[float, float]]:
    """(margin, {margin: held-out IoU}): the foreground margin (colors.favour_background) that reads the
    held-out square best with `evaluator`'s weights, tried over MARGINS and the base model's own; the base's
    is kept unless another beats it by MARGIN_GAIN. The evaluator is left at the chosen margin."""
    scores = {}
    for margin in sorted({*MARGINS, base_margin}):
        evaluator.foreground_margin = margin
        scores[margin] = held_out_iou(evaluator, regions, held, ids)
    best = max(scores, key=lambda m: (scores[m], m == base_margin))
    chosen = best if scores[best] >= scores[base_margin] + MARGIN_GAIN else base_margin
    evaluator.foreground_margin = chosen
    return chosen, scores


def adapt(model, images, masks, *, time_limit: float | None = 180.0, steps: int = 300,
          settings: AdaptSettings | None = None, progress: Callable[[AdaptProgress], None] | None = None,
          cancel: Callable[[], bool] | None = None, intensity_range=None, example_ids: str = "auto"):
    """Fine-tune a copy of `model` on a few labelled examples; returns the adapted SegGPT.

    The result has `adaptation` (a dict: steps, why it stopped, held-out IoU before and at best, seconds,
    the base model and its fingerprint) and saves with `save_pretrained`. When no evaluation beat the base
    weights, the base weights come back; with the base's foreground margin too, the fingerprint is the same
    and `adaptation["improved"]` False.

    Args:
        model: the SegGPT to start from (left unchanged).
        images: example images (arrays, PIL images or paths).
        masks: their masks (label or colour masks), one per image.
        time_limit: seconds for the whole run, evaluations included (None: no limit). No step starts that
            would end past it, but steps since the last evaluation are evaluated once at the end even past it
            (one evaluation is cheap next to a step), so a run never throws away steps it has not scored.
        steps: the step cap.
        settings: the other training settings (AdaptSettings); `time_limit` and `steps` override its own.
        progress: called with an AdaptProgress after every step and every evaluation.
        cancel: checked between steps; when it returns True the run stops (the best weights so far come back,
            `adaptation["stopped"] == "cancelled"`).
        intensity_range: as in `prepare_prompts`.
        example_ids: as in `prepare_prompts`.
    """
    import torch

    from .engine import SegGPT
    from .quality import calibrated_file
    from .saving import float32_network
    from .training import TrainSettings, _set_trainable, make_optimizer, train_step

    base = settings or AdaptSettings()
    settings = AdaptSettings(**{**asdict(base), "time_limit": time_limit, "steps": steps})
    if settings.steps < 0 or settings.batch_size < 1 or settings.eval_every < 1 or settings.patience < 1:
        raise InputError("steps must be >= 0; batch_size, eval_every and patience >= 1")
    if settings.time_limit is not None and settings.time_limit <= 0:
        raise InputError(f"time_limit must be positive seconds, got {settings.time_limit}")
    check_foreground_weight(settings.foreground_weight)
    examples = images if isinstance(images, Examples) else read_examples(
        images, masks, intensity_range, example_ids, settings.holdout)
    started = time.monotonic()
    elapsed = lambda: time.monotonic() - started  # noqa: E731
    regions, held = split_examples(examples, settings.holdout)
    if not regions:
        raise InputError("the examples leave no region to train on beside the held-out square; give larger ones")

    net = float32_network(model).to(model.device)
    trainable = _trainable(net, settings.trainable)
    _set_trainable(net, trainable)
    weight = (balanced_foreground_weight(regions) if settings.foreground_weight == "balanced"
              else float(settings.foreground_weight))
    train_settings = TrainSettings(steps=max(1, settings.steps), batch_size=settings.batch_size, lr=settings.lr,
                                   warmup=settings.warmup, weight_decay=settings.weight_decay,
                                   foreground_weight=weight, seed=settings.seed)
    params, optimizer = make_optimizer(net, train_settings, model.device)
    names = [name for name, p in net.named_parameters() if p.requires_grad]
    evaluator_of = lambda network: SegGPT(network, device=model.device, dtype="float32",  # noqa: E731
                                          attention=model.attention, threads=model.threads)
    evaluator = evaluator_of(net)
    tasks = CropTasks(regions, examples.ids, evaluator.input_size, settings.min_scale, settings.intensity_jitter)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if model.device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    kernel = "folded" if model.device.type == "cuda" else "sdpa"  # chunked saves memory without grad, not with it

    def evaluate() -> float:
        net.eval()
        with torch.no_grad():
            score = held_out_iou(evaluator, regions, held, examples.ids)
        net.train()
        return score

    def snapshot():
        state = net.state_dict()
        return {name: state[name].detach().to("cpu", copy=True) for name in names}

    torch.manual_seed(settings.seed)
    first = evaluate()
    best, best_step, best_state, history = first, 0, None, [{"step": 0, "held_out_iou": round(first, 4)}]
    report = lambda step, loss, score=None: progress and progress(AdaptProgress(  # noqa: E731
        step, settings.steps, loss, round(elapsed(), 2), score, best, best_step))
    report(0, None, first)
    step, stale, loss, stopped, scored = 0, 0, None, "steps", 0

    def score_steps() -> None:
        """Evaluate the weights after `step`; keep them when they beat the best."""
        nonlocal best, best_step, best_state, stale, scored
        score, scored = evaluate(), step
        history.append({"step": step, "loss": round(loss, 5), "held_out_iou": round(score, 4)})
        if score > best:
            best, best_step, best_state, stale = score, step, snapshot(), 0
        else:
            stale += 1
        report(step, loss, score)

    step_seconds = 0.0
    net.train()
    while step < settings.steps:
        if cancel is not None and cancel():
            stopped = "cancelled"
            break
        if settings.time_limit is not None and elapsed() + step_seconds > settings.time_limit:
            stopped = "time_limit"
            break
        tick = time.monotonic()
        batch = tasks.sample(settings.batch_size, prompts=1, seed=settings.seed * 1_000_003 + step).to(model.device)
        loss = float(train_step(net, optimizer, params, batch, step, train_settings, kernel, autocast))
        step += 1
        step_seconds = time.monotonic() - tick
        report(step, loss)
        if step % settings.eval_every == 0 or step == settings.steps:
            score_steps()
            if stale >= settings.patience:
                stopped = "early_stop"
                break
    if stopped == "time_limit" and step > scored:  # steps since the last evaluation are scored, past the limit
        score_steps()
    del optimizer, params
    with torch.no_grad():
        if best_state is None:  # nothing beat the base weights: give them back
            net = float32_network(model)
        else:
            net.load_state_dict(best_state, strict=False)
    for p in net.parameters():
        p.requires_grad_(False)
    margin, margin_scores = model.foreground_margin, {}
    if settings.fit_margin:  # how the adapted weights' paintings are read: what reads the held-out square best
        margin, margin_scores = fit_margin(evaluator_of(net.eval()), regions, held, examples.ids,
                                           model.foreground_margin)
        best = max(best, margin_scores[margin])
    net.config.foreground_margin = margin
    net = net.cpu().eval()
    keep_float = model.dtype != torch.float32 or bool(model.quantize)
    float_state = {k: v.clone() for k, v in net.state_dict().items()} if keep_float else None
    adapted = SegGPT(net, device=model.device, dtype=model.dtype, attention=model.attention,
                     source=None, quantize=model.quantize, threads=None if model.threads_auto else model.threads)
    adapted._float32_state = float_state
    # it judges its proposals as its base does; saved, it carries the base's fitted estimate (saving.py)
    adapted._quality_models = model.quality_models()
    adapted.quality_inherited = calibrated_file(model.source) if model.source else model.quality_inherited
    adapted.adaptation = {
        "base_model": model.source, "base_fingerprint": model.fingerprint, "fingerprint": adapted.fingerprint,
        "improved": best_state is not None or margin != model.foreground_margin, "steps": step,
        "best_step": best_step, "stopped": stopped, "held_out_iou_before": round(first, 4),
        "held_out_iou_best": round(best, 4), "foreground_margin": margin,
        "base_foreground_margin": model.foreground_margin,
        "margin_held_out_iou": {f"{m:g}": round(v, 4) for m, v in margin_scores.items()},
        "seconds": round(elapsed(), 1), "trainable": trainable, "examples": len(examples.images),
        "held_out_pixels": int(held[1].size), "foreground_weight": round(weight, 3), "settings": asdict(settings),
        "history": history,
    }
    return adapted
