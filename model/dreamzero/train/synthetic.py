"""A small synthetic LeRobot dataset, for tests and demos: a few episodes, tiny mp4s (PyAV), parquet (pyarrow).

The robot has 7 joints and a gripper (DROID's layout: `observation.state` = joint_position[7] + gripper_position[1],
`action` = the same at the next step, absolute), moving along smooth random trajectories; optionally each episode
starts with a few idle steps (the robot holds still). Three cameras ("exterior_image_1_left",
"exterior_image_2_left", "wrist_image_left") film a square whose position follows joints 0 and 1 (and whose
brightness follows the gripper) over a per-camera background, so the video is a function of the state and the model
has something to learn. The release's metadata files (meta/modality.json, meta/embodiment.json) are written too,
unless `release_meta=False`; statistics are left for the reader to compute (as for a freshly recorded dataset).

Layouts: LeRobot v2.1 (one parquet and one mp4 per camera and episode) or v3.0 (all episodes in one parquet and one
mp4 per camera, with meta/episodes/chunk-000/file-000.parquet).
"""
from __future__ import annotations

import json
import os
import shutil
from fractions import Fraction

import numpy as np
from dz_kernels.atomic import atomic_output, atomic_write_json, atomic_write_text


__all__ = ["make_synthetic_dataset", "write_mp4", "write_parquet", "SYNTHETIC_CAMERAS", "SYNTHETIC_TASKS"]

SYNTHETIC_CAMERAS = ("exterior_image_1_left", "exterior_image_2_left", "wrist_image_left")
SYNTHETIC_TASKS = ("put the cube in the bowl", "open the drawer", "wipe the table")
_BACKGROUND = ((40, 70, 120), (120, 60, 40), (60, 110, 60))


def write_mp4(path: str, frames: np.ndarray, fps: float, crf: int = 10) -> None:
    """Encode uint8 [T, H, W, 3] RGB frames as an mp4 (H.264 when available, else MPEG-4 part 2), pts = frame
    index at `fps`. H and W must be even (4:2:0 chroma)."""
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    T, H, W, _ = frames.shape
    if H % 2 or W % 2:
        raise ValueError(f"frame size {H}x{W} must be even for 4:2:0 video")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    rate = Fraction(fps).limit_denominator(1000)
    with atomic_output(path) as tmp, av.open(tmp, mode="w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "veryfast", "bf": "0"}
        else:
            stream.bit_rate = 4_000_000
        for i in range(T):
            fr = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            fr.pts = i
            for pkt in stream.encode(fr):
                out.mux(pkt)
        for pkt in stream.encode():
            out.mux(pkt)


def write_parquet(path: str, columns: dict) -> None:
    """Write {name: array} as a parquet file; 2-D float arrays become list<float32> columns (LeRobot's layout)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {}
    for name, v in columns.items():
        v = np.asarray(v)
        if v.ndim == 2:
            flat = pa.array(v.astype(np.float32).reshape(-1))
            arrays[name] = pa.FixedSizeListArray.from_arrays(flat, v.shape[1])
        else:
            arrays[name] = pa.array(v)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_output(path) as tmp:
        pq.write_table(pa.table(arrays), tmp)


def _trajectory(rng: np.random.Generator, length: int, idle_steps: int) -> np.ndarray:
    """[length + 1, 8] joint (7) + gripper (1) positions: sums of slow sinusoids, held still for idle_steps."""
    t = np.arange(length + 1, dtype=np.float64)
    move = np.maximum(t - idle_steps, 0.0)
    freq = rng.uniform(0.02, 0.08, size=(2, 8))
    phase = rng.uniform(0, 2 * np.pi, size=(2, 8))
    amp = rng.uniform(0.2, 0.8, size=(2, 8))
    q = (amp[0] * np.sin(freq[0] * move[:, None] + phase[0]) + 0.5 * amp[1] * np.sin(freq[1] * move[:, None]
                                                                                       + phase[1]))
    q[:, 7] = 0.5 + 0.5 * np.tanh(2.0 * q[:, 7])                      # gripper in [0, 1]
    return q


def _render(state: np.ndarray, cam: int, size: tuple) -> np.ndarray:
    """Frames [T, H, W, 3]: a background of camera `cam`, a square placed by joints 0/1, lit by the gripper."""
    H, W = size
    T = state.shape[0]
    out = np.empty((T, H, W, 3), dtype=np.uint8)
    out[:] = np.asarray(_BACKGROUND[cam % len(_BACKGROUND)], dtype=np.uint8)
    s = max(2, min(H, W) // 3)
    for i in range(T):
        cy = int(round((0.5 + 0.4 * np.tanh(state[i, (0 + cam) % 7])) * (H - s)))
        cx = int(round((0.5 + 0.4 * np.tanh(state[i, (1 + cam) % 7])) * (W - s)))
        lum = int(120 + 120 * state[i, 7])
        out[i, cy:cy + s, cx:cx + s] = (lum, 255 - lum // 2, 60 + cam * 60)
    return out


def _clear(root: str, overwrite: bool) -> None:
    """Refuse a non-empty `root`, or with `overwrite` remove the LeRobot dataset there."""
    if not os.path.isdir(root) or not os.listdir(root):
        if os.path.exists(root) and not os.path.isdir(root):
            raise FileExistsError(f"{root} is a file, not a folder: pick a new folder for the dataset")
        return
    if not overwrite:
        raise FileExistsError(f"{root} is not empty: pick a new folder, or replace the dataset there with "
                              f"--overwrite (overwrite=True)")
    if not os.path.isfile(os.path.join(root, "meta", "info.json")):
        raise FileExistsError(f"{root} is not empty and holds no LeRobot dataset (no meta/info.json): not replacing "
                              f"it; pick a new folder")
    shutil.rmtree(root)


def make_synthetic_dataset(root: str, *, num_episodes: int = 4, length: int = 80, fps: float = 15.0,
                           view_size: tuple = (16, 24), version: str = "v2.1", with_actions: bool = True,
                           embodiment_tag: str = "oxe_droid", release_meta: bool = True, idle_steps: int = 6,
                           seed: int = 0, tasks=SYNTHETIC_TASKS, overwrite: bool = False) -> str:
    """Write a synthetic LeRobot dataset under `root` (see the module doc); returns `root`.

    `root` must be absent or empty; overwrite=True replaces a LeRobot dataset there (a folder with meta/info.json,
    removed whole, prepared features included), never a folder of anything else (FileExistsError).

    num_episodes / length: episodes of `length` steps at `fps`; view_size: (H, W) of each camera (even);
    version: "v2.1" or "v3.0"; with_actions False writes a video-only dataset (no action column: e.g. human videos);
    idle_steps: steps at the start of each episode where the robot holds still (the idle-action filter drops them).
    """
    if version not in ("v2.1", "v3.0"):
        raise ValueError(f"version must be 'v2.1' or 'v3.0', got {version!r}")
    if num_episodes < 1 or length < 2:
        raise ValueError("need at least one episode of at least 2 steps")
    _clear(root, overwrite)
    rng = np.random.default_rng(seed)
    H, W = view_size
    os.makedirs(os.path.join(root, "meta"), exist_ok=True)
    episodes, data_rows, videos = [], [], {c: [] for c in SYNTHETIC_CAMERAS}
    global_index = 0
    for e in range(num_episodes):
        q = _trajectory(rng, length, idle_steps)
        state, action = q[:-1], q[1:]
        task_index = e % len(tasks)
        cols = {
            "observation.state": state.astype(np.float32),
            "timestamp": (np.arange(length) / fps).astype(np.float32),
            "frame_index": np.arange(length, dtype=np.int64),
            "episode_index": np.full(length, e, dtype=np.int64),
            "index": np.arange(global_index, global_index + length, dtype=np.int64),
            "task_index": np.full(length, task_index, dtype=np.int64),
        }
        if with_actions:
            cols["action"] = action.astype(np.float32)
        frames = {c: _render(state, i, (H, W)) for i, c in enumerate(SYNTHETIC_CAMERAS)}
        episodes.append({"episode_index": e, "tasks": [tasks[task_index]], "length": length,
                         "from": global_index, "to": global_index + length})
        global_index += length
        if version == "v2.1":
            write_parquet(os.path.join(root, f"data/chunk-000/episode_{e:06d}.parquet"), cols)
            for c in SYNTHETIC_CAMERAS:
                write_mp4(os.path.join(root, f"videos/chunk-000/observation.images.{c}/episode_{e:06d}.mp4"),
                          frames[c], fps)
        else:
            data_rows.append(cols)
            for c in SYNTHETIC_CAMERAS:
                videos[c].append(frames[c])

    features = {
        "observation.state": {"dtype": "float32", "shape": [8], "names": ["joint_position"] * 7 + ["gripper"]},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }
    if with_actions:
        features["action"] = {"dtype": "float32", "shape": [8], "names": ["joint_position"] * 7 + ["gripper"]}
    for c in SYNTHETIC_CAMERAS:
        features[f"observation.images.{c}"] = {
            "dtype": "video", "shape": [H, W, 3], "names": ["height", "width", "channel"],
            "info": {"video.fps": fps, "video.height": H, "video.width": W, "video.channels": 3,
                     "video.codec": "h264", "video.pix_fmt": "yuv420p"}}
    info = {"codebase_version": version, "robot_type": "synthetic_arm", "total_episodes": num_episodes,
            "total_frames": global_index, "total_tasks": len(tasks), "chunks_size": 1000, "fps": fps,
            "splits": {"train": f"0:{num_episodes}"}, "features": features}
    if version == "v2.1":
        info["data_path"] = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
        info["video_path"] = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
        atomic_write_text(os.path.join(root, "meta", "episodes.jsonl"), "".join(
            json.dumps({k: ep[k] for k in ("episode_index", "tasks", "length")}) + "\n" for ep in episodes))
        atomic_write_text(os.path.join(root, "meta", "tasks.jsonl"), "".join(
            json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(tasks)))
    else:
        info["data_path"] = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
        info["video_path"] = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
        merged = {k: np.concatenate([r[k] for r in data_rows]) for k in data_rows[0]}
        write_parquet(os.path.join(root, "data/chunk-000/file-000.parquet"), merged)
        for c in SYNTHETIC_CAMERAS:
            write_mp4(os.path.join(root, f"videos/observation.images.{c}/chunk-000/file-000.mp4"),
                      np.concatenate(videos[c]), fps)
        ep_cols = {"episode_index": np.array([ep["episode_index"] for ep in episodes], np.int64),
                   "length": np.array([ep["length"] for ep in episodes], np.int64),
                   "data/chunk_index": np.zeros(num_episodes, np.int64),
                   "data/file_index": np.zeros(num_episodes, np.int64),
                   "dataset_from_index": np.array([ep["from"] for ep in episodes], np.int64),
                   "dataset_to_index": np.array([ep["to"] for ep in episodes], np.int64)}
        for c in SYNTHETIC_CAMERAS:
            k = f"observation.images.{c}"
            ep_cols[f"videos/{k}/chunk_index"] = np.zeros(num_episodes, np.int64)
            ep_cols[f"videos/{k}/file_index"] = np.zeros(num_episodes, np.int64)
            ep_cols[f"videos/{k}/from_timestamp"] = np.array([ep["from"] / fps for ep in episodes])
            ep_cols[f"videos/{k}/to_timestamp"] = np.array([ep["to"] / fps for ep in episodes])
        write_parquet(os.path.join(root, "meta/episodes/chunk-000/file-000.parquet"), ep_cols)
        write_parquet(os.path.join(root, "meta/tasks.parquet"),
                      {"task_index": np.arange(len(tasks), dtype=np.int64), "task": np.array(tasks, dtype=object)})
    atomic_write_json(os.path.join(root, "meta", "info.json"), info)
    if release_meta:
        modality = {
            "state": {"joint_position": {"original_key": "observation.state", "start": 0, "end": 7},
                      "gripper_position": {"original_key": "observation.state", "start": 7, "end": 8}},
            "action": ({"joint_position": {"original_key": "action", "start": 0, "end": 7},
                        "gripper_position": {"original_key": "action", "start": 7, "end": 8}} if with_actions else {}),
            "video": {c: {"original_key": f"observation.images.{c}"} for c in SYNTHETIC_CAMERAS},
            "annotation": {"language.language_instruction": {"original_key": "task_index"}},
        }
        atomic_write_json(os.path.join(root, "meta", "modality.json"), modality)
        atomic_write_json(os.path.join(root, "meta", "embodiment.json"), {"embodiment_tag": embodiment_tag},
                          indent=None)
    return root
