"""The `dz serve` and `dz client` commands (wired into `dz` by dreamzero.cli_commands).

    dz serve /runs/x/export                     # an export folder of `dz export`: weights + config (+ statistics)
    dz serve --config droid-14b --checkpoint /ckpt/release --allow-missing-heads
    dz serve --config tiny --random-weights
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import signal
import socket
import sys

from ..cli_support import ArgumentParser, CommandError, command
from .client import PolicyClient, ServerError
from .demo import run_demo
from .protocol import DEFAULT_HOST, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_PENDING, DEFAULT_PORT
from .server import PolicyServer


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_policy(args) -> tuple:
    """The model and Policy a `dz serve` command line asks for; returns (policy, model_name). Ordinary mistakes
    raise CommandError (or the CheckpointError of the loader, which names the file)."""
    import torch

    from ..config import config_names, get_config
    from ..engine import Policy, PolicyConfig

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _torch_dtype(args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError(f"--device {device}, but this machine has no CUDA device: use --device cpu")
    kw = dict(num_steps=args.steps, cfg_mode=args.cfg_mode, dit_cache=args.dit_cache, actions_only=args.actions_only,
              return_video=args.return_video, fused_control=args.fused_control, sampler=args.sampler,
              smooth=not args.no_smooth, compile=args.compile)
    if args.noise_seed is not None:
        kw["seed"] = args.noise_seed
    try:
        pc = PolicyConfig(**kw)
    except ValueError as e:
        raise CommandError(f"{e} (`dz serve --help` lists the policy options)") from e
    path = getattr(args, "export", None) or args.checkpoint
    if path:
        from ..checkpoint import find_export, load_model, read_export, refuse_training_checkpoint

        if not os.path.exists(path):
            raise CommandError(f"{path} does not exist: give an export folder of `dz export` (or a safetensors "
                               f"checkpoint with --config NAME)")
        refuse_training_checkpoint(path)
        info = read_export(path) if find_export(path) is not None else None
        if info is None and args.config is None:
            raise CommandError(f"{path} carries no dz_config.json (it is not a `dz export` folder): say which model "
                               f"it holds with --config, one of {', '.join(config_names())}")
        try:
            model = load_model(args.config, path, args.checkpoint_layout, dtype=dtype, device=device,
                               allow_missing_heads=args.allow_missing_heads)
        except OSError as e:
            raise CommandError(f"cannot read {path}: {e}") from e
        name = args.config or (info.config_name if info is not None else model.cfg.name)
    else:
        from ..dreamzero import DreamZero

        cfg = get_config(args.config or "tiny")
        torch.manual_seed(args.weight_seed)
        with torch.device(device):
            model = DreamZero(cfg)
        model = model.to(dtype)
        name = args.config or cfg.name
    model.eval()
    return Policy(model, pc), name


def serve_parser() -> argparse.ArgumentParser:
    from ..config import config_names

    p = ArgumentParser(prog="dz serve", description="Serve a DreamZero policy over a websocket (msgpack).")
    src = p.add_argument_group("weights (one of)")
    src.add_argument("export", nargs="?", metavar="EXPORT",
                     help="an export folder of `dz export` (weights + dz_config.json): its model config is used")
    src.add_argument("--random-weights", action="store_true", help="random weights (seeded by --weight-seed)")
    src.add_argument("--checkpoint", metavar="PATH",
                     help="an export folder, or any safetensors checkpoint with --config (dreamzero.checkpoint)")
    p.add_argument("--config", default=None, choices=config_names(), metavar="NAME",
                   help=f"model config or preset: {', '.join(config_names())} (default: the export's own; tiny with "
                        "--random-weights)")
    p.add_argument("--protocol", default="native", choices=["native", "openpi"],
                   help="native: this package's feature-level protocol; openpi: the openpi / RoboArena protocol of "
                        "the DROID evaluation clients (raw camera frames and joint states in, joint targets out)")
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
    op = p.add_argument_group("openpi protocol (--protocol openpi)")
    op.add_argument("--encoders", metavar="PATH|tiny",
                    help="frozen umT5/CLIP/VAE: a local Wan2.1-I2V *-Diffusers folder, or 'tiny' (random; tests)")
    op.add_argument("--policy-metadata", metavar="PATH",
                    help="statistics and transforms: dz_policy.json, the release's experiment_cfg/metadata.json, or "
                         "a folder holding one (default: the --checkpoint folder)")
    op.add_argument("--embodiment-tag", default=None, help="embodiment of the release's metadata (default: its only "
                                                           "one, else oxe_droid)")
    srv = p.add_argument_group("server")
    srv.add_argument("--max-pending", type=int, default=DEFAULT_MAX_PENDING,
                     help="reset/step requests queued or running at once; more get a 'busy' reply")
    srv.add_argument("--max-message-mb", type=float, default=DEFAULT_MAX_MESSAGE_BYTES / 2**20,
                     help="larger messages get an error reply (twice this closes the connection)")
    srv.add_argument("-v", "--verbose", action="store_true", help="log every connection event")
    return p


def _check_port_free(host: str, port: int) -> None:
    """Fail before the model is built when the port is taken (the server's own bind says it again, if it races)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return                        # a name that does not resolve: the server's bind reports it
    for family, kind, proto, _, addr in infos[:1]:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise CommandError(_busy(host, port)) from e


def _busy(host: str, port: int) -> str:
    return (f"port {port} on {host} is already in use (another `dz serve`?): stop that server, or pick another "
            f"--port (--port 0 takes any free one)")


@command("dz serve")
def serve_main(argv: list[str]) -> int:
    """`dz serve`: build the policy, listen, serve until SIGINT/SIGTERM."""
    parser = serve_parser()
    args = parser.parse_args(argv)
    if args.export and args.checkpoint:
        parser.error("give the export folder once: as EXPORT or as --checkpoint PATH")
    if args.random_weights == bool(args.export or args.checkpoint):
        parser.error("give exactly one of EXPORT (an export folder), --checkpoint PATH and --random-weights")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.max_pending < 1:
        parser.error("--max-pending must be >= 1")
    if args.actions_only and args.return_video:
        parser.error("--actions-only skips the unconditional branch, so it cannot --return-video")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if args.protocol == "native" and (args.encoders or args.policy_metadata or args.embodiment_tag):
        parser.error("--encoders, --policy-metadata and --embodiment-tag belong to --protocol openpi")
    _check_port_free(args.host, args.port)
    policy, name = build_policy(args)
    if args.protocol == "openpi":
        from .openpi_server import build_openpi_server
        server = build_openpi_server(args, policy, name)
    else:
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
        print(f"dz serve: {name} on {policy.device} ({policy.dtype}), {args.steps} step(s), {args.protocol} protocol; "
              f"listening on {server.url}", flush=True)
        await server.wait_closed()

    try:
        asyncio.run(run())
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise CommandError(_busy(args.host, args.port)) from e
        raise
    print("dz serve: stopped", flush=True)
    return 0


@command("dz client")
def client_main(argv: list[str]) -> int:
    """`dz client`: print the server's health and metadata, or run the demo episode (--demo)."""
    p = ArgumentParser(prog="dz client", description="Talk to a DreamZero policy server.")
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
    scheme, sep, rest = args.url.partition("://")
    if scheme.lower() in ("http", "https") and sep:
        ws = ("wss" if scheme.lower() == "https" else "ws") + "://" + rest
        raise CommandError(f"--url {args.url} is an HTTP URL; the policy server speaks websockets: --url {ws}")
    if scheme.lower() not in ("ws", "wss") or not sep:
        raise CommandError(f"--url {args.url} is not a websocket URL: use ws://HOST:PORT "
                           f"(e.g. ws://{DEFAULT_HOST}:{DEFAULT_PORT})")
    try:
        client = PolicyClient(args.url, timeout=args.timeout)
    except (OSError, TimeoutError) as e:
        raise CommandError(f"cannot connect to {args.url} ({e}): is a server running there? start one with "
                           f"`dz serve <export folder>` (or `dz serve --random-weights`)") from e
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
