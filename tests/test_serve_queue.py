"""The policy server's connections and queue: a client gone mid-request, a full queue, a failing policy that a
reset recovers, and the legacy websockets server API.
"""
import socket

import numpy as np
import pytest

msgpack = pytest.importorskip("msgpack", reason="the server needs the 'serve' extra: pip install 'dz-kernels[serve]'")
pytest.importorskip("websockets", reason="the server needs the 'serve' extra: pip install 'dz-kernels[serve]'")

from websockets.exceptions import ConnectionClosed  # noqa: E402

from dreamzero.serve import PolicyClient, PolicyServer, ServerError, pack, unpack  # noqa: E402
from serve_helpers import GatedPolicy, episode, new_policy, run_direct, send_raw, serve_model, wait_for  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return serve_model()


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
