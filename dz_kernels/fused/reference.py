"""Plain-PyTorch references of the fused DiT-block ops: what each op computes (float64 inputs stay float64).
The FP8 output of the LayerNorm follows dz_kernels/_common.py (scale = max(rowmax|y|, 1e-12) / 448)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import fp8_scale, quantize_e4m3

__all__ = ["layernorm_modulate_reference", "gated_residual_layernorm_modulate_reference", "gated_residual_reference",
           "rms_norm_reference", "gelu_tanh_reference"]


# ------------------------------------------------------------------------------------------------------ references
def layernorm_modulate_reference(x, shift=None, scale=None, eps=1e-6, weight=None, bias=None, fp8=False):
    """Plain PyTorch: ``(LN_fp32(x) [* weight + bias] * (1 + scale) + shift).to(x.dtype)``; float64 stays float64.

    fp8=True: ``(q, q_scale)`` from the unrounded result y: ``q_scale = max(rowmax|y|, 1e-12) / 448`` ([.., 1],
    float32) and ``q = clamp(y / q_scale, -448, 448).to(float8_e4m3fn)`` (computed in float32)."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = F.layer_norm(x.to(ct), (x.shape[-1],), weight.to(ct) if weight is not None else None,
                     bias.to(ct) if bias is not None else None, eps)
    if scale is not None:
        h = h * (1 + scale.to(ct))
    if shift is not None:
        h = h + shift.to(ct)
    if fp8:
        return _fp8_rowwise_reference(h)
    return h.to(x.dtype)


def _fp8_rowwise_reference(h):
    h = h.float()
    s = fp8_scale(h.abs().amax(-1, keepdim=True))
    return quantize_e4m3(h, s), s


def gated_residual_layernorm_modulate_reference(x, y, gate, shift=None, scale=None, eps=1e-6, weight=None,
                                                bias=None, fp8=False):
    """Plain PyTorch: ``x_new = (x + gate * y).to(x.dtype)``; returns
    ``(x_new, layernorm_modulate_reference(x_new, shift, scale, eps, weight, bias, fp8))``."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    r = y.to(ct) if gate is None else gate.to(ct) * y.to(ct)
    x_new = (x.to(ct) + r).to(x.dtype)
    return x_new, layernorm_modulate_reference(x_new, shift, scale, eps, weight, bias, fp8)


def gated_residual_reference(x, y, gate):
    """Plain PyTorch: ``(x + gate * y)`` in float32 (float64 stays float64), cast to x's dtype."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(ct) + gate.to(ct) * y.to(ct)).to(x.dtype)


def rms_norm_reference(x, weight, eps=1e-6):
    """Plain PyTorch, Wan2.1's formula: ``(x.float() * rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps))
    .type_as(x) * weight`` (float64 inputs stay float64)."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(ct)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def gelu_tanh_reference(x):
    """Plain PyTorch: ``F.gelu(x.float(), approximate="tanh").to(x.dtype)`` (float64 stays float64)."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    return F.gelu(x.to(ct), approximate="tanh").to(x.dtype)
