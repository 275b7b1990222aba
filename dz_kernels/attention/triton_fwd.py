"""The forward of layout attention: the Triton kernel and its launcher. One program per (query tile, batch x
head), online softmax over the key tiles the schedule lists for the query tile (full tiles without a mask, then
partial tiles with the token mask).

Tensors are [B, L, H, D] with any strides except a contiguous last dim; lse is fp32 [B, H, Lq] (natural log).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import cdiv, empty, kernels_interpreted
from .config import FLAG_FWD_WS, FLAG_HEADS_FIRST
from .schedule import nwin
from .triton_common import (LOG2E, _dot, _load_rows, _program_row, _row_flags_kernel, _store_rows, _tile_mask,
                            grid, last_contiguous, launch_kwargs, tile_flags)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, q_seg, k_base, v_base, stride_kl, stride_vl, COLS, e_start, e_end,
               K_SEG, QK_BITS, V_BAD, n_words, Lk, qk_scale,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, NWIN: tl.constexpr,
               MASKED: tl.constexpr, INTERPRET: tl.constexpr, WS: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for e in tl.range(e_start, e_end, warp_specialize=WS):
        kt = tl.load(COLS + e)
        offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
        if MASKED:
            n_ok = offs_n < Lk
            # a non-finite V row must not meet a masked (0) probability in the dot: it is loaded as zeros here (its
            # flag from _row_flags_kernel), and the queries that do see it get a NaN probability for it below
            v_flag = tl.load(V_BAD + offs_n, mask=n_ok, other=0)
            kT = tl.load(k_base + offs_n[None, :] * stride_kl + offs_d[:, None], mask=n_ok[None, :], other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :], mask=(n_ok & (v_flag == 0))[:, None],
                        other=0.0)
        else:
            kT = tl.load(k_base + offs_n[None, :] * stride_kl + offs_d[:, None])
            v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :])
        s = _dot(q, kT, INTERPRET) * qk_scale              # [BLOCK_M, BLOCK_N], log2 units
        if MASKED:
            base = tl.load(K_SEG + kt * BLOCK_N)
            k_seg = tl.load(K_SEG + offs_n, mask=n_ok, other=0)
            k_seg = tl.where(n_ok, k_seg, base)
            vis = _tile_mask(q_seg, k_seg, n_ok, base, QK_BITS, n_words, BLOCK_M, BLOCK_N, NWIN)
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows that saw nothing yet: exp2(-inf) = 0, no NaN
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:      # a query that sees a non-finite V row gets NaN through its probability (not through lse)
            p = tl.where(vis & (v_flag != 0)[None, :], float("nan"), p)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, INTERPRET)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, Q_SEG, K_SEG, QK_BITS, ROWS, COLS, V_BAD,
                stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
                stride_vb, stride_vl, stride_vh, stride_ob, stride_ol, stride_oh,
                H, Lq, Lk, n_words, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, NWIN: tl.constexpr,
                INTERPRET: tl.constexpr, HEADS_FIRST: tl.constexpr = False, WS: tl.constexpr = False):
    bh, b, h, tile, e_start, e_mid, e_end = _program_row(ROWS, H, HEADS_FIRST)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_ql, m_ok, HEAD_DIM)
    q_seg = tl.load(Q_SEG + offs_m, mask=m_ok, other=0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    v_bad = V_BAD + bh.to(tl.int64) * Lk                 # int8 [Lk] of this (batch, head): written for partial tiles

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, q_seg, k_base, v_base, stride_kl, stride_vl, COLS, e_start, e_mid,
                               K_SEG, QK_BITS, v_bad, n_words, Lk, qk_scale,
                               BLOCK_M, BLOCK_N, HEAD_DIM, NWIN, False, INTERPRET, WS)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, q_seg, k_base, v_base, stride_kl, stride_vl, COLS, e_mid, e_end,
                               K_SEG, QK_BITS, v_bad, n_words, Lk, qk_scale,
                               BLOCK_M, BLOCK_N, HEAD_DIM, NWIN, True, INTERPRET, WS)

    no_key = l_i == 0.0                                  # a row that sees no key: output 0, lse = -inf
    l_safe = tl.where(no_key, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(no_key, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    _store_rows(O + b * stride_ob + h * stride_oh, offs_m, stride_ol, m_ok, out, HEAD_DIM)
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, lse, mask=m_ok)


# ---------------------------------------------------------------------- launcher
def launch_forward(q, k, v, q_seg, k_seg, qk_bits, rows, cols, partial_kt, scale: float, tiles: list):
    """out [B, Lq, H, D] (q's dtype), lse fp32 [B, H, Lq] over the query-side schedule (rows, cols) of the forward
    tiles; the token tables q_seg, k_seg, qk_bits (schedule.py); partial_kt: the key tiles some query tile sees
    partially (TileSchedule.partial_key_tiles), whose V rows are checked for non-finite values first. Outputs
    from dz_kernels._common.empty."""
    q, k, v = last_contiguous(q), last_contiguous(k), last_contiguous(v)
    q_seg, k_seg, qk_bits, rows, cols, partial_kt = (t.contiguous() for t in (q_seg, k_seg, qk_bits, rows, cols,
                                                                              partial_kt))
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    bm, bn = tiles[0], tiles[1]
    if rows.shape[0] != cdiv(Lq, bm):
        raise ValueError(f"forward schedule has {rows.shape[0]} rows, expected {cdiv(Lq, bm)} for "
                         f"Lq={Lq}, BLOCK_M={bm}: build it with the same block sizes")
    out = empty((B, Lq, H, D), q.dtype, q.device)
    lse = empty((B, H, Lq), torch.float32, q.device)
    flags = tile_flags(tiles)
    heads_first = bool(flags & FLAG_HEADS_FIRST)
    # int8 flags of the V rows the partial tiles read (one pass over those rows; no pass without partial tiles)
    v_bad = torch.empty((B * H, Lk) if partial_kt.numel() else (1,), dtype=torch.int8, device=q.device)
    if partial_kt.numel():
        _row_flags_kernel[(partial_kt.shape[0], B * H)](
            v, v_bad, partial_kt, v.stride(0), v.stride(1), v.stride(2), H, Lk, BLOCK=bn, HEAD_DIM=D)
    _fwd_kernel[grid(rows.shape[0], B * H, heads_first)](
        q, k, v, out, lse, q_seg, k_seg, qk_bits, rows, cols, v_bad,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        H, Lq, Lk, qk_bits.shape[1], scale * LOG2E,
        BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=D, NWIN=nwin(bn, qk_bits.shape[1]), INTERPRET=kernels_interpreted(),
        HEADS_FIRST=heads_first, WS=bool(flags & FLAG_FWD_WS), **launch_kwargs(tiles[6], tiles[7]))
    return out, lse
