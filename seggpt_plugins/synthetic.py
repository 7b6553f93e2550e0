"""Procedurally generated in-context segmentation tasks (batched torch: runs on the GPU with training).

A task defines a few object classes by style (shape, size, intensity, texture, interior pattern);
scenes place textured objects (blobs, cells, nuclei, polygons, nested cells, touching and overlapping)
on textured backgrounds, then blur, noise, contrast and gamma are applied. Two task families:

- semantic: independent scenes of one task; the wanted classes (a random subset, the rest are
  distractors) are painted one colour per class. The prompt says which objects are wanted.
- tracking: a sequence of frames in which objects drift, grow and change brightness, like
  neighbouring slices of a stack or frames of a video; every object has its own colour.

Colours are drawn afresh for every task ("in-context colouring"), half the time from the palette
used at inference. Everything is a function of a seed: the same seed gives the same tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .colors import palette


#: v1: the tasks above. v2 adds stack-like tracking (objects swell and fade through focus, appear and
#: vanish between frames) and low-resolution imaging (rendered coarse, then upsampled, as small stacks are).
VARIANTS = ("v1", "v2")


@dataclass
class TaskBatch:
    """B in-context tasks with P prompts each; images in 0..1, colour masks in 0..255 (float)."""

    prompt_images: torch.Tensor  # (B, P, 3, S, S)
    prompt_masks: torch.Tensor  # (B, P, 3, S, S)
    target_images: torch.Tensor  # (B, 3, S, S)
    target_masks: torch.Tensor  # (B, 3, S, S)
    seg_type: str = "instance"

    def swapped(self) -> "TaskBatch":
        """The same scenes as a new task: the last prompt becomes the target and the target a prompt,
        everything flipped left-right and top-bottom (a second training sample from one generation)."""
        images = torch.cat([self.prompt_images, self.target_images[:, None]], 1).flip(-1, -2)
        masks = torch.cat([self.prompt_masks, self.target_masks[:, None]], 1).flip(-1, -2)
        order = [*range(images.shape[1] - 2), images.shape[1] - 1, images.shape[1] - 2]
        images, masks = images[:, order], masks[:, order]
        return TaskBatch(images[:, :-1], masks[:, :-1], images[:, -1], masks[:, -1], self.seg_type)

    def to(self, device) -> "TaskBatch":
        return TaskBatch(*(t.to(device, non_blocking=True) for t in (
            self.prompt_images, self.prompt_masks, self.target_images, self.target_masks)), self.seg_type)


def _uniform(gen, shape, low, high, device):
    return torch.rand(shape, generator=gen, device=device) * (high - low) + low


def _smooth_noise(gen, batch, size, scales, device):
    """(B, 1, S, S) zero-mean unit-ish noise mixing several spatial scales."""
    total = torch.zeros(batch, 1, size, size, device=device)
    for cells in scales:
        coarse = torch.randn(batch, 1, cells, cells, generator=gen, device=device)
        total += F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return total / math.sqrt(len(scales))


def _blur(images, sigma):
    """Gaussian blur with a per-sample sigma: images (B, C, S, S), sigma (B,)."""
    batch, channels, size, _ = images.shape
    radius = int(math.ceil(3 * float(sigma.max()))) if float(sigma.max()) > 0.05 else 0
    if radius == 0:
        return images
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)  # (B, k)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)  # (B*C, k)
    flat = images.reshape(1, batch * channels, size, size)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=batch * channels)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=batch * channels)
    return flat.reshape(batch, channels, size, size)


class SyntheticTasks:
    """Generator of in-context tasks at `size` x `size` pixels."""

    def __init__(self, size: int = 128, max_objects: int = 40, device="cpu", variant: str = "v1"):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        self.size = size
        self.max_objects = max_objects
        self.device = torch.device(device)
        self._palette = torch.as_tensor(palette(124), dtype=torch.float32, device=self.device)
        ys, xs = torch.meshgrid(torch.arange(size, device=self.device, dtype=torch.float32),
                                torch.arange(size, device=self.device, dtype=torch.float32), indexing="ij")
        self._ys, self._xs = ys + 0.5, xs + 0.5

    # ------------------------------------------------------------------------------- public API

    def sample(self, batch: int, prompts: int = 1, seed: int = 0, family: str | None = None) -> TaskBatch:
        """`batch` tasks with `prompts` example pairs each; deterministic in `seed`."""
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        if family is None:
            family = "tracking" if torch.rand((), generator=gen, device=self.device) < 0.3 else "semantic"
        frames = prompts + 1
        styles = self._task_styles(gen, batch)
        layout = self._layouts(gen, styles, frames, tracking=family == "tracking")
        images, instances, classes = self._render(gen, styles, layout)  # (B*F, 3, S, S), (B*F, S, S) x2
        masks = self._colour(gen, styles, instances, classes, frames, tracking=family == "tracking")
        images = images.view(batch, frames, 3, self.size, self.size)
        masks = masks.view(batch, frames, 3, self.size, self.size)
        if family == "tracking":
            seg_type = "instance"
        else:
            seg_type = "semantic" if torch.rand((), generator=gen, device=self.device) < 0.5 else "instance"
        return TaskBatch(images[:, :prompts], masks[:, :prompts], images[:, prompts], masks[:, prompts], seg_type)

    # ------------------------------------------------------------------------------ task styles

    def _task_styles(self, gen, batch):
        """Per task: class styles (up to 4 classes), background, imaging; tensors with leading dim B."""
        d = self.device
        u = lambda shape, lo, hi: _uniform(gen, shape, lo, hi, d)  # noqa: E731
        classes = 4
        nuclei = torch.rand(batch, generator=gen, device=d) < 0.4  # fluorescence-nuclei-like tasks
        num_classes = torch.randint(1, classes + 1, (batch,), generator=gen, device=d)
        num_classes = torch.where(nuclei, torch.randint(1, 3, (batch,), generator=gen, device=d), num_classes)
        gray = (torch.rand(batch, generator=gen, device=d) < 0.6) | nuclei
        # wanted classes: a random non-empty subset of the classes present
        wanted = torch.rand(batch, classes, generator=gen, device=d) < 0.5
        wanted[torch.arange(batch, device=d), torch.randint(0, classes, (batch,), generator=gen, device=d) % num_classes] = True
        wanted &= torch.arange(classes, device=d)[None] < num_classes[:, None]
        wanted[nuclei & (torch.rand(batch, generator=gen, device=d) < 0.7)] = True  # usually: all nuclei
        wanted &= torch.arange(classes, device=d)[None] < num_classes[:, None]
        radius = u((batch, classes), 3.0, 0.16 * self.size)
        radius = torch.where(nuclei[:, None], u((batch, classes), 3.5, 0.09 * self.size), radius)
        base = u((batch, classes, 3), 0.25, 1.0)
        base = torch.where(gray[:, None, None], base[..., :1].expand(-1, -1, 3), base)
        style = {
            "nuclei": nuclei, "num_classes": num_classes, "wanted": wanted, "gray": gray,
            "radius": radius,
            "radius_jitter": u((batch, classes), 0.05, 0.35),
            "aspect": 1 + u((batch, classes), 0, 1.2) * (torch.rand(batch, classes, generator=gen, device=d) < 0.6),
            "shape": torch.randint(0, 4, (batch, classes), generator=gen, device=d),  # blob, irregular, polygon, box
            "sides": torch.randint(3, 7, (batch, classes), generator=gen, device=d),
            "wobble": u((batch, classes), 0.0, 0.25),
            "base": base,  # (B, classes, 3) intensity / colour
            "base_jitter": u((batch, classes), 0.0, 0.5),
            "texture": u((batch, classes), 0.0, 0.25),
            "profile": u((batch, classes), -0.6, 0.6),  # >0 bright centre, <0 bright rim
            "edge": u((batch, classes), 0.5, 2.0),
            "count": u((batch, classes), 0.1, 1.0),  # relative frequency
            "background": torch.where(gray[:, None], u((batch, 1), 0.0, 0.35).expand(-1, 3), u((batch, 3), 0.0, 0.6)),
            "bg_texture": u((batch,), 0.0, 0.2),
            "invert": (torch.rand(batch, generator=gen, device=d) < 0.15) & ~nuclei,
            "blur": u((batch,), 0.0, 1.6),
            "noise": u((batch,), 0.0, 0.08),
            "contrast": u((batch,), 0.6, 1.3),
            "gamma": torch.exp(u((batch,), -0.5, 0.5)),
            "clustered": torch.rand(batch, generator=gen, device=d) < 0.5,
            "nested": (torch.rand(batch, generator=gen, device=d) < 0.15) & (num_classes >= 2) & ~nuclei,
            "objects": torch.randint(3, self.max_objects + 1, (batch,), generator=gen, device=d),
        }
        style["base"] = torch.where(nuclei[:, None, None], u((batch, classes, 1), 0.35, 1.0).expand(-1, -1, 3), base)
        style["background"] = torch.where(nuclei[:, None], u((batch, 1), 0.0, 0.15).expand(-1, 3), style["background"])
        style["bg_texture"] = torch.where(nuclei, u((batch,), 0.0, 0.05), style["bg_texture"])
        style["base_jitter"] = torch.where(nuclei[:, None], u((batch, classes), 0.2, 0.6), style["base_jitter"])
        style["shape"] = torch.where(nuclei[:, None], torch.randint(0, 2, (batch, classes), generator=gen, device=d),
                                     style["shape"])
        return style

    # ---------------------------------------------------------------------------------- layouts

    def _layouts(self, gen, style, frames, tracking):
        """Object parameters for B tasks x F frames x M objects, each (B*F, M) (or (B*F, M, k))."""
        d, M, S = self.device, self.max_objects, self.size
        batch = style["radius"].shape[0]
        u = lambda shape, lo, hi: _uniform(gen, shape, lo, hi, d)  # noqa: E731
        scenes = 1 if tracking else frames
        shape = (batch, scenes, M)
        # class of each object, by the task's class frequencies
        weights = style["count"] * (torch.arange(4, device=d)[None] < style["num_classes"][:, None])
        cls = torch.multinomial(weights.repeat_interleave(scenes * M, 0) + 1e-6, 1, generator=gen).view(shape)
        present = (torch.arange(M, device=d)[None, None] < style["objects"][:, None, None]).expand(shape)
        # positions: uniform, or around a few cluster centres (touching / overlapping objects)
        centres = u((batch, scenes, 4, 2), 0.15 * S, 0.85 * S)
        pick = torch.randint(0, 4, shape, generator=gen, device=d)
        clustered = centres.gather(2, pick[..., None].expand(-1, -1, -1, 2)) + torch.randn(
            (*shape, 2), generator=gen, device=d) * 0.12 * S
        position = torch.where(style["clustered"][:, None, None, None], clustered, u((*shape, 2), 0, S))
        take = lambda key: style[key].gather(1, cls.view(batch, -1)).view(shape)  # noqa: E731
        radius = take("radius") * (1 + take("radius_jitter") * torch.randn(shape, generator=gen, device=d)).clamp(0.4, 2)
        radius = radius.clamp(2.0, 0.3 * S)
        if style["nested"].any():  # the second half of the objects sits inside the first half (cells and nuclei)
            half = M // 2
            nest = style["nested"][:, None, None].expand(shape).clone()
            nest[..., :half] = False
            parent = torch.arange(M, device=d) - half
            position = torch.where(nest[..., None], position[..., parent.clamp_min(0), :], position)
            radius = torch.where(nest, radius[..., parent.clamp_min(0)] * u(shape, 0.3, 0.55), radius)
            cls = torch.where(nest, torch.ones_like(cls), torch.where(style["nested"][:, None, None], 0, cls))
        layout = {
            "class": cls, "present": present, "position": position, "radius": radius,
            "angle": u(shape, 0, 2 * math.pi),
            "aspect": take("aspect") * u(shape, 0.85, 1.15),
            "brightness": (1 + take("base_jitter") * u(shape, -1, 1)).clamp_min(0.15),
            "harmonics": torch.randn((*shape, 4), generator=gen, device=d) * take("wobble")[..., None]
            * torch.tensor([1.0, 0.6, 0.4, 0.3], device=d),
            "phases": u((*shape, 4), 0, 2 * math.pi),
        }
        if tracking:  # frames drift from the first one: motion, growth, rotation, brightness
            steps = torch.arange(frames, device=d, dtype=torch.float32)[None, :, None]
            velocity = torch.randn((batch, 1, M, 2), generator=gen, device=d) * u((batch, 1, 1, 1), 0.3, 2.5)
            growth = torch.randn((batch, 1, M), generator=gen, device=d) * 0.05
            for key in list(layout):
                layout[key] = layout[key].expand(batch, frames, *layout[key].shape[2:]).clone()
            layout["position"] = layout["position"] + velocity * steps[..., None] + torch.randn(
                (batch, frames, M, 2), generator=gen, device=d) * 0.5
            layout["radius"] = (layout["radius"] * (1 + growth * steps)).clamp(2.0, 0.3 * S)
            layout["angle"] = layout["angle"] + torch.randn((batch, 1, M), generator=gen, device=d) * 0.1 * steps
            layout["brightness"] = layout["brightness"] * (1 + 0.05 * torch.randn(
                (batch, frames, M), generator=gen, device=d))
            if self.variant == "v2":  # through focus: each object has a centre frame and a thickness
                stack_like = (torch.rand(batch, 1, 1, generator=gen, device=d) < 0.6)
                centre = u((batch, 1, M), -1.0, frames)
                thickness = u((batch, 1, M), 1.0, 2.0 + frames)
                depth = ((steps - centre) / thickness).abs()
                focus = (1 - depth ** 2).clamp_min(0).sqrt()  # sphere cross-section
                layout["radius"] = torch.where(stack_like, layout["radius"] * focus.clamp_min(0.05), layout["radius"])
                layout["brightness"] = torch.where(stack_like, layout["brightness"] * (0.4 + 0.6 * focus),
                                                   layout["brightness"])
                layout["present"] = layout["present"] & ~(stack_like & (focus < 0.25))
        return {k: v.reshape(batch * frames, *v.shape[2:]) for k, v in layout.items()}

    # ------------------------------------------------------------------------------- rendering

    def _render(self, gen, style, layout):
        d, S = self.device, self.size
        scenes, M = layout["radius"].shape
        frames = scenes // style["radius"].shape[0]
        per_scene = lambda t: t.repeat_interleave(frames, 0)  # noqa: E731
        gray = per_scene(style["gray"])
        background = per_scene(style["background"])[:, :, None, None]  # (N, 3, 1, 1)
        bg_noise = _smooth_noise(gen, scenes, S, (4, 16), d) * per_scene(style["bg_texture"])[:, None, None, None]
        gradient = (self._ys / S - 0.5)[None] * _uniform(gen, (scenes, 1, 1), -0.2, 0.2, d) + \
            (self._xs / S - 0.5)[None] * _uniform(gen, (scenes, 1, 1), -0.2, 0.2, d)
        image = background + bg_noise + gradient[:, None]
        texture = _smooth_noise(gen, scenes, S, (8, 32), d)  # (N, 1, S, S)
        instances = torch.zeros(scenes, S, S, dtype=torch.long, device=d)
        classes = torch.zeros(scenes, S, S, dtype=torch.long, device=d)
        task_of = lambda key: per_scene(style[key]).gather(1, layout["class"])  # noqa: E731  (N, M)
        base = per_scene(style["base"]).gather(1, layout["class"][..., None].expand(-1, -1, 3))  # (N, M, 3)
        tex_amp, profile, edge = task_of("texture"), task_of("profile"), task_of("edge")
        shape_kind, sides = task_of("shape"), task_of("sides")
        for m in range(M):
            dx = self._xs[None] - layout["position"][:, m, 0, None, None]
            dy = self._ys[None] - layout["position"][:, m, 1, None, None]
            angle = layout["angle"][:, m, None, None]
            u_ = dx * torch.cos(angle) + dy * torch.sin(angle)
            v_ = (-dx * torch.sin(angle) + dy * torch.cos(angle)) * layout["aspect"][:, m, None, None]
            rho = torch.sqrt(u_ ** 2 + v_ ** 2)
            phi = torch.atan2(v_, u_)
            wobble = 1 + sum(layout["harmonics"][:, m, k, None, None] * torch.cos(
                (k + 2) * phi + layout["phases"][:, m, k, None, None]) for k in range(4))
            kind = shape_kind[:, m, None, None]
            wobble = torch.where(kind == 1, 1 + 2.2 * (wobble - 1), wobble)  # irregular blobs
            n = sides[:, m, None, None].float()
            sector = torch.remainder(phi, 2 * math.pi / n) - math.pi / n
            polygon = torch.cos(math.pi / n) / torch.cos(sector)
            box = 1 / torch.maximum(torch.abs(torch.cos(phi)), torch.abs(torch.sin(phi))).clamp_min(1e-3) * 0.8
            boundary = layout["radius"][:, m, None, None] * torch.where(
                kind == 2, polygon, torch.where(kind == 3, box, torch.ones_like(phi))) * wobble.clamp_min(0.3)
            inside = (boundary - rho) / edge[:, m, None, None]
            alpha = (inside + 0.5).clamp(0, 1) * layout["present"][:, m, None, None]  # anti-aliased coverage
            radial = (1 - (rho / boundary.clamp_min(1e-3)).clamp(0, 1) ** 2) - 0.5
            value = base[:, m, :, None, None] * layout["brightness"][:, m, None, None, None] * (
                1 + profile[:, m, None, None, None] * radial[:, None]) + tex_amp[:, m, None, None, None] * texture
            image = image * (1 - alpha[:, None]) + value * alpha[:, None]
            covered = alpha > 0.5
            instances = torch.where(covered, m + 1, instances)
            classes = torch.where(covered, layout["class"][:, m, None, None] + 1, classes)
        # imaging: blur, contrast, gamma, inversion, noise
        image = _blur(image, per_scene(style["blur"]))
        image = (image - 0.5) * per_scene(style["contrast"])[:, None, None, None] + 0.5
        image = image.clamp(0, 1) ** per_scene(style["gamma"])[:, None, None, None]
        image = torch.where(per_scene(style["invert"])[:, None, None, None], 1 - image, image)
        noise = torch.randn(image.shape, generator=gen, device=d) * per_scene(style["noise"])[:, None, None, None]
        image = image + noise * (0.3 + image.clamp(0, 1).sqrt())
        image = torch.where(gray[:, None, None, None], image.mean(1, keepdim=True).expand(-1, 3, -1, -1), image)
        if self.variant == "v2" and torch.rand((), generator=gen, device=d) < 0.3:
            factor = float(_uniform(gen, (), 1.5, 3.0, d))
            coarse = F.interpolate(image, scale_factor=1 / factor, mode="area")
            image = F.interpolate(coarse, size=(S, S), mode="bilinear", align_corners=False)
        # a little global brightness change between scenes of one task
        image = image * _uniform(gen, (scenes, 1, 1, 1), 0.85, 1.15, d)
        return image.clamp(0, 1), instances, classes

    # ------------------------------------------------------------------------------- colouring

    def _random_colours(self, gen, rows, count):
        """(rows, count, 3) colours: half the rows from the inference palette, half uniform and not dark."""
        d = self.device
        from_palette = self._palette[torch.argsort(torch.rand(rows, len(self._palette), generator=gen, device=d), 1)[:, :count]]
        uniform = _uniform(gen, (rows, count, 3), 0, 255, d)
        dark = uniform.norm(dim=-1, keepdim=True) < 100
        uniform = torch.where(dark, 255 - uniform, uniform)
        use_palette = torch.rand(rows, 1, 1, generator=gen, device=d) < 0.5
        return torch.where(use_palette, from_palette, uniform).round()

    def _colour(self, gen, style, instances, classes, frames, tracking):
        """(N, 3, S, S) colour masks: one colour per wanted class (semantic) or per object (tracking)."""
        batch, d = style["radius"].shape[0], self.device
        per_scene = lambda t: t.repeat_interleave(frames, 0)  # noqa: E731
        count = self.max_objects if tracking else 4
        colours = self._random_colours(gen, batch, count)  # (B, count, 3)
        table = per_scene(torch.cat([torch.zeros(batch, 1, 3, device=d), colours], 1))  # (N, count+1, 3), 0 = bg
        index = instances if tracking else classes
        painted = table.gather(1, index.flatten(1)[..., None].expand(-1, -1, 3))  # (N, S*S, 3)
        wanted = per_scene(torch.cat([torch.zeros(batch, 1, dtype=torch.bool, device=d), style["wanted"]], 1))
        keep = wanted.gather(1, classes.flatten(1))  # (N, S*S): pixel belongs to a wanted class
        painted = painted * keep[..., None]
        return painted.transpose(1, 2).reshape(index.shape[0], 3, *index.shape[1:])
