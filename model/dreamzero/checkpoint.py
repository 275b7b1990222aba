"""Checkpoints: load and save DreamZero weights as safetensors, in three key layouts, without holding a model twice.

Key layouts (our parameter names are the original Wan2.1 release's plus the DreamZero release's heads):

    "dreamzero"  the DreamZero release's full-model files (`model.safetensors` or `model.safetensors.index.json`,
                 written by the release's VLA.save_pretrained): our names under the prefix `action_head.model.`
                 (the DiT lives at `self.model` of the action head, which lives at `action_head` of the VLA). The
                 release's files also hold the frozen encoders (`action_head.text_encoder.`,
                 `action_head.image_encoder.`, `action_head.vae.`); those are skipped here (encoders.py loads them from their own releases) and listed
                 in the report. A LoRA-trained release wraps the DiT in PEFT (`action_head.model.base_model.model.`,
                 `q.base_layer.weight`, `q.lora_A.default.weight`, ...): the base weights load and each LoRA pair is
                 merged, W += (lora_alpha / rank) * B @ A (see `load_checkpoint`).
    "wan"        the original Wan2.1 release (`diffusion_pytorch_model*.safetensors` of Wan-AI/Wan2.1-I2V-14B-480P):
                 our names, no prefix. It has no DreamZero heads: they stay as initialized, only with
                 `allow_missing_heads=True`, and the report lists them.
    "diffusers"  diffusers' WanTransformer3DModel (the `transformer/` folder of the *-Diffusers releases). The mapping
                 is the inverse of diffusers' own `convert_wan_transformer_to_diffusers` (loaders/single_file_utils.py):
                     blocks.N.self_attn.{q,k,v,o}     <-> blocks.N.attn1.{to_q,to_k,to_v,to_out.0}
                     blocks.N.self_attn.norm_{q,k}    <-> blocks.N.attn1.norm_{q,k}
                     blocks.N.cross_attn.{q,k,v,o}    <-> blocks.N.attn2.{to_q,to_k,to_v,to_out.0}
                     blocks.N.cross_attn.norm_{q,k}   <-> blocks.N.attn2.norm_{q,k}
                     blocks.N.cross_attn.{k,v}_img    <-> blocks.N.attn2.add_{k,v}_proj
                     blocks.N.cross_attn.norm_k_img   <-> blocks.N.attn2.norm_added_k
                     blocks.N.norm3 (cross-attn, affine) <-> blocks.N.norm2   (diffusers numbers its norms in call
                                                          order; our norm2 and diffusers' norm3 have no parameters)
                     blocks.N.ffn.0 / ffn.2           <-> blocks.N.ffn.net.0.proj / ffn.net.2
                     blocks.N.modulation              <-> blocks.N.scale_shift_table
                     time_embedding.{0,2}             <-> condition_embedder.time_embedder.linear_{1,2}
                     time_projection.1                <-> condition_embedder.time_proj
                     text_embedding.{0,2}             <-> condition_embedder.text_embedder.linear_{1,2}
                     img_emb.proj.{0,1,3,4}           <-> condition_embedder.image_embedder.{norm1,ff.net.0.proj,
                                                                                             ff.net.2,norm2}
                     head.head / head.modulation      <-> proj_out / scale_shift_table
                     patch_embedding                  <-> patch_embedding
                 `blocks.N.attn2.norm_added_q.weight` (an unused norm in some early diffusers files, which diffusers
                 itself ignores on load) is skipped. The math is the same as ours: tests/test_checkpoint.py runs a
                 random diffusers model and ours on the same input and compares the outputs (RoPE on adjacent pairs
                 with the same 3D split, [cos, sin] time embedding). One numerical difference: diffusers computes the
                 sinusoidal time embedding in fp32, Wan (and we) in fp64; at t ~ 1000 that is ~6e-5 in an angle.
                 The DreamZero heads have no diffusers names: they are written and read under our names.

The layout of a file is detected from its keys when not given. Files are read through safetensors' memory map one
tensor at a time; tensors go straight into the model (assigned into a model built on the meta device, or copied
into existing parameters), so a 14B checkpoint is never held twice. Nothing is unpickled: only safetensors files
are accepted. Writing is atomic (temporary file in the same folder, fsync, os.replace).
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
import tempfile
from dataclasses import dataclass, field

import torch
import torch.nn as nn

LAYOUTS = ("dreamzero", "wan", "diffusers")
DREAMZERO_PREFIX = "action_head.model."
# Frozen parts stored beside the DiT in the release's full-model files; encoders.py loads them from their releases.
DREAMZERO_FROZEN_PREFIXES = ("action_head.text_encoder.", "action_head.image_encoder.", "action_head.vae.")
HEAD_PREFIXES = ("action_encoder.", "state_encoder.", "action_decoder.")
DEFAULT_MAX_SHARD_BYTES = 5 * 2 ** 30
_BASENAME = {"dreamzero": "model", "wan": "diffusion_pytorch_model", "diffusers": "diffusion_pytorch_model"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: unreadable files, or keys that do not match the model."""


# ---------------------------------------------------------------------------------------------- key mappings
_D_GLOBAL = {  # module paths: ours -> diffusers
    "patch_embedding": "patch_embedding",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "head.head": "proj_out",
}
_D_GLOBAL_PARAM = {"head.modulation": "scale_shift_table"}
_D_BLOCK = {  # module paths under blocks.N: ours -> diffusers
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm3": "norm2", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
_D_BLOCK_PARAM = {"modulation": "scale_shift_table"}
_INV = {name: {v: k for k, v in table.items()} for name, table in
        (("global", _D_GLOBAL), ("global_param", _D_GLOBAL_PARAM), ("block", _D_BLOCK),
         ("block_param", _D_BLOCK_PARAM))}
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")
_DIFFUSERS_IGNORED = re.compile(r"blocks\.\d+\.attn2\.norm_added_q\.weight")


def _map_name(name: str, fwd: bool) -> str | None:
    """Ours -> diffusers (fwd) or diffusers -> ours; None when the name has no counterpart."""
    g, gp, b, bp = ((_D_GLOBAL, _D_GLOBAL_PARAM, _D_BLOCK, _D_BLOCK_PARAM) if fwd else
                    (_INV["global"], _INV["global_param"], _INV["block"], _INV["block_param"]))
    if name.startswith(HEAD_PREFIXES):
        return name
    if name in gp:
        return gp[name]
    m = _BLOCK_RE.fullmatch(name)
    if m:
        i, rest = m.groups()
        if rest in bp:
            return f"blocks.{i}.{bp[rest]}"
        if "." in rest:
            mod, leaf = rest.rsplit(".", 1)
            if mod in b:
                return f"blocks.{i}.{b[mod]}.{leaf}"
        return None
    if "." in name:
        mod, leaf = name.rsplit(".", 1)
        if mod in g:
            return f"{g[mod]}.{leaf}"
    return None


def to_layout_name(name: str, layout: str) -> str:
    """Our parameter name -> its key in `layout` (prefix included for 'dreamzero')."""
    _check_layout(layout)
    if layout == "dreamzero":
        return DREAMZERO_PREFIX + name
    if layout == "wan":
        return name
    out = _map_name(name, fwd=True)
    if out is None:
        raise CheckpointError(f"parameter {name!r} has no name in the diffusers layout")
    return out


def from_layout_name(key: str, layout: str) -> str | None:
    """A checkpoint key of `layout` with its prefix already removed -> our parameter name (None if it has none)."""
    _check_layout(layout)
    if layout == "diffusers":
        return _map_name(key, fwd=False)
    return key


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; known: {LAYOUTS}")


def detect_layout(keys) -> str:
    """Guess the key layout of a checkpoint from its tensor names ('dreamzero', 'wan' or 'diffusers')."""
    keys = list(keys)
    if any(".attn1.to_q." in k or ".attn2.add_k_proj." in k or k.startswith("condition_embedder.")
           or ".condition_embedder." in k for k in keys):
        return "diffusers"
    if any(k.startswith("action_head.") for k in keys):
        return "dreamzero"
    if any(re.search(r"(^|\.)blocks\.\d+\.(self_attn|cross_attn)\.", k) or k.startswith(HEAD_PREFIXES)
           for k in keys):
        return "wan"
    sample = ", ".join(sorted(keys)[:5])
    raise CheckpointError(f"cannot tell the key layout of this checkpoint ({len(keys)} tensors, e.g. {sample}); "
                          f"pass layout= one of {LAYOUTS}")


# ---------------------------------------------------------------------------------------------- reading files
@dataclass
class _TensorInfo:
    file: str
    shape: tuple
    dtype: str


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_ST_FLOAT = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def resolve_checkpoint(path) -> tuple:
    """Find the files of a checkpoint. `path` is a .safetensors file, an index .json, or a folder holding one of
    model.safetensors[.index.json] / diffusion_pytorch_model.safetensors[.index.json] (or a diffusers pipeline
    folder, whose transformer/ subfolder is used). Returns (list of shard files, weight_map dict or None)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if not _dir_candidates(path) and os.path.exists(os.path.join(path, "model_index.json")):
            path = os.path.join(path, "transformer")     # a diffusers pipeline folder
        cands = _dir_candidates(path)
        if not cands:
            listing = sorted(os.listdir(path))[:20] if os.path.isdir(path) else []
            raise CheckpointError(f"{path}: no safetensors checkpoint found (looked for model.safetensors[.index.json],"
                                  f" diffusion_pytorch_model.safetensors[.index.json], or a single *.safetensors); "
                                  f"the folder holds {listing}")
        if len(cands) > 1:
            names = [os.path.basename(c) for c in cands]
            raise CheckpointError(f"{path}: several checkpoints in one folder ({names}); pass the file or index to load")
        path = cands[0]
    elif path.endswith(".safetensors") and not os.path.exists(path) and os.path.exists(path + ".index.json"):
        path = path + ".index.json"                      # saved sharded by save_checkpoint(path=...safetensors)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if path.endswith(".json"):
        try:
            with open(path) as f:
                index = json.load(f)
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map must map tensor names to file names")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        base = os.path.dirname(os.path.abspath(path))
        files = []
        for name in sorted(set(weight_map.values())):
            fp = os.path.join(base, name)
            if os.path.basename(name) != name or not os.path.exists(fp):
                raise CheckpointError(f"{path}: the index names shard {name!r}, which is not in {base}")
            files.append(fp)
        return files, {k: os.path.join(base, v) for k, v in weight_map.items()}
    if path.endswith((".pt", ".pth", ".bin", ".ckpt")):
        raise CheckpointError(f"{path}: only safetensors checkpoints are read (pickle files can run code); "
                              f"convert it to safetensors first")
    return [path], None


def _dir_candidates(path: str) -> list:
    if not os.path.isdir(path):
        return []
    names = set(os.listdir(path))
    std = [n for n in ("model.safetensors.index.json", "model.safetensors",
                       "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors")
           if n in names]
    if std:
        # a sharded set together with its own single file of the same base name is ambiguous; anything else is not
        return [os.path.join(path, n) for n in std]
    idx = sorted(n for n in names if n.endswith(".safetensors.index.json"))
    if idx:
        return [os.path.join(path, n) for n in idx]
    single = sorted(n for n in names if n.endswith(".safetensors"))
    return [os.path.join(path, n) for n in single]


def read_header(file: str) -> dict:
    """Tensor name -> _TensorInfo of one safetensors file, from its header only (nothing is loaded).

    Checks what a memory map needs: the header parses, every tensor lies inside the file, the dtype is known."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError(f"file of {size} bytes is too short for a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 * 2 ** 20):
                raise ValueError(f"header length {n} does not fit in a file of {size} bytes")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        out, data_len = {}, size - 8 - n
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dt, shape, (a, b) = meta["dtype"], tuple(int(s) for s in meta["shape"]), meta["data_offsets"]
            if dt not in _ST_DTYPES:
                raise ValueError(f"tensor {name!r} has an unsupported dtype {dt!r}")
            nbytes = math.prod(shape) * _ST_DTYPES[dt].itemsize
            if not (0 <= a <= b <= data_len) or b - a != nbytes:
                raise ValueError(f"tensor {name!r} spans bytes [{a}, {b}) but the data section holds {data_len} "
                                 f"bytes and the tensor needs {nbytes} (truncated file?)")
            out[name] = _TensorInfo(file, shape, dt)
        return out
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise CheckpointError(f"{file}: corrupt or not a safetensors file ({type(e).__name__}: {e})") from None


def read_checkpoint_index(path) -> tuple:
    """All tensors of a checkpoint from the headers: (dict name -> _TensorInfo, list of files). Checks that an index
    and its shards agree (every indexed tensor is in its shard, no tensor in two shards, none left out)."""
    files, weight_map = resolve_checkpoint(path)
    tensors, problems = {}, []
    for fp in files:
        for name, info in read_header(fp).items():
            if name in tensors:
                problems.append(f"{name}: in both {tensors[name].file} and {fp}")
                continue
            tensors[name] = info
    if weight_map is not None:
        for name, fp in weight_map.items():
            if name not in tensors or os.path.abspath(tensors[name].file) != os.path.abspath(fp):
                problems.append(f"{name}: the index places it in {os.path.basename(fp)}, which does not hold it")
        for name in tensors:
            if name not in weight_map:
                problems.append(f"{name}: in {os.path.basename(tensors[name].file)} but not in the index")
    if problems:
        raise CheckpointError(f"{path}: the index and its shards disagree:\n  " + "\n  ".join(sorted(problems)))
    return tensors, files


# ---------------------------------------------------------------------------------------------- loading
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


_LORA_RE = re.compile(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")


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
        if layout == "diffusers" and _DIFFUSERS_IGNORED.fullmatch(rel):
            skipped.append(key)
            continue
        m = _LORA_RE.fullmatch(rel)
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
        if info.dtype not in _ST_FLOAT and targets[ours].is_floating_point():
            problems.append(f"wrong dtype: {key}: {info.dtype} for a floating-point parameter")
            continue
        direct[ours] = key
    lora = {}
    for ours, parts in sorted(lora_parts.items()):
        if set(parts) != {"A", "B"}:
            problems.append(f"incomplete LoRA pair for {ours}: only {sorted(parts.values())}")
            continue
        a, b = tensors[parts["A"]].shape, tensors[parts["B"]].shape
        out_f, in_f = tuple(targets[ours].shape) if targets[ours].dim() == 2 else (None, None)
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or (out_f, in_f) != (b[0], a[1]):
            problems.append(f"mis-shaped LoRA pair for {ours}: A {list(a)}, B {list(b)}, weight "
                            f"{list(targets[ours].shape)}")
            continue
        lora[ours] = (parts["A"], parts["B"])
    missing = sorted(n for n in targets if n not in seen)
    for n in missing:
        is_head = n.startswith(HEAD_PREFIXES)
        shown = prefix + (to_layout_name(n, layout) if layout == "diffusers" else n)
        if strict and not (is_head and allow_missing_heads):
            hint = " (DreamZero head: pass allow_missing_heads=True to keep it as initialized)" if is_head else ""
            problems.append(f"missing: {shown}{hint}")
        elif targets[n].is_meta and not is_head:
            problems.append(f"missing: {shown} (the model holds no value for it either: it is on the meta device)")
    for n in lora:
        if n not in direct and targets[n].is_meta:
            problems.append(f"LoRA pair for {n}, whose base weight is neither in the checkpoint nor in the model")
    if problems:
        raise CheckpointError(f"{path} (layout {layout!r}) does not match the model: {len(problems)} problem(s)\n  "
                              + "\n  ".join(problems))
    return prefix, direct, lora, missing, skipped


def _lora_alpha_from_config(files) -> float | None:
    """lora_alpha from a release config.json beside the checkpoint (action_head_cfg.config.lora_alpha)."""
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(files[0])), "config.json")
    if not os.path.exists(cfg_path):
        return None
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
        ah = cfg.get("action_head_cfg", {})
        ah = ah.get("config", ah) if isinstance(ah.get("config"), dict) else ah
        return float(ah["lora_alpha"]) if "lora_alpha" in ah else None
    except (OSError, ValueError, AttributeError, TypeError):
        return None


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
    """Initialize a parameter the checkpoint lacks and the model has only on the meta device. Only the DreamZero
    heads (category-specific W, b) can be: W ~ 0.02 N(0, 1), b = 0, as modules.CategorySpecificLinear does."""
    mod_path, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_path)
    old = mod._parameters[leaf]
    if type(mod).__name__ != "CategorySpecificLinear" or leaf not in ("W", "b"):
        raise CheckpointError(f"{name} is not in the checkpoint and the model holds no value for it (meta device)")
    t = torch.empty(old.shape, dtype=dtype or torch.float32, device=device or "cpu")
    with torch.no_grad():
        t.normal_(0.0, 0.02) if leaf == "W" else t.zero_()
    mod._parameters[leaf] = nn.Parameter(t, requires_grad=old.requires_grad)


def load_checkpoint(model: nn.Module, path, layout: str | None = None, *, dtype: torch.dtype | None = None,
                    device=None, strict: bool = True, allow_missing_heads: bool = False,
                    lora_alpha: float | None = None) -> LoadReport:
    """Load a safetensors checkpoint into `model` (a DreamZero, possibly built on the meta device).

    path: a .safetensors file, a .safetensors.index.json, or a folder (see `resolve_checkpoint`).
    layout: 'dreamzero' | 'wan' | 'diffusers', or None to detect it from the keys.
    dtype / device: convert every loaded tensor (None keeps the model's dtype and device; on the meta device the
        checkpoint's dtype and the CPU).
    strict: every model parameter must be in the checkpoint (except the DreamZero heads with allow_missing_heads).
        strict=False allows any missing parameter the model already holds (e.g. applying a LoRA-only file on top
        of loaded base weights); parameters on the meta device are never left unset.
    lora_alpha: PEFT LoRA scale numerator for files with lora_A/lora_B pairs (scale = lora_alpha / rank); read from
        the release's config.json beside the file when not given.
    Every problem (missing, unexpected, mis-shaped keys) is checked from the headers before any tensor is read, and
    reported in one CheckpointError. Returns a LoadReport.
    """
    tensors, files = read_checkpoint_index(path)
    if layout is None:
        layout = detect_layout(tensors)
    _check_layout(layout)
    prefix, direct, lora, missing, skipped = _plan(model, tensors, layout, strict, allow_missing_heads, str(path))
    if lora and lora_alpha is None:
        lora_alpha = _lora_alpha_from_config(files)
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
        W = model.get_parameter(ours)
        A, B = lora_vals.pop(ka), lora_vals.pop(kb)
        delta = (float(lora_alpha) / A.shape[0]) * (B.to(W.device, torch.float32) @ A.to(W.device, torch.float32))
        with torch.no_grad():
            W.copy_((W.float() + delta).to(W.dtype))
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


def load_model(config, path, layout: str | None = None, *, dtype: torch.dtype | None = None, device="cpu",
               strict: bool = True, allow_missing_heads: bool = False, lora_alpha: float | None = None,
               return_report: bool = False):
    """Build a DreamZero on the meta device (nothing allocated, no random init) and load `path` into it.

    config: a config name ('tiny', 'droid-14b', ...) or a DreamZeroConfig. dtype None keeps the checkpoint's dtypes.
    Returns the model (in eval mode), or (model, LoadReport) with return_report=True.
    """
    from .config import get_config
    from .dreamzero import DreamZero

    cfg = get_config(config) if isinstance(config, str) else config
    with torch.device("meta"):
        model = DreamZero(cfg)
    report = load_checkpoint(model, path, layout, dtype=dtype, device=device, strict=strict,
                             allow_missing_heads=allow_missing_heads, lora_alpha=lora_alpha)
    model.eval()
    return (model, report) if return_report else model


# ---------------------------------------------------------------------------------------------- saving
def _tensor_bytes(t: torch.Tensor):
    """A little-endian byte view of a CPU tensor (no copy when it is contiguous)."""
    t = t.contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy()


def _write_safetensors_atomic(final_path: str, items: list, metadata: dict) -> None:
    """Write [(key, tensor-producing callable, dtype, shape)] to `final_path` through a temporary file in the same
    folder (fsync, then os.replace). Tensors are produced and written one at a time."""
    header, off = {}, 0
    for key, _, dt, shape in items:
        n = math.prod(shape) * dt.itemsize
        header[key] = {"dtype": _ST_NAMES[dt], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    folder = os.path.dirname(os.path.abspath(final_path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(final_path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            for key, produce, dt, shape in items:
                t = produce()
                if t.dtype != dt or tuple(t.shape) != tuple(shape):
                    raise RuntimeError(f"{key}: produced {t.dtype} {tuple(t.shape)}, planned {dt} {tuple(shape)}")
                f.write(_tensor_bytes(t))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def fsync_dir(folder: str) -> None:
    """fsync a directory (so a rename inside it is durable); a no-op where the OS does not allow it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(model: nn.Module, path, layout: str = "dreamzero", *,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: torch.dtype | None = None,
                    include_heads: bool = True) -> str:
    """Write the model's weights as safetensors in `layout`, atomically; shards with an index when larger than
    `max_shard_bytes`.

    path: a folder (file names follow the layout's release: model[.safetensors|-0000i-of-0000n.safetensors +
        .safetensors.index.json] for 'dreamzero', diffusion_pytorch_model... for 'wan'/'diffusers'), or a
        .safetensors file name (shards, when needed, are named after it).
    dtype: convert floating tensors on the way out (None keeps each tensor's dtype).
    include_heads: write the DreamZero heads (under our names in the 'wan' and 'diffusers' layouts, which have none);
        False writes the backbone only, loadable by diffusers' WanTransformer3DModel as is.
    Returns the path to load from (the single file or the index).
    """
    _check_layout(layout)
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; writing them from a big-endian host is not supported")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        folder, base = os.path.dirname(os.path.abspath(path)), os.path.basename(path)[:-len(".safetensors")]
    else:
        folder, base = os.path.abspath(path), _BASENAME[layout]
    os.makedirs(folder, exist_ok=True)

    items = []
    for name, t in model.state_dict(keep_vars=True).items():
        if t.is_meta:
            raise ValueError(f"{name} is on the meta device: load or initialize the model before saving it")
        if not include_heads and name.startswith(HEAD_PREFIXES):
            continue
        dt = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        if dt not in _ST_NAMES:
            raise TypeError(f"{name}: dtype {dt} has no safetensors name")

        def produce(t=t, dt=dt):
            return t.detach().to(device="cpu", dtype=dt)
        items.append((to_layout_name(name, layout), produce, dt, tuple(t.shape)))

    shards, cur, cur_bytes = [], [], 0
    for it in items:
        n = math.prod(it[3]) * it[2].itemsize
        if cur and cur_bytes + n > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(it)
        cur_bytes += n
    shards.append(cur)
    meta = {"format": "pt", "dz_layout": layout, "dz_config": getattr(getattr(model, "cfg", None), "name", "")}

    single = os.path.join(folder, base + ".safetensors")
    index_path = single + ".index.json"
    old_shards = _indexed_files(index_path)
    if len(shards) == 1:
        _write_safetensors_atomic(single, shards[0], meta)
        for stale in [index_path] + sorted(old_shards):
            _remove_quietly(stale)
        return single
    n = len(shards)
    names = [f"{base}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        _write_safetensors_atomic(os.path.join(folder, name), shard, meta)
        for key, _, dt, shape in shard:
            weight_map[key] = name
            total += math.prod(shape) * dt.itemsize
    body = json.dumps({"metadata": {"total_size": total, "dz_layout": layout}, "weight_map": weight_map},
                      indent=2).encode()
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(index_path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, index_path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    fsync_dir(folder)
    for stale in sorted(old_shards - {os.path.join(folder, nm) for nm in names}) + [single]:
        _remove_quietly(stale)
    return index_path


def _indexed_files(index_path: str) -> set:
    try:
        with open(index_path) as f:
            wm = json.load(f)["weight_map"]
        base = os.path.dirname(index_path)
        return {os.path.join(base, v) for v in set(wm.values()) if os.path.basename(v) == v}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def _remove_quietly(p: str) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass
