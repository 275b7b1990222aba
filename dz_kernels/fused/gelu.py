"""GELU with the tanh approximation (Wan2.1's FFN activation), forward and backward.

    gelu(x) = 0.5 * x * (1 + tanh(z)),  z = k * (x + 0.044715 * x^3),  k = sqrt(2 / pi)

Evaluated without cancellation: 0.5 * (1 + tanh(z)) = sigmoid(2z) = 1 / (1 + exp(-2z)), so gelu(x) = x * sigmoid(2z)
keeps its relative accuracy where 1 + tanh(z) would cancel (x < 0: at x = -3 the form 0.5 x (1 + t) loses about
15 bits to the GPU's tanh error, seen on an H200). The backward uses 1 - tanh(z)^2 = 4 sigmoid(2z) sigmoid(-2z):
    d gelu / dx = sigmoid(2z) + 2 x sigmoid(2z) sigmoid(-2z) k (1 + 3 * 0.044715 x^2).
Below z = -40 the sigmoid is taken as 0 (it is under 2e-35 there, and float32 tanh(z) is exactly -1), so exp never
overflows.
For use where no GEMM epilogue takes the activation. Elementwise over a contiguous tensor of any shape.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

import triton
import triton.language as tl

from .._common import cast_rne
from . import _common as cm

__all__ = ["gelu_tanh", "gelu_tanh_reference"]

_BLOCK = 1024
_K = math.sqrt(2.0 / math.pi)
_A = 0.044715


@triton.jit
def _sigmoid2(z):
    """sigmoid(2z) = 1 / (1 + exp(-2z)); 0 below z = -40 (where it is under 2e-35, and torch's tanh is -1)."""
    return tl.where(z < -40.0, 0.0, 1.0 / (1.0 + tl.exp(-2.0 * z)))


@triton.jit
def _gelu_tanh_fwd_kernel(X, OUT, n, k, a, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    z = k * (x + a * x * x * x)
    tl.store(OUT + offs, cast_rne(x * _sigmoid2(z), OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_tanh_bwd_kernel(DY, X, DX, n, k, a, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    z = k * (x + a * x * x * x)
    sp = _sigmoid2(z)
    sm = _sigmoid2(-z)
    grad = sp + 2.0 * x * sp * sm * k * (1.0 + 3.0 * a * x * x)
    tl.store(DX + offs, cast_rne(dy * grad, DX.dtype.element_ty), mask=mask)


def _launch_fwd(x, out):
    n = x.numel()
    if n:
        _gelu_tanh_fwd_kernel[(triton.cdiv(n, _BLOCK),)](x, out, n, _K, _A, BLOCK=_BLOCK, num_warps=4)


def _launch_bwd(dy, x):
    dx = cm.empty(x.shape, x.dtype, x.device)
    n = x.numel()
    if n:
        _gelu_tanh_bwd_kernel[(triton.cdiv(n, _BLOCK),)](dy.contiguous(), x, dx, n, _K, _A,
                                                         BLOCK=_BLOCK, num_warps=4)
    return dx


@torch.library.custom_op("dz::gelu_tanh", mutates_args=())
def _gelu_tanh_op(x: torch.Tensor) -> torch.Tensor:
    out = cm.empty(x.shape, x.dtype, x.device)
    _launch_fwd(x, out)
    return out


@_gelu_tanh_op.register_fake
def _(x):
    return x.new_empty(x.shape)


@torch.library.custom_op("dz::gelu_tanh_out", mutates_args=("out",))
def _gelu_tanh_out_op(x: torch.Tensor, out: torch.Tensor) -> None:
    _launch_fwd(x, out)


@_gelu_tanh_out_op.register_fake
def _(x, out):
    return None


@torch.library.custom_op("dz::gelu_tanh_backward", mutates_args=())
def _gelu_tanh_bwd_op(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _launch_bwd(dy, x)


@_gelu_tanh_bwd_op.register_fake
def _(dy, x):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x)


def _backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return torch.ops.dz.gelu_tanh_backward(dy, x)


_gelu_tanh_op.register_autograd(_backward, setup_context=_setup_context)


def gelu_tanh(x: torch.Tensor, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GELU, tanh approximation (``F.gelu(x, approximate="tanh")``), float32 math.

    Args:
        x: any shape, contiguous, float32/bfloat16/float16 (the FFN hidden activation ``[B, L, 13824]``).
        out: optional preallocated contiguous output of x's shape (any float dtype); no autograd through it.

    Returns:
        Same shape as x, in x's dtype (or out). Differentiable in x.
    """
    cm.check_float("x", x)
    if not x.is_contiguous():
        raise ValueError("x must be contiguous; call .contiguous() first")
    cm.check_device({}, x)
    if out is None:
        return torch.ops.dz.gelu_tanh(x)
    cm.check_no_grad_for_out(x)
    cm.check_out("out", out, x.shape, cm.SUPPORTED_DTYPES, x)
    torch.ops.dz.gelu_tanh_out(x, out)
    return out


def gelu_tanh_reference(x):
    """Plain PyTorch: ``F.gelu(x.float(), approximate="tanh").to(x.dtype)`` (float64 stays float64)."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    return F.gelu(x.to(ct), approximate="tanh").to(x.dtype)
