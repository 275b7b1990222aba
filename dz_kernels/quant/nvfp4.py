"""NVFP4 (E2M1 values, E4M3 scale per 16 along K, FP32 global scale): Triton quantize / dequantize kernels, a
weight-only W4A16 GEMM (Hopper path) and a W4A4 GEMM (Blackwell path). Format, bit layout and rounding: formats.py.

Public functions (each registered as a ``dz::`` custom op with a fake implementation):
    quantize_nvfp4(x, global_scale=None)   x [..., K] -> packed uint8 [..., K/2], scale e4m3 [..., K/16], global f32 []
    dequantize_nvfp4(packed, scale, global_scale)                      -> [..., K]
    nvfp4_gemm_w4a16(x, w, w_scale, w_global, ...)   x [M, K] bf16/fp16 @ dequant(w [N, K/2])^T -> [M, N]
    nvfp4_gemm_w4a4(a, a_scale, a_global, w, w_scale, w_global, ...)   both operands NVFP4 -> [M, N]
    nvfp4_linear(x, w, w_scale, w_global, ..., act_quant=...)           quantizes x for W4A4, then the GEMM
All GEMMs take the same fused epilogue as the FP8 GEMM (bias, GELU-tanh, residual + gate * (.)).

How the GEMMs compute:
  W4A16: each weight tile is unpacked in registers: E2M1 code -> value -> times its E4M3 block scale, which is exact
    in bf16 (a 2-bit-significand value times a 4-bit-significand scale needs 5 bits; bf16 has 8, and the range
    2^-10 .. 2688 is inside bf16's and fp16's), then a bf16 (or fp16) tensor-core dot with float32 accumulation;
    the FP32 global scale multiplies the accumulator once at the end.
  W4A4, sm_100 (Blackwell): `tl.dot_scaled(a, a_scale, "e2m1", w^T, w_scale, "e2m1")` with the E4M3 scales per 16:
    Triton's NVFP4 form of the block-scaled MMA (tcgen05.mma kind::mxf4nvf4 block16; checked by compiling this
    kernel for sm_100 in tests/test_quant_nvfp4.py). Both global scales multiply the accumulator at the end.
  W4A4 elsewhere (Hopper, the interpreter): both operands are dequantized in registers exactly as above and
    multiplied with a bf16 dot: the same products (exact), float32 accumulation, so the same result up to the
    order of the float32 sums. This is an emulation: Hopper has no FP4 tensor cores.
  The Triton CPU interpreter (triton 3.9) decodes every `dot_scaled` scale as E8M0, so the sm_100 path cannot be
  run in emulation; `use_dot_scaled=True` off sm_100 raises instead of silently computing something else.
"""
from __future__ import annotations

from typing import Optional

import torch

import triton
import triton.language as tl

from . import _common as cm
from .._common import cast_rne, e4m3_bits, e4m3_round, e4m3_value, nan_amax
from ._tl import (_e2m1_decode, _e2m1_encode, _epilogue_store, _grouped_pid, activation_code,
                  launch_gemm)
from .formats import (
    NVFP4_BLOCK, dequantize_nvfp4_reference, nvfp4_global_scale, nvfp4_gemm_w4a4_reference,
    nvfp4_gemm_w4a16_reference, quantize_nvfp4_reference,
)

__all__ = ["quantize_nvfp4", "dequantize_nvfp4", "nvfp4_gemm_w4a16", "nvfp4_gemm_w4a4", "nvfp4_linear",
           "dot_scaled_available"]


# ----------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _nvfp4_quant_kernel(X, G, Q, S, R, C, stride_xr, stride_qr, stride_sr,
                        BLOCK_R: tl.constexpr, NB: tl.constexpr):
    """A [BLOCK_R, NB*16] tile: NB blocks of 16 per row. Elements are read as even/odd halves [BLOCK_R, NB, 8] so
    that the low nibble (even element) and high nibble (odd element) of each output byte are at hand."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    blk = tl.program_id(1) * NB + tl.arange(0, NB)
    j = tl.arange(0, 8)
    m2 = (rows < R)[:, None] & (blk < C // 16)[None, :]
    m3 = m2[:, :, None] & (j < 8)[None, None, :]
    r64 = rows.to(tl.int64)
    col = blk[None, :, None] * 16 + 2 * j[None, None, :]
    xptr = X + r64[:, None, None] * stride_xr + col
    xe = tl.load(xptr, mask=m3, other=0.0).to(tl.float32)
    xo = tl.load(xptr + 1, mask=m3, other=0.0).to(tl.float32)
    g = tl.load(G)
    ae = nan_amax(xe, 2)
    ao = nan_amax(xo, 2)
    amax = tl.where((ae != ae) | (ao != ao), float("nan"), tl.maximum(ae, ao))   # a NaN block: NaN scale
    s = tl.math.div_rn(amax, 6.0 * g)
    s = tl.where(s == 0.0, 1.0, s)
    s = tl.where(s < 0.001953125, 0.001953125, tl.where(s > 448.0, 448.0, s))    # clamp, NaN kept
    s8 = e4m3_bits(s).to(S.dtype.element_ty, bitcast=True)
    tl.store(S + r64[:, None] * stride_sr + blk[None, :], s8, mask=m2)
    sf = (e4m3_round(s) * g)[:, :, None]                 # float(s8) * g
    ce = _e2m1_encode(tl.math.div_rn(xe, sf))
    co = _e2m1_encode(tl.math.div_rn(xo, sf))
    packed = (ce | (co << 4)).to(tl.uint8)
    tl.store(Q + r64[:, None, None] * stride_qr + blk[None, :, None] * 8 + j[None, None, :], packed, mask=m3)


@triton.jit
def _nvfp4_dequant_kernel(Q, S, G, O, R, C, stride_qr, stride_sr, stride_or,
                          BLOCK_R: tl.constexpr, NB: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    blk = tl.program_id(1) * NB + tl.arange(0, NB)
    j = tl.arange(0, 8)
    m2 = (rows < R)[:, None] & (blk < C // 16)[None, :]
    m3 = m2[:, :, None] & (j < 8)[None, None, :]
    r64 = rows.to(tl.int64)
    p = tl.load(Q + r64[:, None, None] * stride_qr + blk[None, :, None] * 8 + j[None, None, :], mask=m3, other=0)
    s = e4m3_value(tl.load(S + r64[:, None] * stride_sr + blk[None, :], mask=m2, other=0.0))
    bs = (s * tl.load(G))[:, :, None]
    optr = O + r64[:, None, None] * stride_or + blk[None, :, None] * 16 + 2 * j[None, None, :]
    tl.store(optr, cast_rne(_e2m1_decode(p) * bs, O.dtype.element_ty), mask=m3)
    tl.store(optr + 1, cast_rne(_e2m1_decode(p >> 4) * bs, O.dtype.element_ty), mask=m3)


@triton.jit
def _unpack_tile(packed, scale_per_byte, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """packed uint8 [ROWS, BLOCK_K/2] and the float32 block scale of each byte [ROWS, BLOCK_K/2] ->
    float32 [ROWS, BLOCK_K] values (element 2j from the low nibble, 2j+1 from the high nibble)."""
    lo = _e2m1_decode(packed) * scale_per_byte
    hi = _e2m1_decode(packed >> 4) * scale_per_byte
    return tl.reshape(tl.join(lo, hi), (ROWS, BLOCK_K))


@triton.jit
def _nvfp4_w4a16_kernel(X, W, WS, WG, BIAS, GATE, RES, OUT, M, N, K,
                        stride_xm, stride_wn, stride_wsn, stride_gm, stride_gn, stride_rm, stride_rn, stride_om,
                        HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr,
                        INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out = epilogue(wg * (x @ (e2m1(w) * ws)^T)); x [M, K] bf16/fp16, w [N, K/2] uint8, ws [N, K/16] e4m3."""
    pid_m, pid_n = _grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_p = tl.arange(0, BLOCK_K // 2)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_rows = offs_n.to(tl.int64)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & kmask[None, :], other=0.0)
        p = k0 // 2 + offs_p
        pmask = mask_n[:, None] & (p < K // 2)[None, :]
        wp = tl.load(W + w_rows * stride_wn + p[None, :], mask=pmask, other=0)
        ws = e4m3_value(tl.load(WS + w_rows * stride_wsn + (p // 8)[None, :], mask=pmask, other=0.0))
        w = _unpack_tile(wp, ws, BLOCK_N, BLOCK_K)
        if INTERPRET:  # the interpreter's bf16 dot is wrong; float32 operands give the exact products
            acc = tl.dot(x.to(tl.float32), tl.trans(w), acc)
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
        x_ptrs += BLOCK_K
    acc = acc * tl.load(WG)
    _epilogue_store(acc, offs_m, offs_n, M, N, BIAS, GATE, stride_gm, stride_gn, RES, stride_rm, stride_rn,
                    OUT, stride_om, HAS_BIAS, ACT, HAS_GATE, HAS_RES)


@triton.jit
def _nvfp4_w4a4_kernel(A, AS, AG, W, WS, WG, BIAS, GATE, RES, OUT, M, N, K,
                       stride_am, stride_asm, stride_wn, stride_wsn, stride_gm, stride_gn, stride_rm, stride_rn,
                       stride_om,
                       HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr,
                       USE_DOT_SCALED: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out = epilogue(ag * wg * ((e2m1(a) * as) @ (e2m1(w) * ws)^T)); a [M, K/2], w [N, K/2] uint8,
    as [M, K/16], ws [N, K/16] e4m3. USE_DOT_SCALED: the sm_100 block-scaled MMA; else register dequantization."""
    pid_m, pid_n = _grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_K // 2)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_rows = offs_m.to(tl.int64)[:, None]
    w_rows = offs_n.to(tl.int64)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        p = k0 // 2 + offs_p
        pk = (p < K // 2)[None, :]
        ap = tl.load(A + a_rows * stride_am + p[None, :], mask=mask_m[:, None] & pk, other=0)
        wp = tl.load(W + w_rows * stride_wn + p[None, :], mask=mask_n[:, None] & pk, other=0)
        if USE_DOT_SCALED:
            sb = k0 // 16 + tl.arange(0, BLOCK_K // 16)
            sk = (sb < K // 16)[None, :]
            a_s = tl.load(AS + a_rows * stride_asm + sb[None, :], mask=mask_m[:, None] & sk, other=0.0)
            w_s = tl.load(WS + w_rows * stride_wsn + sb[None, :], mask=mask_n[:, None] & sk, other=0.0)
            acc = tl.dot_scaled(ap, a_s, "e2m1", tl.trans(wp), w_s, "e2m1", acc)
        else:
            a_s = e4m3_value(tl.load(AS + a_rows * stride_asm + (p // 8)[None, :], mask=mask_m[:, None] & pk,
                                     other=0.0))
            w_s = e4m3_value(tl.load(WS + w_rows * stride_wsn + (p // 8)[None, :], mask=mask_n[:, None] & pk,
                                     other=0.0))
            a = _unpack_tile(ap, a_s, BLOCK_M, BLOCK_K)
            w = _unpack_tile(wp, w_s, BLOCK_N, BLOCK_K)
            if INTERPRET:
                acc = tl.dot(a, tl.trans(w), acc)
            else:
                acc = tl.dot(a.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)), acc)
    acc = acc * (tl.load(AG) * tl.load(WG))
    _epilogue_store(acc, offs_m, offs_n, M, N, BIAS, GATE, stride_gm, stride_gn, RES, stride_rm, stride_rn,
                    OUT, stride_om, HAS_BIAS, ACT, HAS_GATE, HAS_RES)


_EPI_KEYS = ["M", "N", "K", "HAS_BIAS", "ACT", "HAS_GATE", "HAS_RES"]
_W4A16_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 1}, num_warps=4, num_stages=4),
]
_W4A4_CONFIGS = [  # BLOCK_K a multiple of 64 so the packed K tile is >= 32 bytes for dot_scaled
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 256, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 256, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
_w4a16_tuned = triton.autotune(configs=_W4A16_CONFIGS, key=_EPI_KEYS)(_nvfp4_w4a16_kernel)
_w4a4_tuned = triton.autotune(configs=_W4A4_CONFIGS, key=_EPI_KEYS + ["USE_DOT_SCALED"])(_nvfp4_w4a4_kernel)


def dot_scaled_available(device) -> bool:
    """True on a Blackwell data-center GPU (compute capability 10.x), where tl.dot_scaled maps NVFP4 to the
    block-scaled tensor-core MMA."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] == 10


# ---------------------------------------------------------------------------------------------------------- launchers
def _launch_quant(x2: torch.Tensor, g: torch.Tensor):
    R, C = x2.shape
    q = cm.empty((R, C // 2), torch.uint8, x2.device)
    s = cm.empty((R, C // NVFP4_BLOCK), cm.FP8_DTYPE, x2.device)
    if R and C:
        BR, NB = (4, 2) if cm.kernels_interpreted() else (16, 8)
        _nvfp4_quant_kernel[(triton.cdiv(R, BR), triton.cdiv(C // NVFP4_BLOCK, NB))](
            x2, g, q, s, R, C, x2.stride(0), q.stride(0), s.stride(0),
            BLOCK_R=BR, NB=NB, num_warps=1 if cm.kernels_interpreted() else 4)
    return q, s


def _launch_dequant(q, s, g, out_dtype):
    R, C = q.shape[0], 2 * q.shape[1]
    out = cm.empty((R, C), out_dtype, q.device)
    if R and C:
        BR, NB = (4, 2) if cm.kernels_interpreted() else (16, 8)
        _nvfp4_dequant_kernel[(triton.cdiv(R, BR), triton.cdiv(C // NVFP4_BLOCK, NB))](
            q, s, g, out, R, C, q.stride(0), s.stride(0), out.stride(0),
            BLOCK_R=BR, NB=NB, num_warps=1 if cm.kernels_interpreted() else 4)
    return out


def _epilogue_args(out, gate, residual, M, N):
    gate2 = cm.broadcast_rows("gate", gate, M, N, (M,))
    res2 = cm.broadcast_rows("residual", residual, M, N, (M,))
    args = (gate2 if gate2 is not None else out,
            gate2.stride(0) if gate2 is not None else 0, gate2.stride(1) if gate2 is not None else 0,
            res2 if res2 is not None else out,
            res2.stride(0) if res2 is not None else 0, res2.stride(1) if res2 is not None else 0)
    return args, gate2 is not None, res2 is not None


def _launch_w4a16(x, w, ws, wg, bias, activation, gate, residual, out_dtype):
    M, K = x.shape
    N = w.shape[0]
    out = cm.empty((M, N), out_dtype, x.device)
    if M == 0 or N == 0:
        return out
    (G, sgm, sgn, Rz, srm, srn), has_gate, has_res = _epilogue_args(out, gate, residual, M, N)
    if x.dtype == torch.float32:  # 16-bit activations: the tensor-core dot takes bf16 (documented in nvfp4_linear)
        x = x.to(torch.bfloat16)
    args = (x, w, ws, wg, bias if bias is not None else out, G, Rz, out, M, N, K,
            x.stride(0), w.stride(0), ws.stride(0), sgm, sgn, srm, srn, out.stride(0))
    flags = dict(HAS_BIAS=bias is not None, ACT=activation_code(activation), HAS_GATE=has_gate, HAS_RES=has_res,
                 INTERPRET=cm.kernels_interpreted())
    launch_gemm(_nvfp4_w4a16_kernel, _w4a16_tuned, M, N, args, flags, cm.kernels_interpreted())
    return out


def _launch_w4a4(a, a_s, ag, w, ws, wg, bias, activation, gate, residual, out_dtype, use_dot_scaled):
    M = a.shape[0]
    K = 2 * a.shape[1]
    N = w.shape[0]
    out = cm.empty((M, N), out_dtype, a.device)
    if M == 0 or N == 0:
        return out
    (G, sgm, sgn, Rz, srm, srn), has_gate, has_res = _epilogue_args(out, gate, residual, M, N)
    args = (a, a_s, ag, w, ws, wg, bias if bias is not None else out, G, Rz, out, M, N, K,
            a.stride(0), a_s.stride(0), w.stride(0), ws.stride(0), sgm, sgn, srm, srn, out.stride(0))
    flags = dict(HAS_BIAS=bias is not None, ACT=activation_code(activation), HAS_GATE=has_gate, HAS_RES=has_res,
                 USE_DOT_SCALED=use_dot_scaled, INTERPRET=cm.kernels_interpreted())
    launch_gemm(_nvfp4_w4a4_kernel, _w4a4_tuned, M, N, args, flags, cm.kernels_interpreted())
    return out


# -------------------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("dz::nvfp4_quantize", mutates_args=())
def _op_quant(x: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if cm.triton_runs_on(x):
        return _launch_quant(x, global_scale)
    q, s, _ = quantize_nvfp4_reference(x, global_scale)
    return q, s


@_op_quant.register_fake
def _(x, global_scale):
    R, C = x.shape
    return x.new_empty((R, C // 2), dtype=torch.uint8), x.new_empty((R, C // NVFP4_BLOCK), dtype=cm.FP8_DTYPE)


@torch.library.custom_op("dz::nvfp4_dequantize", mutates_args=())
def _op_dequant(q: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
    if cm.triton_runs_on(q):
        return _launch_dequant(q, scale, global_scale, out_dtype)
    return dequantize_nvfp4_reference(q, scale, global_scale, out_dtype)


@_op_dequant.register_fake
def _(q, scale, global_scale, out_dtype):
    return q.new_empty((q.shape[0], 2 * q.shape[1]), dtype=out_dtype)


@torch.library.custom_op("dz::nvfp4_gemm_w4a16", mutates_args=())
def _op_w4a16(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, w_global: torch.Tensor,
              bias: Optional[torch.Tensor], activation: str, gate: Optional[torch.Tensor],
              residual: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    act = None if activation == "none" else activation
    if cm.triton_runs_on(x):
        return _launch_w4a16(x, w, w_scale, w_global, bias, act, gate, residual, out_dtype)
    return nvfp4_gemm_w4a16_reference(x, w, w_scale, w_global, bias=bias, activation=act, gate=gate,
                                      residual=residual, out_dtype=out_dtype)


@_op_w4a16.register_fake
def _(x, w, w_scale, w_global, bias, activation, gate, residual, out_dtype):
    return x.new_empty((x.shape[0], w.shape[0]), dtype=out_dtype)


@torch.library.custom_op("dz::nvfp4_gemm_w4a4", mutates_args=())
def _op_w4a4(a: torch.Tensor, a_scale: torch.Tensor, a_global: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
             w_global: torch.Tensor, bias: Optional[torch.Tensor], activation: str, gate: Optional[torch.Tensor],
             residual: Optional[torch.Tensor], out_dtype: torch.dtype, use_dot_scaled: bool) -> torch.Tensor:
    act = None if activation == "none" else activation
    if cm.triton_runs_on(a):
        return _launch_w4a4(a, a_scale, a_global, w, w_scale, w_global, bias, act, gate, residual, out_dtype,
                            use_dot_scaled)
    return nvfp4_gemm_w4a4_reference(a, a_scale, a_global, w, w_scale, w_global, bias=bias, activation=act,
                                     gate=gate, residual=residual, out_dtype=out_dtype)


@_op_w4a4.register_fake
def _(a, a_scale, a_global, w, w_scale, w_global, bias, activation, gate, residual, out_dtype, use_dot_scaled):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


# ------------------------------------------------------------------------------------------------- public functions
def _check_global(name: str, g, ref: torch.Tensor) -> torch.Tensor:
    if not isinstance(g, torch.Tensor) or g.dtype != torch.float32 or g.numel() != 1:
        raise TypeError(f"{name} must be a float32 tensor with one element (ModelOpt's amax / 2688), got "
                        f"{g if not isinstance(g, torch.Tensor) else (g.dtype, tuple(g.shape))}")
    cm.check_same_device({name: g}, ref, "the data")
    return g.reshape(())


def quantize_nvfp4(x: torch.Tensor, global_scale: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 quantization (Triton on CUDA / interpreter, else the bit-identical reference).

    x: [..., K] float32/bfloat16/float16, K % 16 == 0. global_scale: float32 one-element tensor in ModelOpt's
    convention (weight_scale_2 / input_scale = amax / (6 * 448)); computed from x when None.
    Returns (packed uint8 [..., K/2], block scale float8_e4m3fn [..., K/16], global_scale float32 [])."""
    cm.check_tensor("x", x, cm.FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dim [..., K]")
    K = x.shape[-1]
    if K % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 needs K (the last dim) to be a multiple of {NVFP4_BLOCK}, got {K}")
    g = nvfp4_global_scale(x) if global_scale is None else _check_global("global_scale", global_scale, x)
    x2 = cm.as_rows(x)
    q, s = torch.ops.dz.nvfp4_quantize(x2, g)
    return q.view(*x.shape[:-1], K // 2), s.view(*x.shape[:-1], K // NVFP4_BLOCK), g


def dequantize_nvfp4(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
                     out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """packed uint8 [..., K/2], scale float8_e4m3fn [..., K/16], global_scale float32 -> [..., K] in out_dtype,
    e2m1 * (float(scale) * global_scale) in float32 with one rounding."""
    cm.check_tensor("packed", packed, (torch.uint8,))
    cm.check_tensor("scale", scale, (cm.FP8_DTYPE,))
    cm.check_out_dtype(out_dtype)
    K = 2 * packed.shape[-1]
    if packed.dim() < 1 or K % NVFP4_BLOCK or tuple(scale.shape) != (*packed.shape[:-1], K // NVFP4_BLOCK):
        raise ValueError(f"packed {tuple(packed.shape)} and scale {tuple(scale.shape)} do not describe an NVFP4 "
                         f"tensor: expected scale [..., K/16] with K = 2 * packed.shape[-1] a multiple of 16")
    g = _check_global("global_scale", global_scale, packed)
    cm.check_same_device({"scale": scale}, packed, "packed")
    q2 = packed.reshape(-1, K // 2).contiguous()
    s2 = scale.reshape(-1, K // NVFP4_BLOCK).contiguous()
    out = torch.ops.dz.nvfp4_dequantize(q2, s2, g, out_dtype)
    return out.view(*packed.shape[:-1], K)


def _check_packed_weight(w, w_scale, K_expected: Optional[int] = None) -> tuple[int, int]:
    cm.check_tensor("w (packed NVFP4 weight)", w, (torch.uint8,), dims=(2,))
    cm.check_tensor("w_scale", w_scale, (cm.FP8_DTYPE,), dims=(2,))
    N, Kh = w.shape
    K = 2 * Kh
    if K % NVFP4_BLOCK:
        raise ValueError(f"the packed weight has K = {K} (2 x {Kh}); NVFP4 needs K to be a multiple of {NVFP4_BLOCK}")
    if K_expected is not None and K != K_expected:
        raise ValueError(f"the activation has K = {K_expected} but the packed weight [N, K/2] = {tuple(w.shape)} "
                         f"holds K = {K}")
    cm.check_contiguous("w (packed NVFP4 weight)", w)
    cm.check_shape("w_scale", w_scale, (N, K // NVFP4_BLOCK))
    cm.check_contiguous("w_scale", w_scale)
    return N, K


def _check_epilogue(bias, gate, residual, M, N, ref, out_dtype, activation):
    cm.check_out_dtype(out_dtype)
    activation_code(activation)
    if bias is not None:
        cm.check_tensor("bias", bias, cm.FLOAT_DTYPES)
        cm.check_shape("bias", bias, (N,))
        cm.check_contiguous("bias", bias)
    for name, t in (("gate", gate), ("residual", residual)):
        if t is not None:
            cm.broadcast_rows(name, t, M, N, (M,))
    cm.check_same_device({"bias": bias, "gate": gate, "residual": residual}, ref, "the activation")


def nvfp4_gemm_w4a16(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, w_global: torch.Tensor, *,
                     bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                     gate: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                     out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Weight-only NVFP4 GEMM: out = epilogue(x @ dequant(w)^T), [M, N] in out_dtype.

    x: [M, K] bfloat16/float16 (float32 is rounded to bfloat16 for the tensor cores), K contiguous;
    w: [N, K/2] uint8 packed E2M1 (contiguous); w_scale: [N, K/16] float8_e4m3fn; w_global: float32 one element.
    Epilogue arguments as in fp8_gemm."""
    cm.check_tensor("x", x, cm.FLOAT_DTYPES, dims=(2,))
    M, K = x.shape
    N, _ = _check_packed_weight(w, w_scale, K)
    g = _check_global("w_global", w_global, w)
    if K > 1 and x.stride(1) != 1:
        raise ValueError(f"x must be contiguous along K (stride {x.stride(1)}); call .contiguous()")
    cm.check_same_device({"w": w, "w_scale": w_scale}, x, "x")
    _check_epilogue(bias, gate, residual, M, N, x, out_dtype, activation)
    return torch.ops.dz.nvfp4_gemm_w4a16(x, w, w_scale, g, bias, activation or "none", gate, residual, out_dtype)


def nvfp4_gemm_w4a4(a: torch.Tensor, a_scale: torch.Tensor, a_global: torch.Tensor, w: torch.Tensor,
                    w_scale: torch.Tensor, w_global: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                    activation: Optional[str] = None, gate: Optional[torch.Tensor] = None,
                    residual: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16,
                    use_dot_scaled: Optional[bool] = None) -> torch.Tensor:
    """NVFP4 x NVFP4 GEMM: out = epilogue(dequant(a) @ dequant(w)^T), [M, N] in out_dtype.

    a: [M, K/2] uint8, a_scale [M, K/16] e4m3, a_global float32 (from quantize_nvfp4 of the activation);
    w: [N, K/2] uint8, w_scale [N, K/16] e4m3, w_global float32. use_dot_scaled: None picks tl.dot_scaled on
    sm_100 and register dequantization elsewhere; True off sm_100 raises (see the module docstring)."""
    cm.check_tensor("a", a, (torch.uint8,), dims=(2,))
    cm.check_tensor("a_scale", a_scale, (cm.FP8_DTYPE,), dims=(2,))
    M = a.shape[0]
    K = 2 * a.shape[1]
    N, _ = _check_packed_weight(w, w_scale, K)
    cm.check_shape("a_scale", a_scale, (M, K // NVFP4_BLOCK))
    if a.shape[1] > 1 and a.stride(1) != 1:
        raise ValueError("a must be contiguous along K")
    if a_scale.shape[1] > 1 and a_scale.stride(1) != 1:
        raise ValueError("a_scale must be contiguous along K")
    ag = _check_global("a_global", a_global, a)
    wg = _check_global("w_global", w_global, w)
    cm.check_same_device({"a_scale": a_scale, "w": w, "w_scale": w_scale}, a, "a")
    _check_epilogue(bias, gate, residual, M, N, a, out_dtype, activation)
    available = dot_scaled_available(a.device) and not cm.kernels_interpreted()
    if use_dot_scaled is None:
        use_dot_scaled = available
    elif use_dot_scaled and not available:
        raise ValueError("use_dot_scaled=True needs a CUDA device of compute capability 10.x (sm_100, Blackwell); "
                         f"tensors are on {a.device}. The Triton interpreter cannot emulate NVFP4 dot_scaled (it "
                         "decodes scales as E8M0); use use_dot_scaled=None for the register-dequantization path")
    return torch.ops.dz.nvfp4_gemm_w4a4(a, a_scale, ag, w, w_scale, wg, bias, activation or "none", gate, residual,
                                        out_dtype, bool(use_dot_scaled))


def nvfp4_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, w_global: torch.Tensor,
                 bias: Optional[torch.Tensor] = None, *, act_quant: bool = False,
                 input_scale: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                 gate: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                 out_dtype: Optional[torch.dtype] = None, use_dot_scaled: Optional[bool] = None) -> torch.Tensor:
    """y = epilogue(x @ dequant(w)^T) for x [..., K]: W4A16 when act_quant is False, else x is quantized to NVFP4
    first (W4A4) with global scale `input_scale` (a static, calibrated ModelOpt input_scale) or, when None, one
    computed from this x's amax. gate / residual broadcast to [..., N]; returns [..., N] in out_dtype (default
    x's dtype)."""
    cm.check_tensor("x", x, cm.FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] != 2 * w.shape[-1]:
        raise ValueError(f"x has shape {tuple(x.shape)} but the packed weight [N, K/2] = {tuple(w.shape)} holds "
                         f"K = {2 * w.shape[-1]}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    lead = x.shape[:-1]
    N = w.shape[0]
    x2 = cm.as_rows(x)
    M = x2.shape[0]
    gate2 = cm.broadcast_rows("gate", gate, M, N, lead)
    res2 = cm.broadcast_rows("residual", residual, M, N, lead)
    if act_quant:
        a, a_s, ag = quantize_nvfp4(x2, input_scale)
        y = nvfp4_gemm_w4a4(a, a_s, ag, w, w_scale, w_global, bias=bias, activation=activation, gate=gate2,
                            residual=res2, out_dtype=out_dtype, use_dot_scaled=use_dot_scaled)
    else:
        y = nvfp4_gemm_w4a16(x2, w, w_scale, w_global, bias=bias, activation=activation, gate=gate2,
                             residual=res2, out_dtype=out_dtype)
    return y.view(*lead, N)
