"""Tasks from files for training, fine-tuning, prompt tuning and evaluation: `PairedSamples` (images and
label masks, one task per folder, drawn with in-context colouring)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import InputError


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
            which = f"{image}, mask {mask}" if isinstance(mask, (str, os.PathLike)) else f"sample {k}"
            rgb = to_rgb8(image, name=f"sample {k} image")
            labels = to_mask(mask, name=f"sample {k} mask")
            if labels.ndim != 2:
                raise InputError(f"{which}: training needs label masks (H, W), got a colour mask")
            if labels.shape != rgb.shape[:2]:
                raise InputError(f"{which}: mask size {labels.shape[1]}x{labels.shape[0]} differs from the image's "
                                 f"{rgb.shape[1]}x{rgb.shape[0]} (width x height)")
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
