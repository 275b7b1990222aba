"""Rotary position embedding tables for a layout.

Video tokens get Wan's 3D RoPE: the head dim is split into time/height/width parts of (d - 4*(d//6), 2*(d//6),
2*(d//6)) real dims (44/42/42 at d = 128), each rotated by its own frequencies (theta 10000) on adjacent pairs; the
time index is the token's absolute latent frame (so a chunk's RoPE starts at its start frame). Action and state tokens
get 1D RoPE over the full head dim, at their index in the whole action (or state) sequence: action block of chunk c
holds positions (c-1)*A .. c*A - 1. The two copies of a frame in teacher forcing share positions.

Angles are computed in float64 (as the release's rope_params) and returned as cos/sin of shape [L, d/2]: float32 by
default, float64 for a float64 model (dtype=torch.float64), so a float64 run rotates by exact angles.
"""
from __future__ import annotations

import torch

from .layout import Kind, SequenceLayout


def _inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def token_positions(layout: SequenceLayout, grid_h: int, grid_w: int) -> dict:
    """Per query token: 'kind' (int8), 't', 'h', 'w' (video; -1 otherwise) and 'p' (1D position; -1 for video)."""
    key = ("positions", grid_h, grid_w)
    if key in layout._cache:
        return layout._cache[key]
    L = layout.q_len
    t = torch.full((L,), -1, dtype=torch.int64)
    h = torch.full((L,), -1, dtype=torch.int64)
    w = torch.full((L,), -1, dtype=torch.int64)
    p = torch.full((L,), -1, dtype=torch.int64)
    hh = torch.arange(grid_h).repeat_interleave(grid_w)
    ww = torch.arange(grid_w).repeat(grid_h)
    for s in layout.q:
        if s.is_video:
            if s.length != grid_h * grid_w:
                raise ValueError(f"video segment of {s.length} tokens does not match a {grid_h}x{grid_w} grid")
            t[s.start:s.end] = s.frame
            h[s.start:s.end] = hh
            w[s.start:s.end] = ww
        elif s.kind == Kind.ACTION:
            p[s.start:s.end] = (s.chunk - 1) * layout.actions_per_chunk + torch.arange(s.length)
        else:
            p[s.start:s.end] = (s.chunk - 1) * layout.states_per_chunk + torch.arange(s.length)
    out = {"kind": layout.token_kinds(), "t": t, "h": h, "w": w, "p": p}
    layout._cache[key] = out
    return out


def rope_tables(layout: SequenceLayout, cfg, dtype: torch.dtype = torch.float32) -> tuple:
    """(cos, sin), each [q_len, head_dim / 2] in `dtype` (float32 or float64), for the query tokens of `layout`
    (CPU; cached on the layout)."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"RoPE tables are float32 or float64, got {dtype}")
    key = ("rope", cfg.head_dim, cfg.grid_h, cfg.grid_w, cfg.rope_theta, dtype)
    if key in layout._cache:
        return layout._cache[key]
    pos = token_positions(layout, cfg.grid_h, cfg.grid_w)
    d = cfg.head_dim
    dt, dh, dw = cfg.rope_split
    kind = pos["kind"].to(torch.int64)
    is_video = ((kind == int(Kind.FIRST)) | (kind == int(Kind.FIRST_NOISY)) | (kind == int(Kind.CLEAN))
                | (kind == int(Kind.NOISY)))
    # range checks on the segments (plain Python: no host sync, traceable by torch.compile)
    last_frame = max([-1] + [s.frame for s in layout.q if s.is_video])
    if last_frame >= cfg.video_rope_len:
        raise ValueError(f"latent frame {last_frame} is beyond the RoPE table ({cfg.video_rope_len})")
    last_action = max([-1] + [s.chunk * layout.actions_per_chunk - 1 for s in layout.q if s.kind == Kind.ACTION])
    if last_action >= cfg.action_rope_len:
        raise ValueError(f"action position {last_action} is beyond the action RoPE table "
                         f"({cfg.action_rope_len}); reset the cache sooner")
    last_state = max([-1] + [s.chunk * layout.states_per_chunk - 1 for s in layout.q if s.kind == Kind.STATE])
    if last_state >= cfg.state_rope_len:
        raise ValueError(f"state position beyond the state RoPE table ({cfg.state_rope_len})")
    video_ang = torch.cat([
        pos["t"].clamp(min=0)[:, None].double() * _inv_freq(dt, cfg.rope_theta)[None],
        pos["h"].clamp(min=0)[:, None].double() * _inv_freq(dh, cfg.rope_theta)[None],
        pos["w"].clamp(min=0)[:, None].double() * _inv_freq(dw, cfg.rope_theta)[None],
    ], dim=1)
    flat_ang = pos["p"].clamp(min=0)[:, None].double() * _inv_freq(d, cfg.rope_theta)[None]
    ang = torch.where(is_video[:, None], video_ang, flat_ang)
    out = (torch.cos(ang).to(dtype), torch.sin(ang).to(dtype))
    layout._cache[key] = out
    return out
