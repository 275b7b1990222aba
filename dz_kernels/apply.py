"""`apply_`: one verb that swaps the library's fast ops into a model, in place, undoable.

    handle = dz_kernels.apply_(model, ApplyConfig(attention=True, norms=True, kv_cache=True, quant=None))
    ...
    handle.undo()          # the model computes exactly as before

Models:
- our DreamZero (dreamzero.dreamzero.DreamZero): the fields of its backend table `model.ops` are replaced
  (attention -> dz_kernels.attention.layout_attention; the LayerNorm/modulate/residual chain, RMSNorm, GELU ->
  dz_kernels.fused; the KV cache -> dz_kernels.kv_cache.FusedKVCache, whose fused q/k-norm + RoPE + cache-write
  kernel the model calls when a cache is in use), and linears are quantized through dz_kernels.quant.quantize_.
  With norms=True the table's FP8 producers (layernorm_modulate_rows, residual_layernorm_modulate_rows) become the
  fused norm with fp8=True: in inference the per-token FP8 q/k/v and FFN input linears get the rows quantized in
  the norm's epilogue, from its unrounded float32 result (for float32 activations the bits of the plain path; for
  bf16 ones one rounding fewer than quantizing the bf16 output).
- diffusers' WanTransformer3DModel: see dz_kernels.diffusers_wan (attention processor + block forward with the
  fused ops), reached through the same call.
Each swapped op is numerically the same computation (within the tolerances documented with each kernel).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class ApplyConfig:
    attention: bool = True        # self-attention over the layout: the fused Triton kernel
    norms: bool = True            # LayerNorm + modulate, gated residual (+ LayerNorm + modulate), RMSNorm, GELU-tanh
    kv_cache: bool = True         # the fused q/k RMSNorm + RoPE + KV-cache write
    quant: Any = None             # a dz_kernels.quant config (e.g. Float8DynamicActivationFloat8Weight()) or None
    quant_filter: Callable | None = None   # filter_fn for quantize_ (None: its default, which keeps the release's
                                           # bf16 modules: patch embedding, head, action/state modules, embeddings;
                                           # for diffusers' Wan: the transformer blocks' linears only)


class ApplyHandle:
    """Returned by apply_: `undo()` restores everything apply_ changed (idempotent)."""

    def __init__(self, undo_fns: list):
        self._undo = list(undo_fns)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


def _dreamzero_ops(config: ApplyConfig) -> dict:
    fields = {}
    if config.attention:
        from .attention import layout_attention
        fields["attention"] = layout_attention
    if config.norms:
        fields.update(_fused_ops())
    if config.kv_cache:
        from .kv_cache import FusedKVCache
        fields["kv_cache"] = FusedKVCache
    return fields


def _fused_ops() -> dict:
    """The table's fields for norms=True: dz_kernels.fused's ops, and three built on them here, as closures over the
    modules they use (imported once, not on every call of the block)."""
    from dreamzero.backend import apply_rope

    from . import fused
    from .quant.api import Float8Rows

    def qk_norm_rope(q, k, wq, wk, eps, cos, sin, num_heads):
        """q/k RMSNorm with the fused kernel, then RoPE (the no-cache path, e.g. training). The norm weights are
        used in the activations' dtype (under autocast: fp32 master weights, bf16 projections)."""
        q = fused.rms_norm(q, wq.to(q.dtype), eps).unflatten(-1, (num_heads, -1))
        k = fused.rms_norm(k, wk.to(k.dtype), eps).unflatten(-1, (num_heads, -1))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def layernorm_modulate_rows(x, shift, scale, eps, quantize):
        """Ops.layernorm_modulate_rows with the quantization in the fused norm's epilogue (`quantize`, the
        consumers' quantizer, is not needed: the kernel writes rows in its convention, quant.Float8Rows)."""
        q, s = fused.layernorm_modulate(x, shift, scale, eps, fp8=True)
        return Float8Rows(q, s, x.dtype)

    def residual_layernorm_modulate_rows(x, y, gate, shift, scale, eps, quantize):
        """Ops.residual_layernorm_modulate_rows with the fused kernel: (x_new, Float8Rows from its epilogue)."""
        x_new, (q, s) = fused.gated_residual_layernorm_modulate(x, y, gate, shift, scale, eps, fp8=True)
        return x_new, Float8Rows(q, s, x.dtype)

    return dict(layernorm_modulate=fused.layernorm_modulate, gated_residual=fused.gated_residual,
                residual_layernorm_modulate=fused.gated_residual_layernorm_modulate, rms_norm=fused.rms_norm,
                gelu_tanh=fused.gelu_tanh, qk_norm_rope=qk_norm_rope, layernorm_modulate_rows=layernorm_modulate_rows,
                residual_layernorm_modulate_rows=residual_layernorm_modulate_rows)


_LATE_INTERPRETER = (
    "this machine has no CUDA, so dz_kernels' Triton kernels run in Triton's CPU interpreter, which must be on when "
    "triton is first imported; triton was imported before dz_kernels (diffusers and torch._dynamo import it) without "
    "TRITON_INTERPRET=1. Import dz_kernels before them, or set TRITON_INTERPRET=1 before starting Python")


def _check_kernels_can_run() -> None:
    """Without CUDA the kernels need the interpreter, on from triton's import (dz_kernels' import sets it when it
    comes first): say so before swapping anything, rather than fail inside a kernel later."""
    import sys

    import dz_kernels
    from . import env

    if dz_kernels.INTERPRETER == "late":
        raise RuntimeError("apply_: " + _LATE_INTERPRETER)
    std = sys.modules.get("triton.language.standard")
    if env.triton_interpret() and std is not None and hasattr(std, "sum") and \
            type(std.sum).__name__ != "InterpretedFunction":
        raise RuntimeError("apply_: TRITON_INTERPRET=1 was set after triton was imported; " + _LATE_INTERPRETER)


def apply_(model, config: ApplyConfig = ApplyConfig()) -> ApplyHandle:
    """Swap the fast ops into `model` in place; returns a handle whose undo() reverts it. On a machine without CUDA
    the kernels run in Triton's CPU interpreter (dz_kernels turns it on when imported before triton; see
    dz_kernels/__init__.py); a process where that is no longer possible gets a RuntimeError saying what to do."""
    if not isinstance(config, ApplyConfig):
        raise TypeError(f"apply_: config must be a dz_kernels.ApplyConfig (ApplyConfig() swaps every op in), got "
                        f"{type(config).__name__}")
    _check_kernels_can_run()
    undo = []
    try:
        if hasattr(model, "ops") and dataclasses.is_dataclass(model.ops):
            old = model.ops
            model.ops = old.replace(**_dreamzero_ops(config))
            undo.append(lambda: setattr(model, "ops", old))
        elif type(model).__name__ == "WanTransformer3DModel":
            from .diffusers_wan import apply_to_wan
            undo.append(apply_to_wan(model, config))
        else:
            raise TypeError(f"apply_ supports DreamZero and diffusers' WanTransformer3DModel, got "
                            f"{type(model).__name__}")
        if config.quant is not None:
            from .quant import dequantize_, quantize_
            filter_fn = config.quant_filter
            if filter_fn is None and type(model).__name__ == "WanTransformer3DModel":
                from .diffusers_wan import default_quant_filter as filter_fn   # the blocks' linears only
            if filter_fn is None:
                quantize_(model, config.quant)
            else:
                quantize_(model, config.quant, filter_fn=filter_fn)
            undo.append(lambda: dequantize_(model))
    except Exception:
        ApplyHandle(undo).undo()
        raise
    return ApplyHandle(undo)
