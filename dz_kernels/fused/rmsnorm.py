"""RMSNorm over the full hidden dim (Wan2.1's q/k norm), forward and backward.

Exactly Wan2.1's ``WanRMSNorm``: ``(x.float() * rsqrt(mean(x.float()^2) + eps)).type_as(x) * weight``: the
normalized row is rounded to x's dtype before the weight multiply, and the product is rounded again. The
backward treats those roundings as identity (as autograd does); dweight is summed over rows per program into
float32 partial rows, then the partials are summed in torch (deterministic).
"""
from __future__ import annotations

from typing import Optional

import torch

import triton
import triton.language as tl

from .._common import cast_rne
from . import _common as cm

__all__ = ["rms_norm", "rms_norm_reference"]


@triton.jit
def _rms_norm_fwd_kernel(
    X, sxb, sxl, W, OUT, RSTD,
    L, C, eps,
    STORE_RSTD: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    l = row - b * L
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(X + b * sxb + l * sxl + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)
    n = cast_rne(x * rstd, X.dtype.element_ty).to(tl.float32)  # .type_as(x)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * C + cols, cast_rne(n * w, OUT.dtype.element_ty), mask=mask)
    if STORE_RSTD:
        tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, sdb, sdl, X, sxb, sxl, W, RSTD, DX, DW_PART,
    N, L, C, rows_per_prog,
    NEED_DW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, N)
    for row in range(row_start, row_end):
        b = row // L
        l = row - b * L
        dy = tl.load(DY + b * sdb + l * sdl + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + b * sxb + l * sxl + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        if NEED_DW:
            dw_acc += dy * cast_rne(xhat, X.dtype.element_ty).to(tl.float32)
        dn = dy * w
        c = tl.sum(dn * xhat, axis=0) / C
        tl.store(DX + row * C + cols, cast_rne((dn - xhat * c) * rstd, DX.dtype.element_ty), mask=mask)
    if NEED_DW:
        tl.store(DW_PART + pid * C + cols, dw_acc, mask=mask)


def _n_rows(shape) -> int:
    n = 1
    for s in shape[:-1]:
        n *= s
    return n


def _launch_fwd(x, weight, eps, out, rstd):
    n_rows = _n_rows(x.shape)
    if n_rows == 0:
        return
    x3, sxb, sxl = cm.rows_view(x, x.shape)
    _, L, C = x3.shape
    block, warps = cm.row_config(C)
    _rms_norm_fwd_kernel[(n_rows,)](
        x3, sxb, sxl, weight, out, rstd if rstd is not None else out,
        L, C, float(eps), STORE_RSTD=rstd is not None, BLOCK_C=block,
        num_warps=warps)


def _launch_bwd(dy, x, weight, rstd, need_dw):
    C = x.shape[-1]
    dx = cm.empty(x.shape, x.dtype, x.device)
    dw = cm.empty((C,) if need_dw else (0,), torch.float32, x.device)
    n_rows = _n_rows(x.shape)
    if n_rows == 0:
        if need_dw:
            dw.zero_()
        return dx, dw
    x3, sxb, sxl = cm.rows_view(x, x.shape)
    _, L, _ = x3.shape
    dy3, sdb, sdl = cm.rows_view(dy, x.shape)
    if need_dw:
        programs = cm.partial_programs(n_rows, x.device)
        rows_per_prog = triton.cdiv(n_rows, programs)
        programs = triton.cdiv(n_rows, rows_per_prog)
        dw_part = cm.empty((programs, C), torch.float32, x.device)
    else:
        programs, rows_per_prog, dw_part = n_rows, 1, dx
    block, warps = cm.row_config(C, backward=True)
    _rms_norm_bwd_kernel[(programs,)](
        dy3, sdb, sdl, x3, sxb, sxl, weight, rstd, dx, dw_part,
        n_rows, L, C, rows_per_prog, NEED_DW=need_dw, BLOCK_C=block,
        num_warps=warps)
    if need_dw:
        dw.copy_(dw_part.sum(0))
    return dx, dw


@torch.library.custom_op("dz::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    out = cm.empty(x.shape, x.dtype, x.device)
    rstd = cm.empty((_n_rows(x.shape),), torch.float32, x.device)
    _launch_fwd(x, weight, eps, out, rstd)
    return out, rstd


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty((_n_rows(x.shape),), dtype=torch.float32)


@torch.library.custom_op("dz::rms_norm_out", mutates_args=("out",))
def _rms_norm_out_op(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    _launch_fwd(x, weight, eps, out, None)


@_rms_norm_out_op.register_fake
def _(x, weight, eps, out):
    return None


@torch.library.custom_op("dz::rms_norm_backward", mutates_args=())
def _rms_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                     need_dweight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_bwd(dy, x, weight, rstd, need_dweight)


@_rms_norm_bwd_op.register_fake
def _(dy, x, weight, rstd, need_dweight):
    C = x.shape[-1]
    return x.new_empty(x.shape), x.new_empty((C,) if need_dweight else (0,), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, eps = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)


def _backward(ctx, dy, d_rstd):
    x, weight, rstd = ctx.saved_tensors
    need_x, need_w, _ = ctx.needs_input_grad
    dx, dw = torch.ops.dz.rms_norm_backward(cm.last_dim_contiguous(dy), x, weight, rstd, bool(need_w))
    return (dx if need_x else None), (dw.to(weight.dtype) if need_w else None), None


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RMSNorm over the last dim: ``(x * rsqrt(mean(x^2) + eps)).type_as(x) * weight`` (float32 statistics).

    Args:
        x: ``[B, L, C]`` or ``[N, C]`` (float32/bfloat16/float16, last dim contiguous, ``C <= 16384``); for the
            Wan2.1 q/k norm C is the full hidden dim (5120), before the head split.
        weight: ``[C]``, same dtype as x.
        eps: added to the mean square (Wan2.1: 1e-6).
        out: optional preallocated contiguous output of x's shape (any float dtype); no autograd through it.

    Returns:
        ``[B, L, C]`` in x's dtype (or out). Differentiable in x and weight.
    """
    cm.check_activation("x", x)
    cm.check_vector("weight", weight, x.shape[-1])
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but x has {x.dtype}; rms_norm needs them equal "
                        "(the reference multiplies in x's dtype)")
    cm.check_device({"weight": weight}, x)
    if not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    if out is None:
        return torch.ops.dz.rms_norm(x, weight, float(eps))[0]
    cm.check_no_grad_for_out(x, weight)
    cm.check_out("out", out, x.shape, cm.SUPPORTED_DTYPES, x)
    torch.ops.dz.rms_norm_out(x, weight, float(eps), out)
    return out


def rms_norm_reference(x, weight, eps=1e-6):
    """Plain PyTorch, Wan2.1's formula: ``(x.float() * rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps))
    .type_as(x) * weight`` (float64 inputs stay float64)."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(ct)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight
