"""Saving: the model's weights as safetensors in any of the three key layouts, one file or shards with an index,
each file written atomically (temporary file in the same folder, fsync, os.replace, fsync of the folder)."""
from __future__ import annotations

import json
import math
import os
import sys

import torch
import torch.nn as nn
from dz_kernels.atomic import atomic_write_json, remove_quietly

from .keys import backbone_lacks, check_layout, to_layout_name
from .safetensors_io import ST_NAMES, write_safetensors_atomic

DEFAULT_MAX_SHARD_BYTES = 5 * 2 ** 30
_BASENAME = {"dreamzero": "model", "wan": "diffusion_pytorch_model", "diffusers": "diffusion_pytorch_model"}


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
        False writes the backbone only, what the Wan release has (`backbone_lacks`: no heads, and for a 'ti2v'
        model no CLIP branch), loadable by diffusers' WanTransformer3DModel of that backbone as is.
    Returns the path to load from (the single file or the index).
    """
    check_layout(layout)
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
    model_type = getattr(getattr(model, "cfg", None), "model_type", "i2v")
    for name, t in model.state_dict(keep_vars=True).items():
        if t.is_meta:
            raise ValueError(f"{name} is on the meta device: load or initialize the model before saving it")
        if not include_heads and backbone_lacks(name, model_type):
            continue
        dt = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        if dt not in ST_NAMES:
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
        write_safetensors_atomic(single, shards[0], meta)
        for stale in [index_path] + sorted(old_shards):
            remove_quietly(stale)
        return single
    n = len(shards)
    names = [f"{base}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        write_safetensors_atomic(os.path.join(folder, name), shard, meta)
        for key, _, dt, shape in shard:
            weight_map[key] = name
            total += math.prod(shape) * dt.itemsize
    atomic_write_json(index_path, {"metadata": {"total_size": total, "dz_layout": layout}, "weight_map": weight_map})
    for stale in sorted(old_shards - {os.path.join(folder, nm) for nm in names}) + [single]:
        remove_quietly(stale)
    return index_path


def _indexed_files(index_path: str) -> set:
    try:
        with open(index_path) as f:
            wm = json.load(f)["weight_map"]
        base = os.path.dirname(index_path)
        return {os.path.join(base, v) for v in set(wm.values()) if os.path.basename(v) == v}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
