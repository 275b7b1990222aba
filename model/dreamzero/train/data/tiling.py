"""Camera views into one frame: each view resized, then tiled as the release's DreamTransform._prepare_video does."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _resize(frames: np.ndarray, size: tuple) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, h, w, 3], bilinear with antialiasing (identity when the size matches)."""
    if tuple(frames.shape[1:3]) == tuple(size):
        return frames
    t = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    r = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return r.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def resize_frames(frames: np.ndarray, size: tuple) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, h, w, 3] as the release resizes a tiled frame for the 5B (F.interpolate,
    bilinear, align_corners False, no antialiasing; here on the uint8 pixels, rounded)."""
    if tuple(frames.shape[1:3]) == tuple(size):
        return frames
    t = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    r = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)
    return r.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def tile_views(views: list, tiling: str, view_size: tuple, wrist_index: int | None = None) -> np.ndarray:
    """Tile camera views (each uint8 [T, H_i, W_i, 3]) into one [T, 2h, 2w, 3] frame, (h, w) = view_size.

    "droid": the wrist view stretched 2x in width (pixel repeat) across the top row, the two other views below it
             (left | right), in their order;
    "grid":  [view0 | view2] over [view1 | black] (missing views black);
    "single": the first view resized to the full frame.
    """
    h, w = view_size
    T = views[0].shape[0]
    if any(v.shape[0] != T for v in views):
        raise ValueError(f"views have different frame counts: {[v.shape[0] for v in views]}")
    out = np.zeros((T, 2 * h, 2 * w, 3), dtype=np.uint8)
    if tiling == "single":
        return _resize(views[0], (2 * h, 2 * w))
    views = [_resize(v, (h, w)) for v in views]
    if tiling == "droid":
        if len(views) != 3:
            raise ValueError(f"the DROID tiling needs 3 views, got {len(views)}")
        wi = 2 if wrist_index is None else wrist_index
        others = [v for i, v in enumerate(views) if i != wi]
        out[:, :h, :] = np.repeat(views[wi], 2, axis=2)
        out[:, h:, :w] = others[0]
        out[:, h:, w:] = others[1]
        return out
    if tiling == "grid":
        if len(views) > 3:
            raise ValueError(f"the grid tiling holds at most 3 views, got {len(views)}")
        slots = [(slice(0, h), slice(0, w)), (slice(h, 2 * h), slice(0, w)), (slice(0, h), slice(w, 2 * w))]
        for v, (ys, xs) in zip(views, slots):
            out[:, ys, xs] = v
        return out
    raise ValueError(f"unknown tiling {tiling!r}")
