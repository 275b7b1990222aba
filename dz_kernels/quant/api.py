"""`quantize_(model, config, filter_fn=None)`: swap a model's nn.Linear modules for FP8 or NVFP4 ones, in place and
reversibly (`dequantize_`), in the style of torchao.

Configs (small frozen dataclasses):
    Float8DynamicActivationFloat8Weight()   FP8 E4M3; activations quantized per token at run time, weights per output
                                            channel (ModelOpt "FP8_PER_CHANNEL_PER_TOKEN"). Any K.
    Float8BlockScaled()                     FP8 E4M3; activations in 1x128 blocks at run time, weights in 128x128
                                            blocks. K % 128 == 0.
    NVFP4WeightOnly()                       NVFP4 weights, 16-bit activations (W4A16, the Hopper path). K % 16 == 0.
    NVFP4(use_dot_scaled=None)              NVFP4 weights and activations (W4A4; tl.dot_scaled on sm_100, register
                                            dequantization elsewhere). The activation's global scale is a static
                                            `input_scale` when set (calibrate_ or a ModelOpt checkpoint), else
                                            computed from each input's amax. K % 16 == 0.

Default filter: every nn.Linear except those under the modules the DreamZero release keeps in bf16 (the input and
output projections and the conditioning MLPs, which hold few FLOPs and are sensitive to quantization):
patch_embedding, head, action_encoder, state_encoder, action_decoder, text_embedding, img_emb, time_embedding,
time_projection. A module is excluded when any component of its qualified name starts with one of those names.

Execution: on CUDA the quantized modules run the Triton kernels (ops.py); on CPU they run the plain
PyTorch references of reference.py (same quantizer bits; the GEMM in float32). Inference only: no backward.
An FP8 module on CUDA runs the path the config table picks for its shape (dispatch.py: our FP8 GEMM, our quantizer
with cuBLAS's FP8 GEMM, or, where the tuning measured FP8 slower than bf16 and the original weight is kept, bf16);
`Float8Linear.path_for(x)` says which. A module resolves its path once per input shape (device, tokens, output dtype)
and keeps it until the config tables change (dz_kernels.configs.generation()), so an eager forward does at most one
dictionary lookup for it, none when the shape repeats (Float8Linear._path).

Pre-quantized activations: a per-token Float8Linear also takes a `Float8Rows` (the FP8 rows, their float32 scales
and the output dtype) in place of x, so that a producer quantizes once for several linears (the fused LayerNorm +
modulate with fp8=True in its epilogue, or `quantize_rows(x)`, the quantizer Float8Linear(x) itself applies: the
same output bits). `accepts_fp8_rows(x)` says whether a module takes them for an input like x; the DreamZero block
uses that protocol for its q/k/v and FFN input (dreamzero.backend.Ops.layernorm_modulate_rows).

Reversibility: with reversible=True (default) each quantized module keeps a reference to the nn.Linear it replaced
(no copy, but the original weights stay alive), and dequantize_ puts those exact modules back, so outputs are
bit-identical to before. With reversible=False the originals are dropped (the memory saving is real) and
dequantize_ rebuilds nn.Linear modules from the dequantized weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn as nn

from .. import configs
from . import _common as cm
from .dispatch import fp8_linear_dispatch, fp8_linear_path, fp8_rows_dispatch
from .reference import (
    FP8_BLOCK, NVFP4_BLOCK, nvfp4_global_scale_from_amax, dequantize_fp8_reference, dequantize_nvfp4_reference,
    fp8_gemm_reference, nvfp4_gemm_w4a4_reference, nvfp4_gemm_w4a16_reference, quantize_fp8_reference,
    quantize_nvfp4_reference,
)

__all__ = [
    "Float8DynamicActivationFloat8Weight", "Float8BlockScaled", "NVFP4WeightOnly", "NVFP4", "QuantConfig",
    "Float8Linear", "NVFP4Linear", "QUANT_LINEAR_TYPES", "DEFAULT_EXCLUDED", "default_filter",
    "quantize_", "dequantize_", "calibrate_", "Float8Rows", "quantize_rows",
]


# ------------------------------------------------------------------------------------------------------------ configs
@dataclass(frozen=True)
class Float8DynamicActivationFloat8Weight:
    """FP8 E4M3 with per-token dynamic activation scales and per-output-channel weight scales."""


@dataclass(frozen=True)
class Float8BlockScaled:
    """FP8 E4M3 with 1x128 dynamic activation block scales and 128x128 weight block scales (K % 128 == 0)."""


@dataclass(frozen=True)
class NVFP4WeightOnly:
    """NVFP4 weights (E2M1 + E4M3 per 16 + FP32 global), bf16/fp16 activations (W4A16). K % 16 == 0."""


@dataclass(frozen=True)
class NVFP4:
    """NVFP4 weights and activations (W4A4). use_dot_scaled: None = tl.dot_scaled on sm_100, register
    dequantization elsewhere; True forces the sm_100 path (an error elsewhere); False forces the emulation."""
    use_dot_scaled: Optional[bool] = None


QuantConfig = Union[Float8DynamicActivationFloat8Weight, Float8BlockScaled, NVFP4WeightOnly, NVFP4]
_CONFIG_TYPES = (Float8DynamicActivationFloat8Weight, Float8BlockScaled, NVFP4WeightOnly, NVFP4)

DEFAULT_EXCLUDED = ("patch_embedding", "head", "action_encoder", "state_encoder", "action_decoder", "text_embedding",
                    "img_emb", "time_embedding", "time_projection")


def default_filter(module: nn.Module, fqn: str) -> bool:
    """True for an nn.Linear that quantize_ should convert by default (see the module docstring)."""
    if not isinstance(module, nn.Linear):
        return False
    return not any(part.startswith(p) for part in fqn.split(".") for p in DEFAULT_EXCLUDED)


# ----------------------------------------------------------------------------------------- pre-quantized activations
class Float8Rows(NamedTuple):
    """An activation quantized to FP8 E4M3 per token, for per-token Float8Linears to take in place of the float
    tensor. data [..., K] float8_e4m3fn; scale [..., 1] float32 with x ~= data * scale and scale =
    max(rowmax|x|, 1e-12) / 448 (the rowwise quantizer's convention, dz_kernels._common); dtype: the dtype the
    linear outputs (the unquantized activation's, as Float8Linear(x) outputs x.dtype)."""
    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


def quantize_rows(x: torch.Tensor) -> Float8Rows:
    """x [..., K] float -> Float8Rows, with the quantizer a per-token Float8Linear applies to x itself (the Triton
    kernel on CUDA, the bit-identical reference on CPU): Float8Linear(quantize_rows(x)) == Float8Linear(x)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in cm.FLOAT_DTYPES or x.dim() < 1:
        raise TypeError(f"quantize_rows takes a float32/bfloat16/float16 tensor [..., K], got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.is_cuda:
        from .ops import quantize_fp8_rowwise
        q, s = quantize_fp8_rowwise(x)
        return Float8Rows(q, s, x.dtype)
    q, s = quantize_fp8_reference(cm.as_rows(x), "row")
    return Float8Rows(q.view(x.shape), s.view(*x.shape[:-1], 1), x.dtype)


def _check_rows(mod: nn.Module, r: Float8Rows) -> None:
    name = type(mod).__name__
    if mod.block_scaled:
        raise ValueError(f"{name}(block_scaled=True) quantizes its input in 1x128 blocks; a Float8Rows holds one "
                         "scale per token: pass the float activation")
    d, s = r.data, r.scale
    if not isinstance(d, torch.Tensor) or d.dtype != cm.FP8_DTYPE or d.dim() < 1:
        raise TypeError(f"{name}: Float8Rows.data must be a float8_e4m3fn tensor [..., K], got "
                        f"{getattr(d, 'dtype', type(d).__name__)}")
    if d.shape[-1] != mod.in_features:
        raise ValueError(f"{name}(in_features={mod.in_features}) got Float8Rows data of shape {tuple(d.shape)}")
    if not isinstance(s, torch.Tensor) or s.dtype != torch.float32 or tuple(s.shape) != (*d.shape[:-1], 1):
        raise ValueError(f"{name}: Float8Rows.scale must be float32 of shape {(*d.shape[:-1], 1)} (one per row), "
                         f"got {getattr(s, 'dtype', type(s).__name__)} {tuple(getattr(s, 'shape', ()))}")
    if s.device != d.device or d.device != mod.weight.device:
        raise ValueError(f"{name}: Float8Rows data on {d.device}, scale on {s.device}, weight on "
                         f"{mod.weight.device}: they must share a device")
    if r.dtype not in cm.FLOAT_DTYPES:
        raise TypeError(f"{name}: Float8Rows.dtype is {r.dtype}; expected float32, bfloat16 or float16")


# ------------------------------------------------------------------------------------------------------------ modules
def _check_input(mod: nn.Module, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{type(mod).__name__} takes a tensor, got {type(x).__name__}")
    if x.dtype not in cm.FLOAT_DTYPES:
        raise TypeError(f"{type(mod).__name__} input has dtype {x.dtype}; expected float32, bfloat16 or float16")
    if x.dim() < 1 or x.shape[-1] != mod.in_features:
        raise ValueError(f"{type(mod).__name__}(in_features={mod.in_features}) got input of shape {tuple(x.shape)}")


def _check_linear_weight(linear: nn.Module, k_multiple: int, what: str) -> None:
    w = linear.weight
    if w.dim() != 2:
        raise ValueError(f"{what}: the weight must be 2-D [N, K], got {tuple(w.shape)}")
    if w.dtype not in cm.FLOAT_DTYPES:
        raise TypeError(f"{what}: the weight has dtype {w.dtype}; expected float32, bfloat16 or float16")
    if w.shape[1] % k_multiple:
        raise ValueError(f"{what}: in_features K = {w.shape[1]} is not a multiple of {k_multiple}; exclude this "
                         "module with filter_fn or use another config")


def _keep_original(q: nn.Module, linear: Optional[nn.Module]) -> None:
    # A tuple, so nn.Module does not register the original as a submodule (no duplicate parameters or state).
    q._original = (linear,) if linear is not None else None


class _QuantLinearBase(nn.Module):
    """Keeps the quantized buffers' storage dtypes through model.to(dtype) / .half() / .bfloat16(): those casts
    would otherwise turn the float8 weight and the float32 scales into the new dtype. Buffers follow device moves
    only; the bias (a parameter) is cast as usual."""

    def _apply(self, fn, recurse=True):
        bufs = {n: b for n, b in self._buffers.items() if b is not None}
        for n in bufs:
            self._buffers[n] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for n, b in bufs.items():
                out = fn(b)
                self._buffers[n] = out if out.dtype == b.dtype else b.to(out.device)
        return self


def _runs_dispatch(t: torch.Tensor) -> bool:
    """Whether a Float8Linear runs the dispatch of dispatch.py (the kernels) for input t: on CUDA; a CPU input runs
    the bit-identical references. (The tests replace it to run the CUDA dispatch through the Triton interpreter.)"""
    return t.is_cuda


class _PathCache:
    """A Float8Linear's resolved dispatch paths: {key: path} and the last (key, path) (see Float8Linear._path).
    A plain attribute, not module state: not in the state dict; keys name the device, so .to() needs no reset."""
    SIZE = 64          # distinct input shapes kept; more (e.g. a sweep over token counts) start the dict again

    def __init__(self):
        self.paths: dict = {}
        self.last: Optional[tuple] = None


class Float8Linear(_QuantLinearBase):
    """nn.Linear with an FP8 E4M3 weight; the input is quantized to FP8 on each call.

    Buffers (ModelOpt names and layouts): weight [N, K] float8_e4m3fn; weight_scale float32, [N] per output channel
    or [ceil(N/128), K/128] when block_scaled. bias: the original's bias (or None). forward: x [..., K] float ->
    [..., N] in x's dtype; per-token modules also take a Float8Rows (-> [..., N] in its dtype, no quantization
    pass; a block-scaled module raises ValueError)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block_scaled: bool = False,
                 device=None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if block_scaled and in_features % FP8_BLOCK:
            raise ValueError(f"block-scaled FP8 needs in_features to be a multiple of {FP8_BLOCK}, got {in_features}")
        self.in_features, self.out_features, self.block_scaled = in_features, out_features, block_scaled
        self.orig_dtype = dtype
        scale_shape = (-(-out_features // FP8_BLOCK), in_features // FP8_BLOCK) if block_scaled else (out_features,)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=cm.FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        _keep_original(self, None)
        self._paths = _PathCache()

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_scaled: bool = False) -> "Float8Linear":
        """Quantize an nn.Linear's weight (Triton kernels on CUDA, the bit-identical reference on CPU)."""
        _check_linear_weight(linear, FP8_BLOCK if block_scaled else 1, "Float8Linear")
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, block_scaled, device="meta",
                  dtype=w.dtype)
        with torch.no_grad():
            if w.is_cuda:
                from .ops import quantize_fp8_blockwise, quantize_fp8_rowwise
                q, s = quantize_fp8_blockwise(w, "128x128") if block_scaled else quantize_fp8_rowwise(w)
            else:
                q, s = quantize_fp8_reference(w, "block128x128" if block_scaled else "row")
        mod.weight = q.contiguous()
        mod.weight_scale = (s if block_scaled else s.reshape(-1)).contiguous()
        mod.bias = None if linear.bias is None else linear.bias
        return mod

    @property
    def granularity(self) -> str:
        return "block128x128" if self.block_scaled else "row"

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        s = self.weight_scale if self.block_scaled else self.weight_scale.view(-1, 1)
        return dequantize_fp8_reference(self.weight, s, self.granularity, dtype or self.orig_dtype)

    def _bf16_weight(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The kept original's weight when it is on x's device (the "bf16" dispatch path), else None."""
        orig = self._original[0] if self._original else None
        w = getattr(orig, "weight", None)
        return w if isinstance(w, torch.Tensor) and w.device == x.device else None

    def path_for(self, x: Union[torch.Tensor, Float8Rows]) -> str:
        """The path forward(x) runs on CUDA: "triton", "scaled_mm" or "bf16" (see dz_kernels.quant.dispatch). For a
        Float8Rows: "triton" (our FP8 GEMM on the rows), "scaled_mm" (cuBLAS's FP8 GEMM on the rows) or "bf16" (the
        rows dequantized, then the kept bf16 weight's GEMM)."""
        t, out_dtype = (x.data, x.dtype) if isinstance(x, Float8Rows) else (x, x.dtype)
        return self._path(t, out_dtype)

    def _path(self, t: torch.Tensor, out_dtype: torch.dtype) -> str:
        """fp8_linear_path for an input like t [..., K] (or its rows), resolved once per (device, tokens, output
        dtype, bf16 weight kept, config generation). The last answer is kept beside the dict of all answers, so the
        producer's accepts_fp8_rows(x) and the forward that follows it share one resolution, and a forward costs at
        most one dictionary lookup (none when the shape repeats). Under torch.compile the lookup is traced as is
        (it is constant-folded into the graph)."""
        bf16 = self._bf16_weight(t) is not None
        M = t.numel() // self.in_features
        if torch.compiler.is_compiling():
            return fp8_linear_path(M, self.in_features, self.out_features, t.device, block_scaled=self.block_scaled,
                                   has_bf16_weight=bf16, out_dtype=out_dtype)
        key = (t.device, M, out_dtype, bf16, configs.generation())
        cache = self._paths
        last = cache.last
        if last is not None and last[0] == key:
            return last[1]
        path = cache.paths.get(key)
        if path is None:
            if len(cache.paths) >= _PathCache.SIZE:
                cache.paths.clear()
            path = cache.paths[key] = fp8_linear_path(M, self.in_features, self.out_features, t.device,
                                                      block_scaled=self.block_scaled, has_bf16_weight=bf16,
                                                      out_dtype=out_dtype)
        cache.last = (key, path)
        return path

    def accepts_fp8_rows(self, x: torch.Tensor) -> bool:
        """True when handing this module quantize_rows(x) (or a producer's equal Float8Rows) in place of x saves
        work: per-token scaling and, on CUDA, an FP8 path for x's shape (where the dispatch runs bf16, the module
        is better off with the float x)."""
        return not self.block_scaled and (not _runs_dispatch(x) or self._path(x, x.dtype) != "bf16")

    @staticmethod
    def quantize_rows(x: torch.Tensor) -> Float8Rows:
        """The per-token quantizer forward(x) applies (dz_kernels.quant.quantize_rows)."""
        return quantize_rows(x)

    def _forward_rows(self, r: Float8Rows) -> torch.Tensor:
        _check_rows(self, r)
        K, lead = self.in_features, r.data.shape[:-1]
        a, sa = r.data.reshape(-1, K), r.scale.reshape(-1, 1)
        if _runs_dispatch(a):
            y = fp8_rows_dispatch(a, sa, self.weight, self.weight_scale, self.bias, out_dtype=r.dtype,
                                  bf16_weight=self._bf16_weight(a), path=self._path(a, r.dtype))
        else:
            y = fp8_gemm_reference(a, sa, self.weight, self.weight_scale, block_scaled=False, bias=self.bias,
                                   out_dtype=r.dtype)
        return y.view(*lead, self.out_features)

    def forward(self, x: Union[torch.Tensor, Float8Rows]) -> torch.Tensor:
        if isinstance(x, Float8Rows):
            return self._forward_rows(x)
        _check_input(self, x)
        if _runs_dispatch(x):
            return fp8_linear_dispatch(x, self.weight, self.weight_scale, self.bias, block_scaled=self.block_scaled,
                                       bf16_weight=self._bf16_weight(x), path=self._path(x, x.dtype))
        x2 = cm.as_rows(x)
        a, sa = quantize_fp8_reference(x2, "block1x128" if self.block_scaled else "row")
        y = fp8_gemm_reference(a, sa, self.weight, self.weight_scale, block_scaled=self.block_scaled, bias=self.bias,
                               out_dtype=x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        scaling = ("weight 128x128 / activation 1x128 blocks" if self.block_scaled
                   else "per-channel weight / per-token activation")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{scaling}")


class NVFP4Linear(_QuantLinearBase):
    """nn.Linear with an NVFP4 weight: W4A16 (act_quant=False) or W4A4 (act_quant=True).

    Buffers (ModelOpt names and layouts): weight [N, K/2] uint8 (packed E2M1, even element in the low nibble),
    weight_scale [N, K/16] float8_e4m3fn, weight_scale_2 [] float32 (= amax / 2688), input_scale [] float32 or None
    (W4A4 static activation global scale; None = computed per call). forward: x [..., K] -> [..., N] in x's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act_quant: bool = False,
                 use_dot_scaled: Optional[bool] = None, device=None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if in_features % NVFP4_BLOCK:
            raise ValueError(f"NVFP4 needs in_features to be a multiple of {NVFP4_BLOCK}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.act_quant, self.use_dot_scaled, self.orig_dtype = act_quant, use_dot_scaled, dtype
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, in_features // NVFP4_BLOCK,
                                                         dtype=cm.FP8_DTYPE, device=device))
        self.register_buffer("weight_scale_2", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("input_scale", None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self._calibrating = False
        _keep_original(self, None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_quant: bool = False,
                    use_dot_scaled: Optional[bool] = None) -> "NVFP4Linear":
        """Quantize an nn.Linear's weight to NVFP4 (Triton on CUDA, the bit-identical reference on CPU)."""
        _check_linear_weight(linear, NVFP4_BLOCK, "NVFP4Linear")
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, act_quant, use_dot_scaled,
                  device="meta", dtype=w.dtype)
        with torch.no_grad():
            if w.is_cuda:
                from .ops import quantize_nvfp4
                q, s, g = quantize_nvfp4(w)
            else:
                q, s, g = quantize_nvfp4_reference(w)
        mod.weight, mod.weight_scale, mod.weight_scale_2 = q.contiguous(), s.contiguous(), g.reshape(())
        mod.bias = None if linear.bias is None else linear.bias
        return mod

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize_nvfp4_reference(self.weight, self.weight_scale, self.weight_scale_2, dtype or self.orig_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x)
        if self._calibrating:  # calibrate_: unquantized numerics, as ModelOpt's calibration pass
            if self._original:
                return self._original[0](x)
            w = self.dequantized_weight(x.dtype)
            return torch.nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        if x.is_cuda:
            from .ops import nvfp4_linear
            return nvfp4_linear(x, self.weight, self.weight_scale, self.weight_scale_2, self.bias,
                                act_quant=self.act_quant, input_scale=self.input_scale,
                                use_dot_scaled=self.use_dot_scaled)
        x2 = cm.as_rows(x)
        if self.act_quant:
            a, sa, ga = quantize_nvfp4_reference(x2, self.input_scale)
            y = nvfp4_gemm_w4a4_reference(a, sa, ga, self.weight, self.weight_scale, self.weight_scale_2,
                                          bias=self.bias, out_dtype=x.dtype)
        else:
            xa = x2.to(torch.bfloat16) if x2.dtype == torch.float32 else x2  # 16-bit activations, as on the GPU
            y = nvfp4_gemm_w4a16_reference(xa, self.weight, self.weight_scale, self.weight_scale_2, bias=self.bias,
                                           out_dtype=x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        mode = "W4A4" if self.act_quant else "W4A16"
        static = ", static input_scale" if self.input_scale is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{mode}{static}")


QUANT_LINEAR_TYPES = (Float8Linear, NVFP4Linear)


# ------------------------------------------------------------------------------------------------------- the swap verbs
def _make(linear: nn.Linear, config) -> nn.Module:
    if isinstance(config, Float8DynamicActivationFloat8Weight):
        return Float8Linear.from_linear(linear, block_scaled=False)
    if isinstance(config, Float8BlockScaled):
        return Float8Linear.from_linear(linear, block_scaled=True)
    if isinstance(config, NVFP4WeightOnly):
        return NVFP4Linear.from_linear(linear, act_quant=False)
    return NVFP4Linear.from_linear(linear, act_quant=True, use_dot_scaled=config.use_dot_scaled)


def _k_multiple(config) -> int:
    if isinstance(config, Float8BlockScaled):
        return FP8_BLOCK
    if isinstance(config, (NVFP4WeightOnly, NVFP4)):
        return NVFP4_BLOCK
    return 1


def _set_submodule(root: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def quantize_(model: nn.Module, config: QuantConfig, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
              *, reversible: bool = True) -> nn.Module:
    """Replace, in place, every nn.Linear of `model` selected by filter_fn(module, qualified_name) (default:
    default_filter) with its quantized version for `config`; returns `model`. Only exact nn.Linear instances are
    candidates: subclasses (e.g. MultiheadAttention's out_proj, whose parent reads .weight directly) are left alone.

    Every selected module is checked before any is replaced (a K that the format cannot take raises ValueError
    naming the module), so a failed call leaves the model unchanged. The model itself must not be an nn.Linear
    (wrap it). See the module docstring for reversible."""
    if not isinstance(config, _CONFIG_TYPES):
        raise TypeError(f"config must be one of {', '.join(c.__name__ for c in _CONFIG_TYPES)}, got "
                        f"{type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise ValueError("quantize_ replaces submodules in place; wrap a bare nn.Linear (e.g. nn.Sequential(linear))")
    filter_fn = default_filter if filter_fn is None else filter_fn
    targets = [(n, m) for n, m in model.named_modules() if n and type(m) is nn.Linear and filter_fn(m, n)]
    for name, m in targets:
        _check_linear_weight(m, _k_multiple(config), f"module {name!r} ({type(config).__name__})")
    for name, m in targets:
        q = _make(m, config)
        _keep_original(q, m if reversible else None)
        _set_submodule(model, name, q)
    return model


def dequantize_(model: nn.Module) -> nn.Module:
    """Undo quantize_ in place: each Float8Linear / NVFP4Linear goes back to the nn.Linear it replaced (the same
    object, moved to the quantized module's device) or, when that was not kept, to an nn.Linear holding the
    dequantized weight in the original dtype. Returns `model`."""
    targets = [(n, m) for n, m in model.named_modules() if n and isinstance(m, QUANT_LINEAR_TYPES)]
    for name, m in targets:
        orig = m._original[0] if m._original else None
        device = m.weight.device
        if orig is None:
            orig = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=device,
                             dtype=m.orig_dtype)
            with torch.no_grad():
                orig.weight.copy_(m.dequantized_weight(m.orig_dtype))
                if m.bias is not None:
                    orig.bias.copy_(m.bias)
        else:
            orig.to(device)
        _set_submodule(model, name, orig)
    return model


@torch.no_grad()
def calibrate_(model: nn.Module, run: Callable[[nn.Module], object]) -> dict[str, float]:
    """"max" calibration of the NVFP4 W4A4 activation scales (as the release's ModelOpt flow): runs `run(model)`,
    records each W4A4 NVFP4Linear's input amax and sets input_scale = amax / 2688 (1.0 for an all-zero input).
    Returns {module name: amax}. Afterwards those modules quantize activations with the static scale, and the
    scale is exported as ModelOpt's input_scale.

    As in ModelOpt's calibration pass, the W4A4 modules compute unquantized outputs while calibrating (through the
    kept original nn.Linear, or the dequantized weight when quantize_ ran with reversible=False), so the amax of
    each layer's input does not depend on the quantization of the layers before it."""
    mods = {n: m for n, m in model.named_modules() if isinstance(m, NVFP4Linear) and m.act_quant}
    amax = {n: torch.zeros((), dtype=torch.float32, device=m.weight.device) for n, m in mods.items()}
    hooks = []
    for n, m in mods.items():
        m.input_scale = None  # calibrate with dynamic scales

        def hook(mod, args, _n=n):
            x = args[0]
            amax[_n] = torch.maximum(amax[_n], x.detach().abs().amax().float().to(amax[_n].device))
        hooks.append(m.register_forward_pre_hook(hook))
        m._calibrating = True
    try:
        run(model)
    finally:
        for h in hooks:
            h.remove()
        for m in mods.values():
            m._calibrating = False
    for n, m in mods.items():
        a = amax[n]
        m.input_scale = nvfp4_global_scale_from_amax(a)
    return {n: float(a) for n, a in amax.items()}
