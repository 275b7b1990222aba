"""FusedKVCache: a model's KV cache (the contract of dreamzero.cache.KVCache) with fused, graph-friendly writes.

It imports nothing of the model. What it needs is handed to it, duck-typed (see `CacheConfig` and `CachePass`):
the model's config (sizes, and `cfg.layout(...)`, the builder of pass descriptions) and, for every pass, the pass
description (a dreamzero SequenceLayout: how many tokens it reads from the cache and which frames it writes, and
the slots those frames go to under the cache's capacity and overflow policy, `layout.cache_slots(...)`).

Contract shared with the reference `dreamzero.cache.KVCache` (a drop-in for the model's `cache=` argument):
    frames            tuple: the latent frame held by each valid slot, in physical slot order; the valid slots
                      are always the prefix [0, num_tokens) of the buffer
    num_tokens, batch
    layout(mode, chunk, rule=None)   the layout (CachePass) of an inference call against the current content
    needs_reset(chunk)               the release policy: reset before a chunk that starts at local_attn_size
    extend(layer, k_new, v_new, layout) -> (k_all, v_all)   k_new already normalized and rotated [B, L, H, D]
    commit(layout)                   after all layers of a pass: the frames the pass wrote become cached
    reset()                          forget everything (a new instruction or episode); buffers keep their addresses
    overflow 'reset' | 'roll'        the same slot plan as the reference (roll evicts the oldest non-sink frames
                                     and reuses their slots in place), so `frames` and every layout are identical
plus the fused entry point
    project(layer, q, k, v, wq, wk, eps, cos, sin, layout) -> (q_rot, k_all, v_all)
which runs the whole epilogue of the q/k/v projections in one kernel (ops.qk_norm_rope_kv_write).

Storage per layer: k[layer], v[layer] [B, window_tokens + staging_tokens, H, D], at fixed addresses. The first
window_tokens = capacity_frames * frame_tokens rows hold the cached frames; staging_tokens more rows make room for
the new tokens of any pass the overflow policy allows (default_staging_tokens: one full query for 'roll', only the
action and state tokens for 'reset').
Every pass (extend or project) writes its L new tokens into the STAGING rows [n, n + L), n = num_tokens, right
after the valid cached rows, so the attention reads ONE contiguous slice [0, n + L) of the buffer with no torch.cat:
    k_all = k[layer][:, :n + L]   (cached tokens first, then the new ones: exactly layout.k)
A denoising pass leaves it there (overwritten by the next pass). A pass that writes the cache (first, observe,
control: layout.cache_write_range()) gets its frames made permanent by commit(): with policy 'reset', and with
'roll' while the window has free slots, a new frame's slot IS its staging position (slots fill in order), so
commit copies nothing; when 'roll' evicts, the frames whose slot is an evicted one are copied from staging into it
at commit (one frame_tokens x H x D copy per frame, layer and tensor). The evicted frames stay readable during the
pass that evicts them, as in the reference, which concatenates before it overwrites.

Write positions: `write_pos` is a one-element int32 device tensor holding n (the staging start); the kernels read
it on the device, and commit()/reset() update it with an in-place fill (no host sync), so a CUDA graph captured for
one layout replays correctly as long as the host-side state (frames) is the same as at capture.

FP8: with fp8=True, k and v are stored as float8_e4m3fn with one float32 scale per (token, head) in k_scale[layer],
v_scale[layer] [B, rows, H] (scale = max(amax, 1e-12) / 448; see reference.py). extend()/project() then return
k_all/v_all DEQUANTIZED to `dtype` (bfloat16 by default) as new tensors [B, n + L, H, D]; the new tokens of the pass
are quantized too (they are read back from the cache). `fp8_views(layer, n)` gives the raw FP8 rows and scales for an
attention op that reads FP8 directly.

Dtypes: `dtype` is the activations' dtype (q, k, v and the k_all/v_all handed to the attention); with fp8=False it
is also the storage dtype. extend()/project() raise TypeError for inputs of another dtype.
"""
from __future__ import annotations

from typing import Protocol

import torch

from .._common import FP8_DTYPE
from . import ops
from .reference import dequantize_fp8_per_head

__all__ = ["FusedKVCache", "default_staging_tokens", "CacheConfig", "CachePass"]


class CacheConfig(Protocol):
    """What the cache reads from the model's config (dreamzero.config.DreamZeroConfig provides it)."""
    frame_tokens: int           # tokens of one latent frame
    frames_per_chunk: int
    actions_per_chunk: int
    states_per_chunk: int
    local_attn_size: int        # the attention window in latent frames (the default capacity)
    num_layers: int
    num_heads: int
    head_dim: int
    dim: int

    def layout(self, mode: str, *, chunk: int, cached_frames: tuple, rule: str | None) -> "CachePass": ...


class CachePass(Protocol):
    """The description of one pass (dreamzero.layout.SequenceLayout provides it)."""
    n_cached: int               # key tokens read from the cache (they come first in the key sequence)
    q_len: int                  # new tokens of the pass
    writes_cache: tuple         # truthy when the pass writes frames into the cache

    def cached_frames(self) -> tuple: ...                  # the frames it was built against, in slot order
    def cache_write_range(self) -> tuple: ...              # (start, end) of the new tokens written, or (0, 0)
    def cache_write_frames(self) -> tuple: ...             # the frames written, in token order
    def cache_slots(self, capacity_frames: int, overflow: str) -> list: ...   # the slot of each written frame


def default_staging_tokens(cfg, capacity_frames: int, overflow: str) -> int:
    """Rows the buffer needs beyond the window so that every pass fits [0, n + L): max(n + L) - window.

    'roll': the window can be full while a control call (the longest query: the observation of one chunk, then the
    noisy frames, action and state blocks of the next) or a denoising call runs: one full query (3545 rows at the
    droid shape). 'reset': a chunk that would start at or beyond local_attn_size runs after a reset, so the cache
    holds at most the first frame and the chunks before the current one: n + L exceeds the window only by the
    action and state tokens (25 rows at the droid shape, where the window is 9 frames = 7920 rows)."""
    ft, fpc = cfg.frame_tokens, cfg.frames_per_chunk
    extra = cfg.actions_per_chunk + cfg.states_per_chunk
    window = capacity_frames * ft
    if overflow == "roll":
        return 2 * fpc * ft + extra
    need = 0
    c = 1
    while 1 + (c - 1) * fpc < cfg.local_attn_size:                 # the chunks that run without a reset
        held = min(1 + (c - 1) * fpc, capacity_frames)              # first frame + chunks < c (denoise)
        need = max(need, held * ft + fpc * ft + extra)
        held = min(1 + max(0, c - 2) * fpc, capacity_frames)        # control: chunk c - 1 is being written
        need = max(need, held * ft + (ft if c == 1 else fpc * ft) + fpc * ft + extra)
        c += 1
    need = max(need, fpc * ft + fpc * ft + extra)                   # any chunk against an empty (reset) cache
    return max(0, need - window)


class FusedKVCache:
    def __init__(self, cfg, batch: int, dtype: torch.dtype = torch.bfloat16, device="cpu", overflow: str = "reset",
                 capacity_frames: int | None = None, num_layers: int | None = None, *, fp8: bool = False,
                 staging_tokens: int | None = None, backend: str = "auto"):
        """cfg: a DreamZeroConfig; batch: B (one CFG branch, or both batched); dtype: the activations' dtype
        (float32/bfloat16/float16); overflow: 'reset' or 'roll'; capacity_frames: window in latent frames
        (default cfg.local_attn_size: the sink plus local_attn_size - 1 frames); num_layers: default cfg.num_layers;
        fp8: store k/v as float8_e4m3fn with per-(token, head) scales; staging_tokens: rows after the window for the
        new tokens of a pass (default: default_staging_tokens(), enough for every pass the policy allows);
        backend: kernels to use ('auto', 'triton', 'cuda', 'cupy', 'torch'; see ops.py)."""
        if overflow not in ("reset", "roll"):
            raise ValueError(f"overflow must be 'reset' or 'roll', got {overflow!r}")
        if dtype not in ops.ACT_DTYPES:
            raise TypeError(f"dtype must be float32, bfloat16 or float16 (the activations' dtype), got {dtype}; "
                            f"for an FP8 cache pass fp8=True")
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        self.cfg = cfg
        self.overflow = overflow
        self.dtype = dtype
        self.fp8 = bool(fp8)
        self.device = torch.device(device)
        self.backend = ops.resolve_backend(self.device, backend, FP8_DTYPE if self.fp8 else dtype, dtype)
        self.capacity_frames = cfg.local_attn_size if capacity_frames is None else capacity_frames
        if self.capacity_frames < 1 + cfg.frames_per_chunk:
            raise ValueError(f"a cache of {self.capacity_frames} frames cannot hold the first frame and one chunk")
        self.num_layers = cfg.num_layers if num_layers is None else num_layers
        ft = cfg.frame_tokens
        self.staging_tokens = (default_staging_tokens(cfg, self.capacity_frames, overflow) if staging_tokens is None
                               else int(staging_tokens))
        if self.staging_tokens < 0:
            raise ValueError(f"staging_tokens must be >= 0, got {staging_tokens}")
        self.window_tokens = self.capacity_frames * ft
        self.total_tokens = self.window_tokens + self.staging_tokens
        shape = (batch, self.total_tokens, cfg.num_heads, cfg.head_dim)
        storage = FP8_DTYPE if self.fp8 else dtype
        self.k = [torch.zeros(shape, dtype=storage, device=self.device) for _ in range(self.num_layers)]
        self.v = [torch.zeros(shape, dtype=storage, device=self.device) for _ in range(self.num_layers)]
        if self.fp8:
            sshape = shape[:3]
            self.k_scale = [torch.zeros(sshape, dtype=torch.float32, device=self.device)
                            for _ in range(self.num_layers)]
            self.v_scale = [torch.zeros(sshape, dtype=torch.float32, device=self.device)
                            for _ in range(self.num_layers)]
        else:
            self.k_scale = self.v_scale = None
        self.write_pos = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.frames: tuple = ()

    # ------------------------------------------------------------------ state
    @property
    def batch(self) -> int:
        return self.k[0].shape[0] if self.k else 0

    @property
    def num_tokens(self) -> int:
        return len(self.frames) * self.cfg.frame_tokens

    def reset(self) -> None:
        """Forget every cached frame (a new instruction or episode). Buffers keep their addresses."""
        self.frames = ()
        self.write_pos.fill_(0)

    def rewind(self, frames: tuple) -> None:
        """Go back to an earlier state whose frames the buffers still hold (a prefix of the slots written since):
        used to replay one control step, e.g. in benchmarks. Updates write_pos on the device."""
        if tuple(frames) != tuple(self.frames[:len(frames)]):
            raise ValueError(f"cannot rewind to {frames}: the cache holds {self.frames}")
        self.frames = tuple(frames)
        self.write_pos.fill_(self.num_tokens)

    def needs_reset(self, chunk: int) -> bool:
        """Release policy: reset when chunk `chunk` would start at or beyond local_attn_size frames."""
        start = 1 + (chunk - 1) * self.cfg.frames_per_chunk
        return self.overflow == "reset" and chunk >= 1 and start >= self.cfg.local_attn_size

    def layout(self, mode: str, chunk: int, rule: str | None = None) -> CachePass:
        """The layout of an inference call against this cache's current content."""
        return self.cfg.layout(mode, chunk=chunk, cached_frames=self.frames, rule=rule)

    def __repr__(self) -> str:
        return (f"FusedKVCache(batch={self.batch}, layers={self.num_layers}, frames={self.frames}, "
                f"capacity_frames={self.capacity_frames}, staging_tokens={self.staging_tokens}, dtype={self.dtype}, "
                f"fp8={self.fp8}, overflow={self.overflow!r}, backend={self.backend!r})")

    # ------------------------------------------------------------------ slot plan (the layout's, as the reference)
    def _plan(self, layout: CachePass) -> list:
        return layout.cache_slots(self.capacity_frames, self.overflow)

    def _begin(self, layer: int, B: int, L: int, layout: CachePass) -> int:
        """Checks shared by extend/project (plain Python on host state: traceable by torch.compile). Returns n,
        the number of cached tokens."""
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer!r} is outside [0, {self.num_layers})")
        n = self.num_tokens
        if layout.n_cached != n:
            raise ValueError(f"layout expects {layout.n_cached} cached tokens, the cache holds {n}")
        if tuple(layout.cached_frames()) != self.frames:
            raise ValueError(f"layout was built for cached frames {tuple(layout.cached_frames())}, the cache holds "
                             f"{self.frames} (build it with cache.layout())")
        if B != self.batch:
            raise ValueError(f"batch {B} does not match the cache's batch {self.batch}")
        if L != layout.q_len:
            raise ValueError(f"{L} new tokens, but the layout has {layout.q_len} query tokens")
        if layout.writes_cache:
            self._plan(layout)          # raises now (not at commit) when policy 'reset' overflows
        if n + L > self.total_tokens:
            raise ValueError(f"{n} cached + {L} new tokens exceed the cache's {self.total_tokens} rows "
                             f"({self.window_tokens} window + {self.staging_tokens} staging): with policy 'reset', "
                             f"reset before a chunk for which needs_reset() is True, or create the cache with a "
                             f"larger staging_tokens")
        return n

    def _kv_all(self, layer: int, rows: int) -> tuple:
        if self.fp8:
            return (dequantize_fp8_per_head(self.k[layer][:, :rows], self.k_scale[layer][:, :rows], self.dtype),
                    dequantize_fp8_per_head(self.v[layer][:, :rows], self.v_scale[layer][:, :rows], self.dtype))
        return self.k[layer][:, :rows], self.v[layer][:, :rows]

    def _scales(self, layer: int) -> tuple:
        return (self.k_scale[layer], self.v_scale[layer]) if self.fp8 else (None, None)

    # ------------------------------------------------------------------ the pass
    def extend(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, layout: CachePass) -> tuple:
        """Write the pass's keys/values into the staging rows and return the whole key sequence of `layout`.

        k_new, v_new: [B, L, H, D] in `dtype` (k already normalized and rotated; L = layout.q_len).
        Returns (k_all, v_all) [B, n + L, H, D], n = num_tokens: views of the cache buffer (batch stride
        total_tokens * H * D), or, for an FP8 cache, new tensors dequantized to `dtype`."""
        if not isinstance(k_new, torch.Tensor) or k_new.dim() != 4:
            raise ValueError(f"k_new must be a [B, L, H, D] tensor, got {getattr(k_new, 'shape', type(k_new))}")
        want = (self.cfg.num_heads, self.cfg.head_dim)
        if tuple(k_new.shape[2:]) != want or not isinstance(v_new, torch.Tensor) or v_new.shape != k_new.shape:
            raise ValueError(f"k_new/v_new must be [B, L, {want[0]}, {want[1]}] and equal; got {tuple(k_new.shape)} "
                             f"and {tuple(getattr(v_new, 'shape', ()))}")
        if k_new.dtype != self.dtype or v_new.dtype != self.dtype:
            raise TypeError(f"k_new/v_new are {k_new.dtype}/{v_new.dtype}; this cache takes {self.dtype}")
        n = self._begin(layer, k_new.shape[0], k_new.shape[1], layout)
        ks, vs = self._scales(layer)
        ops.kv_cache_write(k_new, v_new, self.k[layer], self.v[layer], self.write_pos, ks, vs, backend=self.backend,
                           check=False)
        return self._kv_all(layer, n + k_new.shape[1])

    def project(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, wq: torch.Tensor,
                wk: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor, layout: CachePass) -> tuple:
        """The fused epilogue of layer `layer`'s q/k/v projections: RMSNorm(q, wq) and RMSNorm(k, wk) over the full
        hidden size, RoPE from cos/sin, q_rot out, rotated k and v into the staging rows; then as extend().

        q, k, v: [B, L, C] in `dtype` straight from the projections (last dim contiguous, any row stride);
        wq, wk: [C]; cos, sin: [L, D/2] float32 (the layout's RoPE tables). L = layout.q_len.
        Returns (q_rot [B, L, H, D], k_all, v_all [B, n + L, H, D]) -- k_all/v_all as in extend()."""
        if not isinstance(q, torch.Tensor) or q.dim() != 3:
            raise ValueError(f"q must be a [B, L, C] tensor, got {getattr(q, 'shape', type(q))}")
        if q.shape[2] != self.cfg.dim:
            raise ValueError(f"q has hidden size {q.shape[2]}, the cache's model has {self.cfg.dim}")
        if q.dtype != self.dtype:
            raise TypeError(f"q is {q.dtype}; this cache takes {self.dtype}")
        n = self._begin(layer, q.shape[0], q.shape[1], layout)
        ks, vs = self._scales(layer)
        q_rot = ops.qk_norm_rope_kv_write(q, k, v, wq, wk, eps, cos, sin, self.cfg.num_heads, self.k[layer],
                                          self.v[layer], self.write_pos, ks, vs, backend=self.backend, check=False)
        k_all, v_all = self._kv_all(layer, n + q.shape[1])
        return q_rot, k_all, v_all

    def fp8_views(self, layer: int, rows: int) -> tuple:
        """FP8 cache only: (k [B, rows, H, D] float8_e4m3fn, k_scale [B, rows, H] float32, v, v_scale), views of
        the first `rows` rows (e.g. n + L after a pass), for an attention op that dequantizes on the fly."""
        if not self.fp8:
            raise ValueError("fp8_views() needs a cache created with fp8=True")
        if not 0 <= rows <= self.total_tokens:
            raise ValueError(f"rows={rows} is outside [0, {self.total_tokens}]")
        return (self.k[layer][:, :rows], self.k_scale[layer][:, :rows], self.v[layer][:, :rows],
                self.v_scale[layer][:, :rows])

    def commit(self, layout: CachePass) -> None:
        """After a full pass over every layer: the frames the pass wrote become cached (moved from staging into
        evicted slots when 'roll' evicts), and write_pos advances."""
        if not layout.writes_cache:
            return
        slots = self._plan(layout)      # the same plan as during the pass: frames change only here
        ft = self.cfg.frame_tokens
        n = self.num_tokens
        a, _ = layout.cache_write_range()
        for i, slot in enumerate(slots):  # ascending: a destination never lies in a later frame's staging rows
            src, dst = n + a + i * ft, slot * ft
            if src == dst:
                continue
            for layer in range(self.num_layers):
                bufs = [self.k[layer], self.v[layer]]
                if self.fp8:
                    bufs += [self.k_scale[layer], self.v_scale[layer]]
                for buf in bufs:
                    chunk = buf[:, src:src + ft]
                    if abs(src - dst) < ft:
                        chunk = chunk.clone()
                    buf[:, dst:dst + ft].copy_(chunk)
        frames = list(self.frames) + [None] * max(0, max(slots) + 1 - len(self.frames))
        for slot, f in zip(slots, layout.cache_write_frames()):
            frames[slot] = f
        self.frames = tuple(frames)
        self.write_pos.fill_(self.num_tokens)
