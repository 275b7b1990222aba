"""Per-feature statistics of a dataset's state and action columns, and the release's normalization modes."""
from __future__ import annotations

import numpy as np

STAT_NAMES = ("mean", "std", "min", "max", "q01", "q99")


def compute_feature_stats(values: np.ndarray) -> dict:
    """mean, std, min, max, q01, q99 over axis 0 of a [N, D] array (the release's calculate_dataset_statistics)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[:, None]
    if v.shape[0] == 0:
        raise ValueError("cannot compute statistics of an empty array")
    return {"mean": v.mean(0).tolist(), "std": v.std(0).tolist(), "min": v.min(0).tolist(), "max": v.max(0).tolist(),
            "q01": np.quantile(v, 0.01, axis=0).tolist(), "q99": np.quantile(v, 0.99, axis=0).tolist()}


def normalize(x: np.ndarray, stats: dict, mode: str) -> np.ndarray:
    """Normalize [..., D] with per-dim statistics (the release's Normalizer.forward).

    q99: 2 (x - q01) / (q99 - q01) - 1 where q01 != q99 (x unchanged elsewhere), clipped to [-1, 1];
    mean_std: (x - mean) / std where std != 0; min_max: 2 (x - min) / (max - min) - 1 where max != min, clipped.
    """
    x = np.asarray(x, dtype=np.float64)
    if mode == "none":
        return x.astype(np.float32)
    if mode == "q99":
        lo, hi = np.asarray(stats["q01"], np.float64), np.asarray(stats["q99"], np.float64)
        ok = lo != hi
        y = np.where(ok, 2.0 * (x - lo) / np.where(ok, hi - lo, 1.0) - 1.0, x)
        return np.clip(y, -1.0, 1.0).astype(np.float32)
    if mode == "min_max":
        lo, hi = np.asarray(stats["min"], np.float64), np.asarray(stats["max"], np.float64)
        ok = lo != hi
        y = np.where(ok, 2.0 * (x - lo) / np.where(ok, hi - lo, 1.0) - 1.0, x)
        return np.clip(y, -1.0, 1.0).astype(np.float32)
    if mode == "mean_std":
        mu, sd = np.asarray(stats["mean"], np.float64), np.asarray(stats["std"], np.float64)
        ok = sd != 0
        return np.where(ok, (x - mu) / np.where(ok, sd, 1.0), x).astype(np.float32)
    raise ValueError(f"unknown normalization mode {mode!r}")


def unnormalize(y: np.ndarray, stats: dict, mode: str) -> np.ndarray:
    """The inverse of `normalize` on [..., D] (for the actions a model returns; exact inside the clipping range).

    q99: (y + 1) / 2 (q99 - q01) + q01 where q01 != q99 (y unchanged elsewhere); min_max alike with min/max;
    mean_std: y std + mean where std != 0; none: y. Returns float64.
    """
    y = np.asarray(y, dtype=np.float64)
    if mode == "none":
        return y
    if mode in ("q99", "min_max"):
        lo_key, hi_key = ("q01", "q99") if mode == "q99" else ("min", "max")
        lo, hi = np.asarray(stats[lo_key], np.float64), np.asarray(stats[hi_key], np.float64)
        return np.where(lo != hi, (y + 1.0) / 2.0 * (hi - lo) + lo, y)
    if mode == "mean_std":
        mu, sd = np.asarray(stats["mean"], np.float64), np.asarray(stats["std"], np.float64)
        return np.where(sd != 0, y * sd + mu, y)
    raise ValueError(f"unknown normalization mode {mode!r}")
