"""seggpt_plugins: in-context segmentation with SegGPT, shared by the napari, Label Studio and FiftyOne adapters.

    from seggpt_plugins import SegGPT
    model = SegGPT.from_pretrained("demo")
    preds = model.segment(images, prompt_images, prompt_masks)

Heavy modules (torch, transformers) load on first use of SegGPT, not on import.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "SegGPT": "engine",
    "Prediction": "engine",
    "PromptSet": "prompts",
    "TunedPrompt": "prompts",
    "PromptPool": "prompts",
    "EmptyPromptWarning": "engine",
    "ColorCode": "colors",
    "palette": "colors",
    "MAX_CLASSES": "vocabulary",
    "SEG_TYPES": "vocabulary",
    "SegGPTError": "errors",
    "InputError": "errors",
    "ModelSourceError": "errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
