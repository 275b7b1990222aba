"""Split-K weight-only NVFP4 GEMM for decode-like M (a handful of tokens): the W4A16 path where 4-bit weights pay.

At M <= 16 a W4A16 linear is memory-bound: the weight (0.5 + 1/16 byte an element with its E4M3 scales) is read
once and each element is used in at most 16 products. The tiled GEMM of triton_nvfp4.py launches one program per 128
output columns there (40 programs for N = 5120, under a third of an H100/H200's 132 multiprocessors), each walking
the whole K. This kernel splits K as well:

    grid (N / BLOCK_N, SPLIT_K, M / BLOCK_M); program (n, s, m) reads the packed weight rows of its BLOCK_N
    columns over its K slice once, unpacks each [BLOCK_N, BLOCK_K] tile in registers (E2M1 code * E4M3 block
    scale, exact in bf16), multiplies it with the activation rows [BLOCK_M, BLOCK_K] on the tensor cores (BLOCK_M =
    16, tl.dot's minimum; rows past M are masked) and writes a float32 partial [BLOCK_M, BLOCK_N];
    a second kernel sums the SPLIT_K partials in a fixed order (deterministic), multiplies the global scale once and
    applies the shared epilogue (bias, GELU-tanh, residual + gate * (.)), one rounding at the store.
    With SPLIT_K = 1 the first kernel applies the epilogue itself (no partials).

Numerics are the tiled kernel's (same products, float32 accumulation; the float32 sums are grouped per K slice).
Launch parameters come from dz_kernels/configs/nvfp4.json (kind splitk); which W4A16 kernel runs for a shape from
kind w4a16_path (ops.w4a16_path asks; triton_nvfp4.launch_w4a16 runs the path). Extra memory: SPLIT_K x M x N
float32 partials (M <= 16: at N = 13824 and SPLIT_K = 8, 7 MB, against 35 MB of packed weight).
"""
from __future__ import annotations

import torch

import triton
import triton.language as tl

from .._common import cdiv
from . import _common as cm
from .triton_common import _epilogue_store, _w4a16_tile_dot

__all__ = ["launch_w4a16_splitk", "splitk_plan", "launch_scaled_epilogue"]


@triton.jit
def _nvfp4_w4a16_splitk_kernel(X, W, WS, WG, PART, BIAS, GATE, RES, OUT, M, N, K, k_per_split,
                               stride_xm, stride_wn, stride_wsn, stride_ps, stride_pm,
                               stride_gm, stride_gn, stride_rm, stride_rn, stride_om,
                               SINGLE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                               HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr, INTERPRET: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = offs_n.to(tl.int64)[:, None]
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + offs_k
        x = tl.load(x_rows + k[None, :], mask=mask_m[:, None] & (k < k_end)[None, :], other=0.0)
        acc = _w4a16_tile_dot(acc, x, W, WS, w_rows, stride_wn, stride_wsn, mask_n, k0 // 2, k_end // 2,
                              BLOCK_N, BLOCK_K, INTERPRET)
    if SINGLE:
        acc = acc * tl.load(WG)
        _epilogue_store(acc, offs_m, offs_n, M, N, BIAS, GATE, stride_gm, stride_gn, RES, stride_rm, stride_rn,
                        OUT, stride_om, HAS_BIAS, ACT, HAS_GATE, HAS_RES)
    else:
        tl.store(PART + pid_s.to(tl.int64) * stride_ps + offs_m.to(tl.int64)[:, None] * stride_pm + offs_n[None, :],
                 acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _splitk_reduce_kernel(PART, WG, BIAS, GATE, RES, OUT, M, N, SPLIT_K, stride_ps, stride_pm,
                          stride_gm, stride_gn, stride_rm, stride_rn, stride_om,
                          HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = PART + offs_m.to(tl.int64)[:, None] * stride_pm + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(0, SPLIT_K):
        acc += tl.load(ptrs + s * stride_ps, mask=mask, other=0.0)
    acc = acc * tl.load(WG)
    _epilogue_store(acc, offs_m, offs_n, M, N, BIAS, GATE, stride_gm, stride_gn, RES, stride_rm, stride_rn,
                    OUT, stride_om, HAS_BIAS, ACT, HAS_GATE, HAS_RES)


def splitk_plan(M: int, N: int, K: int, config: dict, n_sm: int) -> tuple[int, int]:
    """(split_k, k_per_split) for a config table entry: SPLIT_K when it is > 0, else enough K slices that the grid
    holds about waves x n_sm programs; every slice a whole number of BLOCK_K steps, none empty."""
    bk = int(config["BLOCK_K"])
    k_steps = cdiv(K, bk)
    split = int(config.get("SPLIT_K", 0))
    if split <= 0:
        tiles = cdiv(N, int(config["BLOCK_N"])) * cdiv(M, int(config["BLOCK_M"]))
        split = cdiv(int(config.get("waves", 4)) * n_sm, tiles)
    split = max(1, min(split, k_steps))
    k_per_split = cdiv(k_steps, split) * bk
    return cdiv(K, k_per_split), k_per_split


def launch_w4a16_splitk(x, w, ws, wg, bias, act_code: int, epilogue: tuple, has_gate: bool, has_res: bool,
                        out: torch.Tensor, config: dict) -> None:
    """out[M, N] = epilogue(wg * (x @ (e2m1(w) * ws)^T)) with the split-K kernel; arguments checked by ops.py.
    epilogue = (gate, gate strides (2), residual, residual strides (2)) as triton_nvfp4._epilogue_args builds them."""
    M, K = x.shape
    N = w.shape[0]
    G, sgm, sgn, Rz, srm, srn = epilogue
    bm, bn, bk = int(config["BLOCK_M"]), int(config["BLOCK_N"]), int(config["BLOCK_K"])
    if bk % 16 or bk < 32:
        raise ValueError(f"nvfp4 splitk: BLOCK_K must be a multiple of 16 and at least 32, got {bk}")
    interp = cm.kernels_interpreted()
    n_sm = 1 if interp else torch.cuda.get_device_properties(x.device).multi_processor_count
    split, k_per_split = splitk_plan(M, N, K, config, n_sm)
    single = split == 1
    part = out if single else cm.empty((split, M, N), torch.float32, x.device)
    launch = {} if interp else {"num_warps": int(config["num_warps"]), "num_stages": int(config["num_stages"])}
    bias_t = bias if bias is not None else out
    grid = (cdiv(N, bn), split, cdiv(M, bm))
    _nvfp4_w4a16_splitk_kernel[grid](
        x, w, ws, wg, part, bias_t, G, Rz, out, M, N, K, k_per_split,
        x.stride(0), w.stride(0), ws.stride(0), part.stride(0) if not single else 0,
        part.stride(1) if not single else 0, sgm, sgn, srm, srn, out.stride(0),
        SINGLE=single, HAS_BIAS=bias is not None, ACT=act_code, HAS_GATE=has_gate, HAS_RES=has_res,
        INTERPRET=interp, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **launch)
    if not single:
        _launch_reduce(part, split, part.stride(0), wg, bias, act_code, epilogue, has_gate, has_res, out)


def _launch_reduce(part, split: int, stride_s: int, wg, bias, act_code: int, epilogue: tuple, has_gate: bool,
                   has_res: bool, out: torch.Tensor) -> None:
    M, N = out.shape
    G, sgm, sgn, Rz, srm, srn = epilogue
    rm, rn = 16, 128
    _splitk_reduce_kernel[(cdiv(N, rn), cdiv(M, rm))](
        part, wg, bias if bias is not None else out, G, Rz, out, M, N, split, stride_s, part.stride(-2),
        sgm, sgn, srm, srn, out.stride(0), HAS_BIAS=bias is not None, ACT=act_code, HAS_GATE=has_gate,
        HAS_RES=has_res, BLOCK_M=rm, BLOCK_N=rn, **({} if cm.kernels_interpreted() else {"num_warps": 4}))


def launch_scaled_epilogue(y: torch.Tensor, wg, bias, act_code: int, epilogue: tuple, has_gate: bool,
                           has_res: bool, out: torch.Tensor) -> None:
    """out = epilogue(wg * y) for a float32 (or 16-bit) product y [M, N] with unit column stride: one pass, one
    rounding (the W4A16 "dequant" path's global scale, bias, activation, gate and residual)."""
    _launch_reduce(y, 1, 0, wg, bias, act_code, epilogue, has_gate, has_res, out)
