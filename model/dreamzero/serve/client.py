"""A blocking client for the policy server. Torch-free: it needs numpy, msgpack and websockets only."""
from __future__ import annotations

import inspect
import ipaddress
import time
import urllib.parse

from .protocol import ProtocolError, pack, unpack


class ServerError(RuntimeError):
    """The server answered with an error reply."""

    def __init__(self, message: str, reply: dict | None = None):
        super().__init__(message)
        self.reply = reply or {}


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PolicyClient:
    """A blocking client: one request at a time, replies matched by id.

        with PolicyClient("ws://127.0.0.1:8765") as c:
            meta = c.metadata()
            c.reset(text=..., clip=..., first_latent=..., embodiment=0)
            reply = c.step(None, state)            # reply["actions"]: numpy [B, actions_per_chunk, action_dim]
    Error replies raise ServerError. Arrays may be numpy arrays or torch tensors.
    """

    def __init__(self, url: str, *, timeout: float | None = 120.0, max_size: int | None = 2**30,
                 open_timeout: float = 10.0):
        try:
            from websockets.sync.client import connect
        except ImportError as e:
            raise ImportError("the policy client needs `websockets` (>= 12) and `msgpack`: "
                              "pip install 'dz-kernels[serve]'") from e
        kw = dict(max_size=max_size, compression=None, open_timeout=open_timeout)
        params = inspect.signature(connect).parameters
        if "proxy" in params and _is_loopback(url):
            kw["proxy"] = None      # never route a local connection through a proxy from the environment
        if "legacy" in params:
            kw["legacy"] = True     # websockets >= 17: a plain connection object (no context manager required)
        self.url, self.timeout = url, timeout
        self.ws = connect(url, **kw)
        self._next_id = 0

    def request(self, msg: dict) -> dict:
        """Send one message, return its reply (raises ServerError for an error reply, TimeoutError on timeout)."""
        self._next_id += 1
        rid = self._next_id
        self.ws.send(pack({**msg, "id": rid}))
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            reply = unpack(self.ws.recv(timeout=left))
            if not isinstance(reply, dict):
                raise ProtocolError(f"the server sent a {type(reply).__name__}, not a map")
            if reply.get("id") not in (rid, None):
                continue        # a late reply to an earlier request that timed out
            if reply.get("type") == "error":
                raise ServerError(reply.get("error", "unknown error"), reply)
            return reply

    def health(self) -> dict:
        return self.request({"type": "health"})

    def metadata(self) -> dict:
        return self.request({"type": "metadata"})

    def reset(self, text, clip, first_latent, *, negative_text=None, cond=None, embodiment=None) -> dict:
        msg = {"type": "reset", "text": text, "clip": clip, "first_latent": first_latent}
        for k, v in (("negative_text", negative_text), ("cond", cond), ("embodiment", embodiment)):
            if v is not None:
                msg[k] = v
        return self.request(msg)

    def step(self, observation, state) -> dict:
        msg = {"type": "step", "state": state}
        if observation is not None:
            msg["observation"] = observation
        return self.request(msg)

    def close(self) -> None:
        self.ws.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
