"""Tile configs of layout attention: `TileConfig` (block sizes and launch parameters of the three kernels), how it
is written into the custom op's `tiles` list, and where it comes from: the config table
dz_kernels/configs/attention.json per (architecture, dtype, head dim, mode), small tiles on the CPU interpreter.

`tiles` = TileConfig.as_list() = [fwd BLOCK_M, fwd BLOCK_N, dkv BLOCK_M, dkv BLOCK_N, dq BLOCK_M, dq BLOCK_N,
fwd warps, fwd stages, bwd warps, bwd stages, dq warps, dq stages, flags] (flags: FLAG_HEADS_FIRST | FLAG_FWD_WS).
The launchers (triton_fwd.py, triton_bwd.py) also take the list without its last three entries: the dq kernel then
takes the backward's warps and stages and no flag is set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .pattern import as_pattern

__all__ = ["TileConfig", "default_config", "config_choice", "table_config", "config_mode", "FLAG_HEADS_FIRST",
           "FLAG_FWD_WS"]

# the bits of tiles[12]
FLAG_HEADS_FIRST = 1
FLAG_FWD_WS = 2


@dataclass(frozen=True)
class TileConfig:
    """Block sizes and launch parameters of the three kernels. (BLOCK_M queries, BLOCK_N keys) per kernel; every
    block size a power of two >= 16 (tl.dot's minimum). dq_warps/dq_stages: the dq kernel's (None: the dk/dv
    kernel's). atomic_dq: the non-deterministic backward adds dq with atomics in the dk/dv kernel (True) or runs the
    separate dq kernel (False). heads_first: the launch grid puts batch x head on its fastest axis. fwd_ws: the
    forward's key loop is warp-specialized (tl.range(..., warp_specialize=True)). sdpa_blocks: layout_attention's
    default for its argument of that name (layouts of up to this many dense blocks go to SDPA, one call per block,
    when SDPA dispatch is on; 1: only fully dense layouts); not a kernel parameter."""
    fwd: tuple = (128, 64)
    dkv: tuple = (32, 128)
    dq: tuple = (128, 32)
    fwd_warps: int = 8
    fwd_stages: int = 3
    bwd_warps: int = 4
    bwd_stages: int = 3
    dq_warps: Optional[int] = None
    dq_stages: Optional[int] = None
    atomic_dq: bool = True
    heads_first: bool = False
    fwd_ws: bool = False
    sdpa_blocks: int = 1

    def as_list(self) -> list:
        """The op's `tiles` argument (see the module doc)."""
        flags = (FLAG_HEADS_FIRST if self.heads_first else 0) | (FLAG_FWD_WS if self.fwd_ws else 0)
        return [*self.fwd, *self.dkv, *self.dq, self.fwd_warps, self.fwd_stages, self.bwd_warps, self.bwd_stages,
                self.dq_warps or self.bwd_warps, self.dq_stages or self.bwd_stages, flags]

    def validate(self) -> None:
        for name in ("fwd", "dkv", "dq"):
            blocks = getattr(self, name)
            if len(blocks) != 2 or any(not isinstance(b, int) or b < 16 or b & (b - 1) for b in blocks):
                raise ValueError(f"TileConfig.{name} must be two powers of two >= 16, got {blocks}")
        for name in ("fwd_warps", "bwd_warps", "dq_warps"):
            w = getattr(self, name)
            if w is not None and w not in (1, 2, 4, 8, 16):
                raise ValueError(f"TileConfig.{name} must be 1, 2, 4, 8 or 16, got {w}")
        if self.fwd_stages < 1 or self.bwd_stages < 1 or (self.dq_stages is not None and self.dq_stages < 1):
            raise ValueError("TileConfig stages must be >= 1")
        if not isinstance(self.sdpa_blocks, int) or self.sdpa_blocks < 1:
            raise ValueError(f"TileConfig.sdpa_blocks must be an int >= 1, got {self.sdpa_blocks!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "TileConfig":
        """From a config table entry (dz_kernels/configs/attention.json); unknown fields raise."""
        names = set(cls.__dataclass_fields__)
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TileConfig fields {sorted(unknown)}; known: {sorted(names)}")
        kw = {k: (tuple(v) if k in ("fwd", "dkv", "dq") else v) for k, v in d.items()}
        return cls(**kw)


# tiles[12] bits


_INTERPRETER_CONFIG = TileConfig(fwd=(32, 32), dkv=(32, 32), dq=(32, 32), fwd_warps=4, fwd_stages=1, bwd_warps=4,
                                 bwd_stages=1)


def default_config(device: torch.device, dtype: torch.dtype, head_dim: int, mode: str = "train") -> TileConfig:
    """Tile sizes per device, dtype, head dim and mode ("train": training layouts, forward and backward; "infer":
    the others). On CUDA: dz_kernels/configs/attention.json for the device's architecture (tuned entries where a
    sweep measured them, else the defaults there: the Triton flash-attention tutorial's Hopper settings); on the
    CPU interpreter: small tiles."""
    if torch.device(device).type != "cuda":
        return _INTERPRETER_CONFIG
    return config_choice(device, dtype, head_dim, mode)[0]


def config_choice(device, dtype: torch.dtype, head_dim: int, mode: str = "train") -> tuple:
    """(TileConfig, source) from the config table for `device`'s architecture: source says "default" or which
    tuned entry it came from."""
    from dz_kernels import configs

    return table_config(configs.arch_of(device), dtype, head_dim, mode)


def table_config(arch: str, dtype: torch.dtype, head_dim: int, mode: str = "train") -> tuple:
    """(TileConfig, source) from the config table for an architecture named like "sm90"."""
    from dz_kernels import configs

    if mode not in ("train", "infer"):
        raise ValueError(f"mode must be 'train' or 'infer', got {mode!r}")
    choice = configs.lookup("attention", "tiles", arch, head_dim=int(head_dim), dtype=configs.dtype_name(dtype),
                            mode=mode)
    return TileConfig.from_dict(choice.config), choice.source


def config_mode(layout) -> str:
    """The config table's mode: "train" for training layouts (forward and backward), else "infer". A layout that
    names its mode (a dreamzero SequenceLayout's `mode`) is taken at its word; a bare pattern is "infer" when it is
    made of dense blocks (every inference step: the denoising step, the observed frames, the control step) and
    "train" otherwise (the teacher-forcing mask sees non-contiguous keys)."""
    mode = getattr(layout, "mode", None)
    if mode is not None:
        return "train" if mode == "train" else "infer"
    return "infer" if as_pattern(layout).dense_blocks is not None else "train"
