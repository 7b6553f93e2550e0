"""Training: in-context training from scratch, fine-tuning, prompt tuning, and evaluation.

In-context training (SegGPT paper): a prompt pair and a target of the same task are stacked; the
classes get random colours in every sample; the target half of the mask canvas is hidden; the loss
is smooth-L1 on the painting of the target half, with foreground pixels weighted up (background
dominates the pixels and a plain loss collapses to painting everything black).

Checkpoints (model, optimiser, schedule, step) are written atomically every `save_every` steps and
on SIGINT/SIGTERM; a run resumes from its checkpoint. Data for step s depends only on (seed, s), so
a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import InputError

DEMO_CONFIG = dict(
    hidden_size=256, num_hidden_layers=8, num_attention_heads=8, mlp_dim=1024, image_size=[256, 128],
    patch_size=8, pretrain_image_size=128, decoder_hidden_size=16, merge_index=1,
    intermediate_hidden_state_indices=[1, 3, 5, 7], drop_path_rate=0.0,
)
TINY_CONFIG = dict(
    hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_dim=64, image_size=[64, 32],
    patch_size=8, pretrain_image_size=32, decoder_hidden_size=8, merge_index=0,
    intermediate_hidden_state_indices=[0, 1, 2, 3], drop_path_rate=0.0,
)
NAMED_CONFIGS = {"demo": DEMO_CONFIG, "tiny": TINY_CONFIG}


@dataclass
class TrainSettings:
    steps: int = 1000
    batch_size: int = 32  # targets per step (rows = targets x prompts)
    lr: float = 5e-4
    warmup: int = 50
    weight_decay: float = 0.05
    foreground_weight: float = 10.0
    prompt_counts: tuple = (1, 1, 1, 2, 3)  # prompts per target, drawn per step: few-shot ensembles too
    seed: int = 0
    save_every: int = 200
    eval_every: int = 0
    log_every: int = 10
    time_limit: float | None = None  # seconds; stop (with a checkpoint) when exceeded
    stop_after: int | None = None  # stop at this step (the schedule still spans `steps`)
    variant: str = "v1"  # generated-task variant (synthetic.VARIANTS)
    trainable: str = "all"  # all | decoder | last:N (decoder + last N blocks)


def make_config(name_or_path: str | dict = "demo", **overrides):
    """A SegGptConfig from a named size ('demo', 'tiny'), a JSON file or a dict, with overrides."""
    from transformers import SegGptConfig

    if isinstance(name_or_path, dict):
        values = dict(name_or_path)
    elif name_or_path in NAMED_CONFIGS:
        values = dict(NAMED_CONFIGS[name_or_path])
    elif Path(name_or_path).is_file():
        values = json.loads(Path(name_or_path).read_text())
    elif name_or_path == "vit-large":
        values = {}
    else:
        raise InputError(f"config {name_or_path!r}: expected {', '.join(NAMED_CONFIGS)}, vit-large or a JSON file")
    values.update(overrides)
    return SegGptConfig(**values)


# ------------------------------------------------------------------------------------------ datasets


class PairedSamples:
    """In-context tasks from (image, label mask, task id) samples: a folder, or any iterable of triples.

    Each draw picks a task, then a target and prompts from that task, gives the task's classes random
    colours (in-context colouring), and applies the same random flip to prompt and target.
    """

    def __init__(self, samples: Iterable, size: int):
        from .images import to_mask, to_rgb8

        self.size = size
        self.tasks: dict = {}
        for k, (image, mask, task) in enumerate(samples):
            rgb = to_rgb8(image, name=f"sample {k} image")
            labels = to_mask(mask, name=f"sample {k} mask")
            if labels.ndim != 2:
                raise InputError(f"sample {k}: training needs label masks (H, W), got a colour mask")
            if labels.shape != rgb.shape[:2]:
                raise InputError(f"sample {k}: mask size {labels.shape} differs from image size {rgb.shape[:2]}")
            self.tasks.setdefault(task, []).append((self._resize(rgb, False), self._resize(labels, True)))
        if not self.tasks:
            raise InputError("the dataset holds no samples")
        self.ids = np.unique(np.concatenate([np.unique(m) for items in self.tasks.values() for _, m in items]))
        self.ids = self.ids[self.ids != 0]

    def _resize(self, arr, nearest):
        from PIL import Image

        if arr.shape[:2] == (self.size, self.size):
            return arr
        if nearest:
            return np.asarray(Image.fromarray(arr.astype(np.int32)).resize((self.size, self.size), Image.NEAREST))
        return np.asarray(Image.fromarray(arr).resize((self.size, self.size), Image.BICUBIC))

    @classmethod
    def from_folder(cls, root: str | os.PathLike, size: int) -> "PairedSamples":
        """`root/images/X.*` with `root/masks/X.*` (same stem): one task; or subfolders of such: one task each."""
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"{root}: no such directory")
        folders = [root] if (root / "images").is_dir() else sorted(p for p in root.iterdir() if (p / "images").is_dir())
        if not folders:
            raise InputError(f"{root}: expected images/ and masks/ folders (same file stems), or subfolders with them")
        samples = []
        for folder in folders:
            masks = {p.stem: p for p in (folder / "masks").glob("*") if p.is_file()}
            for image in sorted(p for p in (folder / "images").glob("*") if p.is_file()):
                if image.stem not in masks:
                    raise InputError(f"{image}: no mask with the same stem in {folder / 'masks'}")
                samples.append((image, masks[image.stem], folder.name))
        return cls(samples, size)

    def split(self, holdout: float = 0.2, seed: int = 0) -> tuple["PairedSamples", "PairedSamples"]:
        """Deterministic split of every task's samples into (train, held-out)."""
        rng = random.Random(seed)
        train, held = object.__new__(PairedSamples), object.__new__(PairedSamples)
        for part in (train, held):
            part.size, part.tasks, part.ids = self.size, {}, self.ids
        for task, items in self.tasks.items():
            order = list(range(len(items)))
            rng.shuffle(order)
            cut = max(1, int(round(len(items) * holdout))) if len(items) >= 3 else 0
            held.tasks[task] = [items[i] for i in order[:cut]] if cut else []
            train.tasks[task] = [items[i] for i in order[cut:]]
        held.tasks = {k: v for k, v in held.tasks.items() if v}
        return train, held

    def sample(self, batch: int, prompts: int = 1, seed: int = 0, colours=None):
        """A TaskBatch; `colours` ((K, 3) for self.ids) fixes the colouring, else random per sample."""
        import torch

        from .colors import palette
        from .synthetic import TaskBatch

        rng = np.random.default_rng(seed)
        names = [t for t, items in self.tasks.items() if len(items) >= 2 or prompts == 0]
        if not names:
            raise InputError("every task needs at least two samples (a prompt and a target)")
        p_img, p_mask, t_img, t_mask = [], [], [], []
        for _ in range(batch):
            items = self.tasks[names[rng.integers(len(names))]]
            picks = rng.choice(len(items), size=min(prompts + 1, len(items)), replace=False)
            picks = list(picks) + list(rng.choice(picks[:-1], size=prompts + 1 - len(picks)))
            table = np.zeros((int(self.ids.max()) + 1 if len(self.ids) else 1, 3), np.float32)
            if colours is None:
                table[self.ids] = palette(124)[rng.permutation(124)[:len(self.ids)]] if rng.random() < 0.5 \
                    else rng.uniform(60, 255, (len(self.ids), 3)).round()
            else:
                table[self.ids] = colours
            flip = rng.random() < 0.5
            pair = [(items[i][0][:, ::-1] if flip else items[i][0], table[items[i][1][:, ::-1] if flip else items[i][1]])
                    for i in picks]
            p_img.append(np.stack([p[0] for p in pair[:-1]]))
            p_mask.append(np.stack([p[1] for p in pair[:-1]]))
            t_img.append(pair[-1][0])
            t_mask.append(pair[-1][1])
        chw = lambda a: torch.from_numpy(np.ascontiguousarray(np.stack(a))).float().movedim(-1, -3)  # noqa: E731
        return TaskBatch(chw(p_img) / 255.0, chw(p_mask), chw(t_img) / 255.0, chw(t_mask), "instance")


# ------------------------------------------------------------------------------------------ the loss


def painting_loss(prediction, target_masks, foreground_weight: float = 10.0, beta: float = 0.01):
    """Smooth-L1 between normalised paintings, foreground pixels weighted by `foreground_weight`.

    prediction: (B, 3, h, w) normalised; target_masks: (B, 3, h, w) colours in 0..255.
    """
    import torch.nn.functional as F

    from .modeling import normalize

    target = normalize(target_masks)
    weight = 1.0 + (foreground_weight - 1.0) * (target_masks.amax(1, keepdim=True) > 0).float()
    loss = F.smooth_l1_loss(prediction.float(), target, reduction="none", beta=beta)
    return (loss * weight).sum() / (weight.sum() * 3)


def forward_batch(net, batch, kernel: str = "sdpa"):
    """(B, 3, h, w) normalised paintings for a TaskBatch (images 0..1, colour masks 0..255)."""
    import torch

    from . import modeling

    b, p = batch.prompt_images.shape[:2]
    owner = torch.arange(b, device=batch.target_images.device).repeat_interleave(p)
    return modeling.paint(
        net, modeling.normalize(batch.target_images * 255), modeling.normalize(batch.prompt_images.flatten(0, 1) * 255),
        modeling.normalize(batch.prompt_masks.flatten(0, 1)), owner, batch.seg_type, kernel)


# ------------------------------------------------------------------------------------------ training


def _set_trainable(net, trainable: str):
    if trainable == "all":
        for p in net.parameters():
            p.requires_grad_(True)
        return
    for p in net.parameters():
        p.requires_grad_(False)
    for p in net.decoder.parameters():
        p.requires_grad_(True)
    if trainable.startswith("last:"):
        n = int(trainable.split(":")[1])
        for layer in net.model.encoder.layers[-n:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        for p in net.model.encoder.layernorm.parameters():
            p.requires_grad_(True)
    elif trainable != "decoder":
        raise InputError(f"trainable must be all, decoder or last:N, got {trainable!r}")


def _lr_at(step, settings: TrainSettings):
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _atomic_torch_save(obj, path: Path):
    import torch

    from .io import atomic_write

    atomic_write(path, lambda tmp: torch.save(obj, tmp), overwrite=True)


class _StopRequested:
    """Turns SIGINT/SIGTERM into a flag so the loop can write a checkpoint before it stops."""

    def __init__(self):
        self.flag = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, *_):
        self.flag = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(out_dir: str | os.PathLike, net=None, config="demo", data=None, settings: TrainSettings | None = None,
          device=None, resume: bool = True, progress: bool = True, evaluate_at_end: bool = True):
    """Train (or fine-tune, when `net` is given) a SegGPT model; returns (net, summary dict).

    data: None for procedurally generated tasks, a folder path, a PairedSamples, or any task source
    with `sample(batch, prompts=, seed=) -> TaskBatch`.
    Writes to out_dir: checkpoint.pt (resumable), log.jsonl (loss per step), model/ (final weights),
    eval.json (held-out mIoU per class).
    """
    import torch
    from tqdm import tqdm
    from transformers import SegGptForImageSegmentation

    from .loading import pick_device
    from .modeling import half_size
    from .synthetic import SyntheticTasks

    settings = settings or TrainSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(device)
    torch.manual_seed(settings.seed)
    if net is None:
        net = SegGptForImageSegmentation(make_config(config) if not hasattr(config, "to_dict") else config)
    net = net.float().to(device).train()
    _set_trainable(net, settings.trainable)
    size = half_size(net.config)[0]
    if size != half_size(net.config)[1]:
        raise InputError("training supports square halves only (image_size [2s, s])")

    held_out = None
    if data is None:
        source = SyntheticTasks(size, device=device, variant=settings.variant)
    elif hasattr(data, "sample") and not isinstance(data, PairedSamples):
        source = data  # any task source: sample(batch, prompts=, seed=) -> TaskBatch
    else:
        source = data if isinstance(data, PairedSamples) else PairedSamples.from_folder(data, size)
        source, held_out = source.split(0.2, settings.seed)
    params = [p for p in net.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    checkpoint_path = out_dir / "checkpoint.pt"
    step = 0
    if resume and checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    (out_dir / "settings.json").write_text(json.dumps({**asdict(settings), "config": net.config.to_dict()},
                                                      indent=1, default=str))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    kernel = "folded" if device.type == "cuda" else "chunked"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def save():
        _atomic_torch_save({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                            "config": net.config.to_dict()}, checkpoint_path)

    started = time.time()
    stopped_early = False
    with _StopRequested() as stop, open(out_dir / "log.jsonl", "a") as log, \
            tqdm(total=settings.steps, initial=step, disable=not progress, desc="training", unit="step") as bar:
        while step < settings.steps:
            rng = random.Random(settings.seed * 1_000_003 + step)
            prompts = rng.choice(settings.prompt_counts)
            rows = max(1, settings.batch_size // prompts) if data is None else settings.batch_size
            if data is None and step % 2 == 1:  # generated data: every batch serves twice (roles swapped)
                prompts = random.Random(settings.seed * 1_000_003 + step - 1).choice(settings.prompt_counts)
                rows = max(1, settings.batch_size // prompts)
                batch = source.sample(rows, prompts=prompts, seed=settings.seed * 1_000_003 + step - 1).swapped()
            else:
                batch = source.sample(rows, prompts=prompts, seed=settings.seed * 1_000_003 + step).to(device)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, settings)
            with autocast:
                prediction = forward_batch(net, batch, kernel)
            loss = painting_loss(prediction, batch.target_masks, settings.foreground_weight)
            if not torch.isfinite(loss):
                raise RuntimeError(f"loss became {loss.item()} at step {step}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            bar.update(1)
            if step % settings.log_every == 0 or step == settings.steps:
                record = {"step": step, "loss": round(loss.item(), 5), "lr": optimizer.param_groups[0]["lr"],
                          "prompts": prompts, "seg_type": batch.seg_type, "seconds": round(time.time() - started, 1)}
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            if settings.eval_every and step % settings.eval_every == 0 and data is None:
                scores = evaluate_generated(net, tasks=24, prompts=1, device=device)
                log.write(json.dumps({"step": step, "eval_miou_1shot": scores["miou"]}) + "\n")
                log.flush()
            if step % settings.save_every == 0:
                save()
            if stop.flag or (settings.time_limit and time.time() - started > settings.time_limit) or \
                    (settings.stop_after and step >= settings.stop_after):
                stopped_early = step < settings.steps
                break
    save()
    net.eval()
    summary = {"steps": step, "finished": not stopped_early, "seconds": round(time.time() - started, 1)}
    if not stop.flag:  # finished, or out of time: export and evaluate what there is
        export(net, out_dir / "model")
        if evaluate_at_end:
            if data is None:
                summary["eval"] = {f"{p}-shot": evaluate_generated(net, prompts=p, device=device) for p in (1, 3)}
            elif held_out is not None and held_out.tasks:
                summary["eval"] = evaluate_samples(net, source, held_out, device=device)
            if "eval" in summary:
                (out_dir / "eval.json").write_text(json.dumps(summary["eval"], indent=1))
    return net, summary


def export(net, out_dir: Path, half: bool = False) -> Path:
    """save_pretrained (safetensors); `half` stores float16 weights (loaded back as float32)."""
    import copy

    out_dir = Path(out_dir)
    clone = copy.deepcopy(net).cpu()
    if half:
        clone = clone.half()
    clone.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------- evaluation


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


# ------------------------------------------------------------------------------------ prompt tuning


def tune_prompt(model, data, steps: int = 200, lr: float = 0.05, batch_size: int = 8, seed: int = 0,
                seg_type: str = "semantic", foreground_weight: float = 10.0, progress: bool = True):
    """In-context tuning: learn a prompt image and mask (model frozen) for a dataset; returns (TunedPrompt, log).

    `model` is a SegGPT; `data` a folder or PairedSamples. The classes keep one fixed colour each.
    """
    import torch
    from tqdm import tqdm

    from . import modeling
    from .colors import ColorCode
    from .prompts import TunedPrompt

    samples = data if isinstance(data, PairedSamples) else PairedSamples.from_folder(data, model.input_size[0])
    code = ColorCode.for_ids(samples.ids)
    net = model.net
    for p in net.parameters():
        p.requires_grad_(False)
    first_image, first_mask = next(iter(samples.tasks.values()))[0]
    lut = np.zeros((int(samples.ids.max()) + 1, 3), np.float32)
    lut[code.ids] = code.colors
    init_image = torch.from_numpy(first_image.copy()).permute(2, 0, 1).float()[None].to(model.device)
    init_mask = torch.from_numpy(lut[first_mask]).permute(2, 0, 1)[None].to(model.device)
    prompt_image = modeling.normalize(init_image)[0].detach().clone().float().requires_grad_(True)
    prompt_mask = modeling.normalize(init_mask)[0].detach().clone().float().requires_grad_(True)
    optimizer = torch.optim.Adam([prompt_image, prompt_mask], lr=lr)
    log = []
    for step in tqdm(range(steps), disable=not progress, desc="tuning prompt", unit="step"):
        batch = samples.sample(batch_size, prompts=1, seed=seed * 1_000_003 + step, colours=code.colors).to(model.device)
        targets = modeling.normalize(batch.target_images * 255).to(model.dtype)
        owner = torch.arange(batch_size, device=model.device)
        with torch.enable_grad():
            paintings = modeling.paint(net, targets, prompt_image.to(model.dtype).expand(batch_size, -1, -1, -1),
                                       prompt_mask.to(model.dtype).expand(batch_size, -1, -1, -1), owner, seg_type,
                                       model.attention)
            loss = painting_loss(paintings, batch.target_masks, foreground_weight)
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
        log.append({"step": step + 1, "loss": round(loss.item(), 5)})
    return TunedPrompt(prompt_image.detach().cpu(), prompt_mask.detach().cpu(), code, seg_type), log
