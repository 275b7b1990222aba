"""Reference self-attention over a SequenceLayout: the correctness oracle and the baseline of the benchmarks.

Tensors are [B, L, H, D] (tokens before heads, as the projections produce them). `k` and `v` hold the keys of the
layout's key sequence: the cached tokens first, then the new ones (layout.k). `layout` is a SequenceLayout or its
`attention_pattern()` (the kernel library's plain description of the same mask).

Two exact implementations:
- `attention_blockwise`: what the DreamZero release does -- query segments that see the same keys are grouped, the
  visible keys are gathered with torch.cat, and one SDPA call runs per group. This is the baseline row.
- `attention_masked`: one SDPA call with the dense boolean mask from the layout (simple, memory hungry).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dz_kernels.attention.pattern import as_pattern


def _check(q, k, v, layout):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, L, H, D]; got ranks {q.dim()}, {k.dim()}, {v.dim()}")
    layout = as_pattern(layout)
    if q.shape[1] != layout.q_len:
        raise ValueError(f"q has {q.shape[1]} tokens but the layout has {layout.q_len} query tokens")
    if k.shape[1] != layout.k_len or v.shape[1] != layout.k_len:
        raise ValueError(f"k/v have {k.shape[1]}/{v.shape[1]} tokens but the layout has {layout.k_len} keys")
    if not (q.shape[0] == k.shape[0] == v.shape[0]) or not (q.shape[2:] == k.shape[2:] == v.shape[2:]):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree in batch/heads/dim")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")


def attention_blockwise(q, k, v, layout, scale: float | None = None) -> torch.Tensor:
    """Release-style attention: one SDPA call per group of query segments (consecutive segments that see the same
    keys) over the torch.cat of its visible keys. A group that sees no key gets zeros."""
    _check(q, k, v, layout)
    out = torch.empty_like(q)
    for qa, qb, spans in as_pattern(layout).groups:
        if not spans:
            out[:, qa:qb] = 0
            continue
        if len(spans) == 1:
            ks, vs = k[:, spans[0][0]:spans[0][1]], v[:, spans[0][0]:spans[0][1]]
        else:
            ks = torch.cat([k[:, a:b] for a, b in spans], dim=1)
            vs = torch.cat([v[:, a:b] for a, b in spans], dim=1)
        o = F.scaled_dot_product_attention(q[:, qa:qb].transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2),
                                           scale=scale)
        out[:, qa:qb] = o.transpose(1, 2)
    return out


def attention_masked(q, k, v, layout, scale: float | None = None) -> torch.Tensor:
    """One SDPA call under the dense boolean mask of the layout."""
    _check(q, k, v, layout)
    mask = as_pattern(layout).dense_mask(q.device)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       scale=scale)
    return o.transpose(1, 2)


def attention_dense_reference(q, k, v, mask: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Plain softmax(QK^T) V in float64 under a boolean mask [Lq, Lk]; for tests. Returns float64 [B, Lq, H, D]."""
    q64, k64, v64 = (t.to(torch.float64) for t in (q, k, v))
    s = (scale if scale is not None else q.shape[-1] ** -0.5)
    logits = torch.einsum("bqhd,bkhd->bhqk", q64, k64) * s
    logits = logits.masked_fill(~mask.to(q.device), float("-inf"))
    p = torch.softmax(logits, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v64)
