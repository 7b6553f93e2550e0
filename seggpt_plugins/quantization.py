"""int8 linear layers for the CPU (`quantize="int8"`): weights int8, activations quantized on each call.

Two kernels, picked by what this torch and CPU offer (`int8_kernel`):
    "onednn"   oneDNN's int8 GEMM on AMX (Xeons since Sapphire Rapids) through `Int8Linear`: weights
               int8 per output channel, prepacked once; activations int8 per tensor, scaled by their
               absolute maximum on each call; the result comes back in the activations' own dtype,
               so the rest of the model keeps computing in bf16 where the CPU has it.
    "dynamic"  elsewhere, torch's dynamic quantization (`torch.ao.quantization.quantize_dynamic`,
               fbgemm's VNNI/AVX2 kernels): float32 activations in and out, so the rest stays float32.
Notation: M rows (tokens), K input features, N output features.
"""

from __future__ import annotations

import os
import warnings

import torch

from .errors import ModelSourceError

# torch announces that quantized tensors will go; Int8Linear uses one only as a fused rounding kernel.
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)


def int8_kernel() -> str:
    """"onednn" where this torch has oneDNN's int8 linear op and the CPU has AMX (as torch's own CPU
    detection and oneDNN's ISA cap, $ONEDNN_MAX_CPU_ISA, report it), else "dynamic". Without AMX, oneDNN
    ran this op on its reference kernel (`ref_int8`: about 100 s for one 784x1024x4096 product, measured
    with the ISA capped at AVX512_CORE_VNNI), while torch's dynamic quantization uses fbgemm's VNNI/AVX2
    kernels."""
    try:
        has_op = (torch.backends.mkldnn.is_available() and "onednn" in torch.backends.quantized.supported_engines
                  and hasattr(torch.ops.onednn, "qlinear_pointwise") and hasattr(torch.ops.onednn, "qlinear_prepack"))
        amx = bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return "dynamic"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if cap and cap not in ("ALL", "DEFAULT") and "AMX" not in cap:
        amx = False
    return "onednn" if has_op and amx else "dynamic"


class Int8Linear(torch.nn.Module):
    """y = x W^T + b with W int8 (one scale per output channel) and x int8 (one scale per call), on oneDNN."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()  # (N, K)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Plain attributes, not buffers: `.to(dtype)` must not round the scales or touch the packing.
        self.weight_scale = (weight.abs().amax(dim=1).clamp_min(1e-12) / 127.0).contiguous()  # (N,)
        weight_int8 = torch.round(weight / self.weight_scale[:, None]).clamp_(-127, 127).to(torch.int8)
        self.weight_zero_point = torch.zeros(self.out_features, dtype=torch.int64)  # (N,)
        self.packed_weight = torch.ops.onednn.qlinear_prepack(weight_int8, None)
        self.bias = None if linear.bias is None else linear.bias.detach().float().contiguous()  # (N,)
        self.zero_point = torch.zeros((), dtype=torch.int64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, K), float32 or bfloat16
        low, high = torch.aminmax(rows)
        scale = torch.maximum(-low, high).float().clamp_min(1e-12) / 127.0  # (): per tensor, symmetric
        # One fused pass (the arithmetic spelled out costs five).
        rows_int8 = torch.quantize_per_tensor(rows.float(), scale.item(), 0, torch.qint8).int_repr()  # (M, K)
        out = torch.ops.onednn.qlinear_pointwise.tensor(
            rows_int8, scale, self.zero_point, self.packed_weight, self.weight_scale, self.weight_zero_point,
            self.bias, 1.0, 0, x.dtype, "none", [], "")  # (M, N) in x's dtype
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 (oneDNN)"


def quantize_linear_int8(net, kernel: str | None = None):
    """`net` with every nn.Linear replaced by an int8 one (`kernel`: None = `int8_kernel()`). With
    "onednn" the layers are replaced in place: call it after the net has its final dtype. With "dynamic"
    a float32 copy is returned."""
    kernel = kernel or int8_kernel()
    if kernel == "onednn":
        for parent in list(net.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, Int8Linear(child))
        return net
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao; it still works
        warnings.simplefilter("ignore")
        try:
            from torch.ao.quantization import quantize_dynamic
        except ImportError:
            raise ModelSourceError("int8 quantization needs oneDNN or torch.ao.quantization.quantize_dynamic, "
                                   f"and this torch ({torch.__version__}) has neither; use dtype bfloat16") from None
        return quantize_dynamic(net.float(), {torch.nn.Linear}, dtype=torch.qint8)
