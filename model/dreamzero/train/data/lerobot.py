"""The LeRobot reader and the DreamZero training clip sampler.

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
converter writes), else all of them, or the ones DataConfig names. Missing statistics are computed once and written
beside the dataset (meta/stats.json, meta/relative_stats_dreamzero.json), atomically.

A training clip (the release's DROID sampler, ShardedLeRobotSubLangSingleActionChunkDatasetDROID, at a fixed K):
anchor step a, K chunks of H action steps (H = 24 in every release script: 1.6 s at DROID's 15 Hz, 0.8 s at AgiBot's
and YAM's 30 Hz):
- video frames at steps a, a + s, ..., a + K*H with s = H / 8 (the release: offsets 0, 3, ..., 21 in each chunk of
  24, whatever the dataset fps; or s = fps / video_fps when DataConfig.video_fps is set), so 1 + K*H/s raw frames =
  1 + 8K, which the VAE (temporal stride 4) turns into 1 + 2K latent frames;
- actions at steps a .. a + K*H - 1; state at the first step of each chunk, a + (k-1)*H;
- relative actions: for the relative sub-keys (the release's per embodiment: DROID joint positions, AgiBot all six
  state sub-keys, YAM joints and grippers; else the joint sub-keys), chunk k's actions minus the state of the same
  sub-key at the chunk's first step;
- normalization ("q99", the release's mode for DROID and AgiBot): 2 (x - q01) / (q99 - q01) - 1, clipped to [-1, 1]
  (left as is where q01 == q99); actions use the relative statistics for relative sub-keys;
- the views, resized to 176x320 each, are tiled into one 352x640 frame: DROID puts the wrist view, stretched 2x in
  width, across the top row and the two exterior views below it; other embodiments use [view0 | view2] over
  [view1 | black] (the release's DreamTransform._prepare_video); the 5B's tile of 160x320 views is then resized to
  160x320 (DataConfig.frame_resize, the release's target_video_height/width);
- anchors run over [0, length - 1 - K*H]; the release's step filter (meta/step_filter.jsonl) drops anchors, and the
  idle-action filter drops anchors whose first chunk does not move (the largest change of the normalized action over
  the chunk below `idle_threshold`; the release's DROID conversion removed idle frames beforehand).
Datasets without actions (human or other robots' videos) yield clips with has_action False, zero actions and state.
"""
from __future__ import annotations

import dataclasses
import glob
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator

import numpy as np
from dz_kernels.atomic import atomic_write_json

from .config import RELEASE_KEYS, RELEASE_RELATIVE_KEYS, VAE_TEMPORAL_STRIDE, DataConfig, DataError
from .files import decode_frames, read_json, read_jsonl, read_parquet
from .prompts import DEFAULT_INSTRUCTION, build_prompt
from .stats import STAT_NAMES, compute_feature_stats, normalize
from .tiling import resize_frames, tile_views


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
        self.info = read_json(os.path.join(self.root, "meta", "info.json"), "LeRobot info")
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
            m = read_json(path)

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
            tag = read_json(path).get("embodiment_tag")
            if tag:
                return str(tag)
        return str(self.info.get("robot_type") or "unknown")

    def _read_tasks(self) -> dict:
        if self.version == 2:
            path = self._meta("tasks.jsonl")
            if not os.path.exists(path):
                return {}
            return {int(r["task_index"]): str(r["task"]) for r in read_jsonl(path)}
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
            for r in read_jsonl(self._meta("episodes.jsonl")):
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
        raw_per_chunk = VAE_TEMPORAL_STRIDE * cfg.frames_per_chunk
        if cfg.video_fps is None:               # the release: raw_per_chunk video frames per chunk of H steps
            if H % raw_per_chunk:
                raise ValueError(f"an action chunk of {H} steps does not split into {raw_per_chunk} video frames "
                                 f"({cfg.frames_per_chunk} latent frames): set action_horizon to a multiple of "
                                 f"{raw_per_chunk} or video_fps")
            stride = Fraction(H // raw_per_chunk)
        else:
            stride = Fraction(self.fps).limit_denominator(1000) / Fraction(cfg.video_fps).limit_denominator(1000)
        if stride.denominator != 1:
            raise ValueError(f"dataset fps {self.fps} is not a multiple of the video fps {cfg.video_fps}")
        self.video_stride = int(stride)
        if H != self.video_stride * raw_per_chunk:                  # only with an explicit video_fps
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
            both = [a.name for a in self.modality.action if a.name in state_names]
            rel = RELEASE_RELATIVE_KEYS.get(self.embodiment_tag)
            if rel is not None and set(rel).issubset(both):
                return tuple(k for k in both if k in rel)
            return tuple(k for k in both if "joint" in k.lower())
        rk = tuple(rk)
        for k in rk:
            if k not in state_names or k not in {a.name for a in self.modality.action}:
                raise ValueError(f"relative action key {k!r} must be a sub-key of both state and action")
        return rk

    def _read_step_filter(self) -> dict:
        path = self._meta("step_filter.jsonl")
        if not os.path.exists(path):
            return {}
        return {int(r["episode_index"]): set(int(i) for i in r["step_indices"]) for r in read_jsonl(path)}

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
            stats = read_json(path) if os.path.exists(path) else {}
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
            stats = read_json(path) if os.path.exists(path) else {}
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
        if cfg.frame_resize is not None:
            frames = resize_frames(frames, cfg.frame_resize)

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

    def normalization_info(self) -> dict:
        """How clip() normalizes the state and action vectors: per sub-key, its dims in the padded vector, whether
        it is relative to the state, and the statistics used (the "datasets" entries of an export's dz_stats.json,
        documented in dreamzero.train.export). Computes the statistics if the dataset lacks them."""
        cfg = self.cfg

        def entries(modality: str, subkeys) -> list:
            out, col = [], 0
            for s in subkeys:
                st = self._norm_stats(modality, s)
                width = s.end - s.start
                e = {"key": s.name, "source_key": s.original_key, "source_dims": [s.start, s.end],
                     "dims": [col, col + width]}
                if modality == "action":
                    e["relative"] = s.name in self.relative_keys
                e.update({k: [float(v) for v in np.asarray(st[k], np.float64).reshape(-1)] for k in STAT_NAMES
                          if k in st})
                out.append(e)
                col += width
            return out

        return {"embodiment_id": cfg.embodiment_id, "embodiment_tag": self.embodiment_tag,
                "normalization": cfg.normalization, "action_horizon": self.horizon, "state_dim": cfg.state_dim,
                "action_dim": cfg.action_dim,
                "state": entries("state", self.modality.state) if not cfg.video_only else [],
                "action": entries("action", self.modality.action) if self.has_action else [],
                "dataset": self.root}

    def describe(self) -> dict:
        return {"root": self.root, "version": self.version, "fps": self.fps, "episodes": len(self.episodes),
                "embodiment_tag": self.embodiment_tag, "has_action": self.has_action, "tiling": self.tiling,
                "video_keys": [n for n, _ in self.modality.video], "relative_action_keys": list(self.relative_keys),
                "action_horizon": self.horizon, "video_stride": self.video_stride}
