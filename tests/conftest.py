"""Shared fixtures: small random SegGPT models (no test downloads anything) and the shipped sample data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
# One precision for the whole suite on any CPU: "auto" picks bfloat16 where the CPU computes it in hardware
# (loading.pick_dtype), which would make results depend on the machine the tests run on. The automatic
# choice and the reduced precisions have tests of their own (test_cpu_precision.py).
os.environ.setdefault("SEGGPT_DTYPE", "float32")
# Likewise one thread count: automatic threads follow the cores other processes keep busy (cpu_share.py),
# and a GEMM's float results may differ by the last bit between thread counts, which would make the same
# image's answer depend on what else runs beside a test (the hosts' servers are other processes).
# test_cpu_share.py tests the automatic count; SEGGPT_THREADS set here fixes it for everything else.
if not os.environ.get("SEGGPT_THREADS") and not os.environ.get("OMP_NUM_THREADS"):
    from seggpt_plugins.loading import cpu_count

    os.environ["SEGGPT_THREADS"] = str(cpu_count())


def pytest_configure(config):
    """Import fiftyone's `eta` (if installed) before napari's pytest plugin runs tests, with the standard
    metadata finder in place (see tests/_metadata.py), so every test module is free to import fiftyone."""
    import importlib.util

    from ._metadata import standard_metadata_finder

    if importlib.util.find_spec("fiftyone") is None:
        return
    with standard_metadata_finder():
        import eta  # noqa: F401  (the import that reads package metadata; fiftyone itself loads on use)


SAMPLES = Path(__file__).resolve().parents[1] / "seggpt_plugins" / "demo" / "samples"


def random_net(seed=0, **overrides):
    """A small random SegGptForImageSegmentation with non-zero relative positions and tokens."""
    import torch
    from transformers import SegGptConfig, SegGptForImageSegmentation

    values = dict(hidden_size=32, num_hidden_layers=6, num_attention_heads=2, mlp_dim=64,
                  intermediate_hidden_state_indices=[2, 3, 4, 5], merge_index=2, decoder_hidden_size=8,
                  drop_path_rate=0.0)
    values.update(overrides)
    torch.manual_seed(seed)
    net = SegGptForImageSegmentation(SegGptConfig(**values)).eval()
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "rel_pos" in name or "token" in name:
                param.normal_(0, 0.05)
    return net


@pytest.fixture(scope="session")
def net448():
    """Full input size (896x448 canvas, 56x28 patches), tiny width: parity with transformers."""
    return random_net()


@pytest.fixture(scope="session")
def net64():
    """64x64 halves, 8x8 patches: fast tests of the API."""
    return random_net(seed=1, image_size=[128, 64], patch_size=8, pretrain_image_size=64)


@pytest.fixture(scope="session")
def model64(net64):
    from seggpt_plugins import SegGPT

    return SegGPT(net64, device="cpu")


@pytest.fixture(scope="session")
def demo_model():
    from seggpt_plugins import SegGPT

    return SegGPT.from_pretrained("demo", device="cpu")


@pytest.fixture(scope="session")
def nuclei2d():
    import tifffile

    return tifffile.imread(SAMPLES / "nuclei2d.tif"), tifffile.imread(SAMPLES / "nuclei2d_mask.tif")


@pytest.fixture(scope="session")
def nuclei3d():
    import tifffile

    return tifffile.imread(SAMPLES / "nuclei3d.tif"), tifffile.imread(SAMPLES / "nuclei3d_mask.tif")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
