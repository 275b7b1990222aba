"""Safetensors files without a framework in the way: find a checkpoint's files (single, sharded with an index, or
a folder), read and check their headers (nothing is loaded), and write a file atomically one tensor at a time.

Nothing is unpickled: only safetensors files are accepted."""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch
from dz_kernels.atomic import atomic_write

from .keys import CheckpointError


@dataclass
class TensorInfo:
    file: str
    shape: tuple
    dtype: str


ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
ST_FLOAT = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


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
            raise CheckpointError(f"{path}: several checkpoints in one folder ({names}); "
                                  "pass the file or index to load")
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
    """Tensor name -> TensorInfo of one safetensors file, from its header only (nothing is loaded).

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
            if dt not in ST_DTYPES:
                raise ValueError(f"tensor {name!r} has an unsupported dtype {dt!r}")
            nbytes = math.prod(shape) * ST_DTYPES[dt].itemsize
            if not (0 <= a <= b <= data_len) or b - a != nbytes:
                raise ValueError(f"tensor {name!r} spans bytes [{a}, {b}) but the data section holds {data_len} "
                                 f"bytes and the tensor needs {nbytes} (truncated file?)")
            out[name] = TensorInfo(file, shape, dt)
        return out
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise CheckpointError(f"{file}: corrupt or not a safetensors file ({type(e).__name__}: {e})") from None


def read_checkpoint_index(path) -> tuple:
    """All tensors of a checkpoint from the headers: (dict name -> TensorInfo, list of files). Checks that an index
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


def _tensor_bytes(t: torch.Tensor):
    """A little-endian byte view of a CPU tensor (no copy when it is contiguous)."""
    t = t.contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy()


def write_safetensors_atomic(final_path: str, items: list, metadata: dict) -> None:
    """Write [(key, tensor-producing callable, dtype, shape)] to `final_path` atomically (dz_kernels.atomic).
    Tensors are produced and written one at a time."""
    header, off = {}, 0
    for key, _, dt, shape in items:
        n = math.prod(shape) * dt.itemsize
        header[key] = {"dtype": ST_NAMES[dt], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with atomic_write(final_path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for key, produce, dt, shape in items:
            t = produce()
            if t.dtype != dt or tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"{key}: produced {t.dtype} {tuple(t.shape)}, planned {dt} {tuple(shape)}")
            f.write(_tensor_bytes(t))
