"""Plain-PyTorch references of the KV-cache kernels: the correctness oracles of the Triton and CUDA versions.

The fused projection epilogue is, per layer and per pass, the chain a DiT runs without kernels (Wan2.1's, which
dreamzero.backend implements for the model): RMSNorm of q and of k over the full hidden size with their weights
(`dz_kernels.fused.rms_norm_reference`), the head split, RoPE on adjacent pairs in fp32 from per-token cos/sin
tables (`rope_reference`), then the write of the rotated keys and the values into their rows of a preallocated
cache (quantized to FP8 E4M3 with one scale per (token, head) when the cache is FP8). The references below compose
exactly those functions; tests/test_kv_cache_kernels.py holds them bit-equal to the model's own chain.

FP8 convention (dz_kernels/_common.py, the same as dz_kernels.quant): the scale is the dequantization multiplier
``scale = max(amax, 1e-12) / 448`` over the D elements of one (token, head); ``q = e4m3(clamp(x / scale, -448,
448))`` with round-to-nearest-even, x being the value in the compute dtype (the rotated key as the chain rounds it).
A head holding a NaN gets a NaN scale and NaN values. Dequantized: ``q.float() * scale``.
"""
from __future__ import annotations

import torch

from .._common import FP8_DTYPE, fp8_scale, quantize_e4m3
from ..fused.reference import rms_norm_reference

__all__ = [
    "rope_reference", "quantize_fp8_per_head", "dequantize_fp8_per_head",
    "kv_cache_write_reference", "qk_norm_rope_reference", "qk_norm_rope_kv_reference",
]


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the adjacent pairs (x[2i], x[2i+1]) of each head by per-token angles, in fp32 (Wan2.1's RoPE).

    x [B, L, H, D]; cos, sin [L, D/2] float32. Returns x's dtype."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).type_as(x)


def quantize_fp8_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., H, D] (any float dtype) -> (q [..., H, D] float8_e4m3fn, scale [..., H] float32), x ~= q * scale."""
    xf = x.float()
    scale = fp8_scale(xf.abs().amax(dim=-1))
    return quantize_e4m3(xf, scale[..., None]), scale


def dequantize_fp8_per_head(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q [..., H, D] float8_e4m3fn, scale [..., H] float32 -> [..., H, D] in `dtype` (q.float() * scale, rounded)."""
    return (q.float() * scale[..., None]).to(dtype)


def _rows(pos, L: int, device) -> torch.Tensor:
    """int64 row indices pos .. pos + L - 1 (pos an int, or a one-element integer tensor kept on the device)."""
    if isinstance(pos, torch.Tensor):
        return pos.reshape(()).to(device=device, dtype=torch.int64) + torch.arange(L, device=device)
    return torch.arange(int(pos), int(pos) + L, device=device)


def kv_cache_write_reference(k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, pos, k_scale: torch.Tensor | None = None,
                             v_scale: torch.Tensor | None = None) -> None:
    """Write k_new/v_new [B, L, H, D] into rows pos .. pos+L-1 of k_cache/v_cache [B, T, H, D] (in place).

    A float8_e4m3fn cache is written quantized per (token, head), its scales into k_scale/v_scale [B, T, H] float32;
    any other cache dtype receives the values converted to it. `pos`: an int or a one-element int tensor (read on
    the device through index_copy_, so no host sync). Rows outside [0, T) raise (an IndexError from torch)."""
    L = k_new.shape[1]
    rows = _rows(pos, L, k_cache.device)
    if k_cache.dtype == FP8_DTYPE:
        kq, ks = quantize_fp8_per_head(k_new)
        vq, vs = quantize_fp8_per_head(v_new)
        k_cache.view(torch.uint8).index_copy_(1, rows, kq.view(torch.uint8))   # no float8 index_copy_ kernel
        v_cache.view(torch.uint8).index_copy_(1, rows, vq.view(torch.uint8))
        k_scale.index_copy_(1, rows, ks)
        v_scale.index_copy_(1, rows, vs)
    else:
        k_cache.index_copy_(1, rows, k_new.to(k_cache.dtype))
        v_cache.index_copy_(1, rows, v_new.to(v_cache.dtype))


def qk_norm_rope_reference(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, eps: float,
                           cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chain: rms_norm(q, wq), rms_norm(k, wk) over the full C, head split, rope_reference.

    q, k [B, L, C]; wq, wk [C]; cos, sin [L, D/2] fp32. Returns (q_rot, k_rot) [B, L, H, D] in q's dtype (the chain
    itself returns the promotion of the activation and weight dtypes; the cast makes fp32 weights with bf16
    activations give bf16, as the fused kernels do)."""
    qn = rms_norm_reference(q, wq, eps).unflatten(-1, (num_heads, -1))
    kn = rms_norm_reference(k, wk, eps).unflatten(-1, (num_heads, -1))
    return rope_reference(qn, cos, sin).to(q.dtype), rope_reference(kn, cos, sin).to(k.dtype)


def qk_norm_rope_kv_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, wq: torch.Tensor,
                              wk: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                              k_cache: torch.Tensor, v_cache: torch.Tensor, pos,
                              k_scale: torch.Tensor | None = None,
                              v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The unfused chain of the fused epilogue: q_rot, k_rot = qk_norm_rope_reference(...); the rotated keys and the
    values (v [B, L, C] split into heads) are written into rows pos .. pos+L-1 of the cache (see
    kv_cache_write_reference). Returns q_rot [B, L, H, D] in q's dtype."""
    q_rot, k_rot = qk_norm_rope_reference(q, k, wq, wk, eps, cos, sin, num_heads)
    kv_cache_write_reference(k_rot, v.unflatten(-1, (num_heads, -1)), k_cache, v_cache, pos, k_scale, v_scale)
    return q_rot
