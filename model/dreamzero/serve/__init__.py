"""The policy server: a DreamZero `Policy` behind a websocket, with msgpack-encoded numpy arrays.

    dz serve --config tiny --random-weights --steps 1 --port 8765      # binds 127.0.0.1 unless --host says otherwise
    dz client --url ws://127.0.0.1:8765 --demo                         # a short episode with random features
    dz serve --protocol openpi --checkpoint CKPT --encoders WAN_DIR    # for DROID / RoboArena / openpi clients

- `protocol`: message types, the `__nd__` array codec (`pack`/`unpack`), limits, request validation (torch-free);
- `client`: `PolicyClient`, a blocking client (torch-free);
- `demo`: the demo episode of `dz client --demo` (torch-free);
- `server`: `PolicyServer` (one policy, one worker thread, bounded queue and message sizes);
- `cli`: the `dz serve` / `dz client` commands;
- `openpi`: the openpi / RoboArena protocol of robot clients (`dz serve --protocol openpi`): openpi-client's
  msgpack_numpy codec, the observation checks (torch-free);
- `policy_meta`: a checkpoint's statistics and transforms (dz_policy.json or the release's experiment_cfg), torch-free;
- `droid`: raw observations -> the model -> absolute joint targets, by the release's DROID rules (`RobotPolicy`);
- `openpi_server`: `OpenPIServer`, PolicyServer's machinery speaking the openpi protocol.

Importing this package imports neither torch nor the model: the server and the commands load them when they run.
"""
from .client import PolicyClient, ServerError
from .cli import build_policy, client_main, serve_main, serve_parser
from .demo import random_request_arrays, run_demo
from .protocol import (DEFAULT_HOST, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_PENDING, DEFAULT_PORT, MESSAGE_TYPES,
                       PROTOCOL_VERSION, RAW_FIELDS, RESET_FIELDS, STEP_FIELDS, ProtocolError, RequestError, pack,
                       request_shapes, unpack, validate_reset, validate_step)
from .server import LatencyStats, PolicyServer

__all__ = [
    "DEFAULT_HOST", "DEFAULT_MAX_MESSAGE_BYTES", "DEFAULT_MAX_PENDING", "DEFAULT_PORT", "LatencyStats",
    "MESSAGE_TYPES", "PROTOCOL_VERSION", "PolicyClient", "PolicyServer", "ProtocolError", "RAW_FIELDS",
    "RESET_FIELDS", "RequestError", "STEP_FIELDS", "ServerError", "build_policy", "client_main", "pack",
    "random_request_arrays", "request_shapes", "run_demo", "serve_main", "serve_parser", "unpack",
    "validate_reset", "validate_step",
]
