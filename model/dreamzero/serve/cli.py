"""The `dz serve` and `dz client` commands (wired into `dz` by dreamzero.cli_commands)."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

from .client import PolicyClient, ServerError
from .demo import run_demo
from .protocol import DEFAULT_HOST, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_PENDING, DEFAULT_PORT
from .server import PolicyServer


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_policy(args) -> tuple:
    """The model and Policy a `dz serve` command line asks for; returns (policy, model_name)."""
    import torch

    from ..engine import Policy, PolicyConfig

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
    cfg = _model_config(args)
    if args.checkpoint:
        try:
            from .. import checkpoint as ckpt
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
        from ..dreamzero import DreamZero

        torch.manual_seed(args.weight_seed)
        with torch.device(device):
            model = DreamZero(cfg)
        model = model.to(dtype)
    model.eval()
    return Policy(model, pc), cfg.name


def _model_config(args):
    """--config NAME, else the dz_config.json that `dz export` writes beside a checkpoint, else tiny."""
    import os

    from ..config import get_config

    if args.config is not None:
        return get_config(args.config)
    if args.checkpoint:
        ckpt = args.checkpoint
        folder = ckpt if os.path.isdir(ckpt) else os.path.dirname(os.path.abspath(ckpt))
        path = os.path.join(folder, "dz_config.json")
        if os.path.isfile(path):
            from ..train.trainer import model_config_from_dict
            try:
                with open(path) as f:
                    return model_config_from_dict(json.load(f))
            except (OSError, ValueError, TypeError, KeyError) as e:
                raise SystemExit(f"dz serve: cannot read the model config {path}: {e}; pass --config NAME") from e
    return get_config("tiny")


def serve_parser() -> argparse.ArgumentParser:
    from ..config import config_names

    p = argparse.ArgumentParser(prog="dz serve", description="Serve a DreamZero policy over a websocket (msgpack).")
    src = p.add_argument_group("weights (one of)")
    src.add_argument("--random-weights", action="store_true", help="random weights (seeded by --weight-seed)")
    src.add_argument("--checkpoint", metavar="PATH", help="safetensors checkpoint (dreamzero.checkpoint.load_model)")
    p.add_argument("--config", default=None, choices=config_names(),
                   help="model config (default: the checkpoint's dz_config.json, else tiny)")
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
    if args.protocol == "native" and (args.encoders or args.policy_metadata or args.embodiment_tag):
        parser.error("--encoders, --policy-metadata and --embodiment-tag belong to --protocol openpi")
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
