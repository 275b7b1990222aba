"""Triton kernels of the fused DiT-block ops and their launchers (no argument checks: ops.py checks everything and
owns the custom ops). Every store rounds through dz_kernels._common (the same bits on the GPU and in the
interpreter); the FP8 output of the LayerNorm follows dz_kernels._common's FP8 convention.

LayerNorm. LayerNorm + adaLN modulate, optionally fused with the gated residual add before it, forward and backward.

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

Gated residual. Gated residual add ``x + gate * y`` (the end of a Wan2.1 block's FFN branch), forward and backward.

The gate is read through its (batch, token) strides, so a per-sample ``[B, 1, C]`` gate is never expanded in
memory. Math in float32, one rounding to the output dtype.

RMSNorm. RMSNorm over the full hidden dim (Wan2.1's q/k norm), forward and backward.

Exactly Wan2.1's ``WanRMSNorm``: ``(x.float() * rsqrt(mean(x.float()^2) + eps)).type_as(x) * weight``: the
normalized row is rounded to x's dtype before the weight multiply, and the product is rounded again. The
backward treats those roundings as identity (as autograd does); dweight is summed over rows per program into
float32 partial rows, then the partials are summed in torch (deterministic).

GELU. GELU with the tanh approximation (Wan2.1's FFN activation), forward and backward.

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

import torch

import triton
import triton.language as tl

from .._common import cast_rne, cdiv, fp8_scale_tl, nan_amax
from . import _common as cm

__all__ = [
    "launch_layernorm_fwd", "launch_layernorm_bwd", "layernorm_bwd_specs", "launch_gated_residual_fwd",
    "launch_gated_residual_bwd", "gated_residual_bwd_specs", "launch_rms_norm_fwd", "launch_rms_norm_bwd", "row_count",
    "launch_gelu_fwd", "launch_gelu_bwd",
]


# ================================================ LayerNorm + adaLN modulate (optionally after the gated residual add)
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
def launch_layernorm_fwd(x, y, gate, shift, scale, weight, bias, eps, x_out, out, out_scale, mean, rstd):
    """Writes x_out (if y is given), out (FP8 when out is float8, then out_scale too) and mean/rstd (if given)."""
    shape = x.shape
    x3, sxb, sxl = cm.rows_view(x, shape)
    B, L, C = cm.rows_shape(shape)
    n_rows = B * L
    if n_rows == 0:
        return
    dummy = x3
    y3, syb, syl = cm.rows_view(y, shape) if y is not None else (dummy, 0, 0)
    g3, sgb, sgl = cm.rows_view(gate, shape) if gate is not None else (dummy, 0, 0)
    sh3, sshb, sshl = cm.rows_view(shift, shape) if shift is not None else (dummy, 0, 0)
    sc3, sscb, sscl = cm.rows_view(scale, shape) if scale is not None else (dummy, 0, 0)
    fp8 = out.dtype == cm.FP8_DTYPE
    block, warps = cm.row_config(C, device=x3.device)
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


def _ln_grad_dtype(t: torch.Tensor, x_shape) -> torch.dtype:
    """A per-row gradient for t is written in t's dtype when t is per token, else in float32 for the reduction."""
    return t.dtype if t.shape == x_shape else torch.float32


def layernorm_bwd_specs(x_shape, x_dtype, y, gate, scale, weight, bias, needs):
    """(shape, dtype) of the six backward outputs; shape (0,) marks one that is not computed."""
    need_y, need_gate, need_scale, need_w, need_b = needs
    none = ((0,), torch.float32)
    C = x_shape[-1]
    return (
        (tuple(x_shape), x_dtype),
        (tuple(x_shape), y.dtype) if (need_y and y is not None and gate is not None) else none,
        (tuple(x_shape), _ln_grad_dtype(gate, x_shape)) if (need_gate and gate is not None) else none,
        (tuple(x_shape), _ln_grad_dtype(scale, x_shape)) if (need_scale and scale is not None) else none,
        ((C,), torch.float32) if (need_w and weight is not None) else none,
        ((C,), torch.float32) if (need_b and bias is not None) else none,
    )


def launch_layernorm_bwd(dout, dxn, xn, y, gate, scale, weight, bias, mean, rstd, needs):
    x_shape = xn.shape
    specs = layernorm_bwd_specs(x_shape, xn.dtype, y, gate, scale, weight, bias, needs)
    dx, dy, dg, dsc, dw, db = (cm.empty(s, d, xn.device) for s, d in specs)
    x3, sxb, sxl = cm.rows_view(xn, x_shape)
    B, L, C = cm.rows_shape(x_shape)
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
        programs = cm.partial_programs(n_rows, xn.device, C)
        rows_per_prog = cdiv(n_rows, programs)
        programs = cdiv(n_rows, rows_per_prog)
    else:
        programs, rows_per_prog = n_rows, 1
    dw_part = cm.empty((programs, C), torch.float32, xn.device) if need_dw else dummy
    db_part = cm.empty((programs, C), torch.float32, xn.device) if need_db else dummy
    block, warps = cm.row_config(C, backward=True, device=xn.device)
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


# ================================================================================================== gated residual add
# columns per program (BLOCK, config table kind "elementwise"): a row of C features takes cdiv(C, BLOCK) programs


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


def _residual_grid(x_shape, block: int):
    C = x_shape[-1]
    rows = 1
    for s in x_shape[:-1]:
        rows *= s
    return rows, cdiv(C, block)


def launch_gated_residual_fwd(x, y, gate, out):
    cfg = cm.launch_config("elementwise", x.device, op="gated_residual_fwd")
    rows, col_blocks = _residual_grid(x.shape, cfg["BLOCK"])
    if rows == 0:
        return
    x3, sxb, sxl = cm.rows_view(x, x.shape)
    _, L, C = cm.rows_shape(x.shape)
    y3, syb, syl = cm.rows_view(y, x.shape)
    g3, sgb, sgl = cm.rows_view(gate, x.shape)
    _gated_residual_fwd_kernel[(rows, col_blocks)](
        x3, sxb, sxl, y3, syb, syl, g3, sgb, sgl, out, L, C, BLOCK=cfg["BLOCK"],
        num_warps=cfg["num_warps"])


def gated_residual_bwd_specs(x_shape, y, gate, need_dy, need_dg):
    none = ((0,), torch.float32)
    return (
        (tuple(x_shape), y.dtype) if need_dy else none,
        (tuple(x_shape), gate.dtype if gate.shape == x_shape else torch.float32) if need_dg else none,
    )


def launch_gated_residual_bwd(d, y, gate, need_dy, need_dg):
    dy, dg = (cm.empty(s, dt, d.device) for s, dt in gated_residual_bwd_specs(y.shape, y, gate, need_dy, need_dg))
    cfg = cm.launch_config("elementwise", d.device, op="gated_residual_bwd")
    rows, col_blocks = _residual_grid(y.shape, cfg["BLOCK"])
    if rows == 0 or not (need_dy or need_dg):
        return dy, dg
    _, L, C = cm.rows_shape(y.shape)
    d3, sdb, sdl = cm.rows_view(d, y.shape)
    y3, syb, syl = cm.rows_view(y, y.shape)
    g3, sgb, sgl = cm.rows_view(gate, y.shape)
    _gated_residual_bwd_kernel[(rows, col_blocks)](
        d3, sdb, sdl, y3, syb, syl, g3, sgb, sgl, dy if need_dy else d3, dg if need_dg else d3, L, C,
        NEED_DY=need_dy, NEED_DG=need_dg, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
    return dy, dg


# ============================================================================================================= RMSNorm
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


def row_count(shape) -> int:
    n = 1
    for s in shape[:-1]:
        n *= s
    return n


def launch_rms_norm_fwd(x, weight, eps, out, rstd):
    n_rows = row_count(x.shape)
    if n_rows == 0:
        return
    x3, sxb, sxl = cm.rows_view(x, x.shape)
    _, L, C = cm.rows_shape(x.shape)
    block, warps = cm.row_config(C, device=x3.device)
    _rms_norm_fwd_kernel[(n_rows,)](
        x3, sxb, sxl, weight, out, rstd if rstd is not None else out,
        L, C, float(eps), STORE_RSTD=rstd is not None, BLOCK_C=block,
        num_warps=warps)


def launch_rms_norm_bwd(dy, x, weight, rstd, need_dw):
    C = x.shape[-1]
    dx = cm.empty(x.shape, x.dtype, x.device)
    dw = cm.empty((C,) if need_dw else (0,), torch.float32, x.device)
    n_rows = row_count(x.shape)
    if n_rows == 0:
        if need_dw:
            dw.zero_()
        return dx, dw
    x3, sxb, sxl = cm.rows_view(x, x.shape)
    _, L, _ = cm.rows_shape(x.shape)
    dy3, sdb, sdl = cm.rows_view(dy, x.shape)
    if need_dw:
        programs = cm.partial_programs(n_rows, x.device, C)
        rows_per_prog = cdiv(n_rows, programs)
        programs = cdiv(n_rows, rows_per_prog)
        dw_part = cm.empty((programs, C), torch.float32, x.device)
    else:
        programs, rows_per_prog, dw_part = n_rows, 1, dx
    block, warps = cm.row_config(C, backward=True, device=x.device)
    _rms_norm_bwd_kernel[(programs,)](
        dy3, sdb, sdl, x3, sxb, sxl, weight, rstd, dx, dw_part,
        n_rows, L, C, rows_per_prog, NEED_DW=need_dw, BLOCK_C=block,
        num_warps=warps)
    if need_dw:
        dw.copy_(dw_part.sum(0))
    return dx, dw


# =========================================================================================== GELU (tanh approximation)
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


def launch_gelu_fwd(x, out):
    n = x.numel()
    if n:
        cfg = cm.launch_config("elementwise", x.device, op="gelu_tanh_fwd")
        _gelu_tanh_fwd_kernel[(cdiv(n, cfg["BLOCK"]),)](x, out, n, _K, _A, BLOCK=cfg["BLOCK"],
                                                               num_warps=cfg["num_warps"])


def launch_gelu_bwd(dy, x):
    dx = cm.empty(x.shape, x.dtype, x.device)
    n = x.numel()
    if n:
        cfg = cm.launch_config("elementwise", x.device, op="gelu_tanh_bwd")
        _gelu_tanh_bwd_kernel[(cdiv(n, cfg["BLOCK"]),)](dy.contiguous(), x, dx, n, _K, _A,
                                                               BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
    return dx
