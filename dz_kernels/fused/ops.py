"""The fused DiT-block ops: public functions (argument checks with clear errors), the ``dz::`` custom ops with
their fake implementations, and their autograd formulas. The kernels: triton_kernels.py; what each op computes:
reference.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._common import call, custom_op, plain_eager
from . import _common as cm
from .triton_kernels import (
    gated_residual_bwd_specs, launch_gated_residual_bwd, launch_gated_residual_fwd, launch_gelu_bwd, launch_gelu_fwd,
    launch_layernorm_bwd, launch_layernorm_fwd, launch_rms_norm_bwd, launch_rms_norm_fwd, layernorm_bwd_specs,
    row_count,
)

__all__ = ["layernorm_modulate", "gated_residual_layernorm_modulate", "gated_residual", "rms_norm", "gelu_tanh"]


# ================================================ LayerNorm + adaLN modulate (optionally after the gated residual add)
# ------------------------------------------------------------------------------------------------------- custom ops
def _fwd_specs(x, y, fp8):
    rows = x.shape[:-1]
    n = 1
    for s in rows:
        n = n * s
    x_new = (tuple(x.shape), x.dtype) if y is not None else ((0,), x.dtype)
    out = (tuple(x.shape), cm.FP8_DTYPE if fp8 else x.dtype)
    out_scale = ((*rows, 1), torch.float32) if fp8 else ((0,), torch.float32)
    return x_new, out, out_scale, ((n,), torch.float32), ((n,), torch.float32)


@custom_op("dz::fused_layernorm", mutates_args=())
def _fused_layernorm_op(
    x: torch.Tensor, y: Optional[torch.Tensor], gate: Optional[torch.Tensor], shift: Optional[torch.Tensor],
    scale: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
    fp8: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x_new, out, out_scale, mean, rstd = (cm.empty(s, d, x.device) for s, d in _fwd_specs(x, y, fp8))
    launch_layernorm_fwd(x, y, gate, shift, scale, weight, bias, eps, x_new if y is not None else None, out, out_scale,
                mean, rstd)
    return x_new, out, out_scale, mean, rstd


@_fused_layernorm_op.register_fake
def _(x, y, gate, shift, scale, weight, bias, eps, fp8):
    return tuple(x.new_empty(s, dtype=d) for s, d in _fwd_specs(x, y, fp8))


@custom_op("dz::fused_layernorm_out", mutates_args=("x_out", "out", "out_scale"))
def _fused_layernorm_out_op(
    x: torch.Tensor, y: Optional[torch.Tensor], gate: Optional[torch.Tensor], shift: Optional[torch.Tensor],
    scale: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
    x_out: Optional[torch.Tensor], out: torch.Tensor, out_scale: Optional[torch.Tensor],
) -> None:
    launch_layernorm_fwd(x, y, gate, shift, scale, weight, bias, eps, x_out, out, out_scale, None, None)


@_fused_layernorm_out_op.register_fake
def _(x, y, gate, shift, scale, weight, bias, eps, x_out, out, out_scale):
    return None


@custom_op("dz::fused_layernorm_backward", mutates_args=())
def _fused_layernorm_bwd_op(
    dout: torch.Tensor, dxn: Optional[torch.Tensor], xn: torch.Tensor, y: Optional[torch.Tensor],
    gate: Optional[torch.Tensor], scale: Optional[torch.Tensor], weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_layernorm_bwd(dout, dxn, xn, y, gate, scale, weight, bias, mean, rstd, tuple(needs))


@_fused_layernorm_bwd_op.register_fake
def _(dout, dxn, xn, y, gate, scale, weight, bias, mean, rstd, needs):
    specs = layernorm_bwd_specs(xn.shape, xn.dtype, y, gate, scale, weight, bias, tuple(needs))
    return tuple(xn.new_empty(s, dtype=d) for s, d in specs)


def _layernorm_setup_context(ctx, inputs, output):
    x, y, gate, shift, scale, weight, bias, eps, fp8 = inputs
    x_new, out, out_scale, mean, rstd = output
    ctx.fp8 = fp8
    ctx.has_res = y is not None
    ctx.shift_meta = (shift.shape, shift.dtype) if shift is not None else None
    ctx.mark_non_differentiable(out_scale, mean, rstd)
    xn = x_new if y is not None else x
    ctx.save_for_backward(xn, y, gate, scale, weight, bias, mean, rstd)


def _layernorm_backward(ctx, d_xnew, d_out, d_out_scale, d_mean, d_rstd):
    if ctx.fp8:
        raise RuntimeError("dz::fused_layernorm with fp8=True is forward-only (FP8 output has no backward)")
    xn, y, gate, scale, weight, bias, mean, rstd = ctx.saved_tensors
    nig = ctx.needs_input_grad  # x, y, gate, shift, scale, weight, bias, eps, fp8
    needs = [bool(nig[1]), bool(nig[2]), bool(nig[4]), bool(nig[5]), bool(nig[6])]
    d_out = torch.zeros_like(xn) if d_out is None else cm.last_dim_contiguous(d_out)
    dxn = cm.last_dim_contiguous(d_xnew) if (ctx.has_res and d_xnew is not None) else None
    dx, dy, dg, dsc, dw, db = call(_fused_layernorm_bwd_op, d_out, dxn, xn, y, gate, scale, weight, bias, mean, rstd,
                                   needs)
    g_y = g_gate = g_shift = g_scale = g_w = g_b = None
    if nig[1] and y is not None:
        g_y = dy if gate is not None else dx.to(y.dtype)
    if nig[2] and gate is not None:
        g_gate = cm.reduce_to(dg, gate)
    if nig[3] and ctx.shift_meta is not None:
        shape, dtype = ctx.shift_meta
        g_shift = d_out if d_out.shape == shape else d_out.float().sum_to_size(shape)
        g_shift = g_shift.to(dtype)
    if nig[4] and scale is not None:
        g_scale = cm.reduce_to(dsc, scale)
    if nig[5] and weight is not None:
        g_w = dw.to(weight.dtype)
    if nig[6] and bias is not None:
        g_b = db.to(bias.dtype)
    return dx, g_y, g_gate, g_shift, g_scale, g_w, g_b, None, None


_fused_layernorm_op.register_autograd(_layernorm_backward, setup_context=_layernorm_setup_context)


# ------------------------------------------------------------------------------------------------------ public API
def _check_inputs(x, y, gate, shift, scale, weight, bias, eps):
    cm.check_activation("x", x)
    if y is not None:
        cm.check_same_shape("y", y, x)
    for name, t in (("gate", gate), ("shift", shift), ("scale", scale)):
        if t is not None:
            cm.check_broadcast(name, t, x)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            cm.check_vector(name, t, x.shape[-1])
    named = {"x": x, "y": y, "gate": gate, "shift": shift, "scale": scale, "weight": weight, "bias": bias}
    cm.check_mixed_precision(named)
    cm.check_device(named, x)
    if not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")


def _forward(x, y, gate, shift, scale, eps, weight, bias, fp8, x_out, out, out_scale):
    """Shared body of the two public functions. Returns (x_new or None, out or (q, q_scale))."""
    has_res = y is not None
    if not fp8 and out_scale is not None:
        raise ValueError("out_scale= is only used with fp8=True")
    if x_out is None and out is None and out_scale is None:
        if fp8 and torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x, y, gate, shift, scale, weight, bias)):
            raise ValueError("fp8=True is forward-only (no backward through FP8 output); run it under "
                             "torch.no_grad() or with inputs that do not require grad")
        if not plain_eager((x, y, gate, shift, scale, weight, bias)):
            # autograd to record or torch.compile tracing: the functional op, which keeps mean and rstd for the
            # backward; plain eager calls without autograd write only their outputs (below, no statistics)
            x_new, o, o_scale, _, _ = _fused_layernorm_op(x, y, gate, shift, scale, weight, bias, float(eps),
                                                          bool(fp8))
            return (x_new if has_res else None), ((o, o_scale) if fp8 else o)

    cm.check_no_grad_for_out(x, y, gate, shift, scale, weight, bias)
    if x_out is not None and not has_res:
        raise ValueError("x_out= is only used with a residual input y")
    if x_out is not None:
        cm.check_out("x_out", x_out, x.shape, cm.SUPPORTED_DTYPES, x)
    else:
        x_out = cm.empty(x.shape, x.dtype, x.device) if has_res else None
    if fp8:
        if out is not None:
            cm.check_out("out", out, x.shape, (cm.FP8_DTYPE,), x)
        else:
            out = cm.empty(x.shape, cm.FP8_DTYPE, x.device)
        scale_shape = (*x.shape[:-1], 1)
        if out_scale is not None:
            cm.check_out("out_scale", out_scale, scale_shape, (torch.float32,), x)
        else:
            out_scale = cm.empty(scale_shape, torch.float32, x.device)
    else:
        if out is not None:
            cm.check_out("out", out, x.shape, cm.SUPPORTED_DTYPES, x)
        else:
            out = cm.empty(x.shape, x.dtype, x.device)
    call(_fused_layernorm_out_op, x, y, gate, shift, scale, weight, bias, float(eps), x_out, out, out_scale)
    return x_out, ((out, out_scale) if fp8 else out)


def layernorm_modulate(
    x: torch.Tensor,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    fp8: bool = False,
    out: Optional[torch.Tensor] = None,
    out_scale: Optional[torch.Tensor] = None,
):
    """LayerNorm over the last dim, then adaLN modulation: ``LN(x) * (1 + scale) + shift``.

    Args:
        x: ``[B, L, C]`` or ``[N, C]``, float32/bfloat16/float16, last dim contiguous, ``C <= 16384``.
        shift, scale: optional, broadcastable to x: ``[B, L, C]`` (per token), ``[B, 1, C]`` (per sample), ``[C]``;
            expanded views (stride 0) are read in place. dtype float32 or x's.
        eps: LayerNorm epsilon (Wan2.1: 1e-6).
        weight, bias: optional LayerNorm affine ``[C]`` (norm3); applied before the modulation.
        fp8: return ``(q, q_scale)``: q ``[B, L, C]`` float8_e4m3fn and q_scale ``[B, L, 1]`` float32 with
            ``y ~= q * q_scale`` and ``q_scale = max(rowmax|y|, 1e-12) / 448`` (rowwise scales for
            ``torch._scaled_mm``). Forward only.
        out, out_scale: optional preallocated contiguous outputs (any float dtype for ``out``; FP8 and float32
            with fp8=True). No autograd through out=.

    Returns:
        ``[B, L, C]`` in x's dtype (or out's), or ``(q, q_scale)`` with fp8=True.
    Math in float32, one rounding at the end. Differentiable in x, shift, scale, weight, bias.
    """
    _check_inputs(x, None, None, shift, scale, weight, bias, eps)
    return _forward(x, None, None, shift, scale, eps, weight, bias, fp8, None, out, out_scale)[1]


def gated_residual_layernorm_modulate(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: Optional[torch.Tensor],
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    fp8: bool = False,
    x_out: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    out_scale: Optional[torch.Tensor] = None,
):
    """Gated residual add, then LayerNorm and modulation of the result, in one pass over the row.

        x_new = x + gate * y                    (gate=None: x + y)
        out   = LN(x_new) * (1 + scale) + shift (LN with optional affine weight/bias; shift/scale optional)

    Args:
        x: residual stream ``[B, L, C]`` or ``[N, C]``; y: branch output, same shape (dtype may be float32 or the
            call's low-precision dtype).
        gate, shift, scale: optional, broadcastable to x (``[B, L, C]``, ``[B, 1, C]``, ``[C]``), not copied.
        eps, weight, bias: as in :func:`layernorm_modulate`.
        fp8: ``out`` becomes ``(q [B, L, C] float8_e4m3fn, q_scale [B, L, 1] float32)``; forward only.
        x_out, out, out_scale: optional preallocated contiguous outputs; no autograd through them.

    Returns:
        ``(x_new, out)``: x_new ``[B, L, C]`` in x's dtype (rounded; the LayerNorm sees the rounded value), out
        ``[B, L, C]`` in x's dtype, or ``(q, q_scale)`` with fp8=True. Differentiable in every tensor input.
    """
    if y is None:
        raise ValueError("y is required (use layernorm_modulate without a residual)")
    _check_inputs(x, y, gate, shift, scale, weight, bias, eps)
    return _forward(x, y, gate, shift, scale, eps, weight, bias, fp8, x_out, out, out_scale)


# ================================================================================================== gated residual add
@custom_op("dz::gated_residual", mutates_args=())
def _gated_residual_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    out = cm.empty(x.shape, x.dtype, x.device)
    launch_gated_residual_fwd(x, y, gate, out)
    return out


@_gated_residual_op.register_fake
def _(x, y, gate):
    return x.new_empty(x.shape)


@custom_op("dz::gated_residual_out", mutates_args=("out",))
def _gated_residual_out_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, out: torch.Tensor) -> None:
    launch_gated_residual_fwd(x, y, gate, out)


@_gated_residual_out_op.register_fake
def _(x, y, gate, out):
    return None


@custom_op("dz::gated_residual_backward", mutates_args=())
def _gated_residual_bwd_op(d: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, need_dy: bool,
                           need_dgate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_gated_residual_bwd(d, y, gate, need_dy, need_dgate)


@_gated_residual_bwd_op.register_fake
def _(d, y, gate, need_dy, need_dgate):
    return tuple(y.new_empty(s, dtype=dt) for s, dt in gated_residual_bwd_specs(y.shape, y, gate, need_dy, need_dgate))


def _gated_residual_setup_context(ctx, inputs, output):
    x, y, gate = inputs
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(y, gate)


def _gated_residual_backward(ctx, d):
    y, gate = ctx.saved_tensors
    need_x, need_y, need_g = ctx.needs_input_grad
    dy, dg = call(_gated_residual_bwd_op, cm.last_dim_contiguous(d), y, gate, bool(need_y), bool(need_g))
    return (d.to(ctx.x_dtype) if need_x else None, dy if need_y else None,
            cm.reduce_to(dg, gate) if need_g else None)


_gated_residual_op.register_autograd(_gated_residual_backward, setup_context=_gated_residual_setup_context)


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
        return call(_gated_residual_op, x, y, gate)
    cm.check_no_grad_for_out(x, y, gate)
    cm.check_out("out", out, x.shape, cm.SUPPORTED_DTYPES, x)
    call(_gated_residual_out_op, x, y, gate, out)
    return out


# ============================================================================================================= RMSNorm
@custom_op("dz::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    out = cm.empty(x.shape, x.dtype, x.device)
    rstd = cm.empty((row_count(x.shape),), torch.float32, x.device)
    launch_rms_norm_fwd(x, weight, eps, out, rstd)
    return out, rstd


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty((row_count(x.shape),), dtype=torch.float32)


@custom_op("dz::rms_norm_out", mutates_args=("out",))
def _rms_norm_out_op(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    launch_rms_norm_fwd(x, weight, eps, out, None)


@_rms_norm_out_op.register_fake
def _(x, weight, eps, out):
    return None


@custom_op("dz::rms_norm_backward", mutates_args=())
def _rms_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                     need_dweight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_rms_norm_bwd(dy, x, weight, rstd, need_dweight)


@_rms_norm_bwd_op.register_fake
def _(dy, x, weight, rstd, need_dweight):
    C = x.shape[-1]
    return x.new_empty(x.shape), x.new_empty((C,) if need_dweight else (0,), dtype=torch.float32)


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, eps = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)


def _rms_norm_backward(ctx, dy, d_rstd):
    x, weight, rstd = ctx.saved_tensors
    need_x, need_w, _ = ctx.needs_input_grad
    dx, dw = call(_rms_norm_bwd_op, cm.last_dim_contiguous(dy), x, weight, rstd, bool(need_w))
    return (dx if need_x else None), (dw.to(weight.dtype) if need_w else None), None


_rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup_context)


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
        return call(_rms_norm_op, x, weight, float(eps))[0]
    cm.check_no_grad_for_out(x, weight)
    cm.check_out("out", out, x.shape, cm.SUPPORTED_DTYPES, x)
    call(_rms_norm_out_op, x, weight, float(eps), out)
    return out


# =========================================================================================== GELU (tanh approximation)
@custom_op("dz::gelu_tanh", mutates_args=())
def _gelu_tanh_op(x: torch.Tensor) -> torch.Tensor:
    out = cm.empty(x.shape, x.dtype, x.device)
    launch_gelu_fwd(x, out)
    return out


@_gelu_tanh_op.register_fake
def _(x):
    return x.new_empty(x.shape)


@custom_op("dz::gelu_tanh_out", mutates_args=("out",))
def _gelu_tanh_out_op(x: torch.Tensor, out: torch.Tensor) -> None:
    launch_gelu_fwd(x, out)


@_gelu_tanh_out_op.register_fake
def _(x, out):
    return None


@custom_op("dz::gelu_tanh_backward", mutates_args=())
def _gelu_tanh_bwd_op(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return launch_gelu_bwd(dy, x)


@_gelu_tanh_bwd_op.register_fake
def _(dy, x):
    return x.new_empty(x.shape)


def _gelu_setup_context(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x)


def _gelu_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return call(_gelu_tanh_bwd_op, dy, x)


_gelu_tanh_op.register_autograd(_gelu_backward, setup_context=_gelu_setup_context)


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
        return call(_gelu_tanh_op, x)
    cm.check_no_grad_for_out(x)
    cm.check_out("out", out, x.shape, cm.SUPPORTED_DTYPES, x)
    call(_gelu_tanh_out_op, x, out)
    return out
