"""The openpi / RoboArena websocket protocol for robot clients: the wire format and the checking of requests.

Torch-free (numpy and msgpack only), like dreamzero.serve.protocol. The server is dreamzero.serve.openpi_server,
the observation pipeline dreamzero.serve.droid.

Wire format (openpi-client's msgpack_numpy, which the DreamZero release, RoboArena and openpi all use): every
message is one binary websocket message holding msgpack; numpy arrays travel as maps with BYTES keys
{b"__ndarray__": True, b"data": <bin>, b"dtype": "<f4", b"shape": [...]}, numpy scalars as
{b"__npgeneric__": True, b"data": <value>, b"dtype": "<f8"}. Only plain numeric dtypes are accepted (bool, integers,
floats); nothing is ever unpickled.

Conversation:
- on connect the server sends its metadata: the RoboArena PolicyServerConfig fields (image_resolution [h, w],
  needs_wrist_camera, n_external_cameras, needs_stereo_camera, needs_session_id, action_space) and nothing else, so
  RoboArena's own check `PolicyServerConfig(**metadata)` holds;
- a request is one observation map: one image per view "observation/<view>" (uint8 [H, W, 3], or [T, H, W, 3] for
  several frames at once), "observation/<state key>" per state key (DROID: joint_position [7], gripper_position
  [1]), "prompt" (str), optionally "session_id" and "observation/cartesian_position" (accepted, unused); the
  RoboArena variant adds "endpoint": "infer" | "reset" (a reset map may carry any reset_info);
- DROID's exterior views are named two ways: "exterior_image_1_left"/"exterior_image_2_left" (the DROID dataset, the
  RoboArena evaluator) or "exterior_image_0_left"/"exterior_image_1_left" (the DreamZero release's server and sim
  client: 0 is the first exterior view); a request with "exterior_image_0_left" uses the second naming;
- the infer reply is a map {"actions": float32 [N, D], "action": the same array, "server_timing": {"infer_ms",
  "latency_ms"}, "chunk", "episode": {...}, "timings_ms": {...}}: "actions" is what openpi's DROID client, the
  RoboArena evaluator and the release's sim client read, "action" the name in RoboArena's interface; all N actions
  are executed before the next call. The reset reply is the text "reset successful" (as the release);
- any refused request gets a TEXT message "error: <what was wrong>" (openpi-style clients raise it as
  RuntimeError), at most protocol.MAX_ERROR_CHARS characters (the native protocol's bound, protocol.bounded); the
  connection stays open and the episode is untouched.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from .protocol import _DTYPE_RE, _MAX_NDIM, ProtocolError, RequestError, bounded

MAX_PROMPT_CHARS = 4096
MAX_SESSION_ID_CHARS = 256
RESET_REPLY = "reset successful"
ENDPOINTS = ("infer", "reset")
PREFIX = "observation/"
_EXTERIOR = re.compile(r"^exterior_image_(\d+)_left$")
_IGNORED = re.compile(r"^observation/(cartesian_position|\w+_right)$")     # sent by clients, unused by the model


# ============================================================================================== codec
def _encode(obj):
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind not in "biuf":
        raise TypeError(f"cannot send an array of dtype {obj.dtype}: only bool, integer and float arrays")
    if isinstance(obj, np.ndarray):
        arr = obj if obj.flags.c_contiguous else obj.copy(order="C")
        return {b"__ndarray__": True, b"data": arr.tobytes(), b"dtype": arr.dtype.str, b"shape": list(arr.shape)}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot encode an object of type {type(obj).__name__}")


def pack(obj: Any) -> bytes:
    """Encode a message as openpi-client's msgpack_numpy does (arrays and numpy scalars as bytes-keyed maps)."""
    import msgpack

    return msgpack.packb(obj, default=_encode, use_bin_type=True)


def _field(d: dict, name: str):
    return d[name.encode()] if name.encode() in d else d.get(name)


def _dtype(dt) -> np.dtype:
    if isinstance(dt, bytes):
        dt = dt.decode("ascii", "replace")
    if not isinstance(dt, str) or not _DTYPE_RE.match(dt):
        raise ProtocolError(f"array dtype {dt!r} refused: only plain numeric dtypes (e.g. '<f4', '|u1') are accepted")
    return np.dtype(dt)


def _object_hook(d: dict):
    if b"__ndarray__" in d or "__ndarray__" in d:
        if len(d) != 4:
            raise ProtocolError(f"an array map must hold exactly __ndarray__, data, dtype, shape; got {len(d)} keys")
        dtype, shape, data = _dtype(_field(d, "dtype")), _field(d, "shape"), _field(d, "data")
        if (not isinstance(shape, list) or len(shape) > _MAX_NDIM
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise ProtocolError(f"array shape must be a list of at most {_MAX_NDIM} non-negative ints, got "
                                f"{str(shape)[:80]}")
        if not isinstance(data, bytes):
            raise ProtocolError(f"array data must be msgpack bin (bytes), got {type(data).__name__}")
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if n * dtype.itemsize != len(data):
            raise ProtocolError(f"array data holds {len(data)} bytes; dtype {dtype.str} and shape {shape} need "
                                f"{n * dtype.itemsize}")
        arr = np.frombuffer(data, dtype=dtype).reshape(tuple(shape))
        return arr.astype(dtype.newbyteorder("="), copy=True)
    if b"__npgeneric__" in d or "__npgeneric__" in d:
        value = _field(d, "data")
        if len(d) != 3 or isinstance(value, (bytes, str, list, dict)) or value is None:
            raise ProtocolError("a numpy scalar map must hold exactly __npgeneric__, data (a number), dtype")
        return _dtype(_field(d, "dtype")).type(value)
    return d


def _ext_hook(code, data):
    raise ProtocolError(f"msgpack extension type {code} is not accepted")


def unpack(data: bytes) -> Any:
    """Decode a message packed by openpi-client (or `pack`). ProtocolError on anything malformed."""
    import msgpack

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected bytes, got {type(data).__name__}")
    try:
        return msgpack.unpackb(data, raw=False, object_hook=_object_hook, ext_hook=_ext_hook, strict_map_key=True)
    except ProtocolError:
        raise
    except Exception as e:      # msgpack raises several types (ExtraData, FormatError, StackError, ValueError, ...)
        raise ProtocolError(f"not valid msgpack ({type(e).__name__}: {str(e)[:200]})") from e


def error_text(message: str) -> str:
    """The text of an error reply, bounded as the native protocol's (protocol.bounded, MAX_ERROR_CHARS)."""
    return bounded("error: " + str(message))


def _short(x, n: int = 60) -> str:
    s = repr(x)
    return s if len(s) <= n else s[:n] + "..."


# ============================================================================================== requests
@dataclasses.dataclass
class Request:
    """A checked request. endpoint "infer" or "reset"; for infer: images {view: uint8 [T, H, W, 3]} in the
    metadata's view order, state {key: float64 [dim]} (raw, as sent), prompt, session_id (str or None)."""
    endpoint: str
    images: dict
    state: dict
    prompt: str
    session_id: str | None
    naming: str = "dataset"        # "dataset" or "release" (the exterior views' numbering the client used)


@dataclasses.dataclass(frozen=True)
class RobotSpec:
    """What a request must hold: the views (metadata names), their resolution (h, w), the state keys and dims."""
    views: tuple
    resolution: tuple
    state: tuple                    # ((key, dim), ...)

    @classmethod
    def from_metadata(cls, meta) -> "RobotSpec":
        return cls(tuple(meta.video_keys), tuple(meta.resolution), tuple((s.key, s.dim) for s in meta.state))

    def server_config(self, needs_session_id: bool = True) -> dict:
        """The RoboArena PolicyServerConfig the server sends on connect."""
        ext = sum(1 for v in self.views if _EXTERIOR.match(v))
        return {"image_resolution": list(self.resolution), "needs_wrist_camera": any("wrist" in v for v in self.views),
                "n_external_cameras": ext, "needs_stereo_camera": False, "needs_session_id": needs_session_id,
                "action_space": "joint_position"}

    def release_names(self) -> dict:
        """view -> the key the DreamZero release's server expects (exterior views numbered from 0)."""
        out = {}
        for v in self.views:
            m = _EXTERIOR.match(v)
            out[v] = PREFIX + (f"exterior_image_{int(m.group(1)) - 1}_left" if m else v)
        return out

    def parse(self, msg) -> Request:
        """Check one decoded message; RequestError (the error reply's text) for anything wrong."""
        if not isinstance(msg, dict):
            raise RequestError(f"a request must be a msgpack map (the observation), got {type(msg).__name__}")
        bad = [k for k in msg if not isinstance(k, str)]
        if bad:
            raise RequestError(f"request keys must be strings, got {_short(bad[:4])}")
        endpoint = msg.get("endpoint", "infer")
        if endpoint not in ENDPOINTS:
            raise RequestError(f"'endpoint' must be one of {list(ENDPOINTS)}, got {_short(endpoint)}")
        session = self._session(msg.get("session_id"))
        if endpoint == "reset":                 # RoboArena's reset_info is free-form
            return Request("reset", {}, {}, "", session)
        names, naming = {v: PREFIX + v for v in self.views}, "dataset"
        alt = self.release_names()
        only_release = set(alt.values()) - set(names.values())      # DROID: exterior_image_0_left
        only_dataset = set(names.values()) - set(alt.values())      # DROID: exterior_image_2_left
        if any(k in msg for k in only_release):
            if any(k in msg for k in only_dataset):
                raise RequestError(f"ambiguous exterior views: send either {sorted(names.values())} (DROID's names) "
                                   f"or {sorted(alt.values())} (the DreamZero release's), not a mix")
            names, naming = alt, "release"
        state_keys = {PREFIX + k: (k, d) for k, d in self.state}
        known = set(names.values()) | set(state_keys) | {"prompt", "session_id", "endpoint"}
        unknown = sorted(k for k in msg if k not in known and not _IGNORED.match(k))
        if unknown:
            raise RequestError(f"unknown key(s) {[_short(k, 40) for k in unknown[:8]]}"
                               f"{' ...' if len(unknown) > 8 else ''}; expected {sorted(known)}")
        missing = [k for k in list(names.values()) + list(state_keys) + ["prompt"] if k not in msg]
        if missing:
            raise RequestError(f"missing key(s) {missing}; this policy needs the views {list(names.values())}, "
                               f"the state {list(state_keys)} and 'prompt'")
        images, T = {}, None
        for view, key in names.items():
            img = msg[key]
            h, w = self.resolution
            if not isinstance(img, np.ndarray):
                raise RequestError(f"{key} must be a uint8 image array [{h}, {w}, 3], got {type(img).__name__}")
            if img.dtype != np.uint8:
                raise RequestError(f"{key} must be uint8, got {img.dtype}")
            if img.ndim == 3:
                img = img[None]
            if img.ndim != 4 or img.shape[1:] != (h, w, 3) or img.shape[0] < 1:
                raise RequestError(f"{key} has shape {list(msg[key].shape)}; expected [{h}, {w}, 3] (or "
                                   f"[T, {h}, {w}, 3]): resize the views to the metadata's image_resolution")
            if T is not None and img.shape[0] != T:
                raise RequestError(f"the views carry different frame counts ({T} and {img.shape[0]} in {key})")
            T = img.shape[0]
            images[view] = img
        state = {}
        for key, (name, dim) in state_keys.items():
            x = msg[key]
            if isinstance(x, (int, float)) and not isinstance(x, bool) and dim == 1:
                x = np.asarray([x], dtype=np.float64)
            if not isinstance(x, np.ndarray) or x.dtype.kind not in "iuf":
                raise RequestError(f"{key} must be a numeric array [{dim}], got {_short(getattr(x, 'dtype', x))}")
            if x.size != dim or x.ndim > 2 or (x.ndim == 2 and x.shape[0] != 1):
                raise RequestError(f"{key} has shape {list(x.shape)}; expected [{dim}] (or [1, {dim}])")
            x = x.astype(np.float64).reshape(dim)
            if not np.isfinite(x).all():
                raise RequestError(f"{key} holds NaN or Inf")
            state[name] = x
        prompt = msg["prompt"]
        if not isinstance(prompt, str):
            raise RequestError(f"'prompt' must be a string, got {type(prompt).__name__}")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise RequestError(f"'prompt' has {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
        return Request("infer", images, state, prompt, session, naming)

    @staticmethod
    def _session(s) -> str | None:
        if s is None:
            return None
        if isinstance(s, np.ndarray) and s.dtype.kind in "iu" and s.size <= 4:     # RoboArena's test: int32 [1]
            s = "/".join(str(int(v)) for v in s.reshape(-1))
        elif isinstance(s, (int, np.integer)) and not isinstance(s, bool):
            s = str(int(s))
        if not isinstance(s, str):
            raise RequestError(f"'session_id' must be a string or an int, got {type(s).__name__}")
        if len(s) > MAX_SESSION_ID_CHARS:
            raise RequestError(f"'session_id' has {len(s)} characters; at most {MAX_SESSION_ID_CHARS}")
        return s
