"""The LeRobot reader of the trainer (dreamzero.train.data) against a hand-made episode, the v3 layout, the release's
metadata files, the idle-action and step filters, and clear errors for corrupt files."""
import json
import os

import numpy as np
import pytest

from dreamzero.train.data import (DataConfig, DataError, LeRobotDataset, build_prompt, compute_feature_stats,
                                  decode_frames, normalize, read_parquet, tile_views)
from dreamzero.train.synthetic import make_synthetic_dataset, write_mp4, write_parquet

FPS = 15.0
VIEW = (16, 24)                      # per camera; tiled 32 x 48
CAMS = ("exterior_image_1_left", "exterior_image_2_left", "wrist_image_left")
CFG = DataConfig(num_chunks=2, action_horizon=24, view_size=VIEW, action_dim=6, state_dim=5, idle_threshold=None)


def _color(cam: int, t: int) -> tuple:
    """A flat color that encodes the camera and the frame index (frames are single-colored)."""
    return (40 + 80 * cam, (4 * t) % 256, 200 - 60 * cam)


def _hand_made(root, length=53, state=None, action=None, task="Pick up the red block", stats=None,
               step_filter=None, embodiment="oxe_droid"):
    """One v2.1 episode written by hand: 3 flat-colored cameras, 2 joints + gripper, modality.json, embodiment."""
    t = np.arange(length)
    if state is None:
        state = np.stack([np.sin(0.1 * t), 0.5 * np.cos(0.07 * t), (t % 20) / 20.0], axis=1)
    if action is None:
        action = np.concatenate([state[1:], state[-1:]], axis=0) + 0.01
    for c in range(3):
        frames = np.empty((length, *VIEW, 3), np.uint8)
        for i in range(length):
            frames[i] = _color(c, i)
        write_mp4(os.path.join(root, f"videos/chunk-000/observation.images.{CAMS[c]}/episode_000000.mp4"), frames,
                  FPS, crf=0)
    write_parquet(os.path.join(root, "data/chunk-000/episode_000000.parquet"), {
        "observation.state": state.astype(np.float32), "action": action.astype(np.float32),
        "timestamp": (t / FPS).astype(np.float32), "frame_index": t, "episode_index": np.zeros(length, np.int64),
        "index": t, "task_index": np.zeros(length, np.int64)})
    os.makedirs(os.path.join(root, "meta"), exist_ok=True)
    info = {"codebase_version": "v2.1", "fps": FPS, "chunks_size": 1000, "robot_type": "hand",
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
            "features": {"observation.state": {"dtype": "float32", "shape": [3]},
                         "action": {"dtype": "float32", "shape": [3]},
                         **{f"observation.images.{c}": {"dtype": "video", "shape": [*VIEW, 3]} for c in CAMS}}}
    files = {
        "info.json": info,
        "modality.json": {
            "state": {"joint_position": {"original_key": "observation.state", "start": 0, "end": 2},
                      "gripper_position": {"original_key": "observation.state", "start": 2, "end": 3}},
            "action": {"joint_position": {"original_key": "action", "start": 0, "end": 2},
                       "gripper_position": {"original_key": "action", "start": 2, "end": 3}},
            "video": {c: {"original_key": f"observation.images.{c}"} for c in CAMS},
            "annotation": {"language.language_instruction": {"original_key": "task_index"}}},
        "embodiment.json": {"embodiment_tag": embodiment},
    }
    if stats is not None:
        files["stats.json"] = stats
    for name, obj in files.items():
        with open(os.path.join(root, "meta", name), "w") as f:
            json.dump(obj, f)
    with open(os.path.join(root, "meta", "episodes.jsonl"), "w") as f:
        f.write(json.dumps({"episode_index": 0, "tasks": [task], "length": length}) + "\n")
    with open(os.path.join(root, "meta", "tasks.jsonl"), "w") as f:
        f.write(json.dumps({"task_index": 0, "task": task}) + "\n")
    if step_filter is not None:
        with open(os.path.join(root, "meta", "step_filter.jsonl"), "w") as f:
            f.write(json.dumps({"episode_index": 0, "step_indices": list(step_filter)}) + "\n")
    return str(root), state, action


def _q99(x, lo, hi):
    return np.clip(2 * (x - lo) / (hi - lo) - 1, -1, 1)


def test_reader_against_hand_made_episode(tmp_path):
    root, state, action = _hand_made(tmp_path)
    ds = LeRobotDataset(root, CFG)
    assert (ds.version, ds.fps, ds.horizon, ds.video_stride, ds.tiling) == (2, FPS, 24, 3, "droid")
    assert ds.relative_keys == ("joint_position",) and ds.embodiment_tag == "oxe_droid"
    ep = ds.load_episode(0)
    # anchors: a full clip of K*H = 48 steps ahead of each (length 53 -> 0..4)
    np.testing.assert_array_equal(ds.anchors(ep), np.arange(5))
    clip = ds.clip(ep, 3)

    # statistics computed once and written beside the dataset, the release's formulas
    stats = json.load(open(os.path.join(root, "meta", "stats.json")))
    np.testing.assert_allclose(stats["observation.state"]["q01"], np.quantile(state.astype(np.float32), 0.01, 0),
                               rtol=1e-6)
    rel = json.load(open(os.path.join(root, "meta", "relative_stats_dreamzero.json")))
    windows = np.concatenate([action[i:i + 24, :2].astype(np.float32) - state[i, :2].astype(np.float32)
                              for i in range(len(state) - 23)])
    np.testing.assert_allclose(rel["joint_position"]["q99"], np.quantile(windows, 0.99, 0), rtol=1e-5, atol=1e-7)

    # frames: steps 3, 6, ..., 51 (every 3rd step at 15 Hz = 5 FPS), 17 of them, tiled 32 x 48 (DROID layout)
    assert clip.frames.shape == (17, 32, 48, 3) and clip.frames.dtype == np.uint8
    steps = 3 + 3 * np.arange(17)
    for i, s in enumerate(steps):
        f = clip.frames[i].astype(int)
        for (ys, xs), cam in (((slice(0, 16), slice(0, 48)), 2), ((slice(16, 32), slice(0, 24)), 0),
                              ((slice(16, 32), slice(24, 48)), 1)):
            got = f[ys, xs].reshape(-1, 3).mean(0)
            np.testing.assert_allclose(got, _color(cam, s), atol=6, err_msg=f"frame {i} (step {s}) camera {cam}")

    # actions: steps 3..50; joints relative to the state at each chunk's first step (3, 27), gripper absolute;
    # q99-normalized; padded to 6 dims with the mask on the 3 real ones
    st32, ac32 = state.astype(np.float32).astype(np.float64), action.astype(np.float32).astype(np.float64)
    joints = ac32[3:51, :2] - np.repeat(st32[[3, 27], :2], 24, axis=0)
    want_j = _q99(joints, np.array(rel["joint_position"]["q01"]), np.array(rel["joint_position"]["q99"]))
    gs = stats["action"]
    want_g = _q99(ac32[3:51, 2:3], np.array(gs["q01"])[2:3], np.array(gs["q99"])[2:3])
    assert clip.actions.shape == (48, 6)
    np.testing.assert_allclose(clip.actions[:, :2], want_j, atol=1e-5)
    np.testing.assert_allclose(clip.actions[:, 2:3], want_g, atol=1e-5)
    assert (clip.actions[:, 3:] == 0).all()
    assert clip.action_mask[:, :3].all() and not clip.action_mask[:, 3:].any()
    # state: one token per chunk at steps 3 and 27, normalized with the state statistics, padded to 5
    ss = stats["observation.state"]
    want_s = _q99(st32[[3, 27]], np.array(ss["q01"]), np.array(ss["q99"]))
    np.testing.assert_allclose(clip.state[:, :3], want_s, atol=1e-5)
    assert (clip.state[:, 3:] == 0).all()
    assert clip.has_action and clip.text == build_prompt("Pick up the red block", "oxe_droid")
    assert clip.text.startswith("A multi-view video shows that a robot pick up the red block The video")


def test_release_stats_are_read_as_is(tmp_path):
    custom = {"observation.state": {k: [0.0, 0.0, 0.0] for k in ("mean", "std", "min", "max")}
              | {"q01": [-2.0, -2.0, 0.0], "q99": [2.0, 2.0, 4.0]},
              "action": {k: [0.0, 0.0, 0.0] for k in ("mean", "std", "min", "max")}
              | {"q01": [-1.0, -1.0, -1.0], "q99": [1.0, 1.0, 3.0]}}
    root, state, action = _hand_made(tmp_path, stats=custom)
    ds = LeRobotDataset(root, CFG)
    clip = ds.clip(ds.load_episode(0), 0)
    st32 = state.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(clip.state[0, :3], _q99(st32[0], np.array([-2, -2, 0.0]), np.array([2, 2, 4.0])),
                               atol=1e-6)
    ac32 = action.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(clip.actions[:, 2], _q99(ac32[:48, 2], -1.0, 3.0), atol=1e-6)
    assert json.load(open(os.path.join(root, "meta", "stats.json"))) == custom     # not rewritten


def test_idle_filter_and_step_filter(tmp_path):
    length = 90
    t = np.arange(length)
    state = np.zeros((length, 3))
    state[30:] = np.stack([0.02 * (t[30:] - 30), 0.01 * (t[30:] - 30), np.zeros(60)], axis=1)
    action = np.concatenate([state[1:], state[-1:]])
    root, _, _ = _hand_made(tmp_path, length=length, state=state, action=action, step_filter=[35, 36])
    ds = LeRobotDataset(root, DataConfig(num_chunks=1, action_horizon=24, view_size=VIEW, action_dim=6, state_dim=5,
                                         idle_threshold=0.01))
    anchors = ds.anchors(ds.load_episode(0))
    # the commanded position holds still over steps 0..29 and moves from step 30: an anchor whose first chunk
    # (actions a..a+23) does not move is dropped, so 0..6 go and 7 stays; 35 and 36 are in the step filter
    assert anchors.min() == 7
    assert not np.isin([35, 36], anchors).any() and np.isin([34, 37, 60], anchors).all()
    assert anchors.max() == length - 1 - 24
    off = LeRobotDataset(root, DataConfig(num_chunks=1, action_horizon=24, view_size=VIEW, action_dim=6,
                                          state_dim=5, idle_threshold=None))
    assert off.anchors(off.load_episode(0)).min() == 0


def test_v3_layout_matches_v21(tmp_path):
    a = LeRobotDataset(make_synthetic_dataset(str(tmp_path / "a"), num_episodes=2, length=60, version="v2.1"),
                       DataConfig(num_chunks=2, action_horizon=24, view_size=VIEW, action_dim=10, state_dim=10))
    b = LeRobotDataset(make_synthetic_dataset(str(tmp_path / "b"), num_episodes=2, length=60, version="v3.0"),
                       DataConfig(num_chunks=2, action_horizon=24, view_size=VIEW, action_dim=10, state_dim=10))
    assert b.version == 3 and a.version == 2
    ca, cb = list(a.iter_clips()), list(b.iter_clips())
    assert [(c.episode, c.anchor) for c in ca] == [(c.episode, c.anchor) for c in cb] and len(ca) >= 2
    for x, y in zip(ca, cb):
        np.testing.assert_array_equal(x.actions, y.actions)
        np.testing.assert_array_equal(x.state, y.state)
        assert x.text == y.text
        # the v3 file holds both episodes in one mp4: the second episode's frames come from its time offset
        assert np.abs(x.frames.astype(int) - y.frames.astype(int)).mean() < 4


def test_video_only_dataset(tmp_path):
    root = make_synthetic_dataset(str(tmp_path / "human"), num_episodes=1, length=60, with_actions=False)
    ds = LeRobotDataset(root, DataConfig(num_chunks=2, action_horizon=24, view_size=VIEW, action_dim=10,
                                         state_dim=10, embodiment_id=1))
    clip = next(ds.iter_clips())
    assert not ds.has_action and not clip.has_action and clip.embodiment == 1
    assert not clip.action_mask.any() and (clip.actions == 0).all()


def test_corrupt_video_names_the_file(tmp_path):
    root, _, _ = _hand_made(tmp_path)
    bad = os.path.join(root, f"videos/chunk-000/observation.images.{CAMS[1]}/episode_000000.mp4")
    with open(bad, "wb") as f:
        f.write(b"\x00\x00\x00\x18ftypmp42" + os.urandom(300))
    ds = LeRobotDataset(root, CFG)
    with pytest.raises(DataError, match=str(bad).replace(".", r"\.")):
        ds.clip(ds.load_episode(0), 0)
    with pytest.raises(DataError, match="not found"):
        decode_frames(str(tmp_path / "missing.mp4"), [0.0])


def test_corrupt_parquet_names_the_file(tmp_path):
    root, _, _ = _hand_made(tmp_path)
    bad = os.path.join(root, "data/chunk-000/episode_000000.parquet")
    with open(bad, "r+b") as f:
        f.seek(20)
        f.write(b"garbage!" * 8)
    ds = LeRobotDataset(root, CFG)
    with pytest.raises(DataError, match=str(bad).replace(".", r"\.")):
        ds.load_episode(0)
    with open(bad, "wb") as f:
        f.write(b"not a parquet file")
    with pytest.raises(DataError, match=str(bad).replace(".", r"\.")):
        read_parquet(bad)


def test_metadata_errors(tmp_path):
    with pytest.raises(DataError, match="info.json"):
        LeRobotDataset(str(tmp_path), CFG)
    root, _, _ = _hand_made(tmp_path / "d")
    with open(os.path.join(root, "meta", "episodes.jsonl"), "w") as f:
        f.write("{not json\n")
    with pytest.raises(DataError, match="episodes.jsonl"):
        LeRobotDataset(root, CFG)
    root, _, _ = _hand_made(tmp_path / "e")
    with pytest.raises(ValueError, match="action_horizon"):
        LeRobotDataset(root, DataConfig(num_chunks=2, action_horizon=20, view_size=VIEW))
    with pytest.raises(ValueError, match="multiple of the video fps"):
        LeRobotDataset(root, DataConfig(num_chunks=2, action_horizon=24, video_fps=4.0, view_size=VIEW))


def test_tiling_layouts():
    views = [np.full((2, 4, 6, 3), 10 * (i + 1), np.uint8) for i in range(3)]
    d = tile_views(views, "droid", (4, 6), wrist_index=2)
    assert d.shape == (2, 8, 12, 3)
    assert (d[:, :4] == 30).all() and (d[:, 4:, :6] == 10).all() and (d[:, 4:, 6:] == 20).all()
    g = tile_views(views, "grid", (4, 6))
    assert (g[:, :4, :6] == 10).all() and (g[:, 4:, :6] == 20).all() and (g[:, :4, 6:] == 30).all()
    assert (g[:, 4:, 6:] == 0).all()
    # the wrist view is stretched 2x in width by pixel repetition (the release's np.repeat)
    w = np.zeros((1, 4, 6, 3), np.uint8)
    w[0, :, 1] = 255
    d = tile_views([views[0][:1], views[1][:1], w], "droid", (4, 6))
    assert (d[0, :4, 2:4] == 255).all() and (d[0, :4, :2] == 0).all() and (d[0, :4, 4:] == 0).all()


def test_normalize_matches_release_modes():
    x = np.array([[-3.0, 0.0, 5.0], [1.0, 0.5, 5.0]])
    st = compute_feature_stats(np.array([[-1.0, 0.0, 5.0], [1.0, 1.0, 5.0], [0.0, 0.5, 5.0]]))
    q = normalize(x, st, "q99")
    # dim 2 is constant (q01 == q99): left as is, then clipped to [-1, 1] as the release does
    assert q[0, 0] == -1.0 and q[0, 2] == 1.0
    want = [2 * (v - st["q01"][i]) / (st["q99"][i] - st["q01"][i]) - 1 for i, v in enumerate((1.0, 0.5))]
    np.testing.assert_allclose(q[1, :2], np.clip(want, -1, 1), rtol=1e-6)
    assert want[0] > 1.0                  # 1.0 lies above q99 (0.98): clipped
    m = normalize(x, st, "mean_std")
    np.testing.assert_allclose(m[1, 0], (1 - st["mean"][0]) / st["std"][0], rtol=1e-6)
    assert m[0, 2] == 5.0


def test_decodes_av1_the_lerobot_v3_default(tmp_path):
    """LeRobot v3 records AV1 (libsvtav1) by default; PyAV's dav1d decoder reads it, frames picked by timestamp."""
    av = pytest.importorskip("av")
    if "libsvtav1" not in av.codecs_available or "libdav1d" not in av.codecs_available:
        pytest.skip("this PyAV build lacks the AV1 encoder or decoder")
    from fractions import Fraction
    path = str(tmp_path / "av1.mp4")
    with av.open(path, "w") as out:
        s = out.add_stream("libsvtav1", rate=Fraction(15))
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        for i in range(20):
            fr = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 10 * i, np.uint8), format="rgb24")
            fr.pts = i
            for p in s.encode(fr):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    got = decode_frames(path, [0.0, 5 / 15, 19 / 15])
    assert got.shape == (3, 64, 64, 3)
    np.testing.assert_allclose(got[:, 32, 32, 0].astype(int), [0, 50, 190], atol=4)


def test_read_parquet_list_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({"x": pa.array([[1.0, 2.0], [3.0, 4.0]]), "tasks": pa.array([["a"], ["b", "c"]]),
                             "i": pa.array([5, 6])}), path)
    cols = read_parquet(path)
    np.testing.assert_array_equal(cols["x"], [[1.0, 2.0], [3.0, 4.0]])
    assert cols["tasks"].dtype == object and list(cols["tasks"][1]) == ["b", "c"]   # ragged rows stay per row
    with pytest.raises(DataError, match="no column"):
        read_parquet(path, columns=["x", "missing"])


def test_release_key_selection(tmp_path):
    """The release's DROID converter writes more sub-keys than its training uses: for oxe_droid the reader picks
    joint_position + gripper_position, in the release's order, unless told otherwise."""
    root, _, _ = _hand_made(tmp_path)
    base = LeRobotDataset(root, CFG)
    want = base.clip(base.load_episode(0), 2)
    path = os.path.join(root, "meta", "modality.json")
    m = json.load(open(path))
    m["state"] = {"cartesian_position": {"original_key": "observation.state", "start": 0, "end": 3},
                  "gripper_position": m["state"]["gripper_position"], "joint_position": m["state"]["joint_position"]}
    m["action"] = {"gripper_position": m["action"]["gripper_position"],
                   "cartesian_velocity": {"original_key": "action", "start": 0, "end": 3},
                   "joint_position": m["action"]["joint_position"]}
    json.dump(m, open(path, "w"))
    ds = LeRobotDataset(root, CFG)
    assert [k.name for k in ds.modality.state] == ["joint_position", "gripper_position"]
    assert [k.name for k in ds.modality.action] == ["joint_position", "gripper_position"]
    got = ds.clip(ds.load_episode(0), 2)
    np.testing.assert_array_equal(got.actions, want.actions)
    np.testing.assert_array_equal(got.state, want.state)
    every = LeRobotDataset(root, DataConfig(num_chunks=2, action_horizon=24, view_size=VIEW, action_dim=16,
                                            state_dim=16, state_keys=("cartesian_position",),
                                            action_keys=("cartesian_velocity", "gripper_position")))
    assert every.clip(every.load_episode(0), 0).action_mask[0].sum() == 4
    with pytest.raises(DataError, match="not found"):
        LeRobotDataset(root, DataConfig(num_chunks=2, action_horizon=24, view_size=VIEW, action_keys=("nope",)))
