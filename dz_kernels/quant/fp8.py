"""FP8 E4M3: Triton quantization kernels (per row, 1x128 and 128x128 blocks), dequantization, and an FP8 GEMM
(fp8 x fp8 -> bf16/fp16/fp32) with row/column or block scales and a fused epilogue (bias, GELU-tanh,
residual + gate * (.)). Numerics and scale layouts: formats.py.

Public functions (each also registered as a ``dz::`` custom op with a fake implementation):
    quantize_fp8_rowwise(x)               x [..., K]  -> q [..., K] e4m3, scale [..., 1] float32 (per token / per
                                                         output channel when x is a weight [N, K])
    quantize_fp8_blockwise(x, block)      block "1x128": x [..., K] -> scale [..., K/128];
                                          block "128x128": x [R, K] -> scale [ceil(R/128), K/128]
    dequantize_fp8(q, scale, granularity) -> q * scale
    fp8_gemm(a, a_scale, b, b_scale, ...) a [M, K] e4m3, b [N, K] e4m3 (nn.Linear weight layout) -> [M, N]
    fp8_linear(x, weight, weight_scale, ...)   quantizes x (per token, or 1x128 blocks) and runs fp8_gemm
There is no backward: these are inference kernels (the ops raise if asked for a gradient).

GPU notes: the GEMM's operands are K-major (A [M, K] row-major, B [N, K] row-major = B^T column-major), the layout
Hopper's FP8 wgmma needs. Row scaling accumulates the whole K in the MMA accumulator and scales once at the end;
block scaling adds each 128-wide K slice's partial product into a float32 accumulator times its two scales
(DeepSeek-V3 style), so BLOCK_K must divide 128.
"""
from __future__ import annotations

from typing import Optional

import torch

import triton
import triton.language as tl

from . import _common as cm
from .._common import cast_rne, e4m3_bits, e4m3_value, fp8_scale_tl, nan_amax
from ._tl import launch_gemm, _epilogue_store, _grouped_pid, activation_code
from .formats import (
    FP8_AMAX_FLOOR, FP8_BLOCK, dequantize_fp8_reference, fp8_gemm_reference, fp8_scale_shape,
    quantize_fp8_reference,
)

__all__ = ["quantize_fp8_rowwise", "quantize_fp8_blockwise", "dequantize_fp8", "fp8_gemm", "fp8_linear"]


# ----------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _fp8_quant_rows_kernel(X, Q, S, M, K, stride_xm, stride_qm, amax_floor,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """One scale per row: pass 1 takes the row amax (NaN if the row holds one), pass 2 writes the E4M3 bytes of
    x / s, s = max(amax, floor) / 448 (dz_kernels._common). Q is the uint8 view of the float8_e4m3fn output."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    cols = tl.arange(0, BLOCK_K)
    xrow = X + rows.to(tl.int64)[:, None] * stride_xm
    qrow = Q + rows.to(tl.int64)[:, None] * stride_qm
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        c = k0 + cols
        m = rmask[:, None] & (c < K)[None, :]
        x = tl.load(xrow + c[None, :], mask=m, other=0.0).to(tl.float32)
        a = nan_amax(x, 1)
        amax = tl.where((a != a) | (amax != amax), float("nan"), tl.maximum(amax, a))   # a NaN, once in, stays
    s = fp8_scale_tl(amax, amax_floor)
    tl.store(S + rows, s, mask=rmask)
    for k0 in range(0, K, BLOCK_K):
        c = k0 + cols
        m = rmask[:, None] & (c < K)[None, :]
        x = tl.load(xrow + c[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(qrow + c[None, :], e4m3_bits(tl.math.div_rn(x, s[:, None])), mask=m)


@triton.jit
def _fp8_quant_blocks_kernel(X, Q, S, R, C, stride_xr, stride_qr, stride_sr, amax_floor,
                             TILE_R: tl.constexpr, BLOCK_C: tl.constexpr, PER_ROW: tl.constexpr):
    """A [TILE_R, BLOCK_C] tile: PER_ROW gives each row its own scale (1 x BLOCK_C blocks), else one scale for the
    whole tile (TILE_R x BLOCK_C blocks). Scale [row (or row-block), column-block]; Q the uint8 view of the output."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * TILE_R + tl.arange(0, TILE_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < R
    m = rmask[:, None] & (cols < C)[None, :]
    x = tl.load(X + rows.to(tl.int64)[:, None] * stride_xr + cols[None, :], mask=m, other=0.0).to(tl.float32)
    if PER_ROW:
        s = fp8_scale_tl(nan_amax(x, 1), amax_floor)
        tl.store(S + rows.to(tl.int64) * stride_sr + pid_c, s, mask=rmask)
        q = tl.math.div_rn(x, s[:, None])
    else:
        a = nan_amax(x, 1)
        s = fp8_scale_tl(nan_amax(a, 0), amax_floor)
        tl.store(S + pid_r * stride_sr + pid_c, s)
        q = tl.math.div_rn(x, s)
    tl.store(Q + rows.to(tl.int64)[:, None] * stride_qr + cols[None, :], e4m3_bits(q), mask=m)


@triton.jit
def _fp8_dequant_kernel(Q, S, O, R, C, stride_qr, stride_sr, stride_sc, stride_or, block_r, block_c,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[r, c] = q[r, c] * scale[r // block_r, c // block_c] (block_r/block_c describe any granularity)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (rows < R)[:, None] & (cols < C)[None, :]
    q = e4m3_value(tl.load(Q + rows.to(tl.int64)[:, None] * stride_qr + cols[None, :], mask=m, other=0.0))
    s = tl.load(S + (rows // block_r)[:, None] * stride_sr + (cols // block_c)[None, :] * stride_sc, mask=m, other=0.0)
    tl.store(O + rows.to(tl.int64)[:, None] * stride_or + cols[None, :], cast_rne(q * s, O.dtype.element_ty), mask=m)


@triton.jit
def _fp8_gemm_kernel(A, B, AS, BS, BIAS, GATE, RES, OUT, M, N, K,
                     stride_am, stride_bn, stride_asm, stride_ask, stride_bsn, stride_bsk,
                     stride_gm, stride_gn, stride_rm, stride_rn, stride_om,
                     BLOCK_SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_GATE: tl.constexpr,
                     HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """C = epilogue((A * sa) @ (B * sb)^T): A [M, K], B [N, K] e4m3, K contiguous.
    Row scaling: sa [M] (stride_asm may be 0 for one per-tensor scale), sb [N] (stride_bsn may be 0).
    Block scaling: sa [M, K/128], sb [ceil(N/128), K/128]; BLOCK_K divides 128."""
    pid_m, pid_n = _grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = A + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = B + offs_n.to(tl.int64)[:, None] * stride_bn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_n[:, None] & kmask[None, :], other=0.0)
        if BLOCK_SCALED:
            kb = k0 // 128
            sa = tl.load(AS + offs_m * stride_asm + kb * stride_ask, mask=mask_m, other=0.0)
            sb = tl.load(BS + (offs_n // 128) * stride_bsn + kb * stride_bsk, mask=mask_n, other=0.0)
            acc += tl.dot(a, tl.trans(b)) * sa[:, None] * sb[None, :]
        else:
            acc = tl.dot(a, tl.trans(b), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if not BLOCK_SCALED:
        sa = tl.load(AS + offs_m * stride_asm, mask=mask_m, other=0.0)
        sb = tl.load(BS + offs_n * stride_bsn, mask=mask_n, other=0.0)
        acc = acc * sa[:, None] * sb[None, :]
    _epilogue_store(acc, offs_m, offs_n, M, N, BIAS, GATE, stride_gm, stride_gn, RES, stride_rm, stride_rn,
                    OUT, stride_om, HAS_BIAS, ACT, HAS_GATE, HAS_RES)


# GPU tile configurations (Hopper FP8 wgmma: 128-wide K steps, 2-4 stage pipelines). BLOCK_K = 128 everywhere so
# one configuration list serves row and block scaling.
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
_fp8_gemm_tuned = triton.autotune(
    configs=_GEMM_CONFIGS, key=["M", "N", "K", "BLOCK_SCALED", "HAS_BIAS", "ACT", "HAS_GATE", "HAS_RES"],
)(_fp8_gemm_kernel)
# The interpreter runs one small configuration (several K steps, several 128-blocks of N, ragged edges).


# ---------------------------------------------------------------------------------------------------------- launchers
def _launch_quant_rows(x2: torch.Tensor):
    M, K = x2.shape
    q = cm.empty((M, K), cm.FP8_DTYPE, x2.device)
    s = cm.empty((M, 1), torch.float32, x2.device)
    if M == 0:
        return q, s
    if cm.kernels_interpreted():
        block_m, block_k, warps = 4, 64, 1
    else:
        block_m, block_k, warps = 4, min(1024, triton.next_power_of_2(K)), 4
    _fp8_quant_rows_kernel[(triton.cdiv(M, block_m),)](
        x2, q.view(torch.uint8), s, M, K, x2.stride(0), q.stride(0), FP8_AMAX_FLOOR,
        BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps)
    return q, s


def _launch_quant_blocks(x2: torch.Tensor, per_row: bool):
    R, C = x2.shape
    granularity = "block1x128" if per_row else "block128x128"
    q = cm.empty((R, C), cm.FP8_DTYPE, x2.device)
    s = cm.empty(fp8_scale_shape(granularity, R, C), torch.float32, x2.device)
    if R == 0:
        return q, s
    tile_r = (4 if cm.kernels_interpreted() else 16) if per_row else FP8_BLOCK
    warps = 1 if cm.kernels_interpreted() else (4 if per_row else 8)
    _fp8_quant_blocks_kernel[(triton.cdiv(R, tile_r), C // FP8_BLOCK)](
        x2, q.view(torch.uint8), s, R, C, x2.stride(0), q.stride(0), s.stride(0), FP8_AMAX_FLOOR,
        TILE_R=tile_r, BLOCK_C=FP8_BLOCK, PER_ROW=per_row, num_warps=warps)
    return q, s


def _granularity_blocks(granularity: str, R: int, C: int) -> tuple[int, int]:
    return {"tensor": (max(R, 1), max(C, 1)), "row": (1, max(C, 1)), "block1x128": (1, FP8_BLOCK),
            "block128x128": (FP8_BLOCK, FP8_BLOCK)}[granularity]


def _launch_dequant(q: torch.Tensor, scale: torch.Tensor, granularity: str, out_dtype: torch.dtype):
    R, C = q.shape
    out = cm.empty((R, C), out_dtype, q.device)
    if R == 0 or C == 0:
        return out
    s2 = scale.reshape(1, 1) if scale.dim() == 0 else scale
    br, bc = _granularity_blocks(granularity, R, C)
    BR, BC = (16, 128) if cm.kernels_interpreted() else (32, 128)
    _fp8_dequant_kernel[(triton.cdiv(R, BR), triton.cdiv(C, BC))](
        q, s2, out, R, C, q.stride(0), s2.stride(0), s2.stride(1), out.stride(0), br, bc,
        BLOCK_R=BR, BLOCK_C=BC, num_warps=1 if cm.kernels_interpreted() else 4)
    return out


def _scale_strides(scale: torch.Tensor, block_scaled: bool) -> tuple[int, int]:
    if block_scaled:
        return scale.stride(0), scale.stride(1)
    if scale.numel() == 1:
        return 0, 0
    return (scale.stride(0) if scale.dim() >= 1 else 0), 0


def _launch_gemm(a, a_scale, b, b_scale, block_scaled, bias, activation, gate, residual, out_dtype):
    M, K = a.shape
    N = b.shape[0]
    out = cm.empty((M, N), out_dtype, a.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        out.copy_(fp8_gemm_reference(a, a_scale, b, b_scale, block_scaled=block_scaled, bias=bias,
                                     activation=activation, gate=gate, residual=residual, out_dtype=out_dtype))
        return out
    gate2 = cm.broadcast_rows("gate", gate, M, N, (M,))
    res2 = cm.broadcast_rows("residual", residual, M, N, (M,))
    dummy = out
    sam, sak = _scale_strides(a_scale, block_scaled)
    sbn, sbk = _scale_strides(b_scale, block_scaled)
    args = (a, b, a_scale, b_scale, bias if bias is not None else dummy,
            gate2 if gate2 is not None else dummy, res2 if res2 is not None else dummy, out, M, N, K,
            a.stride(0), b.stride(0), sam, sak, sbn, sbk,
            gate2.stride(0) if gate2 is not None else 0, gate2.stride(1) if gate2 is not None else 0,
            res2.stride(0) if res2 is not None else 0, res2.stride(1) if res2 is not None else 0, out.stride(0))
    flags = dict(BLOCK_SCALED=block_scaled, HAS_BIAS=bias is not None, ACT=activation_code(activation),
                 HAS_GATE=gate2 is not None, HAS_RES=res2 is not None)
    launch_gemm(_fp8_gemm_kernel, _fp8_gemm_tuned, M, N, args, flags, cm.kernels_interpreted())
    return out


# -------------------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("dz::fp8_quantize_rowwise", mutates_args=())
def _op_quant_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if cm.triton_runs_on(x):
        return _launch_quant_rows(x)
    return quantize_fp8_reference(x, "row")


@_op_quant_rows.register_fake
def _(x):
    M, K = x.shape
    return x.new_empty((M, K), dtype=cm.FP8_DTYPE), x.new_empty((M, 1), dtype=torch.float32)


@torch.library.custom_op("dz::fp8_quantize_blockwise", mutates_args=())
def _op_quant_blocks(x: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if cm.triton_runs_on(x):
        return _launch_quant_blocks(x, per_row)
    return quantize_fp8_reference(x, "block1x128" if per_row else "block128x128")


@_op_quant_blocks.register_fake
def _(x, per_row):
    R, C = x.shape
    shape = fp8_scale_shape("block1x128" if per_row else "block128x128", R, C)
    return x.new_empty((R, C), dtype=cm.FP8_DTYPE), x.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("dz::fp8_dequantize", mutates_args=())
def _op_dequant(q: torch.Tensor, scale: torch.Tensor, granularity: str, out_dtype: torch.dtype) -> torch.Tensor:
    if cm.triton_runs_on(q):
        return _launch_dequant(q, scale, granularity, out_dtype)
    return dequantize_fp8_reference(q, scale, granularity, out_dtype)


@_op_dequant.register_fake
def _(q, scale, granularity, out_dtype):
    return q.new_empty(q.shape, dtype=out_dtype)


@torch.library.custom_op("dz::fp8_gemm", mutates_args=())
def _op_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, block_scaled: bool,
             bias: Optional[torch.Tensor], activation: str, gate: Optional[torch.Tensor],
             residual: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    act = None if activation == "none" else activation
    if cm.triton_runs_on(a):
        return _launch_gemm(a, a_scale, b, b_scale, block_scaled, bias, act, gate, residual, out_dtype)
    return fp8_gemm_reference(a, a_scale, b, b_scale, block_scaled=block_scaled, bias=bias, activation=act,
                              gate=gate, residual=residual, out_dtype=out_dtype)


@_op_gemm.register_fake
def _(a, a_scale, b, b_scale, block_scaled, bias, activation, gate, residual, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


# ------------------------------------------------------------------------------------------------- public functions
def _check_quant_input(x: torch.Tensor) -> None:
    cm.check_tensor("x", x, cm.FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dim [..., K]")


def quantize_fp8_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 quantization with one scale per row (Triton on CUDA / interpreter, else the reference).

    x: [..., K] float32/bfloat16/float16 (an activation: one scale per token; a weight [N, K]: one scale per output
    channel). Returns q [..., K] float8_e4m3fn and scale [..., 1] float32 with x ~= q * scale,
    scale = max(rowmax|x|, 1e-12) / 448."""
    _check_quant_input(x)
    x2 = cm.as_rows(x)
    q, s = torch.ops.dz.fp8_quantize_rowwise(x2)
    return q.view(x.shape), s.view(*x.shape[:-1], 1)


def quantize_fp8_blockwise(x: torch.Tensor, block: str = "1x128") -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 quantization with block scales, K % 128 == 0.

    block="1x128":   x [..., K] (activations) -> q [..., K], scale [..., K/128]
    block="128x128": x [R, K]   (weights)     -> q [R, K],   scale [ceil(R/128), K/128] (the last row block may be
                     partial). scale = max(block amax, 1e-12) / 448 float32; x ~= q * scale."""
    _check_quant_input(x)
    if block not in ("1x128", "128x128"):
        raise ValueError(f"block={block!r}: expected '1x128' or '128x128'")
    K = x.shape[-1]
    if K % FP8_BLOCK:
        raise ValueError(f"{block} FP8 block scaling needs K (the last dim) to be a multiple of {FP8_BLOCK}, got {K}")
    if block == "128x128" and x.dim() != 2:
        raise ValueError(f"128x128 block scaling takes a 2-D weight [N, K], got shape {tuple(x.shape)}")
    x2 = cm.as_rows(x)
    q, s = torch.ops.dz.fp8_quantize_blockwise(x2, block == "1x128")
    if block == "1x128":
        return q.view(x.shape), s.view(*x.shape[:-1], K // FP8_BLOCK)
    return q, s


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, granularity: str = "row",
                   out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """q [R, C] float8_e4m3fn, scale float32 (shape: formats.fp8_scale_shape(granularity, R, C); "row" also takes
    [R], "tensor" any one-element tensor) -> q * scale [R, C] in out_dtype."""
    cm.check_tensor("q", q, (cm.FP8_DTYPE,), dims=(2,))
    cm.check_tensor("scale", scale, (torch.float32,))
    cm.check_out_dtype(out_dtype)
    R, C = q.shape
    if granularity == "tensor" and scale.numel() == 1:
        scale = scale.reshape(())
    elif granularity == "row" and tuple(scale.shape) == (R,):
        scale = scale.view(R, 1)
    cm.check_shape("scale", scale, fp8_scale_shape(granularity, R, C))
    cm.check_same_device({"scale": scale}, q, "q")
    return torch.ops.dz.fp8_dequantize(q.contiguous(), scale.contiguous(), granularity, out_dtype)


def _check_gemm_args(a, a_scale, b, b_scale, block_scaled, bias, out_dtype):
    cm.check_tensor("a", a, (cm.FP8_DTYPE,), dims=(2,))
    cm.check_tensor("b (the weight)", b, (cm.FP8_DTYPE,), dims=(2,))
    cm.check_tensor("a_scale", a_scale, (torch.float32,))
    cm.check_tensor("b_scale", b_scale, (torch.float32,))
    cm.check_out_dtype(out_dtype)
    M, K = a.shape
    N, Kb = b.shape
    if K != Kb:
        raise ValueError(f"a is [M, K] = {tuple(a.shape)} but b is [N, K] = {tuple(b.shape)}: K differs")
    if a.shape[1] > 1 and a.stride(1) != 1:
        raise ValueError(f"a must be contiguous along K (stride {a.stride(1)}); call .contiguous()")
    cm.check_contiguous("b (the weight)", b)
    cm.check_contiguous("b_scale", b_scale)
    cm.check_same_device({"a_scale": a_scale, "b": b, "b_scale": b_scale, "bias": bias}, a, "a")
    if block_scaled:
        if K % FP8_BLOCK:
            raise ValueError(f"block-scaled FP8 GEMM needs K to be a multiple of {FP8_BLOCK}, got K={K}")
        cm.check_shape("a_scale (1x128 blocks)", a_scale, (M, K // FP8_BLOCK))
        cm.check_shape("b_scale (128x128 blocks)", b_scale, (-(-N // FP8_BLOCK), K // FP8_BLOCK))
    else:
        if a_scale.numel() != 1 and tuple(a_scale.shape) not in ((M, 1), (M,)):
            raise ValueError(f"a_scale has shape {tuple(a_scale.shape)}; row scaling takes [M, 1] = [{M}, 1], [M] "
                             "or one element")
        if b_scale.numel() != 1 and tuple(b_scale.shape) not in ((N, 1), (N,)):
            raise ValueError(f"b_scale has shape {tuple(b_scale.shape)}; per-channel scaling takes [N, 1] = "
                             f"[{N}, 1], [N] or one element")
    if bias is not None:
        cm.check_tensor("bias", bias, cm.FLOAT_DTYPES)
        cm.check_shape("bias", bias, (N,))
        cm.check_contiguous("bias", bias)


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, *,
             block_scaled: bool = False, bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
             gate: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """FP8 GEMM with fused epilogue: out = residual + gate * act((a*sa) @ (b*sb)^T + bias), [M, N] in out_dtype.

    a: [M, K] float8_e4m3fn (quantized activation, K contiguous); b: [N, K] float8_e4m3fn (nn.Linear weight
    layout, contiguous). Row scaling (block_scaled=False): a_scale [M, 1] / [M] (per token) and b_scale [N] / [N, 1]
    (per output channel); either may be one element (per tensor). Block scaling: a_scale [M, K/128] (1x128),
    b_scale [ceil(N/128), K/128] (128x128), K % 128 == 0. All scales float32 dequantization multipliers.
    bias: [N]; activation: None or "gelu_tanh"; gate, residual: broadcastable to [M, N] (the adaLN gate is per
    token and channel, [M, N]; [N] shares one row). Float32 accumulation and epilogue, one rounding at the end."""
    _check_gemm_args(a, a_scale, b, b_scale, block_scaled, bias, out_dtype)
    activation_code(activation)
    M, N = a.shape[0], b.shape[0]
    for name, t in (("gate", gate), ("residual", residual)):
        if t is not None:
            cm.broadcast_rows(name, t, M, N, (M,))  # validates shape and dtype
            cm.check_same_device({name: t}, a, "a")
    return torch.ops.dz.fp8_gemm(a, a_scale, b, b_scale, block_scaled, bias, activation or "none", gate, residual,
                                 out_dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
               *, block_scaled: bool = False, activation: Optional[str] = None, gate: Optional[torch.Tensor] = None,
               residual: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """y = epilogue(x @ dequant(weight)^T) with x quantized to FP8 on the fly.

    x: [..., K] float (quantized per token, or in 1x128 blocks when block_scaled); weight: [N, K] float8_e4m3fn;
    weight_scale: [N] / [N, 1] per output channel (or one element), or [ceil(N/128), K/128] when block_scaled.
    gate / residual broadcast to [..., N]. Returns [..., N] in out_dtype (default: x's dtype)."""
    cm.check_tensor("x", x, cm.FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"x has shape {tuple(x.shape)} but the weight is [N, K] = {tuple(weight.shape)}: "
                         "the last dim of x must be K")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    lead = x.shape[:-1]
    N = weight.shape[0]
    M = 1
    for d in lead:
        M *= d
    x2 = cm.as_rows(x)
    if block_scaled:
        a, sa = quantize_fp8_blockwise(x2, "1x128")
    else:
        a, sa = quantize_fp8_rowwise(x2)
    gate2 = cm.broadcast_rows("gate", gate, M, N, lead)
    res2 = cm.broadcast_rows("residual", residual, M, N, lead)
    y = fp8_gemm(a, sa, weight, weight_scale, block_scaled=block_scaled, bias=bias, activation=activation,
                 gate=gate2, residual=res2, out_dtype=out_dtype)
    return y.view(*lead, N)
