"""Loading SegGPT weights: hub ids, transformers directories, original Painter checkpoints, the demo model.

Everything resolves to transformers' `SegGptForImageSegmentation`; `convert` writes a Painter `.pth`
as a transformers directory. The default source "auto" follows one rule everywhere (`resolve_source`),
and `get_model` keeps one loaded model per process for the adapters (loading ViT-L takes seconds).
"""

from __future__ import annotations

import math
import os
import re
import threading
import warnings
from pathlib import Path

from .errors import ModelSourceError
from .vocabulary import AUTO_MODEL, DEMO_MODEL, HUB_MODEL, MODEL_ENV, PRECISIONS

DEMO_MODEL_DIR = Path(__file__).parent / "demo" / "model"
HUB_PROBE_SECONDS = 3.0  # how long to wait for the hub before calling this machine offline
CHECKPOINT_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt", ".safetensors"}

# Original Painter (baaivision/Painter, SegGPT) parameter names -> transformers' SegGptForImageSegmentation.
PAINTER_RENAMES = [
    (r"^patch_embed\.proj\.", "model.embeddings.patch_embeddings.projection."),
    (r"^mask_token$", "model.embeddings.mask_token"),
    (r"^segment_token_x$", "model.embeddings.segment_token_input"),
    (r"^segment_token_y$", "model.embeddings.segment_token_prompt"),
    (r"^type_token_cls$", "model.embeddings.type_token_semantic"),
    (r"^type_token_ins$", "model.embeddings.type_token_instance"),
    (r"^pos_embed$", "model.embeddings.position_embeddings"),
    (r"^norm\.", "model.encoder.layernorm."),
    (r"^blocks\.(\d+)\.attn\.", r"model.encoder.layers.\1.attention."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"model.encoder.layers.\1.mlp.lin1."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"model.encoder.layers.\1.mlp.lin2."),
    (r"^blocks\.(\d+)\.norm1\.", r"model.encoder.layers.\1.layernorm_before."),
    (r"^blocks\.(\d+)\.norm2\.", r"model.encoder.layers.\1.layernorm_after."),
    (r"^decoder_embed\.", "decoder.decoder_embed."),
    (r"^decoder_pred\.0\.", "decoder.decoder_pred.conv."),
    (r"^decoder_pred\.1\.", "decoder.decoder_pred.layernorm."),
    (r"^decoder_pred\.3\.", "decoder.decoder_pred.head."),
]


# ------------------------------------------------------------------------------------ device and dtype


def pick_device(device=None):
    """`None` picks cuda, then mps, then cpu."""
    import torch

    if device is not None and device != "auto":
        try:
            device = torch.device(device)
        except RuntimeError as exc:
            raise ModelSourceError(f"device {device!r} is not a device torch knows ({exc})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelSourceError("device 'cuda' was asked for, but torch sees no CUDA GPU here; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16"}
DTYPE_NAMES = tuple(_DTYPES)  # every spelling pick_dtype takes
DTYPE_ENV = "SEGGPT_DTYPE"  # the default precision for every entry point (float32, bfloat16, float16, auto)
QUANTIZE_ENV = "SEGGPT_QUANTIZE"  # "int8": int8 linear layers on the CPU for every entry point
THREADS_ENV = "SEGGPT_THREADS"  # CPU threads for every entry point (default: the CPUs this process may use)
CGROUP_ROOT = Path("/sys/fs/cgroup")
QUANTIZE_CHOICES = ("int8",)


def precision_options(precision: str | None) -> dict:
    """A precision setting (PRECISIONS) as the `dtype`/`quantize` arguments of get_model and SegGPT."""
    if precision in (None, "", "auto"):
        return {}
    if precision == "int8":
        return {"quantize": "int8"}
    if precision in ("float32", "bfloat16", "float16"):
        return {"dtype": precision}
    raise ModelSourceError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")


def cpu_has_native_bf16() -> bool:
    """True where this CPU multiplies bfloat16 in hardware (AVX512_BF16 or AMX), as torch's own CPU
    feature detection reports it; then bf16 products run several times faster than fp32 ones."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: do not guess
        return False


def pick_dtype(dtype, device):
    """`None` ("auto") is $SEGGPT_DTYPE when set, else bfloat16 on CUDA and on CPUs that compute bf16 in
    hardware (`cpu_has_native_bf16`), float32 elsewhere; strings like 'bf16' or 'float32' are accepted."""
    import torch

    if dtype is None or dtype == "auto":
        dtype = os.environ.get(DTYPE_ENV, "").strip() or "auto"
    if dtype == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if native else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPES.get(str(dtype).lower().replace("torch.", ""))
    if name is None:
        raise ModelSourceError(f"dtype {dtype!r} is not one of float32, bfloat16, float16 (or auto)")
    return getattr(torch, name)


def pick_quantize(quantize, device) -> str | None:
    """None (the default: $SEGGPT_QUANTIZE when set) or "int8": int8 linear layers (quantization.py), for
    the CPU only (weights int8 per output channel, activations int8 per call: VNNI/AMX kernels)."""
    if quantize is None:
        quantize = os.environ.get(QUANTIZE_ENV, "").strip() or None
    if quantize in (None, "none", "off", ""):
        return None
    if quantize not in QUANTIZE_CHOICES:
        raise ModelSourceError(f"quantize {quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)} (or none)")
    if device.type != "cpu":
        raise ModelSourceError(f"quantize {quantize!r} is for the CPU; on {device.type} use dtype bfloat16")
    return quantize


def cpu_count() -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (containers, CI
    runners), at least 1. torch's default counts the machine's cores, which over-subscribes a container."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def _cgroup_cpu_quota() -> float | None:
    """CPUs granted by the cgroup's quota (v2 `cpu.max`, or v1 `cpu.cfs_quota_us`), None when unlimited."""
    try:
        fields = (CGROUP_ROOT / "cpu.max").read_text().split()
        if fields and fields[0] != "max":
            return int(fields[0]) / int(fields[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((CGROUP_ROOT / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((CGROUP_ROOT / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def threads_are_auto(threads: int | None = None) -> bool:
    """Whether set_cpu_threads(threads) picks the count itself (no number given, no $SEGGPT_THREADS,
    OMP_NUM_THREADS or MKL_NUM_THREADS): then it may follow the cores other work leaves (cpu_share.py)."""
    return threads is None and not any(os.environ.get(name, "").strip()
                                       for name in (THREADS_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS"))


def set_cpu_threads(threads: int | None = None) -> int:
    """Set torch's CPU threads: `threads`, else $SEGGPT_THREADS, else (unless OMP_NUM_THREADS or
    MKL_NUM_THREADS says otherwise) the CPUs this process may use (`cpu_count`). Returns the count."""
    import torch

    if threads is None:
        text = os.environ.get(THREADS_ENV, "").strip()
        if text:
            try:
                threads = int(text)
            except ValueError:
                raise ModelSourceError(f"${THREADS_ENV} must be a whole number of threads, got {text!r}") from None
        elif os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
            return torch.get_num_threads()
        else:
            threads = cpu_count()
    if not isinstance(threads, int) or threads < 1:
        raise ModelSourceError(f"threads must be a whole number >= 1, got {threads!r}")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


# ------------------------------------------------------------------------------------------ sources


class DefaultModelWarning(UserWarning):
    """The default model fell back to the demo model (the real weights are not in the local cache)."""


def resolve_source(source: str | os.PathLike | None = AUTO_MODEL) -> str:
    """The model a source names. "auto" (or None, or empty) is the one rule for a default everywhere:
    $SEGGPT_MODEL when set, else the hub weights (BAAI/seggpt-vit-large) when they are in the local
    Hugging Face cache, else the demo model, with a DefaultModelWarning that says how to get the real
    weights. A `config.json` path stands for its transformers directory."""
    text = str(source).strip() if source is not None else ""
    if text in ("", AUTO_MODEL):
        configured = os.environ.get(MODEL_ENV, "").strip()
        if configured and configured != AUTO_MODEL:
            return resolve_source(configured)
        if _hub_cached(HUB_MODEL):
            return HUB_MODEL
        warnings.warn(f"using the small demo model: the real weights ({HUB_MODEL}) are not in the Hugging Face "
                      f"cache. Get them with `hf download {HUB_MODEL}`, or name a model with --model or "
                      f"${MODEL_ENV}", DefaultModelWarning, stacklevel=2)
        return DEMO_MODEL
    path = Path(text).expanduser()
    if path.name == "config.json" and path.is_file():
        return str(path.parent)
    return text


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def _hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the hub answers a TCP connection within `timeout` seconds (DNS included)."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    parts = urlsplit(constants.ENDPOINT)
    result: list[bool] = []

    def probe():
        try:
            socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


# ------------------------------------------------------------------------------------- model cache

def foreground_margin(config) -> float:
    """The margin a network's config asks its paintings to be read with (colors.favour_background); 0 if none.
    ModelSourceError when it is not a number in [0, 1)."""
    value = getattr(config, "foreground_margin", 0.0) or 0.0
    try:
        margin = float(value)
    except (TypeError, ValueError):
        margin = float("nan")
    if not 0.0 <= margin < 1.0:
        raise ModelSourceError(f"config.json: foreground_margin must be a number in [0, 1) (0: the plain nearest "
                               f"colour), got {value!r}")
    return margin


def weights_fingerprint(net) -> str:
    """A short hash of a network's weights (64 values sampled from every tensor, read as float32), so that
    other weights give another fingerprint. SegGPT takes it before converting or quantizing the network:
    the same weights at any precision, on any device, have the same fingerprint (Label Studio's
    model_version is built on it). A config's `foreground_margin` (how paintings are read: engine.py) counts
    too, when set: the same weights read another way give other labels."""
    import hashlib

    digest = hashlib.sha256()
    margin = foreground_margin(getattr(net, "config", None))
    if margin:
        digest.update(f"foreground_margin:{margin:.6g}:".encode())
    for name, tensor in sorted(net.state_dict().items()):
        if not hasattr(tensor, "reshape"):
            continue
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:6]


# ----------------------------------------------------------------------------------------- loading


def check_source(source: str | os.PathLike) -> str:
    """What kind of model `source` names, "demo", "directory", "checkpoint" or "hub", checked without
    loading anything (no torch): ModelSourceError names what is wrong, before a run does any work. A hub
    name that is not in the cache while the hub cannot be reached is refused here, as a possible typo."""
    source = str(source)
    if source == DEMO_MODEL:
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise ModelSourceError(f"the demo model is missing from this installation ({DEMO_MODEL_DIR})")
        return "demo"
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path}: a model directory needs a config.json (written by save_pretrained)")
        return "directory"
    if path.is_file():
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise ModelSourceError(
                f"{path}: not a model checkpoint (expected {', '.join(sorted(CHECKPOINT_SUFFIXES))} or a directory)"
            )
        return "checkpoint"
    if source.startswith((".", "/", "~")) or source.endswith(tuple(CHECKPOINT_SUFFIXES)) or source.count("/") > 1:
        raise ModelSourceError(f"{source}: no such file or directory")
    if not _hub_cached(source) and not _hub_reachable():
        typo = " (a typo?)" if source != HUB_MODEL else ""
        raise ModelSourceError(
            f"--model {source}: not a local file or folder, not the shipped '{DEMO_MODEL}' model, and not in the "
            f"Hugging Face cache while the hub cannot be reached (offline, or HF_HUB_OFFLINE is set){typo}. "
            f"Alternatives: --model {DEMO_MODEL}, a local transformers directory (save_pretrained), a Painter "
            f"checkpoint such as seggpt_vit_large.pth, or `hf download {source}` on a machine with network access")
    return "hub"


def load_network(source: str | os.PathLike = HUB_MODEL):
    """transformers' SegGptForImageSegmentation (eval mode, float32, CPU) from any supported source."""
    kind = check_source(source)
    if kind == "demo":
        return _from_directory(DEMO_MODEL_DIR)
    path = Path(str(source)).expanduser()
    if kind == "directory":
        return _from_directory(path)
    if kind == "checkpoint":
        return load_painter_checkpoint(path)
    return _from_hub(str(source))


class _quiet_loading:
    """No "Loading weights" progress bar (one per call otherwise); the previous setting is put back."""

    def __enter__(self):
        from transformers.utils import logging

        self.was_enabled = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging

        if self.was_enabled:
            logging.enable_progress_bar()
        return False


def _from_directory(path: Path):
    from transformers import SegGptForImageSegmentation

    try:
        with _quiet_loading():
            net = SegGptForImageSegmentation.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ModelSourceError(f"{path}: could not load a SegGPT model from this directory ({exc})") from None
    return net.float().eval()


def _from_hub(repo_id: str):
    """From the local Hugging Face cache when the weights are there; else from the hub, unless it does not
    answer within a few seconds (then the error comes at once, not after a minute of retries)."""
    from transformers import SegGptForImageSegmentation

    try:
        with _quiet_loading():
            if _hub_cached(repo_id) or not _hub_reachable():
                net = SegGptForImageSegmentation.from_pretrained(repo_id, local_files_only=True)
            else:
                net = SegGptForImageSegmentation.from_pretrained(repo_id)
    except Exception as exc:
        from huggingface_hub import constants

        offline = (constants.HF_HUB_OFFLINE or not _hub_cached(repo_id) and "local_files_only" in str(exc)
                   or "connect" in str(exc).lower() or "offline" in str(exc).lower())
        reason = (
            "this machine is offline (or HF_HUB_OFFLINE is set) and the weights are not in the Hugging Face cache"
            if offline
            else f"the hub did not provide it ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        )
        raise ModelSourceError(
            f"could not load SegGPT weights '{repo_id}' from the Hugging Face hub: {reason} "
            f"(cache: {constants.HF_HUB_CACHE}). Alternatives: --model demo (the small model that ships "
            "with this package), a local transformers directory (save_pretrained), or an original Painter "
            "checkpoint such as seggpt_vit_large.pth; to fill the cache, run "
            f"`hf download {repo_id}` on a machine with network access."
        ) from None
    return net.float().eval()


def painter_to_transformers_keys(state_dict: dict) -> tuple[dict, list[str]]:
    """Rename Painter parameter names to transformers'; returns (renamed, names that matched no rule)."""
    renamed, unknown = {}, []
    for key, value in state_dict.items():
        for pattern, replacement in PAINTER_RENAMES:
            new_key, n = re.subn(pattern, replacement, key)
            if n:
                renamed[new_key] = value
                break
        else:
            unknown.append(key)
    return renamed, unknown


def config_from_painter_state(state: dict):
    """A SegGptConfig inferred from the shapes of a Painter state dict (Painter names)."""
    from transformers import SegGptConfig

    try:
        proj = state["patch_embed.proj.weight"]  # (C, 3, p, p)
        hidden, patch = proj.shape[0], proj.shape[-1]
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
        rel_h, rel_w = state["blocks.0.attn.rel_pos_h"], state["blocks.0.attn.rel_pos_w"]  # (2H-1, d), (2W-1, d)
        head_dim = rel_h.shape[1]
        grid_h, grid_w = (rel_h.shape[0] + 1) // 2, (rel_w.shape[0] + 1) // 2
        num_positions = state["pos_embed"].shape[1]
        pretrain = int(round((num_positions - 1) ** 0.5)) * patch
        decoder_hidden = state["decoder_pred.0.weight"].shape[0]
        num_features = state["decoder_embed.weight"].shape[1] // hidden
        mlp_dim = state["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as exc:
        raise ModelSourceError(f"not a Painter SegGPT state dict: cannot find or read {exc}") from None
    # Painter reads the features after every (depth / 4)-th block: 5, 11, 17, 23 for ViT-L.
    indices = [round(depth * (i + 1) / num_features) - 1 for i in range(num_features)]
    return SegGptConfig(
        hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=hidden // head_dim, mlp_dim=mlp_dim,
        image_size=[grid_h * patch, grid_w * patch], patch_size=patch, pretrain_image_size=pretrain,
        decoder_hidden_size=decoder_hidden, merge_index=min(2, indices[0]), intermediate_hidden_state_indices=indices,
    )


def _read_state_dict(path: Path) -> dict:
    import torch

    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if type(exc).__name__ == "UnpicklingError":  # (torch's message runs to a page of weights_only advice)
            raise ModelSourceError(f"{path}: not a checkpoint of weights (a Painter .pth state dict or a .safetensors "
                                   "file)") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelSourceError(f"{path}: could not read the checkpoint ({type(exc).__name__}: {first})") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise ModelSourceError(f"{path}: holds no state dict of tensors")
    return state


def load_painter_checkpoint(path: str | os.PathLike):
    """An original Painter SegGPT checkpoint (e.g. seggpt_vit_large.pth) as a transformers model."""
    from transformers import SegGptForImageSegmentation

    path = Path(path)
    state = _read_state_dict(path)
    if any(k.startswith(("model.embeddings.", "decoder.decoder_embed")) for k in state):
        raise ModelSourceError(f"{path}: holds transformers parameter names; load its directory (with config.json)")
    config = config_from_painter_state(state)
    renamed, unknown = painter_to_transformers_keys(state)
    net = SegGptForImageSegmentation(config)
    missing, unexpected = net.load_state_dict(renamed, strict=False)
    problems = [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in list(unexpected) + unknown]
    if problems:
        raise ModelSourceError(f"{path}: does not match a SegGPT model: {', '.join(problems[:8])}")
    return net.float().eval()


def convert(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a Painter checkpoint as a transformers directory (config.json + model.safetensors)."""
    from .saving import checked_out_dir, write_model_dir

    out_dir = checked_out_dir(out_dir, overwrite, ModelSourceError)
    return write_model_dir(load_painter_checkpoint(checkpoint), out_dir)
