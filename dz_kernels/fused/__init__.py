"""Fused Triton kernels for the memory-bound chains of a Wan2.1 / DreamZero DiT block, forward and backward.

Every op has private ``@triton.jit`` kernels and a launcher (triton_kernels.py), a ``torch.library.custom_op`` in
the ``dz`` namespace with a fake (meta) implementation, an autograd formula and a public function (ops.py), and a
plain-PyTorch ``*_reference`` that defines what the op computes (reference.py):

- :func:`layernorm_modulate`: ``LN(x) * (1 + scale) + shift`` (optional affine; optional FP8 output + row scales)
- :func:`gated_residual_layernorm_modulate`: ``x_new = x + gate * y`` and the above of ``x_new``, in one pass
- :func:`gated_residual`: ``x + gate * y``
- :func:`rms_norm`: Wan2.1's RMSNorm (q/k norm over the full hidden dim)
- :func:`gelu_tanh`: GELU, tanh approximation

Modulation tensors (shift, scale, gate) may be per token ``[B, L, C]`` or per sample ``[B, 1, C]`` (or any view
that broadcasts, stride 0 included); they are read in place, never expanded in memory.
"""
from .ops import gated_residual, gated_residual_layernorm_modulate, gelu_tanh, layernorm_modulate, rms_norm
from .reference import (
    gated_residual_layernorm_modulate_reference,
    gated_residual_reference,
    gelu_tanh_reference,
    layernorm_modulate_reference,
    rms_norm_reference,
)

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
