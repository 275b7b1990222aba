"""The policy server: a DreamZero `Policy` behind a websocket, with msgpack-encoded numpy arrays.

    dz serve --config tiny --random-weights --steps 1 --port 8765      # binds 127.0.0.1 unless --host says otherwise
    dz client --url ws://127.0.0.1:8765 --demo                         # a short episode with random features

Protocol (version 1). Every message is one binary websocket message holding one msgpack map with a "type" field;
an optional "id" (int or str) is echoed in the reply. Arrays travel as maps
{"__nd__": True, "dtype": "<f4", "shape": [...], "data": <bytes>} (see `pack` / `unpack`); only plain numeric dtypes
(bool, signed/unsigned integers, float16/32/64) are accepted, nothing is ever unpickled. "B" is the batch.

    {"type": "health"}    -> {"type": "health", "ok": True, "pending", "max_pending", "episode", "metrics", ...}
    {"type": "metadata"}  -> {"type": "metadata", "model", "model_config", "policy_config", "shapes", "dtypes",
                              "num_embodiments", "embodiment_required", "max_message_bytes", "metrics", ...}
    {"type": "reset", "text": [B, text_len, text_dim], "clip": [B, clip_tokens, clip_dim],
     "first_latent": [B, 16, 1, H, W], optional "negative_text" (as text), "cond": [B, 20, local_attn_size, H, W],
     "embodiment": int or int array [B] (required when the model has several embodiment slots)}
                          -> {"type": "reset", "ok": True, "batch": B}
    {"type": "step", "observation": [B, 16, frames_per_chunk, H, W] latents (absent or nil on the first step after
     a reset: the first frame came with the reset), "state": [B, states_per_chunk, state_dim]}
                          -> {"type": "actions", "actions": [B, actions_per_chunk, action_dim], "chunk", "dit_steps",
                              "timings_ms" (the policy's), "latency_ms" (server side: receipt to reply),
                              "video" (predicted latents, only when the policy returns video)}
    any failure           -> {"type": "error", "error": "<what was wrong>", "request_type", "id"}

Features are float16/32/64 and finite; the exact shapes are in the metadata reply ("shapes"). Requests are
validated before the policy is touched; unknown fields are refused (a typo must not be silently ignored).

Robustness. A malformed message (not msgpack, not a map, unknown type, missing or unknown field, wrong shape or
dtype, NaN) gets an error reply and the connection stays open. A message larger than `max_message_bytes` gets an
error reply; one larger than `hard_limit_bytes` (websockets' max_size, default 2 x max_message_bytes) is not read
at all: the connection is closed with code 1009 (message too big) and a reason. A client that disconnects while its
request runs does not disturb the server: the request completes (the policy state advances) and the reply is
dropped.

One policy, one worker: reset and step run in order of arrival on a single worker thread. At most `max_pending`
reset/step requests may be queued or running; beyond that a request gets the error reply "busy: ..." at once.
Health and metadata are answered on the event loop, also while a step runs. The server drives ONE episode (one
robot): a reset from any connection starts a new episode for all of them.

Metrics: per-step latency (server side, receipt to reply) and compute time (inside Policy.step): count, mean and
max over all steps, p50 and p90 over the last 1024 steps; in the health and metadata replies.

Raw inputs (optional). A server given `encode=` accepts raw data in place of features. `encode(kind, message)` runs
on the worker before validation and returns a dict of features (numpy arrays or torch tensors) that replace the
raw fields of the message:
    kind "reset": the message carries "instruction" (str, or a list of B str), optionally "negative_instruction",
                  and "image" (e.g. uint8 [B, H, W, 3]); return {"text", "clip", "first_latent"} and optionally
                  {"negative_text", "cond", "embodiment"}.
    kind "step":  the message carries "frames" (e.g. uint8 [B, T, H, W, 3], the camera frames since the last step);
                  return {"observation": [B, 16, frames_per_chunk, H, W]}.
The raw fields (RAW_FIELDS) are passed through as decoded; checking them is the encoder's job (raise ValueError
with a clear message: it becomes the error reply). Without `encode`, a message with raw fields gets an error reply.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import dataclasses
import inspect
import ipaddress
import json
import logging
import re
import signal
import sys
import threading
import time
import urllib.parse
from typing import Any, Callable

import numpy as np

log = logging.getLogger("dreamzero.serve")

PROTOCOL_VERSION = 1
DEFAULT_PORT = 8765
DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20
DEFAULT_MAX_PENDING = 4
MESSAGE_TYPES = ("health", "metadata", "reset", "step")
RESET_FIELDS = ("text", "clip", "first_latent", "negative_text", "cond", "embodiment")
STEP_FIELDS = ("observation", "state")
RAW_FIELDS = {"reset": ("instruction", "negative_instruction", "image"), "step": ("frames",)}
_ENVELOPE = ("type", "id")
_MAX_NDIM = 16


# ============================================================================================== codec
class ProtocolError(ValueError):
    """A message that cannot be decoded or does not follow the protocol."""


_DTYPE_RE = re.compile(r"^[<>|=]?[biuf][1248]$")


def _encode_default(obj):
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf" or obj.dtype.fields is not None:
            raise TypeError(f"cannot send an array of dtype {obj.dtype}: only bool, integer and float arrays")
        arr = obj if obj.flags.c_contiguous else obj.copy(order="C")      # (ascontiguousarray makes 0-d 1-d)
        return {"__nd__": True, "dtype": arr.dtype.str, "shape": list(arr.shape), "data": arr.tobytes()}
    if isinstance(obj, np.generic):
        return obj.item()
    if _is_tensor(obj):
        t = obj.detach().cpu()
        if t.is_floating_point() and str(t.dtype) not in ("torch.float16", "torch.float32", "torch.float64"):
            t = t.float()                                                          # bfloat16 / fp8 -> float32
        return _encode_default(t.numpy())
    raise TypeError(f"cannot encode an object of type {type(obj).__name__}")


def pack(obj: Any) -> bytes:
    """Encode a message (maps, lists, str, bytes, numbers, None, numpy arrays, torch tensors) as msgpack bytes.
    Arrays become {"__nd__": True, "dtype", "shape", "data"}; bfloat16 tensors are sent as float32."""
    import msgpack

    return msgpack.packb(obj, default=_encode_default, use_bin_type=True)


def _decode_array(d: dict) -> np.ndarray:
    if set(d) != {"__nd__", "dtype", "shape", "data"} or d["__nd__"] is not True:
        raise ProtocolError("an array must be a map with exactly __nd__=True, dtype, shape, data; got keys "
                            f"{sorted(d)}")
    dt, shape, data = d["dtype"], d["shape"], d["data"]
    if not isinstance(dt, str) or not _DTYPE_RE.match(dt):
        raise ProtocolError(f"array dtype {dt!r} refused: only plain numeric dtypes (e.g. '<f4', '<i8', '|u1', "
                            "'|b1') are accepted")
    try:
        dtype = np.dtype(dt)
    except TypeError as e:
        raise ProtocolError(f"array dtype {dt!r} is not a numpy dtype") from e
    if dtype.kind not in "biuf" or dtype.fields is not None or dtype.hasobject:
        raise ProtocolError(f"array dtype {dt!r} refused: only plain numeric dtypes are accepted")
    if (not isinstance(shape, list) or len(shape) > _MAX_NDIM
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise ProtocolError(f"array shape must be a list of at most {_MAX_NDIM} non-negative ints, got {shape!r}")
    if not isinstance(data, bytes):
        raise ProtocolError(f"array data must be msgpack bin (bytes), got {type(data).__name__}")
    n = 1
    for s in shape:
        n *= s
    if n * dtype.itemsize != len(data):
        raise ProtocolError(f"array data holds {len(data)} bytes; dtype {dt} and shape {shape} need "
                            f"{n * dtype.itemsize}")
    arr = np.frombuffer(data, dtype=dtype).reshape(tuple(shape))
    return arr.astype(dtype.newbyteorder("="), copy=True)     # native byte order, writable, owns its memory


def _object_hook(d: dict):
    if "__nd__" in d:
        return _decode_array(d)
    return d


def _ext_hook(code, data):
    raise ProtocolError(f"msgpack extension type {code} is not accepted")


def unpack(data: bytes) -> Any:
    """Decode msgpack bytes made by `pack`. Raises ProtocolError on anything malformed (truncated data, trailing
    bytes, extension types, arrays of non-numeric dtypes or inconsistent sizes)."""
    import msgpack

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected bytes, got {type(data).__name__}")
    try:
        return msgpack.unpackb(data, raw=False, object_hook=_object_hook, ext_hook=_ext_hook, strict_map_key=True,
                               use_list=True)
    except ProtocolError:
        raise
    except Exception as e:      # msgpack raises several types (ExtraData, FormatError, StackError, ValueError, ...)
        raise ProtocolError(f"not valid msgpack ({type(e).__name__}: {e})") from e


# ============================================================================================== validation
class RequestError(ValueError):
    """A request the server refuses before the policy is touched; its message is the error reply."""


def _is_tensor(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "is_floating_point")


def _fmt(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _check_array(name: str, x, shape: tuple, kind: str, batch: int | None) -> int:
    """Check `x` (numpy array or torch tensor) against `shape` ("B" = the batch, fixed by the first array checked)
    and kind ('float' or 'int'); returns the batch."""
    if not isinstance(x, np.ndarray) and not _is_tensor(x):
        raise RequestError(f"{name} must be an array, got {type(x).__name__}")
    got = tuple(int(s) for s in x.shape)
    want = tuple(batch if s == "B" and batch is not None else s for s in shape)
    if len(got) != len(want) or any(w != "B" and w != g for w, g in zip(want, got)):
        raise RequestError(f"{name} has shape {_fmt(got)}, expected {_fmt(want)}"
                           + (" (B = the batch of the reset)" if "B" in shape and batch is not None else ""))
    if "B" in shape:
        b = got[shape.index("B")]
        if b < 1:
            raise RequestError(f"{name} has an empty batch")
        batch = b
    if _is_tensor(x):
        is_float = x.is_floating_point()
        is_int = not is_float and not x.is_complex() and str(x.dtype) != "torch.bool"
        dtype_name = str(x.dtype)
    else:
        is_float, is_int, dtype_name = x.dtype.kind == "f", x.dtype.kind in "iu", str(x.dtype)
    if kind == "float":
        if not is_float:
            raise RequestError(f"{name} must be a float array (float16/32/64), got {dtype_name}")
        finite = bool(x.isfinite().all()) if _is_tensor(x) else bool(np.isfinite(x).all())
        if not finite:
            raise RequestError(f"{name} holds NaN or Inf values")
    elif not is_int:
        raise RequestError(f"{name} must be an integer array, got {dtype_name}")
    return batch


def request_shapes(cfg) -> dict:
    """The array shapes of the protocol for a model config ("B" = batch)."""
    H, W = cfg.latent_height, cfg.latent_width
    return {
        "text": ["B", cfg.text_len, cfg.text_dim],
        "negative_text": ["B", cfg.text_len, cfg.text_dim],
        "clip": ["B", cfg.clip_tokens, cfg.clip_dim],
        "first_latent": ["B", cfg.latent_channels, 1, H, W],
        "cond": ["B", cfg.cond_channels, cfg.local_attn_size, H, W],
        "embodiment": ["B"],
        "observation": ["B", cfg.latent_channels, cfg.frames_per_chunk, H, W],
        "state": ["B", cfg.states_per_chunk, cfg.state_dim],
        "actions": ["B", cfg.actions_per_chunk, cfg.action_dim],
        "video": ["B", cfg.latent_channels, cfg.frames_per_chunk, H, W],
    }


def _check_fields(kind: str, msg: dict, allowed: tuple) -> None:
    unknown = sorted(k for k in msg if k not in allowed and k not in _ENVELOPE)
    if unknown:
        raise RequestError(f"{kind}: unknown field(s) {unknown}; allowed: {list(allowed)}")


def validate_reset(msg: dict, cfg) -> dict:
    """Check a reset request against the model config; returns {"batch", field: array} for the present fields."""
    _check_fields("reset", msg, RESET_FIELDS)
    shapes = request_shapes(cfg)
    for name in ("text", "clip", "first_latent"):
        if msg.get(name) is None:
            raise RequestError(f"reset: missing field {name!r} (shape {_fmt(shapes[name])})")
    out, batch = {}, None
    for name in ("text", "clip", "first_latent", "negative_text", "cond"):
        if msg.get(name) is not None:
            batch = _check_array(f"reset: {name}", msg[name], tuple(shapes[name]), "float", batch)
            out[name] = msg[name]
    emb = msg.get("embodiment")
    if emb is None:
        if cfg.num_embodiments != 1:
            raise RequestError(f"reset: the model has {cfg.num_embodiments} embodiment slots: send 'embodiment' "
                               f"(an int or an int array [B])")
    else:
        if isinstance(emb, bool) or not isinstance(emb, (int, np.ndarray)) and not _is_tensor(emb):
            raise RequestError(f"reset: embodiment must be an int or an int array [B], got {type(emb).__name__}")
        if isinstance(emb, int):
            emb = np.full((batch,), emb, dtype=np.int64)
        _check_array("reset: embodiment", emb, ("B",), "int", batch)
        lo, hi = int(emb.min()), int(emb.max())
        if lo < 0 or hi >= cfg.num_embodiments:
            raise RequestError(f"reset: embodiment ids must be in [0, {cfg.num_embodiments}), got {emb.tolist()}")
        out["embodiment"] = emb
    out["batch"] = batch
    return out


def validate_step(msg: dict, cfg) -> dict:
    """Check a step request against the model config (the batch against the reset is checked on the worker)."""
    _check_fields("step", msg, STEP_FIELDS)
    shapes = request_shapes(cfg)
    if msg.get("state") is None:
        raise RequestError(f"step: missing field 'state' (shape {_fmt(shapes['state'])})")
    batch = _check_array("step: state", msg["state"], tuple(shapes["state"]), "float", None)
    out = {"state": msg["state"], "observation": None, "batch": batch}
    if msg.get("observation") is not None:
        _check_array("step: observation", msg["observation"], tuple(shapes["observation"]), "float", batch)
        out["observation"] = msg["observation"]
    return out


def _to_tensor(x):
    import torch

    return x if _is_tensor(x) else torch.from_numpy(x if x.flags.c_contiguous else x.copy(order="C"))


# ============================================================================================== metrics
class LatencyStats:
    """count, mean and max over every sample; p50 and p90 over the last `window` samples (milliseconds)."""

    def __init__(self, window: int = 1024):
        self.count, self.total, self.max = 0, 0.0, 0.0
        self.recent: collections.deque = collections.deque(maxlen=window)

    def add(self, ms: float) -> None:
        self.count += 1
        self.total += ms
        self.max = max(self.max, ms)
        self.recent.append(ms)

    def summary(self) -> dict:
        if not self.count:
            return {"count": 0, "mean_ms": None, "p50_ms": None, "p90_ms": None, "max_ms": None}
        r = np.asarray(self.recent, dtype=np.float64)
        return {"count": self.count, "mean_ms": self.total / self.count, "p50_ms": float(np.percentile(r, 50)),
                "p90_ms": float(np.percentile(r, 90)), "max_ms": self.max}


# ============================================================================================== server
def _websockets_serve():
    """websockets' server entry point: the asyncio API (websockets >= 13) when present, else the legacy one (12)."""
    try:
        from websockets.asyncio.server import serve
        return serve
    except ImportError:
        try:
            import websockets
        except ImportError as e:
            raise ImportError("the policy server needs `websockets` and `msgpack`: "
                              "pip install 'dz-kernels[serve]'") from e
        return websockets.serve


class PolicyServer:
    """Serve `policy` (a dreamzero.engine.Policy, or any object with its `cfg`, `config`, `reset` and `step`) over a
    websocket.

    host/port: where to listen (127.0.0.1 by default; port 0 picks a free port, see `port` after start).
    max_message_bytes: larger messages get an error reply. hard_limit_bytes: larger ones are not read; the
    connection is closed with code 1009 (default 2 x max_message_bytes). max_pending: reset/step requests queued or
    running at once; more get a "busy" error reply. encode: optional raw-input hook (see the module docstring).

    Use from asyncio (`await start()`, `await stop()`, `await serve_forever()`) or from plain code
    (`start_background()` / `stop_background()`, or `with PolicyServer(...) as server:`). A stopped server can be
    started again; the policy and its episode are kept.
    """

    def __init__(self, policy, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, hard_limit_bytes: int | None = None,
                 max_pending: int = DEFAULT_MAX_PENDING, encode: Callable[[str, dict], dict] | None = None,
                 model_name: str | None = None):
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        if max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {max_message_bytes}")
        hard = 2 * max_message_bytes if hard_limit_bytes is None else hard_limit_bytes
        if hard < max_message_bytes:
            raise ValueError(f"hard_limit_bytes ({hard}) must be >= max_message_bytes ({max_message_bytes})")
        if encode is not None and not callable(encode):
            raise TypeError("encode must be a callable encode(kind, message) -> dict")
        self.policy, self.cfg = policy, policy.cfg
        self.host, self.port = host, port
        self.max_message_bytes, self.hard_limit_bytes, self.max_pending = max_message_bytes, hard, max_pending
        self.encode = encode
        self.model_name = model_name or getattr(self.cfg, "name", "custom")
        # worker-side episode state (touched only on the worker thread)
        self._batch: int | None = None
        self._expect_observation = False
        self._broken: str | None = None
        # loop-side state
        self.latency, self.compute = LatencyStats(), LatencyStats()
        self.counters = {"requests": 0, "errors": 0, "busy": 0, "connections": 0, "disconnected_mid_request": 0}
        self._pending = 0
        self._open_connections = 0
        self._started_at = time.time()
        self._server = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._stop_event: asyncio.Event | None = None
        self._shutdown_task: asyncio.Task | None = None
        self._tasks: set = set()
        self._thread: threading.Thread | None = None
        import torch
        self._torch_threads = torch.get_num_threads()

    # ------------------------------------------------------------------ lifecycle (asyncio)
    async def start(self) -> int:
        """Listen; returns the bound port."""
        if self._server is not None:
            raise RuntimeError("the server is already running")
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._shutdown_task = None
        import torch
        # the worker runs with the intra-op thread count of the thread that built the server (a new thread would
        # take torch's default, and a different count changes float reduction order: results would not be
        # bit-identical to the same policy run directly)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dz-serve-policy",
                                                               initializer=torch.set_num_threads,
                                                               initargs=(self._torch_threads,))
        serve = _websockets_serve()
        try:
            self._server = await serve(self._handler, self.host, self.port, max_size=self.hard_limit_bytes,
                                       max_queue=4, compression=None)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        self._started_at = time.time()
        log.info("listening on %s", self.url)
        return self.port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    def request_stop(self) -> None:
        """Ask the server to stop (thread-safe; returns at once)."""
        loop, ev = self._loop, self._stop_event
        if loop is None or ev is None or loop.is_closed():
            return
        try:
            if asyncio.get_running_loop() is loop:
                ev.set()
                return
        except RuntimeError:
            pass
        loop.call_soon_threadsafe(ev.set)

    async def wait_closed(self) -> None:
        """Wait until request_stop() (or stop()), then shut down."""
        if self._stop_event is None:
            raise RuntimeError("the server was never started")
        await self._stop_event.wait()
        await self._shutdown()

    async def serve_forever(self) -> None:
        await self.start()
        await self.wait_closed()

    async def stop(self) -> None:
        """Stop listening, close the connections, let the worker finish what it was given."""
        if self._stop_event is None:
            return
        self._stop_event.set()
        await self._shutdown()

    def _shutdown(self):
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.ensure_future(self._do_shutdown())
        return asyncio.shield(self._shutdown_task)

    async def _do_shutdown(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        # requests already handed to the worker finish (the policy is never left mid-step); their replies are dropped
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown, True)
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        log.info("stopped")

    # ------------------------------------------------------------------ lifecycle (threads)
    def start_background(self, timeout: float = 30.0) -> int:
        """Run the server on its own event loop in a daemon thread; returns the bound port."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("the server is already running")
        ready, box = threading.Event(), {}

        def run():
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                try:
                    loop.run_until_complete(self.start())
                except BaseException as e:      # noqa: BLE001 -- handed to the caller
                    box["error"] = e
                    return
                finally:
                    ready.set()
                loop.run_until_complete(self.wait_closed())
            finally:
                loop.run_until_complete(loop.shutdown_default_executor())
                loop.close()

        self._thread = threading.Thread(target=run, name="dz-serve-loop", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"the server did not start within {timeout} s")
        if "error" in box:
            self._thread.join()
            raise box["error"]
        return self.port

    def stop_background(self, timeout: float = 60.0) -> None:
        """Stop a server started with start_background and wait for it (the running request finishes first)."""
        if self._thread is None:
            return
        self.request_stop()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the server did not stop within {timeout} s")
        self._thread = None

    def __enter__(self):
        self.start_background()
        return self

    def __exit__(self, *exc):
        self.stop_background()

    # ------------------------------------------------------------------ connections
    async def _handler(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed

        self.counters["connections"] += 1
        self._open_connections += 1
        try:
            async for raw in ws:
                t_recv = time.perf_counter()
                try:
                    reply = self._dispatch(ws, raw, t_recv)
                except Exception as e:      # a bug here must not end the connection, let alone the server
                    log.exception("dispatch failed")
                    reply = self._error(f"internal server error ({type(e).__name__}): {e}")
                if reply is not None:
                    await ws.send(pack(reply))
        except ConnectionClosed:
            pass
        except Exception:       # never let one connection take the server down
            log.exception("connection handler failed")
        finally:
            self._open_connections -= 1

    def _error(self, text: str, msg_type=None, rid=None) -> dict:
        self.counters["errors"] += 1
        return {"type": "error", "error": text, "request_type": msg_type, "id": rid}

    def _dispatch(self, ws, raw, t_recv: float) -> dict | None:
        """Decode and check one message on the event loop (no awaits: requests reach the worker in arrival order).
        Returns an immediate reply, or None when the request went to the worker."""
        self.counters["requests"] += 1
        if isinstance(raw, str):
            return self._error("expected a binary websocket message holding msgpack, got a text message")
        if len(raw) > self.max_message_bytes:
            return self._error(f"message of {len(raw)} bytes exceeds the server's limit of {self.max_message_bytes} "
                               "bytes (max_message_bytes)")
        try:
            msg = unpack(raw)
        except ProtocolError as e:
            return self._error(f"malformed message: {e}")
        if not isinstance(msg, dict):
            return self._error(f"a message must be a msgpack map with a 'type' field, got {type(msg).__name__}")
        rid = msg.get("id")
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (int, str))):
            return self._error("'id' must be an int or a str")
        kind = msg.get("type")
        if kind not in MESSAGE_TYPES:
            what = "missing 'type' field" if kind is None else f"unknown message type {kind!r}"
            return self._error(f"{what}; expected one of {list(MESSAGE_TYPES)}", None, rid)
        if kind == "health":
            return {**self.health(), "id": rid}
        if kind == "metadata":
            return {**self.metadata(), "id": rid}
        raw_fields = [k for k in RAW_FIELDS[kind] if k in msg]
        try:
            if raw_fields:
                if self.encode is None:
                    raise RequestError(f"{kind}: raw field(s) {raw_fields} need a server started with an encoder; "
                                       "this one takes features (see the metadata's 'shapes')")
                checked = None      # encoded and validated on the worker
            else:
                checked = (validate_reset if kind == "reset" else validate_step)(msg, self.cfg)
        except RequestError as e:
            return self._error(str(e), kind, rid)
        if self._pending >= self.max_pending:
            self.counters["busy"] += 1
            return self._error(f"busy: {self._pending} request(s) pending (max_pending={self.max_pending}); "
                               "retry later", kind, rid)
        if self._executor is None:
            return self._error("the server is shutting down", kind, rid)
        self._pending += 1
        fut = self._executor.submit(self._work, kind, msg, checked)
        task = asyncio.ensure_future(self._complete(ws, kind, rid, fut, t_recv))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return None

    async def _complete(self, ws, kind: str, rid, fut, t_recv: float) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            try:
                reply = await asyncio.wrap_future(fut)
            finally:
                self._pending -= 1
        except RequestError as e:
            reply = self._error(str(e), kind, rid)
        except Exception as e:      # the policy or the encoder failed
            log.exception("%s failed", kind)
            reply = self._error(f"{kind} failed ({type(e).__name__}): {e}", kind, rid)
        else:
            if kind == "step":
                latency = (time.perf_counter() - t_recv) * 1e3
                reply["latency_ms"] = latency
                self.latency.add(latency)
                self.compute.add(reply.pop("_compute_ms"))
            reply["id"] = rid
        try:
            await ws.send(pack(reply))
        except ConnectionClosed:
            self.counters["disconnected_mid_request"] += 1
            log.info("a client disconnected before its %s reply", kind)
        except Exception:
            log.exception("could not send the %s reply", kind)

    # ------------------------------------------------------------------ the worker
    def _work(self, kind: str, msg: dict, checked: dict | None) -> dict:
        """Runs on the single worker thread: encode (when raw), validate, then reset or step the policy."""
        if checked is None:
            checked = self._encode(kind, msg)
        return self._reset(checked) if kind == "reset" else self._step(checked)

    def _encode(self, kind: str, msg: dict) -> dict:
        feats = self.encode(kind, msg)
        if not isinstance(feats, dict):
            raise RequestError(f"{kind}: the server's encoder returned {type(feats).__name__}, not a dict")
        merged = {k: v for k, v in msg.items() if k not in RAW_FIELDS[kind]}
        merged.update(feats)
        try:
            return (validate_reset if kind == "reset" else validate_step)(merged, self.cfg)
        except RequestError as e:
            raise RequestError(f"after encoding: {e}") from None

    def _reset(self, c: dict) -> dict:
        import torch

        self._batch = None
        emb = c.get("embodiment")
        self.policy.reset(_to_tensor(c["text"]), _to_tensor(c["clip"]), _to_tensor(c["first_latent"]),
                          negative_text=None if c.get("negative_text") is None else _to_tensor(c["negative_text"]),
                          cond=None if c.get("cond") is None else _to_tensor(c["cond"]),
                          embodiment=None if emb is None else _to_tensor(emb).to(torch.int64))
        self._batch, self._expect_observation, self._broken = c["batch"], False, None
        return {"type": "reset", "ok": True, "batch": c["batch"]}

    def _step(self, c: dict) -> dict:
        if self._broken:
            raise RequestError(f"step: {self._broken}; send a reset")
        if self._batch is None:
            raise RequestError("step: no episode: send a reset first")
        if c["batch"] != self._batch:
            raise RequestError(f"step: batch {c['batch']} does not match the reset's batch {self._batch}")
        if self._expect_observation and c["observation"] is None:
            raise RequestError("step: 'observation' is required (the latent frames observed since the last step, "
                               f"shape {_fmt(request_shapes(self.cfg)['observation'])})")
        if not self._expect_observation and c["observation"] is not None:
            raise RequestError("step: the first step after a reset takes no observation (the first frame came with "
                               "the reset)")
        obs = None if c["observation"] is None else _to_tensor(c["observation"])
        t0 = time.perf_counter()
        try:
            res = self.policy.step(obs, _to_tensor(c["state"]))
        except Exception:
            self._broken = "the policy failed during the previous step"
            raise
        compute_ms = (time.perf_counter() - t0) * 1e3
        self._expect_observation = True
        reply = {"type": "actions", "actions": np.asarray(res.actions), "chunk": int(res.chunk),
                 "dit_steps": int(res.dit_steps), "timings_ms": {k: float(v) for k, v in res.timings_ms.items()},
                 "_compute_ms": compute_ms}
        if getattr(res, "video", None) is not None:
            reply["video"] = res.video.detach().float().cpu().numpy()
        return reply

    # ------------------------------------------------------------------ health / metadata
    def metrics(self) -> dict:
        return {"step_latency": self.latency.summary(), "step_compute": self.compute.summary(), **self.counters}

    def health(self) -> dict:
        return {"type": "health", "ok": True, "protocol": PROTOCOL_VERSION, "model": self.model_name,
                "uptime_s": time.time() - self._started_at, "pending": self._pending, "max_pending": self.max_pending,
                "open_connections": self._open_connections,
                "episode": {"active": self._batch is not None and not self._broken, "batch": self._batch,
                            "chunk": getattr(self.policy, "chunk", None)},
                "metrics": self.metrics()}

    def metadata(self) -> dict:
        cfg, pc = self.cfg, getattr(self.policy, "config", None)
        shapes = request_shapes(cfg)
        if not (pc is not None and getattr(pc, "return_video", False)):
            shapes.pop("video")
        meta = {"type": "metadata", "protocol": PROTOCOL_VERSION, "model": self.model_name,
                "model_config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {},
                "policy_config": dataclasses.asdict(pc) if dataclasses.is_dataclass(pc) else {},
                "device": str(getattr(self.policy, "device", "")), "dtype": str(getattr(self.policy, "dtype", "")),
                "shapes": shapes,
                "dtypes": {"features": ["float16", "float32", "float64"], "embodiment": "integer",
                           "actions": "float32"},
                "num_embodiments": cfg.num_embodiments, "embodiment_required": cfg.num_embodiments != 1,
                "max_message_bytes": self.max_message_bytes, "hard_limit_bytes": self.hard_limit_bytes,
                "max_pending": self.max_pending, "encode": self.encode is not None,
                "raw_fields": {k: list(v) for k, v in RAW_FIELDS.items()} if self.encode is not None else None,
                "metrics": self.metrics()}
        return meta


# ============================================================================================== client
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


def random_request_arrays(meta: dict, batch: int, rng: np.random.Generator) -> dict:
    """Random float32 arrays of the shapes a server's metadata asks for, with the batch filled in: text, clip,
    first_latent, observation, state (and embodiment ids 0 when the model needs them)."""
    def make(name):
        shape = [batch if s == "B" else int(s) for s in meta["shapes"][name]]
        return rng.standard_normal(shape).astype(np.float32)

    out = {name: make(name) for name in ("text", "clip", "first_latent", "observation", "state")}
    if meta.get("embodiment_required"):
        out["embodiment"] = np.zeros(batch, dtype=np.int64)
    return out


def run_demo(client: PolicyClient, chunks: int = 3, batch: int = 1, seed: int = 0, out=print) -> list:
    """The demo episode: metadata, a reset with random features of the right shapes, then `chunks` steps (the
    first without an observation). Prints actions and latency; returns the step replies."""
    meta = client.metadata()
    out(f"server: model {meta['model']} on {meta['device']} ({meta['dtype']}), "
        f"{meta['policy_config'].get('num_steps', '?')} denoising step(s), "
        f"cfg {meta['policy_config'].get('cfg_mode', '?')}, actions {meta['shapes']['actions']}")
    rng = np.random.default_rng(seed)
    arr = random_request_arrays(meta, batch, rng)
    t0 = time.perf_counter()
    client.reset(arr["text"], arr["clip"], arr["first_latent"], embodiment=arr.get("embodiment"))
    out(f"reset: batch {batch}, {(time.perf_counter() - t0) * 1e3:.1f} ms round trip")
    replies = []
    for i in range(chunks):
        obs = None if i == 0 else rng.standard_normal(arr["observation"].shape).astype(np.float32)
        state = rng.standard_normal(arr["state"].shape).astype(np.float32)
        t0 = time.perf_counter()
        r = client.step(obs, state)
        rtt = (time.perf_counter() - t0) * 1e3
        a = r["actions"]
        out(f"step {i}: chunk {r['chunk']}, actions {list(a.shape)} {a.dtype}, round trip {rtt:.1f} ms, "
            f"server {r['latency_ms']:.1f} ms (policy {r['timings_ms'].get('total_ms', float('nan')):.1f} ms)")
        out("  actions[0, 0] = " + np.array2string(a[0, 0], precision=4, suppress_small=True, max_line_width=120))
        replies.append(r)
    lat = client.health()["metrics"]["step_latency"]
    out("server step latency: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in lat.items()))
    return replies


# ============================================================================================== commands
def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_policy(args) -> tuple:
    """The model and Policy a `dz serve` command line asks for; returns (policy, model_name)."""
    import torch

    from .config import get_config
    from .engine import Policy, PolicyConfig

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _torch_dtype(args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"dz serve: --device {device}, but this machine has no CUDA device")
    kw = dict(num_steps=args.steps, cfg_mode=args.cfg_mode, dit_cache=args.dit_cache, actions_only=args.actions_only,
              return_video=args.return_video, fused_control=args.fused_control, sampler=args.sampler,
              smooth=not args.no_smooth, compile=args.compile)
    if args.noise_seed is not None:
        kw["seed"] = args.noise_seed
    try:
        pc = PolicyConfig(**kw)
    except ValueError as e:
        raise SystemExit(f"dz serve: {e}") from e
    cfg = get_config(args.config)
    if args.checkpoint:
        try:
            from . import checkpoint as ckpt
        except ImportError as e:
            raise SystemExit(f"dz serve: --checkpoint needs dreamzero.checkpoint, which failed to import ({e}); "
                             "use --random-weights") from e
        if not hasattr(ckpt, "load_model"):
            raise SystemExit("dz serve: dreamzero.checkpoint has no load_model(); use --random-weights")
        try:
            model = ckpt.load_model(cfg, args.checkpoint, args.checkpoint_layout, dtype=dtype, device=device,
                                    allow_missing_heads=args.allow_missing_heads)
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"dz serve: cannot load checkpoint {args.checkpoint!r}: {e}") from e
    else:
        from .dreamzero import DreamZero

        torch.manual_seed(args.weight_seed)
        with torch.device(device):
            model = DreamZero(cfg)
        model = model.to(dtype)
    model.eval()
    return Policy(model, pc), cfg.name


def serve_parser() -> argparse.ArgumentParser:
    from .config import config_names

    p = argparse.ArgumentParser(prog="dz serve", description="Serve a DreamZero policy over a websocket (msgpack).")
    src = p.add_argument_group("weights (one of)")
    src.add_argument("--random-weights", action="store_true", help="random weights (seeded by --weight-seed)")
    src.add_argument("--checkpoint", metavar="PATH", help="safetensors checkpoint (dreamzero.checkpoint.load_model)")
    p.add_argument("--config", default="tiny", choices=config_names(), help="model config (default tiny)")
    p.add_argument("--checkpoint-layout", default=None, choices=["dreamzero", "wan", "diffusers"],
                   help="key layout of the checkpoint (default: detected)")
    p.add_argument("--allow-missing-heads", action="store_true",
                   help="a checkpoint without the DreamZero heads (the Wan release) loads with initialized heads")
    p.add_argument("--weight-seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free)")
    pol = p.add_argument_group("policy (dreamzero.engine.PolicyConfig)")
    pol.add_argument("--steps", type=int, default=16, help="denoising steps (16 = the release, 1 = Flash)")
    pol.add_argument("--cfg-mode", default="sequential", choices=["sequential", "batched"],
                     help="classifier-free guidance: two forwards or one batched forward")
    pol.add_argument("--dit-cache", default="off", choices=["off", "static", "dynamic"])
    pol.add_argument("--actions-only", action="store_true", help="skip the unconditional branch (with --steps 1)")
    pol.add_argument("--return-video", action="store_true", help="also return the predicted video latents")
    pol.add_argument("--fused-control", action="store_true", help="replacement pass + first step in one forward")
    pol.add_argument("--sampler", default="unipc", choices=["unipc", "euler"])
    pol.add_argument("--noise-seed", type=int, default=None, help="seed of the sampler noise (default: the policy's)")
    pol.add_argument("--no-smooth", action="store_true", help="return the raw action chunk (no smoothing)")
    pol.add_argument("--compile", default=None, help="torch.compile backend per DiT block (inductor, ...)")
    srv = p.add_argument_group("server")
    srv.add_argument("--max-pending", type=int, default=DEFAULT_MAX_PENDING,
                     help="reset/step requests queued or running at once; more get a 'busy' reply")
    srv.add_argument("--max-message-mb", type=float, default=DEFAULT_MAX_MESSAGE_BYTES / 2**20,
                     help="larger messages get an error reply (twice this closes the connection)")
    srv.add_argument("-v", "--verbose", action="store_true", help="log every connection event")
    return p


def serve_main(argv: list[str]) -> int:
    """`dz serve`: build the policy, listen, serve until SIGINT/SIGTERM."""
    parser = serve_parser()
    args = parser.parse_args(argv)
    if args.random_weights == bool(args.checkpoint):
        parser.error("give exactly one of --random-weights and --checkpoint PATH")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.max_pending < 1:
        parser.error("--max-pending must be >= 1")
    if args.actions_only and args.return_video:
        parser.error("--actions-only skips the unconditional branch, so it cannot --return-video")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    policy, name = build_policy(args)
    server = PolicyServer(policy, host=args.host, port=args.port, max_pending=args.max_pending,
                          max_message_bytes=int(args.max_message_mb * 2**20), model_name=name)

    async def run():
        await server.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, server.request_stop)
            except (NotImplementedError, RuntimeError):     # not the main thread, or no signals here
                pass
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"dz serve: WARNING: bound to {args.host}: anyone who can reach it can drive the policy "
                  "(no authentication)", file=sys.stderr, flush=True)
        print(f"dz serve: {name} on {policy.device} ({policy.dtype}), {args.steps} step(s); listening on "
              f"{server.url}", flush=True)
        await server.wait_closed()

    asyncio.run(run())
    print("dz serve: stopped", flush=True)
    return 0


def client_main(argv: list[str]) -> int:
    """`dz client`: print the server's health and metadata, or run the demo episode (--demo)."""
    p = argparse.ArgumentParser(prog="dz client", description="Talk to a DreamZero policy server.")
    p.add_argument("--url", default=f"ws://{DEFAULT_HOST}:{DEFAULT_PORT}", help="server URL")
    p.add_argument("--demo", action="store_true",
                   help="reset with random features of the right shapes, then a few steps; print actions and latency")
    p.add_argument("--chunks", type=int, default=3, help="demo steps (action chunks)")
    p.add_argument("--batch", type=int, default=1, help="demo batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo's random features")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for a reply")
    args = p.parse_args(argv)
    if args.chunks < 1 or args.batch < 1:
        p.error("--chunks and --batch must be >= 1")
    try:
        client = PolicyClient(args.url, timeout=args.timeout)
    except (OSError, TimeoutError) as e:
        print(f"dz client: cannot connect to {args.url}: {e}", file=sys.stderr)
        return 1
    with client:
        try:
            if args.demo:
                run_demo(client, args.chunks, args.batch, args.seed)
            else:
                meta = client.metadata()
                print(json.dumps({"health": client.health(), "metadata": meta}, indent=1, default=str))
        except ServerError as e:
            print(f"dz client: the server refused: {e}", file=sys.stderr)
            return 1
    return 0
