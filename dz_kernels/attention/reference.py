"""What layout attention computes, in plain PyTorch: the oracle of the Triton kernels (ops.py, triton_*.py).

For each query token i, over the keys j it sees (the pattern's mask, `AttentionPattern.dense_mask()`):

    s_ij = scale * <q_i, k_j>          lse_i = log sum_j exp(s_ij)          out_i = sum_j exp(s_ij - lse_i) v_j

per batch and head, scale defaulting to D ** -0.5. A query that sees no key gets out_i = 0 and lse_i = -inf. Keys a
query does not see never enter its sums: a NaN or inf there does not reach it (the kernels hold the same rule).
Computed in float32 (float64 inputs stay float64) over the visible keys of each group of query segments that see
the same keys (`AttentionPattern.groups`, what the release's per-block loop gathers), then rounded to q's dtype;
lse is float32 (float64 for float64 inputs) [B, H, Lq], natural log, as the custom op's second output.
Differentiable in q, k and v (autograd through the plain operations).
"""
from __future__ import annotations

import torch

from .pattern import as_pattern

__all__ = ["layout_attention_reference"]


def layout_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, scale: float | None = None,
                               return_lse: bool = False):
    """q [B, Lq, H, D], k and v [B, Lk, H, D], layout an AttentionPattern or an object with attention_pattern().
    Returns out [B, Lq, H, D] in q's dtype, or (out, lse [B, H, Lq]) with return_lse (see the module doc)."""
    pattern = as_pattern(layout)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, L, H, D]; got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[1] != pattern.q_len or k.shape[1] != pattern.k_len or v.shape[1] != pattern.k_len:
        raise ValueError(f"q has {q.shape[1]} and k/v {k.shape[1]}/{v.shape[1]} tokens; the pattern has "
                         f"{pattern.q_len} query and {pattern.k_len} key tokens")
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, Lq, H, D = q.shape
    outs, lses = [], []
    for qa, qb, spans in pattern.groups:
        qg = q[:, qa:qb].to(ct)
        if not spans:
            outs.append(qg.new_zeros((B, qb - qa, H, v.shape[-1])))
            lses.append(qg.new_full((B, H, qb - qa), float("-inf")))
            continue
        kg = torch.cat([k[:, a:b] for a, b in spans], dim=1).to(ct)
        vg = torch.cat([v[:, a:b] for a, b in spans], dim=1).to(ct)
        s = torch.einsum("bqhd,bkhd->bhqk", qg, kg) * scale
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse[..., None])
        outs.append(torch.einsum("bhqk,bkhd->bqhd", p, vg))
        lses.append(lse)
    out = torch.cat(outs, dim=1).to(q.dtype)
    return (out, torch.cat(lses, dim=2)) if return_lse else out
