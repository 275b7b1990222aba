"""The Wan2.1-I2V DiT block, its embeddings and head, and DreamZero's category-specific action/state modules.

Parameter names follow the original Wan2.1 release (blocks.N.self_attn.q, blocks.N.cross_attn.k_img, ffn.0,
head.modulation, ...) and the DreamZero release for the action/state modules (action_encoder.W1.W, ...), so those
checkpoints load with few renames (see dreamzero.checkpoint.keys). Every swappable op goes through `ops` (backend.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backend import Ops, rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Wan's timestep embedding: [cos(t * f_i), sin(t * f_i)], f_i = 10000^(-i/half), in float64. t [...] -> [..., dim]."""
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    ang = t[..., None] * freqs
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)


def action_time_encoding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """The action encoder's sinusoidal encoding (release, after Pi0): [sin, cos] with exp(-i ln(10000)/half). fp32."""
    half = dim // 2
    t = t.float()
    freqs = torch.exp(-torch.arange(half, dtype=torch.float32, device=t.device) * (math.log(10000.0) / half))
    ang = t[..., None] * freqs
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads, self.eps = num_heads, eps
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(self, x, cos, sin, layout, ops: Ops, cache=None, layer: int = 0):
        """x [B, L, C]: the modulated tokens, or their FP8 rows when q, k and v take them (DiTBlock, Ops)."""
        if cache is not None and hasattr(cache, "project"):
            # a fused cache: q/k RMSNorm, RoPE and the cache write in one kernel (dz_kernels.kv_cache)
            q, k, v = cache.project(layer, self.q(x), self.k(x), self.v(x), self.norm_q.weight, self.norm_k.weight,
                                    self.eps, cos, sin, layout)
            return self.o(ops.attention(q, k, v, layout, None).flatten(2))
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        q, k = ops.qk_norm_rope(self.q(x), self.k(x), self.norm_q.weight, self.norm_k.weight, self.eps, cos, sin,
                                self.num_heads)
        # the norm and RoPE run in fp32 (fp32 weights under autocast): q and k go back to the compute dtype, the
        # projections' (as the release's attention function casts them), so q, k and v share it
        q, k = q.to(v.dtype), k.to(v.dtype)
        if cache is not None:
            k, v = cache.extend(layer, k, v, layout)
        o = ops.attention(q, k, v, layout, None)
        return self.o(o.flatten(2))


class CrossAttention(nn.Module):
    """I2V cross-attention: q from the tokens, k/v from the text tokens and separately from the CLIP image tokens;
    the two results are summed before the output projection. Its k/v depend only on the instruction and image, so
    `context_kv` computes them once per instruction."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads, self.eps = num_heads, eps
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.norm_k_img = RMSNorm(dim, eps)

    def context_kv(self, text: torch.Tensor, image: torch.Tensor) -> tuple:
        """text [B, Lt, C], image [B, Li, C] (already embedded) -> (k, v, k_img, v_img), each [B, L, H, D]."""
        h = self.num_heads
        return (self.norm_k(self.k(text)).unflatten(-1, (h, -1)), self.v(text).unflatten(-1, (h, -1)),
                self.norm_k_img(self.k_img(image)).unflatten(-1, (h, -1)), self.v_img(image).unflatten(-1, (h, -1)))

    def forward(self, x, ctx_kv: tuple, ops: Ops):
        k, v, k_img, v_img = ctx_kv
        # the norms leave q and k in fp32 when their weights are (autocast): back to the compute dtype, v's
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1)).to(v.dtype)
        o = ops.cross_attention(q, k.to(v.dtype), v) + ops.cross_attention(q, k_img.to(v_img.dtype), v_img)
        return self.o(o.flatten(2))


def rows_quantizer(linears, x: torch.Tensor, producer):
    """The FP8 producer protocol of the block (Ops.layernorm_modulate_rows): the consumers' per-token quantizer when
    the producer path applies to `linears` fed from an input like x, else None. It applies in inference (grad mode
    off), with a producer in the ops table (not None), when every linear says it takes pre-quantized FP8 rows for
    such an input (`accepts_fp8_rows(x)`, e.g. dz_kernels.quant.Float8Linear with per-token scaling); nn.Linear,
    block-scaled FP8 and NVFP4 modules do not, and keep the plain path."""
    if producer is None or torch.is_grad_enabled():
        return None
    for lin in linears:
        accepts = getattr(lin, "accepts_fp8_rows", None)
        if accepts is None or not accepts(x):
            return None
    return linears[0].quantize_rows


class DiTBlock(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float):
        super().__init__()
        self.eps = eps
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, num_heads, eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x, e0, cos, sin, layout, ctx_kv, ops: Ops, cache=None, layer: int = 0):
        """x [B, L, C]; e0 [B, L, 6, C] (per-token time projection); cos/sin [L, D/2]."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.unsqueeze(1) + e0).unbind(2)
        sa = self.self_attn
        quantize = rows_quantizer((sa.q, sa.k, sa.v), x, ops.layernorm_modulate_rows)
        if quantize is None:
            h = ops.layernorm_modulate(x, shift1, scale1, self.eps)
        else:   # one FP8 output for q, k and v (see Ops)
            h = ops.layernorm_modulate_rows(x, shift1, scale1, self.eps, quantize)
        x = ops.gated_residual(x, sa(h, cos, sin, layout, ops, cache, layer), gate1)
        y = self.cross_attn(self.norm3(x), ctx_kv, ops)
        quantize = rows_quantizer((self.ffn[0],), x, ops.residual_layernorm_modulate_rows)
        if quantize is None:
            x, h = ops.residual_layernorm_modulate(x, y, None, shift2, scale2, self.eps)
        else:
            x, h = ops.residual_layernorm_modulate_rows(x, y, None, shift2, scale2, self.eps, quantize)
        y = self.ffn[2](ops.gelu_tanh(self.ffn[0](h)))
        return ops.gated_residual(x, y, gate2)


class Head(nn.Module):
    def __init__(self, dim: int, out_dim: int, patch_size: tuple, eps: float):
        super().__init__()
        self.eps = eps
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_dim * math.prod(patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)

    def forward(self, x, e, ops: Ops):
        """x [B, L, C]; e [B, L, C] (the time embedding, before the projection)."""
        shift, scale = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).unbind(2)
        return self.head(ops.layernorm_modulate(x, shift, scale, self.eps))


class MLPProj(nn.Module):
    """CLIP features -> model width: LayerNorm, Linear, GELU, Linear, LayerNorm (names img_emb.proj.{0,1,3,4})."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(),
                                  nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim))

    def forward(self, x):
        return self.proj(x)


# ---------------------------------------------------------------- DreamZero's category-specific modules
class CategorySpecificLinear(nn.Module):
    """One weight matrix per embodiment: y = x @ W[id] + b[id]. W [n, in, out], b [n, out]."""

    def __init__(self, num_categories: int, in_dim: int, out_dim: int):
        super().__init__()
        self.W = nn.Parameter(0.02 * torch.randn(num_categories, in_dim, out_dim))
        self.b = nn.Parameter(torch.zeros(num_categories, out_dim))

    def forward(self, x, cat_ids):
        return torch.bmm(x, self.W[cat_ids]) + self.b[cat_ids].unsqueeze(1)


class CategorySpecificMLP(nn.Module):
    def __init__(self, num_categories: int, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.layer1 = CategorySpecificLinear(num_categories, in_dim, hidden_dim)
        self.layer2 = CategorySpecificLinear(num_categories, hidden_dim, out_dim)

    def forward(self, x, cat_ids):
        return self.layer2(F.relu(self.layer1(x, cat_ids)), cat_ids)


class ActionEncoder(nn.Module):
    """W1 (action_dim -> C), concat with the sinusoidal encoding of the per-token action timestep, W2 (2C -> C) with
    swish, W3 (C -> C); every matrix per embodiment."""

    def __init__(self, num_categories: int, action_dim: int, dim: int):
        super().__init__()
        self.dim = dim
        self.W1 = CategorySpecificLinear(num_categories, action_dim, dim)
        self.W2 = CategorySpecificLinear(num_categories, 2 * dim, dim)
        self.W3 = CategorySpecificLinear(num_categories, dim, dim)

    def forward(self, actions, timesteps, cat_ids):
        """actions [B, T, action_dim]; timesteps [B, T]; cat_ids [B] -> [B, T, C]."""
        a = self.W1(actions, cat_ids)
        tau = action_time_encoding(self.dim, timesteps).to(a.dtype)
        return self.W3(F.silu(self.W2(torch.cat([a, tau], dim=-1), cat_ids)), cat_ids)
