"""Loading: match a checkpoint's keys to the model (every problem reported at once, from the headers, before any
tensor is read), then put each tensor straight into the model, one at a time through safetensors' memory map."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .keys import (DIFFUSERS_IGNORED, DREAMZERO_FROZEN_PREFIXES, CheckpointError, backbone_lacks, check_layout,
                   detect_layout, from_layout_name, to_layout_name)
from .lora import LORA_RE, lora_alpha_from_config, merge_lora, pair_lora
from .manifest import verify_manifest
from .safetensors_io import ST_FLOAT, read_checkpoint_index


@dataclass
class LoadReport:
    """What `load_checkpoint` did. Names are ours unless said otherwise."""
    path: str
    layout: str
    prefix: str
    files: list
    loaded: list = field(default_factory=list)          # parameters set from the checkpoint
    missing: list = field(default_factory=list)         # parameters the checkpoint lacks (left, or initialized)
    initialized: list = field(default_factory=list)     # of those, freshly initialized (they were on the meta device)
    skipped: list = field(default_factory=list)         # checkpoint keys deliberately not loaded (frozen encoders, ...)
    lora_merged: list = field(default_factory=list)     # parameters a LoRA pair was merged into

    def summary(self) -> str:
        s = (f"{self.path}: layout {self.layout!r}, prefix {self.prefix!r}, {len(self.files)} file(s): "
             f"{len(self.loaded)} loaded")
        if self.lora_merged:
            s += f", {len(self.lora_merged)} LoRA pairs merged"
        if self.missing:
            s += f", {len(self.missing)} missing ({len(self.initialized)} freshly initialized)"
        if self.skipped:
            s += f", {len(self.skipped)} checkpoint keys skipped"
        return s


def _split_prefix(keys, layout: str) -> str:
    """The common prefix in front of the model's names (e.g. 'action_head.model.' or 'action_head.model.base_model.
    model.'), found from the block and head keys."""
    counts = {}
    pat = re.compile(r"^(.*?)(?:blocks\.\d+\.|action_encoder\.|state_encoder\.|action_decoder\.|patch_embedding\.)")
    for k in keys:
        if layout == "dreamzero" and k.startswith(DREAMZERO_FROZEN_PREFIXES):
            continue
        m = pat.match(k)
        if m and (m.group(1) == "" or m.group(1).endswith(".")):
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    if not counts:
        return ""
    if len(counts) > 1:
        raise CheckpointError(f"the checkpoint mixes several key prefixes {sorted(counts)}; it holds more than one "
                              f"model")
    return next(iter(counts))


def _plan(model: nn.Module, tensors: dict, layout: str, strict: bool, allow_missing_heads: bool, path: str):
    """Match checkpoint keys to the model. Returns (prefix, direct: ours -> ckpt key, lora: ours -> (A key, B key),
    missing, skipped); raises one CheckpointError listing every problem."""
    prefix = _split_prefix(tensors, layout)
    targets = {n: t for n, t in model.state_dict(keep_vars=True).items()}
    direct, lora_parts, skipped, problems, seen = {}, {}, [], [], set()
    for key in sorted(tensors):
        info = tensors[key]
        if layout == "dreamzero" and key.startswith(DREAMZERO_FROZEN_PREFIXES):
            skipped.append(key)
            continue
        if not key.startswith(prefix):
            problems.append(f"unexpected: {key} (outside the model prefix {prefix!r})")
            continue
        rel = key[len(prefix):]
        if layout == "diffusers" and DIFFUSERS_IGNORED.fullmatch(rel):
            skipped.append(key)
            continue
        m = LORA_RE.fullmatch(rel)
        if m:
            mod = m.group(1)
            ours = from_layout_name(mod + ".weight", layout)
            if ours is None or ours not in targets:
                problems.append(f"unexpected: {key} (a LoRA matrix for no parameter of the model)")
                continue
            lora_parts.setdefault(ours, {})[m.group(2)] = key
            continue
        rel = rel.replace(".base_layer.", ".")
        ours = from_layout_name(rel, layout)
        if ours is None or ours not in targets:
            problems.append(f"unexpected: {key}")
            continue
        if ours in seen:
            problems.append(f"duplicate: {key} and another key both give {ours}")
            continue
        seen.add(ours)
        want = tuple(targets[ours].shape)
        if info.shape != want:
            problems.append(f"mis-shaped: {key}: checkpoint {list(info.shape)}, model {ours} {list(want)}")
            continue
        if info.dtype not in ST_FLOAT and targets[ours].is_floating_point():
            problems.append(f"wrong dtype: {key}: {info.dtype} for a floating-point parameter")
            continue
        if info.dtype.startswith("F8_") and targets[ours].is_floating_point():
            problems.append(f"wrong dtype: {key}: {info.dtype} (float8 values without their scales are not "
                            f"weights: load a bf16/fp32 checkpoint and quantize it with dz_kernels.quant, or a "
                            f"ModelOpt export with dz_kernels.quant.load_modelopt_)")
            continue
        direct[ours] = key
    lora, lora_problems = pair_lora(lora_parts, tensors, targets)
    problems += lora_problems
    missing = sorted(n for n in targets if n not in seen)
    model_type = getattr(getattr(model, "cfg", None), "model_type", "i2v")
    for n in missing:
        # what the Wan release lacks (heads; the 5B's CLIP branch) may be missing from a 'wan'/'diffusers' file
        lacks = backbone_lacks(n, model_type if layout != "dreamzero" else "i2v")
        shown = prefix + (to_layout_name(n, layout) if layout == "diffusers" else n)
        if strict and not (lacks and allow_missing_heads):
            hint = f" ({lacks}: pass allow_missing_heads=True to keep it as initialized)" if lacks else ""
            problems.append(f"missing: {shown}{hint}")
        elif targets[n].is_meta and not lacks:
            problems.append(f"missing: {shown} (the model holds no value for it either: it is on the meta device)")
    for n in lora:
        if n not in direct and targets[n].is_meta:
            problems.append(f"LoRA pair for {n}, whose base weight is neither in the checkpoint nor in the model")
    if problems:
        raise CheckpointError(f"{path} (layout {layout!r}) does not match the model: {len(problems)} problem(s)\n  "
                              + "\n  ".join(problems))
    return prefix, direct, lora, missing, skipped


def _check_one_dtype(model: nn.Module, tensors: dict, direct: dict, dtype, path: str) -> None:
    """Tensors that go into the model as they are (dtype=None, parameters on the meta device) keep the checkpoint's
    dtypes: a mix of floating dtypes there would fail later, inside a matmul. Refuse it here, naming the tensors."""
    if dtype is not None:
        return
    targets = model.state_dict(keep_vars=True)
    by_dtype: dict = {}
    for ours, key in direct.items():
        if targets[ours].is_meta and targets[ours].is_floating_point():
            by_dtype.setdefault(tensors[key].dtype, []).append(key)
    if len(by_dtype) > 1:
        parts = []
        for dt, keys in sorted(by_dtype.items(), key=lambda kv: len(kv[1])):
            shown = ", ".join(sorted(keys)[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
            parts.append(f"{dt}: {shown}")
        raise CheckpointError(f"{path}: mixes floating dtypes ({'; '.join(parts)}); a model built from it would "
                              f"hold both and fail in its first matmul: pass dtype= (e.g. torch.bfloat16) to convert "
                              f"every tensor on load")


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, dtype, device) -> None:
    """Put `value` into parameter/buffer `name`: copied in place when the model already holds it with the same
    dtype and device, else assigned (a meta model takes the tensor itself: no second copy)."""
    mod_path, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_path) if mod_path else model
    old = mod._parameters.get(leaf) if leaf in mod._parameters else mod._buffers.get(leaf)
    tdtype = dtype or (value.dtype if old.is_meta else old.dtype)
    tdev = torch.device(device) if device is not None else (torch.device("cpu") if old.is_meta else old.device)
    value = value.to(device=tdev, dtype=tdtype)
    if not old.is_meta and old.dtype == value.dtype and old.device == value.device:
        with torch.no_grad():
            old.copy_(value)
        return
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        mod._buffers[leaf] = value


def _init_fresh(model: nn.Module, name: str, dtype, device) -> None:
    """Initialize a parameter the checkpoint lacks and the model has only on the meta device, as the release does:
    the DreamZero heads (category-specific W ~ 0.02 N(0, 1), b = 0, as modules.CategorySpecificLinear) and the 5B's
    CLIP branch (CausalWanModel.init_weights: Xavier-uniform Linear weights, zero biases; norms at one / zero)."""
    mod_path, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_path)
    old = mod._parameters[leaf]
    kind = type(mod).__name__
    known = {"CategorySpecificLinear": ("W", "b"), "Linear": ("weight", "bias"), "RMSNorm": ("weight",),
             "LayerNorm": ("weight", "bias")}
    if leaf not in known.get(kind, ()):
        raise CheckpointError(f"{name} is not in the checkpoint and the model holds no value for it (meta device)")
    t = torch.empty(old.shape, dtype=dtype or torch.float32, device=device or "cpu")
    with torch.no_grad():
        if kind == "CategorySpecificLinear":
            t.normal_(0.0, 0.02) if leaf == "W" else t.zero_()
        elif kind == "Linear" and leaf == "weight":
            nn.init.xavier_uniform_(t)
        else:
            t.fill_(1.0 if leaf == "weight" else 0.0)
    mod._parameters[leaf] = nn.Parameter(t, requires_grad=old.requires_grad)


def load_checkpoint(model: nn.Module, path, layout: str | None = None, *, dtype: torch.dtype | None = None,
                    device=None, strict: bool = True, allow_missing_heads: bool = False,
                    lora_alpha: float | None = None, verify: bool = True) -> LoadReport:
    """Load a safetensors checkpoint into `model` (a DreamZero, possibly built on the meta device).

    path: a .safetensors file, a .safetensors.index.json, or a folder (see `resolve_checkpoint`).
    layout: 'dreamzero' | 'wan' | 'diffusers', or None to detect it from the keys.
    dtype / device: convert every loaded tensor (None keeps the model's dtype and device; on the meta device the
        checkpoint's dtype and the CPU).
    strict: every model parameter must be in the checkpoint, except with allow_missing_heads what the Wan release
        lacks (`backbone_lacks`: the DreamZero heads; for a 'ti2v' model read from a 'wan'/'diffusers' file, the
        CLIP branch Wan2.2-TI2V-5B has none of).
        strict=False allows any missing parameter the model already holds (e.g. applying a LoRA-only file on top
        of loaded base weights); parameters on the meta device are never left unset.
    lora_alpha: PEFT LoRA scale numerator for files with lora_A/lora_B pairs (scale = lora_alpha / rank); read from
        the release's config.json beside the file when not given.
    verify: check the files against the SHA256SUMS beside them when there is one (written by `dz export`; see
        checkpoint.manifest) before anything is read into the model.
    Every problem (missing, unexpected, mis-shaped keys, float8 or mixed floating dtypes that would reach the model
    as they are) is checked from the headers before any tensor is read, and reported in one CheckpointError.
    Returns a LoadReport.
    """
    tensors, files = read_checkpoint_index(path)
    if verify:
        verify_manifest(files)
    if layout is None:
        layout = detect_layout(tensors)
    check_layout(layout)
    prefix, direct, lora, missing, skipped = _plan(model, tensors, layout, strict, allow_missing_heads, str(path))
    _check_one_dtype(model, tensors, direct, dtype, str(path))
    if lora and lora_alpha is None:
        lora_alpha = lora_alpha_from_config(files)
        if lora_alpha is None:
            raise CheckpointError(f"{path}: holds {len(lora)} LoRA pairs but no lora_alpha was given and no release "
                                  f"config.json beside it says it; pass lora_alpha=")
    report = LoadReport(path=str(path), layout=layout, prefix=prefix, files=list(files), missing=missing,
                        skipped=skipped)
    from safetensors import safe_open

    by_file: dict = {}
    for ours, key in direct.items():
        by_file.setdefault(tensors[key].file, []).append((ours, key))
    lora_keys = {k for pair in lora.values() for k in pair}
    lora_vals: dict = {}
    for fp in files:
        try:
            with safe_open(fp, framework="pt", device="cpu") as f:
                for ours, key in by_file.get(fp, []):
                    _set_tensor(model, ours, f.get_tensor(key), dtype, device)
                    report.loaded.append(ours)
                for key in (k for k in lora_keys if tensors[k].file == fp):
                    lora_vals[key] = f.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt data
            raise CheckpointError(f"{fp}: could not read tensors ({type(e).__name__}: {e})") from None
    for ours, (ka, kb) in lora.items():
        merge_lora(model.get_parameter(ours), lora_vals.pop(ka), lora_vals.pop(kb), lora_alpha)
        report.lora_merged.append(ours)
    for name in missing:
        t = model.get_parameter(name) if _is_param(model, name) else None
        if t is not None and t.is_meta:
            _init_fresh(model, name, dtype or _common_dtype(model), device)
            report.initialized.append(name)
        elif t is not None and (dtype is not None or device is not None):
            _set_tensor(model, name, t.detach(), dtype, device)
    still_meta = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{path}: these stay on the meta device: {still_meta}")
    return report


def _is_param(model, name) -> bool:
    try:
        model.get_parameter(name)
        return True
    except AttributeError:
        return False


def _common_dtype(model) -> torch.dtype:
    counts: dict = {}
    for p in model.parameters():
        if not p.is_meta and p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def load_model(config=None, path=None, layout: str | None = None, *, dtype: torch.dtype | None = None,
               device="cpu", strict: bool = True, allow_missing_heads: bool = False, lora_alpha: float | None = None,
               return_report: bool = False):
    """Build a DreamZero on the meta device (nothing allocated, no random init) and load `path` into it.

        model = load_model("/runs/x/export")              # an export folder of `dz export`: it carries its config
        model = load_model("droid-14b", "/ckpt/release")  # any safetensors checkpoint, with the model config

    config: a config name ('tiny', 'droid-14b', a preset such as 'tiny-synthetic'), a DreamZeroConfig, or None for
        the config an export carries (dz_config.json beside the weights). Given explicitly for an export, it must
        have the export's shapes.
    path: a .safetensors file, an index, or a folder; with a single argument, `load_model(path)` loads the export
        folder (or weights file of one) `path`. A training checkpoint or run folder is refused with the next step
        (`dz export`): its DCP files are not inference weights.
    dtype None keeps the checkpoint's dtypes. Returns the model (in eval mode), or (model, LoadReport) with
    return_report=True.
    """
    import os

    from ..config import DreamZeroConfig, config_names, get_config
    from ..dreamzero import DreamZero
    from .exported import find_export, read_export, refuse_training_checkpoint

    if path is None:
        if isinstance(config, (str, os.PathLike)) and os.path.exists(config):
            config, path = None, config
        elif isinstance(config, str) and config in config_names():
            raise TypeError(f"load_model({config!r}) needs the checkpoint too: load_model({config!r}, path)")
        elif config is None or isinstance(config, DreamZeroConfig):
            raise TypeError("load_model needs the checkpoint path: load_model(path) for an export folder, or "
                            "load_model(config, path)")
        else:
            raise CheckpointError(f"{config}: no such export folder or checkpoint")
    refuse_training_checkpoint(path)
    info = read_export(path) if find_export(path) is not None else None
    if config is None:
        if info is None:
            raise CheckpointError(f"{path} carries no dz_config.json (it is not a `dz export` folder): pass the model "
                                  f"config, e.g. load_model('droid-14b', {str(path)!r})")
        cfg, path = info.config, info.weights
        layout = layout or info.layout
    else:
        cfg = get_config(config) if isinstance(config, str) else config
        if info is not None:
            _check_export_config(cfg, info, path)
            layout = layout or info.layout
    with torch.device("meta"):
        model = DreamZero(cfg)
    report = load_checkpoint(model, path, layout, dtype=dtype, device=device, strict=strict,
                             allow_missing_heads=allow_missing_heads, lora_alpha=lora_alpha)
    model.eval()
    return (model, report) if return_report else model


# Config fields a config given for an export may change: the attention rules and what describes the preset (not used
# by the model's math); every other field sets a shape or the computation.
_FREE_FIELDS = ("name", "train_rule", "inference_rule", "backbone", "robot", "num_views", "view_size", "action_hz",
                "robot_action_dim", "robot_state_dim", "finetune", "init_from")


def _check_export_config(cfg, info, path) -> None:
    """A config given for an export must be the export's, up to _FREE_FIELDS."""
    import dataclasses

    ours, theirs = dataclasses.asdict(cfg), dataclasses.asdict(info.config)
    diff = [f"{k} {ours[k]} (export: {theirs.get(k)})" for k in ours
            if k not in _FREE_FIELDS and ours[k] != theirs.get(k)]
    if diff:
        raise CheckpointError(f"{path} was exported from config {info.config_name!r}; the config given differs: "
                              f"{', '.join(diff)}. Load it with its own config: load_model({str(path)!r}) "
                              f"(dz serve {info.folder})")
