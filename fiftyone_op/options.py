"""The operator's parameters as the rest of the adapter reads them: `Options` and `ParamError`.

    opts = Options.from_params({"label_field": "ground_truth", "output_field": "seggpt", ...})

`ParamError` maps each parameter name to what is wrong with it, so the App form can mark the field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from seggpt_plugins.ensembles import ENSEMBLES, tile_size
from seggpt_plugins.errors import InputError
from seggpt_plugins.quality import QUALITIES
from seggpt_plugins.vocabulary import AUTO_MODEL, PRECISIONS, SEG_TYPES

CONFIDENCE_SUFFIX = "_confidence"  # per-sample predicted IoU (lower: review first), to sort the review queue by
EVAL_SUFFIX = "_eval"  # evaluation key of a run with gt_field (not in shard runs: see evaluation.evaluate)


CONFIDENCE_DESCRIPTION = "predicted IoU (lower: review first)"  # of the confidence field, in the App and docs
_LABELS = {"gt_field": "Ground truth field"}  # where the parameter's own name reads badly


def label(name: str) -> str:
    """A parameter as the App form names it (the zoo operators' convention): label_field -> 'Label field'."""
    return _LABELS.get(name) or name.replace("_", " ").capitalize()


class ParamError(InputError):
    """Bad operator parameters: `errors` maps each parameter name to what is wrong with it."""

    def __init__(self, errors: dict[str, str]):
        self.errors = dict(errors)
        super().__init__("; ".join(f"{name}: {msg}" for name, msg in self.errors.items()))


@dataclass
class Options:
    label_field: str
    output_field: str
    prompt_tag: str | None = None
    max_prompts: int = 4
    embedding_type: str | None = None  # SegGPT's type token; None: semantic for Segmentation, instance for Detections
    batch_size: int = 8
    model: str = AUTO_MODEL
    device: str | None = None
    precision: str = "auto"  # how the network computes (core loading.PRECISIONS): auto, float32, bfloat16, int8
    mask_dir: str | None = None
    skip_existing: bool = True
    num_shards: int = 1
    gt_field: str | None = None
    overwrite_field: bool = False  # write into an existing output field that this operator did not create
    ensemble: str = "feature"  # how several prompts meet the model (core ensembles.py): feature, spatial, both
    tile: int | str | None = None  # large targets cut into tiles of this many pixels, or "auto"; None: no tiling
    halo: int = 32  # pixels each tile overlaps its neighbours by
    memory: int = 8  # video datasets: the last predicted frames of each run that join its prompts
    quality: str = "fast"  # the confidence (core quality.py): fast, or full (the mirrored image too; images only)

    @property
    def confidence_field(self) -> str:
        return self.output_field + CONFIDENCE_SUFFIX

    @property
    def eval_key(self) -> str:
        return self.output_field + EVAL_SUFFIX

    @classmethod
    def from_params(cls, params: dict) -> "Options":
        """Parse the operator's params (types as the App or a script sends them); ParamError if unusable."""
        errors: dict[str, str] = {}

        def text(name, required=False, default=None):
            value = params.get(name, default)
            if value is None or (isinstance(value, str) and not value.strip()):
                if required:
                    errors[name] = "required"
                return default
            if not isinstance(value, str):
                errors[name] = f"expected a string, got {type(value).__name__}"
                return None
            return value.strip()

        def integer(name, default, low=1):
            value = params.get(name, default)
            if value is None:
                return default
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
                errors[name] = f"expected a whole number, got {value!r}"
                return default
            if value < low:
                errors[name] = f"must be >= {low}, got {int(value)}"
                return default
            return int(value)

        def boolean(name, default):
            value = params.get(name, default)
            if value is None:
                return default
            if not isinstance(value, bool):
                errors[name] = f"expected true or false, got {value!r}"
                return default
            return value

        label_field = text("label_field", required=True)
        output_field = text("output_field") or (f"{label_field}_seggpt" if label_field else None)
        embedding_type = text("embedding_type")
        if embedding_type is not None and embedding_type not in SEG_TYPES:
            errors["embedding_type"] = f"must be one of {SEG_TYPES}, got {embedding_type!r}"
        device = text("device")
        if device is not None and device.lower() == "auto":
            device = None
        precision = text("precision") or "auto"
        if precision not in PRECISIONS:
            errors["precision"] = f"must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        mask_dir = text("mask_dir")
        if mask_dir is not None:
            mask_dir = os.path.expanduser(mask_dir)
            if not os.path.isabs(mask_dir):
                errors["mask_dir"] = (f"must be an absolute path that the App and every worker can reach, got "
                                      f"{mask_dir!r}")
        ensemble = text("ensemble") or "feature"
        if ensemble not in ENSEMBLES:
            errors["ensemble"] = f"must be one of {ENSEMBLES}, got {ensemble!r}"
        tile = params.get("tile")
        if isinstance(tile, str):  # the App's text field: "", "auto" or a number
            tile = tile.strip().lower()
            tile = None if tile in ("", "0", "none", "off") else int(tile) if tile.isdecimal() else tile
        if tile == 0 and not isinstance(tile, bool):
            tile = None
        if tile is not None and tile != "auto" and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 2):
            errors["tile"] = f"expected 'auto' or a number of pixels >= 2 (empty or 0: no tiling), got {tile!r}"
            tile = None
        halo = integer("halo", 32, low=0)
        quality = text("quality") or "fast"
        if quality not in QUALITIES:
            errors["quality"] = f"must be one of {QUALITIES}, got {quality!r}"
        if tile is not None and "halo" not in errors:
            try:
                tile_size(tile, halo)
            except InputError as exc:
                errors["halo"] = str(exc)
        opts = cls(label_field=label_field, output_field=output_field, prompt_tag=text("prompt_tag"),
                   max_prompts=integer("max_prompts", 4), embedding_type=embedding_type,
                   batch_size=integer("batch_size", 8), model=text("model") or AUTO_MODEL, device=device,
                   precision=precision, mask_dir=mask_dir, skip_existing=boolean("skip_existing", True),
                   num_shards=integer("num_shards", 1), gt_field=text("gt_field"),
                   overwrite_field=boolean("overwrite_field", False), ensemble=ensemble, tile=tile, halo=halo,
                   memory=integer("memory", 8, low=0), quality=quality)
        if errors:
            raise ParamError(errors)
        return opts
