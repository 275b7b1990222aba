"""The backward of layout attention: the Triton kernels (FlashAttention-2 style) and their launcher.

1. `_bwd_preprocess_kernel`: delta = rowsum(dO * O) - dlse (fp32 [B, H, Lq]); dlse is the incoming gradient of the
   log-sum-exp output (zero when only the attention output is used); and the query rows' non-finite flags (int8
   [B * H, Lq]: bit 0 q, bit 1 dO).
2. `_bwd_dkdv_kernel`: one program per (key tile, batch x head) walks the query tiles that see the key tile (the
   key-side schedule) and accumulates dK and dV in fp32 registers. With ATOMIC_DQ it also adds each tile's dQ
   contribution into an fp32 buffer with atomics (fast, not bitwise reproducible); without, it writes the key rows'
   non-finite flags (int8 [B * H, Lk]) for the dq kernel.
3. `_bwd_dq_kernel`: one program per (query tile, batch x head) walks the key tiles of the query-side schedule and
   accumulates dQ in registers: no atomics, bitwise deterministic (used when deterministic=True).
Probabilities are recomputed from the saved lse: p = exp2(s * scale * log2(e) - lse * log2(e)).
Partially visible tiles keep masked pairs out of every product (see triton_common.py): dS is set to 0 outside the
mask, and the rows of q, k and dO that meet masked zeros in a dot are loaded (or, k in the dk/dv kernel, set) as
zeros when their flag says they are not finite; a key whose dV really meets a non-finite dO row, and a query whose
dQ really meets a non-finite key, get NaN.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import cdiv, empty, kernels_interpreted
from .config import FLAG_HEADS_FIRST
from .schedule import nwin
from .triton_common import (LOG2E, _dot, _load_rows, _nonfinite, _program_row, _store_rows, _tile_mask, grid,
                            last_contiguous, launch_kwargs, tile_flags)


PRE_BLOCK_M = 32      # query rows per program of the preprocess (three [rows, D] tiles: o, dO, q)


@triton.jit
def _bwd_preprocess_kernel(O, DO, DLSE, DELTA, Q, Q_FLAGS, stride_ob, stride_ol, stride_oh, stride_db, stride_dl,
                           stride_dh, stride_qb, stride_ql, stride_qh, H, Lq,
                           HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    o = _load_rows(O + b * stride_ob + h * stride_oh, offs_m, stride_ol, m_ok, HEAD_DIM).to(tl.float32)
    do = _load_rows(DO + b * stride_db + h * stride_dh, offs_m, stride_dl, m_ok, HEAD_DIM).to(tl.float32)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_ql, m_ok, HEAD_DIM)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh.to(tl.int64) * Lq + offs_m, mask=m_ok, other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * Lq + offs_m, delta, mask=m_ok)
    flags = _nonfinite(q, 1).to(tl.int8) | (_nonfinite(do, 1).to(tl.int8) * 2)
    tl.store(Q_FLAGS + bh.to(tl.int64) * Lq + offs_m, flags, mask=m_ok)


@triton.jit
def _load_lse2(LSE, row_off, offs_m, m_ok):
    """lse in log2 units for recomputing p; rows past Lq and rows that saw nothing get +inf, so p = 0 there."""
    lse = tl.load(LSE + row_off + offs_m, mask=m_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    return lse * 1.4426950408889634


@triton.jit
def _dkdv_inner(dk, dv, k, k_bad, v, k_seg, n_ok, q_base, do_base, dq_base, stride_ql, stride_dol, stride_dql,
                LSE, DELTA, Q_FLAGS, row_off, COLS, e_start, e_end, Q_SEG, KQ_BITS, n_words, Lq, qk_scale, sm_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, NWIN: tl.constexpr,
                MASKED: tl.constexpr, ATOMIC_DQ: tl.constexpr, INTERPRET: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for e in range(e_start, e_end):
        qt = tl.load(COLS + e)
        offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Lq
        if MASKED:      # non-finite q and dO rows are loaded as zeros (they meet masked zeros in the dots)
            q_flag = tl.load(Q_FLAGS + row_off + offs_m, mask=m_ok, other=0)
            q_ok = m_ok & ((q_flag & 1) == 0)
            do_ok = m_ok & ((q_flag & 2) == 0)
        else:
            q_ok = m_ok
            do_ok = m_ok
        qT = tl.load(q_base + offs_m[None, :] * stride_ql + offs_d[:, None], mask=q_ok[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dol + offs_d[None, :], mask=do_ok[:, None], other=0.0)
        lse2 = _load_lse2(LSE, row_off, offs_m, m_ok)
        delta = tl.load(DELTA + row_off + offs_m, mask=m_ok, other=0.0)
        sT = _dot(k, qT, INTERPRET)                                   # [BLOCK_N, BLOCK_M]
        pT = tl.exp2(sT * qk_scale - lse2[None, :])
        dpT = _dot(v, tl.trans(do), INTERPRET)                         # [BLOCK_N, BLOCK_M]
        dsT = pT * (dpT - delta[None, :])
        if MASKED:
            base = tl.load(Q_SEG + qt * BLOCK_M)
            q_seg = tl.load(Q_SEG + offs_m, mask=m_ok, other=0)
            q_seg = tl.where(m_ok, q_seg, base)
            vis = _tile_mask(k_seg, q_seg, m_ok, base, KQ_BITS, n_words, BLOCK_N, BLOCK_M, NWIN) & n_ok[:, None]
            # a key whose dV meets a non-finite dO row (loaded as zeros) gets NaN through that probability
            pT = tl.where(vis, tl.where(do_ok[None, :], pT, float("nan")), 0.0)
            dsT = tl.where(vis, dsT, 0.0)
        dv += _dot(pT.to(do.dtype), do, INTERPRET)
        dk += _dot(dsT.to(qT.dtype), tl.trans(qT), INTERPRET)
        if ATOMIC_DQ:
            if MASKED:   # non-finite key rows meet masked zeros here: zeros in the dot, NaN for the queries seeing them
                k_dq = tl.where(k_bad[:, None], tl.zeros_like(k), k)
                ds_dq = tl.where(vis & k_bad[:, None], float("nan"), dsT)
                dq = _dot(tl.trans(ds_dq.to(k.dtype)), k_dq, INTERPRET) * sm_scale  # [BLOCK_M, HEAD_DIM]
            else:
                dq = _dot(tl.trans(dsT.to(k.dtype)), k, INTERPRET) * sm_scale
            tl.atomic_add(dq_base + offs_m[:, None] * stride_dql + offs_d[None, :], dq, mask=m_ok[:, None])
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, Q_SEG, K_SEG, KQ_BITS, ROWS, COLS, Q_FLAGS, K_FLAGS,
                     stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
                     stride_vb, stride_vl, stride_vh, stride_dob, stride_dol, stride_doh,
                     stride_dkb, stride_dkl, stride_dkh, stride_dvb, stride_dvl, stride_dvh,
                     stride_dqb, stride_dql, stride_dqh,
                     H, Lq, Lk, n_words, qk_scale, sm_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, NWIN: tl.constexpr,
                     ATOMIC_DQ: tl.constexpr, INTERPRET: tl.constexpr, HEADS_FIRST: tl.constexpr = False):
    bh, b, h, tile, e_start, e_mid, e_end = _program_row(ROWS, H, HEADS_FIRST)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Lk
    k = _load_rows(K + b * stride_kb + h * stride_kh, offs_n, stride_kl, n_ok, HEAD_DIM)
    v = _load_rows(V + b * stride_vb + h * stride_vh, offs_n, stride_vl, n_ok, HEAD_DIM)
    k_seg = tl.load(K_SEG + offs_n, mask=n_ok, other=0)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    dq_base = DQ_ACC + b * stride_dqb + h * stride_dqh
    row_off = bh.to(tl.int64) * Lq

    k_bad = _nonfinite(k, 1)                            # [BLOCK_N]: the key rows holding a NaN or an inf
    if not ATOMIC_DQ:                                   # for the dq kernel's partial tiles
        tl.store(K_FLAGS + bh.to(tl.int64) * Lk + offs_n, k_bad.to(tl.int8), mask=n_ok)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dk, dv = _dkdv_inner(dk, dv, k, k_bad, v, k_seg, n_ok, q_base, do_base, dq_base, stride_ql, stride_dol,
                         stride_dql, LSE, DELTA, Q_FLAGS, row_off, COLS, e_start, e_mid, Q_SEG, KQ_BITS, n_words, Lq,
                         qk_scale, sm_scale, BLOCK_M, BLOCK_N, HEAD_DIM, NWIN, False, ATOMIC_DQ, INTERPRET)
    dk, dv = _dkdv_inner(dk, dv, k, k_bad, v, k_seg, n_ok, q_base, do_base, dq_base, stride_ql, stride_dol,
                         stride_dql, LSE, DELTA, Q_FLAGS, row_off, COLS, e_mid, e_end, Q_SEG, KQ_BITS, n_words, Lq,
                         qk_scale, sm_scale, BLOCK_M, BLOCK_N, HEAD_DIM, NWIN, True, ATOMIC_DQ, INTERPRET)
    dk *= sm_scale
    _store_rows(DK + b * stride_dkb + h * stride_dkh, offs_n, stride_dkl, n_ok, dk, HEAD_DIM)
    _store_rows(DV + b * stride_dvb + h * stride_dvh, offs_n, stride_dvl, n_ok, dv, HEAD_DIM)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, q_seg, k_base, v_base, k_flags, stride_kl, stride_vl, COLS, e_start,
              e_end, K_SEG, QK_BITS, n_words, Lk, qk_scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, NWIN: tl.constexpr,
              MASKED: tl.constexpr, INTERPRET: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for e in range(e_start, e_end):
        kt = tl.load(COLS + e)
        offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
        if MASKED:      # non-finite key rows are loaded as zeros (they meet masked zeros in the dq dot)
            n_ok = offs_n < Lk
            k_flag = tl.load(k_flags + offs_n, mask=n_ok, other=0)
            kT = tl.load(k_base + offs_n[None, :] * stride_kl + offs_d[:, None], mask=(n_ok & (k_flag == 0))[None, :],
                         other=0.0)
            vT = tl.load(v_base + offs_n[None, :] * stride_vl + offs_d[:, None], mask=n_ok[None, :], other=0.0)
        else:
            kT = tl.load(k_base + offs_n[None, :] * stride_kl + offs_d[:, None])
            vT = tl.load(v_base + offs_n[None, :] * stride_vl + offs_d[:, None])
        s = _dot(q, kT, INTERPRET)
        p = tl.exp2(s * qk_scale - lse2[:, None])
        dp = _dot(do, vT, INTERPRET)
        ds = p * (dp - delta[:, None])
        if MASKED:
            base = tl.load(K_SEG + kt * BLOCK_N)
            k_seg = tl.load(K_SEG + offs_n, mask=n_ok, other=0)
            k_seg = tl.where(n_ok, k_seg, base)
            vis = _tile_mask(q_seg, k_seg, n_ok, base, QK_BITS, n_words, BLOCK_M, BLOCK_N, NWIN)
            # a query whose dQ meets a non-finite key row (loaded as zeros) gets NaN through that entry of dS
            ds = tl.where(vis, tl.where(k_flag[None, :] != 0, float("nan"), ds), 0.0)
        dq += _dot(ds.to(kT.dtype), tl.trans(kT), INTERPRET)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, Q_SEG, K_SEG, QK_BITS, ROWS, COLS, K_FLAGS,
                   stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
                   stride_vb, stride_vl, stride_vh, stride_dob, stride_dol, stride_doh,
                   stride_dqb, stride_dql, stride_dqh,
                   H, Lq, Lk, n_words, qk_scale, sm_scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, NWIN: tl.constexpr,
                   INTERPRET: tl.constexpr, HEADS_FIRST: tl.constexpr = False):
    bh, b, h, tile, e_start, e_mid, e_end = _program_row(ROWS, H, HEADS_FIRST)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_ql, m_ok, HEAD_DIM)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, stride_dol, m_ok, HEAD_DIM)
    row_off = bh.to(tl.int64) * Lq
    lse2 = _load_lse2(LSE, row_off, offs_m, m_ok)
    delta = tl.load(DELTA + row_off + offs_m, mask=m_ok, other=0.0)
    q_seg = tl.load(Q_SEG + offs_m, mask=m_ok, other=0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    k_flags = K_FLAGS + bh.to(tl.int64) * Lk           # int8 [Lk] of this (batch, head), from the dk/dv kernel

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse2, delta, q_seg, k_base, v_base, k_flags, stride_kl, stride_vl, COLS, e_start, e_mid,
                   K_SEG, QK_BITS, n_words, Lk, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, NWIN, False, INTERPRET)
    dq = _dq_inner(dq, q, do, lse2, delta, q_seg, k_base, v_base, k_flags, stride_kl, stride_vl, COLS, e_mid, e_end,
                   K_SEG, QK_BITS, n_words, Lk, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, NWIN, True, INTERPRET)
    dq *= sm_scale
    _store_rows(DQ + b * stride_dqb + h * stride_dqh, offs_m, stride_dql, m_ok, dq, HEAD_DIM)


# ---------------------------------------------------------------------- launcher
def launch_backward(dout, q, k, v, out, lse, dlse, q_seg, k_seg, qk_bits, kq_bits, dkv_rows, dkv_cols, dq_rows,
                    dq_cols, scale: float, tiles: list, deterministic: bool):
    """(dq, dk, dv), contiguous, the inputs' dtypes: delta, then dk/dv over the key-side schedule (dkv_rows,
    dkv_cols) with atomic dq, or (deterministic) without it and the dq kernel over the query-side one."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    km, kn, qm, qn = tiles[2], tiles[3], tiles[4], tiles[5]
    if dkv_rows.shape[0] != cdiv(Lk, kn):
        raise ValueError(f"dk/dv schedule has {dkv_rows.shape[0]} rows, expected {cdiv(Lk, kn)}")
    if dq_rows.shape[0] != cdiv(Lq, qm):
        raise ValueError(f"dq schedule has {dq_rows.shape[0]} rows, expected {cdiv(Lq, qm)}")
    q, k, v, out, dout = (last_contiguous(t) for t in (q, k, v, out, dout))
    lse = lse.contiguous()
    dlse = dlse.contiguous() if dlse is not None else None
    q_seg, k_seg, qk_bits, kq_bits, dkv_rows, dkv_cols, dq_rows, dq_cols = (
        t.contiguous() for t in (q_seg, k_seg, qk_bits, kq_bits, dkv_rows, dkv_cols, dq_rows, dq_cols))
    interp = kernels_interpreted()
    launch = launch_kwargs(tiles[8], tiles[9])
    launch_dq = launch_kwargs(tiles[10], tiles[11]) if len(tiles) > 11 else launch
    heads_first = bool(tile_flags(tiles) & FLAG_HEADS_FIRST)

    delta = empty((B, H, Lq), torch.float32, q.device)
    q_flags = torch.empty((B * H, Lq), dtype=torch.int8, device=q.device)     # every entry written below
    k_flags = torch.empty((B * H, Lk) if deterministic else (1,), dtype=torch.int8, device=q.device)
    _bwd_preprocess_kernel[(cdiv(Lq, PRE_BLOCK_M), B * H)](
        out, dout, dlse if dlse is not None else lse, delta, q, q_flags,
        out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        q.stride(0), q.stride(1), q.stride(2), H, Lq, HAS_DLSE=dlse is not None, BLOCK_M=PRE_BLOCK_M, HEAD_DIM=D)

    dk = empty((B, Lk, H, D), k.dtype, k.device)
    dv = empty((B, Lk, H, D), v.dtype, v.device)
    if deterministic:
        dq_acc = delta          # unused by the kernel (ATOMIC_DQ=False); any fp32 pointer will do
        dq_strides = (0, 0, 0)
    else:
        dq_acc = torch.zeros((B, Lq, H, D), dtype=torch.float32, device=q.device)
        dq_strides = (dq_acc.stride(0), dq_acc.stride(1), dq_acc.stride(2))
    _bwd_dkdv_kernel[grid(dkv_rows.shape[0], B * H, heads_first)](
        q, k, v, dout, lse, delta, dk, dv, dq_acc, q_seg, k_seg, kq_bits, dkv_rows, dkv_cols, q_flags, k_flags,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), *dq_strides,
        H, Lq, Lk, kq_bits.shape[1], scale * LOG2E, scale,
        BLOCK_M=km, BLOCK_N=kn, HEAD_DIM=D, NWIN=nwin(km, kq_bits.shape[1]), ATOMIC_DQ=not deterministic,
        INTERPRET=interp, HEADS_FIRST=heads_first, **launch)
    if deterministic:
        dq = empty((B, Lq, H, D), q.dtype, q.device)
        _bwd_dq_kernel[grid(dq_rows.shape[0], B * H, heads_first)](
            q, k, v, dout, lse, delta, dq, q_seg, k_seg, qk_bits, dq_rows, dq_cols, k_flags,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            H, Lq, Lk, qk_bits.shape[1], scale * LOG2E, scale,
            BLOCK_M=qm, BLOCK_N=qn, HEAD_DIM=D, NWIN=nwin(qn, qk_bits.shape[1]), INTERPRET=interp,
            HEADS_FIRST=heads_first, **launch_dq)
    else:
        dq = dq_acc.to(q.dtype)
    return dq, dk, dv
