"""The files of a LeRobot dataset: JSON and JSONL metadata, parquet tables, mp4 videos (decoded with PyAV).
Every reader raises DataError naming the file when it is missing, corrupt or not what it should be."""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from .config import DataError


def read_json(path: str, what: str = "metadata") -> Any:
    """A JSON file (DataError when missing or corrupt; `what` names it in the message)."""
    if not os.path.exists(path):
        raise DataError(f"{what} file not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"corrupt JSON in {path}: {e}") from None


def read_jsonl(path: str) -> list:
    """The records of a JSON-lines file, blank lines skipped (DataError when missing or corrupt)."""
    if not os.path.exists(path):
        raise DataError(f"metadata file not found: {path}")
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"corrupt JSON line {n} in {path}: {e}") from None
    return out


def read_parquet(path: str, columns: list | None = None) -> dict:
    """Read a parquet file into {column: numpy array}; list columns become 2-D float arrays [rows, dim].

    Raises DataError naming the file when it is missing, unreadable, or a requested column is absent.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not os.path.exists(path):
        raise DataError(f"parquet file not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read parquet file {path}: {e}") from None
    names = table.column_names
    if columns is not None:
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"parquet file {path} has no column(s) {missing}; it has {names}")
        names = [c for c in names if c in columns]
    out = {}
    for name in names:
        col = table.column(name).combine_chunks()
        typ = col.type
        try:
            if pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
                lengths = col.value_lengths().to_numpy(zero_copy_only=False) if len(col) else np.zeros(0, np.int64)
                if len(col) and (lengths != lengths[0]).any():
                    # ragged rows (e.g. the task lists of v3 episode metadata): one array per row
                    rows = np.empty(len(col), dtype=object)
                    rows[:] = [np.asarray(r) for r in col.to_pylist()]
                    out[name] = rows
                    continue
                flat = col.flatten().to_numpy(zero_copy_only=False)
                out[name] = flat.reshape(len(col), -1) if len(col) else flat.reshape(0, 0)
            else:
                out[name] = col.to_numpy(zero_copy_only=False)
        except pa.ArrowException as e:
            raise DataError(f"cannot decode column {name!r} of {path}: {e}") from None
    return out


def decode_frames(path: str, timestamps, tolerance: float | None = None) -> np.ndarray:
    """Decode the frames nearest to `timestamps` (seconds) from the first video stream of `path` with PyAV.

    Returns uint8 [T, H, W, 3] (RGB). Raises DataError naming the file when it cannot be opened or decoded, or when a
    requested time has no frame within `tolerance` seconds (default: one frame interval).
    """
    import av

    ts = np.asarray(timestamps, dtype=np.float64).reshape(-1)
    if not os.path.exists(path):
        raise DataError(f"video file not found: {path}")
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise DataError(f"cannot open video file {path}: {e}") from None
    try:
        if not container.streams.video:
            raise DataError(f"video file {path} has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        interval = 1.0 / float(rate) if rate else 1.0 / 30.0
        tol = interval * 0.5 + 1e-6 if tolerance is None else tolerance
        start, stop = float(ts.min()), float(ts.max())
        if stream.time_base is not None and start > 2 * interval:
            container.seek(int(max(start - interval, 0.0) / stream.time_base), stream=stream, backward=True,
                           any_frame=False)
        times, frames = [], []
        for frame in container.decode(stream):
            if frame.pts is None or frame.time is None:
                continue
            t = float(frame.time)
            if t < start - tol:
                continue
            if t > stop + tol:
                break
            times.append(t)
            frames.append(frame)
        if not times:
            raise DataError(f"video file {path} has no frame near {start:.3f}..{stop:.3f} s")
        times_a = np.asarray(times)
        pick = np.abs(times_a[:, None] - ts[None, :]).argmin(axis=0)
        err = np.abs(times_a[pick] - ts)
        if (err > tol).any():
            bad = ts[err > tol]
            raise DataError(f"video file {path} has no frame within {tol * 1000:.1f} ms of t = {bad[:4].tolist()} s "
                            f"(decoded {times_a.min():.3f}..{times_a.max():.3f} s)")
        cache: dict = {}
        out = []
        for i in pick:
            if i not in cache:
                cache[i] = frames[i].to_ndarray(format="rgb24")
            out.append(cache[i])
        return np.stack(out)
    except av.error.FFmpegError as e:
        raise DataError(f"cannot decode video file {path}: {e}") from None
    finally:
        container.close()
