"""FP8 E4M3 Triton kernels and their launchers: quantization (per row, 1x128 and 128x128 blocks), dequantization,
and the FP8 GEMM (fp8 x fp8 -> bf16/fp16/fp32) with row or block scales and a fused epilogue. The numerics (scale,
rounding, NaN) are dz_kernels/_common.py's; layouts: reference.py. Launchers do no checking: ops.py checks every
argument and owns the custom ops.

GPU notes: the GEMM's operands are K-major (A [M, K] row-major, B [N, K] row-major = B^T column-major), the layout
Hopper's FP8 wgmma needs. Row scaling accumulates the whole K in the MMA accumulator and scales once at the end;
block scaling adds each 128-wide K slice's partial product into a float32 accumulator times its two scales
(DeepSeek-V3 style), so BLOCK_K must divide 128.
"""
from __future__ import annotations

import torch

import triton
import triton.language as tl

from .._common import cast_rne, cdiv, e4m3_bits, e4m3_value, fp8_scale_tl, nan_amax, next_pow2
from . import _common as cm
from .reference import FP8_AMAX_FLOOR, FP8_BLOCK, fp8_gemm_reference, fp8_scale_shape
from .triton_common import _epilogue_store, _grouped_pid, activation_code, launch_gemm

__all__ = ["launch_fp8_quant_rows", "launch_fp8_quant_blocks", "launch_fp8_dequant", "launch_fp8_gemm"]


# ----------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _fp8_quant_rows_kernel(X, Q, S, M, K, stride_xm, stride_qm, amax_floor,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr = False):
    """One scale per row: pass 1 takes the row amax (NaN if the row holds one), pass 2 writes the E4M3 bytes of
    x / s, s = max(amax, floor) / 448 (dz_kernels._common). Q is the uint8 view of the float8_e4m3fn output.
    ONE_PASS (BLOCK_K >= K): the whole row is loaded once and kept in registers for both."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    cols = tl.arange(0, BLOCK_K)
    xrow = X + rows.to(tl.int64)[:, None] * stride_xm
    qrow = Q + rows.to(tl.int64)[:, None] * stride_qm
    if ONE_PASS:
        m = rmask[:, None] & (cols < K)[None, :]
        x = tl.load(xrow + cols[None, :], mask=m, other=0.0).to(tl.float32)
        s = fp8_scale_tl(nan_amax(x, 1), amax_floor)
        tl.store(S + rows, s, mask=rmask)
        tl.store(qrow + cols[None, :], e4m3_bits(tl.math.div_rn(x, s[:, None])), mask=m)
    else:
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
# Block scaling keeps two fp32 accumulators (each K block's product, then the scaled sum), so it fits in registers
# only up to 64 outputs per thread: on sm_90 (triton 3.6, tests/aot_capture.py) 237-246 registers and no spill there,
# while the 128 x 256 and 256 x 128 tiles on 8 warps (128 outputs a thread) spill 328 and 720 bytes a thread.
BLOCK_SCALED_MAX_OUTPUTS_PER_THREAD = 64


def _prune_gemm_configs(configs, named_args, **kwargs):
    """The autotuner's candidates for one launch: every config, except for block scaling those with more than
    BLOCK_SCALED_MAX_OUTPUTS_PER_THREAD outputs a thread."""
    if not kwargs.get("BLOCK_SCALED", named_args.get("BLOCK_SCALED", False)):
        return configs
    return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps)
            <= BLOCK_SCALED_MAX_OUTPUTS_PER_THREAD]


_fp8_gemm_tuned = triton.autotune(
    configs=_GEMM_CONFIGS, key=["M", "N", "K", "BLOCK_SCALED", "HAS_BIAS", "ACT", "HAS_GATE", "HAS_RES"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs},
)(_fp8_gemm_kernel)
# The interpreter runs one small configuration (several K steps, several 128-blocks of N, ragged edges). On a GPU the
# config table (dz_kernels/configs/fp8.json, kind gemm) names one configuration per shape where a sweep measured it;
# elsewhere this autotuned wrapper picks among the list above.


# ---------------------------------------------------------------------------------------------------------- launchers
def launch_fp8_quant_rows(x2: torch.Tensor):
    M, K = x2.shape
    q = cm.empty((M, K), cm.FP8_DTYPE, x2.device)
    s = cm.empty((M, 1), torch.float32, x2.device)
    if M == 0:
        return q, s
    if cm.kernels_interpreted():
        block_m, block_k, warps = 4, 64, 1
    else:
        cfg = cm.launch_config("fp8", "quant_rows", x2.device, k=K)
        block_m, warps = int(cfg["BLOCK_M"]), int(cfg["num_warps"])
        block_k = min(int(cfg["BLOCK_K"]), next_pow2(K))
    _fp8_quant_rows_kernel[(cdiv(M, block_m),)](
        x2, q.view(torch.uint8), s, M, K, x2.stride(0), q.stride(0), FP8_AMAX_FLOOR,
        BLOCK_M=block_m, BLOCK_K=block_k, ONE_PASS=block_k >= K, num_warps=warps)
    return q, s


def launch_fp8_quant_blocks(x2: torch.Tensor, per_row: bool):
    R, C = x2.shape
    granularity = "block1x128" if per_row else "block128x128"
    q = cm.empty((R, C), cm.FP8_DTYPE, x2.device)
    s = cm.empty(fp8_scale_shape(granularity, R, C), torch.float32, x2.device)
    if R == 0:
        return q, s
    tile_r = (4 if cm.kernels_interpreted() else 16) if per_row else FP8_BLOCK
    warps = 1 if cm.kernels_interpreted() else (4 if per_row else 8)
    _fp8_quant_blocks_kernel[(cdiv(R, tile_r), C // FP8_BLOCK)](
        x2, q.view(torch.uint8), s, R, C, x2.stride(0), q.stride(0), s.stride(0), FP8_AMAX_FLOOR,
        TILE_R=tile_r, BLOCK_C=FP8_BLOCK, PER_ROW=per_row, num_warps=warps)
    return q, s


def _granularity_blocks(granularity: str, R: int, C: int) -> tuple[int, int]:
    return {"tensor": (max(R, 1), max(C, 1)), "row": (1, max(C, 1)), "block1x128": (1, FP8_BLOCK),
            "block128x128": (FP8_BLOCK, FP8_BLOCK)}[granularity]


def launch_fp8_dequant(q: torch.Tensor, scale: torch.Tensor, granularity: str, out_dtype: torch.dtype):
    R, C = q.shape
    out = cm.empty((R, C), out_dtype, q.device)
    if R == 0 or C == 0:
        return out
    s2 = scale.reshape(1, 1) if scale.dim() == 0 else scale
    br, bc = _granularity_blocks(granularity, R, C)
    BR, BC = (16, 128) if cm.kernels_interpreted() else (32, 128)
    _fp8_dequant_kernel[(cdiv(R, BR), cdiv(C, BC))](
        q, s2, out, R, C, q.stride(0), s2.stride(0), s2.stride(1), out.stride(0), br, bc,
        BLOCK_R=BR, BLOCK_C=BC, num_warps=1 if cm.kernels_interpreted() else 4)
    return out


def _scale_strides(scale: torch.Tensor, block_scaled: bool) -> tuple[int, int]:
    if block_scaled:
        return scale.stride(0), scale.stride(1)
    if scale.numel() == 1:
        return 0, 0
    return (scale.stride(0) if scale.dim() >= 1 else 0), 0


def launch_fp8_gemm(a, a_scale, b, b_scale, block_scaled, bias, activation, gate, residual, out_dtype):
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
    config = None if cm.kernels_interpreted() else cm.launch_config("fp8", "gemm", a.device, m=M, n=N, k=K,
                                                                       block_scaled=bool(block_scaled))
    launch_gemm(_fp8_gemm_kernel, _fp8_gemm_tuned, M, N, args, flags, cm.kernels_interpreted(), config)
    return out
