"""The policy server: a DreamZero `Policy` behind a websocket, speaking the protocol of `dreamzero.serve.protocol`.

Robustness. A malformed message (not msgpack, not a map, unknown type, missing or unknown field, wrong shape or
dtype, NaN, a value beyond what the model's dtype carries) gets an error reply and the connection stays open; an
error reply holds at most protocol.MAX_ERROR_CHARS characters of detail, whatever the request. A message larger
than `max_message_bytes` gets an error reply; one larger than `hard_limit_bytes` (websockets' max_size, default
2 x max_message_bytes) is not read at all: the connection is closed with code 1009 (message too big) and a reason.
A client that disconnects while its request runs does not disturb the server: the request completes (the policy
state advances) and the reply is dropped.

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

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Callable

import numpy as np

from .protocol import (DEFAULT_HOST, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_PENDING, DEFAULT_PORT, MAX_ID_CHARS,
                       MESSAGE_TYPES, PROTOCOL_VERSION, RAW_FIELDS, ProtocolError, RequestError, bounded, fmt_shape,
                       is_tensor, pack, request_shapes, short_repr, unpack, validate_reset, validate_step,
                       value_limit)

log = logging.getLogger("dreamzero.serve")


def _to_tensor(x):
    import torch

    return x if is_tensor(x) else torch.from_numpy(x if x.flags.c_contiguous else x.copy(order="C"))


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
                 model_name: str | None = None, max_abs: float | None = None):
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
        if max_abs is None:
            try:
                max_abs = value_limit(getattr(policy, "dtype", "float32"))
            except ValueError as e:
                raise ValueError(f"{e}: pass max_abs= (the largest feature magnitude to accept)") from None
        self.max_abs = float(max_abs)
        if not self.max_abs > 0:
            raise ValueError(f"max_abs must be > 0, got {max_abs}")
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
        """One connection: `_open` it, then answer each message with `_reply` (None: the reply comes later, from a
        worker). The protocol's hooks are `_open`, `_reply` and `_internal_error`; the loop is shared."""
        from websockets.exceptions import ConnectionClosed

        self.counters["connections"] += 1
        self._open_connections += 1
        try:
            conn = await self._open(ws)
            async for raw in ws:
                t_recv = time.perf_counter()
                try:
                    reply = self._reply(ws, raw, t_recv, conn)
                except Exception as e:      # a bug here must not end the connection, let alone the server
                    log.exception("dispatch failed")
                    reply = self._internal_error(f"internal server error ({type(e).__name__}): {e}")
                if reply is not None:
                    await ws.send(reply)
        except ConnectionClosed:
            pass
        except Exception:       # never let one connection take the server down
            log.exception("connection handler failed")
        finally:
            self._open_connections -= 1

    async def _open(self, ws):
        """A new connection's state, passed to every `_reply` of it (this protocol keeps none)."""
        return None

    def _reply(self, ws, raw, t_recv: float, conn):
        """The immediate reply to one message, encoded for the wire, or None."""
        reply = self._dispatch(ws, raw, t_recv)
        return None if reply is None else pack(reply)

    def _internal_error(self, text: str):
        """The encoded reply to a message whose handling raised."""
        return pack(self._error(text))

    def _error(self, text: str, msg_type=None, rid=None) -> dict:
        """An error reply: its detail cut to protocol.MAX_ERROR_CHARS; msg_type and rid were checked (a known type,
        an int or a short str), so the reply stays small whatever the request held."""
        self.counters["errors"] += 1
        return {"type": "error", "error": bounded(text), "request_type": msg_type, "id": rid}

    def _dispatch(self, ws, raw, t_recv: float) -> dict | None:
        """Decode and check one message on the event loop (no awaits: requests reach the worker in arrival order).
        Returns an immediate reply, or None when the request went to the worker."""
        self.counters["requests"] += 1
        problem = self._frame_problem(raw)
        if problem:
            return self._error(problem)
        try:
            msg = unpack(raw)
        except ProtocolError as e:
            return self._error(f"malformed message: {e}")
        if not isinstance(msg, dict):
            return self._error(f"a message must be a msgpack map with a 'type' field, got {type(msg).__name__}")
        rid = msg.get("id")
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (int, str))):
            return self._error("'id' must be an int or a str")
        if isinstance(rid, str) and len(rid) > MAX_ID_CHARS:
            return self._error(f"'id' must be at most {MAX_ID_CHARS} characters, got {len(rid)}")
        kind = msg.get("type")
        if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
            what = "missing 'type' field" if kind is None else f"unknown message type {short_repr(kind)}"
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
                checked = (validate_reset if kind == "reset" else validate_step)(msg, self.cfg, self.max_abs)
        except RequestError as e:
            return self._error(str(e), kind, rid)
        problem = self._queue_problem()
        if problem:
            return self._error(problem, kind, rid)
        self._submit(self._work, (kind, msg, checked), lambda fut: self._complete(ws, kind, rid, fut, t_recv))
        return None

    # shared with the openpi server (dreamzero.serve.openpi_server)
    def _frame_problem(self, raw) -> str | None:
        """Why a websocket message cannot be a request (a text message, or over max_message_bytes), or None."""
        if isinstance(raw, str):
            return "expected a binary websocket message holding msgpack, got a text message"
        if len(raw) > self.max_message_bytes:
            return (f"message of {len(raw)} bytes exceeds the server's limit of {self.max_message_bytes} bytes "
                    "(max_message_bytes)")
        return None

    def _queue_problem(self) -> str | None:
        """Why no request can be queued now (max_pending reached, shutting down), or None."""
        if self._pending >= self.max_pending:
            self.counters["busy"] += 1
            return f"busy: {self._pending} request(s) pending (max_pending={self.max_pending}); retry later"
        if self._executor is None:
            return "the server is shutting down"
        return None

    def _submit(self, fn, args: tuple, complete) -> None:
        """Run fn(*args) on the worker thread; complete(future) (a coroutine) replies when it is done."""
        self._pending += 1
        task = asyncio.ensure_future(complete(self._executor.submit(fn, *args)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, ws, data, kind: str) -> None:
        """Send a worker's reply; a client gone before its reply is counted, not an error."""
        from websockets.exceptions import ConnectionClosed

        try:
            await ws.send(data)
        except ConnectionClosed:
            self.counters["disconnected_mid_request"] += 1
            log.info("a client disconnected before its %s reply", kind)
        except Exception:
            log.exception("could not send the %s reply", kind)

    async def _complete(self, ws, kind: str, rid, fut, t_recv: float) -> None:
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
        await self._send(ws, pack(reply), kind)

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
            return (validate_reset if kind == "reset" else validate_step)(merged, self.cfg, self.max_abs)
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
                               f"shape {fmt_shape(request_shapes(self.cfg)['observation'])})")
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
                "max_abs": self.max_abs,
                "max_message_bytes": self.max_message_bytes, "hard_limit_bytes": self.hard_limit_bytes,
                "max_pending": self.max_pending, "encode": self.encode is not None,
                "raw_fields": {k: list(v) for k, v in RAW_FIELDS.items()} if self.encode is not None else None,
                "metrics": self.metrics()}
        return meta
