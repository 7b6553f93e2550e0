"""Training: in-context training from scratch and fine-tuning (`train`), the loss, model configs.

In-context training (SegGPT paper): a prompt pair and a target of the same task are stacked; the
classes get random colours in every sample; the target half of the mask canvas is hidden; the loss
is smooth-L1 on the painting of the target half, with foreground pixels weighted up (background
dominates the pixels and a plain loss collapses to painting everything black).

Checkpoints (model, optimiser, schedule, step) are written atomically every `save_every` steps and
on SIGINT/SIGTERM; a run resumes from its checkpoint. Data for step s depends only on (seed, s), so
a resumed run sees exactly the batches an uninterrupted one would.

Beside it: `datasets` (PairedSamples, tasks from files), `evaluation` (held-out mIoU), `prompt_tuning`
(a prompt learned with the model frozen).
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

from .datasets import PairedSamples
from .errors import InputError
from .evaluation import evaluate_generated, evaluate_samples

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


def make_optimizer(net, settings: TrainSettings, device):
    """(trainable parameters, AdamW over them): weight decay on matrices only, as in training from scratch."""
    import torch

    params = [p for p in net.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    return params, optimizer


def train_step(net, optimizer, params, batch, step: int, settings: TrainSettings, kernel: str, autocast):
    """One optimiser step on a TaskBatch at the schedule's learning rate for `step`; returns the loss (a tensor)."""
    import torch

    for group in optimizer.param_groups:
        group["lr"] = _lr_at(step, settings)
    with autocast:
        prediction = forward_batch(net, batch, kernel)
    loss = painting_loss(prediction, batch.target_masks, settings.foreground_weight)
    if not torch.isfinite(loss):
        raise RuntimeError(f"loss became {loss.item()} at step {step}; lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return loss.detach()


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
    params, optimizer = make_optimizer(net, settings, device)
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
            loss = train_step(net, optimizer, params, batch, step, settings, kernel, autocast)
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
    """save_pretrained (safetensors), the files with the umask's modes; `half` stores float16 weights (loaded
    back as float32)."""
    import copy

    from .io import umask_modes

    out_dir = Path(out_dir)
    clone = copy.deepcopy(net).cpu()
    if half:
        clone = clone.half()
    clone.save_pretrained(out_dir)
    umask_modes(out_dir)
    return out_dir
