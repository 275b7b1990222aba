"""Layout attention: the public function (its checks and the dense SDPA dispatch) and the torch.library custom ops
with their fake implementations and autograd formula. The kernels and launchers: triton_fwd.py, triton_bwd.py; the
tile configs: config.py; what the op computes, in plain PyTorch: reference.py.

    out = layout_attention(q, k, v, pattern, scale=None, deterministic=False)

`pattern`: an AttentionPattern (pattern.py), or an object with attention_pattern() such as a dreamzero
SequenceLayout (the model passes its layout).

q [B, Lq, H, D], k and v [B, Lk, H, D] (tokens before heads, as the projections produce them; any strides with a
contiguous last dim; a tensor whose last dim is strided is copied once with .contiguous()). The key sequence is
the layout's: cached tokens first, then the query tokens again (layout.k). Returns [B, Lq, H, D] in q's dtype
(contiguous from the kernel; the dense SDPA path below returns SDPA's layout). The positional signature is the
one of the reference `dreamzero.attention.attention_blockwise`, so the model's backend table (`Ops.attention`)
takes it as is; `attention_blockwise` / `attention_masked` stay the oracles.

Supported: bf16 and fp16 (fp32 accumulation; the GPU path), fp32 (full-precision products; slower, for tests and
debugging), head dims 16, 32, 64 and 128, any layout (training, inference with a cache, the one-call control
step: the kernel needs nothing special for a mode, the pattern carries it). Every pattern's tile schedule is
built once on the host (schedule.py, vectorized numpy) and uploaded once per device; the first call per (pattern,
device) must therefore happen before CUDA-graph capture (the usual warm-up). Under torch.compile the pattern is
plain constant data: the custom op takes its integer key (below), nothing is traced through the schedule.

Dispatch (one rule): when every query sees every key (e.g. a release-rule denoising step against the cache),
`deterministic` is False and the tensors are on CUDA, the call goes to torch's scaled_dot_product_attention with
the cuDNN backend first, then flash, then mem-efficient (cuDNN leads dense attention on Hopper:
docs/reference.md#dense-attention-on-hopper). `dense_sdpa=False` forces the Triton kernel, `dense_sdpa=True` takes
SDPA for dense layouts on any device. `sdpa_blocks=2` extends the rule to layouts made of two dense blocks (the
control step), one SDPA call per block; its default is the config table's (mode infer): 1 until a tuning run
measures the two calls faster. On a CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1 must be
set before triton is imported; `import dz_kernels` sets it on a machine without CUDA); otherwise CPU tensors are
rejected.

Non-finite inputs: a NaN or inf in K or V (or in the output gradient) at a key that a query does not see never
reaches that query's output or gradients, nor another key's gradients: masked probabilities never multiply a
non-finite value (only the partially visible tiles need care; fully visible tiles run unchanged). What does see a
non-finite value is non-finite, as in the reference (through a partially visible tile: NaN in all D values of
that output row, where the reference may have inf or NaN in some of them).

Backward: dq, dk, dv from the saved log-sum-exp. deterministic=False adds dq with fp32 atomics inside the dk/dv
kernel, unless the tile config says `atomic_dq=False` (the tuning measured the separate pass faster);
deterministic=True always runs a separate dq kernel over the query-side schedule (no atomics: two runs give
bitwise identical gradients).

Tiles: `default_config` (config.py) reads dz_kernels/configs/attention.json (see dz_kernels.configs) for the
device's architecture, dtype, head dim and mode (`config_mode`: "train" for training patterns, else "infer");
`config=` overrides.

Custom ops: two, both with fake (meta) implementations so torch.compile(fullgraph=True) can trace them, and both
free of host syncs once warm, so CUDA graphs can capture them:

    dz::layout_attention(q, k, v, pattern, scale, tiles, deterministic) -> (out [B, Lq, H, D], lse fp32 [B, H, Lq])
    dz::layout_attention_backward(dout, q, k, v, out, lse, dlse?, pattern, scale, tiles, deterministic)
        -> (dq, dk, dv)

`pattern` is an int, the key of an AttentionPattern (pattern.py): a constant of a traced graph. The ops find the
pattern's tile schedule on the device by (pattern, tiles, device) (`schedule_tensors`: built and uploaded on the
first call, reused afterwards). The first op has an autograd formula (register_autograd) that calls the second;
the gradient of lse is supported (it enters through delta). `tiles`: TileConfig.as_list() (config.py).
`layout_attention` does all of that from a pattern (or a layout that has one).
Outputs are freshly allocated and contiguous; inputs may have any strides with a contiguous last dim.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .._common import call, custom_op, kernels_interpreted
from .config import TileConfig, config_mode, default_config
from .pattern import AttentionPattern, as_pattern, pattern_by_key
from .schedule import _MEMO, _memo, schedule_for, token_tables
from .triton_bwd import launch_backward
from .triton_fwd import launch_forward

__all__ = ["layout_attention", "layout_is_dense", "dense_blocks", "schedule_tensors", "layout_attention_op",
           "layout_attention_backward_op", "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


# ---------------------------------------------------------------------- the public function
def layout_is_dense(layout) -> bool:
    """Whether every query token of the pattern (or layout) sees every key token."""
    return as_pattern(layout).dense


def dense_blocks(layout) -> tuple | None:
    """The pattern as dense blocks, when it is one: ((q_start, q_end, k_start, k_end), ...) token ranges such that
    the queries of each block see exactly the keys of its range, all of them; consecutive query segments with the
    same range share a block. None when some query segment sees a non-contiguous set of keys (e.g. training).
    A release-rule denoising step is one block; the control step two (observed frames: cache + themselves;
    the chunk being denoised: every key)."""
    return as_pattern(layout).dense_blocks


def _check_inputs(q, k, v, pattern: AttentionPattern) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, L, H, D] (rank 4), got rank {t.dim()} with shape {tuple(t.shape)}")
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
    if Lq != pattern.q_len:
        raise ValueError(f"q has {Lq} tokens but the layout has {pattern.q_len} query tokens")
    if k.shape[1] != pattern.k_len:
        raise ValueError(f"k/v have {k.shape[1]} tokens but the layout has {pattern.k_len} key tokens")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"unsupported head dim {D}: layout_attention supports {SUPPORTED_HEAD_DIMS}")
    if B == 0 or H == 0:
        raise ValueError(f"empty batch or heads: q has shape {tuple(q.shape)}")


def layout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, scale: float | None = None,
                     deterministic: bool = False, *, config: TileConfig | None = None,
                     dense_sdpa: bool | None = None, sdpa_blocks: int | None = None) -> torch.Tensor:
    """Attention of q over k, v under the visibility rule of `layout` (see the module doc).

    q [B, Lq, H, D]; k, v [B, Lk, H, D] with Lq, Lk the pattern's query and key lengths; layout: an
    AttentionPattern or an object with attention_pattern() (a dreamzero SequenceLayout); scale defaults to
    D ** -0.5. Returns out [B, Lq, H, D] (q's dtype). Differentiable in q, k and v.
    config: tile sizes (default: `default_config` for the device, dtype, head dim and `config_mode(layout)`, from
    the config table dz_kernels/configs/attention.json; its `atomic_dq` picks the dq pass of a non-deterministic
    backward).
    dense_sdpa: route dense patterns to SDPA (default: on CUDA unless deterministic). sdpa_blocks: with dense_sdpa,
    also route patterns made of up to this many dense blocks (`dense_blocks`, e.g. 2 for the control step) to one
    SDPA call per block on views of q, k, v; 1 routes only fully dense patterns; None (the default): the config's
    sdpa_blocks (the table's: 1 until a tuning run measured the per-block SDPA calls faster than the kernel).

    Example:
        lay = layout_for_config(get_config("droid-14b"), "train")
        out = layout_attention(q, k, v, lay)          # q, k, v [B, 15940, 40, 128] bf16 on CUDA
    """
    pattern = as_pattern(layout)
    _check_inputs(q, k, v, pattern)
    D = q.shape[-1]
    scale = float(D ** -0.5 if scale is None else scale)
    if dense_sdpa is None:
        dense_sdpa = q.is_cuda and not deterministic
    if dense_sdpa:
        if pattern.dense:
            return _dense_sdpa(q, k, v, scale)
        if sdpa_blocks is None:
            sdpa_blocks = (config if config is not None else
                           default_config(q.device, q.dtype, D, config_mode(layout))).sdpa_blocks
        blocks = pattern.dense_blocks if sdpa_blocks > 1 else None
        if blocks is not None and len(blocks) <= sdpa_blocks:
            return torch.cat([_dense_sdpa(q[:, qa:qb], k[:, ka:kb], v[:, ka:kb], scale)
                              for qa, qb, ka, kb in blocks], dim=1)
    if q.device.type == "cpu" and not kernels_interpreted():
        raise ValueError("layout_attention's Triton kernels need a CUDA device; CPU tensors run only under the "
                         "Triton interpreter (set TRITON_INTERPRET=1 before importing triton)")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"layout_attention runs on CUDA (or the CPU interpreter), got device {q.device}")
    cfg = config if config is not None else default_config(q.device, q.dtype, D, config_mode(layout))
    cfg.validate()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    # the atomic-free dq pass also serves a non-deterministic call when the config says it is the faster one
    out, _lse = call(layout_attention_op, q, k, v, pattern.key, scale, cfg.as_list(),
                      bool(deterministic) or not cfg.atomic_dq)
    return out


def _dense_sdpa(q, k, v, scale: float) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]
    with sdpa_kernel(backends, set_priority=True):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return o.transpose(1, 2)


# ---------------------------------------------------------------------- schedules on the device
def schedule_tensors(pattern: int, tiles, device) -> tuple:
    """The kernels' schedule inputs for the pattern with key `pattern` (AttentionPattern.key) at TileConfig.as_list()
    `tiles` on `device`: (q_seg, k_seg, qk_bits, kq_bits, fwd_rows, fwd_cols, dkv_rows, dkv_cols, dq_rows, dq_cols,
    fwd_partial_kt), all int32 (fwd_partial_kt: TileSchedule.partial_key_tiles of the forward's tiles), built on
    the host and uploaded once per (pattern, tiles, device), then reused (fixed addresses, so a captured CUDA graph
    keeps reading them). The first call per (pattern, tiles, device) must not happen during
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
              dq.cols, fwd.partial_key_tiles())
    tensors = tuple(torch.from_numpy(np.array(a, dtype=np.int32)).to(device) for a in arrays)
    return _memo(key, lambda: tensors)


def _check_pattern(q, k, pattern: int):
    pat = pattern_by_key(int(pattern))
    if q.shape[1] != pat.q_len or k.shape[1] != pat.k_len:
        raise ValueError(f"q has {q.shape[1]} and k {k.shape[1]} tokens; pattern {pattern} has {pat.q_len} query and "
                         f"{pat.k_len} key tokens")


# ---------------------------------------------------------------------- custom ops
@custom_op("dz::layout_attention", mutates_args=())
def layout_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: int, scale: float,
                        tiles: list[int], deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, Lq, H, D] (q's dtype), lse fp32 [B, H, Lq]. `pattern`: an AttentionPattern.key. See the module doc."""
    _check_pattern(q, k, pattern)
    sched = schedule_tensors(pattern, tiles, q.device)
    return launch_forward(q, k, v, *sched[:3], *sched[4:6], sched[10], scale, tiles)


@layout_attention_op.register_fake
def _layout_attention_fake(q, k, v, pattern, scale, tiles, deterministic):
    B, Lq, H, D = q.shape
    return q.new_empty((B, Lq, H, D)), q.new_empty((B, H, Lq), dtype=torch.float32)


@custom_op("dz::layout_attention_backward", mutates_args=())
def layout_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 out: torch.Tensor, lse: torch.Tensor, dlse: Optional[torch.Tensor], pattern: int,
                                 scale: float, tiles: list[int],
                                 deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq [B, Lq, H, D], dk, dv [B, Lk, H, D] (contiguous, the inputs' dtype)."""
    _check_pattern(q, k, pattern)
    sched = schedule_tensors(pattern, tiles, q.device)
    return launch_backward(dout, q, k, v, out, lse, dlse, *sched[:4], *sched[6:10], scale, tiles, deterministic)


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
    dq, dk, dv = call(layout_attention_backward_op, dout, q, k, v, out, lse, dlse, ctx.pattern, ctx.scale,
                      ctx.tiles, ctx.deterministic)
    return dq, dk, dv, None, None, None, None


layout_attention_op.register_autograd(_autograd_backward, setup_context=_setup_context)
