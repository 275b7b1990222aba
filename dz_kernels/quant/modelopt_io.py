"""Read and write NVIDIA ModelOpt's FP8 and NVFP4 checkpoint tensors (the unified Hugging Face export layout).

Per quantized linear `<name>` a ModelOpt checkpoint holds (ModelOpt 0.47 source, `modelopt/torch/export` and
`modelopt/torch/quantization/qtensor`):
  NVFP4 (quant_algo "NVFP4", W4A4) and W4A16 NVFP4 ("W4A16_NVFP4"), group_size 16:
    <name>.weight          uint8 [N, K/2]            two E2M1 codes per byte, element 2j in the low nibble
    <name>.weight_scale    float8_e4m3fn [N, K/16]   per-block scale (dequantization direction)
    <name>.weight_scale_2  float32 []                amax(W) / (6 * 448)
    <name>.input_scale     float32 []                amax(x) / (6 * 448), calibrated ("NVFP4" only)
  FP8 per channel, per token ("FP8_PER_CHANNEL_PER_TOKEN"):
    <name>.weight          float8_e4m3fn [N, K]      weight / weight_scale[:, None]
    <name>.weight_scale    float32 [N]               amax of each output channel / 448
  FP8 per tensor ("FP8"): weight_scale and input_scale are one-element float32 (amax / 448).
  FP8 block-scaled weights ("fp8_pb_wo", 128x128): weight_scale float32 [ceil(N/128), K/128].
  <name>.bias stays in the model dtype.
The quantized modules of api.py use exactly these buffer names and layouts, so a model quantized by quantize_ has
a ModelOpt-layout state_dict. Loading maps each format onto our kernels:
  NVFP4 with input_scale -> NVFP4Linear W4A4 with that static activation scale;
  W4A16 NVFP4 (no input_scale) -> NVFP4Linear W4A16;
  FP8 per channel -> Float8Linear (per-token dynamic activation scales, as in the checkpoint's recipe);
  FP8 per tensor -> Float8Linear with the scalar weight scale repeated per channel (the same weight values). Our
    kernels quantize the activation per token at run time; the checkpoint's static input_scale is kept on the
    module as `static_input_scale` (not used by the forward, not written back by export);
  FP8 128x128 block weights -> Float8Linear block-scaled (the activation is quantized in 1x128 blocks at run time,
    where ModelOpt's "fp8_pb_wo" keeps it in 16 bits).
Bit-for-bit agreement of our quantizers with ModelOpt's is tested in tests/test_quant_modelopt.py where
nvidia-modelopt is importable (it is skipped elsewhere, with that reason).
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Optional

import torch
import torch.nn as nn

from ..atomic import atomic_output, atomic_write_json
from . import _common as cm
from .api import Float8Linear, NVFP4Linear, QUANT_LINEAR_TYPES, _set_submodule
from .reference import FP8_BLOCK, NVFP4_BLOCK

__all__ = ["linear_from_modelopt", "linear_to_modelopt", "modelopt_quant_config", "export_modelopt",
           "load_modelopt_", "save_modelopt", "read_modelopt"]

SAFETENSORS_NAME = "model.safetensors"
QUANT_CONFIG_NAME = "hf_quant_config.json"


def _get(tensors: Mapping[str, torch.Tensor], key: str, required: bool = True) -> Optional[torch.Tensor]:
    if key in tensors:
        return tensors[key]
    if required:
        raise KeyError(f"ModelOpt tensor {key!r} is missing")
    return None


def _one_element_f32(key: str, t: torch.Tensor) -> torch.Tensor:
    if t.numel() != 1 or not t.is_floating_point():
        raise ValueError(f"{key} must be one floating-point element, got dtype {t.dtype} shape {tuple(t.shape)}")
    return t.reshape(()).to(torch.float32)


def linear_from_modelopt(tensors: Mapping[str, torch.Tensor], prefix: str, in_features: Optional[int] = None,
                         out_features: Optional[int] = None) -> nn.Module:
    """Build a Float8Linear / NVFP4Linear from the ModelOpt tensors `<prefix>.weight`, `.weight_scale`,
    `.weight_scale_2`, `.input_scale`, `.bias` (format detected from the weight's dtype and the scale shapes; the
    module docstring lists the layouts). in_features / out_features, when given, are checked."""
    p = f"{prefix}." if prefix else ""
    w = _get(tensors, p + "weight")
    ws = _get(tensors, p + "weight_scale")
    bias = _get(tensors, p + "bias", required=False)
    inp = _get(tensors, p + "input_scale", required=False)
    if w.dim() != 2:
        raise ValueError(f"{p}weight must be 2-D, got shape {tuple(w.shape)}")
    N = w.shape[0]
    if w.dtype == torch.uint8:
        K = 2 * w.shape[1]
        ws2 = _get(tensors, p + "weight_scale_2")
        if ws.dtype != cm.FP8_DTYPE or tuple(ws.shape) != (N, K // NVFP4_BLOCK) or K % NVFP4_BLOCK:
            raise ValueError(f"{p}weight_scale must be float8_e4m3fn [N, K/16] = [{N}, {K // NVFP4_BLOCK}] for an "
                             f"NVFP4 weight of shape {tuple(w.shape)} (K = {K}); got {ws.dtype} {tuple(ws.shape)}")
        mod = NVFP4Linear(K, N, bias=bias is not None, act_quant=inp is not None, device="meta",
                          dtype=bias.dtype if bias is not None else torch.bfloat16)
        mod.weight = w.contiguous()
        mod.weight_scale = ws.contiguous()
        mod.weight_scale_2 = _one_element_f32(p + "weight_scale_2", ws2).to(w.device)
        if inp is not None:
            mod.input_scale = _one_element_f32(p + "input_scale", inp).to(w.device)
    elif w.dtype == cm.FP8_DTYPE:
        K = w.shape[1]
        if ws.dtype != torch.float32:
            raise TypeError(f"{p}weight_scale of an FP8 weight must be float32, got {ws.dtype}")
        block_shape = (-(-N // FP8_BLOCK), K // FP8_BLOCK)
        if ws.numel() == 1:
            scale, block = ws.reshape(1).expand(N).contiguous(), False
        elif tuple(ws.shape) in ((N,), (N, 1)):
            scale, block = ws.reshape(N).contiguous(), False
        elif K % FP8_BLOCK == 0 and tuple(ws.shape) == block_shape:
            scale, block = ws.contiguous(), True
        else:
            raise ValueError(f"{p}weight_scale has shape {tuple(ws.shape)}; for an FP8 weight [{N}, {K}] expected one "
                             f"element (per tensor), [{N}] (per channel) or {list(block_shape)} (128x128 blocks)")
        mod = Float8Linear(K, N, bias=bias is not None, block_scaled=block, device="meta",
                           dtype=bias.dtype if bias is not None else torch.bfloat16)
        mod.weight = w.contiguous()
        mod.weight_scale = scale
        mod.static_input_scale = None if inp is None else _one_element_f32(p + "input_scale", inp)
    else:
        raise TypeError(f"{p}weight has dtype {w.dtype}: not a ModelOpt FP8 (float8_e4m3fn) or NVFP4 (uint8) weight")
    if in_features is not None and mod.in_features != in_features:
        raise ValueError(f"{p}weight holds K = {mod.in_features} but the model's module has in_features "
                         f"{in_features}")
    if out_features is not None and mod.out_features != out_features:
        raise ValueError(f"{p}weight holds N = {mod.out_features} but the model's module has out_features "
                         f"{out_features}")
    if bias is not None:
        if tuple(bias.shape) != (N,):
            raise ValueError(f"{p}bias has shape {tuple(bias.shape)}, expected [{N}]")
        mod.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return mod


def linear_to_modelopt(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The ModelOpt tensors of one Float8Linear / NVFP4Linear under `<prefix>.`."""
    if not isinstance(module, QUANT_LINEAR_TYPES):
        raise TypeError(f"{prefix}: expected a Float8Linear or NVFP4Linear, got {type(module).__name__}")
    p = f"{prefix}." if prefix else ""
    out = {p + "weight": module.weight, p + "weight_scale": module.weight_scale}
    if isinstance(module, NVFP4Linear):
        out[p + "weight_scale_2"] = module.weight_scale_2
        if module.input_scale is not None:
            out[p + "input_scale"] = module.input_scale
    if module.bias is not None:
        out[p + "bias"] = module.bias.detach()
    return {k: v.detach().contiguous() for k, v in out.items()}


def _algo(module: nn.Module) -> dict:
    if isinstance(module, NVFP4Linear):
        return {"quant_algo": "NVFP4" if module.act_quant else "W4A16_NVFP4", "group_size": NVFP4_BLOCK}
    return {"quant_algo": "fp8_pb_wo" if module.block_scaled else "FP8_PER_CHANNEL_PER_TOKEN"}


def modelopt_quant_config(model: nn.Module) -> dict:
    """The hf_quant_config.json content ModelOpt writes beside its checkpoints, for a model quantized by quantize_:
    {"producer": ..., "quantization": {"quant_algo": ..., ["group_size": 16,] "exclude_modules": [...]}} for one
    format, or quant_algo "MIXED_PRECISION" with per-layer "quantized_layers" for several."""
    layers, excluded = {}, []
    for name, m in model.named_modules():
        if isinstance(m, QUANT_LINEAR_TYPES):
            layers[name] = _algo(m)
        elif isinstance(m, nn.Linear):
            excluded.append(name)
    formats = {json.dumps(v, sort_keys=True) for v in layers.values()}
    quant: dict = {}
    if len(formats) == 1:
        quant.update(next(iter(layers.values())))
        quant["exclude_modules"] = sorted(excluded)
    elif formats:
        quant = {"quant_algo": "MIXED_PRECISION", "quantized_layers": layers, "exclude_modules": sorted(excluded)}
    else:
        quant = {"quant_algo": None, "exclude_modules": sorted(excluded)}
    return {"producer": {"name": "dz_kernels"}, "quantization": quant}


def export_modelopt(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict in ModelOpt's names and layouts, hf_quant_config dict) for a model quantized by quantize_.
    Unquantized parameters and buffers are included as they are."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for name, m in model.named_modules():
        if isinstance(m, QUANT_LINEAR_TYPES):
            state.update(linear_to_modelopt(m, name))
    return state, modelopt_quant_config(model)


def save_modelopt(model: nn.Module, directory: str) -> None:
    """Write `model.safetensors` and `hf_quant_config.json` into `directory` (created if needed)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    state, config = export_modelopt(model)
    # each file atomic and durable (dz_kernels.atomic): a failed write never leaves half a file under its name
    with atomic_output(os.path.join(directory, SAFETENSORS_NAME)) as tmp:
        save_file({k: v.cpu() for k, v in state.items()}, tmp)
    atomic_write_json(os.path.join(directory, QUANT_CONFIG_NAME), config)


def read_modelopt(directory: str, device="cpu") -> tuple[dict[str, torch.Tensor], Optional[dict]]:
    """(tensors of every *.safetensors file in `directory`, hf_quant_config dict or None)."""
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors file in {directory}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(os.path.join(directory, f), device=str(device)))
    cfg_path = os.path.join(directory, QUANT_CONFIG_NAME)
    config = None
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            config = json.load(f)
    return tensors, config


def load_modelopt_(model: nn.Module, tensors: Mapping[str, torch.Tensor], *, strict: bool = True) -> list[str]:
    """Load a ModelOpt checkpoint's tensors into `model` in place: every nn.Linear (or already quantized module)
    whose `<name>.weight` is FP8 or packed NVFP4 becomes the matching Float8Linear / NVFP4Linear built from the
    checkpoint tensors; everything else goes through model.load_state_dict (strict by default).
    Returns the names of the quantized modules."""
    replaced = []
    consumed = set()
    for name, m in list(model.named_modules()):
        if not name or not isinstance(m, (nn.Linear,) + QUANT_LINEAR_TYPES):
            continue
        w = tensors.get(f"{name}.weight")
        if w is None or w.dtype not in (torch.uint8, cm.FP8_DTYPE):
            continue
        q = linear_from_modelopt(tensors, name, m.in_features, m.out_features)
        _set_submodule(model, name, q)
        replaced.append(name)
        consumed.update(f"{name}.{s}" for s in ("weight", "weight_scale", "weight_scale_2", "input_scale", "bias"))
    rest = {k: v for k, v in tensors.items() if k not in consumed}
    quantized_keys = {f"{n}.{s}" for n in replaced for s in ("weight", "weight_scale", "weight_scale_2", "input_scale",
                                                             "bias")}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if k not in quantized_keys]
    if strict and (missing or unexpected):
        raise KeyError(f"load_modelopt_: missing keys {missing}, unexpected keys {unexpected}")
    return replaced
