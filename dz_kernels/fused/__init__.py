"""Fused Triton kernels for the memory-bound chains of a Wan2.1 / DreamZero DiT block, forward and backward.

Every op has private ``@triton.jit`` kernels, a launcher, a ``torch.library.custom_op`` in the ``dz`` namespace
with a fake (meta) implementation and an autograd formula, a public function, and a plain-PyTorch
``*_reference`` that defines what the op computes:

- :func:`layernorm_modulate`: ``LN(x) * (1 + scale) + shift`` (optional affine; optional FP8 output + row scales)
- :func:`gated_residual_layernorm_modulate`: ``x_new = x + gate * y`` and the above of ``x_new``, in one pass
- :func:`gated_residual`: ``x + gate * y``
- :func:`rms_norm`: Wan2.1's RMSNorm (q/k norm over the full hidden dim)
- :func:`gelu_tanh`: GELU, tanh approximation

Modulation tensors (shift, scale, gate) may be per token ``[B, L, C]`` or per sample ``[B, 1, C]`` (or any view
that broadcasts, stride 0 included); they are read in place, never expanded in memory.
"""
from .residual import gated_residual, gated_residual_reference
from .gelu import gelu_tanh, gelu_tanh_reference
from .layernorm import (
    gated_residual_layernorm_modulate,
    gated_residual_layernorm_modulate_reference,
    layernorm_modulate,
    layernorm_modulate_reference,
)
from .rmsnorm import rms_norm, rms_norm_reference

__all__ = [
    "layernorm_modulate",
    "layernorm_modulate_reference",
    "gated_residual_layernorm_modulate",
    "gated_residual_layernorm_modulate_reference",
    "gated_residual",
    "gated_residual_reference",
    "rms_norm",
    "rms_norm_reference",
    "gelu_tanh",
    "gelu_tanh_reference",
]
