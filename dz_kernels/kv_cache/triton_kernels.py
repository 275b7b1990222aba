"""Triton kernels of the KV cache: the fused projection epilogue and the plain cache write.

`_qk_norm_rope_kv_kernel` -- per token row (b, l) (a program takes BLOCK_R rows), after one layer's q/k/v
projections:
    q_rot[b, l]          = rope(rmsnorm(q[b, l], wq))                         (output, [B, L, H, D])
    k_cache[b, pos + l]  = rope(rmsnorm(k[b, l], wk))                         (into its cache row)
    v_cache[b, pos + l]  = v[b, l]
RMSNorm runs over the full hidden size C = H * D (Wan normalizes q and k before the head split); RoPE rotates the
adjacent pairs (x[2i], x[2i+1]) of each head by the token's angles (cos/sin [L, D/2] fp32: 3D for video tokens,
1D for action/state tokens, as the layout's tables give them). `pos` is read from a one-element int32 device
tensor, so the launch does not depend on its value and a captured CUDA graph stays valid when it advances.
With an FP8 (E4M3) cache the rotated keys and the values are quantized per (token, head): scale = max(amax,
1e-12) / 448 into k_scale/v_scale [B, T, H] fp32 and e4m3(clamp(x / scale, +-448)) into the cache.

Numerics follow the unfused chain (reference.py: RMSNorm then RoPE) rounding for rounding: math in fp32; the
normalized value is rounded to the activation dtype before the weight multiply (Wan's `.type_as(x) * weight`), the
product is rounded again when the weight has the activation dtype, the rotation runs in fp32 and its result is
rounded to the activation dtype, which the FP8 quantization then reads. The row's 1/sqrt uses IEEE division and
square root (div_rn, sqrt_rn), like torch and like the CUDA version in csrc/qk_norm_rope.cu. The kernel is compiled
without FMA contraction (enable_fp_fusion=False), so `x0 * c - x1 * s` rounds both products as torch does: with a
fused multiply-add a result near zero (the products nearly cancel) can come out with the other sign, a large
difference after the FP8 scaling. What remains is the order of the sum of squares (one fp32 rounding of rstd).
Every rounding to a storage format is done by hand (dz_kernels._common), the same on the GPU and the interpreter.

`_kv_write_kernel` -- the cache write alone, for keys that are already normalized and rotated (the model's
reference path calls `cache.extend(layer, k_rot, v, layout)`): converts, or quantizes to FP8 the same way.

Launchers here do no checking; dz_kernels.kv_cache.ops checks every argument and owns the custom ops.
"""
from __future__ import annotations

import torch

import triton
import triton.language as tl

from .._common import (FP8_AMAX_FLOOR, FP8_DTYPE, cast_rne, cdiv, fp8_scale_tl, kernels_interpreted, nan_amax,
                       next_pow2, round_to)

__all__ = ["launch_qk_norm_rope_kv", "launch_kv_write"]


@triton.jit
def _rms_norm_heads(ROW, W, col, mask, C, eps, DT: tl.constexpr, ROUND_W: tl.constexpr):
    """Wan's RMSNorm of rows of C (x at ROW + col: a [BLOCK_R, BLOCK_H, BLOCK_D] tile of whole heads, contiguous
    along D so the loads are vectors) with weight W, rounded as the chain rounds it (to DT after the normalization,
    and after the weight when ROUND_W). fp32."""
    x = tl.load(ROW + col, mask=mask, other=0.0).to(tl.float32)
    ss = tl.sum(tl.sum(x * x, axis=2), axis=1)
    rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.math.div_rn(ss, C * 1.0) + eps))[:, None, None]
    y = round_to(x * rstd, DT) * tl.load(W + col, mask=mask, other=0.0).to(tl.float32)
    if ROUND_W:
        y = round_to(y, DT)
    return y


@triton.jit
def _rope(y, c, s, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    """Rotate the adjacent pairs (y[2i], y[2i+1]) of each head of a [BLOCK_R, BLOCK_H, 2 * BLOCK_P] tile by the
    angles (c, s) [BLOCK_R, 1, BLOCK_P]: the pairs are split out of the contiguous tile in registers (no strided
    loads), rotated in fp32 (each product rounded: the kernel runs without FMA contraction), joined back."""
    ye, yo = tl.split(tl.reshape(y, (BLOCK_R, BLOCK_H, BLOCK_P, 2)))
    return tl.reshape(tl.join(ye * c - yo * s, ye * s + yo * c), (BLOCK_R, BLOCK_H, 2 * BLOCK_P))


@triton.jit
def _head_amax(x, mask):
    """Per (row, head) max |x| of a [BLOCK_R, BLOCK_H, BLOCK_D] tile -> [BLOCK_R, BLOCK_H]; NaN when the head holds
    a NaN (lanes outside the mask count as 0)."""
    return nan_amax(tl.where(mask, x, 0.0), 2)


@triton.jit
def _qk_norm_rope_kv_kernel(
    Q, sqb, sql,
    K, skb, skl,
    V, svb, svl,
    WQ, WK,
    COS, scos, SIN, ssin,
    QO,
    KC, VC, scb, sct,
    KS, VS, ssb, sst,
    POS,
    N, L, T, H, D, C, eps, amax_floor,
    ROUND_W: tl.constexpr, FP8: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # a program owns BLOCK_R token rows (r = b * L + l) as a [BLOCK_R, BLOCK_H, BLOCK_D] tile of whole heads
    BLOCK_P: tl.constexpr = BLOCK_D // 2
    rv = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r = rv[:, None, None]
    b = r // L
    l = r - b * L
    hv = tl.arange(0, BLOCK_H)
    h = hv[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    mask = (r < N) & (h < H) & (d < D)
    col = h * D + d                           # offsets inside a row of C = H * D
    DT = QO.dtype.element_ty                  # the activation dtype (q_rot has q's dtype)

    pos = tl.load(POS).to(tl.int64)
    ok = (pos >= 0) & (pos + L <= T)          # out of range: write no cache row (the host raises before that)
    wmask = tl.where(ok, mask, False)         # (where, not &: the interpreter mistypes bool & loaded scalar)
    crow = b * scb + (pos + l) * sct + col    # each token's row in the cache
    r2 = rv[:, None]
    b2 = r2 // L
    srow = b2 * ssb + (pos + r2 - b2 * L) * sst + hv[None, :]     # [BLOCK_R, BLOCK_H] scale offsets
    smask = tl.where(ok, (r2 < N) & (hv[None, :] < H), False)

    p = tl.arange(0, BLOCK_P)[None, None, :]
    cmask = (r < N) & (p < D // 2)
    c = tl.load(COS + l * scos + p, mask=cmask, other=0.0)
    s = tl.load(SIN + l * ssin + p, mask=cmask, other=0.0)

    # ---- q: RMSNorm over C, weight, RoPE -> q_rot
    y = _rms_norm_heads(Q + b * sqb + l * sql, WQ, col, mask, C, eps, DT, ROUND_W)
    tl.store(QO + r * C + col, cast_rne(_rope(y, c, s, BLOCK_R, BLOCK_H, BLOCK_P), DT), mask=mask)

    # ---- k: the same, into the cache row (the rotated key rounded as the chain rounds it)
    y = _rms_norm_heads(K + b * skb + l * skl, WK, col, mask, C, eps, DT, ROUND_W)
    kr = round_to(_rope(y, c, s, BLOCK_R, BLOCK_H, BLOCK_P), DT)

    CT = KC.dtype.element_ty
    if FP8:   # one scale per (token, head) over its D values, then each value quantized with its head's scale
        ks = fp8_scale_tl(_head_amax(kr, mask), amax_floor)
        tl.store(KC + crow, cast_rne(tl.math.div_rn(kr, ks[:, :, None]), CT), mask=wmask)
        tl.store(KS + srow, ks, mask=smask)
    else:
        tl.store(KC + crow, cast_rne(kr, CT), mask=wmask)

    # ---- v: copied (or quantized) into its cache row
    v = tl.load(V + b * svb + l * svl + col, mask=mask, other=0.0).to(tl.float32)
    if FP8:
        vs = fp8_scale_tl(_head_amax(v, mask), amax_floor)
        tl.store(VC + crow, cast_rne(tl.math.div_rn(v, vs[:, :, None]), CT), mask=wmask)
        tl.store(VS + srow, vs, mask=smask)
    else:
        tl.store(VC + crow, cast_rne(v, CT), mask=wmask)


@triton.jit
def _kv_write_kernel(
    K, skb, skl, skh,
    V, svb, svl, svh,
    KC, VC, scb, sct,
    KS, VS, ssb, sst,
    POS,
    N, L, T, H, D, amax_floor,
    FP8: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rv = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r = rv[:, None, None]
    b = r // L
    l = r - b * L
    hv = tl.arange(0, BLOCK_H)
    h = hv[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    mask = (r < N) & (h < H) & (d < D)
    pos = tl.load(POS).to(tl.int64)
    ok = (pos >= 0) & (pos + L <= T)
    wmask = tl.where(ok, mask, False)         # (where, not &: the interpreter mistypes bool & loaded scalar)
    crow = b * scb + (pos + l) * sct + h * D + d
    r2 = rv[:, None]
    b2 = r2 // L
    srow = b2 * ssb + (pos + r2 - b2 * L) * sst + hv[None, :]
    smask = tl.where(ok, (r2 < N) & (hv[None, :] < H), False)
    k = tl.load(K + b * skb + l * skl + h * skh + d, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(V + b * svb + l * svl + h * svh + d, mask=mask, other=0.0).to(tl.float32)
    CT = KC.dtype.element_ty
    if FP8:
        ks = fp8_scale_tl(_head_amax(k, mask), amax_floor)
        tl.store(KC + crow, cast_rne(tl.math.div_rn(k, ks[:, :, None]), CT), mask=wmask)
        tl.store(KS + srow, ks, mask=smask)
        vs = fp8_scale_tl(_head_amax(v, mask), amax_floor)
        tl.store(VC + crow, cast_rne(tl.math.div_rn(v, vs[:, :, None]), CT), mask=wmask)
        tl.store(VS + srow, vs, mask=smask)
    else:
        tl.store(KC + crow, cast_rne(k, CT), mask=wmask)
        tl.store(VC + crow, cast_rne(v, CT), mask=wmask)


def _warps(elems: int) -> int:
    if elems >= 8192:
        return 8
    if elems >= 2048:
        return 4
    return 2


def _launch_params(kind: str, n_rows: int, tile: int, H: int, D: int, cache_dtype, device) -> tuple[int, int]:
    """(token rows per program, num_warps) of kernel `kind` ("epilogue" or "write") from the config table
    dz_kernels/configs/kv_cache.json: by default enough rows for a tile of about tile_elems = 4096 elements (at
    least one row: at the droid shape a row is H=40 -> 64 heads x D=128 = 8192 elements) and warps by the tile's
    size; under the interpreter up to 64 rows (its cost is per program)."""
    if kernels_interpreted():
        rows = 64
        warps = 0
    else:
        from dz_kernels import configs

        cfg = configs.lookup("kv_cache", kind, configs.arch_of(device), H=H, D=D,
                             cache=configs.dtype_name(cache_dtype)).config
        rows = int(cfg["block_rows"]) or max(1, int(cfg["tile_elems"]) // tile)
        warps = int(cfg["num_warps"])
    rows = 1 << (rows.bit_length() - 1)        # a power of two <= rows
    rows = max(1, min(next_pow2(n_rows), rows))
    return rows, (warps or _warps(rows * tile))


def _cache_launch(kind: str, N: int, H: int, D: int, k_cache, k_scale, v_scale, pos) -> tuple:
    """What both launchers pass about the cache: (grid, BLOCK_R, BLOCK_H, BLOCK_D, num_warps, fp8, k scale, v scale,
    scale batch stride, scale token stride); without FP8 the scale pointers are dummies (pos), never dereferenced."""
    fp8 = k_cache.dtype == FP8_DTYPE
    block_h, block_d = next_pow2(H), next_pow2(D)
    block_r, warps = _launch_params(kind, N, block_h * block_d, H, D, k_cache.dtype, k_cache.device)
    ks, vs = (k_scale, v_scale) if fp8 else (pos, pos)
    ssb, sst = (k_scale.stride(0), k_scale.stride(1)) if fp8 else (0, 0)
    return (cdiv(N, block_r),), block_r, block_h, block_d, warps, fp8, ks, vs, ssb, sst


def launch_qk_norm_rope_kv(q, k, v, wq, wk, eps, cos, sin, num_heads, k_cache, v_cache, k_scale, v_scale, pos,
                           q_out) -> None:
    """Launch the fused kernel (arguments already checked by ops.py). q, k, v [B, L, C] with contiguous rows;
    q_out [B, L, H, D] contiguous; caches [B, T, H, D] with contiguous [H, D] rows and equal strides."""
    B, L, C = q.shape
    N = B * L
    if N == 0:
        return
    H = num_heads
    D = C // H
    T = k_cache.shape[1]
    grid, block_r, block_h, block_d, warps, fp8, ks, vs, ssb, sst = _cache_launch("epilogue", N, H, D, k_cache,
                                                                                   k_scale, v_scale, pos)
    _qk_norm_rope_kv_kernel[grid](
        q, q.stride(0), q.stride(1),
        k, k.stride(0), k.stride(1),
        v, v.stride(0), v.stride(1),
        wq, wk,
        cos, cos.stride(0), sin, sin.stride(0),
        q_out,
        k_cache, v_cache, k_cache.stride(0), k_cache.stride(1),
        ks, vs, ssb, sst,
        pos,
        N, L, T, H, D, C, float(eps), FP8_AMAX_FLOOR,
        ROUND_W=(wq.dtype == q.dtype and q.dtype != torch.float32), FP8=fp8,
        BLOCK_R=block_r, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=warps,
        enable_fp_fusion=False,
    )


def launch_kv_write(k_new, v_new, k_cache, v_cache, k_scale, v_scale, pos) -> None:
    """Launch the cache write (arguments already checked). k_new, v_new [B, L, H, D] with contiguous D."""
    B, L, H, D = k_new.shape
    N = B * L
    if N == 0:
        return
    T = k_cache.shape[1]
    grid, block_r, block_h, block_d, warps, fp8, ks, vs, ssb, sst = _cache_launch("write", N, H, D, k_cache,
                                                                                   k_scale, v_scale, pos)
    _kv_write_kernel[grid](
        k_new, k_new.stride(0), k_new.stride(1), k_new.stride(2),
        v_new, v_new.stride(0), v_new.stride(1), v_new.stride(2),
        k_cache, v_cache, k_cache.stride(0), k_cache.stride(1),
        ks, vs, ssb, sst,
        pos,
        N, L, T, H, D, FP8_AMAX_FLOOR,
        FP8=fp8,
        BLOCK_R=block_r, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=warps,
    )
