"""The policy server (dreamzero.serve): a round trip against the Policy itself, video replies, a restart on the
same port, the raw-input hook and the server's own argument checks. Helpers: serve_helpers.py.
"""
import numpy as np
import pytest
import torch

msgpack = pytest.importorskip("msgpack", reason="the server needs the 'serve' extra: pip install 'dz-kernels[serve]'")
pytest.importorskip("websockets", reason="the server needs the 'serve' extra: pip install 'dz-kernels[serve]'")

from dreamzero.serve import PolicyClient, PolicyServer, ServerError  # noqa: E402
from serve_helpers import F32, episode, new_policy, run_direct, serve_model  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return serve_model()


# ---------------------------------------------------------------------------------------------- round trip
def test_round_trip_matches_the_policy(model):
    cfg = model.cfg
    reset, steps = episode(cfg, batch=2, chunks=4)      # 4 chunks cross the cache window (a release reset)
    expected = run_direct(new_policy(model), reset, steps)
    with PolicyServer(new_policy(model), port=0) as srv, PolicyClient(srv.url) as c:
        assert srv.host == "127.0.0.1" and srv.url == f"ws://127.0.0.1:{srv.port}"
        assert srv._server.sockets[0].getsockname()[0] == "127.0.0.1"
        h = c.health()
        assert h["type"] == "health" and h["ok"] is True and h["episode"]["active"] is False
        assert h["metrics"]["step_latency"] == {"count": 0, "mean_ms": None, "p50_ms": None, "p90_ms": None,
                                                "max_ms": None}
        meta = c.metadata()
        assert meta["model"] == "tiny" and meta["model_config"]["text_dim"] == cfg.text_dim
        assert meta["policy_config"]["num_steps"] == 1 and meta["policy_config"]["cfg_mode"] == "sequential"
        s = meta["shapes"]
        assert s["text"] == ["B", cfg.text_len, cfg.text_dim] and s["clip"] == ["B", cfg.clip_tokens, cfg.clip_dim]
        assert s["first_latent"] == ["B", 16, 1, cfg.latent_height, cfg.latent_width]
        assert s["observation"] == ["B", 16, cfg.frames_per_chunk, cfg.latent_height, cfg.latent_width]
        assert s["state"] == ["B", cfg.states_per_chunk, cfg.state_dim]
        assert s["actions"] == ["B", cfg.actions_per_chunk, cfg.action_dim] and "video" not in s
        assert meta["embodiment_required"] is True and meta["num_embodiments"] == 2 and meta["encode"] is False

        r = c.reset(reset["text"], reset["clip"], reset["first_latent"], embodiment=reset["embodiment"])
        assert r["type"] == "reset" and r["ok"] is True and r["batch"] == 2
        for (obs, st), want in zip(steps, expected, strict=True):
            rep = c.step(obs, st)
            assert rep["type"] == "actions" and rep["chunk"] == want.chunk and rep["dit_steps"] == want.dit_steps
            assert rep["actions"].shape == (2, cfg.actions_per_chunk, cfg.action_dim)
            np.testing.assert_array_equal(rep["actions"], want.actions)
            assert rep["latency_ms"] >= rep["timings_ms"]["denoise_ms"] > 0
        assert [w.chunk for w in expected] == [1, 2, 3, 1]
        h = c.health()
        lat = h["metrics"]["step_latency"]
        assert lat["count"] == 4 and 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["max_ms"]
        assert lat["mean_ms"] <= lat["max_ms"] and h["metrics"]["step_compute"]["count"] == 4
        assert h["episode"] == {"active": True, "batch": 2, "chunk": 1} and h["metrics"]["errors"] == 0
        assert c.metadata()["metrics"]["step_latency"]["count"] == 4


def test_return_video_and_an_int_embodiment(model):
    cfg = model.cfg
    reset, steps = episode(cfg, batch=1, chunks=2, seed=3)
    reset["embodiment"] = np.array([1])
    direct = new_policy(model, return_video=True)
    expected = run_direct(direct, reset, steps)
    with PolicyServer(new_policy(model, return_video=True), port=0) as srv, PolicyClient(srv.url) as c:
        assert c.metadata()["shapes"]["video"] == ["B", 16, cfg.frames_per_chunk, cfg.latent_height,
                                                   cfg.latent_width]
        c.reset(reset["text"], reset["clip"], reset["first_latent"], embodiment=1)      # an int: every batch item
        for (obs, st), want in zip(steps, expected, strict=True):
            rep = c.step(obs, st)
            np.testing.assert_array_equal(rep["actions"], want.actions)
            np.testing.assert_array_equal(rep["video"], want.video.float().numpy())


# ---------------------------------------------------------------------------------------------- restart
def test_restart_on_the_same_port(model):
    cfg = model.cfg
    reset, steps = episode(cfg, batch=1, chunks=3, seed=7)
    expected = run_direct(new_policy(model), reset, steps)
    srv = PolicyServer(new_policy(model), port=0)
    port = srv.start_background()
    try:
        with PolicyClient(srv.url) as c:
            c.reset(reset["text"], reset["clip"], reset["first_latent"], embodiment=reset["embodiment"])
            np.testing.assert_array_equal(c.step(*steps[0])["actions"], expected[0].actions)
        srv.stop_background()
        with pytest.raises(OSError):
            PolicyClient(srv.url, open_timeout=5)                   # nothing listens
        assert srv.start_background() == port                       # the same server again, same port
        with PolicyClient(srv.url) as c:
            np.testing.assert_array_equal(c.step(*steps[1])["actions"], expected[1].actions)   # episode kept
            with pytest.raises(OSError):
                PolicyServer(new_policy(model), port=port).start_background()                 # port taken
            np.testing.assert_array_equal(c.step(*steps[2])["actions"], expected[2].actions)
        srv.stop_background()
        other = PolicyServer(new_policy(model), port=port)          # a new server on the freed port
        assert other.start_background() == port
        try:
            with PolicyClient(other.url) as c:
                assert c.health()["ok"] and c.health()["episode"]["active"] is False
        finally:
            other.stop_background()
    finally:
        srv.stop_background()


# ---------------------------------------------------------------------------------------------- raw inputs
def test_encode_hook(model):
    cfg = model.cfg
    H, W = cfg.latent_height, cfg.latent_width

    def encode(kind, msg):
        if kind == "reset":
            if not isinstance(msg["instruction"], str):
                raise ValueError("instruction must be a str")
            img = msg["image"]
            B = img.shape[0]
            rng = np.random.default_rng(len(msg["instruction"]) + int(img.sum()))
            return {"text": rng.standard_normal((B, cfg.text_len, cfg.text_dim)).astype(F32),
                    "clip": torch.from_numpy(rng.standard_normal((B, cfg.clip_tokens, cfg.clip_dim)).astype(F32)),
                    "first_latent": rng.standard_normal((B, 16, 1, 1 if msg["instruction"] == "bad shape" else H, W))
                    .astype(F32)}
        frames = msg["frames"].astype(F32)
        return {"observation": np.broadcast_to(frames.mean(axis=(1, 2, 3, 4))[:, None, None, None, None] / 255.0,
                                               (frames.shape[0], 16, cfg.frames_per_chunk, H, W)).copy()}

    image = np.random.default_rng(0).integers(0, 255, (1, 8, 8, 3), dtype=np.uint8)
    frames = np.random.default_rng(1).integers(0, 255, (1, 4, 8, 8, 3), dtype=np.uint8)
    feats = encode("reset", {"instruction": "pick up the cup", "image": image})
    obs = encode("step", {"frames": frames})["observation"]
    state = np.ones((1, cfg.states_per_chunk, cfg.state_dim), F32)
    direct = new_policy(model)
    direct.reset(torch.from_numpy(feats["text"]), feats["clip"], torch.from_numpy(feats["first_latent"]),
                 embodiment=torch.tensor([1]))
    want = [direct.step(None, torch.from_numpy(state)), direct.step(torch.from_numpy(obs), torch.from_numpy(state))]
    with PolicyServer(new_policy(model), port=0, encode=encode) as srv, PolicyClient(srv.url) as c:
        meta = c.metadata()
        assert meta["encode"] is True and meta["raw_fields"]["step"] == ["frames"]
        with pytest.raises(ServerError, match=r"reset failed \(ValueError\): instruction must be a str"):
            c.request({"type": "reset", "instruction": 3, "image": image, "embodiment": 1})
        with pytest.raises(ServerError, match="after encoding: reset: first_latent has shape"):
            c.request({"type": "reset", "instruction": "bad shape", "image": image, "embodiment": 1})
        c.request({"type": "reset", "instruction": "pick up the cup", "image": image, "embodiment": 1})
        np.testing.assert_array_equal(c.step(None, state)["actions"], want[0].actions)
        rep = c.request({"type": "step", "frames": frames, "state": state})
        np.testing.assert_array_equal(rep["actions"], want[1].actions)


def test_server_arguments_are_checked(model):
    p = new_policy(model)
    for kw, expect in [(dict(max_pending=0), "max_pending"), (dict(max_message_bytes=10), "max_message_bytes"),
                       (dict(max_message_bytes=4096, hard_limit_bytes=2048), "hard_limit_bytes"),
                       (dict(max_abs=0.0), "max_abs must be > 0")]:
        with pytest.raises(ValueError, match=expect):
            PolicyServer(p, **kw)
    with pytest.raises(TypeError, match="encode"):
        PolicyServer(p, encode="yes")
