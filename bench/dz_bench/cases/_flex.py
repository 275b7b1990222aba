"""FlexAttention as a peer: torch's flex_attention under a DreamZero layout's mask, used by the attention and the
train_step benches.

The BlockMask comes from mask_mod(q, kv) = segment_mask[seg(q), seg(kv)], with the per-token segment ids expanded
from the layout's own segment lengths (nothing of ours is used to build the peer's mask). On CUDA flex_attention is
compiled (fullgraph, static shapes), as its users run it; on the CPU it runs eagerly (forward only: torch has no
FlexAttention backward there).
"""
from __future__ import annotations

import torch


def _segment_ids(segments, device) -> torch.Tensor:
    """The segment index of every token: segment i repeated for its length."""
    lengths = torch.tensor([s.length for s in segments])
    return torch.repeat_interleave(torch.arange(len(segments)), lengths).to(device)


def flex_block_mask(layout, device):
    """FlexAttention's BlockMask of `layout` (query segments layout.q, key segments layout.k) on `device`."""
    from torch.nn.attention.flex_attention import create_block_mask

    seg = torch.as_tensor(layout.segment_mask().copy(), device=device)
    q_seg, k_seg = _segment_ids(layout.q, device), _segment_ids(layout.k, device)

    def mask_mod(b, h, q_idx, kv_idx):
        return seg[q_seg[q_idx], k_seg[kv_idx]]

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=layout.q_len, KV_LEN=layout.k_len, device=str(device))


def flex_attention_for(layout, device):
    """An attention function with the model's signature, attention(q, k, v, lay=None, scale=None) -> [B, Lq, H, D]
    (q, k, v in [B, L, H, D]), that runs FlexAttention under `layout`'s mask. Passing another layout raises
    ValueError (the BlockMask is built once, for this one)."""
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = flex_block_mask(layout, device)
    if torch.device(device).type == "cuda":
        fn = torch.compile(flex_attention, fullgraph=True, dynamic=False)
    else:
        fn = flex_attention

    def attention(q, k, v, lay=None, scale=None):
        if lay is not None and lay.key() != layout.key():
            raise ValueError("this FlexAttention adapter was built for another layout")
        o = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale=scale)
        return o.transpose(1, 2)

    return attention
