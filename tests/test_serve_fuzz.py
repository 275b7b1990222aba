"""The policy server under fuzzing: many malformed, truncated, oversized and wrong-typed messages from concurrent
connections.
"""
import collections
import threading
import time

import numpy as np
import pytest

msgpack = pytest.importorskip("msgpack", reason="the server needs the 'serve' extra: pip install 'dz-kernels[serve]'")
pytest.importorskip("websockets", reason="the server needs the 'serve' extra: pip install 'dz-kernels[serve]'")

from websockets.exceptions import ConnectionClosed  # noqa: E402

from dreamzero.serve import PolicyClient, PolicyServer, pack, unpack  # noqa: E402
from serve_helpers import ERROR_REPLY_BYTES, episode, new_policy, run_direct, serve_model  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return serve_model()


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
