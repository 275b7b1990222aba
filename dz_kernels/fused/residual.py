"""Gated residual add ``x + gate * y`` (the end of a Wan2.1 block's FFN branch), forward and backward.

The gate is read through its (batch, token) strides, so a per-sample ``[B, 1, C]`` gate is never expanded in
memory. Math in float32, one rounding to the output dtype.
"""
from __future__ import annotations

from typing import Optional

import torch

import triton
import triton.language as tl

from .._common import cast_rne
from . import _common as cm

__all__ = ["gated_residual", "gated_residual_reference"]

_BLOCK = 1024  # columns per program; a row of C features takes cdiv(C, _BLOCK) programs


@triton.jit
def _gated_residual_fwd_kernel(
    X, sxb, sxl, Y, syb, syl, G, sgb, sgl, OUT,
    L, C, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    l = row - b * L
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < C
    x = tl.load(X + b * sxb + l * sxl + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + b * syb + l * syl + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + b * sgb + l * sgl + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * C + cols, cast_rne(x + g * y, OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_bwd_kernel(
    D, sdb, sdl, Y, syb, syl, G, sgb, sgl, DY, DG,
    L, C,
    NEED_DY: tl.constexpr, NEED_DG: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    l = row - b * L
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < C
    d = tl.load(D + b * sdb + l * sdl + cols, mask=mask, other=0.0).to(tl.float32)
    if NEED_DY:
        g = tl.load(G + b * sgb + l * sgl + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DY + row * C + cols, cast_rne(d * g, DY.dtype.element_ty), mask=mask)
    if NEED_DG:
        y = tl.load(Y + b * syb + l * syl + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DG + row * C + cols, cast_rne(d * y, DG.dtype.element_ty), mask=mask)


def _grid(x_shape):
    C = x_shape[-1]
    rows = 1
    for s in x_shape[:-1]:
        rows *= s
    return rows, triton.cdiv(C, _BLOCK)


def _launch_fwd(x, y, gate, out):
    rows, col_blocks = _grid(x.shape)
    if rows == 0:
        return
    x3, sxb, sxl = cm.rows_view(x, x.shape)
    _, L, C = x3.shape
    y3, syb, syl = cm.rows_view(y, x.shape)
    g3, sgb, sgl = cm.rows_view(gate, x.shape)
    _gated_residual_fwd_kernel[(rows, col_blocks)](
        x3, sxb, sxl, y3, syb, syl, g3, sgb, sgl, out, L, C, BLOCK=_BLOCK,
        num_warps=4)


def _bwd_specs(x_shape, y, gate, need_dy, need_dg):
    none = ((0,), torch.float32)
    return (
        (tuple(x_shape), y.dtype) if need_dy else none,
        (tuple(x_shape), gate.dtype if gate.shape == x_shape else torch.float32) if need_dg else none,
    )


def _launch_bwd(d, y, gate, need_dy, need_dg):
    dy, dg = (cm.empty(s, dt, d.device) for s, dt in _bwd_specs(y.shape, y, gate, need_dy, need_dg))
    rows, col_blocks = _grid(y.shape)
    if rows == 0 or not (need_dy or need_dg):
        return dy, dg
    _, L, C = cm.as_3d(y).shape
    d3, sdb, sdl = cm.rows_view(d, y.shape)
    y3, syb, syl = cm.rows_view(y, y.shape)
    g3, sgb, sgl = cm.rows_view(gate, y.shape)
    _gated_residual_bwd_kernel[(rows, col_blocks)](
        d3, sdb, sdl, y3, syb, syl, g3, sgb, sgl, dy if need_dy else d3, dg if need_dg else d3, L, C,
        NEED_DY=need_dy, NEED_DG=need_dg, BLOCK=_BLOCK, num_warps=4)
    return dy, dg


@torch.library.custom_op("dz::gated_residual", mutates_args=())
def _gated_residual_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    out = cm.empty(x.shape, x.dtype, x.device)
    _launch_fwd(x, y, gate, out)
    return out


@_gated_residual_op.register_fake
def _(x, y, gate):
    return x.new_empty(x.shape)


@torch.library.custom_op("dz::gated_residual_out", mutates_args=("out",))
def _gated_residual_out_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, out: torch.Tensor) -> None:
    _launch_fwd(x, y, gate, out)


@_gated_residual_out_op.register_fake
def _(x, y, gate, out):
    return None


@torch.library.custom_op("dz::gated_residual_backward", mutates_args=())
def _gated_residual_bwd_op(d: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, need_dy: bool,
                           need_dgate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_bwd(d, y, gate, need_dy, need_dgate)


@_gated_residual_bwd_op.register_fake
def _(d, y, gate, need_dy, need_dgate):
    return tuple(y.new_empty(s, dtype=dt) for s, dt in _bwd_specs(y.shape, y, gate, need_dy, need_dgate))


def _setup_context(ctx, inputs, output):
    x, y, gate = inputs
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(y, gate)


def _backward(ctx, d):
    y, gate = ctx.saved_tensors
    need_x, need_y, need_g = ctx.needs_input_grad
    dy, dg = torch.ops.dz.gated_residual_backward(cm.last_dim_contiguous(d), y, gate, bool(need_y), bool(need_g))
    return (d.to(ctx.x_dtype) if need_x else None, dy if need_y else None,
            cm.reduce_to(dg, gate) if need_g else None)


_gated_residual_op.register_autograd(_backward, setup_context=_setup_context)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, *,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x + gate * y``, computed in float32 and rounded once.

    Args:
        x: residual stream ``[B, L, C]`` or ``[N, C]`` (float32/bfloat16/float16, last dim contiguous).
        y: branch output, same shape as x (float32 or the call's low-precision dtype).
        gate: broadcastable to x: ``[B, L, C]`` per token, ``[B, 1, C]`` per sample, ``[C]``; not copied.
        out: optional preallocated contiguous output of x's shape (any float dtype); no autograd through it.

    Returns:
        ``[B, L, C]`` in x's dtype (or out). Differentiable in x, y and gate.
    """
    cm.check_activation("x", x)
    cm.check_same_shape("y", y, x)
    if gate is None:
        raise ValueError("gate is required (a plain x + y needs no kernel)")
    cm.check_broadcast("gate", gate, x)
    named = {"x": x, "y": y, "gate": gate}
    cm.check_mixed_precision(named)
    cm.check_device(named, x)
    if out is None:
        return torch.ops.dz.gated_residual(x, y, gate)
    cm.check_no_grad_for_out(x, y, gate)
    cm.check_out("out", out, x.shape, cm.SUPPORTED_DTYPES, x)
    torch.ops.dz.gated_residual_out(x, y, gate, out)
    return out


def gated_residual_reference(x, y, gate):
    """Plain PyTorch: ``(x + gate * y)`` in float32 (float64 stays float64), cast to x's dtype."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(ct) + gate.to(ct) * y.to(ct)).to(x.dtype)
