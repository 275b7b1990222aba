"""LeRobot datasets for DreamZero training: the reader, the clip sampler, statistics and normalization.

Formats read (`meta/info.json` "codebase_version"):
- v2.x: `meta/episodes.jsonl`, one parquet per episode at `info["data_path"]`, one mp4 per camera and episode at
  `info["video_path"]`, tasks in `meta/tasks.jsonl`;
- v3.x: `meta/episodes/chunk-*/file-*.parquet` (episode rows with `data/chunk_index`, `data/file_index`,
  `videos/<key>/chunk_index|file_index|from_timestamp`), several episodes per data parquet and per mp4, tasks in
  `meta/tasks.parquet`.
Videos are decoded with PyAV (the frame nearest each requested timestamp, as the release's readers do).

The release's metadata (its LeRobot->GEAR converter writes them) is read as is when present:
`meta/modality.json` (state/action sub-keys as index ranges of the parquet columns, video keys, annotation keys),
`meta/embodiment.json`, `meta/stats.json` (per-feature mean, std, min, max, q01, q99),
`meta/relative_stats_dreamzero.json` (statistics of relative actions) and `meta/step_filter.jsonl` (steps to drop).
Without modality.json the whole `observation.state` and `action` columns are one sub-key each and the video keys
are the info.json features of dtype "video", in order. The state/action sub-keys used are those the release trains
on for a known embodiment (DROID: joint_position + gripper_position, out of the 3 state and 6 action sub-keys its
converter writes), else all of them, or the ones DataConfig names. Missing statistics are computed once and written beside the
dataset (meta/stats.json, meta/relative_stats_dreamzero.json), atomically.

A training clip (the release's DROID sampler, ShardedLeRobotSubLangSingleActionChunkDatasetDROID, at a fixed K):
anchor step a, K chunks of H action steps (H = 24 at 15 Hz for DROID, 48 at 30 Hz for AgiBot):
- video frames at steps a, a + s, ..., a + K*H (s = dataset fps / 5 FPS: every 3rd step at 15 Hz), so
  1 + K*H/s raw frames = 1 + 8K, which the VAE (temporal stride 4) turns into 1 + 2K latent frames;
- actions at steps a .. a + K*H - 1; state at the first step of each chunk, a + (k-1)*H;
- relative actions: for the relative sub-keys (joint positions by default), chunk k's actions minus the state of the
  same sub-key at the chunk's first step;
- normalization ("q99", the release's mode for DROID and AgiBot): 2 (x - q01) / (q99 - q01) - 1, clipped to [-1, 1]
  (left as is where q01 == q99); actions use the relative statistics for relative sub-keys;
- the views, resized to 176x320 each, are tiled into one 352x640 frame: DROID puts the wrist view, stretched 2x in
  width, across the top row and the two exterior views below it; other embodiments use [view0 | view2] over
  [view1 | black] (the release's DreamTransform._prepare_video);
- anchors run over [0, length - 1 - K*H]; the release's step filter (meta/step_filter.jsonl) drops anchors, and the
  idle-action filter drops anchors whose first chunk does not move (the largest change of the normalized action over
  the chunk below `idle_threshold`; the release's DROID conversion removed idle frames beforehand).
Datasets without actions (human or other robots' videos) yield clips with has_action False, zero actions and state.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DataError", "DataConfig", "Modality", "Episode", "Clip", "LeRobotDataset", "normalize", "tile_views",
    "decode_frames", "read_parquet", "compute_feature_stats", "build_prompt", "atomic_write_json",
    "DEFAULT_INSTRUCTION",
]

DEFAULT_INSTRUCTION = "Perform the default behavior."
STAT_NAMES = ("mean", "std", "min", "max", "q01", "q99")
# The release's training selection of state/action sub-keys per embodiment tag (its data YAMLs, in their order)
RELEASE_KEYS = {
    "oxe_droid": {"state": ("joint_position", "gripper_position"),
                  "action": ("joint_position", "gripper_position")},
    "agibot": {"state": ("left_arm_joint_position", "right_arm_joint_position", "left_effector_position",
                         "right_effector_position", "head_position", "waist_position"),
               "action": ("left_arm_joint_position", "right_arm_joint_position", "left_effector_position",
                          "right_effector_position", "head_position", "waist_position", "robot_velocity")},
}
NORM_MODES = ("q99", "mean_std", "min_max", "none")
VAE_TEMPORAL_STRIDE = 4


class DataError(ValueError):
    """A dataset file is missing, corrupt or inconsistent; the message names the file."""


# ------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class DataConfig:
    """How clips are cut from a LeRobot dataset.

    num_chunks: K chunks per clip (4 in DROID training).
    action_horizon: H action steps per chunk; None = the model's actions_per_chunk (24 DROID, 48 AgiBot).
    video_fps: frame rate of the video fed to the VAE (5); the dataset fps must be a multiple of it.
    frames_per_chunk: latent frames per chunk (the model's, 2); H / (fps / video_fps) must be 4x this.
    view_size: (height, width) of one view before tiling (176, 320); the tiled frame is twice both.
    tiling: "auto" (DROID layout for the oxe_droid tag or a dataset with a wrist view and 3 cameras, else "grid"),
            "droid", "grid" or "single" (one view resized to the full frame).
    relative_action_keys: action sub-keys made relative to the state of the same sub-key; "auto" = sub-keys in both
            state and action whose name contains "joint" (the release's DROID/AgiBot choice); () for none.
    normalization: "q99" (the release), "mean_std", "min_max" or "none".
    idle_threshold: drop anchors whose first chunk's normalized action changes by less than this (None: off).
    action_dim, state_dim: padded widths (the model's 32 / 64).
    embodiment_id: the model's embodiment slot for this dataset's clips.
    embodiment_tag: override of meta/embodiment.json.
    video_only: treat the dataset as video only (no action loss) even if it has actions.
    prompt_template: "auto" (the release's per-embodiment wording of the instruction for DROID/AgiBot) or "none".
    state_keys, action_keys: the modality.json sub-keys used, in this order (concatenated, then padded); "auto" =
            the release's training selection for a known embodiment tag (RELEASE_KEYS: DROID uses joint_position +
            gripper_position of the 3 state / 6 action sub-keys its converter writes), else every sub-key in
            modality.json order.
    """
    num_chunks: int = 4
    action_horizon: int | None = None
    video_fps: float = 5.0
    frames_per_chunk: int = 2
    view_size: tuple = (176, 320)
    tiling: str = "auto"
    relative_action_keys: Any = "auto"
    normalization: str = "q99"
    idle_threshold: float | None = 0.01
    action_dim: int = 32
    state_dim: int = 64
    states_per_chunk: int = 1
    embodiment_id: int = 0
    embodiment_tag: str | None = None
    video_only: bool = False
    prompt_template: str = "auto"
    state_keys: Any = "auto"
    action_keys: Any = "auto"

    def __post_init__(self):
        if self.num_chunks < 1:
            raise ValueError(f"num_chunks must be >= 1, got {self.num_chunks}")
        if self.tiling not in ("auto", "droid", "grid", "single"):
            raise ValueError(f"tiling must be auto/droid/grid/single, got {self.tiling!r}")
        if self.normalization not in NORM_MODES:
            raise ValueError(f"normalization must be one of {NORM_MODES}, got {self.normalization!r}")
        if len(self.view_size) != 2 or min(self.view_size) < 1:
            raise ValueError(f"view_size must be (height, width), got {self.view_size}")
        for name in ("state_keys", "action_keys"):
            v = getattr(self, name)
            if isinstance(v, str) and v != "auto":
                raise ValueError(f"{name} must be 'auto' or a list of sub-keys, got {v!r}")
            if not isinstance(v, str):
                object.__setattr__(self, name, tuple(v))
        if self.prompt_template not in ("auto", "none"):
            raise ValueError(f"prompt_template must be 'auto' or 'none', got {self.prompt_template!r}")

    @classmethod
    def for_model(cls, model_cfg, **kw) -> "DataConfig":
        """A DataConfig matching a DreamZeroConfig: chunk sizes, padded widths, and a view size such that the tiled
        frame is exactly 8x the latent size (176x320 views -> 352x640 -> 44x80 latents at droid-14b)."""
        base = dict(action_horizon=model_cfg.actions_per_chunk, frames_per_chunk=model_cfg.frames_per_chunk,
                    action_dim=model_cfg.action_dim, state_dim=model_cfg.state_dim,
                    states_per_chunk=model_cfg.states_per_chunk, num_chunks=model_cfg.max_chunks,
                    view_size=(model_cfg.latent_height * 4, model_cfg.latent_width * 4))
        base.update(kw)
        return cls(**base)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["view_size"] = list(self.view_size)
        for name in ("relative_action_keys", "state_keys", "action_keys"):
            if not isinstance(getattr(self, name), str):
                d[name] = list(getattr(self, name))
        return d

    @property
    def frame_size(self) -> tuple:
        return (2 * self.view_size[0], 2 * self.view_size[1])


# ------------------------------------------------------------------------------------------------ small I/O helpers
def atomic_write_json(path: str, obj: Any) -> None:
    """Write JSON to `path` through a temporary file in the same directory and os.replace (never half-written)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_json(path: str, what: str = "metadata") -> Any:
    if not os.path.exists(path):
        raise DataError(f"{what} file not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"corrupt JSON in {path}: {e}") from None


def _read_jsonl(path: str) -> list:
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


# ------------------------------------------------------------------------------------------------ statistics
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


# ------------------------------------------------------------------------------------------------ views
def _resize(frames: np.ndarray, size: tuple) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, h, w, 3], bilinear with antialiasing (identity when the size matches)."""
    if tuple(frames.shape[1:3]) == tuple(size):
        return frames
    t = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    r = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
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


_DROID_PROMPT = ("A multi-view video shows that a robot {t} The video is split into three views: The top view shows "
                 "the camera view from the robot's wrist, the bottom-left view shows the camera view from the left "
                 "exterior camera, and the bottom-right view shows the camera view from the right exterior camera. "
                 "During training, one of the two bottom exterior views may be a black screen (dropped view). The "
                 "robot {t}")
_AGIBOT_PROMPT = ("A multi-view video shows that a robot {t} The video is split into four views: The top-left view "
                  "shows the camera view from the robot's head, the top-right view shows the camera view from the "
                  "right hand, the bottom-left view shows the camera view from the left hand, and the bottom-right "
                  "view is a black screen (inactive view). The robot {t}")


def build_prompt(task: str, embodiment_tag: str | None, template: str = "auto") -> str:
    """The instruction as the release's collator words it for the text encoder (DROID and AgiBot templates; other
    embodiments, or template "none", get the task text itself)."""
    if template == "none":
        return task
    t = task.lower()
    if embodiment_tag == "oxe_droid":
        return _DROID_PROMPT.format(t=t)
    if embodiment_tag in ("agibot", "xdof"):
        return _AGIBOT_PROMPT.format(t=t)
    return task


# ------------------------------------------------------------------------------------------------ dataset
@dataclass(frozen=True)
class SubKey:
    name: str
    original_key: str
    start: int
    end: int


@dataclass(frozen=True)
class Modality:
    """The meta/modality.json view of a dataset: state/action sub-keys, video keys (original names), annotation key."""
    state: tuple
    action: tuple
    video: tuple           # (name, original_key) pairs, in order
    annotation: str | None  # original key of the language column, or None (task_index / default instruction)


@dataclass
class Episode:
    """One episode's low-dimensional data. state/action [L, D] float64 (raw, all modality columns concatenated per
    sub-key order), timestamps [L] (seconds, including the v3 file offset per video key in `video_offsets`)."""
    index: int
    length: int
    columns: dict
    timestamps: np.ndarray
    tasks: list
    video_paths: dict
    video_offsets: dict
    data_path: str


@dataclass
class Clip:
    """One training clip. frames uint8 [1 + K*H/s, 2h, 2w, 3]; actions float32 [K*H, action_dim]; action_mask bool
    [K*H, action_dim]; state float32 [K*S, state_dim]; text: the prompt; has_action; embodiment; episode, anchor."""
    frames: np.ndarray
    actions: np.ndarray
    action_mask: np.ndarray
    state: np.ndarray
    text: str
    has_action: bool
    embodiment: int
    episode: int
    anchor: int


class LeRobotDataset:
    """Reader of one LeRobot dataset (v2.x or v3.x) and sampler of DreamZero training clips (see the module doc)."""

    def __init__(self, root: str, cfg: DataConfig = DataConfig(), stats_dir: str | None = None):
        self.root = os.path.abspath(root)
        self.cfg = cfg
        self.info = _read_json(os.path.join(self.root, "meta", "info.json"), "LeRobot info")
        version = str(self.info.get("codebase_version", "v2.1"))
        if not version.startswith(("v2", "v3")):
            raise DataError(f"{os.path.join(self.root, 'meta', 'info.json')}: unsupported codebase_version "
                            f"{version!r} (v2.x and v3.x are read)")
        self.version = 3 if version.startswith("v3") else 2
        if "fps" not in self.info or "features" not in self.info:
            raise DataError(f"{os.path.join(self.root, 'meta', 'info.json')} lacks 'fps' or 'features'")
        self.fps = float(self.info["fps"])
        self.stats_dir = stats_dir or os.path.join(self.root, "meta")
        self.embodiment_tag = cfg.embodiment_tag or self._read_embodiment_tag()
        self.modality = self._select_keys(self._read_modality())
        self.has_action = bool(self.modality.action) and not cfg.video_only
        self.tasks = self._read_tasks()
        self.episodes = self._read_episodes()
        self.horizon = self._check_timing()
        self.tiling, self.wrist_index = self._choose_tiling()
        self.relative_keys = self._relative_keys()
        self._stats = None
        self._rel_stats = None
        self._v3_cache = (None, None)          # (path, columns) of the last v3 data file read
        self._step_filter = self._read_step_filter()

    # -------------------------------------------------------------- metadata
    def _meta(self, *parts) -> str:
        return os.path.join(self.root, "meta", *parts)

    def _read_modality(self) -> Modality:
        feats = self.info["features"]
        path = self._meta("modality.json")
        if os.path.exists(path):
            m = _read_json(path)

            def sub(section, default_key):
                out = []
                for name, spec in (m.get(section) or {}).items():
                    if "start" not in spec or "end" not in spec:
                        raise DataError(f"{path}: {section}.{name} needs 'start' and 'end'")
                    out.append(SubKey(name, spec.get("original_key") or default_key, int(spec["start"]),
                                      int(spec["end"])))
                return tuple(out)

            video = tuple((name, (spec or {}).get("original_key") or name) for name, spec in
                          (m.get("video") or {}).items())
            ann = None
            for name, spec in (m.get("annotation") or {}).items():
                ann = (spec or {}).get("original_key") or f"annotation.{name}"
                break
            return Modality(sub("state", "observation.state"), sub("action", "action"), video, ann)
        state, action = (), ()
        if "observation.state" in feats:
            state = (SubKey("state", "observation.state", 0, int(np.prod(feats["observation.state"]["shape"]))),)
        if "action" in feats:
            action = (SubKey("action", "action", 0, int(np.prod(feats["action"]["shape"]))),)
        video = tuple((k, k) for k, v in feats.items() if v.get("dtype") == "video")
        return Modality(state, action, video, None)

    def _select_keys(self, m: Modality) -> Modality:
        out = {}
        for section in ("state", "action"):
            have = {k.name: k for k in getattr(m, section)}
            want = getattr(self.cfg, f"{section}_keys")
            if want == "auto":
                rel = RELEASE_KEYS.get(self.embodiment_tag, {}).get(section)
                want = rel if rel is not None and set(rel).issubset(have) else tuple(have)
            missing = [k for k in want if k not in have]
            if missing:
                raise DataError(f"{self._meta('modality.json')}: {section} sub-key(s) {missing} not found; it has "
                                f"{sorted(have)}")
            out[section] = tuple(have[k] for k in want)
        return dataclasses.replace(m, state=out["state"], action=out["action"])

    def _read_embodiment_tag(self) -> str:
        path = self._meta("embodiment.json")
        if os.path.exists(path):
            tag = _read_json(path).get("embodiment_tag")
            if tag:
                return str(tag)
        return str(self.info.get("robot_type") or "unknown")

    def _read_tasks(self) -> dict:
        if self.version == 2:
            path = self._meta("tasks.jsonl")
            if not os.path.exists(path):
                return {}
            return {int(r["task_index"]): str(r["task"]) for r in _read_jsonl(path)}
        path = self._meta("tasks.parquet")
        if not os.path.exists(path):
            return {}
        cols = read_parquet(path)
        text_col = next((c for c in ("task", "__index_level_0__") if c in cols), None)
        if text_col is None or "task_index" not in cols:
            raise DataError(f"{path} needs columns 'task_index' and 'task' (or the task as its index)")
        return {int(i): str(t) for i, t in zip(cols["task_index"], cols[text_col])}

    def _read_episodes(self) -> list:
        eps = []
        if self.version == 2:
            for r in _read_jsonl(self._meta("episodes.jsonl")):
                eps.append({"episode_index": int(r["episode_index"]), "length": int(r["length"]),
                            "tasks": list(r.get("tasks") or [])})
        else:
            files = sorted(glob.glob(self._meta("episodes", "*", "*.parquet")))
            if not files:
                raise DataError(f"no episode metadata under {self._meta('episodes')} (LeRobot v3 layout)")
            for path in files:
                cols = read_parquet(path)
                n = len(cols["episode_index"])
                for i in range(n):
                    eps.append({k: (v[i] if not isinstance(v[i], np.generic) else v[i].item())
                                for k, v in cols.items()})
                    eps[-1]["episode_index"] = int(eps[-1]["episode_index"])
                    eps[-1]["length"] = int(eps[-1]["length"])
        if not eps:
            raise DataError(f"the dataset at {self.root} lists no episodes")
        return sorted(eps, key=lambda e: e["episode_index"])

    def _check_timing(self) -> int:
        cfg = self.cfg
        H = cfg.action_horizon if cfg.action_horizon is not None else 24
        stride = Fraction(self.fps).limit_denominator(1000) / Fraction(cfg.video_fps).limit_denominator(1000)
        if stride.denominator != 1:
            raise ValueError(f"dataset fps {self.fps} is not a multiple of the video fps {cfg.video_fps}")
        self.video_stride = int(stride)
        raw_per_chunk = VAE_TEMPORAL_STRIDE * cfg.frames_per_chunk
        if H != self.video_stride * raw_per_chunk:
            raise ValueError(f"an action chunk of {H} steps at {self.fps:g} Hz spans {H / self.fps:.3f} s, but "
                             f"{cfg.frames_per_chunk} latent frames = {raw_per_chunk} video frames at "
                             f"{cfg.video_fps:g} FPS span {raw_per_chunk / cfg.video_fps:.3f} s: set action_horizon "
                             f"to {self.video_stride * raw_per_chunk} (or change video_fps)")
        if cfg.states_per_chunk < 1 or H % cfg.states_per_chunk:
            raise ValueError(f"states_per_chunk {cfg.states_per_chunk} must divide the action horizon {H}")
        return H

    def _choose_tiling(self) -> tuple:
        t = self.cfg.tiling
        names = [n for n, _ in self.modality.video]
        wrist = next((i for i, n in enumerate(names) if "wrist" in n.lower()), None)
        if t == "auto":
            if len(names) == 1:
                t = "single"
            elif len(names) == 3 and (self.embodiment_tag == "oxe_droid" or wrist is not None):
                t = "droid"
            else:
                t = "grid"
        if not names:
            raise DataError(f"the dataset at {self.root} has no video keys (meta/info.json features / modality.json)")
        return t, wrist

    def _relative_keys(self) -> tuple:
        rk = self.cfg.relative_action_keys
        state_names = {s.name for s in self.modality.state}
        if isinstance(rk, str):
            if rk != "auto":
                raise ValueError(f"relative_action_keys must be 'auto' or a list of sub-keys, got {rk!r}")
            return tuple(a.name for a in self.modality.action if a.name in state_names and "joint" in a.name.lower())
        rk = tuple(rk)
        for k in rk:
            if k not in state_names or k not in {a.name for a in self.modality.action}:
                raise ValueError(f"relative action key {k!r} must be a sub-key of both state and action")
        return rk

    def _read_step_filter(self) -> dict:
        path = self._meta("step_filter.jsonl")
        if not os.path.exists(path):
            return {}
        return {int(r["episode_index"]): set(int(i) for i in r["step_indices"]) for r in _read_jsonl(path)}

    # -------------------------------------------------------------- episodes
    def __len__(self) -> int:
        return len(self.episodes)

    @property
    def episode_indices(self) -> list:
        return [e["episode_index"] for e in self.episodes]

    def _episode_meta(self, index: int) -> dict:
        for e in self.episodes:
            if e["episode_index"] == index:
                return e
        raise KeyError(f"episode {index} is not in {self.root}")

    def _needed_columns(self) -> list:
        cols = {"timestamp"}
        for s in self.modality.state + self.modality.action:
            cols.add(s.original_key)
        return sorted(cols)

    def load_episode(self, index: int) -> Episode:
        """Read an episode's parquet rows (and locate its videos). Raises DataError naming a corrupt/missing file."""
        meta = self._episode_meta(index)
        L = meta["length"]
        for key in ("data_path", "video_path"):
            if not self.info.get(key):
                raise DataError(f"{self._meta('info.json')} has no {key!r} (only datasets with parquet data and mp4 "
                                f"videos are read)")
        if self.version == 2:
            chunk = index // int(self.info.get("chunks_size", 1000))
            data_path = os.path.join(self.root, self.info["data_path"].format(episode_chunk=chunk,
                                                                              episode_index=index))
            cols = read_parquet(data_path)
            video_paths = {name: os.path.join(self.root, self.info["video_path"].format(
                episode_chunk=chunk, video_key=orig, episode_index=index)) for name, orig in self.modality.video}
            offsets = {name: 0.0 for name, _ in self.modality.video}
        else:
            data_path = os.path.join(self.root, self.info["data_path"].format(
                chunk_index=int(meta["data/chunk_index"]), file_index=int(meta["data/file_index"])))
            if self._v3_cache[0] != data_path:
                self._v3_cache = (data_path, read_parquet(data_path))
            allc = self._v3_cache[1]
            if "episode_index" not in allc:
                raise DataError(f"parquet file {data_path} has no 'episode_index' column")
            rows = np.nonzero(allc["episode_index"] == index)[0]
            cols = {k: v[rows] for k, v in allc.items()}
            video_paths, offsets = {}, {}
            for name, orig in self.modality.video:
                try:
                    video_paths[name] = os.path.join(self.root, self.info["video_path"].format(
                        video_key=orig, chunk_index=int(meta[f"videos/{orig}/chunk_index"]),
                        file_index=int(meta[f"videos/{orig}/file_index"])))
                    offsets[name] = float(meta[f"videos/{orig}/from_timestamp"])
                except KeyError as e:
                    raise DataError(f"episode metadata of {index} in {self._meta('episodes')} lacks {e}") from None
        missing = [c for c in self._needed_columns() if c not in cols]
        if missing:
            raise DataError(f"parquet file {data_path} has no column(s) {missing}")
        n = len(cols["timestamp"])
        if n != L:
            raise DataError(f"parquet file {data_path} holds {n} rows of episode {index}, the metadata says {L}")
        if "frame_index" in cols and not np.array_equal(np.asarray(cols["frame_index"]), np.arange(n)):
            raise DataError(f"parquet file {data_path}: frame_index of episode {index} is not 0..{n - 1}")
        for c in self._needed_columns():
            v = cols[c]
            if v.dtype == object:
                raise DataError(f"parquet file {data_path}: column {c!r} has rows of different lengths")
            if c != "timestamp" and v.ndim == 1:
                cols[c] = v.reshape(-1, 1)
            if not np.issubdtype(np.asarray(cols[c]).dtype, np.number):
                raise DataError(f"parquet file {data_path}: column {c!r} is not numeric")
            if not np.isfinite(np.asarray(cols[c], dtype=np.float64)).all():
                raise DataError(f"parquet file {data_path}: column {c!r} holds NaN or inf")
        tasks = self._episode_tasks(cols, meta, n)
        return Episode(index=index, length=n, columns=cols, timestamps=np.asarray(cols["timestamp"], np.float64),
                       tasks=tasks, video_paths=video_paths, video_offsets=offsets, data_path=data_path)

    def _episode_tasks(self, cols: dict, meta: dict, n: int) -> list:
        key = self.modality.annotation
        if key is not None and key in cols:
            v = cols[key]
            if np.issubdtype(np.asarray(v).dtype, np.integer):
                return [self.tasks.get(int(i), DEFAULT_INSTRUCTION) for i in v]
            return [str(x) for x in v]
        if "task_index" in cols and self.tasks:
            return [self.tasks.get(int(i), DEFAULT_INSTRUCTION) for i in cols["task_index"]]
        t = meta.get("tasks")
        if isinstance(t, (list, tuple, np.ndarray)) and len(t):
            return [str(t[0])] * n
        return [DEFAULT_INSTRUCTION] * n

    def _sub(self, ep: Episode, s: SubKey) -> np.ndarray:
        a = np.asarray(ep.columns[s.original_key], dtype=np.float64)
        if s.end > a.shape[1]:
            raise DataError(f"parquet file {ep.data_path}: column {s.original_key!r} has {a.shape[1]} dims, "
                            f"sub-key {s.name!r} wants [{s.start}:{s.end}]")
        return a[:, s.start:s.end]

    # -------------------------------------------------------------- statistics
    def _stats_path(self, name: str) -> str:
        own = self._meta(name)
        if os.path.exists(own):
            return own
        return os.path.join(self.stats_dir, name)

    @property
    def stats(self) -> dict:
        """Per-feature statistics of the parquet columns (meta/stats.json, computed and written once if absent)."""
        if self._stats is None:
            path = self._stats_path("stats.json")
            needed = {s.original_key for s in self.modality.state + self.modality.action}
            stats = _read_json(path) if os.path.exists(path) else {}
            if not needed.issubset(stats) or any(not set(STAT_NAMES).issubset(stats[k]) for k in needed):
                stats = dict(stats)
                stats.update(self._compute_stats(sorted(needed)))
                atomic_write_json(os.path.join(self.stats_dir, "stats.json"), stats)
            self._stats = stats
        return self._stats

    @property
    def relative_stats(self) -> dict:
        """Statistics of relative actions per sub-key (meta/relative_stats_dreamzero.json, computed once if absent)."""
        if self._rel_stats is None:
            path = self._stats_path("relative_stats_dreamzero.json")
            stats = _read_json(path) if os.path.exists(path) else {}
            missing = [k for k in self.relative_keys if k not in stats]
            if missing:
                stats = dict(stats)
                stats.update(self._compute_relative_stats(missing))
                atomic_write_json(os.path.join(self.stats_dir, "relative_stats_dreamzero.json"), stats)
            self._rel_stats = stats
        return self._rel_stats

    def _compute_stats(self, features: list) -> dict:
        acc = {f: [] for f in features}
        for e in self.episode_indices:
            ep = self.load_episode(e)
            for f in features:
                acc[f].append(np.asarray(ep.columns[f], np.float64))
        return {f: compute_feature_stats(np.concatenate(v)) for f, v in acc.items()}

    def _compute_relative_stats(self, keys: list) -> dict:
        """The release's _calculate_relative_stats_for_key: for every step i with a full chunk ahead, the chunk's
        actions minus the state at i."""
        H = self.horizon
        st = {s.name: s for s in self.modality.state}
        ac = {a.name: a for a in self.modality.action}
        acc = {k: [] for k in keys}
        for e in self.episode_indices:
            ep = self.load_episode(e)
            for k in keys:
                s, a = self._sub(ep, st[k]), self._sub(ep, ac[k])
                n = ep.length - H + 1
                if n <= 0:
                    continue
                win = np.lib.stride_tricks.sliding_window_view(a, H, axis=0)[:n]       # [n, D, H]
                acc[k].append((win - s[:n, :, None]).transpose(0, 2, 1).reshape(-1, a.shape[1]))
        out = {}
        for k, v in acc.items():
            if not v:
                raise DataError(f"no episode of {self.root} is long enough ({H} steps) for relative stats of {k!r}")
            out[k] = compute_feature_stats(np.concatenate(v))
        return out

    def _norm_stats(self, modality: str, s: SubKey) -> dict:
        if modality == "action" and s.name in self.relative_keys:
            return self.relative_stats[s.name]
        full = self.stats[s.original_key]
        return {k: np.asarray(full[k], np.float64).reshape(-1)[s.start:s.end] for k in STAT_NAMES if k in full}

    # -------------------------------------------------------------- clips
    @property
    def clip_steps(self) -> int:
        """Steps a clip spans after its anchor: K * H (the last video frame is at anchor + K*H)."""
        return self.cfg.num_chunks * self.horizon

    def normalized_actions(self, ep: Episode) -> np.ndarray:
        """Absolute actions of every step, normalized with the absolute statistics (for the idle filter) [L, Da]."""
        parts = []
        for a in self.modality.action:
            full = self.stats[a.original_key]
            st = {k: np.asarray(full[k], np.float64).reshape(-1)[a.start:a.end] for k in STAT_NAMES if k in full}
            parts.append(normalize(self._sub(ep, a), st, self.cfg.normalization))
        return np.concatenate(parts, axis=1)

    def anchors(self, ep: Episode) -> np.ndarray:
        """Valid anchor steps of an episode: a full clip ahead, not in the step filter, not idle."""
        last = ep.length - 1 - self.clip_steps
        if last < 0:
            return np.zeros(0, dtype=np.int64)
        cand = np.arange(last + 1)
        drop = self._step_filter.get(ep.index)
        if drop:
            cand = cand[~np.isin(cand, np.fromiter(drop, dtype=np.int64))]
        if self.has_action and self.cfg.idle_threshold is not None and len(cand):
            na = self.normalized_actions(ep)
            win = np.lib.stride_tricks.sliding_window_view(na, self.horizon, axis=0)    # [L-H+1, D, H]
            motion = np.abs(win - win[:, :, :1]).max(axis=(1, 2))
            cand = cand[motion[cand] >= self.cfg.idle_threshold]
        return cand.astype(np.int64)

    def frame_steps(self, anchor: int) -> np.ndarray:
        """Steps of the clip's video frames: anchor, anchor + s, ..., anchor + K*H."""
        return anchor + self.video_stride * np.arange(self.clip_steps // self.video_stride + 1)

    def clip(self, ep: Episode, anchor: int) -> Clip:
        """Cut the training clip at `anchor` (see the module doc)."""
        cfg, H, K = self.cfg, self.horizon, self.cfg.num_chunks
        if anchor < 0 or anchor + self.clip_steps > ep.length - 1:
            raise ValueError(f"anchor {anchor} needs steps up to {anchor + self.clip_steps}; episode {ep.index} has "
                             f"{ep.length}")
        steps = self.frame_steps(anchor)
        views = []
        for name, _ in self.modality.video:
            t = ep.timestamps[steps] + ep.video_offsets[name]
            views.append(decode_frames(ep.video_paths[name], t, tolerance=0.5 / self.fps + 1e-4))
        frames = tile_views(views, self.tiling, cfg.view_size, self.wrist_index)

        act_steps = anchor + np.arange(K * H)
        chunk_start = anchor + H * np.arange(K)
        S = cfg.states_per_chunk
        state_steps = (chunk_start[:, None] + (H // S) * np.arange(S)[None, :]).reshape(-1)
        actions = np.zeros((K * H, cfg.action_dim), np.float32)
        mask = np.zeros((K * H, cfg.action_dim), bool)
        state = np.zeros((K * S, cfg.state_dim), np.float32)
        st = {s.name: s for s in self.modality.state}
        if self.modality.state and not cfg.video_only:
            col = 0
            for s in self.modality.state:
                v = normalize(self._sub(ep, s)[state_steps], self._norm_stats("state", s), cfg.normalization)
                if col + v.shape[1] > cfg.state_dim:
                    raise ValueError(f"state of {self.root} has more than state_dim={cfg.state_dim} dims")
                state[:, col:col + v.shape[1]] = v
                col += v.shape[1]
        if self.has_action:
            col = 0
            for a in self.modality.action:
                v = self._sub(ep, a)[act_steps]
                if a.name in self.relative_keys:
                    ref = self._sub(ep, st[a.name])[chunk_start]                  # [K, D]
                    v = v - np.repeat(ref, H, axis=0)
                v = normalize(v, self._norm_stats("action", a), cfg.normalization)
                if col + v.shape[1] > cfg.action_dim:
                    raise ValueError(f"actions of {self.root} have more than action_dim={cfg.action_dim} dims")
                actions[:, col:col + v.shape[1]] = v
                mask[:, col:col + v.shape[1]] = True
                col += v.shape[1]
        text = build_prompt(ep.tasks[anchor], self.embodiment_tag, cfg.prompt_template)
        return Clip(frames=frames, actions=actions, action_mask=mask, state=state, text=text,
                    has_action=self.has_action, embodiment=cfg.embodiment_id, episode=ep.index, anchor=int(anchor))

    def iter_clips(self, anchor_stride: int | None = None, episodes: list | None = None) -> Iterator[Clip]:
        """Clips over all episodes, anchors on a grid of `anchor_stride` steps (default: the action horizon) among
        the valid anchors."""
        stride = anchor_stride or self.horizon
        for e in (episodes if episodes is not None else self.episode_indices):
            ep = self.load_episode(e)
            valid = self.anchors(ep)
            chosen, nxt = [], -1
            for a in valid:
                if a >= nxt:
                    chosen.append(int(a))
                    nxt = a + stride
            for a in chosen:
                yield self.clip(ep, a)

    def describe(self) -> dict:
        return {"root": self.root, "version": self.version, "fps": self.fps, "episodes": len(self.episodes),
                "embodiment_tag": self.embodiment_tag, "has_action": self.has_action, "tiling": self.tiling,
                "video_keys": [n for n, _ in self.modality.video], "relative_action_keys": list(self.relative_keys),
                "action_horizon": self.horizon, "video_stride": self.video_stride}
