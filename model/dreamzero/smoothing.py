"""Action smoothing before execution (the release): upsample the chunk 2x with a cubic spline, apply a
Savitzky-Golay filter (window 21, order 3) along time, and take every other sample to return to the original rate."""
from __future__ import annotations

import numpy as np


def smooth_actions(actions: np.ndarray, window: int = 21, order: int = 3, upsample: int = 2) -> np.ndarray:
    """actions [T, D] or [B, T, D] (numpy, any float dtype) -> the same shape, smoothed along T.

    The Savitzky-Golay window is shrunk to the largest odd length that fits the upsampled chunk when the chunk is
    shorter than the window (documented behaviour for short test chunks); with fewer than order + 2 upsampled
    samples the chunk is returned unchanged.
    """
    from scipy.interpolate import CubicSpline
    from scipy.signal import savgol_filter

    a = np.asarray(actions)
    if a.ndim not in (2, 3):
        raise ValueError(f"actions must be [T, D] or [B, T, D], got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"actions must be floating point, got {a.dtype}")
    T = a.shape[-2]
    if T < 2:
        return a.copy()
    t = np.arange(T, dtype=np.float64)
    tu = np.linspace(0.0, T - 1, (T - 1) * upsample + 1)
    up = CubicSpline(t, a.astype(np.float64), axis=-2)(tu)
    n = up.shape[-2]
    w = min(window, n if n % 2 else n - 1)
    if w < order + 2:
        return a.copy()
    filt = savgol_filter(up, window_length=w, polyorder=order, axis=-2)
    return filt[..., ::upsample, :].astype(a.dtype)
