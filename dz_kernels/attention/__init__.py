"""Fused attention over a DreamZero `SequenceLayout` (Triton forward and backward).

    out = layout_attention(q, k, v, layout, scale=None, deterministic=False)

q [B, Lq, H, D], k and v [B, Lk, H, D] (tokens before heads, as the projections produce them; any strides with a
contiguous last dim; a tensor whose last dim is strided is copied once with .contiguous()). The key sequence is
the layout's: cached tokens first, then the query tokens again (layout.k). Returns [B, Lq, H, D] in q's dtype
(contiguous from the kernel; the dense SDPA path below returns SDPA's layout). The positional signature is the
one of the reference `dreamzero.attention.attention_blockwise`, so the model's backend table (`Ops.attention`)
takes it as is; `attention_blockwise` / `attention_masked` stay the oracles.

Supported: bf16 and fp16 (fp32 accumulation; the GPU path), fp32 (full-precision products; slower, for tests and
debugging), head dims 16, 32, 64 and 128, any layout (training, inference with a cache, the one-call control
step: the kernel needs nothing special for a mode, the layout carries it). Every layout's tile schedule is built
once on the host (schedule.py, vectorized numpy) and uploaded once per device; the first call per (layout,
device) must therefore happen before CUDA-graph capture (the usual warm-up). Under torch.compile the schedule
tensors are constants of the graph (`schedule_tensors` is an assume_constant_result function).

Dispatch (one rule): when every query sees every key (e.g. a release-rule denoising step against the cache),
`deterministic` is False and the tensors are on CUDA, the call goes to torch's scaled_dot_product_attention with
the cuDNN backend first, then flash, then mem-efficient (REFERENCE.md section 7: cuDNN leads dense attention on
the H100). `dense_sdpa=False` forces the Triton kernel, `dense_sdpa=True` takes SDPA for dense layouts on any
device. `sdpa_blocks=2` extends the rule to layouts made of two dense blocks (the control step), one SDPA call
per block; its default is the config table's (mode infer), 1 until a tuning run measures the two calls faster. On a CPU the kernels run under the Triton
interpreter (TRITON_INTERPRET=1 must be set before triton is imported); otherwise CPU tensors are rejected.

Backward: dq, dk, dv from the saved log-sum-exp. deterministic=False adds dq with fp32 atomics inside the dk/dv
kernel, unless the tile config says `atomic_dq=False` (the tuning measured the separate pass faster);
deterministic=True always runs a separate dq kernel over the query-side schedule (no atomics: two runs give
bitwise identical gradients).

Tiles: `default_config` reads dz_kernels/configs/attention.json (see dz_kernels.configs) for the device's
architecture, dtype, head dim and mode ("train" for training layouts, "infer" otherwise); `config=` overrides.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dreamzero.layout import SequenceLayout

from ._common import interpreting
from .op import (SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, TileConfig, config_choice, default_config, layout_attention_op,
                 poison_outputs)
from .schedule import TileSchedule, TokenTables, build_schedule, schedule_for, tile_mask, token_tables

__all__ = ["layout_attention", "TileConfig", "default_config", "config_choice", "config_mode", "build_schedule",
           "schedule_for", "token_tables", "tile_mask", "TileSchedule", "TokenTables", "layout_is_dense", "dense_blocks",
           "schedule_tensors", "poison_outputs"]


@torch.compiler.assume_constant_result
def layout_is_dense(layout: SequenceLayout) -> bool:
    """Whether every query token of `layout` sees every key token."""
    return token_tables(layout).dense


@torch.compiler.assume_constant_result
def dense_blocks(layout: SequenceLayout) -> tuple | None:
    """The layout as dense blocks, when it is one: ((q_start, q_end, k_start, k_end), ...) token ranges such that
    the queries of each block see exactly the keys of its range, all of them; consecutive query segments with the
    same range share a block. None when some query segment sees a non-contiguous set of keys (e.g. training).
    A release-rule denoising step is one block; the control step two (observed frames: cache + themselves;
    the chunk being denoised: every key)."""
    key = "dz_attention_dense_blocks"
    if key in layout._cache:
        return layout._cache[key]
    mask = np.asarray(layout.segment_mask(), dtype=bool)
    kb = layout.segment_bounds("k")
    blocks = []
    for i, qs in enumerate(layout.q):
        cols = np.flatnonzero(mask[i])
        if len(cols) == 0 or cols[-1] - cols[0] + 1 != len(cols):
            blocks = None
            break
        k_range = (int(kb[cols[0], 0]), int(kb[cols[-1], 1]))
        if blocks and blocks[-1][1] == qs.start and blocks[-1][2:] == k_range:
            blocks[-1] = (blocks[-1][0], qs.end) + k_range
        else:
            blocks.append((qs.start, qs.end) + k_range)
    result = tuple(blocks) if blocks is not None else None
    layout._cache[key] = result
    return result


@torch.compiler.assume_constant_result
def schedule_tensors(layout: SequenceLayout, tiles: tuple, device: torch.device) -> tuple:
    """The op's schedule inputs on `device` for TileConfig.as_list() `tiles`, built and uploaded once per
    (layout, tiles, device) and memoized on the layout: (q_seg, k_seg, qk_bits, kq_bits, fwd_rows, fwd_cols,
    dkv_rows, dkv_cols, dq_rows, dq_cols), all int32. Constant for torch.compile (traced as a constant result)."""
    device = torch.device(device)
    key = ("dz_attention_tensors", tuple(tiles[:6]), str(device))
    cached = layout._cache.get(key)
    if cached is not None:
        return cached
    tt = token_tables(layout)
    fwd = schedule_for(layout, tiles[0], tiles[1])
    dkv = schedule_for(layout, tiles[2], tiles[3])
    dq = schedule_for(layout, tiles[4], tiles[5])
    arrays = (tt.q_seg, tt.k_seg, tt.qk_bits, tt.kq_bits, fwd.rows, fwd.cols, dkv.t_rows, dkv.t_cols, dq.rows,
              dq.cols)
    tensors = tuple(torch.from_numpy(np.array(a, dtype=np.int32)).to(device) for a in arrays)
    layout._cache[key] = tensors
    return tensors


def _check_inputs(q, k, v, layout) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, L, H, D] (rank 4), got rank {t.dim()} with shape {tuple(t.shape)}")
    if not isinstance(layout, SequenceLayout):
        raise TypeError(f"layout must be a dreamzero.layout.SequenceLayout, got {type(layout).__name__}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {q.dtype}: layout_attention takes bfloat16, float16 or float32")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Lq, H, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} disagree in batch, heads or head dim")
    if Lq != layout.q_len:
        raise ValueError(f"q has {Lq} tokens but the layout has {layout.q_len} query tokens")
    if k.shape[1] != layout.k_len:
        raise ValueError(f"k/v have {k.shape[1]} tokens but the layout has {layout.k_len} key tokens "
                         f"({layout.n_cached} cached + {layout.q_len} new)")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"unsupported head dim {D}: layout_attention supports {SUPPORTED_HEAD_DIMS}")
    if B == 0 or H == 0:
        raise ValueError(f"empty batch or heads: q has shape {tuple(q.shape)}")


def layout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SequenceLayout,
                     scale: float | None = None, deterministic: bool = False, *, config: TileConfig | None = None,
                     dense_sdpa: bool | None = None, sdpa_blocks: int | None = None) -> torch.Tensor:
    """Attention of q over k, v under `layout`'s visibility rule (see the module doc).

    q [B, Lq, H, D]; k, v [B, Lk, H, D] with Lq = layout.q_len, Lk = layout.k_len; scale defaults to D ** -0.5.
    Returns out [B, Lq, H, D] (q's dtype). Differentiable in q, k and v.
    config: tile sizes (default: `default_config` for the device, dtype, head dim and `config_mode(layout)`, from
    the config table dz_kernels/configs/attention.json; its `atomic_dq` picks the dq pass of a non-deterministic
    backward).
    dense_sdpa: route dense layouts to SDPA (default: on CUDA unless deterministic). sdpa_blocks: with dense_sdpa,
    also route layouts made of up to this many dense blocks (`dense_blocks`, e.g. 2 for the control step) to one
    SDPA call per block on views of q, k, v; 1 routes only fully dense layouts; None (the default): the config's
    sdpa_blocks (the table's: 1 until a tuning run measured the per-block SDPA calls faster than the kernel).

    Example:
        lay = layout_for_config(get_config("droid-14b"), "train")
        out = layout_attention(q, k, v, lay)          # q, k, v [B, 15940, 40, 128] bf16 on CUDA
    """
    _check_inputs(q, k, v, layout)
    D = q.shape[-1]
    scale = float(D ** -0.5 if scale is None else scale)
    if dense_sdpa is None:
        dense_sdpa = q.is_cuda and not deterministic
    if dense_sdpa:
        if layout_is_dense(layout):
            return _dense_sdpa(q, k, v, scale)
        if sdpa_blocks is None:
            sdpa_blocks = (config if config is not None else
                           default_config(q.device, q.dtype, D, config_mode(layout))).sdpa_blocks
        blocks = dense_blocks(layout) if sdpa_blocks > 1 else None
        if blocks is not None and len(blocks) <= sdpa_blocks:
            return torch.cat([_dense_sdpa(q[:, qa:qb], k[:, ka:kb], v[:, ka:kb], scale)
                              for qa, qb, ka, kb in blocks], dim=1)
    if q.device.type == "cpu" and not interpreting():
        raise ValueError("layout_attention's Triton kernels need a CUDA device; CPU tensors run only under the "
                         "Triton interpreter (set TRITON_INTERPRET=1 before importing triton)")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"layout_attention runs on CUDA (or the CPU interpreter), got device {q.device}")
    cfg = config if config is not None else default_config(q.device, q.dtype, D, config_mode(layout))
    cfg.validate()
    tiles = cfg.as_list()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    sched = schedule_tensors(layout, tuple(tiles), q.device)
    # the atomic-free dq pass also serves a non-deterministic call when the config says it is the faster one
    out, _lse = layout_attention_op(q, k, v, *sched, scale, tiles, bool(deterministic) or not cfg.atomic_dq)
    return out


def config_mode(layout) -> str:
    """The config table's mode of a layout: "train" for training layouts (forward and backward), else "infer"."""
    return "train" if getattr(layout, "mode", "train") == "train" else "infer"


def _dense_sdpa(q, k, v, scale: float) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]
    with sdpa_kernel(backends, set_priority=True):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return o.transpose(1, 2)
