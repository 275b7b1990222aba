"""LayerNorm + adaLN modulate, optionally fused with the gated residual add before it, forward and backward.

The Wan2.1 block uses three LayerNorms (eps 1e-6); the last two follow a residual add:
    norm1 (no affine):  h = LN(x) * (1 + scale_msa) + shift_msa              -> layernorm_modulate
    norm3 (affine):     x = x + gate_msa * attn(h);  h = LN_affine(x)        -> gated_residual_layernorm_modulate
    norm2 (no affine):  x = x + cross(h);  h = LN(x) * (1 + scale_ffn) + shift_ffn   -> the same, gate=None
One Triton kernel family covers all of them: a program owns one row (token) of C features, computes mean and
rstd in float32 (two-pass, in registers), and writes the modulated result in the output dtype, or FP8 E4M3 with
one float32 scale per row for the next GEMM. The backward recomputes x_hat from the saved input and (mean, rstd).

Rounding: the residual x_new = x + gate * y is rounded to x's dtype (the stored residual stream) and the LayerNorm
is taken of that rounded value, as the unfused chain does; everything else stays float32 until the single final
rounding of the output.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

import triton
import triton.language as tl

from .._common import cast_rne, fp8_scale, fp8_scale_tl, nan_amax, quantize_e4m3
from . import _common as cm

__all__ = [
    "layernorm_modulate",
    "layernorm_modulate_reference",
    "gated_residual_layernorm_modulate",
    "gated_residual_layernorm_modulate_reference",
]


# ----------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _ln_fwd_kernel(
    X, sxb, sxl,
    Y, syb, syl,
    G, sgb, sgl,
    SHIFT, sshb, sshl,
    SCALE, sscb, sscl,
    W, BIAS,
    XOUT, OUT, OUT_SCALE, MEAN, RSTD,
    L, C, eps, amax_floor,
    HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, FP8_OUT: tl.constexpr, STORE_STATS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    l = row - b * L
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C

    x = tl.load(X + b * sxb + l * sxl + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        y = tl.load(Y + b * syb + l * syl + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            g = tl.load(G + b * sgb + l * sgl + cols, mask=mask, other=0.0).to(tl.float32)
            x = x + g * y
        else:
            x = x + y
        x_st = cast_rne(x, XOUT.dtype.element_ty)
        tl.store(XOUT + row * C + cols, x_st, mask=mask)
        x = x_st.to(tl.float32)  # normalize the residual as stored

    mean = tl.sum(x, axis=0) / C
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    h = xc * rstd
    if HAS_W:
        h = h * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        h = h + tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        h = h * (1.0 + tl.load(SCALE + b * sscb + l * sscl + cols, mask=mask, other=0.0).to(tl.float32))
    if HAS_SHIFT:
        h = h + tl.load(SHIFT + b * sshb + l * sshl + cols, mask=mask, other=0.0).to(tl.float32)

    if FP8_OUT:   # the FP8 convention of dz_kernels._common (NaN in the row: NaN scale and values)
        s = fp8_scale_tl(nan_amax(tl.where(mask, h, 0.0), 0), amax_floor)
        tl.store(OUT + row * C + cols, cast_rne(tl.math.div_rn(h, s), OUT.dtype.element_ty), mask=mask)
        tl.store(OUT_SCALE + row, s)
    else:
        tl.store(OUT + row * C + cols, cast_rne(h, OUT.dtype.element_ty), mask=mask)
    if STORE_STATS:
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)


@triton.jit
def _ln_bwd_kernel(
    DOUT, sdob, sdol,
    DXN, sdnb, sdnl,
    XN, sxb, sxl,
    Y, syb, syl,
    G, sgb, sgl,
    SCALE, sscb, sscl,
    W, BIAS,
    MEAN, RSTD,
    DX, DY, DG, DSCALE, DW_PART, DB_PART,
    N, L, C, rows_per_prog,
    HAS_DXN: tl.constexpr, HAS_GATE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_W: tl.constexpr,
    HAS_B: tl.constexpr, NEED_DY: tl.constexpr, NEED_DG: tl.constexpr, NEED_DSCALE: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    dw_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_C], dtype=tl.float32)

    row_start = pid.to(tl.int64) * rows_per_prog  # int64 row index: offsets may pass 2**31
    row_end = tl.minimum(row_start + rows_per_prog, N)
    for row in range(row_start, row_end):
        b = row // L
        l = row - b * L
        dout = tl.load(DOUT + b * sdob + l * sdol + cols, mask=mask, other=0.0).to(tl.float32)
        xn = tl.load(XN + b * sxb + l * sxl + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (xn - mean) * rstd, 0.0)

        # weight and bias are re-read per row (from cache) rather than held across the loop: fewer live registers
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dh = dout  # gradient of the affine LayerNorm output (before modulation)
        if HAS_SCALE:
            sc = tl.load(SCALE + b * sscb + l * sscl + cols, mask=mask, other=0.0).to(tl.float32)
            if NEED_DSCALE:
                h = xhat
                if HAS_W:
                    h = h * w
                if HAS_B:
                    h = h + tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DSCALE + row * C + cols, cast_rne(dout * h, DSCALE.dtype.element_ty), mask=mask)
            dh = dout * (1.0 + sc)
        if NEED_DW:
            dw_acc += dh * xhat
        if NEED_DB:
            db_acc += dh
        dxhat = dh
        if HAS_W:
            dxhat = dh * w
        c1 = tl.sum(dxhat * xhat, axis=0) / C
        c2 = tl.sum(dxhat, axis=0) / C
        dx = (dxhat - c2 - xhat * c1) * rstd
        if HAS_DXN:
            dx += tl.load(DXN + b * sdnb + l * sdnl + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * C + cols, cast_rne(dx, DX.dtype.element_ty), mask=mask)
        if NEED_DY:  # only with a gate: without one dy == dx
            g = tl.load(G + b * sgb + l * sgl + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DY + row * C + cols, cast_rne(dx * g, DY.dtype.element_ty), mask=mask)
        if NEED_DG:
            yv = tl.load(Y + b * syb + l * syl + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DG + row * C + cols, cast_rne(dx * yv, DG.dtype.element_ty), mask=mask)

    if NEED_DW:
        tl.store(DW_PART + pid * C + cols, dw_acc, mask=mask)
    if NEED_DB:
        tl.store(DB_PART + pid * C + cols, db_acc, mask=mask)


# --------------------------------------------------------------------------------------------------------- launchers
def _launch_fwd(x, y, gate, shift, scale, weight, bias, eps, x_out, out, out_scale, mean, rstd):
    """Writes x_out (if y is given), out (FP8 when out is float8, then out_scale too) and mean/rstd (if given)."""
    shape = x.shape
    x3, sxb, sxl = cm.rows_view(x, shape)
    B, L, C = x3.shape
    n_rows = B * L
    if n_rows == 0:
        return
    dummy = x3
    y3, syb, syl = cm.rows_view(y, shape) if y is not None else (dummy, 0, 0)
    g3, sgb, sgl = cm.rows_view(gate, shape) if gate is not None else (dummy, 0, 0)
    sh3, sshb, sshl = cm.rows_view(shift, shape) if shift is not None else (dummy, 0, 0)
    sc3, sscb, sscl = cm.rows_view(scale, shape) if scale is not None else (dummy, 0, 0)
    fp8 = out.dtype == cm.FP8_DTYPE
    block, warps = cm.row_config(C)
    _ln_fwd_kernel[(n_rows,)](
        x3, sxb, sxl,
        y3, syb, syl,
        g3, sgb, sgl,
        sh3, sshb, sshl,
        sc3, sscb, sscl,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        x_out if x_out is not None else dummy, out, out_scale if fp8 else dummy,
        mean if mean is not None else dummy, rstd if rstd is not None else dummy,
        L, C, float(eps), cm.FP8_AMAX_FLOOR,
        HAS_RES=y is not None, HAS_GATE=gate is not None, HAS_SHIFT=shift is not None,
        HAS_SCALE=scale is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        FP8_OUT=fp8, STORE_STATS=mean is not None, BLOCK_C=block, num_warps=warps,
    )


def _grad_dtype(t: torch.Tensor, x_shape) -> torch.dtype:
    """A per-row gradient for t is written in t's dtype when t is per token, else in float32 for the reduction."""
    return t.dtype if t.shape == x_shape else torch.float32


def _bwd_specs(x_shape, x_dtype, y, gate, scale, weight, bias, needs):
    """(shape, dtype) of the six backward outputs; shape (0,) marks one that is not computed."""
    need_y, need_gate, need_scale, need_w, need_b = needs
    none = ((0,), torch.float32)
    C = x_shape[-1]
    return (
        (tuple(x_shape), x_dtype),
        (tuple(x_shape), y.dtype) if (need_y and y is not None and gate is not None) else none,
        (tuple(x_shape), _grad_dtype(gate, x_shape)) if (need_gate and gate is not None) else none,
        (tuple(x_shape), _grad_dtype(scale, x_shape)) if (need_scale and scale is not None) else none,
        ((C,), torch.float32) if (need_w and weight is not None) else none,
        ((C,), torch.float32) if (need_b and bias is not None) else none,
    )


def _launch_bwd(dout, dxn, xn, y, gate, scale, weight, bias, mean, rstd, needs):
    x_shape = xn.shape
    specs = _bwd_specs(x_shape, xn.dtype, y, gate, scale, weight, bias, needs)
    dx, dy, dg, dsc, dw, db = (cm.empty(s, d, xn.device) for s, d in specs)
    x3, sxb, sxl = cm.rows_view(xn, x_shape)
    B, L, C = x3.shape
    n_rows = B * L
    need_dy, need_dg, need_dsc = dy.numel() > 0, dg.numel() > 0, dsc.numel() > 0
    need_dw, need_db = dw.numel() > 0, db.numel() > 0
    if n_rows == 0:
        if need_dw:
            dw.zero_()
        if need_db:
            db.zero_()
        return dx, dy, dg, dsc, dw, db
    dummy = x3
    do3, sdob, sdol = cm.rows_view(dout, x_shape)
    dn3, sdnb, sdnl = cm.rows_view(dxn, x_shape) if dxn is not None else (dummy, 0, 0)
    y3, syb, syl = cm.rows_view(y, x_shape) if y is not None else (dummy, 0, 0)
    g3, sgb, sgl = cm.rows_view(gate, x_shape) if gate is not None else (dummy, 0, 0)
    sc3, sscb, sscl = cm.rows_view(scale, x_shape) if scale is not None else (dummy, 0, 0)
    if need_dw or need_db:
        programs = cm.partial_programs(n_rows, xn.device)
        rows_per_prog = triton.cdiv(n_rows, programs)
        programs = triton.cdiv(n_rows, rows_per_prog)
    else:
        programs, rows_per_prog = n_rows, 1
    dw_part = cm.empty((programs, C), torch.float32, xn.device) if need_dw else dummy
    db_part = cm.empty((programs, C), torch.float32, xn.device) if need_db else dummy
    block, warps = cm.row_config(C, backward=True)
    _ln_bwd_kernel[(programs,)](
        do3, sdob, sdol,
        dn3, sdnb, sdnl,
        x3, sxb, sxl,
        y3, syb, syl,
        g3, sgb, sgl,
        sc3, sscb, sscl,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        mean, rstd,
        dx, dy if need_dy else dummy, dg if need_dg else dummy, dsc if need_dsc else dummy, dw_part, db_part,
        n_rows, L, C, rows_per_prog,
        HAS_DXN=dxn is not None, HAS_GATE=gate is not None, HAS_SCALE=scale is not None,
        HAS_W=weight is not None, HAS_B=bias is not None, NEED_DY=need_dy, NEED_DG=need_dg,
        NEED_DSCALE=need_dsc, NEED_DW=need_dw, NEED_DB=need_db, BLOCK_C=block,
        num_warps=warps,
    )
    if need_dw:
        dw.copy_(dw_part.sum(0))
    if need_db:
        db.copy_(db_part.sum(0))
    return dx, dy, dg, dsc, dw, db


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


@torch.library.custom_op("dz::fused_layernorm", mutates_args=())
def _fused_layernorm_op(
    x: torch.Tensor, y: Optional[torch.Tensor], gate: Optional[torch.Tensor], shift: Optional[torch.Tensor],
    scale: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
    fp8: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x_new, out, out_scale, mean, rstd = (cm.empty(s, d, x.device) for s, d in _fwd_specs(x, y, fp8))
    _launch_fwd(x, y, gate, shift, scale, weight, bias, eps, x_new if y is not None else None, out, out_scale,
                mean, rstd)
    return x_new, out, out_scale, mean, rstd


@_fused_layernorm_op.register_fake
def _(x, y, gate, shift, scale, weight, bias, eps, fp8):
    return tuple(x.new_empty(s, dtype=d) for s, d in _fwd_specs(x, y, fp8))


@torch.library.custom_op("dz::fused_layernorm_out", mutates_args=("x_out", "out", "out_scale"))
def _fused_layernorm_out_op(
    x: torch.Tensor, y: Optional[torch.Tensor], gate: Optional[torch.Tensor], shift: Optional[torch.Tensor],
    scale: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
    x_out: Optional[torch.Tensor], out: torch.Tensor, out_scale: Optional[torch.Tensor],
) -> None:
    _launch_fwd(x, y, gate, shift, scale, weight, bias, eps, x_out, out, out_scale, None, None)


@_fused_layernorm_out_op.register_fake
def _(x, y, gate, shift, scale, weight, bias, eps, x_out, out, out_scale):
    return None


@torch.library.custom_op("dz::fused_layernorm_backward", mutates_args=())
def _fused_layernorm_bwd_op(
    dout: torch.Tensor, dxn: Optional[torch.Tensor], xn: torch.Tensor, y: Optional[torch.Tensor],
    gate: Optional[torch.Tensor], scale: Optional[torch.Tensor], weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_bwd(dout, dxn, xn, y, gate, scale, weight, bias, mean, rstd, tuple(needs))


@_fused_layernorm_bwd_op.register_fake
def _(dout, dxn, xn, y, gate, scale, weight, bias, mean, rstd, needs):
    specs = _bwd_specs(xn.shape, xn.dtype, y, gate, scale, weight, bias, tuple(needs))
    return tuple(xn.new_empty(s, dtype=d) for s, d in specs)


def _setup_context(ctx, inputs, output):
    x, y, gate, shift, scale, weight, bias, eps, fp8 = inputs
    x_new, out, out_scale, mean, rstd = output
    ctx.fp8 = fp8
    ctx.has_res = y is not None
    ctx.shift_meta = (shift.shape, shift.dtype) if shift is not None else None
    ctx.mark_non_differentiable(out_scale, mean, rstd)
    xn = x_new if y is not None else x
    ctx.save_for_backward(xn, y, gate, scale, weight, bias, mean, rstd)


def _backward(ctx, d_xnew, d_out, d_out_scale, d_mean, d_rstd):
    if ctx.fp8:
        raise RuntimeError("dz::fused_layernorm with fp8=True is forward-only (FP8 output has no backward)")
    xn, y, gate, scale, weight, bias, mean, rstd = ctx.saved_tensors
    nig = ctx.needs_input_grad  # x, y, gate, shift, scale, weight, bias, eps, fp8
    needs = [bool(nig[1]), bool(nig[2]), bool(nig[4]), bool(nig[5]), bool(nig[6])]
    d_out = torch.zeros_like(xn) if d_out is None else cm.last_dim_contiguous(d_out)
    dxn = cm.last_dim_contiguous(d_xnew) if (ctx.has_res and d_xnew is not None) else None
    dx, dy, dg, dsc, dw, db = torch.ops.dz.fused_layernorm_backward(
        d_out, dxn, xn, y, gate, scale, weight, bias, mean, rstd, needs)
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


_fused_layernorm_op.register_autograd(_backward, setup_context=_setup_context)


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
        x_new, o, o_scale, _, _ = torch.ops.dz.fused_layernorm(x, y, gate, shift, scale, weight, bias, float(eps),
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
    torch.ops.dz.fused_layernorm_out(x, y, gate, shift, scale, weight, bias, float(eps), x_out, out, out_scale)
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
