"""The openpi / RoboArena server (dreamzero.serve.openpi_server) in-process, talked to over a websocket with the
openpi wire format: metadata on connect, an episode whose actions equal the pipeline run directly, refused requests
that leave the episode as it was, bounded error replies, sessions, RoboArena's reset, a new prompt, a failing policy.
The real openpi-client drives `dz serve --protocol openpi` in test_serve_openpi_client.py."""
import inspect
import json

import numpy as np
import pytest

pytest.importorskip("websockets", reason="the server needs the 'serve' extra: pip install 'dz-kernels[serve]'")

from openpi_helpers import RES, observation, our_metadata, tiny_cfg, tiny_droid_model  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from dreamzero.engine import Policy, PolicyConfig  # noqa: E402
from dreamzero.serve.droid import RobotPolicy  # noqa: E402
from dreamzero.serve.openpi import RESET_REPLY, pack, unpack  # noqa: E402
from dreamzero.serve.openpi_server import OpenPIServer, build_encoders  # noqa: E402
from dreamzero.serve.policy_meta import PolicyMetadata  # noqa: E402
from dreamzero.serve.protocol import MAX_ERROR_CHARS  # noqa: E402


@pytest.fixture(scope="module")
def parts():
    cfg = tiny_cfg()
    return tiny_droid_model(cfg), build_encoders("tiny", cfg, "cpu"), PolicyMetadata.from_dict(our_metadata())


def new_robot(parts, policy_cls=Policy):
    model, enc, meta = parts
    return RobotPolicy(policy_cls(model, PolicyConfig(num_steps=1)), enc, meta)


class Conn:
    """A bare openpi-style client: metadata on connect, then msgpack_numpy requests; text replies are errors."""

    def __init__(self, url):
        kw = {"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}    # websockets >= 17
        self.ws = connect(url, max_size=None, compression=None, proxy=None, **kw)
        self.metadata = unpack(self.ws.recv(timeout=30))

    def send(self, obj):
        self.ws.send(obj if isinstance(obj, (bytes, str)) else pack(obj))
        r = self.ws.recv(timeout=120)
        return r if isinstance(r, str) else unpack(r)

    def close(self):
        self.ws.close()


@pytest.fixture
def server(parts):
    srv = OpenPIServer(new_robot(parts), port=0)
    srv.start_background()
    yield srv
    srv.stop_background()


def direct(parts, requests):
    """The same observations through a fresh RobotPolicy, no server: the actions the server must return."""
    robot = new_robot(parts)
    return [robot.infer(robot.spec.parse(o), "direct")["actions"] for o in requests]


def test_metadata_and_an_episode_match_the_pipeline(parts, server):
    rng = np.random.default_rng(0)
    reqs = [observation(rng, session="ep-1") for _ in range(5)]
    reqs[2] = observation(rng, session="ep-1", frames=3)            # several frames in one call
    reqs[4] = observation(rng, session="ep-1", naming="release")    # the release's numbering of the exteriors
    want = direct(parts, reqs)
    c = Conn(server.url)
    try:
        assert c.metadata == {"image_resolution": list(RES), "needs_wrist_camera": True, "n_external_cameras": 2,
                              "needs_stereo_camera": False, "needs_session_id": True, "action_space": "joint_position"}
        for i, (o, w) in enumerate(zip(reqs, want)):
            r = c.send(o)
            assert isinstance(r, dict), r
            a = r["actions"]
            assert a.dtype == np.float32 and a.shape == (3, 8) and np.isfinite(a).all()
            assert np.array_equal(a, w) and np.array_equal(r["action"], a)
            assert r["episode"]["call"] == i + 1 and r["episode"]["new"] == (i == 0)
            # the 4th call ends the tiny model's window (3 chunks): the release restarts from the newest raw frame
            assert r["episode"]["window_reset"] == ("raw" if i == 3 else None) and r["chunk"] == [1, 2, 3, 1, 2][i]
            t = r["server_timing"]
            assert 0 < t["infer_ms"] <= t["latency_ms"]
            assert set(r["timings_ms"]) >= {"preprocess_ms", "total_ms"}
        # the relative joints are absolute targets around the state sent; the gripper is absolute
        assert not np.allclose(want[0][:, :7], want[1][:, :7])
        m = server.metrics()
        assert m["step_latency"]["count"] == 5 and m["step_compute"]["count"] == 5 and m["errors"] == 0
        assert server.health()["episode"]["calls"] == 5
    finally:
        c.close()


def test_refused_requests_leave_the_episode_untouched(parts, server):
    rng = np.random.default_rng(1)
    good = [observation(rng, session="s") for _ in range(3)]
    want = direct(parts, good)
    bad_image = dict(good[1], **{"observation/wrist_image_left": np.zeros((10, 10, 3), np.uint8)})
    missing = {k: v for k, v in good[1].items() if k != "observation/joint_position"}
    nan = dict(good[1], **{"observation/gripper_position": np.array([np.nan])})
    huge_key = dict(good[1], **{"observation/" + "k" * 200_000: 1})
    c = Conn(server.url)
    try:
        assert np.array_equal(c.send(good[0])["actions"], want[0])
        for bad, expect in [(b"\xc1not msgpack", "malformed message"), ("a text frame", "text message"),
                            (pack([1, 2]), "must be a msgpack map"), (bad_image, "wrist_image_left has shape"),
                            (missing, "missing key"), (nan, "NaN"), (huge_key, "unknown key"),
                            ({"endpoint": "act"}, "'endpoint' must be one of")]:
            r = c.send(bad)
            assert isinstance(r, str) and r.startswith("error: ") and expect in r, (expect, r[:200])
            assert len(r) <= MAX_ERROR_CHARS
        for g, w in zip(good[1:], want[1:]):          # the episode goes on as if the bad requests never came
            r = c.send(g)
            assert np.array_equal(r["actions"], w) and not r["episode"]["new"]
        assert server.metrics()["errors"] == 8
    finally:
        c.close()


def test_sessions_connections_and_roboarena_reset(parts, server):
    rng = np.random.default_rng(2)
    a, b = Conn(server.url), Conn(server.url)
    try:
        assert a.send(observation(rng))["episode"] == {"call": 1, "new": True, "reset": True, "window_reset": None}
        assert a.send(observation(rng))["episode"]["call"] == 2
        assert b.send(observation(rng))["episode"]["new"]            # no session id: the connection names it
        assert a.send(observation(rng))["episode"]["new"]            # a's episode was replaced by b's
        assert a.send(observation(rng, session="x"))["episode"]["new"]
        assert b.send(observation(rng, session="x"))["episode"]["call"] == 2     # a session spans connections
        assert b.send({"endpoint": "reset", "session_id": "x"}) == RESET_REPLY
        r = b.send(dict(observation(rng, session="x"), endpoint="infer"))
        assert r["episode"]["new"] and r["episode"]["call"] == 1
    finally:
        a.close()
        b.close()


def test_a_new_prompt_restarts_from_the_newest_frame(parts, server):
    rng = np.random.default_rng(3)
    reqs = [observation(rng, session="p") for _ in range(2)] + [observation(rng, session="p", prompt="open the drawer")]
    c = Conn(server.url)
    try:
        eps = [c.send(o)["episode"] for o in reqs]
        assert [e["reset"] for e in eps] == [True, False, True] and [e["call"] for e in eps] == [1, 2, 3]
        # the release: the new instruction is encoded and the newest frame becomes the first frame, so the call
        # equals the first call of a fresh episode on that frame and prompt
        robot = new_robot(parts)
        for o in reqs:
            last = robot.infer(robot.spec.parse(o), "d")
        fresh = new_robot(parts)
        assert last["chunk"] == 1
        assert np.array_equal(last["actions"], fresh.infer(fresh.spec.parse(reqs[2]), "f")["actions"])
    finally:
        c.close()


class FailingPolicy(Policy):
    fail = False

    def step_frames(self, *a, **k):
        if FailingPolicy.fail:
            raise RuntimeError("simulated device failure")
        return super().step_frames(*a, **k)


def test_a_policy_failure_ends_the_episode(parts):
    srv = OpenPIServer(new_robot(parts, FailingPolicy), port=0)
    srv.start_background()
    rng = np.random.default_rng(4)
    c = Conn(srv.url)
    try:
        assert c.send(observation(rng, session="f"))["episode"]["call"] == 1
        FailingPolicy.fail = True
        r = c.send(observation(rng, session="f"))
        assert isinstance(r, str) and "infer failed (RuntimeError): simulated device failure" in r
        assert "the episode has ended" in r
        FailingPolicy.fail = False
        assert c.send(observation(rng, session="f"))["episode"] == {"call": 1, "new": True, "reset": True,
                                                                    "window_reset": None}
    finally:
        FailingPolicy.fail = False
        c.close()
        srv.stop_background()


def test_oversized_messages_are_refused(parts):
    srv = OpenPIServer(new_robot(parts), port=0, max_message_bytes=4096)
    srv.start_background()
    c = Conn(srv.url)
    try:
        r = c.send(observation(np.random.default_rng(5)))
        assert isinstance(r, str) and "exceeds the server's limit of 4096 bytes" in r
        with pytest.raises(TypeError, match="encode hook"):
            OpenPIServer(new_robot(parts), encode=lambda k, m: {})
    finally:
        c.close()
        srv.stop_background()


def test_serve_command_openpi_argument_errors(capsys, tmp_path):
    from dreamzero.serve import serve_main

    with pytest.raises(SystemExit) as e:
        serve_main(["--random-weights", "--encoders", "tiny"])
    assert e.value.code == 2 and "belong to --protocol openpi" in capsys.readouterr().err
    base = ["--protocol", "openpi", "--random-weights", "--device", "cpu", "--steps", "1"]
    with pytest.raises(SystemExit, match="needs the checkpoint's statistics and transforms"):
        serve_main(base + ["--encoders", "tiny"])
    meta = tmp_path / "dz_policy.json"
    meta.write_text(json.dumps(our_metadata()))
    with pytest.raises(SystemExit, match="needs --encoders PATH"):
        serve_main(base + ["--policy-metadata", str(meta)])
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(SystemExit, match="not a 'dz-policy' version 1 file"):
        serve_main(base + ["--policy-metadata", str(tmp_path / "other.json"), "--encoders", "tiny"])
    with pytest.raises(SystemExit, match=r"does not fit the model: .*8 state and 8 action dims; the model takes 5 "):
        serve_main(base + ["--config", "tiny", "--policy-metadata", str(meta), "--encoders", "tiny"])
    with pytest.raises(SystemExit, match="cannot load the encoders"):
        serve_main(base + ["--policy-metadata", str(meta), "--encoders", str(tmp_path / "no-such-folder")])
