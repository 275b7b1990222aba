"""`dz serve --protocol openpi`: a DreamZero policy for robot clients that speak openpi / RoboArena (the DROID
evaluation clients, openpi-client), raw observations in, absolute joint targets out.

The wire format and request checks are dreamzero.serve.openpi, the observation pipeline dreamzero.serve.droid.
The server is PolicyServer's machinery (one policy, one worker thread, at most max_pending requests queued or
running, message size limits, start/stop from asyncio or threads) with this conversation on each connection:
metadata on connect, then observation maps; RoboArena's {"endpoint": "reset"} ends the episode. Checking happens on
the event loop before the worker sees the request, so a refused request (text reply "error: ...", at most
protocol.MAX_ERROR_CHARS) leaves the episode as it was. Metrics (latency from receipt to reply, compute inside the pipeline)
are the native server's: `metrics()`, and each reply's "server_timing".

    from dreamzero.serve.openpi_server import OpenPIServer
    server = OpenPIServer(RobotPolicy(policy, encoders, load_policy_metadata(ckpt_dir)), port=8000)
    server.start_background()
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time

import numpy as np

from .droid import RobotPolicy
from .openpi import RESET_REPLY, error_text, pack, unpack
from .protocol import ProtocolError, RequestError
from .server import PolicyServer

log = logging.getLogger("dreamzero.serve")


class OpenPIServer(PolicyServer):
    """Serve a RobotPolicy over the openpi / RoboArena websocket protocol (see the module doc). Keyword arguments
    are PolicyServer's (host, port, max_message_bytes, hard_limit_bytes, max_pending, model_name)."""

    def __init__(self, robot: RobotPolicy, *, needs_session_id: bool = True, **kw):
        if "encode" in kw:
            raise TypeError("OpenPIServer takes raw observations through its RobotPolicy, not an encode hook")
        super().__init__(robot.policy, **kw)
        self.robot = robot
        self.server_config = robot.spec.server_config(needs_session_id)
        self._connection_ids = itertools.count(1)

    # ------------------------------------------------------------------ connections
    # (PolicyServer._handler runs the connection with the three hooks below)
    async def _open(self, ws) -> str:
        """openpi's greeting: the server's metadata; the connection's id keys its episodes."""
        conn = str(next(self._connection_ids))
        await ws.send(pack(self.server_config))
        return conn

    def _reply(self, ws, raw, t_recv: float, conn: str):
        return self._dispatch_openpi(ws, raw, t_recv, conn)

    def _internal_error(self, text: str) -> str:
        return self._fail(text)

    def _fail(self, text: str) -> str:
        self.counters["errors"] += 1
        return error_text(text)

    def _dispatch_openpi(self, ws, raw, t_recv: float, conn: str):
        """Decode and check one message on the event loop; returns an immediate reply, or None when the request
        went to the worker (requests reach it in arrival order)."""
        self.counters["requests"] += 1
        problem = self._frame_problem(raw)
        if problem:
            return self._fail(problem)
        try:
            req = self.robot.spec.parse(unpack(raw))
        except ProtocolError as e:
            return self._fail(f"malformed message: {e}")
        except RequestError as e:
            return self._fail(str(e))
        problem = self._queue_problem()
        if problem:
            return self._fail(problem)
        self._submit(self._work_openpi, (req, conn), lambda fut: self._complete_openpi(ws, req.endpoint, fut, t_recv))
        return None

    async def _complete_openpi(self, ws, endpoint: str, fut, t_recv: float) -> None:
        try:
            try:
                out = await asyncio.wrap_future(fut)
            finally:
                self._pending -= 1
        except RequestError as e:
            reply = self._fail(str(e))
        except Exception as e:      # the policy or an encoder failed; the episode has ended (RobotPolicy.infer)
            log.exception("%s failed", endpoint)
            reply = self._fail(f"{endpoint} failed ({type(e).__name__}): {e}; the episode has ended, the next call "
                               "starts a new one")
        else:
            if endpoint == "reset":
                reply = RESET_REPLY
            else:
                compute = out.pop("_compute_ms")
                latency = (time.perf_counter() - t_recv) * 1e3
                self.latency.add(latency)
                self.compute.add(compute)
                actions = out.pop("actions")
                reply = pack({"actions": actions, "action": actions,
                              "server_timing": {"infer_ms": compute, "latency_ms": latency}, **out})
        await self._send(ws, reply, endpoint)

    # ------------------------------------------------------------------ the worker
    def _work_openpi(self, req, conn: str) -> dict:
        if req.endpoint == "reset":
            self.robot.end_episode()
            return {}
        t0 = time.perf_counter()
        out = self.robot.infer(req, conn)
        out["_compute_ms"] = (time.perf_counter() - t0) * 1e3
        out["actions"] = np.ascontiguousarray(out["actions"], dtype=np.float32)
        return out

    # ------------------------------------------------------------------ health / metadata
    def health(self) -> dict:
        h = super().health()
        ep = self.robot.episode
        h["episode"] = {"active": ep is not None, "calls": None if ep is None else ep.calls,
                        "chunk": getattr(self.policy, "chunk", None)}
        h["protocol"] = "openpi"
        return h

    def metadata(self) -> dict:
        m = super().metadata()
        m.update(protocol="openpi", server_config=self.server_config, policy_metadata=self.robot.meta.to_dict())
        return m


# ============================================================================================== `dz serve`
def build_encoders(spec: str, cfg, device, seed: int = 0):
    """The frozen encoders for raw inputs: `spec` a local Wan2.1-I2V *-Diffusers folder (text_encoder/, tokenizer/,
    image_encoder/, vae/; nothing downloaded), or "tiny": random small encoders shaped for `cfg` (tests, demos)."""
    from .. import encoders as enc
    from ..engine import Encoders

    if spec == "tiny":
        e = Encoders(text=enc.TextEncoder.tiny(text_dim=cfg.text_dim, text_len=cfg.text_len, seed=seed),
                     image=enc.ImageEncoder.tiny(clip_dim=cfg.clip_dim, clip_tokens=cfg.clip_tokens, seed=seed),
                     vae=enc.VideoVAE.tiny(z_dim=cfg.latent_channels, seed=seed))
        for m in (e.text, e.image, e.vae):
            m.to(device)
        return e
    return Encoders(text=enc.TextEncoder.from_pretrained(spec, text_len=cfg.text_len, device=device),
                    image=enc.ImageEncoder.from_pretrained(spec, device=device),
                    vae=enc.VideoVAE.from_pretrained(spec, device=device))


def build_openpi_server(args, policy, name: str) -> OpenPIServer:
    """The server a `dz serve --protocol openpi` command line asks for (SystemExit with one line on a mistake)."""
    from .policy_meta import PolicyMetadataError, load_policy_metadata

    source = args.policy_metadata or getattr(args, "export", None) or args.checkpoint
    if source is None:
        raise SystemExit("dz serve: --protocol openpi needs the checkpoint's statistics and transforms: pass "
                         "--policy-metadata PATH (dz_policy.json, or the release's experiment_cfg/metadata.json)")
    if args.encoders is None:
        raise SystemExit("dz serve: --protocol openpi needs --encoders PATH (a local Wan2.1-I2V *-Diffusers folder) "
                         "or --encoders tiny (random, for tests)")
    try:
        meta = load_policy_metadata(source, args.embodiment_tag)
    except PolicyMetadataError as e:
        raise SystemExit(f"dz serve: {e}") from e
    try:
        encoders = build_encoders(args.encoders, policy.cfg, policy.device, seed=args.weight_seed)
    except (OSError, ValueError) as e:
        raise SystemExit(f"dz serve: cannot load the encoders from {args.encoders!r}: {e}") from e
    try:
        robot = RobotPolicy(policy, encoders, meta)
    except ValueError as e:
        raise SystemExit(f"dz serve: the policy metadata ({meta.source or source}) does not fit the model: {e}") from e
    return OpenPIServer(robot, host=args.host, port=args.port, max_pending=args.max_pending,
                        max_message_bytes=int(args.max_message_mb * 2**20), model_name=name)
