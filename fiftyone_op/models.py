"""The models the App offers, and the form's check of the chosen one (without loading it).

    model_choices()          # [(value, description)]: auto, demo, cached SegGPT hub weights, $SEGGPT_MODEL,
                             # the models adapt_seggpt saved (newest first)
    model_problem("BAAI/x")  # None when it can be loaded on this machine, else what is wrong (for the form)
    device_choices(), device_problem("cuda:1")

The check is made on the machine that runs the form (the App's) and again where the run happens (a worker).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from seggpt_plugins.loading import CHECKPOINT_SUFFIXES, DefaultModelWarning, resolve_source
from seggpt_plugins.vocabulary import AUTO_MODEL, DEMO_MODEL, MODEL_ENV


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _cached_config(repo_id: str) -> str | None:
    """The path of the repo's config.json in the local Hugging Face cache, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=_hub_cache())
    except Exception:
        return None
    return found if isinstance(found, str) else None


def _model_type(config: str) -> str | None:
    try:
        return json.loads(Path(config).read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def cached_hub_models() -> list[str]:
    """Hub ids whose SegGPT weights are in the local Hugging Face cache (no network)."""
    root = _hub_cache()
    found = []
    for folder in sorted(root.glob("models--*")) if root.is_dir() else []:
        repo_id = folder.name[len("models--"):].replace("--", "/")
        config = _cached_config(repo_id)
        if config and _model_type(config) == "seggpt":
            found.append(repo_id)
    return found


def auto_model() -> str:
    """What 'auto' stands for now (see loading.resolve_source)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DefaultModelWarning)
        return resolve_source(AUTO_MODEL)


def shown_name(source: str | None) -> str:
    """The model as a progress line names it: 'demo (auto)' for auto."""
    return f"{auto_model()} ({AUTO_MODEL})" if (source or AUTO_MODEL) == AUTO_MODEL else str(source)


def model_choices() -> list[tuple[str, str]]:
    """(value, description) of every model that can be loaded here without the network."""
    choices = [(AUTO_MODEL, f"now {auto_model()} (${MODEL_ENV}, else the hub weights when downloaded, else demo)"),
               (DEMO_MODEL, "the small model that ships with the plugin (for trying things out)")]
    choices += [(repo_id, "downloaded from the Hugging Face hub") for repo_id in cached_hub_models()]
    configured = os.environ.get(MODEL_ENV, "").strip()
    if configured and configured not in {value for value, _ in choices} and model_problem(configured) is None:
        choices.append((configured, f"${MODEL_ENV}"))
    return choices + adapted_choices()


def adapted_choices() -> list[tuple[str, str]]:
    """(folder, description) of the models saved in the core's adapted models folder, newest first."""
    from seggpt_plugins.adapted import adapted_models

    choices = []
    for path, info in adapted_models():
        where = info.get("fiftyone") or {}
        what = (f"{where.get('samples')} samples of '{where.get('dataset')}' ({where.get('label_field')})" if where
                else f"{info.get('examples')} examples")
        try:
            iou = f": held-out IoU {info['held_out_iou_before']:.2f} -> {info['held_out_iou_best']:.2f}"
        except (KeyError, TypeError, ValueError):
            iou = ""
        choices.append((str(path), f"adapted to {what} from {info.get('base_model')}{iou}"))
    return choices


def model_problem(source: str | None) -> str | None:
    """None when `source` can be loaded here without the network, else a one-line reason for the form."""
    text = (source or "").strip()
    if text in ("", AUTO_MODEL):
        configured = os.environ.get(MODEL_ENV, "").strip()
        problem = model_problem(configured) if configured and configured != AUTO_MODEL else None
        return f"auto stands for ${MODEL_ENV} here ({configured}): {problem}" if problem else None
    if text == DEMO_MODEL:
        return None
    path = Path(text).expanduser()
    if path.is_dir():
        return None if (path / "config.json").is_file() else f"the folder {path} has no config.json (no model)"
    if path.is_file():
        if path.name == "config.json" or path.suffix.lower() in CHECKPOINT_SUFFIXES:
            return None
        return f"{path} is not a model checkpoint (expected a folder or {', '.join(sorted(CHECKPOINT_SUFFIXES))})"
    if text.startswith((".", "/", "~")) or text.endswith(tuple(CHECKPOINT_SUFFIXES)) or text.count("/") > 1:
        return f"no folder or file {text} on this machine"
    config = _cached_config(text)
    if config is None:
        return (f"'{text}' is not downloaded on this machine (not in its Hugging Face cache): choose a listed "
                f"model, or have it downloaded first (hf download {text})")
    kind = _model_type(config)
    return None if kind == "seggpt" else f"'{text}' is not a SegGPT model (its config says {kind!r})"


def device_choices() -> list[str]:
    """auto, cpu and the accelerators torch sees here."""
    import torch

    found = ["auto", "cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def device_problem(device: str | None) -> str | None:
    """None when torch can use the device here (None, auto and cpu always), else a one-line reason."""
    if device in (None, "", "auto", "cpu"):
        return None
    if device not in device_choices():
        return f"this machine has no device '{device}' (available: {', '.join(device_choices())})"
    return None
