"""The fused DiT-block ops swapped into diffusers' ``WanTransformer3DModel`` (written against diffusers 0.42.1).

    handle = dz_kernels.apply_(wan_model, ApplyConfig(norms=True))   # reaches apply_to_wan(model, config)
    ...
    handle.undo()                                                    # back to diffusers' own code, exactly

What changes, per ``WanTransformerBlock`` (in place; ``undo`` restores every object it replaced):

- The block's class is swapped to a subclass (created once per class, with the same ``__name__`` so diffusers'
  name-based lookups such as ``_no_split_modules`` and ``compile_repeated_blocks`` still find it) whose ``forward``
  computes diffusers' block through :mod:`dz_kernels.fused`::

      norm1 + modulate                      -> layernorm_modulate(x, shift_msa, scale_msa)
      x + gate_msa * attn1, norm2 (affine)  -> gated_residual_layernorm_modulate(x, attn1, gate_msa, w2, b2)
                                               (cross_attn_norm=False: gated_residual, the norm is an identity)
      x + attn2, norm3 + modulate           -> gated_residual_layernorm_modulate(x, attn2, None, c_shift, c_scale)
      GELU-tanh of the FFN                  -> gelu_tanh (when the FFN is diffusers' GELU(approximate="tanh"))
      x + c_gate * ffn                      -> gated_residual(x, ffn, c_gate)

  The modulation tensors are formed as diffusers forms them, ``scale_shift_table + temb.float()`` (float32), for
  both layouts of ``temb``: ``[B, 6, C]`` (Wan2.1, Wan2.2-14B; per-sample ``[B, 1, C]`` chunks) and ``[B, L, 6, C]``
  (Wan2.2-TI2V per-token timesteps; ``[B, L, C]`` chunks with token stride 6C). The fused ops read those chunks in
  place (float32 modulation with a bfloat16 residual stream is a supported mix) and compute in float32 with one
  rounding to the stream's dtype, which is what diffusers' ``(... .float() ...).type_as(x)`` expressions do; the
  residual is rounded to the stream's dtype before the following LayerNorm, as in diffusers.

  FP8 producer path (inference, per-token FP8 linears: ``ApplyConfig(quant=Float8DynamicActivationFloat8Weight())``
  or ``quantize_`` after ``apply_``): where every linear a norm feeds takes pre-quantized rows (``accepts_fp8_rows``,
  as in the DreamZero block: norm1 -> attn1's to_q, to_k, to_v; norm2 -> attn2's to_q; norm3 -> the FFN's first
  linear, when its GELU is the fused tanh one), that norm runs with ``fp8=True`` and hands one
  :class:`dz_kernels.quant.Float8Rows` (its epilogue's per-token FP8 output) to all of them, instead of a float
  output that each linear quantizes again. The rows are the per-token quantizer's bits of the norm's float32
  result: for a float32 stream the bits each linear would have computed (the outputs are identical); for a
  bfloat16 stream one rounding fewer, which moves some FP8 codes by a step (as accurate, not the same bits). With
  grad enabled, or any other linear (nn.Linear, block-scaled FP8, NVFP4), the norm outputs floats as above.
  Likewise attn2's k and v (and the I2V image k/v) take one quantization of their shared context, not one each
  (the same bits as each linear's own).

- ``attn1`` and ``attn2`` get a :class:`FusedWanAttnProcessor` (a ``WanAttnProcessor`` subclass): diffusers'
  processor with ``norm_q`` / ``norm_k`` (and the I2V ``norm_added_k``), RMSNorm across all heads, computed by
  :func:`dz_kernels.fused.rms_norm`. The rotary embedding is diffusers' own (interleaved pairs). The attention
  itself stays diffusers' ``dispatch_attention_fn``: F.scaled_dot_product_attention by default, or whichever
  backend ``set_attention_backend`` chose (the processor shares ``_attention_backend`` / ``_parallel_config`` with
  the processor it replaced). Dense video attention is what SDPA (cuDNN / FlashAttention) serves best; our
  ``dz_kernels.attention.layout_attention`` exists for DreamZero's block-causal layout masks, which Wan has not.

ApplyConfig fields: ``norms`` turns all of the above on; ``attention`` needs no change here (SDPA is kept, see
above); ``kv_cache`` does not apply (diffusers' Wan has no KV cache); ``quant`` is handled by ``apply_`` itself
(``quantize_``), see :func:`default_quant_filter` for the module names to keep in high precision.

Numerics: in float32 the fused block matches diffusers to about 1e-6 relative (the kernels' reductions are ordered
differently); in bfloat16 to the bfloat16 rounding of the outputs (the same roundings happen in the same places).
One known difference in low precision: :func:`dz_kernels.fused.rms_norm` is Wan2.1's RMSNorm, which rounds the
normalized value to x's dtype before the weight multiply; torch's ``nn.RMSNorm`` does the same in its composite
implementation, but a fused torch kernel may round only once, so the q/k norms can differ by a bfloat16 rounding.

Limits (each raises a clear error at apply time): blocks whose ``forward`` was already replaced on the instance
(accelerate / diffusers hooks, e.g. ``enable_cache`` or group offloading: apply_ first, then add the hooks, and
remove them before ``undo``), attention processors other than diffusers' ``WanAttnProcessor``, block subclasses that
override ``forward``, a model already fused.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from . import fused
from .quant.api import Float8Rows, quantize_rows

try:
    from diffusers.models.activations import GELU as _DiffusersGELU
    from diffusers.models.transformers import transformer_wan as _tw
except ImportError as e:  # apply_ routes only a WanTransformer3DModel here, so diffusers is there in practice
    raise ImportError("dz_kernels.diffusers_wan needs diffusers (pip install 'dz-kernels[encoders]')") from e

__all__ = ["apply_to_wan", "FusedWanAttnProcessor", "fused_wan_block_forward", "default_quant_filter",
           "WAN_QUANT_EXCLUDED"]

# Wan modules that hold few FLOPs and are sensitive to quantization: the conditioning MLPs (timestep, text, image
# embedders and the timestep projection, all under `condition_embedder`), the patch embedding and the output head.
WAN_QUANT_EXCLUDED = ("condition_embedder", "patch_embedding", "proj_out")


def default_quant_filter(module: nn.Module, fqn: str) -> bool:
    """filter_fn for ``quantize_`` on a ``WanTransformer3DModel``: every nn.Linear of the transformer blocks
    (``blocks.N.attn1/attn2.to_q/k/v/out``, ``add_k_proj/add_v_proj``, ``ffn.net.*``), none of the modules the
    DreamZero release keeps in bfloat16 under their diffusers names (see ``WAN_QUANT_EXCLUDED``).
    ``module``: any module; ``fqn``: its qualified name in the model."""
    if not isinstance(module, nn.Linear):
        return False
    return not any(part.startswith(p) for part in fqn.split(".") for p in WAN_QUANT_EXCLUDED)


# --------------------------------------------------------------------------------------------- attention processor
def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` through the fused kernel when ``norm`` is an affine ``nn.RMSNorm`` over x's last dim with x's
    dtype (diffusers' q/k norms), else the module itself. x: ``[B, L, C]`` (C = heads * head_dim)."""
    w = getattr(norm, "weight", None)
    if (type(norm) is nn.RMSNorm and w is not None and w.dtype == x.dtype and x.dim() in (2, 3)
            and tuple(norm.normalized_shape) == (x.shape[-1],)):
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        return fused.rms_norm(x, w, eps)
    return norm(x)


def _qkv(attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor]):
    """diffusers' ``_get_qkv_projections`` (0.42.1): fused or separate projections."""
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    if getattr(attn, "fused_projections", False):
        if not attn.is_cross_attention:
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
        return attn.to_q(hidden_states), key, value
    ctx = _shared_rows(encoder_hidden_states, attn.to_k, attn.to_v)
    return attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)


def _added_kv(attn, encoder_hidden_states_img: torch.Tensor):
    """diffusers' ``_get_added_kv_projections`` (0.42.1)."""
    if getattr(attn, "fused_projections", False):
        return attn.to_added_kv(encoder_hidden_states_img).chunk(2, dim=-1)
    ctx = _shared_rows(encoder_hidden_states_img, attn.add_k_proj, attn.add_v_proj)
    return attn.add_k_proj(ctx), attn.add_v_proj(ctx)


def _shared_rows(x, *linears):
    """x once quantized to FP8 rows when every one of `linears` takes them (_fp8_rows: per-token Float8Linears, in
    inference), so k and v of the same context share one quantization instead of one each; else x itself. The same
    results: a Float8Linear computes the same from quantize_rows(x) as from x."""
    if isinstance(x, torch.Tensor) and _fp8_rows(x, *linears):
        return quantize_rows(x)
    return x


def _apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """diffusers' Wan RoPE: rotate interleaved pairs (x[2i], x[2i+1]). x ``[B, L, H, D]``; freqs ``[1, L, 1, D]``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class FusedWanAttnProcessor(_tw.WanAttnProcessor):
    """diffusers' ``WanAttnProcessor`` with the q/k RMSNorms (across heads) computed by the fused Triton kernel.

    Call: ``(attn, hidden_states [B, L, C], encoder_hidden_states [B, Lk, C] or None, attention_mask,
    rotary_emb (cos, sin) [1, L, 1, D] or None) -> [B, L, C]``, as the processor it replaces. ``base`` is that
    processor: its ``_attention_backend`` and ``_parallel_config`` are read and written through, so a backend chosen
    before or after ``apply_`` is used, and kept after ``undo``.
    """

    def __init__(self, base: "_tw.WanAttnProcessor"):
        super().__init__()
        self._base = base

    @property
    def _attention_backend(self):
        return self._base._attention_backend

    @_attention_backend.setter
    def _attention_backend(self, value):
        self._base._attention_backend = value

    @property
    def _parallel_config(self):
        return self._base._parallel_config

    @_parallel_config.setter
    def _parallel_config(self, value):
        self._base._parallel_config = value

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, rotary_emb=None) -> torch.Tensor:
        dispatch = _tw.dispatch_attention_fn
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:
            # diffusers: 512 is the text encoder's context length, the image tokens come first
            image_context_length = encoder_hidden_states.shape[1] - 512
            encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]

        query, key, value = _qkv(attn, hidden_states, encoder_hidden_states)
        query = _rms_norm(attn.norm_q, query).unflatten(2, (attn.heads, -1))
        key = _rms_norm(attn.norm_k, key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _apply_rotary_emb(query, *rotary_emb)
            key = _apply_rotary_emb(key, *rotary_emb)

        hidden_states_img = None
        if encoder_hidden_states_img is not None:
            key_img, value_img = _added_kv(attn, encoder_hidden_states_img)
            key_img = _rms_norm(attn.norm_added_k, key_img).unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            hidden_states_img = dispatch(query, key_img, value_img, attn_mask=None, dropout_p=0.0, is_causal=False,
                                         backend=self._attention_backend, parallel_config=None)
            hidden_states_img = hidden_states_img.flatten(2, 3).type_as(query)

        hidden_states = dispatch(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                 backend=self._attention_backend,
                                 parallel_config=(self._parallel_config if encoder_hidden_states is None else None))
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        if hidden_states_img is not None:
            hidden_states = hidden_states + hidden_states_img
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


# -------------------------------------------------------------------------------------------------- block forward
def _ln_params(norm: nn.Module):
    return norm.weight, norm.bias, norm.eps


def _fused_gelu(ffn: nn.Module):
    """The FFN's GELU module when it is diffusers' GELU(approximate="tanh") (run as its proj, then the fused
    GELU), else None."""
    act = ffn.net[0]
    return act if type(act) is _DiffusersGELU and act.approximate == "tanh" else None


def _fp8_rows(x: torch.Tensor, *linears) -> bool:
    """Whether the norm of x emits FP8 rows for `linears` (the FP8 producer path): in inference, when every one
    takes pre-quantized rows for an input like x (``accepts_fp8_rows(x)``: per-token Float8Linear; nn.Linear,
    block-scaled FP8 and NVFP4 modules do not). Each Float8Linear resolves its path once per shape, so this costs
    no table lookup after the first call (dz_kernels.quant.Float8Linear._path)."""
    if torch.is_grad_enabled():
        return False
    for lin in linears:
        accepts = getattr(lin, "accepts_fp8_rows", None)
        if accepts is None or not accepts(x):
            return False
    return True


def _attn_rows(attn, x: torch.Tensor) -> bool:
    """Whether the norm before `attn` emits FP8 rows: our processor (which hands its input only to linears, _qkv)
    and every projection that input feeds taking them: q, k and v of self-attention (or the fused to_qkv), q of
    cross-attention."""
    if not isinstance(attn.processor, FusedWanAttnProcessor):
        return False
    if getattr(attn, "fused_projections", False):
        linears = (attn.to_q,) if attn.is_cross_attention else (attn.to_qkv,)
    else:
        linears = (attn.to_q,) if attn.is_cross_attention else (attn.to_q, attn.to_k, attn.to_v)
    return _fp8_rows(x, *linears)


def _norm_out(out, rows: bool, x: torch.Tensor):
    """A fused norm's output as its linears take it: Float8Rows (in x's dtype) from its (q, q_scale) when it ran
    with fp8=True, else the float tensor itself."""
    return Float8Rows(*out, x.dtype) if rows else out


def _ffn(ffn: nn.Module, h, act) -> torch.Tensor:
    """diffusers' FeedForward, with the fused GELU-tanh when its activation is GELU(approximate="tanh") (`act`,
    _fused_gelu(ffn); then h may be the FP8 rows of its input, for its first linear)."""
    if act is not None:
        y = fused.gelu_tanh(act.proj(h))
        for m in list(ffn.net)[1:]:
            y = m(y)
        return y
    return ffn(h)


def fused_wan_block_forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                            temb: torch.Tensor, rotary_emb) -> torch.Tensor:
    """``WanTransformerBlock.forward`` (diffusers 0.42.1) through the fused ops; same arguments and result.

    hidden_states ``[B, L, C]``; encoder_hidden_states ``[B, Lk, C]``; temb ``[B, 6, C]`` or ``[B, L, 6, C]``;
    rotary_emb (cos, sin) ``[1, L, 1, D]``. Returns ``[B, L, C]`` in hidden_states' dtype.
    """
    if temb.ndim == 4:  # per-token timesteps (Wan2.2 TI2V): [B, L, 6, C] -> six [B, L, C] views (token stride 6C)
        mods = (self.scale_shift_table.unsqueeze(0) + temb.float()).unbind(2)
    elif temb.ndim == 3:  # [B, 6, C] -> six [B, 1, C] views
        mods = (self.scale_shift_table + temb.float()).chunk(6, dim=1)
    else:
        raise ValueError(f"temb must be [B, 6, C] or [B, L, 6, C], got shape {tuple(temb.shape)}")
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = mods
    x = hidden_states

    # 1. self-attention
    w1, b1, eps1 = _ln_params(self.norm1)
    rows = _attn_rows(self.attn1, x)   # one FP8 output for q, k and v
    h = _norm_out(fused.layernorm_modulate(x, shift_msa, scale_msa, eps1, w1, b1, fp8=rows), rows, x)
    attn_output = self.attn1(h, None, None, rotary_emb)

    # 2. cross-attention: the gated residual, then norm2 (affine LayerNorm, or an identity)
    if isinstance(self.norm2, nn.LayerNorm):
        w2, b2, eps2 = _ln_params(self.norm2)
        rows = _attn_rows(self.attn2, x)
        x, h = fused.gated_residual_layernorm_modulate(x, attn_output, gate_msa, None, None, eps2, w2, b2, fp8=rows)
        h = _norm_out(h, rows, x)
    else:
        x = fused.gated_residual(x, attn_output, gate_msa)
        h = x
    attn_output = self.attn2(h, encoder_hidden_states, None, None)

    # 3. feed-forward: the plain residual, then norm3 + modulate
    w3, b3, eps3 = _ln_params(self.norm3)
    act = _fused_gelu(self.ffn)
    rows = act is not None and _fp8_rows(x, act.proj)
    x, h = fused.gated_residual_layernorm_modulate(x, attn_output, None, c_shift_msa, c_scale_msa, eps3, w3, b3,
                                                   fp8=rows)
    h = _norm_out(h, rows, x)
    ff_output = _ffn(self.ffn, h, act)
    return fused.gated_residual(x, ff_output, c_gate_msa)


_FUSED_CLASSES: dict = {}


def _fused_class(cls: type) -> type:
    """The subclass of a WanTransformerBlock class whose forward is fused_wan_block_forward (one per class)."""
    sub = _FUSED_CLASSES.get(cls)
    if sub is None:
        sub = type(cls.__name__, (cls,), {
            "forward": fused_wan_block_forward,
            "__module__": __name__,
            "__qualname__": f"Fused{cls.__qualname__}",
            "__doc__": f"{cls.__qualname__} whose forward runs the dz_kernels fused ops (dz_kernels.apply_).",
            "_dz_original_class": cls,
        })
        _FUSED_CLASSES[cls] = sub
    return sub


# ---------------------------------------------------------------------------------------------------------- apply
def _check_block(name: str, block: nn.Module) -> None:
    cls = type(block)
    if getattr(cls, "_dz_original_class", None) is not None or isinstance(block.attn1.processor,
                                                                         FusedWanAttnProcessor):
        raise ValueError(f"{name} already runs the dz_kernels fused ops: apply_ was applied to this model before; "
                         "undo() that handle first")
    if cls.forward is not _tw.WanTransformerBlock.forward:
        raise TypeError(f"{name} is a {cls.__qualname__} that overrides WanTransformerBlock.forward; apply_ only "
                        "knows diffusers' block")
    if "forward" in vars(block):
        raise ValueError(f"{name} has its forward replaced on the instance (accelerate or diffusers hooks: "
                         "offloading, caching, ...); call apply_ before adding hooks")
    C = block.scale_shift_table.shape[-1]
    for nname in ("norm1", "norm3"):
        norm = getattr(block, nname)
        if not isinstance(norm, nn.LayerNorm) or tuple(norm.normalized_shape) != (C,):
            raise TypeError(f"{name}.{nname} is {norm!r}; expected a LayerNorm over the hidden dim {C}")
    if not (isinstance(block.norm2, nn.Identity) or
            (isinstance(block.norm2, nn.LayerNorm) and tuple(block.norm2.normalized_shape) == (C,))):
        raise TypeError(f"{name}.norm2 is {block.norm2!r}; expected a LayerNorm over {C} or an Identity")
    for aname in ("attn1", "attn2"):
        proc = getattr(block, aname).processor
        if type(proc) is not _tw.WanAttnProcessor:
            raise TypeError(f"{name}.{aname} has the attention processor {type(proc).__qualname__}; apply_ replaces "
                            "only diffusers' WanAttnProcessor")


def apply_to_wan(model: nn.Module, config) -> Callable[[], None]:
    """Swap the fused ops into a diffusers ``WanTransformer3DModel`` in place (see the module docstring).

    Args:
        model: a ``WanTransformer3DModel`` (its ``blocks`` are ``WanTransformerBlock``s with diffusers'
            ``WanAttnProcessor``s).
        config: a :class:`dz_kernels.ApplyConfig`; only ``norms`` changes anything here (``attention`` keeps SDPA,
            ``kv_cache`` does not apply, ``quant`` is applied by ``apply_``).
    Returns:
        ``undo()``: restores every block's class and every attention processor object (idempotent).
    Raises:
        TypeError / ValueError, before anything is changed, for the cases listed in the module docstring.
    """
    if not isinstance(model, _tw.WanTransformer3DModel):
        raise TypeError(f"apply_to_wan takes a diffusers WanTransformer3DModel, got {type(model).__name__}")
    if not config.norms:
        return lambda: None
    blocks = list(model.blocks)
    for i, blk in enumerate(blocks):
        if not isinstance(blk, _tw.WanTransformerBlock):
            raise TypeError(f"blocks.{i} is a {type(blk).__qualname__}, not a WanTransformerBlock")
        _check_block(f"blocks.{i}", blk)

    changed: list = []  # (block, original class, [(attention module, original processor), ...])

    def undo() -> None:
        while changed:
            blk, cls, procs = changed.pop()
            for attn, proc in procs:
                attn.set_processor(proc)
            blk.__class__ = cls

    try:
        for blk in blocks:
            cls = type(blk)
            procs = [(blk.attn1, blk.attn1.processor), (blk.attn2, blk.attn2.processor)]
            changed.append((blk, cls, procs))
            for attn, proc in procs:
                attn.set_processor(FusedWanAttnProcessor(proc))
            blk.__class__ = _fused_class(cls)
    except Exception:
        undo()
        raise
    return undo
