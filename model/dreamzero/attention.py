"""Reference self-attention over a SequenceLayout: the correctness oracle and the baseline of the benchmarks.

Tensors are [B, L, H, D] (tokens before heads, as the projections produce them). `k` and `v` hold the keys of the
layout's key sequence: the cached tokens first, then the new ones (layout.k).

Two exact implementations:
- `attention_blockwise`: what the DreamZero release does -- query segments that see the same keys are grouped, the
  visible keys are gathered with torch.cat, and one SDPA call runs per group. This is the baseline row.
- `attention_masked`: one SDPA call with the dense boolean mask from the layout (simple, memory hungry).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import SequenceLayout


def _check(q, k, v, layout: SequenceLayout):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, L, H, D]; got ranks {q.dim()}, {k.dim()}, {v.dim()}")
    if q.shape[1] != layout.q_len:
        raise ValueError(f"q has {q.shape[1]} tokens but the layout has {layout.q_len} query tokens")
    if k.shape[1] != layout.k_len or v.shape[1] != layout.k_len:
        raise ValueError(f"k/v have {k.shape[1]}/{v.shape[1]} tokens but the layout has {layout.k_len} keys")
    if not (q.shape[0] == k.shape[0] == v.shape[0]) or not (q.shape[2:] == k.shape[2:] == v.shape[2:]):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree in batch/heads/dim")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")


def _groups(layout: SequenceLayout):
    """Runs of consecutive query segments with identical visible key sets: [(q_start, q_end, [(k_start, k_end)])]."""
    key = "blockwise_groups"
    if key not in layout._cache:
        mask = layout.segment_mask()
        groups = []
        for i, qs in enumerate(layout.q):
            row = tuple(mask[i])
            if groups and groups[-1][3] == row and groups[-1][1] == qs.start:
                g = groups[-1]
                groups[-1] = (g[0], qs.end, g[2], row)
                continue
            spans = []
            for j, ks in enumerate(layout.k):
                if row[j]:
                    if spans and spans[-1][1] == ks.start:
                        spans[-1] = (spans[-1][0], ks.end)
                    else:
                        spans.append((ks.start, ks.end))
            groups.append((qs.start, qs.end, spans, row))
        layout._cache[key] = [(a, b, s) for a, b, s, _ in groups]
    return layout._cache[key]


def attention_blockwise(q, k, v, layout: SequenceLayout, scale: float | None = None) -> torch.Tensor:
    """Release-style attention: one SDPA call per group of query segments over the torch.cat of its visible keys."""
    _check(q, k, v, layout)
    out = torch.empty_like(q)
    for qa, qb, spans in _groups(layout):
        if len(spans) == 1:
            ks, vs = k[:, spans[0][0]:spans[0][1]], v[:, spans[0][0]:spans[0][1]]
        else:
            ks = torch.cat([k[:, a:b] for a, b in spans], dim=1)
            vs = torch.cat([v[:, a:b] for a, b in spans], dim=1)
        o = F.scaled_dot_product_attention(q[:, qa:qb].transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2),
                                           scale=scale)
        out[:, qa:qb] = o.transpose(1, 2)
    return out


def attention_masked(q, k, v, layout: SequenceLayout, scale: float | None = None) -> torch.Tensor:
    """One SDPA call under the dense boolean mask of the layout."""
    _check(q, k, v, layout)
    mask = layout.dense_mask(q.device)
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
