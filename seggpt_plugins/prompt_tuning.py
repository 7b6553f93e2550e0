"""In-context tuning (`seggpt tune-prompt`): a prompt image and mask learned for a dataset, the model frozen."""

from __future__ import annotations

import numpy as np

from .datasets import PairedSamples
from .training import painting_loss


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
