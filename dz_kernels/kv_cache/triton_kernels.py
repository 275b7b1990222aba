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

Numerics follow the unfused chain (dreamzero.backend.rms_norm then apply_rope) rounding for rounding: math in fp32;
the normalized value is rounded to the activation dtype before the weight multiply (Wan's `.type_as(x) * weight`),
the product is rounded again when the weight has the activation dtype, the rotation runs in fp32 and its result is
rounded to the activation dtype, which the FP8 quantization then reads. The row's 1/sqrt uses IEEE division and
square root (div_rn, sqrt_rn), like torch and like the CUDA version in csrc/qk_norm_rope.cu; remaining differences
are fp32 contraction (FMA) in the rotation: within one rounding of the output dtype.

`_kv_write_kernel` -- the cache write alone, for keys that are already normalized and rotated (the model's
reference path calls `cache.extend(layer, k_rot, v, layout)`): converts, or quantizes to FP8 the same way.

Launchers here do no checking; dz_kernels.kv_cache.ops checks every argument and owns the custom ops.
"""
from __future__ import annotations

import os

import torch

import triton
import triton.language as tl

from .reference import FP8_AMAX_FLOOR, FP8_DTYPE

__all__ = ["launch_qk_norm_rope_kv", "launch_kv_write"]


@triton.jit
def _round_e4m3(x):
    """x (fp32, |x| <= 448) rounded to the nearest E4M3 value, ties to even, in fp32 arithmetic: the ulp is
    2^(exponent - 3) (2^-9 below the smallest normal 2^-6), and adding then subtracting 1.5 * 2^23 rounds x / ulp
    to an integer. Used under the Triton interpreter only, whose fp32 -> float8e4nv cast rounds wrongly (31 -> 16,
    127 -> 64); on the GPU the hardware conversion does the same rounding."""
    bits = x.to(tl.int32, bitcast=True)
    e = (bits >> 23) & 0xFF
    ulp = ((tl.maximum(e, 121) - 3) << 23).to(tl.float32, bitcast=True)
    r = ((x / ulp + 12582912.0) - 12582912.0) * ulp
    return tl.where(x < 0, -tl.abs(r), r)     # keep the sign of a zero result


@triton.jit
def _rne_bf16(x):
    """fp32 -> the nearest bfloat16 value (ties to even), as fp32: round the low 16 bits away."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _rne_fp16(x):
    """fp32 (|x| <= 65504) -> the nearest float16 value (ties to even), as fp32 (ulp 2^(e-10), 2^-24 below 2^-14)."""
    bits = x.to(tl.int32, bitcast=True)
    e = (bits >> 23) & 0xFF
    ulp = ((tl.maximum(e, 113) - 10) << 23).to(tl.float32, bitcast=True)
    r = ((x / ulp + 12582912.0) - 12582912.0) * ulp
    return tl.where(x < 0, -tl.abs(r), r)


@triton.jit
def _round(x, DT: tl.constexpr, FIX: tl.constexpr):
    """x (fp32) rounded to DT, returned as fp32. FIX = 1 (bf16) / 2 (fp16) rounds by hand: the interpreter's
    casts do not round to nearest (bf16 truncates, an fp16 cast in registers does not round at all); 0 casts."""
    if FIX == 1:
        return _rne_bf16(x)
    elif FIX == 2:
        return _rne_fp16(x)
    else:
        return x.to(DT).to(tl.float32)


@triton.jit
def _cast(x, DT: tl.constexpr, FIX: tl.constexpr):
    """x (fp32) converted to DT with round-to-nearest-even (see _round); the cast after a hand rounding is exact."""
    if FIX == 0:
        return x.to(DT)
    else:
        return _round(x, DT, FIX).to(DT)


@triton.jit
def _rms_norm_pairs(ROW, W, even, odd, mask, C, eps, DT: tl.constexpr, ACT_FIX: tl.constexpr,
                    ROUND_W: tl.constexpr):
    """Wan's RMSNorm of rows of C (x at ROW + even/odd offsets: the pairs rotated by RoPE) with weight W, rounded
    as the chain rounds it (to DT after the normalization, and after the weight when ROUND_W). fp32 (even, odd)."""
    xe = tl.load(ROW + even, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(ROW + odd, mask=mask, other=0.0).to(tl.float32)
    ss = tl.sum(tl.sum(xe * xe + xo * xo, axis=2), axis=1)
    rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.math.div_rn(ss, C * 1.0) + eps))[:, None, None]
    we = tl.load(W + even, mask=mask, other=0.0).to(tl.float32)
    wo = tl.load(W + odd, mask=mask, other=0.0).to(tl.float32)
    ye = _round(xe * rstd, DT, ACT_FIX) * we
    yo = _round(xo * rstd, DT, ACT_FIX) * wo
    if ROUND_W:
        ye = _round(ye, DT, ACT_FIX)
        yo = _round(yo, DT, ACT_FIX)
    return ye, yo


@triton.jit
def _e4m3(x, INTERPRET: tl.constexpr):
    """Clamp to +-448 and round to E4M3 (returns fp32 holding an exact E4M3 value under the interpreter)."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    if INTERPRET:
        x = _round_e4m3(x)
    return x


@triton.jit
def _quantize_store(x, mask, wmask, C_PTR, amax_floor, INTERPRET: tl.constexpr):
    """Quantize x [BLOCK_R, BLOCK_H, BLOCK_D] (fp32, the value in the compute dtype) per (row, head), store it at
    the pointers C_PTR where wmask holds, and return the scales [BLOCK_R, BLOCK_H]."""
    amax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=2)
    scale = tl.math.div_rn(tl.maximum(amax, amax_floor), 448.0)
    qx = _e4m3(tl.math.div_rn(x, scale[:, :, None]), INTERPRET)
    tl.store(C_PTR, qx.to(C_PTR.dtype.element_ty), mask=wmask)
    return scale


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
    ROUND_W: tl.constexpr, FP8: tl.constexpr, INTERPRET: tl.constexpr, ACT_FIX: tl.constexpr, CACHE_FIX: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # a program owns BLOCK_R token rows (r = b * L + l) as a [BLOCK_R, BLOCK_H, BLOCK_P] tile of head pairs
    rv = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r = rv[:, None, None]
    b = r // L
    l = r - b * L
    hv = tl.arange(0, BLOCK_H)
    h = hv[None, :, None]
    p = tl.arange(0, BLOCK_P)[None, None, :]
    half = D // 2
    mask = (r < N) & (h < H) & (p < half)
    even = h * D + 2 * p                      # offsets of x[2i] inside a row of C; x[2i+1] is even + 1
    odd = even + 1
    DT = QO.dtype.element_ty                  # the activation dtype (q_rot has q's dtype)

    pos = tl.load(POS).to(tl.int64)
    ok = (pos >= 0) & (pos + L <= T)          # out of range: write no cache row (the host raises before that)
    wmask = tl.where(ok, mask, False)         # (where, not &: the interpreter mistypes bool & loaded scalar)
    crow = b * scb + (pos + l) * sct          # each token's row in the cache
    r2 = rv[:, None]
    b2 = r2 // L
    srow = b2 * ssb + (pos + r2 - b2 * L) * sst + hv[None, :]     # [BLOCK_R, BLOCK_H] scale offsets
    smask = tl.where(ok, (r2 < N) & (hv[None, :] < H), False)

    cmask = (r < N) & (p < half)
    c = tl.load(COS + l * scos + p, mask=cmask, other=0.0)
    s = tl.load(SIN + l * ssin + p, mask=cmask, other=0.0)

    # ---- q: RMSNorm over C, weight, RoPE -> q_rot
    ye, yo = _rms_norm_pairs(Q + b * sqb + l * sql, WQ, even, odd, mask, C, eps, DT, ACT_FIX, ROUND_W)
    tl.store(QO + r * C + even, _cast(ye * c - yo * s, DT, ACT_FIX), mask=mask)
    tl.store(QO + r * C + odd, _cast(ye * s + yo * c, DT, ACT_FIX), mask=mask)

    # ---- k: the same, into the cache row
    ye, yo = _rms_norm_pairs(K + b * skb + l * skl, WK, even, odd, mask, C, eps, DT, ACT_FIX, ROUND_W)
    re = _round(ye * c - yo * s, DT, ACT_FIX)      # the rotated key as the chain rounds it
    ro = _round(ye * s + yo * c, DT, ACT_FIX)

    ve = tl.load(V + b * svb + l * svl + even, mask=mask, other=0.0).to(tl.float32)
    vo = tl.load(V + b * svb + l * svl + odd, mask=mask, other=0.0).to(tl.float32)

    if FP8:
        # per-(token, head) amax over both elements of the pairs, then quantize each with the head's scale
        amax = tl.max(tl.where(mask, tl.maximum(tl.abs(re), tl.abs(ro)), 0.0), axis=2)
        ks = tl.math.div_rn(tl.maximum(amax, amax_floor), 448.0)
        tl.store(KC + crow + even, _e4m3(tl.math.div_rn(re, ks[:, :, None]), INTERPRET)
                 .to(KC.dtype.element_ty), mask=wmask)
        tl.store(KC + crow + odd, _e4m3(tl.math.div_rn(ro, ks[:, :, None]), INTERPRET)
                 .to(KC.dtype.element_ty), mask=wmask)
        tl.store(KS + srow, ks, mask=smask)
        amax = tl.max(tl.where(mask, tl.maximum(tl.abs(ve), tl.abs(vo)), 0.0), axis=2)
        vs = tl.math.div_rn(tl.maximum(amax, amax_floor), 448.0)
        tl.store(VC + crow + even, _e4m3(tl.math.div_rn(ve, vs[:, :, None]), INTERPRET)
                 .to(VC.dtype.element_ty), mask=wmask)
        tl.store(VC + crow + odd, _e4m3(tl.math.div_rn(vo, vs[:, :, None]), INTERPRET)
                 .to(VC.dtype.element_ty), mask=wmask)
        tl.store(VS + srow, vs, mask=smask)
    else:
        tl.store(KC + crow + even, _cast(re, KC.dtype.element_ty, CACHE_FIX), mask=wmask)
        tl.store(KC + crow + odd, _cast(ro, KC.dtype.element_ty, CACHE_FIX), mask=wmask)
        tl.store(VC + crow + even, _cast(ve, VC.dtype.element_ty, CACHE_FIX), mask=wmask)
        tl.store(VC + crow + odd, _cast(vo, VC.dtype.element_ty, CACHE_FIX), mask=wmask)


@triton.jit
def _kv_write_kernel(
    K, skb, skl, skh,
    V, svb, svl, svh,
    KC, VC, scb, sct,
    KS, VS, ssb, sst,
    POS,
    N, L, T, H, D, amax_floor,
    FP8: tl.constexpr, INTERPRET: tl.constexpr, CACHE_FIX: tl.constexpr,
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
    if FP8:
        ks = _quantize_store(k, mask, wmask, KC + crow, amax_floor, INTERPRET)
        tl.store(KS + srow, ks, mask=smask)
        vs = _quantize_store(v, mask, wmask, VC + crow, amax_floor, INTERPRET)
        tl.store(VS + srow, vs, mask=smask)
    else:
        tl.store(KC + crow, _cast(k, KC.dtype.element_ty, CACHE_FIX), mask=wmask)
        tl.store(VC + crow, _cast(v, VC.dtype.element_ty, CACHE_FIX), mask=wmask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _fix(dtype: torch.dtype) -> int:
    """Hand rounding mode of _round/_cast: only under the interpreter, 1 for bfloat16, 2 for float16."""
    if not _interpreting():
        return 0
    return {torch.bfloat16: 1, torch.float16: 2}.get(dtype, 0)


def _warps(elems: int) -> int:
    if elems >= 8192:
        return 8
    if elems >= 2048:
        return 4
    return 2


def _launch_params(kind: str, n_rows: int, tile: int, H: int, D: int, cache_dtype, device) -> tuple[int, int]:
    """(token rows per program, num_warps) of kernel `kind` ("epilogue" or "write") from the config table
    dz_kernels/configs/kv_cache.json: by default enough rows for a tile of about tile_elems = 4096 elements (one
    row at the droid shape, H=40 x D/2=64 -> 64 x 64) and warps by the tile's size; under the interpreter up to 64
    rows (its cost is per program)."""
    if _interpreting():
        rows = 64
        warps = 0
    else:
        from dz_kernels import configs

        cfg = configs.lookup("kv_cache", kind, configs.arch_of(device), H=H, D=D,
                             cache=configs.dtype_name(cache_dtype)).config
        rows = int(cfg["block_rows"]) or max(1, int(cfg["tile_elems"]) // tile)
        warps = int(cfg["num_warps"])
    rows = 1 << (rows.bit_length() - 1)        # a power of two <= rows
    rows = max(1, min(triton.next_power_of_2(n_rows), rows))
    return rows, (warps or _warps(rows * tile))


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
    fp8 = k_cache.dtype == FP8_DTYPE
    block_h = triton.next_power_of_2(H)
    block_p = triton.next_power_of_2(D // 2)
    block_r, warps = _launch_params("epilogue", N, block_h * block_p, H, D, k_cache.dtype, q.device)
    ks, vs = (k_scale, v_scale) if fp8 else (pos, pos)     # dummies: never dereferenced without FP8
    ssb, sst = (k_scale.stride(0), k_scale.stride(1)) if fp8 else (0, 0)
    _qk_norm_rope_kv_kernel[(triton.cdiv(N, block_r),)](
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
        ROUND_W=(wq.dtype == q.dtype and q.dtype != torch.float32), FP8=fp8, INTERPRET=_interpreting(),
        ACT_FIX=_fix(q.dtype), CACHE_FIX=_fix(k_cache.dtype),
        BLOCK_R=block_r, BLOCK_H=block_h, BLOCK_P=block_p, num_warps=warps,
    )


def launch_kv_write(k_new, v_new, k_cache, v_cache, k_scale, v_scale, pos) -> None:
    """Launch the cache write (arguments already checked). k_new, v_new [B, L, H, D] with contiguous D."""
    B, L, H, D = k_new.shape
    N = B * L
    if N == 0:
        return
    T = k_cache.shape[1]
    fp8 = k_cache.dtype == FP8_DTYPE
    block_h = triton.next_power_of_2(H)
    block_d = triton.next_power_of_2(D)
    block_r, warps = _launch_params("write", N, block_h * block_d, H, D, k_cache.dtype, k_new.device)
    ks, vs = (k_scale, v_scale) if fp8 else (pos, pos)
    ssb, sst = (k_scale.stride(0), k_scale.stride(1)) if fp8 else (0, 0)
    _kv_write_kernel[(triton.cdiv(N, block_r),)](
        k_new, k_new.stride(0), k_new.stride(1), k_new.stride(2),
        v_new, v_new.stride(0), v_new.stride(1), v_new.stride(2),
        k_cache, v_cache, k_cache.stride(0), k_cache.stride(1),
        ks, vs, ssb, sst,
        pos,
        N, L, T, H, D, FP8_AMAX_FLOOR,
        FP8=fp8, INTERPRET=_interpreting(), CACHE_FIX=_fix(k_cache.dtype),
        BLOCK_R=block_r, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=warps,
    )
