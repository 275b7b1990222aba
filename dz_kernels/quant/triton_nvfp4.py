"""NVFP4 Triton kernels and their launchers: quantize / dequantize, the weight-only W4A16 GEMM (Hopper path) and
the W4A4 GEMM (Blackwell path). Format, bit layout and rounding: reference.py; E4M3 scales are encoded and decoded
by hand (dz_kernels/_common.py). Launchers do no checking: ops.py checks every argument and owns the custom ops.

How the GEMMs compute:
  W4A16: each weight tile is unpacked in registers: E2M1 code -> value -> times its E4M3 block scale, which is exact
    in bf16 (a 2-bit-significand value times a 4-bit-significand scale needs 5 bits; bf16 has 8, and the range
    2^-10 .. 2688 is inside bf16's and fp16's), then a bf16 (or fp16) tensor-core dot with float32 accumulation;
    the FP32 global scale multiplies the accumulator once at the end. Decode-like M (by default M <= 16; the config
    table's w4a16_path decides, ops.w4a16_path asks it) runs the split-K kernel of triton_nvfp4_splitk.py instead:
    the same products, K spread over many programs so the 4-bit weight streams through every multiprocessor once.
    Large M (by default M > 16) dequantizes the weight (E2M1 times its block scale, exact in bf16) once per call
    and runs torch's dense GEMM with float32 output, then one pass applies the global scale and the epilogue
    ("dequant": the same products and float32 accumulation, cuBLAS's tensor-core GEMM on a GPU).
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

import torch

import triton
import triton.language as tl

from .._common import cast_rne, cdiv, e4m3_bits, e4m3_round, e4m3_value, nan_amax
from . import _common as cm
from .reference import NVFP4_BLOCK
from .triton_common import (
    _e2m1_decode, _e2m1_encode, _epilogue_store, _grouped_pid, _scale_per_byte, _unpack_tile, _w4a16_tile_dot, activation_code,
    launch_gemm,
)
from .triton_nvfp4_splitk import launch_scaled_epilogue, launch_w4a16_splitk

__all__ = ["launch_nvfp4_quant", "launch_nvfp4_dequant", "launch_w4a16", "launch_w4a4", "dot_scaled_available"]


# ----------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _nvfp4_quant_kernel(X, G, Q, S, R, C, stride_xr, stride_qr, stride_sr,
                        BLOCK_R: tl.constexpr, NB: tl.constexpr):
    """A [BLOCK_R, NB*16] tile: NB blocks of 16 per row, read contiguously (vector loads on the GPU) and split in
    registers into even/odd halves [BLOCK_R, NB, 8], so that the low nibble (even element) and high nibble (odd
    element) of each output byte are at hand."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    blk = tl.program_id(1) * NB + tl.arange(0, NB)
    j = tl.arange(0, 8)
    m2 = (rows < R)[:, None] & (blk < C // 16)[None, :]
    m3 = m2[:, :, None] & (j < 8)[None, None, :]
    r64 = rows.to(tl.int64)
    e = tl.arange(0, 16)
    m16 = m2[:, :, None] & (e < 16)[None, None, :]
    x = tl.load(X + r64[:, None, None] * stride_xr + blk[None, :, None] * 16 + e[None, None, :], mask=m16,
                other=0.0).to(tl.float32)
    xe, xo = tl.split(tl.reshape(x, (BLOCK_R, NB, 8, 2)))
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
    # the even (low nibble) and odd (high nibble) values joined in registers: one contiguous store of 16 per block
    vals = tl.reshape(tl.join(_e2m1_decode(p) * bs, _e2m1_decode(p >> 4) * bs), (BLOCK_R, NB, 16))
    e = tl.arange(0, 16)
    tl.store(O + r64[:, None, None] * stride_or + blk[None, :, None] * 16 + e[None, None, :],
             cast_rne(vals, O.dtype.element_ty), mask=m2[:, :, None] & (e < 16)[None, None, :])


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
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_rows = offs_n.to(tl.int64)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & kmask[None, :], other=0.0)
        acc = _w4a16_tile_dot(acc, x, W, WS, w_rows, stride_wn, stride_wsn, mask_n, k0 // 2, K // 2,
                              BLOCK_N, BLOCK_K, INTERPRET)
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
            a_s = _scale_per_byte(AS, a_rows, stride_asm, mask_m, k0 // 2, K // 2, BLOCK_M, BLOCK_K)
            w_s = _scale_per_byte(WS, w_rows, stride_wsn, mask_n, k0 // 2, K // 2, BLOCK_N, BLOCK_K)
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
# Tiles for sm_90 that compile without register spills with triton 3.6 and 3.9 (tests/aot_capture.py): 128 x 256 x 64
# on 8 warps and 64 x 128 x 128 on 4 warps spilled 16 bytes a thread with 3.6 (in-register dequantization of the
# weight tile beside the accumulator), 16 x 128 x 128 on 4 warps 576 bytes with 3.9; replaced by 64 x 256 x 64,
# 64 x 128 x 64 and the 16-row tile on 8 warps.
_W4A16_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 1}, num_warps=8, num_stages=4),
]
# W4A4: BLOCK_K a multiple of 64 so the packed K tile is >= 32 bytes for dot_scaled. The dot_scaled tiles (Blackwell:
# the accumulator lives in tensor memory) and the Hopper emulation's (both operands dequantized in registers: its
# Blackwell tiles spilled 20 B to 11 KB a thread on sm_90; these compile without a spill with triton 3.6 and 3.9) are
# separate lists.
_W4A4_DOT_SCALED = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 256, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 256, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
_W4A4_EMULATED = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
]


def _w4a4_configs(configs, named_args, **kwargs):
    """The W4A4 autotuner's candidates for one launch: the dot_scaled list or the emulation's."""
    return _W4A4_DOT_SCALED if kwargs.get("USE_DOT_SCALED", named_args.get("USE_DOT_SCALED")) else _W4A4_EMULATED


_w4a16_tuned = triton.autotune(configs=_W4A16_CONFIGS, key=_EPI_KEYS)(_nvfp4_w4a16_kernel)
_w4a4_tuned = triton.autotune(configs=_W4A4_DOT_SCALED + _W4A4_EMULATED, key=_EPI_KEYS + ["USE_DOT_SCALED"],
                              prune_configs_by={"early_config_prune": _w4a4_configs})(_nvfp4_w4a4_kernel)


def dot_scaled_available(device) -> bool:
    """True on a Blackwell data-center GPU (compute capability 10.x), where tl.dot_scaled maps NVFP4 to the
    block-scaled tensor-core MMA."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] == 10


# ---------------------------------------------------------------------------------------------------------- launchers
def launch_nvfp4_quant(x2: torch.Tensor, g: torch.Tensor):
    R, C = x2.shape
    q = cm.empty((R, C // 2), torch.uint8, x2.device)
    s = cm.empty((R, C // NVFP4_BLOCK), cm.FP8_DTYPE, x2.device)
    if R and C:
        BR, NB = (4, 2) if cm.kernels_interpreted() else (16, 8)
        _nvfp4_quant_kernel[(cdiv(R, BR), cdiv(C // NVFP4_BLOCK, NB))](
            x2, g, q, s, R, C, x2.stride(0), q.stride(0), s.stride(0),
            BLOCK_R=BR, NB=NB, num_warps=1 if cm.kernels_interpreted() else 4)
    return q, s


def launch_nvfp4_dequant(q, s, g, out_dtype):
    R, C = q.shape[0], 2 * q.shape[1]
    out = cm.empty((R, C), out_dtype, q.device)
    if R and C:
        BR, NB = (4, 2) if cm.kernels_interpreted() else (16, 8)
        _nvfp4_dequant_kernel[(cdiv(R, BR), cdiv(C // NVFP4_BLOCK, NB))](
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


def launch_w4a16(x, w, ws, wg, bias, activation, gate, residual, out_dtype, path: str = "tiled"):
    """The W4A16 GEMM on `path` (ops.W4A16_PATHS: "splitk", "tiled" or "dequant"; ops.w4a16_path picks it)."""
    M, K = x.shape
    N = w.shape[0]
    out = cm.empty((M, N), out_dtype, x.device)
    if M == 0 or N == 0:
        return out
    epilogue, has_gate, has_res = _epilogue_args(out, gate, residual, M, N)
    if x.dtype == torch.float32:  # 16-bit activations: the tensor-core dot takes bf16 (documented in nvfp4_linear)
        x = x.to(torch.bfloat16)
    act = activation_code(activation)
    if path == "dequant":
        # e2m1 * block scale is exact in bf16/fp16; the global scale joins in float32 after the GEMM
        wd = launch_nvfp4_dequant(w, ws, torch.ones((), dtype=torch.float32, device=w.device), x.dtype)
        launch_scaled_epilogue(_mm_f32(x, wd), wg, bias, act, epilogue, has_gate, has_res, out)
        return out
    if path == "splitk":
        config = cm.launch_config("nvfp4", "splitk", x.device, m=M, n=N, k=K)
        if cm.kernels_interpreted():  # small tiles: several N blocks, K slices and a ragged last slice at test sizes
            config = dict(config, BLOCK_N=min(int(config["BLOCK_N"]), 32), BLOCK_K=min(int(config["BLOCK_K"]), 64),
                          SPLIT_K=int(config["SPLIT_K"]) or 3)
        launch_w4a16_splitk(x, w, ws, wg, bias, act, epilogue, has_gate, has_res, out, config)
        return out
    G, sgm, sgn, Rz, srm, srn = epilogue
    args = (x, w, ws, wg, bias if bias is not None else out, G, Rz, out, M, N, K,
            x.stride(0), w.stride(0), ws.stride(0), sgm, sgn, srm, srn, out.stride(0))
    flags = dict(HAS_BIAS=bias is not None, ACT=act, HAS_GATE=has_gate, HAS_RES=has_res,
                 INTERPRET=cm.kernels_interpreted())
    config = None if cm.kernels_interpreted() else cm.launch_config("nvfp4", "w4a16", x.device, m=M, n=N, k=K)
    launch_gemm(_nvfp4_w4a16_kernel, _w4a16_tuned, M, N, args, flags, cm.kernels_interpreted(), config)
    return out


_MM_OUT_DTYPE: list = []   # whether torch.mm(..., out_dtype=float32) runs here (found on the first CUDA call)


def _mm_f32(x: torch.Tensor, wd: torch.Tensor) -> torch.Tensor:
    """x @ wd^T with float32 accumulation and a float32 result: torch.mm(out_dtype=float32) on CUDA (cuBLAS, 16-bit
    operands), float32 operands elsewhere (exact products of 16-bit values); where this torch has no float32 output
    for 16-bit operands, its 16-bit linear (the product then rounded once to x's dtype)."""
    if not x.is_cuda:
        return torch.nn.functional.linear(x.float(), wd.float())
    if not _MM_OUT_DTYPE:
        try:
            torch.mm(x[:1], wd[:1].t(), out_dtype=torch.float32)
            _MM_OUT_DTYPE.append(True)
        except (NotImplementedError, RuntimeError, TypeError):
            _MM_OUT_DTYPE.append(False)
    if _MM_OUT_DTYPE[0]:
        return torch.mm(x, wd.t(), out_dtype=torch.float32)
    return torch.nn.functional.linear(x, wd)


def launch_w4a4(a, a_s, ag, w, ws, wg, bias, activation, gate, residual, out_dtype, use_dot_scaled):
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
    config = None if cm.kernels_interpreted() else cm.launch_config("nvfp4", "w4a4", a.device, m=M, n=N, k=K,
                                                                       dot_scaled=bool(use_dot_scaled))
    launch_gemm(_nvfp4_w4a4_kernel, _w4a4_tuned, M, N, args, flags, cm.kernels_interpreted(), config)
    return out
