"""CPU precision and threads: bfloat16 where the CPU has it, int8 linear layers on request, thread count
from the CPUs the process may use. Speed is measured by benchmarks/bench_core.py, accuracy by
benchmarks/eval_precision.py; here: the choices are right and each precision paints what fp32 paints."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from seggpt_plugins import SegGPT, loading
from seggpt_plugins.errors import InputError, ModelSourceError

SAMPLES = Path(__file__).resolve().parents[1] / "seggpt_plugins" / "demo" / "samples"


def cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs /proc/cpuinfo to compare with")
def test_bf16_detection_agrees_with_the_cpus_own_flags():
    flags = cpuinfo_flags()
    assert loading.cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_auto_precision_follows_the_cpu_and_the_environment(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("SEGGPT_DTYPE", raising=False)
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: True)
    assert loading.pick_dtype(None, cpu) == torch.bfloat16
    assert loading.pick_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: False)
    assert loading.pick_dtype(None, cpu) == torch.float32
    assert loading.pick_dtype("fp32", cpu) == torch.float32  # an explicit choice wins
    monkeypatch.setenv("SEGGPT_DTYPE", "bf16")
    assert loading.pick_dtype(None, cpu) == torch.bfloat16
    monkeypatch.setenv("SEGGPT_DTYPE", "int4")
    with pytest.raises(ModelSourceError, match="'int4' is not one of float32, bfloat16, float16"):
        loading.pick_dtype(None, cpu)


def test_quantize_is_int8_on_the_cpu_only(monkeypatch):
    monkeypatch.delenv("SEGGPT_QUANTIZE", raising=False)
    cpu = torch.device("cpu")
    assert loading.pick_quantize(None, cpu) is None
    assert loading.pick_quantize("int8", cpu) == "int8"
    with pytest.raises(ModelSourceError, match="'int8' is for the CPU; on cuda use dtype bfloat16"):
        loading.pick_quantize("int8", torch.device("cuda"))
    with pytest.raises(ModelSourceError, match="'int4' is not one of int8"):
        loading.pick_quantize("int4", cpu)
    monkeypatch.setenv("SEGGPT_QUANTIZE", "int8")
    assert loading.pick_quantize(None, cpu) == "int8"


@pytest.fixture(scope="module")
def example():
    import tifffile

    image, mask = tifffile.imread(SAMPLES / "nuclei2d.tif"), tifffile.imread(SAMPLES / "nuclei2d_mask.tif")
    return image[:128, :128], (mask[:128, :128] > 0).astype(np.uint8), image[128:256, 128:256], mask[128:256, 128:256] > 0


PRECISIONS = {"fp32": {"dtype": "float32"}, "bf16": {"dtype": "bfloat16"}, "int8": {"quantize": "int8"},
              "int8+bf16": {"quantize": "int8", "dtype": "bfloat16"}}


def test_each_precision_paints_what_float32_paints(example):
    """The demo model at bf16 and with int8 linear layers (around them fp32, and bf16 where int8 runs on
    oneDNN) against fp32 on one real nuclei tile: the painting close, the foreground nearly the same pixels."""
    from seggpt_plugins.quantization import Int8Linear, int8_kernel

    prompt, prompt_mask, target, _ = example
    onednn = int8_kernel() == "onednn"
    models = {name: SegGPT.from_pretrained("demo", device="cpu", **options) for name, options in PRECISIONS.items()
              if onednn or name != "int8+bf16"}
    assert models["bf16"].dtype == torch.bfloat16
    assert models["int8"].dtype == torch.float32 and models["int8"].quantize == "int8"  # conftest: fp32
    assert "quantize=int8" in repr(models["int8"])
    qkv = models["int8"].net.model.encoder.layers[0].attention.qkv
    assert isinstance(qkv, Int8Linear) == onednn and "quantiz" in type(qkv).__module__  # really int8
    assert not any(isinstance(m, torch.nn.Linear) for m in models["int8"].net.modules())
    if onednn:
        assert models["int8+bf16"].dtype == torch.bfloat16
    assert len({model.fingerprint for model in models.values()}) == 1  # the same weights at every precision
    paintings, labels = {}, {}
    for name, model in models.items():
        pred = model.segment(target, prompt, prompt_mask, with_painting=True, quality=None)[0]
        paintings[name], labels[name] = pred.painting.astype(np.float32), pred.labels > 0
    for name in set(models) - {"fp32"}:
        error = np.linalg.norm(paintings[name] - paintings["fp32"]) / np.linalg.norm(paintings["fp32"])
        assert error < 0.08, (name, error)
        assert (labels[name] != labels["fp32"]).mean() < 0.03, name


def test_int8_linear_matches_the_float_layer():
    from seggpt_plugins.quantization import Int8Linear

    if not hasattr(torch.ops.onednn, "qlinear_pointwise"):  # runs without AMX too (slowly, on small sizes)
        pytest.skip("this torch has no oneDNN int8 linear")
    linear = torch.nn.Linear(64, 96)
    x = torch.randn(2, 5, 7, 64)  # any leading dims
    with torch.inference_mode():
        ref = linear(x)
        for dtype in (torch.float32, torch.bfloat16):
            out = Int8Linear(linear)(x.to(dtype))
            assert out.shape == ref.shape and out.dtype == dtype
            assert ((out.float() - ref).norm() / ref.norm()) < 0.03
        zeros = Int8Linear(linear)(torch.zeros(3, 64))  # an all-zero input has no scale: the bias comes out
        assert torch.allclose(zeros, linear.bias.expand(3, -1), atol=1e-6)


def test_int8_runs_on_onednn_only_with_amx(monkeypatch):
    """Without AMX oneDNN's int8 op falls to its reference kernel (minutes per layer): torch's dynamic
    quantization is used instead. oneDNN's own ISA cap counts as the CPU's."""
    from seggpt_plugins import quantization

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert quantization.int8_kernel() == "dynamic"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    assert quantization.int8_kernel() == "dynamic"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert quantization.int8_kernel() == ("onednn" if hasattr(torch.ops.onednn, "qlinear_pointwise") else "dynamic")


def test_int8_with_a_reduced_dtype_is_refused_without_onednn(net64, monkeypatch):
    from seggpt_plugins import quantization

    monkeypatch.setattr(quantization, "int8_kernel", lambda: "dynamic")
    original = net64.model.embeddings.patch_embeddings.projection.weight.detach().clone()
    with pytest.raises(InputError, match="computes in float32 around int8 weights"):
        SegGPT(net64, device="cpu", dtype="bfloat16", quantize="int8")
    assert torch.equal(net64.model.embeddings.patch_embeddings.projection.weight, original)  # refused untouched
    model = SegGPT(net64, device="cpu", quantize="int8")  # auto: float32 around torch's dynamic int8
    assert model.dtype == torch.float32
    assert "quantized" in type(model.net.model.encoder.layers[0].attention.qkv).__module__
    # on a CPU with bf16 hardware "auto" would be bf16: the weights are never rounded through it first
    monkeypatch.delenv("SEGGPT_DTYPE", raising=False)
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: True)
    model = SegGPT(copy.deepcopy(net64), device="cpu", quantize="int8")
    assert model.dtype == torch.float32
    assert torch.equal(model.net.model.embeddings.patch_embeddings.projection.weight, original)


def test_threads_follow_the_cpus_the_process_may_use():
    """A process pinned to one CPU runs one thread; $SEGGPT_THREADS and `threads=` set it; OMP_NUM_THREADS
    set by the user is left alone."""
    code = ("import os, torch; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from seggpt_plugins import loading; print(loading.cpu_count(), loading.set_cpu_threads(), "
            "torch.get_num_threads(), loading.set_cpu_threads(3), torch.get_num_threads())")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                                          "SEGGPT_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["1", "1", "1", "3", "3"]
    out = subprocess.run([sys.executable, "-c", "import torch; from seggpt_plugins import loading; "
                          "print(loading.set_cpu_threads(), torch.get_num_threads())"],
                         capture_output=True, text=True, env={**env, "SEGGPT_THREADS": "1"}, check=True)
    assert out.stdout.split() == ["1", "1"]
    out = subprocess.run([sys.executable, "-c", "import torch; from seggpt_plugins import loading; "
                          "print(loading.set_cpu_threads(), torch.get_num_threads())"],
                         capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, check=True)
    assert out.stdout.split() == ["1", "1"]


@pytest.mark.parametrize("content, expected", [("max 100000", None), ("150000 100000", 1.5), ("50000 100000", 0.5)])
def test_cgroup_quota_caps_the_thread_count(tmp_path, monkeypatch, content, expected):
    (tmp_path / "cpu.max").write_text(content + "\n")
    monkeypatch.setattr(loading, "CGROUP_ROOT", tmp_path)
    assert loading._cgroup_cpu_quota() == expected
    if expected is not None:
        assert loading.cpu_count() == min(len(__import__("os").sched_getaffinity(0)), max(1, math.ceil(expected)))


def test_cli_quantize_and_threads(tmp_path):
    import tifffile
    from PIL import Image

    image, mask = tifffile.imread(SAMPLES / "nuclei2d.tif"), tifffile.imread(SAMPLES / "nuclei2d_mask.tif")
    Image.fromarray(image[:128, :128]).save(tmp_path / "prompt.png")
    Image.fromarray(((mask[:128, :128] > 0) * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    Image.fromarray(image[128:256, :128]).save(tmp_path / "target.png")
    run = lambda *extra: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "seggpt_plugins.cli", "segment", str(tmp_path / "target.png"), "--prompt",
         str(tmp_path / "prompt.png"), str(tmp_path / "mask.png"), "--model", "demo", "--out", str(tmp_path / "out"),
         *extra], capture_output=True, text=True)
    done = run("--quantize", "int8", "--threads", "1")
    assert done.returncode == 0, done.stderr
    assert "quantize=int8" in done.stderr
    assert (tmp_path / "out" / "target_labels.png").is_file()
    refused = run("--quantize", "int4", "--overwrite")
    assert refused.returncode == 2 and "invalid choice: 'int4'" in refused.stderr
