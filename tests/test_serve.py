"""The policy server (dreamzero.serve): round trip against the Policy itself, malformed and oversized
requests, a client that disconnects mid-request, a restart, the bounded queue, the raw-input hook, the commands.

Every server here listens on 127.0.0.1 on a free port and runs the tiny random model with one denoising step.
"""
import collections
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

msgpack = pytest.importorskip("msgpack", reason="the server needs the 'serve' extra: pip install 'dz-kernels[serve]'")
pytest.importorskip("websockets", reason="the server needs the 'serve' extra: pip install 'dz-kernels[serve]'")

from websockets.exceptions import ConnectionClosed  # noqa: E402

from dreamzero.engine import Policy, PolicyConfig  # noqa: E402
from dreamzero.serve import (PolicyClient, PolicyServer, ServerError, client_main, pack, serve_main,  # noqa: E402
                             unpack)
from tiny import tiny_model  # noqa: E402

F32 = np.float32


@pytest.fixture(scope="module")
def model():
    return tiny_model(std=None).eval()


def new_policy(model, **kw):
    return Policy(model, PolicyConfig(num_steps=1, **kw))


def episode(cfg, batch=2, chunks=4, seed=0):
    """Random features of the protocol's shapes: the reset's arrays, then per step (observation or None, state)."""
    rng = np.random.default_rng(seed)
    H, W = cfg.latent_height, cfg.latent_width
    reset = dict(text=rng.standard_normal((batch, cfg.text_len, cfg.text_dim)).astype(F32),
                 clip=rng.standard_normal((batch, cfg.clip_tokens, cfg.clip_dim)).astype(F32),
                 first_latent=rng.standard_normal((batch, cfg.latent_channels, 1, H, W)).astype(F32),
                 embodiment=np.arange(batch, dtype=np.int64) % cfg.num_embodiments)
    steps = [(None if i == 0 else rng.standard_normal((batch, cfg.latent_channels, cfg.frames_per_chunk, H, W))
              .astype(F32), rng.standard_normal((batch, cfg.states_per_chunk, cfg.state_dim)).astype(F32))
             for i in range(chunks)]
    return reset, steps


def run_direct(policy, reset, steps):
    t = torch.from_numpy
    policy.reset(t(reset["text"]), t(reset["clip"]), t(reset["first_latent"]), embodiment=t(reset["embodiment"]))
    return [policy.step(None if o is None else t(o), t(s)) for o, s in steps]


def send_raw(client, raw):
    client.ws.send(raw)
    return unpack(client.ws.recv(timeout=60))


class GatedPolicy:
    """A Policy whose step waits for the test to open a gate: makes 'a request is running' deterministic."""

    def __init__(self, inner):
        self.inner, self.cfg, self.config = inner, inner.cfg, inner.config
        self.device, self.dtype = inner.device, inner.dtype
        self.entered, self.release = threading.Event(), threading.Event()
        self.calls = 0
        self.fail_next = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):       # never leave the server's worker waiting, whatever the test did
        self.release.set()

    @property
    def chunk(self):
        return self.inner.chunk

    def reset(self, *args, **kw):
        return self.inner.reset(*args, **kw)

    def step(self, observation, state):
        self.calls += 1
        self.entered.set()
        if not self.release.wait(60):
            raise RuntimeError("the test never opened the gate")
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("simulated failure")
        return self.inner.step(observation, state)


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


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


ERROR_REPLY_BYTES = 2048        # an error reply: MAX_ERROR_CHARS of detail plus the envelope


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


# ---------------------------------------------------------------------------------------------- fuzz
def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def fuzz_messages(cfg, n: int, seed: int, limit: int) -> list:
    """`n` malformed, truncated, oversized and wrong-typed messages: (payload bytes or str, beyond_hard_limit)."""
    rng = np.random.default_rng(seed)
    reset, steps = episode(cfg, batch=1, chunks=2, seed=seed)
    valid = [{"type": "reset", **reset}, {"type": "step", "state": steps[0][1]},
             {"type": "step", "observation": steps[1][0], "state": steps[1][1]}, {"type": "health"},
             {"type": "metadata", "id": "m"}]
    packed = [pack(v) for v in valid]
    nd = [{"__nd__": True, "dtype": "<f4", "shape": [2 ** 62, 0], "data": b""},
          {"__nd__": True, "dtype": "<f4", "shape": [2 ** 40, 2 ** 40, 0, 2 ** 40], "data": b""},
          {"__nd__": True, "dtype": "<f4", "shape": [-1], "data": b""}, {"__nd__": True},
          {"__nd__": 1, "dtype": "<f4", "shape": [1], "data": b"\0" * 4},
          {"__nd__": True, "dtype": "<c16", "shape": [1], "data": b"\0" * 16},
          {"__nd__": True, "dtype": ["<f4"], "shape": [1], "data": b"\0" * 4},
          {"__nd__": True, "dtype": "<f4", "shape": [1], "data": "abcd"}]
    junk = [None, True, -1, 0, 2 ** 64 - 1, -2 ** 63, 3.5, float("nan"), float("inf"), 3e38, -3e38, "", "x" * 5000,
            b"\0" * 3000, [], [1] * 3000, {}, {"a": {"b": {"c": [1, {"d": None}]}}}, "reset", "step",
            np.full((1, cfg.states_per_chunk, cfg.state_dim), 3e38, np.float32),
            np.full((1, cfg.states_per_chunk, cfg.state_dim), np.inf, np.float64),
            np.zeros((1, cfg.states_per_chunk, cfg.state_dim), np.float16) + np.float16(60000),
            np.zeros((1, cfg.states_per_chunk, cfg.state_dim), np.int8), np.zeros((3, 0), np.float32),
            np.array([2 ** 64 - 1], np.uint64), np.zeros(7, bool), msgpack.ExtType(3, b"xyz"), *nd]
    out = []
    for i in range(n):
        kind = i % 10
        base = packed[rng.integers(len(packed))]
        if kind == 0:                                       # random bytes
            out.append((rng.bytes(int(rng.integers(0, 4096))), False))
        elif kind == 1:                                     # truncated
            out.append((base[:int(rng.integers(0, len(base)))], False))
        elif kind == 2:                                     # bits flipped
            b = bytearray(base)
            for _ in range(int(rng.integers(1, 9))):
                j = int(rng.integers(len(b)))
                b[j] ^= 1 << int(rng.integers(8))
            out.append((bytes(b), False))
        elif kind in (3, 4, 5):                             # a field (or a new one) given a wrong type or value
            msg = dict(valid[rng.integers(len(valid))])
            key = [*msg, "id", "type", "embodiment", "observation", "x" * int(rng.integers(1, 3000))][
                rng.integers(len(msg) + 5)]
            msg[key] = junk[rng.integers(len(junk))]
            out.append((pack(msg), False))
        elif kind == 6:                                     # not a map, or nested beyond msgpack's limits
            out.append((rng.choice([b"\x91" * 2000 + b"\xc0", b"\x81\xa1a" * 600 + b"\xc0", b"\xdb\xff\xff\xff\xff",
                                    b"\xc6\x7f\xff\xff\xff" + b"\0" * 10, pack([1, 2, 3]), pack("health"),
                                    b"\xc1", b""]), False))
        elif kind == 7:                                     # text frames
            out.append(("health" * int(rng.integers(0, 3000)), False))
        elif kind == 8:                                     # oversized (error reply) or beyond the hard limit (1009)
            beyond = i % 200 == 8
            size = int(rng.integers(limit + 1, 2 * limit)) if not beyond else 2 * limit + 100
            out.append((pack({**valid[3], "pad": np.zeros(size, np.uint8)}), beyond))
        else:                                               # arrays of any dtype in place of the features
            msg = dict(valid[int(rng.integers(3))])
            key = [k for k in msg if k != "type"][rng.integers(len(msg) - 1)]
            msg[key] = junk[rng.integers(len(junk))]
            out.append((pack(msg), False))
    return out


def test_fuzz_many_malformed_messages_from_concurrent_connections(model, caplog):
    """2,400 malformed, truncated, oversized and wrong-typed messages from 4 connections at once: every one answered
    (an error reply, or the 1009 close beyond the hard limit), no internal error, replies bounded, the server's
    memory bounded; then a valid episode is served exactly."""
    import logging

    cfg = model.cfg
    limit, n_conn, per_conn = 64 * 1024, 4, 600
    reset, steps = episode(cfg, batch=1, chunks=3, seed=21)
    expected = run_direct(new_policy(model), reset, steps)
    caplog.set_level(logging.WARNING, logger="dreamzero.serve")
    with PolicyServer(new_policy(model), port=0, max_message_bytes=limit) as srv:
        batches = [fuzz_messages(cfg, per_conn, seed=k, limit=limit) for k in range(n_conn)]
        results = [dict(replies=[], closes=0, error=None) for _ in range(n_conn)]

        def client(k: int, msgs: list) -> None:
            res = results[k]
            c = PolicyClient(srv.url, timeout=60)
            try:
                for payload, beyond in msgs:
                    c.ws.send(payload)
                    try:
                        raw = c.ws.recv(timeout=60)
                    except ConnectionClosed as e:
                        assert beyond and e.rcvd is not None and e.rcvd.code == 1009, (payload[:60], e)
                        res["closes"] += 1
                        c.close()
                        c = PolicyClient(srv.url, timeout=60)
                        continue
                    assert not beyond
                    res["replies"].append(raw)
            except BaseException as e:      # noqa: BLE001 -- reported by the test thread
                res["error"] = e
            finally:
                c.close()

        def run(batch_list):
            threads = [threading.Thread(target=client, args=(k, m)) for k, m in enumerate(batch_list)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            assert not any(t.is_alive() for t in threads)

        t0 = time.monotonic()
        run([b[:50] for b in batches])                      # warm-up: allocator and caches settle
        rss0 = _rss_bytes()
        run([b[50:] for b in batches])
        elapsed, grown = time.monotonic() - t0, _rss_bytes() - rss0
        sent = sum(len(p) for b in batches for p, _ in b[50:])
        for r in results:
            assert r["error"] is None, r["error"]
        replies = [unpack(raw) for r in results for raw in r["replies"]]
        sizes = {(rep["type"], len(raw)) for r in results for raw, rep in zip(r["replies"], replies)}
        closes = sum(r["closes"] for r in results)
        assert len(replies) + closes == n_conn * per_conn >= 2000 and closes == 12
        kinds = collections.Counter(rep["type"] for rep in replies)
        assert set(kinds) <= {"error", "health", "metadata", "reset", "actions"} and kinds["error"] > 2000, kinds
        errors = [rep["error"] for rep in replies if rep["type"] == "error"]
        assert not [e for e in errors if "internal server error" in e or " failed (" in e][:3]
        assert max(s for t, s in sizes if t == "error") <= ERROR_REPLY_BYTES
        assert max(s for t, s in sizes) <= 16 * 1024
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR][:3]
        assert elapsed < 120, elapsed
        # bounded: well below what was sent (a server keeping the messages, or their replies, would exceed it)
        assert sent > 24 * 2 ** 20 and grown < 12 * 2 ** 20, f"memory grew by {grown / 2 ** 20:.1f} MiB"
        with PolicyClient(srv.url) as c:                    # and it still serves an episode exactly
            h = c.health()
            assert h["ok"] and h["pending"] == 0 and h["metrics"]["requests"] >= len(replies)
            c.reset(reset["text"], reset["clip"], reset["first_latent"], embodiment=reset["embodiment"])
            for (obs, st), want in zip(steps, expected):
                np.testing.assert_array_equal(c.step(obs, st)["actions"], want.actions)
    print(f"fuzz: {len(replies) + closes} messages ({sent / 2 ** 20:.0f} MiB) in {elapsed:.1f} s, {dict(kinds)}, "
          f"rss +{grown / 2 ** 20:.1f} MiB")


# ---------------------------------------------------------------------------------------------- disconnects, queue
def test_client_disconnects_mid_request(model):
    cfg = model.cfg
    reset, steps = episode(cfg, batch=1, chunks=2, seed=5)
    expected = run_direct(new_policy(model), reset, steps)
    gated = GatedPolicy(new_policy(model))
    with PolicyServer(gated, port=0) as srv, gated:
        with PolicyClient(srv.url) as c:
            c.reset(reset["text"], reset["clip"], reset["first_latent"], embodiment=reset["embodiment"])
        a = PolicyClient(srv.url, timeout=30)
        a.ws.send(pack({"type": "step", "state": steps[0][1]}))
        assert gated.entered.wait(30)
        a.ws.socket.shutdown(socket.SHUT_RDWR)                      # gone while its step runs (no close frame)
        a.close()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:     # and a broken handshake
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:     # and plain garbage
            s.sendall(b"\x00\xff" * 100)
        gated.release.set()
        with PolicyClient(srv.url, timeout=30) as b:
            assert wait_for(lambda: b.health()["metrics"]["disconnected_mid_request"] == 1)
            h = b.health()
            assert h["ok"] and h["pending"] == 0 and h["episode"]["chunk"] == 1      # the step completed
            rep = b.step(*steps[1])                                 # the episode goes on where it was
            np.testing.assert_array_equal(rep["actions"], expected[1].actions)
    assert gated.calls == 2


def test_busy_when_the_queue_is_full(model):
    cfg = model.cfg
    reset, steps = episode(cfg, batch=1, chunks=2, seed=6)
    expected = run_direct(new_policy(model), reset, steps)
    gated = GatedPolicy(new_policy(model))
    with (PolicyServer(gated, port=0, max_pending=1) as srv, gated, PolicyClient(srv.url, timeout=30) as a,
          PolicyClient(srv.url, timeout=30) as b):
        a.reset(reset["text"], reset["clip"], reset["first_latent"], embodiment=reset["embodiment"])
        a.ws.send(pack({"type": "step", "state": steps[0][1], "id": "first"}))
        assert gated.entered.wait(30)
        with pytest.raises(ServerError, match=r"busy: 1 request\(s\) pending \(max_pending=1\)"):
            b.step(None, steps[0][1])
        with pytest.raises(ServerError, match="busy"):
            b.reset(reset["text"], reset["clip"], reset["first_latent"], embodiment=reset["embodiment"])
        h = b.health()                                              # answered while the step runs
        assert h["pending"] == 1 and h["metrics"]["busy"] == 2 and gated.calls == 1
        gated.release.set()
        rep = unpack(a.ws.recv(timeout=60))
        assert rep["type"] == "actions" and rep["id"] == "first"
        np.testing.assert_array_equal(rep["actions"], expected[0].actions)
        np.testing.assert_array_equal(b.step(*steps[1])["actions"], expected[1].actions)    # room again
        assert gated.calls == 2


def test_a_policy_failure_is_reported_and_a_reset_recovers(model):
    cfg = model.cfg
    reset, steps = episode(cfg, batch=1, chunks=2, seed=8)
    expected = run_direct(new_policy(model), reset, steps)
    gated = GatedPolicy(new_policy(model))
    gated.release.set()
    gated.fail_next = True
    with PolicyServer(gated, port=0) as srv, PolicyClient(srv.url) as c:
        c.reset(reset["text"], reset["clip"], reset["first_latent"], embodiment=reset["embodiment"])
        with pytest.raises(ServerError, match=r"step failed \(RuntimeError\): simulated failure"):
            c.step(*steps[0])
        with pytest.raises(ServerError, match="the policy failed during the previous step; send a reset"):
            c.step(*steps[0])
        assert c.health()["episode"]["active"] is False
        c.reset(reset["text"], reset["clip"], reset["first_latent"], embodiment=reset["embodiment"])
        for (obs, st), want in zip(steps, expected):
            np.testing.assert_array_equal(c.step(obs, st)["actions"], want.actions)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_legacy_websockets_server_api(model, monkeypatch):
    """The fallback for websockets 12 (no websockets.asyncio): the same protocol through websockets' legacy API."""
    import dreamzero.serve.server as serve_mod

    try:
        from websockets.legacy.server import serve as legacy_serve
    except ImportError:
        pytest.skip("this websockets has no legacy server API any more: the fallback cannot be exercised")
    monkeypatch.setattr(serve_mod, "_websockets_serve", lambda: legacy_serve)
    cfg = model.cfg
    reset, steps = episode(cfg, batch=1, chunks=2, seed=9)
    expected = run_direct(new_policy(model), reset, steps)
    with PolicyServer(new_policy(model), port=0, max_message_bytes=4096) as srv:
        assert type(srv._server).__module__.startswith("websockets.legacy")
        with PolicyClient(srv.url) as c:
            assert c.health()["ok"]
            c.reset(reset["text"], reset["clip"], reset["first_latent"], embodiment=reset["embodiment"])
            for (obs, st), want in zip(steps, expected):
                np.testing.assert_array_equal(c.step(obs, st)["actions"], want.actions)
            assert send_raw(c, b"\xc1")["error"].startswith("malformed message")
            with pytest.raises(ServerError, match="exceeds the server's limit of 4096 bytes"):
                c.request({"type": "health", "pad": np.zeros(5000, np.uint8)})
            c.ws.send(pack({"type": "health", "pad": np.zeros(20000, np.uint8)}))
            with pytest.raises(ConnectionClosed) as info:
                c.ws.recv(timeout=30)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009
        with PolicyClient(srv.url) as c:
            assert c.health()["ok"]


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


# ---------------------------------------------------------------------------------------------- commands
def test_commands_are_wired_into_dz():
    from dz_kernels.cli import _resolve, all_commands

    cmds = all_commands()
    assert _resolve(cmds["serve"][0]) is serve_main and _resolve(cmds["client"][0]) is client_main


def test_serve_command_argument_errors(capsys, tmp_path):
    for argv in (["--config", "tiny"], ["--random-weights", "--checkpoint", "x.safetensors"]):
        with pytest.raises(SystemExit) as e:
            serve_main(argv)
        assert e.value.code == 2
        assert "exactly one of EXPORT (an export folder), --checkpoint PATH and --random-weights" in \
            capsys.readouterr().err
    # ordinary mistakes: one line with the next step, exit code 2
    assert serve_main(["--checkpoint", str(tmp_path / "missing.safetensors"), "--device", "cpu"]) == 2
    assert "missing.safetensors does not exist: give an export folder" in capsys.readouterr().err
    assert serve_main(["--random-weights", "--dit-cache", "static", "--steps", "4", "--device", "cpu"]) == 2
    assert "static mask is defined for 16 steps" in capsys.readouterr().err


def test_serve_loads_a_checkpoint(model, tmp_path):
    """--checkpoint goes through dreamzero.checkpoint.load_model: the served policy has the saved weights."""
    from dreamzero.serve import build_policy, serve_parser

    save_checkpoint = pytest.importorskip("dreamzero.checkpoint", reason="no dreamzero.checkpoint in this tree: "
                                          "dz serve then takes --random-weights only").save_checkpoint

    path = save_checkpoint(model, tmp_path / "tiny")
    policy, name = build_policy(serve_parser().parse_args(["--checkpoint", str(path), "--config", "tiny",
                                                           "--device", "cpu", "--steps", "1"]))
    assert name == "tiny" and policy.config.num_steps == 1 and policy.dtype == torch.float32
    want = model.state_dict()
    got = policy.model.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    w = model.blocks[0].ffn[0].weight
    seeded, _ = build_policy(serve_parser().parse_args(["--random-weights", "--device", "cpu"]))
    assert torch.equal(seeded.model.blocks[0].ffn[0].weight, w)            # --weight-seed 0, as the fixture
    other, _ = build_policy(serve_parser().parse_args(["--random-weights", "--weight-seed", "1", "--device", "cpu"]))
    assert not torch.equal(other.model.blocks[0].ffn[0].weight, w)


def test_client_command_without_a_server(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert client_main(["--url", f"ws://127.0.0.1:{port}", "--timeout", "5"]) == 2
    assert "cannot connect" in capsys.readouterr().err


def test_dz_serve_and_client_demo(capsys):
    proc = subprocess.Popen([sys.executable, "-m", "dz_kernels.cli", "serve", "--config", "tiny", "--random-weights",
                             "--steps", "1", "--port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killer = threading.Timer(120, proc.kill)
    killer.start()
    try:
        line = proc.stdout.readline()
        m = re.search(r"listening on (ws://127\.0\.0\.1:\d+)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = m.group(1)
        assert client_main(["--url", url, "--demo", "--chunks", "2", "--batch", "2"]) == 0
        out = capsys.readouterr().out
        assert "model tiny on cpu" in out and "reset: batch 2" in out
        assert re.search(r"step 1: chunk 2, actions \[2, 3, 6\] float32, round trip [\d.]+ ms", out)
        assert "server step latency: count 2" in out
        assert client_main(["--url", url]) == 0
        assert '"metadata"' in capsys.readouterr().out
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        killer.cancel()
    assert proc.returncode == 0, err
    assert "dz serve: stopped" in out

