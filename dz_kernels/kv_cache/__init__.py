"""KV cache of the DiT's self-attention and the fused projection epilogue (q/k RMSNorm + RoPE + cache write).

- `FusedKVCache` (cache.py): the model's cache (same contract as dreamzero.cache.KVCache) with staging rows so the
  attention reads one contiguous slice, device-side write positions, optional FP8 E4M3 storage, and the fused entry
  point `project(layer, q, k, v, wq, wk, eps, cos, sin, layout) -> (q_rot, k_all, v_all)`.
- `qk_norm_rope_kv_write`, `kv_cache_write` (ops.py): the ops, with Triton (triton_kernels.py), CUDA
  (csrc/qk_norm_rope.cu via cuda.py) and plain PyTorch backends, registered as torch.library custom ops.
- reference.py: the plain chain (dreamzero.backend.rms_norm + apply_rope + the cache write), the oracle.
"""
from .cache import FusedKVCache
from .ops import BACKENDS, kv_cache_write, qk_norm_rope_kv_write, resolve_backend
from .reference import (
    dequantize_fp8,
    kv_cache_write_reference,
    qk_norm_rope_kv_reference,
    qk_norm_rope_reference,
    quantize_fp8_per_head,
)

__all__ = [
    "FusedKVCache",
    "qk_norm_rope_kv_write",
    "kv_cache_write",
    "resolve_backend",
    "BACKENDS",
    "qk_norm_rope_reference",
    "qk_norm_rope_kv_reference",
    "kv_cache_write_reference",
    "quantize_fp8_per_head",
    "dequantize_fp8",
]
