"""The DreamZero release's DROID serving rules, written from its code into tests of our own, against
dreamzero.serve.{droid, openpi, policy_meta}: frame accumulation between calls, the eval crop/resize, the DROID view
tiling, the chunk's frames, state normalization, action un-normalization (relative joints, absolute gripper), the
release's metadata files, our schema, a dataset's metadata against the training clips, and the wire codec."""
import json

import msgpack
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from openpi_helpers import RES, VIEW_SIZE, VIEWS, droid_stats, observation, our_metadata, write_release_experiment_cfg

from dreamzero.serve.droid import FrameBuffer, chunk_video, prepare_view, resolve_embodiment, unnormalize
from dreamzero.serve.openpi import RobotSpec, error_text, pack, unpack
from dreamzero.serve.policy_meta import (PolicyMetadata, PolicyMetadataError, from_dataset, load_policy_metadata,
                                         write_policy_metadata)
from dreamzero.serve.protocol import MAX_ERROR_CHARS, ProtocolError, RequestError
from dreamzero.train.data.stats import normalize


# ---------------------------------------------------------------------------------------------- frames
class ReleaseAccumulation:
    """socket_test_optimized_AR.py, ARDroidRoboarenaPolicy._convert_observation (one view): the whole buffer, the
    first call takes 1 frame, later calls FRAMES_PER_CHUNK = 4, padded by inserting buffer[0] at the front."""

    def __init__(self):
        self.buffer, self.is_first_call = [], True

    def call(self, data):
        if data.ndim == 4:
            self.buffer.extend(list(data))
        else:
            self.buffer.append(data)
        num = 1 if self.is_first_call else 4
        if len(self.buffer) >= num:
            use = self.buffer[-num:]
        else:
            use = self.buffer.copy()
            while len(use) < num:
                use.insert(0, self.buffer[0])
        self.is_first_call = False
        return np.stack(use, axis=0)


@pytest.mark.parametrize("sizes", [[1, 1, 1, 1, 1, 1, 1], [3, 1, 1, 2, 5, 1], [4, 4, 1]])
def test_frame_accumulation_follows_the_release(sizes):
    rng = np.random.default_rng(len(sizes))
    ref, ours = ReleaseAccumulation(), FrameBuffer(4)
    for i, n in enumerate(sizes):
        data = rng.integers(0, 256, (n, 2, 3, 3) if n > 1 else (2, 3, 3), dtype=np.uint8)
        want = ref.call(data)
        ours.add(data if data.ndim == 4 else data[None])
        got = ours.take(first_call=i == 0)
        assert got.shape == want.shape and np.array_equal(got, want), (i, n)
    assert len(ours.recent) <= 4            # only what can still be used is kept


# ---------------------------------------------------------------------------------------------- views
def release_eval_view(frames: np.ndarray, scale: float, size: tuple) -> np.ndarray:
    """groot/vla/data/transform/video.py in eval mode, written out: VideoToTensor (/255, [T, C, H, W]), VideoCrop ->
    torchvision CenterCrop((int(H * scale), int(W * scale))) (top = int(round((H - h) / 2)), same for left),
    VideoResize -> torchvision Resize(size, BILINEAR, antialias=True) = F.interpolate(align_corners=False),
    VideoToNumpy ((x * 255).to(uint8): truncation)."""
    T, H, W, _ = frames.shape
    h, w = int(H * scale), int(W * scale)
    top, left = int(round((H - h) / 2.0)), int(round((W - w) / 2.0))
    x = torch.tensor(frames[:, top:top + h, left:left + w], dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return np.floor((x.permute(0, 2, 3, 1) * 255).numpy()).astype(np.uint8)


def test_release_eval_view_transform():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 20, 30, 3), dtype=np.uint8)
    got = prepare_view(frames, "release_eval", 0.95, VIEW_SIZE)
    assert got.dtype == np.uint8 and got.shape == (2, 16, 24, 3)
    assert np.array_equal(got, release_eval_view(frames, 0.95, VIEW_SIZE))
    # the release's real DROID views: 180 x 320 -> center crop 171 x 304 at (4, 8) (torchvision rounds 4.5 to 4) ->
    # 176 x 320. A frame whose only bright pixels lie outside that crop comes out black.
    big = np.zeros((1, 180, 320, 3), np.uint8)
    big[:, :4] = big[:, 175:] = big[:, :, :8] = big[:, :, 312:] = 255
    out = prepare_view(big, "release_eval", 0.95, (176, 320))
    assert out.shape == (1, 176, 320, 3) and out.max() == 0
    big[:, 4, 8] = 255                                                      # the crop's first pixel
    assert prepare_view(big, "release_eval", 0.95, (176, 320))[0, 0, 0].max() > 0
    # uint8 by truncation: a constant 77 image survives /255 *255 as 76.99999 -> 76 or 77, never rounded up to 78
    flat = np.full((1, 20, 30, 3), 77, np.uint8)
    assert np.isin(prepare_view(flat, "release_eval", 0.95, VIEW_SIZE), (76, 77)).all()
    assert prepare_view(frames, "dz_train", 1.0, VIEW_SIZE) is frames       # tile_views resizes as training did


def robot_for(meta_dict, cfg=None, encoders=None):
    from openpi_helpers import tiny_cfg, tiny_droid_model

    from dreamzero.engine import Policy, PolicyConfig
    from dreamzero.serve.droid import RobotPolicy
    from dreamzero.serve.openpi_server import build_encoders

    cfg = cfg or tiny_cfg()
    policy = Policy(tiny_droid_model(cfg), PolicyConfig(num_steps=1))
    return RobotPolicy(policy, encoders or build_encoders("tiny", cfg, "cpu"), PolicyMetadata.from_dict(meta_dict))


@pytest.fixture(scope="module")
def robot():
    return robot_for(our_metadata())


def test_droid_tiling_as_the_release_prepares_video(robot):
    """DreamTransform._prepare_video for OXE_DROID with views [left exterior, right exterior, wrist] (the concat
    order video.exterior_image_1_left, video.exterior_image_2_left, video.wrist_image_left): the wrist view repeated
    2x along the width across the top row, the left exterior bottom-left, the right exterior bottom-right."""
    rng = np.random.default_rng(1)
    views = {v: rng.integers(0, 256, (2, 16, 24, 3), dtype=np.uint8) for v in VIEWS}
    d = our_metadata("dz_train")
    d["video"]["resolution"] = list(VIEW_SIZE)                  # views at the view size: no resize
    tiled = robot_for(d, encoders=robot.encoders).tile(views)
    h, w = VIEW_SIZE
    assert tiled.shape == (2, 2 * h, 2 * w, 3)
    wrist = views["wrist_image_left"]
    assert np.array_equal(tiled[:, :h, 0::2], wrist) and np.array_equal(tiled[:, :h, 1::2], wrist)
    assert np.array_equal(tiled[:, h:, :w], views["exterior_image_1_left"])
    assert np.array_equal(tiled[:, h:, w:], views["exterior_image_2_left"])


def test_both_namings_of_the_exterior_views(robot):
    """The release's server maps observation/exterior_image_0_left -> video.exterior_image_1_left and _1_ -> _2_;
    the DROID dataset and the RoboArena evaluator use _1_ and _2_. Both reach the same views; a mix is refused."""
    spec = robot.spec
    obs = observation(np.random.default_rng(2), naming="release")
    req = spec.parse(obs)
    assert req.naming == "release"
    assert np.array_equal(req.images["exterior_image_1_left"][0], obs["observation/exterior_image_0_left"])
    assert np.array_equal(req.images["exterior_image_2_left"][0], obs["observation/exterior_image_1_left"])
    ds = dict(obs)
    ds["observation/exterior_image_2_left"] = ds.pop("observation/exterior_image_1_left")
    ds["observation/exterior_image_1_left"] = ds.pop("observation/exterior_image_0_left")
    req2 = spec.parse(ds)
    assert req2.naming == "dataset" and all(np.array_equal(req.images[v], req2.images[v]) for v in VIEWS)
    mixed = dict(obs, **{"observation/exterior_image_2_left": obs["observation/exterior_image_0_left"]})
    with pytest.raises(RequestError, match="ambiguous exterior views"):
        spec.parse(mixed)


@pytest.mark.parametrize("change, expect", [
    (lambda o: o.pop("observation/wrist_image_left"), "missing key.*wrist_image_left"),
    (lambda o: o.pop("prompt"), "missing key.*'prompt'"),
    (lambda o: o.__setitem__("observation/wrist_image_left", np.zeros((18, 30, 3), np.uint8)),
     r"shape \[18, 30, 3\]; expected \[20, 30, 3\]"),
    (lambda o: o.__setitem__("observation/wrist_image_left", np.zeros((20, 30, 3), np.float32)), "must be uint8"),
    (lambda o: o.__setitem__("observation/wrist_image_left", np.zeros((2, 20, 30, 3), np.uint8)),
     "different frame counts"),
    (lambda o: o.__setitem__("observation/joint_position", np.zeros(6)), r"shape \[6\]; expected \[7\]"),
    (lambda o: o.__setitem__("observation/joint_position", np.full(7, np.nan)), "NaN or Inf"),
    (lambda o: o.__setitem__("observation/gripper_position", "open"), "must be a numeric array"),
    (lambda o: o.__setitem__("prompt", 3), "'prompt' must be a string"),
    (lambda o: o.__setitem__("observation/joint_positon", np.zeros(7)), "unknown key.*joint_positon"),
    (lambda o: o.__setitem__("endpoint", "act"), "'endpoint' must be one of"),
    (lambda o: o.__setitem__("session_id", 1.5), "'session_id' must be a string"),
])
def test_requests_are_checked(robot, change, expect):
    obs = observation(np.random.default_rng(3))
    change(obs)
    with pytest.raises(RequestError, match=expect):
        robot.spec.parse(obs)


def test_accepted_variants(robot):
    rng = np.random.default_rng(4)
    obs = observation(rng, frames=3, session=np.zeros(1, np.int32))          # RoboArena's test sends int32 [1]
    obs["observation/joint_position"] = obs["observation/joint_position"].astype(np.float32)[None]     # [1, 7]
    obs["observation/exterior_image_1_right"] = obs["observation/exterior_image_1_left"]              # stereo: unused
    req = robot.spec.parse(obs)
    assert req.session_id == "0" and req.images[VIEWS[0]].shape == (3, *RES, 3)
    assert req.state["joint_position"].shape == (7,) and req.state["joint_position"].dtype == np.float64
    assert robot.spec.parse({"endpoint": "reset", "session_id": "abc", "anything": 1}).endpoint == "reset"


def test_chunk_video_repeats_frames_as_the_action_head():
    """lazy_joint_video_action: 4 frames -> repeat_interleave by num_frame_per_block // (4 // 4) = 2 -> 8 frames
    (the first frame is prepended by the caller, then the VAE's last 2 latents are the chunk); 8 frames are kept."""
    x = torch.arange(4.0).view(1, 1, 4, 1, 1).expand(1, 3, 4, 2, 2)
    y = chunk_video(x, 2, 4)
    assert y.shape[2] == 8 and y[0, 0, :, 0, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    x8 = torch.randn(1, 3, 8, 2, 2)
    assert chunk_video(x8, 2, 4) is x8
    for T in (2, 3, 6):
        with pytest.raises(ValueError, match="frames per call"):
            chunk_video(torch.zeros(1, 3, T, 2, 2), 2, 4)


# ---------------------------------------------------------------------------------------------- state and actions
def release_q99_inverse(x, stats):
    """state_action.py Normalizer.inverse, mode q99."""
    q01, q99 = np.asarray(stats["q01"]), np.asarray(stats["q99"])
    return (x + 1) / 2 * (q99 - q01) + q01


def test_state_is_normalized_concatenated_and_padded(robot):
    s = droid_stats()["state"]
    joints, grip = np.linspace(-3, 3, 7), np.array([0.4])
    v = robot.state_vector({"joint_position": joints, "gripper_position": grip})
    assert v.shape == (1, 1, 10) and v.dtype == torch.float32
    want_j = np.clip(2 * (joints - s["joint_position"]["q01"]) /
                     (np.subtract(s["joint_position"]["q99"], s["joint_position"]["q01"])) - 1, -1, 1)
    assert np.allclose(v[0, 0, :7].numpy(), want_j, atol=1e-6)
    assert np.allclose(v[0, 0, 7].item(), normalize(grip, s["gripper_position"], "q99")[0], atol=1e-6)
    assert (v[0, 0, 8:] == 0).all()


def test_actions_become_absolute_joint_targets_and_gripper(robot):
    """GrootSimPolicy.unapply: un-normalize every key with its statistics (relative statistics for the joints), then
    add the state of the same key (the raw one the client sent) to the relative keys; the gripper stays absolute;
    ConcatTransform.unapply splits the model's vector [joint 7 | gripper 1 | padding] in the concat order."""
    s = droid_stats()["action"]
    rng = np.random.default_rng(5)
    model_out = rng.uniform(-1, 1, (3, 10)).astype(np.float32)
    state = {"joint_position": rng.uniform(-1, 1, 7), "gripper_position": np.array([0.9])}
    got = robot.absolute_actions(model_out[:, :8], state)
    assert got.shape == (3, 8) and got.dtype == np.float32
    want_j = release_q99_inverse(model_out[:, :7].astype(np.float64), s["joint_position"]) + state["joint_position"]
    want_g = release_q99_inverse(model_out[:, 7:8].astype(np.float64), s["gripper_position"])
    assert np.allclose(got[:, :7], want_j, atol=1e-6) and np.allclose(got[:, 7:], want_g, atol=1e-6)


@pytest.mark.parametrize("mode", ["q99", "min_max", "mean_std", "none"])
def test_unnormalize_inverts_normalize(mode):
    rng = np.random.default_rng(6)
    stats = droid_stats()["state"]["joint_position"]
    x = rng.uniform(np.asarray(stats["q01"]), np.asarray(stats["q99"]), (5, 7))     # inside the clip range
    assert np.allclose(unnormalize(normalize(x, stats, mode), stats, mode), x, atol=1e-5)
    with pytest.raises(ValueError, match="unknown normalization mode"):
        unnormalize(x, stats, "binary")


def test_embodiment_slot():
    assert resolve_embodiment(1, 2) == 1 and resolve_embodiment(17, 1) == 0 and resolve_embodiment(17, 32) == 17
    with pytest.raises(ValueError, match="slot 17, but the model has 2"):
        resolve_embodiment(17, 2)


# ---------------------------------------------------------------------------------------------- metadata
def test_release_metadata_reader(tmp_path):
    write_release_experiment_cfg(str(tmp_path), res=(180, 320), view_size=(176, 320), horizon=24)
    m = load_policy_metadata(str(tmp_path))
    assert m.embodiment_tag == "oxe_droid" and m.embodiment_id == 17
    assert m.video_keys == VIEWS and m.resolution == (180, 320) and m.view_size == (176, 320)
    assert (m.video_transform, m.crop_scale, m.tiling, m.wrist_index) == ("release_eval", 0.95, "droid", 2)
    assert [(s.key, s.dim, s.normalization) for s in m.state] == [("joint_position", 7, "q99"),
                                                                   ("gripper_position", 1, "q99")]
    assert [(a.key, a.relative) for a in m.action] == [("joint_position", True), ("gripper_position", False)]
    stats = droid_stats()
    assert list(m.action[0].stats["q99"]) == stats["action"]["joint_position"]["q99"]
    assert list(m.state[1].stats["q01"]) == stats["state"]["gripper_position"]["q01"]
    assert m.action_horizon == 24 and m.frames_per_call == 4 and m.prompt_template == "auto"
    # the same from the metadata.json path, beside a weights file, and through our schema and back
    assert load_policy_metadata(str(tmp_path / "experiment_cfg" / "metadata.json")) == m
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert load_policy_metadata(str(tmp_path / "model.safetensors")) == m
    assert PolicyMetadata.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    spec = RobotSpec.from_metadata(m)
    assert spec.server_config() == {"image_resolution": [180, 320], "needs_wrist_camera": True,
                                    "n_external_cameras": 2, "needs_stereo_camera": False, "needs_session_id": True,
                                    "action_space": "joint_position"}


@pytest.mark.parametrize("overrides, expect", [
    (dict(relative_action_per_horizon=True), "per-horizon"),
    (dict(embodiment_tag_to_projector_index={"agibot": 26}), "embodiment_tag_to_projector_index"),
    (dict(transforms={}), "no transforms for embodiment 'oxe_droid'"),
])
def test_release_metadata_errors(tmp_path, overrides, expect):
    write_release_experiment_cfg(str(tmp_path), **overrides)
    with pytest.raises(PolicyMetadataError, match=expect):
        load_policy_metadata(str(tmp_path))


def test_release_metadata_files_missing_or_other_modes(tmp_path):
    with pytest.raises(PolicyMetadataError, match="holds no policy metadata"):
        load_policy_metadata(str(tmp_path))
    exp = write_release_experiment_cfg(str(tmp_path))
    with pytest.raises(PolicyMetadataError, match="no embodiment 'agibot'"):
        load_policy_metadata(str(tmp_path), "agibot")
    conf = (tmp_path / "experiment_cfg" / "conf.yaml")
    conf.write_text(conf.read_text().replace("state.gripper_position: q99", "state.gripper_position: binary"))
    with pytest.raises(PolicyMetadataError, match="normalization 'binary' of state.gripper_position"):
        load_policy_metadata(str(tmp_path))
    conf.unlink()
    with pytest.raises(PolicyMetadataError, match="conf.yaml.*is missing"):
        load_policy_metadata(exp + "/metadata.json")


@pytest.mark.parametrize("edit, expect", [
    (lambda d: d.pop("action"), "missing field 'action'"),
    (lambda d: d.update(version=2), "version 1"),
    (lambda d: d["state"][0]["stats"].pop("q99"), r"state\[0\]\.stats\.q99 must be 7 finite numbers"),
    (lambda d: d["action"][0]["stats"]["q01"].__setitem__(0, float("nan")), "finite"),
    (lambda d: d["video"].update(tiling="mosaic"), "video.tiling"),
    (lambda d: d["video"].update(resolution=[20]), r"video.resolution must be \[height, width\]"),
    (lambda d: d["action"][1].update(key="gripper_velocity", relative=True),
     "relative action key 'gripper_velocity' needs a state key"),
    (lambda d: d["state"][1].update(normalization="scale"), "normalization 'scale' is not supported"),
])
def test_our_schema_is_validated(edit, expect):
    d = our_metadata()
    edit(d)
    with pytest.raises(PolicyMetadataError, match=expect):
        PolicyMetadata.from_dict(d, "x.json")


def test_metadata_from_a_dataset_reproduces_the_training_clips(tmp_path):
    """Metadata written for a model trained on a dataset (from_dataset + write_policy_metadata) serves with the
    statistics and tiling the trainer used: the served state equals the clip's normalized state, the served actions
    of the clip's normalized actions are the recorded absolute ones, and the tiled views are the clip's frames."""
    pytest.importorskip("av")
    pytest.importorskip("pyarrow")
    from dreamzero.train.data import DataConfig, LeRobotDataset
    from dreamzero.train.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(str(tmp_path / "ds"), num_episodes=2, length=50, view_size=(20, 30))
    ds = LeRobotDataset(root, DataConfig(view_size=VIEW_SIZE, action_horizon=24, num_chunks=1, idle_threshold=None))
    path = write_policy_metadata(str(tmp_path), from_dataset(ds, embodiment_id=1, frames_per_call=4))
    meta = load_policy_metadata(str(tmp_path))
    assert path.endswith("dz_policy.json") and meta.video_transform == "dz_train" and meta.resolution == (20, 30)
    ep = ds.load_episode(0)
    clip = ds.clip(ep, 5)
    from openpi_helpers import tiny_cfg
    robot = robot_for({**meta.to_dict(), "action_horizon": 3}, cfg=tiny_cfg())
    raw_state = np.asarray(ep.columns["observation.state"], np.float64)[5]
    state = {"joint_position": raw_state[:7], "gripper_position": raw_state[7:8]}
    assert np.allclose(robot.state_vector(state)[0, 0, :8].numpy(), clip.state[0, :8], atol=1e-6)
    acts = robot.absolute_actions(clip.actions[:, :8], state)
    raw_actions = np.asarray(ep.columns["action"], np.float64)[5:5 + 24]
    inside = np.abs(clip.actions[:, :8]) < 1                 # q99 clips; elsewhere the inverse cannot recover x
    assert inside.mean() > 0.5 and np.allclose(acts[inside], raw_actions[inside], atol=1e-4)
    from dreamzero.train.data import decode_frames
    steps = ds.frame_steps(5)[:2]
    views = {n: decode_frames(ep.video_paths[n], ep.timestamps[steps], tolerance=0.5 / ds.fps + 1e-4)
             for n, _ in ds.modality.video}
    assert np.array_equal(robot.tile(views), clip.frames[:2])

    # an export with `dz export`'s dz_stats.json alone (format dz-stats/1, dreamzero.train.export): the cameras come
    # from the dataset and prepared folder it names, the statistics from the file
    export, prepared = tmp_path / "export", tmp_path / "prepared"
    export.mkdir()
    prepared.mkdir()
    (prepared / "prepared.json").write_text(json.dumps({"settings": {"data_config": ds.cfg.to_dict()}}))

    def entries(modality, subkeys):
        out = []
        for s in subkeys:
            st = ds._norm_stats(modality, s)
            e = {"key": s.name, "source_key": s.original_key, "source_dims": [s.start, s.end],
                 "dims": [s.start, s.end], **{k: [float(v) for v in st[k]] for k in ("q01", "q99")}}
            if modality == "action":
                e["relative"] = s.name in ds.relative_keys
            out.append(e)
        return out

    act = entries("action", ds.modality.action)
    act[1]["q99"] = [9.0]                                       # the export's statistics are the authority
    doc = {"format": "dz-stats/1", "datasets": [
        {"embodiment_id": 1, "embodiment_tag": "oxe_droid", "normalization": "q99", "action_horizon": 24,
         "state_dim": 64, "action_dim": 32, "state": entries("state", ds.modality.state), "action": act,
         "dataset": root, "prepared": str(prepared)}]}
    (export / "dz_stats.json").write_text(json.dumps(doc))
    m2 = load_policy_metadata(str(export))
    assert m2.video_keys == meta.video_keys and m2.resolution == meta.resolution and m2.tiling == "droid"
    assert m2.state == meta.state and m2.action[0] == meta.action[0] and m2.action[1].stats["q99"] == (9.0,)
    doc["datasets"][0]["dataset"] = str(tmp_path / "elsewhere")
    (export / "dz_stats.json").write_text(json.dumps(doc))
    with pytest.raises(PolicyMetadataError, match="write dz_policy.json beside the weights"):
        load_policy_metadata(str(export))


# ---------------------------------------------------------------------------------------------- wire format
def test_codec_is_openpi_msgpack_numpy():
    """openpi-client's msgpack_numpy: arrays are maps with BYTES keys __ndarray__/data/dtype/shape, numpy scalars
    __npgeneric__/data/dtype; our pack writes them, our unpack reads them (and str keys too)."""
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    raw = msgpack.unpackb(pack({"actions": a, "x": np.float32(2.5)}), raw=False)
    assert set(raw["actions"]) == {b"__ndarray__", b"data", b"dtype", b"shape"}
    assert raw["actions"][b"dtype"] == "<f4" and raw["actions"][b"shape"] == [3, 4]
    assert raw["x"] == {b"__npgeneric__": True, b"data": 2.5, b"dtype": "<f4"}
    back = unpack(pack({"actions": a, "x": np.float32(2.5), "s": "text"}))
    assert np.array_equal(back["actions"], a) and back["actions"].flags.writeable
    assert type(back["x"]) is np.float32 and back["x"] == 2.5 and back["s"] == "text"
    as_str = msgpack.packb({"__ndarray__": True, "data": a.tobytes(), "dtype": "<f4", "shape": [3, 4]})
    assert np.array_equal(unpack(as_str), a)
    with pytest.raises(TypeError, match="dtype"):
        pack({"o": np.array(["a"], dtype=object)})


@pytest.mark.parametrize("obj, expect", [
    ({b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O", b"shape": [1]}, "dtype"),
    ({b"__ndarray__": True, b"data": b"\0" * 7, b"dtype": "<f4", b"shape": [2]}, "holds 7 bytes"),
    ({b"__ndarray__": True, b"data": b"\0" * 4, b"dtype": "<f4", b"shape": [-1]}, "shape"),
    ({b"__ndarray__": True, b"data": "text", b"dtype": "<f4", b"shape": [1]}, "bin"),
    ({b"__npgeneric__": True, b"data": [1], b"dtype": "<f8"}, "numpy scalar"),
])
def test_codec_refuses_bad_arrays(obj, expect):
    with pytest.raises(ProtocolError, match=expect):
        unpack(msgpack.packb(obj, use_bin_type=True))


def test_codec_refuses_malformed_msgpack_and_bounds_errors():
    for raw in (b"\xc1", msgpack.packb({"a": 1}) + b"x", msgpack.packb(msgpack.ExtType(3, b"x"))):
        with pytest.raises(ProtocolError):
            unpack(raw)
    text = error_text("x" * 100_000)
    assert text.startswith("error: ") and len(text) <= MAX_ERROR_CHARS and text.endswith("more characters cut]")
