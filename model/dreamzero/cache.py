"""The reference KV cache: keys/values of video tokens only, per layer, preallocated.

Storage per layer: k, v [B, capacity_frames * frame_tokens, H, D], B being the batch of one CFG branch (or both
branches batched). Slots hold whole latent frames; `frames` lists the frame held by each valid slot in physical
order, and the valid slots always form a prefix of the buffer, so the cached keys are one contiguous view.

Rules (docs/reference.md#control-step-and-kv-cache): only video keys/values are cached (never action/state); the
first frame is a sink that stays; the cache is written only by passes that carry observed frames (the first frame,
ground-truth replacement, or the observed part of a fused control step); denoising passes only read it. When the
window would overflow, policy 'reset' (the release: a reset when the next chunk starts at or beyond local_attn_size
frames) or 'roll' (evict the oldest non-sink frames, keep the sink) applies. `reset()` empties it (new instruction).

This class is the reference path: `extend` concatenates the cached keys with the new ones and then stores the
observed frames into their slots. The fused kernels of dz_kernels implement the same contract.
"""
from __future__ import annotations

import torch

from .layout import SequenceLayout


class KVCache:
    def __init__(self, cfg, batch: int, dtype=torch.float32, device="cpu", overflow: str = "reset",
                 capacity_frames: int | None = None, num_layers: int | None = None):
        if overflow not in ("reset", "roll"):
            raise ValueError(f"overflow must be 'reset' or 'roll', got {overflow!r}")
        for name, n in (("batch", batch), ("capacity_frames", capacity_frames), ("num_layers", num_layers)):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise ValueError(f"KVCache: {name} must be a positive int, got {n!r}")
        self.cfg = cfg
        self.overflow = overflow
        self.capacity_frames = cfg.local_attn_size if capacity_frames is None else capacity_frames
        if self.capacity_frames < 1 + cfg.frames_per_chunk:
            raise ValueError(f"a cache of {self.capacity_frames} frames cannot hold the first frame and one chunk")
        self.num_layers = cfg.num_layers if num_layers is None else num_layers
        ft = cfg.frame_tokens
        shape = (batch, self.capacity_frames * ft, cfg.num_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        self.frames: tuple = ()

    # ------------------------------------------------------------------ state
    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def num_tokens(self) -> int:
        return len(self.frames) * self.cfg.frame_tokens

    def reset(self) -> None:
        """Forget every cached frame (a new instruction or episode). Buffers keep their addresses."""
        self.frames = ()

    def rewind(self, frames: tuple) -> None:
        """Go back to an earlier state whose frames the buffers still hold (a prefix of the slots written since):
        used to replay one control step, e.g. in benchmarks."""
        if tuple(frames) != tuple(self.frames[:len(frames)]):
            raise ValueError(f"cannot rewind to {frames}: the cache holds {self.frames}")
        self.frames = tuple(frames)

    def needs_reset(self, chunk: int) -> bool:
        """Release policy: reset when chunk `chunk` would start at or beyond local_attn_size frames."""
        start = 1 + (chunk - 1) * self.cfg.frames_per_chunk
        return self.overflow == "reset" and chunk >= 1 and start >= self.cfg.local_attn_size

    def layout(self, mode: str, chunk: int, rule: str | None = None) -> SequenceLayout:
        """The layout of an inference call against this cache's current content."""
        return self.cfg.layout(mode, chunk=chunk, cached_frames=self.frames, rule=rule)

    # ------------------------------------------------------------------ the pass
    def _plan(self, layout: SequenceLayout) -> list:
        return layout.cache_slots(self.capacity_frames, self.overflow)

    def extend(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, layout: SequenceLayout) -> tuple:
        """Keys/values of the whole key sequence of `layout` (cached first, then the new ones), and store the
        observed frames' k/v into their slots. k_new, v_new [B, q_len, H, D] (k already normalized and rotated)."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer!r} is outside [0, {self.num_layers}) (a negative index would write "
                             f"another layer's cache)")
        n = self.num_tokens
        if layout.n_cached != n:
            raise ValueError(f"layout expects {layout.n_cached} cached tokens, the cache holds {n}")
        if layout.cached_frames() != self.frames:
            raise ValueError(f"layout was built for cached frames {layout.cached_frames()}, the cache holds "
                             f"{self.frames} (build it with cache.layout())")
        H, D = self.k[layer].shape[2:]
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or tuple(t.shape[2:]) != (H, D):
                raise ValueError(f"{name} must be a [B, L, H, D] = [B, L, {H}, {D}] tensor, got "
                                 f"{list(getattr(t, 'shape', [])) or type(t).__name__}")
        if k_new.shape[0] != self.batch or v_new.shape[0] != self.batch:
            raise ValueError(f"batch {k_new.shape[0]}/{v_new.shape[0]} (k_new/v_new) does not match the cache's "
                             f"batch {self.batch}")
        if k_new.shape[1] != layout.q_len or v_new.shape[1] != layout.q_len:
            raise ValueError(f"{k_new.shape[1]}/{v_new.shape[1]} new tokens (k_new/v_new), but the layout has "
                             f"{layout.q_len} query tokens")
        k_all = torch.cat([self.k[layer][:, :n], k_new], dim=1) if n else k_new
        v_all = torch.cat([self.v[layer][:, :n], v_new], dim=1) if n else v_new
        if layout.writes_cache:
            # the plan depends only on `frames` and the layout, which change only at commit: the same for every
            # layer of the pass (recomputed per layer: plain Python, which torch.compile traces as constants)
            slots = self._plan(layout)
            a, _ = layout.cache_write_range()
            ft = self.cfg.frame_tokens
            for i, slot in enumerate(slots):
                src = slice(a + i * ft, a + (i + 1) * ft)
                self.k[layer][:, slot * ft:(slot + 1) * ft] = k_new[:, src].to(self.k[layer].dtype)
                self.v[layer][:, slot * ft:(slot + 1) * ft] = v_new[:, src].to(self.v[layer].dtype)
        return k_all, v_all

    def commit(self, layout: SequenceLayout) -> None:
        """After a full pass over every layer: record the frames the pass wrote."""
        if not layout.writes_cache:
            return
        slots = self._plan(layout)
        frames = list(self.frames) + [None] * max(0, max(slots) + 1 - len(self.frames))
        for slot, f in zip(slots, layout.cache_write_frames()):
            frames[slot] = f
        self.frames = tuple(frames)
