"""Launchers and torch.library registration of layout attention.

Two custom ops, both with fake (meta) implementations so torch.compile(fullgraph=True) can trace them, and both
free of host syncs once warm, so CUDA graphs can capture them:

    dz::layout_attention(q, k, v, pattern, scale, tiles, deterministic) -> (out [B, Lq, H, D], lse fp32 [B, H, Lq])
    dz::layout_attention_backward(dout, q, k, v, out, lse, dlse?, pattern, scale, tiles, deterministic)
        -> (dq, dk, dv)

`pattern` is an int, the key of an AttentionPattern (pattern.py): a constant of a traced graph. The ops find the
pattern's tile schedule on the device by (pattern, tiles, device) (`schedule_tensors`: built and uploaded on the
first call, reused afterwards). The first op has an autograd formula (register_autograd) that calls the second;
the gradient of lse is supported (it enters through delta). `tiles` = [fwd BLOCK_M, fwd BLOCK_N, dkv BLOCK_M,
dkv BLOCK_N, dq BLOCK_M, dq BLOCK_N, fwd warps, fwd stages, bwd warps, bwd stages]. `layout_attention` (api.py)
does all of that from a pattern (or a layout that has one).
Optional trailing entries of `tiles` (TileConfig.as_list writes them): [..., dq warps, dq stages, flags] (flags:
FLAG_HEADS_FIRST | FLAG_FWD_WS); without them the dq kernel takes the backward's warps and stages and no flag is
set.
Outputs are freshly allocated and contiguous; inputs may have any strides with a contiguous last dim.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import triton

from ._bwd import _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_preprocess_kernel
from .._common import empty, kernels_interpreted
from ._common import LOG2E
from ._fwd import _fwd_kernel
from .pattern import pattern_by_key
from .schedule import _MEMO, _memo, nwin, schedule_for, token_tables

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


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
FLAG_HEADS_FIRST = 1
FLAG_FWD_WS = 2
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


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_kwargs(warps: int, stages: int) -> dict:
    return {"num_warps": warps, "num_stages": stages}


def _flags(tiles: list) -> int:
    return tiles[12] if len(tiles) > 12 else 0


def _grid(n_rows: int, n_bh: int, heads_first: bool) -> tuple:
    return (n_bh, n_rows) if heads_first else (n_rows, n_bh)


# ---------------------------------------------------------------------- launchers
def _forward(q, k, v, q_seg, k_seg, qk_bits, rows, cols, scale: float, tiles: list):
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    q_seg, k_seg, qk_bits, rows, cols = (t.contiguous() for t in (q_seg, k_seg, qk_bits, rows, cols))
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    bm, bn = tiles[0], tiles[1]
    if rows.shape[0] != triton.cdiv(Lq, bm):
        raise ValueError(f"forward schedule has {rows.shape[0]} rows, expected {triton.cdiv(Lq, bm)} for "
                         f"Lq={Lq}, BLOCK_M={bm}: build it with the same block sizes")
    out = empty((B, Lq, H, D), q.dtype, q.device)
    lse = empty((B, H, Lq), torch.float32, q.device)
    flags = _flags(tiles)
    heads_first = bool(flags & FLAG_HEADS_FIRST)
    _fwd_kernel[_grid(rows.shape[0], B * H, heads_first)](
        q, k, v, out, lse, q_seg, k_seg, qk_bits, rows, cols,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        H, Lq, Lk, qk_bits.shape[1], scale * LOG2E,
        BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=D, NWIN=nwin(bn), INTERPRET=kernels_interpreted(), HEADS_FIRST=heads_first,
        WS=bool(flags & FLAG_FWD_WS), **_launch_kwargs(tiles[6], tiles[7]))
    return out, lse


def _backward(dout, q, k, v, out, lse, dlse, q_seg, k_seg, qk_bits, kq_bits, dkv_rows, dkv_cols, dq_rows, dq_cols,
              scale: float, tiles: list, deterministic: bool):
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    km, kn, qm, qn = tiles[2], tiles[3], tiles[4], tiles[5]
    if dkv_rows.shape[0] != triton.cdiv(Lk, kn):
        raise ValueError(f"dk/dv schedule has {dkv_rows.shape[0]} rows, expected {triton.cdiv(Lk, kn)}")
    if dq_rows.shape[0] != triton.cdiv(Lq, qm):
        raise ValueError(f"dq schedule has {dq_rows.shape[0]} rows, expected {triton.cdiv(Lq, qm)}")
    q, k, v, out, dout = (_last_contiguous(t) for t in (q, k, v, out, dout))
    lse = lse.contiguous()
    dlse = dlse.contiguous() if dlse is not None else None
    q_seg, k_seg, qk_bits, kq_bits, dkv_rows, dkv_cols, dq_rows, dq_cols = (
        t.contiguous() for t in (q_seg, k_seg, qk_bits, kq_bits, dkv_rows, dkv_cols, dq_rows, dq_cols))
    interp = kernels_interpreted()
    launch = _launch_kwargs(tiles[8], tiles[9])
    launch_dq = _launch_kwargs(tiles[10], tiles[11]) if len(tiles) > 11 else launch
    heads_first = bool(_flags(tiles) & FLAG_HEADS_FIRST)

    delta = empty((B, H, Lq), torch.float32, q.device)
    pre_m = 64
    _bwd_preprocess_kernel[(triton.cdiv(Lq, pre_m), B * H)](
        out, dout, dlse if dlse is not None else lse, delta,
        out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        H, Lq, HAS_DLSE=dlse is not None, BLOCK_M=pre_m, HEAD_DIM=D)

    dk = empty((B, Lk, H, D), k.dtype, k.device)
    dv = empty((B, Lk, H, D), v.dtype, v.device)
    if deterministic:
        dq_acc = delta          # unused by the kernel (ATOMIC_DQ=False); any fp32 pointer will do
        dq_strides = (0, 0, 0)
    else:
        dq_acc = torch.zeros((B, Lq, H, D), dtype=torch.float32, device=q.device)
        dq_strides = (dq_acc.stride(0), dq_acc.stride(1), dq_acc.stride(2))
    _bwd_dkdv_kernel[_grid(dkv_rows.shape[0], B * H, heads_first)](
        q, k, v, dout, lse, delta, dk, dv, dq_acc, q_seg, k_seg, kq_bits, dkv_rows, dkv_cols,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), *dq_strides,
        H, Lq, Lk, kq_bits.shape[1], scale * LOG2E, scale,
        BLOCK_M=km, BLOCK_N=kn, HEAD_DIM=D, NWIN=nwin(km), ATOMIC_DQ=not deterministic, INTERPRET=interp,
        HEADS_FIRST=heads_first, **launch)
    if deterministic:
        dq = empty((B, Lq, H, D), q.dtype, q.device)
        _bwd_dq_kernel[_grid(dq_rows.shape[0], B * H, heads_first)](
            q, k, v, dout, lse, delta, dq, q_seg, k_seg, qk_bits, dq_rows, dq_cols,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            H, Lq, Lk, qk_bits.shape[1], scale * LOG2E, scale,
            BLOCK_M=qm, BLOCK_N=qn, HEAD_DIM=D, NWIN=nwin(qn), INTERPRET=interp, HEADS_FIRST=heads_first,
            **launch_dq)
    else:
        dq = dq_acc.to(q.dtype)
    return dq, dk, dv


# ---------------------------------------------------------------------- schedules on the device
def schedule_tensors(pattern: int, tiles, device) -> tuple:
    """The kernels' schedule inputs for the pattern with key `pattern` (AttentionPattern.key) at TileConfig.as_list()
    `tiles` on `device`: (q_seg, k_seg, qk_bits, kq_bits, fwd_rows, fwd_cols, dkv_rows, dkv_cols, dq_rows, dq_cols),
    all int32, built on the host and uploaded once per (pattern, tiles, device), then reused (fixed addresses, so a
    captured CUDA graph keeps reading them). The first call per (pattern, tiles, device) must not happen during
    CUDA-graph capture (run the op once before capturing: the usual warm-up)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = ("tensors", int(pattern), tuple(int(t) for t in tiles[:6]), str(device))
    cached = _MEMO.get(key)
    if cached is not None:
        return cached
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("layout_attention: the tile schedule of this pattern is not on the device yet and cannot "
                           "be uploaded during CUDA-graph capture; run the op once before capturing (warm-up)")
    pat = pattern_by_key(int(pattern))
    tt = token_tables(pat)
    fwd = schedule_for(pat, tiles[0], tiles[1])
    dkv = schedule_for(pat, tiles[2], tiles[3])
    dq = schedule_for(pat, tiles[4], tiles[5])
    arrays = (tt.q_seg, tt.k_seg, tt.qk_bits, tt.kq_bits, fwd.rows, fwd.cols, dkv.t_rows, dkv.t_cols, dq.rows,
              dq.cols)
    tensors = tuple(torch.from_numpy(np.array(a, dtype=np.int32)).to(device) for a in arrays)
    return _memo(key, lambda: tensors)


def _check_pattern(q, k, pattern: int):
    pat = pattern_by_key(int(pattern))
    if q.shape[1] != pat.q_len or k.shape[1] != pat.k_len:
        raise ValueError(f"q has {q.shape[1]} and k {k.shape[1]} tokens; pattern {pattern} has {pat.q_len} query and "
                         f"{pat.k_len} key tokens")


# ---------------------------------------------------------------------- custom ops
@torch.library.custom_op("dz::layout_attention", mutates_args=())
def layout_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: int, scale: float,
                        tiles: list[int], deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, Lq, H, D] (q's dtype), lse fp32 [B, H, Lq]. `pattern`: an AttentionPattern.key. See the module doc."""
    _check_pattern(q, k, pattern)
    sched = schedule_tensors(pattern, tiles, q.device)
    return _forward(q, k, v, *sched[:3], *sched[4:6], scale, tiles)


@layout_attention_op.register_fake
def _layout_attention_fake(q, k, v, pattern, scale, tiles, deterministic):
    B, Lq, H, D = q.shape
    return q.new_empty((B, Lq, H, D)), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("dz::layout_attention_backward", mutates_args=())
def layout_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 out: torch.Tensor, lse: torch.Tensor, dlse: Optional[torch.Tensor], pattern: int,
                                 scale: float, tiles: list[int],
                                 deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq [B, Lq, H, D], dk, dv [B, Lk, H, D] (contiguous, the inputs' dtype)."""
    _check_pattern(q, k, pattern)
    sched = schedule_tensors(pattern, tiles, q.device)
    return _backward(dout, q, k, v, out, lse, dlse, *sched[:4], *sched[6:], scale, tiles, deterministic)


@layout_attention_backward_op.register_fake
def _layout_attention_backward_fake(dout, q, k, v, out, lse, dlse, pattern, scale, tiles, deterministic):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, pattern, scale, tiles, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.pattern, ctx.scale, ctx.tiles, ctx.deterministic = pattern, scale, list(tiles), deterministic


def _autograd_backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.dz.layout_attention_backward(dout, q, k, v, out, lse, dlse, ctx.pattern, ctx.scale,
                                                        ctx.tiles, ctx.deterministic)
    return dq, dk, dv, None, None, None, None


layout_attention_op.register_autograd(_autograd_backward, setup_context=_setup_context)
