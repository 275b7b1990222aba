"""The policy server against bad requests: malformed, out-of-range and oversized messages get bounded error
replies and the server keeps serving.
"""
import numpy as np
import pytest
import torch

msgpack = pytest.importorskip("msgpack", reason="the server needs the 'serve' extra: pip install 'dz-kernels[serve]'")
pytest.importorskip("websockets", reason="the server needs the 'serve' extra: pip install 'dz-kernels[serve]'")

from websockets.exceptions import ConnectionClosed  # noqa: E402

from dreamzero.serve import PolicyClient, PolicyServer, ServerError, pack, unpack  # noqa: E402
from serve_helpers import ERROR_REPLY_BYTES, F32, episode, new_policy, run_direct, send_raw, serve_model  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return serve_model()


# ---------------------------------------------------------------------------------------------- bad requests
def test_malformed_requests_get_error_replies_and_the_server_keeps_serving(model):
    cfg = model.cfg
    reset, steps = episode(cfg, batch=2, chunks=3)
    expected = run_direct(new_policy(model), reset, steps)
    good = {"type": "reset", **reset}

    def with_(**kw):
        return pack({**good, **kw})

    def without(name):
        return pack({k: v for k, v in good.items() if k != name})

    def nd(a):
        return {"__nd__": True, "dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}

    object_text = msgpack.packb({"type": "reset", "clip": nd(reset["clip"]), "first_latent": nd(reset["first_latent"]),
                                 "embodiment": nd(reset["embodiment"]),
                                 "text": {"__nd__": True, "dtype": "|O", "shape": [1], "data": b"\x00" * 8}},
                                use_bin_type=True)
    nan_text = reset["text"].copy()
    nan_text[0, 0, 0] = np.nan
    cases = [
        (b"\xc1", "malformed message: not valid msgpack"),
        (with_()[:100], "malformed message"),                                   # truncated
        ("a text frame", "got a text message"),
        (pack([1, 2]), "must be a msgpack map"),
        (pack({"x": 1}), "missing 'type' field"),
        (pack({"type": "fly"}), "unknown message type 'fly'"),
        (pack({"type": "health", "id": [1]}), "'id' must be"),
        (without("clip"), "reset: missing field 'clip'"),
        (with_(text=reset["text"][:, :3]), f"reset: text has shape [2, 3, {cfg.text_dim}], expected [B, "),
        (with_(clip=reset["clip"][:1]), "reset: clip has shape [1, "),                         # batch mismatch
        (with_(first_latent=reset["first_latent"][:, :, :, :2]), "reset: first_latent has shape"),
        (with_(text=reset["text"].astype(np.int32)), "reset: text must be a float array"),
        (object_text, "dtype '|O' refused"),
        (with_(text=nan_text), "reset: text holds NaN or Inf"),
        (with_(embodiment=np.array([0, 5])), "embodiment ids must be in [0, 2)"),
        (with_(embodiment=np.array([0.0, 1.0])), "embodiment must be an integer array"),
        (with_(embodiment="robot"), "embodiment must be an int or an int array"),
        (without("embodiment"), "the model has 2 embodiment slots"),
        (with_(negative=reset["text"]), "unknown field(s) ['negative']"),
        (with_(cond=np.zeros((2, 20, 2, cfg.latent_height, cfg.latent_width), F32)), "reset: cond has shape"),
        (pack({"type": "step", "state": steps[0][1]}), "no episode: send a reset first"),
        (pack({"type": "step"}), "step: missing field 'state'"),
        (pack({"type": "step", "state": steps[0][1][..., :2]}), "step: state has shape"),
        (pack({"type": "reset", "instruction": "pick", "image": np.zeros((1, 8, 8, 3), np.uint8)}),
         "need a server started with an encoder"),
    ]
    with PolicyServer(new_policy(model), port=0) as srv, PolicyClient(srv.url) as c:
        for i, (raw, expect) in enumerate(cases):
            rep = send_raw(c, raw)
            assert rep["type"] == "error" and expect in rep["error"], (i, rep)
        # the same connection still works, and the episode rules are enforced without touching the policy
        c.reset(reset["text"], reset["clip"], reset["first_latent"], embodiment=reset["embodiment"])
        with pytest.raises(ServerError, match="first step after a reset takes no observation"):
            c.step(steps[1][0], steps[0][1])
        with pytest.raises(ServerError, match="batch 1 does not match the reset's batch 2"):
            c.step(None, steps[0][1][:1])
        np.testing.assert_array_equal(c.step(None, steps[0][1])["actions"], expected[0].actions)
        with pytest.raises(ServerError, match="'observation' is required"):
            c.step(None, steps[1][1])
        with pytest.raises(ServerError, match="observation has shape"):
            c.step(steps[1][0][:, :, :1], steps[1][1])
        for (obs, st), want in zip(steps[1:], expected[1:]):
            np.testing.assert_array_equal(c.step(obs, st)["actions"], want.actions)
        h = c.health()
        assert h["ok"] and h["metrics"]["errors"] == len(cases) + 4 and h["metrics"]["step_latency"]["count"] == 3


def test_error_replies_are_bounded_whatever_the_request(model):
    """Requests holding huge values (a 600 KiB type name, field name, id, dtype string, an embodiment list, an
    encoder's or the policy's error text) get error replies of at most ERROR_REPLY_BYTES, on the same connection."""
    from dreamzero.serve.protocol import MAX_ERROR_CHARS

    cfg = model.cfg
    reset, steps = episode(cfg, batch=1, chunks=1)
    reset40, _ = episode(cfg, batch=40, chunks=1)
    big = "x" * (600 * 1024)

    def encode(kind, msg):
        raise ValueError("the encoder says: " + big)

    cases = [
        ({"type": big}, "unknown message type"),
        ({"type": "reset", **reset, big: 1}, "unknown field(s)"),
        ({"type": "reset", **reset, **{f"f{i}": i for i in range(5000)}}, "and 4992 more"),
        ({"type": "health", "id": big}, "'id' must be at most 256 characters"),
        ({"type": "reset", **reset, "embodiment": np.full(100_000, 7, np.int64)}, "embodiment has shape [100000]"),
        ({"type": "reset", **reset40, "embodiment": np.full(40, 7, np.int64)}, "got <list of 40 items>"),
        ({"type": "reset", **reset, "text": {"__nd__": True, "dtype": big, "shape": [1], "data": b"\0" * 4}},
         "refused"),
        ({"type": "reset", **reset, "text": {"__nd__": True, "dtype": "<f4", "shape": list(range(20000)),
                                             "data": b""}}, "array shape must be a list"),
    ]
    with PolicyServer(new_policy(model), port=0, encode=encode) as srv, PolicyClient(srv.url) as c:
        for i, (msg, expect) in enumerate(cases):
            c.ws.send(pack(msg))
            raw = c.ws.recv(timeout=60)
            rep = unpack(raw)
            assert rep["type"] == "error" and expect in rep["error"], (i, rep["error"][:300])
            assert len(rep["error"]) <= MAX_ERROR_CHARS and len(raw) <= ERROR_REPLY_BYTES, (i, len(raw))
        # an encoder's error and a policy's error are cut too
        c.ws.send(pack({"type": "reset", "instruction": "x", "image": np.zeros((1, 2, 2, 3), np.uint8)}))
        raw = c.ws.recv(timeout=60)
        assert "the encoder says: xxx" in unpack(raw)["error"] and len(raw) <= ERROR_REPLY_BYTES
        assert c.health()["ok"]


def test_integer_fields_out_of_any_range_get_a_clear_reply(model):
    """msgpack carries integers up to 2**64 - 1 and down to -2**63: each gets the range error, never an internal
    one (np.full overflowed on 2**63)."""
    cfg = model.cfg
    reset, _ = episode(cfg, batch=2, chunks=1)
    with PolicyServer(new_policy(model), port=0) as srv, PolicyClient(srv.url) as c:
        for emb in (2 ** 63, 2 ** 64 - 1, -2 ** 63, 2, -1, np.array([0, 2 ** 63], np.uint64),
                    np.array([0, -2 ** 63], np.int64)):
            rep = send_raw(c, pack({"type": "reset", **reset, "embodiment": emb}))
            assert rep["type"] == "error" and "reset: embodiment ids must be in [0, 2)" in rep["error"], (emb, rep)
        for rid in (2 ** 64 - 1, -2 ** 63):                         # any msgpack int is a fine id, echoed
            assert send_raw(c, pack({"type": "health", "id": rid}))["id"] == rid
        assert c.health()["metrics"]["errors"] == 7


def test_values_beyond_what_the_dtype_carries_are_refused_before_the_episode_changes(model):
    """3e38 fits float32 but not the model's norms and sampler (the step used to fail in the smoothing and leave
    the episode broken until a reset). Such values are refused at validation: the episode goes on as if they had
    never been sent; a value of exactly the limit is served."""
    from dreamzero.serve.protocol import value_limit

    cfg = model.cfg
    reset, steps = episode(cfg, batch=1, chunks=3, seed=11)
    expected = run_direct(new_policy(model), reset, steps)
    limit = value_limit(torch.float32)
    assert limit == pytest.approx(1.8446743e19, rel=1e-6) and value_limit("float16") == pytest.approx(255.94, abs=.01)
    assert value_limit("torch.bfloat16") == pytest.approx(1.8411e19, rel=1e-4)
    huge = np.full_like(steps[1][1], 3e38)
    with PolicyServer(new_policy(model), port=0) as srv, PolicyClient(srv.url) as c:
        assert c.metadata()["max_abs"] == limit
        c.reset(reset["text"], reset["clip"], reset["first_latent"], embodiment=reset["embodiment"])
        np.testing.assert_array_equal(c.step(*steps[0])["actions"], expected[0].actions)
        with pytest.raises(ServerError, match=r"step: state holds a value of magnitude 3e\+38, beyond the 1.84e\+19"):
            c.step(steps[1][0], huge)
        with pytest.raises(ServerError, match="step: observation holds a value of magnitude"):
            c.step(np.full_like(steps[1][0], -3e38), steps[1][1])
        with pytest.raises(ServerError, match="reset: text holds a value of magnitude"):
            c.reset(reset["text"] * 1e30, reset["clip"], reset["first_latent"], embodiment=reset["embodiment"])
        for (obs, st), want in zip(steps[1:], expected[1:]):     # the episode as if nothing had been sent
            np.testing.assert_array_equal(c.step(obs, st)["actions"], want.actions)
        # at the limit: served, finite
        at = steps[0][1] / np.abs(steps[0][1]).max() * np.float32(limit)
        assert np.abs(at).max() <= limit
        c.reset(reset["text"], reset["clip"], reset["first_latent"], embodiment=reset["embodiment"])
        assert np.isfinite(c.step(None, at)["actions"]).all()
    with PolicyServer(new_policy(model), port=0, max_abs=10.0) as srv, PolicyClient(srv.url) as c:
        with pytest.raises(ServerError, match="beyond the 10 this model's dtype"):
            c.reset(reset["text"] * 100, reset["clip"], reset["first_latent"], embodiment=reset["embodiment"])


def test_oversized_messages(model):
    limit = 64 * 1024
    with PolicyServer(new_policy(model), port=0, max_message_bytes=limit) as srv:
        assert srv.hard_limit_bytes == 2 * limit
        with PolicyClient(srv.url) as c:
            with pytest.raises(ServerError, match=f"exceeds the server's limit of {limit} bytes"):
                c.request({"type": "health", "pad": np.zeros(100 * 1024, np.uint8)})
            assert c.health()["ok"]                                 # same connection, still open
            c.ws.send(pack({"type": "health", "pad": np.zeros(300 * 1024, np.uint8)}))    # beyond the hard limit
            with pytest.raises(ConnectionClosed) as info:
                c.ws.recv(timeout=30)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009     # message too big, with a reason
            assert info.value.rcvd.reason
        with PolicyClient(srv.url) as c:
            h = c.health()
            assert h["ok"] and h["metrics"]["errors"] == 1
