"""Model directories written whole: `SegGPT.save_pretrained` and `seggpt convert` write a transformers
directory beside its place and rename it into place, so a reader never sees half of one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import InputError
from .quality import QUALITY_FILE


def checked_out_dir(out_dir: str | os.PathLike, overwrite: bool, error: type[Exception] = InputError) -> Path:
    """`out_dir` as a Path, or `error` when it is a file, or a directory with files in it and not `overwrite`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise error(f"{out_dir}: is a file; a model is saved as a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise error(f"{out_dir}: exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    return out_dir


def write_model_dir(net, out_dir: Path, extra_json: dict[str, dict] | None = None) -> Path:
    """Write `net` (a transformers model) and the `extra_json` files ({name: content}) to `out_dir`,
    replacing what is there: written to a hidden sibling first, then renamed into place; every file gets the
    modes the umask gives (transformers writes the weights 0600)."""
    from .io import umask_modes

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.part")
    shutil.rmtree(tmp, ignore_errors=True)
    net.save_pretrained(tmp)
    for name, content in (extra_json or {}).items():
        (tmp / name).write_text(json.dumps(content, indent=1, default=str) + "\n")
    umask_modes(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def float32_network(model):
    """A float32 copy of `model`'s network (a SegGPT): its kept float32 weights (an adapted model at reduced
    precision), reloaded from its source when it runs at a lower precision or quantized (a copy would carry
    the rounding, and another fingerprint), else copied, with the model's foreground margin."""
    import copy

    import torch

    from .loading import load_network

    float_state = getattr(model, "_float32_state", None)
    if float_state is not None:
        from transformers import SegGptForImageSegmentation

        net = SegGptForImageSegmentation(copy.deepcopy(model.net.config))
        net.load_state_dict(float_state)
        return net.float()
    if model.quantize or model.dtype != torch.float32:
        if not model.source:
            raise InputError("a model held at reduced precision or quantized keeps no float32 weights and has no "
                             "source to reload them from; load it with SegGPT.from_pretrained or at dtype float32")
        net = load_network(model.source)
        if hasattr(model.net.config, "foreground_margin"):  # read as the model reads (adapt may have set it)
            net.config.foreground_margin = model.net.config.foreground_margin
        return net.float()
    return copy.deepcopy(model.net).cpu().float()


def save_model(model, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """`SegGPT.save_pretrained`: the weights in float32 (`float32_network`: never the rounded ones of a model
    held at reduced precision), with adaptation.json when the model was adapted."""
    out_dir = checked_out_dir(out_dir, overwrite)
    clone = float32_network(model)
    extra = {}
    adaptation = getattr(model, "adaptation", None)
    if adaptation:
        extra["adaptation.json"] = adaptation
    inherited = getattr(model, "quality_inherited", None)
    if inherited is not None:
        extra[QUALITY_FILE] = inherited_quality(inherited, adaptation or {})
    return write_model_dir(clone, out_dir, extra)


def inherited_quality(path: Path, adaptation: dict) -> dict:
    """The quality.json of an adapted model: the estimate fitted for the weights it was adapted from, saying
    so (its ranking carries over; fit one of its own with `seggpt fit-quality --model DIR --out DIR/quality.json`)."""
    from .quality import load_models, models_document

    fitted_on = json.loads(Path(path).read_text()).get("fitted_on", "")
    base = adaptation.get("base_model") or "its base model"
    return models_document(load_models(path), f"inherited from {base}, which this model was adapted from "
                                              f"(adaptation.json), where it was fitted on: {fitted_on}; fit one "
                                              "for these weights with `seggpt fit-quality --model DIR --out "
                                              "DIR/quality.json`")
