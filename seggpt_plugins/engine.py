"""The SegGPT predictor: a small Python API over the heavy model.

    model = SegGPT.from_pretrained("demo")
    preds = model.segment(images, prompt_images, prompt_masks)       # list of Prediction
    for pred in model.propagate(frames, annotations={12: mask}): ...  # stack / video

Pre- and post-processing run as tensor ops on the model's device; prompts are prepared once and
shared by every target that uses them.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from typing import Any, Iterator, Sequence

import numpy as np

from .colors import ColorCode
from .errors import InputError
from .example_ids import foreground, ids_are_objects
from .images import as_array, distinct_values, label_dtype, shared_range, to_mask, to_rgb8
from .cpu_share import thread_governor
from .loading import (foreground_margin, load_network, pick_device, pick_dtype, pick_quantize, resolve_source,
                      set_cpu_threads, threads_are_auto, weights_fingerprint)
from .ensembles import example_windows, groups, object_diameter, stitch_examples, tile_size
from .prediction import Prediction
from .prompts import PromptSet, TunedPrompt, as_list, is_tuned
from .propagation import propagate
from .quality import ExampleStats
from .runner import Runner, Target
from .vocabulary import AUTO_MODEL, SEG_TYPES

COMPILE_MODES = (None, "default", "max-autotune", "reduce-overhead")
SNAP_CHUNK_PIXELS = 1 << 22  # snap at most 4 M pixels at a time (bounds memory on huge targets)


class EmptyPromptWarning(UserWarning):
    """A prompt mask holds no labels: that example shows the model only background."""


def _example_stats(pairs, code: ColorCode, object_masks=None) -> ExampleStats:
    """The quality estimate's view of the examples: their label masks (colour masks read through the
    code) and images; with `object_masks` (the masks of examples whose ids are objects, shown as their
    foreground), the object size is read from those: one object per id, not per clump of touching ones."""
    masks = [code.labels_of_colors(m) if m.ndim == 3 else m for _, m, _ in pairs]
    stats = ExampleStats.of(masks, [rgb for rgb, _, _ in pairs])
    return replace(stats, diameter=object_diameter(object_masks)) if object_masks else stats


def _group_by(items, key) -> dict:
    """{key: [items with that key]}, in first-seen order."""
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


class SegGPT:
    """In-context segmentation with SegGPT: example images and masks define the task."""

    def __init__(self, net, device=None, dtype=None, attention: str = "auto", source: str | None = None,
                 compile: str | None = None, quantize: str | None = None, threads: int | None = None):
        """dtype: None ("auto") = bf16 on CUDA and on CPUs with bf16 hardware, fp32 elsewhere (see
        loading.pick_dtype). quantize: None or "int8" (CPU: int8 linear layers; on oneDNN the rest keeps
        `dtype`, with torch's dynamic quantization it is float32: see quantization.py). threads: CPU
        threads (default: the CPUs this process may use). compile: None, or a torch.compile mode for the
        forward ("default", "max-autotune", "reduce-overhead" = CUDA graphs too). Each new batch shape
        compiles once."""
        import torch

        from . import modeling
        from .modeling import ATTENTION_KERNELS, half_size

        self.device = pick_device(device)
        self.quantize = pick_quantize(quantize, self.device)
        self.dtype = pick_dtype(dtype, self.device)
        self.threads = set_cpu_threads(threads) if self.device.type == "cpu" else None
        # automatic threads leave the cores other processes keep busy (cpu_share.py)
        self.threads_auto = self.device.type == "cpu" and threads_are_auto(threads)
        self._governor = thread_governor(self.threads) if self.threads_auto else None
        self.fingerprint = weights_fingerprint(net)  # of the weights as given: the same at every precision
        kernel = None
        if self.quantize == "int8":
            from .quantization import int8_kernel, quantize_linear_int8

            kernel = int8_kernel()
            if kernel == "dynamic" and self.dtype != torch.float32:  # decided before the weights are converted
                if dtype not in (None, "auto"):
                    raise InputError(f"quantize {self.quantize!r} computes in float32 around int8 weights on "
                                     f"this CPU (no oneDNN int8 on AMX): leave dtype unset (got {dtype!r})")
                self.dtype = torch.float32
        net = net.to(device=self.device, dtype=self.dtype)
        if kernel is not None:
            net = quantize_linear_int8(net, kernel)
        self.net = net.eval()
        self.source = source
        self.input_size = half_size(net.config)  # (h, w) of one half
        # how much nearer a label's colour than black a painted pixel must be to take it (colors.favour_background):
        # a model trained with foreground pixels weighted up paints a halo of blends around its objects
        self.foreground_margin = foreground_margin(net.config)
        if attention == "auto":
            attention = "folded" if self.device.type == "cuda" else "chunked"
        if attention not in ATTENTION_KERNELS:
            raise InputError(f"attention must be 'auto' or one of {ATTENTION_KERNELS}, got {attention!r}")
        self.attention = attention
        if compile not in COMPILE_MODES:
            raise InputError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
        self.compile = compile
        self._forward = modeling.paint if compile is None else torch.compile(modeling.paint, mode=compile, dynamic=False)
        self._torch = torch
        self._quality_models = None  # the quality estimates for these weights, loaded on first use
        self.quality_inherited = None  # adapted: the quality.json fitted for the weights it was adapted from

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike = AUTO_MODEL, device=None, dtype=None,
                        attention: str = "auto", compile: str | None = None, quantize: str | None = None,
                        threads: int | None = None) -> "SegGPT":
        """Load from a hub id, a transformers directory, a Painter .pth checkpoint, "demo", or "auto"
        (the default: see loading.resolve_source)."""
        source = resolve_source(source)
        return cls(load_network(source), device=device, dtype=dtype, attention=attention, source=str(source),
                   compile=compile, quantize=quantize, threads=threads)

    def adapt(self, images, masks, *, time_limit: float | None = 180.0, steps: int = 300, settings=None,
              progress=None, cancel=None, intensity_range=None, example_ids: str = "auto") -> "SegGPT":
        """A copy of this model fine-tuned on a few labelled examples (adapt.py); this model is left unchanged.

        Augments from the examples only, holds out a corner square of the largest one and keeps the weights
        that segment it best (early stopping); `adaptation` on the result says how it went, and
        `save_pretrained` writes it as a model directory any `--model` loads (with a new fingerprint).

        Args:
            images: example images (arrays, PIL images or paths).
            masks: their label (or colour) masks, one per image.
            time_limit: seconds for the whole run (None: no limit).
            steps: the step cap.
            settings: an adapt.AdaptSettings for the rest (batch size, learning rate, trainable, holdout...).
            progress: called with an adapt.AdaptProgress after every step and evaluation.
            cancel: a callable checked between steps; True stops the run (the best weights so far come back).
            intensity_range: as in `prepare_prompts`.
            example_ids: as in `prepare_prompts`.
        """
        from .adapt import adapt

        return adapt(self, images, masks, time_limit=time_limit, steps=steps, settings=settings, progress=progress,
                     cancel=cancel, intensity_range=intensity_range, example_ids=example_ids)

    def save_pretrained(self, out_dir: str | os.PathLike, overwrite: bool = False) -> "os.PathLike":
        """Write the weights (float32) as a transformers model directory that `from_pretrained` and every
        `--model` load, with adaptation.json when the model was adapted; written beside and renamed into place.
        A model held at bfloat16 or int8 writes its source's float32 weights (the same fingerprint), not rounded ones.

        Args:
            out_dir: the directory to write.
            overwrite: replace a directory that exists and is not empty (else InputError).
        """
        from .saving import save_model

        return save_model(self, out_dir, overwrite)

    def __repr__(self) -> str:
        quantized = f", quantize={self.quantize}" if self.quantize else ""
        return (f"SegGPT(source={self.source!r}, device={self.device}, dtype={self.dtype}{quantized}, "
                f"input={self.input_size})")

    # ------------------------------------------------------------------------------- preprocessing

    def encode_images(self, rgbs: list[np.ndarray], nearest: bool = False):
        """Images (H, W, 3) uint8 of any sizes -> (B, 3, h, w) normalised on the device, in the model dtype
        (nearest: resize without blending, for colour masks).

        Images of one size travel together: one page-locked host buffer, one copy, one resize.
        """
        import torch.nn.functional as F

        from .modeling import normalize

        torch = self._torch
        out = [None] * len(rgbs)
        for shape, members in _group_by(range(len(rgbs)), lambda i: rgbs[i].shape).items():
            host = torch.from_numpy(np.stack([rgbs[i] for i in members]))  # (G, H, W, 3) uint8
            if self.device.type == "cuda":
                host = host.pin_memory()  # page-locked: the copy overlaps queued GPU work
            batch = host.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
            if tuple(batch.shape[-2:]) != self.input_size:
                if nearest:
                    batch = F.interpolate(batch, size=self.input_size, mode="nearest-exact")
                else:
                    batch = F.interpolate(batch, size=self.input_size, mode="bicubic", antialias=True,
                                          align_corners=False).clamp_(0, 255)
            batch = normalize(batch).to(self.dtype)
            for k, i in enumerate(members):
                out[i] = batch[k]
        return torch.stack(out)

    def prepare_prompts(self, prompt_images, prompt_masks=None, intensity_range=None, label_ids=None,
                        code: ColorCode | None = None, ensemble: str = "feature", tile=None,
                        example_ids: str = "auto") -> PromptSet:
        """Read, check, colour and resize a list of example pairs (or tuned prompts) once.

        The PromptSet can be passed to `segment`/`iter_segment` again and again in place of the pairs.
        code: the colour code to use (default: one made for these masks and `label_ids`).
        ensemble: how several examples meet the prompt half (ensembles.py): "feature" (one prompt row
        each, Painter's feature ensemble), "spatial" (all stitched into one canvas, a g x g grid),
        "both" (canvases of 4 examples, combined by the feature ensemble). One example: all the same.
        tile: as in `segment`: examples larger than the tile are cut to their window with the most
        labelled pixels, so that they meet the canvas at the scale of a tiled target ("auto": a tile of a
        few object diameters of these examples and at least the model's canvas, ensembles.object_tile).
        example_ids: what the masks' ids mean (example_ids.py): "auto" (objects when the masks look like
        instance labels), "classes" or "instances". Ids that are objects are shown as one class (id 1) and
        the set says so (PromptSet.ids_are_objects: the Runner then splits touching objects).
        intensity_range: how images that are not 8-bit become 8-bit; None: one range from the examples
        (images.shared_range), kept as PromptSet.intensity_range for the targets that are not 8-bit either.
        """
        images, masks = as_list(prompt_images), as_list(prompt_masks)
        if not images:
            raise InputError("no prompts given: pass at least one example image with its mask")
        tuned = [TunedPrompt.load(p) if not isinstance(p, TunedPrompt) else p for p in images if is_tuned(p)]
        plain = [p for p in images if not is_tuned(p)]
        if len(masks) != len(plain):
            raise InputError(f"got {len(plain)} prompt images but {len(masks)} prompt masks; give one mask per image")
        names = [f"prompt {k}" + (f" ({image})" if isinstance(image, (str, os.PathLike)) else "")
                 for k, image in enumerate(plain)]
        arrays = [as_array(image, f"{name} image") for image, name in zip(plain, names)]
        shared = shared_range(arrays) if intensity_range is None else None  # one mapping for 16-bit examples
        pairs = []
        for image, mask, name in zip(arrays, masks, names):
            rgb = to_rgb8(image, intensity_range if shared is None or image.dtype == np.uint8 else shared,
                          name=f"{name} image")
            mask_arr = to_mask(mask, name=f"{name} mask" + (f" ({mask})" if isinstance(mask, (str, os.PathLike)) else ""))
            if mask_arr.shape[:2] != rgb.shape[:2]:
                raise InputError(f"{name}: mask size {mask_arr.shape[1]}x{mask_arr.shape[0]} differs from its image "
                                 f"size {rgb.shape[1]}x{rgb.shape[0]} (width x height)")
            if not np.any(mask_arr):
                warnings.warn(f"{name}: the mask is all background (no label id > 0): this example shows only background",
                              EmptyPromptWarning, stacklevel=3)
            pairs.append((rgb, mask_arr, name))
        objects = not tuned and bool(pairs) and ids_are_objects([m for _, m, _ in pairs], example_ids)
        object_masks = [m for _, m, _ in pairs] if objects else None
        if objects:  # one class: its foreground, in a code of its own
            pairs = [(rgb, foreground(m), name) for rgb, m, name in pairs]
            code = self.color_code([], [m for _, m, _ in pairs], None)
        if code is None:
            code = self.color_code(tuned, [m for _, m, _ in pairs], label_ids)
        pairs = example_windows(pairs, tile_size(tile), at_least=self.input_size)
        prompt_images_t = [t.image.to(self.device, self.dtype) for t in tuned]
        prompt_masks_t = [t.mask.to(self.device, self.dtype) for t in tuned]
        if pairs:
            rgbs = [rgb for rgb, _, _ in pairs]
            colour_masks = [code.encode(m, name=f"{name} mask") for _, m, name in pairs]
            layout = groups(len(pairs), ensemble)
            if len(layout) < len(pairs):  # examples stitched side by side into canvases of the model's size
                canvases = [stitch_examples([rgbs[k] for k in g], [colour_masks[k] for k in g], self.input_size)
                            if len(g) > 1 else (rgbs[g[0]], colour_masks[g[0]]) for g in layout]
                rgbs, colour_masks = [c[0] for c in canvases], [c[1] for c in canvases]
            prompt_images_t += list(self.encode_images(rgbs))
            prompt_masks_t += list(self.encode_images(colour_masks, nearest=True))
        for t in tuned:
            if tuple(t.image.shape[-2:]) != self.input_size:
                raise InputError(f"tuned prompt of size {tuple(t.image.shape[-2:])} does not fit this model's "
                                 f"input size {self.input_size}")
        shown = None if tuned else tuple(int(i) for i in np.unique(np.concatenate(
            [distinct_values(code.labels_of_colors(m) if m.ndim == 3 else m) for _, m, _ in pairs])) if i)
        return PromptSet(self._torch.stack(prompt_images_t), self._torch.stack(prompt_masks_t), code,
                         tuple(rgb.shape[:2] for rgb, _, _ in pairs),
                         _example_stats(pairs, code, object_masks) if pairs else None, shown, objects, shared)

    @staticmethod
    def color_code(tuned: list[TunedPrompt], masks: list[np.ndarray], label_ids=None) -> ColorCode:
        """The colour code for a prompt set: the tuned prompts' own, else one over the masks' ids (or `label_ids`)."""
        if tuned:
            code = tuned[0].code
            for t in tuned[1:]:
                if not (np.array_equal(t.code.ids, code.ids) and np.array_equal(t.code.colors, code.colors)):
                    raise InputError("tuned prompts with different colour codes cannot be combined")
            return code
        code = ColorCode.from_masks(masks)
        if label_ids is not None:
            if any(m.ndim == 3 for m in masks):
                raise InputError("label_ids applies to label masks, not to RGB colour masks")
            extra = set(code.ids.tolist()) - set(int(i) for i in label_ids)
            if extra:
                raise InputError(f"prompt masks hold label ids {sorted(extra)[:10]} that are not in label_ids")
            code = ColorCode.for_ids(label_ids)
        return code

    # -------------------------------------------------------------------------------------- model

    def paint(self, targets, prompt_images, prompt_masks, owner, seg_type: str = "instance", weight=None):
        """Low level: normalised tensors in, (T, 3, h, w) float paintings in 0..255 out (see modeling.paint)."""
        from . import modeling

        if seg_type not in SEG_TYPES:
            raise InputError(f"seg_type must be one of {SEG_TYPES}, got {seg_type!r}")
        if self._governor is not None:
            self._governor.adjust()
        with self._torch.inference_mode():
            out = self._forward(self.net, targets, prompt_images, prompt_masks, owner, seg_type, self.attention,
                                weight)
            return modeling.denormalize(out.float())

    def paint_targets(self, targets, prompt_sets: list[PromptSet], seg_type: str):
        """Encoded targets (T, 3, h, w) (or a list of (3, h, w)) with one PromptSet each -> (T, 3, h, w) paintings."""
        torch = self._torch
        owner = torch.cat([torch.full((len(s),), j, dtype=torch.long) for j, s in enumerate(prompt_sets)])
        if all(s is prompt_sets[0] for s in prompt_sets):
            images = prompt_sets[0].images.repeat(len(targets), 1, 1, 1)
            masks = prompt_sets[0].masks.repeat(len(targets), 1, 1, 1)
        else:
            images = torch.cat([s.images for s in prompt_sets])
            masks = torch.cat([s.masks for s in prompt_sets])
        weight = None
        if any(s.weights is not None for s in prompt_sets):  # (N,): each prompt row's weight in its target's mean
            weight = torch.cat([s.row_weights() for s in prompt_sets]).to(self.device)
        targets = targets if torch.is_tensor(targets) else torch.stack(targets)
        return self.paint(targets, images, masks, owner.to(self.device), seg_type, weight)

    def to_predictions(self, paintings, sizes: list[tuple[int, int]], codes: list[ColorCode], indices: list[int],
                       with_painting: bool = False, margin: float | None = None) -> list[Prediction]:
        """(T, 3, h, w) paintings in 0..255 -> one Prediction per target at its own size (H, W).

        Each pixel's distance to each prompt colour is computed at model resolution (uncertain pixels
        restricted to colours present around them) and those distance maps are resized (bilinear), then
        the nearest colour wins. Snapping a resized RGB painting instead lets a blend of two colours at a
        boundary snap to a third colour, leaving 1-pixel fringes.
        Targets of one size and colour code are processed together, in row chunks that bound memory,
        and come back to the host in one copy per array, as small dtypes. The painting itself is resized
        and returned only `with_painting`. margin: the foreground margin to read with (colors.favour_background;
        None: the model's own, `foreground_margin`).
        """
        from .colors import color_distances, decide, favour_background, resize_rows, restrict_to_neighbours

        torch = self._torch
        margin = self.foreground_margin if margin is None else margin
        results = [None] * len(sizes)
        key = lambda j: (tuple(int(v) for v in sizes[j]), id(codes[j]))  # noqa: E731
        for (size, _), members in _group_by(range(len(sizes)), key).items():
            code = codes[members[0]]
            colors = torch.as_tensor(code.all_colors, dtype=torch.float32, device=paintings.device)[None]
            group = paintings[members].float()  # (G, 3, h, w)
            distances = favour_background(color_distances(group, colors), margin, colors)  # (G, K+1, h, w)
            distances = restrict_to_neighbours(distances)
            channels = distances.shape[1] + 3
            rows = max(1, SNAP_CHUNK_PIXELS // (size[1] * len(members) * max(1, channels // 4)))
            index_parts, score_parts, paint_parts = [], [], []
            for start in range(0, size[0], rows):
                stop = min(size[0], start + rows)
                index, score = decide(resize_rows(distances, size, start, stop))
                index_parts.append(index.to(torch.uint8))  # at most MAX_CLASSES + 1 = 125 colours
                score_parts.append(score)
                if with_painting:
                    paint_parts.append(resize_rows(group, size, start, stop).round().clamp_(0, 255).to(torch.uint8))
            index_map = torch.cat(index_parts, 1).cpu().numpy()
            score_map = torch.cat(score_parts, 1).cpu().numpy()
            painted = torch.cat(paint_parts, 2).permute(0, 2, 3, 1).cpu().numpy() if with_painting else None
            ids = code.all_ids.astype(label_dtype(int(code.ids.max()) if len(code) else 0))
            for k, j in enumerate(members):
                results[j] = Prediction(labels=ids[index_map[k]], scores=score_map[k],
                                        painting=painted[k] if with_painting else None,
                                        index=indices[j], colors=code.as_dict())
        return results

    # ------------------------------------------------------------------------------------- segment

    def segment(self, images, prompt_images=None, prompt_masks=None, *, batch_size: int = 8,
                seg_type: str = "instance", intensity_range=None, label_ids=None, with_painting: bool = False,
                ensemble: str = "feature", tile=None, halo: int = 32, quality: str | None = "fast",
                example_ids: str = "auto") -> list[Prediction]:
        """Segment one or many target images from example pairs; returns one Prediction per target.

        prompt_images/prompt_masks: one pair, a list of pairs shared by all targets, or a list of such
        lists, one per target. A tuned prompt (TunedPrompt or its .safetensors path) can stand in for a
        pair (its mask entry is left out). A PromptSet from `prepare_prompts` (or a list of them, one per
        target) stands for prepared pairs: prepare once, segment many times. Several prompts for a target
        use Painter's feature ensemble, or the paper's spatial ensemble (`ensemble`, see prepare_prompts).
        tile: (h, w) pixels (or one number, or "auto": a few object diameters of the examples): large
        targets are cut into tiles of that size overlapping by `halo` pixels, segmented at that scale and
        stitched back; larger examples are cut to one window of that size each (the one with the most
        labelled pixels), so both are seen at one scale. A prepared PromptSet is used as prepared (give
        prepare_prompts the same tile); with "auto", targets are tiled at its examples' size, only when
        larger than it, with a halo of at most a quarter tile.
        with_painting: also return the model's raw RGB painting.
        quality: estimate each proposal's IoU (`Prediction.quality`, which `confidence` then reports; see
        quality.py): "fast" (nearly free: read off the prediction, the target and the examples), "full"
        (also segments the mirrored target: twice the forward passes, a sharper estimate) or None.
        example_ids: what the example masks' ids mean: "auto", "classes" or "instances" (prepare_prompts).
        """
        return list(self.iter_segment(images, prompt_images, prompt_masks, batch_size=batch_size,
                                      seg_type=seg_type, intensity_range=intensity_range, label_ids=label_ids,
                                      with_painting=with_painting, ensemble=ensemble, tile=tile, halo=halo,
                                      quality=quality, example_ids=example_ids))

    def iter_segment(self, images, prompt_images=None, prompt_masks=None, *, batch_size: int = 8,
                     seg_type: str = "instance", intensity_range=None, label_ids=None, with_painting: bool = False,
                     ensemble: str = "feature", tile=None, halo: int = 32,
                     quality: str | None = "fast", example_ids: str = "auto") -> Iterator[Prediction]:
        """As `segment`, yielding each Prediction as soon as its batch is done (for progress and cancel)."""
        targets = as_list(images) if not isinstance(images, np.ndarray) else [images]
        if not targets:
            raise InputError("no target images given")
        runner = Runner(self, batch_size=batch_size, seg_type=seg_type, intensity_range=intensity_range,
                        ensemble=ensemble, tile=tile, halo=halo, quality=quality, with_painting=with_painting)
        prompt_sets = self._prompt_sets_for(len(targets), prompt_images, prompt_masks, intensity_range, label_ids,
                                            ensemble, runner.tile, example_ids)
        items = [Target(i, target, name=f"target {i}" + (f" ({target})" if isinstance(target, (str, os.PathLike))
                                                          else ""), prompts=prompt_sets[i])
                 for i, target in enumerate(targets)]
        for result in runner.run(items, errors="raise"):
            yield result.prediction

    def quality_models(self) -> dict:
        """The quality estimates for these weights, loaded once (quality.models_for)."""
        from .quality import models_for

        if self._quality_models is None:
            self._quality_models = models_for(self.source)
        return self._quality_models

    def assess(self, prediction: Prediction, examples, rgb: np.ndarray, quality: str = "fast",
               mirrored_labels: np.ndarray | None = None, strided: int | None = None,
               texture: tuple | None = None) -> float:
        """The predicted IoU of one prediction on its target `rgb` (H, W, 3) given the examples' stats
        (PromptSet.examples); "full" needs the mirrored target's labels, mirrored back (quality.py).
        strided: the arrays are a strided view of the target already, and texture its texture words read
        at the pixel scale, strided alike (quality.features)."""
        from .quality import OBJECT_MODEL, ObjectContext, features, gross_error

        models = self.quality_models()
        examples = examples if examples is not None else ExampleStats(float("nan"), None)
        estimate, maps = models[quality], {}
        values = features(prediction.labels, prediction.scores, examples, rgb, mirrored_labels, strided,
                          names=estimate.names, maps=maps, texture=texture)
        prediction.quality_features = values
        if "foreground" in maps:  # kept small (uint8, strided) for the per-object estimate of instances()
            prediction.object_context = ObjectContext(np.round(maps["foreground"] * 255).astype(np.uint8),
                                                      maps["stride"], examples.diameter,
                                                      models.get(OBJECT_MODEL))
        values.update(gross_error(prediction.labels, examples, strided, prediction.ids_are_objects))
        return estimate.predict(values) * values["gross_error"]  # (the factor is 1 unless far from the examples)

    def _prompt_sets_for(self, num_targets, prompt_images, prompt_masks, intensity_range, label_ids,
                         ensemble="feature", tile=None, example_ids="auto"):
        """One PromptSet per target, each distinct set prepared once."""
        if isinstance(prompt_images, PromptSet):
            return [prompt_images] * num_targets
        images = as_list(prompt_images)
        per_target = bool(images) and isinstance(images[0], (list, tuple, PromptSet))
        if not per_target:
            shared = self.prepare_prompts(images, prompt_masks, intensity_range, label_ids, ensemble=ensemble,
                                          tile=tile, example_ids=example_ids)
            return [shared] * num_targets
        masks = as_list(prompt_masks) or [None] * len(images)
        if len(images) != num_targets or len(masks) != num_targets:
            raise InputError(f"per-target prompts: got {len(images)} prompt lists and {len(masks)} mask lists "
                             f"for {num_targets} targets")
        return [i if isinstance(i, PromptSet) else self.prepare_prompts(i, m, intensity_range, label_ids,
                                                                        ensemble=ensemble, tile=tile,
                                                                        example_ids=example_ids)
                for i, m in zip(images, masks)]

    # ----------------------------------------------------------------------------------- propagate

    def propagate(self, frames: Sequence, prompt_images=None, prompt_masks=None, *, memory: int = 8,
                  annotations: dict[int, Any] | None = None, max_prompts: int | None = None,
                  batch_size: int = 8, seg_type: str = "instance", intensity_range=None,
                  label_ids=None, ensemble: str = "feature", quality: str | None = "fast",
                  memory_gate: bool = True, follow_objects: bool = True,
                  example_ids: str = "auto") -> Iterator[Prediction]:
        """Propagate masks through a stack or video; yields one Prediction per frame that is not annotated.

        Prompts are fixed: the given example pairs and/or `annotations` ({frame index: mask}) inside the
        stack. The last `memory` predicted frames of each run join as extra prompts (a FIFO, as Painter's
        video cache) in the same colours, so each object keeps its id. With annotations, runs go outward in
        both directions from the annotated frames; without, frames are processed in order. `ensemble`
        (see prepare_prompts) arranges the fixed examples; the memory frames join as feature prompts.
        The memory is held to the examples so it does not drift (propagation.py): it weighs at most as much
        as the fixed prompts, and a frame painted far more or less than the examples does not join it
        (`Prediction.joined_memory`); memory_gate=False lifts both rules.
        When an annotated frame's ids are objects (each one connected piece), its runs follow each object by
        where it was going rather than by its painted colour (object_tracks.py): crossing objects keep their
        ids, and an object that has gone ends (its id is not painted again in that run); follow_objects=False
        leaves the painted ids as they come. example_ids: what the annotations' ids mean, as in `segment`;
        instance labels ("auto" detects them) are shown as their foreground and followed by their tracks.
        quality: "fast" (the default) or None, as in `segment`, judged against the fixed examples.
        """
        return propagate(self, frames, prompt_images, prompt_masks, memory=memory, annotations=annotations,
                         max_prompts=max_prompts, batch_size=batch_size, seg_type=seg_type,
                         intensity_range=intensity_range, label_ids=label_ids, ensemble=ensemble, quality=quality,
                         memory_gate=memory_gate, follow_objects=follow_objects, example_ids=example_ids)
