"""The model's backend table: the one place where fast ops enter the model.

The model calls every swappable op through `model.ops`, an `Ops` instance whose fields default to the plain PyTorch
references below. `dz_kernels.apply_` (or a user) replaces fields; nothing else in the model changes. The reference
functions are the correctness oracles of the kernels.

Code that picks its ops by name (the trainer's `ops="dz"`) calls `install_ops(model, name)`: the op sets are found
through the "dreamzero.ops" entry points of the installed packages (dz-kernels declares `dz = dz_kernels.apply:apply_`
in pyproject.toml), so the model package imports no kernel library itself. A provider is called as
`provider(model)` and returns a handle whose `undo()` restores the model's ops.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .attention import attention_blockwise
from .cache import KVCache


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Wan's RMSNorm: normalized in fp32 (also for a float64 x: Wan's and the release's WanRMSNorm call x.float()),
    cast back, then scaled by the weight. x [..., C], weight [C]."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).type_as(x) * weight


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 math for float32 and lower precisions; float64 inputs stay float64 (as the release runs them)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by per-token angles, in fp32 (fp64 for a float64 x, with float64 tables
    for exact angles: rope.rope_tables(..., dtype=torch.float64)).

    x [B, L, H, D]; cos, sin [L, D/2]. Returns x's dtype.
    """
    ct = _compute_dtype(x)
    xf = x.to(ct).unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos.to(ct)[None, :, None, :], sin.to(ct)[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return out.type_as(x)


def qk_norm_rope(q, k, wq, wk, eps, cos, sin, num_heads):
    """RMSNorm of q and k over the full hidden size, then RoPE per head. q, k [B, L, C] -> [B, L, H, D]."""
    q = rms_norm(q, wq, eps).unflatten(-1, (num_heads, -1))
    k = rms_norm(k, wk, eps).unflatten(-1, (num_heads, -1))
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def layernorm_modulate(x, shift, scale, eps):
    """LayerNorm without affine (fp32; fp64 for a float64 x), then x * (1 + scale) + shift. x [B, L, C]; shift,
    scale [B, L or 1, C]."""
    y = F.layer_norm(x.to(_compute_dtype(x)), (x.shape[-1],), eps=eps).type_as(x)
    return y * (1 + scale) + shift


def gated_residual(x, y, gate):
    """x + gate * y."""
    return x + gate * y


def residual_layernorm_modulate(x, y, gate, shift, scale, eps):
    """x_new = x + y (gate None) or x + gate * y, then layernorm_modulate(x_new): returns (x_new, modulated)."""
    x = x + y if gate is None else x + gate * y
    return x, layernorm_modulate(x, shift, scale, eps)


def layernorm_modulate_rows(x, shift, scale, eps, quantize):
    """The FP8 producer of layernorm_modulate (inference): quantize(layernorm_modulate(x, shift, scale, eps)), where
    `quantize` is the consumers' own per-token quantizer (the linears' `quantize_rows`), so the consumers get the
    bits they would compute from the float output, in one quantization pass for all of them."""
    return quantize(layernorm_modulate(x, shift, scale, eps))


def residual_layernorm_modulate_rows(x, y, gate, shift, scale, eps, quantize):
    """The FP8 producer of residual_layernorm_modulate: (x_new, quantize(modulated))."""
    x, h = residual_layernorm_modulate(x, y, gate, shift, scale, eps)
    return x, quantize(h)


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def cross_attention(q, k, v):
    """Unmasked attention of q [B, Lq, H, D] over k, v [B, Lk, H, D]."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2)


@dataclass
class Ops:
    """Swappable ops. Each field keeps the signature of its reference.

    FP8 producers (`*_rows`): in inference (no grad), where every linear a norm feeds takes pre-quantized FP8 rows
    (modules.rows_quantizer: the q/k/v projections after layernorm_modulate, and separately the FFN's first linear
    after residual_layernorm_modulate; e.g. per-token dz_kernels.quant.Float8Linear), the block calls the `*_rows`
    field instead of the plain op and hands its one FP8 output to all of them. The references quantize the plain
    op's output with the consumers' quantizer (the same bits as the plain path); dz_kernels.apply_ installs the
    fused norm, which quantizes in its epilogue. None turns the producer path off (each linear then quantizes the
    float output itself)."""
    attention: Callable = attention_blockwise            # (q, k, v, layout, scale) -> [B, Lq, H, D]
    cross_attention: Callable = cross_attention          # (q, k, v) -> [B, Lq, H, D]
    qk_norm_rope: Callable = qk_norm_rope                # (q, k, wq, wk, eps, cos, sin, H) -> q, k [B, L, H, D]
    rms_norm: Callable = rms_norm                        # (x, weight, eps)
    layernorm_modulate: Callable = layernorm_modulate    # (x, shift, scale, eps)
    gated_residual: Callable = gated_residual            # (x, y, gate)
    residual_layernorm_modulate: Callable = residual_layernorm_modulate  # (x, y, gate|None, shift, scale, eps)
    gelu_tanh: Callable = gelu_tanh                      # (x)
    layernorm_modulate_rows: Optional[Callable] = layernorm_modulate_rows  # (x, shift, scale, eps, quantize) -> rows
    residual_layernorm_modulate_rows: Optional[Callable] = residual_layernorm_modulate_rows
    #                                             (x, y, gate|None, shift, scale, eps, quantize) -> (x_new, rows)
    kv_cache: Callable = KVCache                         # (cfg, batch, dtype=, device=, overflow=) -> a KV cache

    def replace(self, **kw) -> "Ops":
        return dataclasses.replace(self, **kw)


REFERENCE_OPS = Ops()


OPS_ENTRY_POINTS = "dreamzero.ops"


def available_ops() -> list[str]:
    """Names of the op sets installed packages provide ("dreamzero.ops" entry points)."""
    return sorted({ep.name for ep in entry_points(group=OPS_ENTRY_POINTS)})


def install_ops(model, name: str) -> Any:
    """Install the op set `name` into `model` (in place) through its provider; returns the provider's handle, whose
    undo() restores the model's previous ops. Raises ValueError naming the installed op sets when `name` is not one."""
    eps = [ep for ep in entry_points(group=OPS_ENTRY_POINTS) if ep.name == name]
    if not eps:
        raise ValueError(f"no installed package provides the op set {name!r} (the {OPS_ENTRY_POINTS!r} entry points "
                         f"name {available_ops()}); install dz-kernels for 'dz'")
    return eps[0].load()(model)
