"""The words every part of the project shares: segmentation types, model names, class limits.

Spelled once here; the core, the CLI and the three adapters import them. Imports nothing heavy.
"""

from __future__ import annotations

#: SegGPT's type token: "instance" (Painter's default: colours are objects) or "semantic" (colours are classes).
SEG_TYPES = ("instance", "semantic")

#: The real weights (370 M parameters, MIT) on the Hugging Face hub.
HUB_MODEL = "BAAI/seggpt-vit-large"

#: The small model that ships inside the package (trained on generated tasks only).
DEMO_MODEL = "demo"

#: The default model of every command and adapter (see loading.resolve_source): $SEGGPT_MODEL when set,
#: else HUB_MODEL when its weights are in the local Hugging Face cache, else DEMO_MODEL (with a notice).
AUTO_MODEL = "auto"

#: The most classes one prompt set can hold: beyond it two prompt colours would sit closer than 51 RGB units.
MAX_CLASSES = 124

#: One setting for every adapter: how the network computes. "auto": bfloat16 on CUDA and on CPUs that compute
#: it in hardware, float32 elsewhere (loading.pick_dtype); "int8": int8 linear layers, on the CPU only.
PRECISIONS = ("auto", "float32", "bfloat16", "int8")

#: What `--format` and every host's export can write: label PNGs, label TIFFs, COCO instances, COCO panoptic.
OUTPUT_FORMATS = ("png", "tiff", "coco", "panoptic")

#: File suffixes read as images when a folder (or an object-store prefix) is searched for inputs.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif"})

#: Where a user (or a deployment) names the model for every entry point at once.
MODEL_ENV = "SEGGPT_MODEL"
MIN_OBJECT_AREA = 16  # pixels: smaller parts join the object they touch or are dropped (instances.ObjectRule)

#: Where the host apps keep the models they adapt (adapted.adapted_models_dir: default the user's cache folder).
ADAPTED_ENV = "SEGGPT_ADAPTED_DIR"
