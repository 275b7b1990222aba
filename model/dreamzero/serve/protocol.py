"""The policy server's wire protocol: message types, the array codec, limits and request validation.

Torch-free on purpose (numpy and msgpack only): a robot-side client imports this module, `client` and `demo`
without torch installed. Torch tensors are still accepted where arrays are (recognized by duck typing, converted by
`pack`), so the server uses the same functions.

Protocol (version 1). Every message is one binary websocket message holding one msgpack map with a "type" field;
an optional "id" (int or str) is echoed in the reply. Arrays travel as maps
{"__nd__": True, "dtype": "<f4", "shape": [...], "data": <bytes>} (see `pack` / `unpack`); only plain numeric dtypes
(bool, signed/unsigned integers, float16/32/64) are accepted, nothing is ever unpickled. "B" is the batch, Z the
model's latent channels (16 for Wan2.1, 48 for Wan2.2's 5B), cond_channels its I2V conditioning (20; 0 for the 5B).

    {"type": "health"}    -> {"type": "health", "ok": True, "pending", "max_pending", "episode", "metrics", ...}
    {"type": "metadata"}  -> {"type": "metadata", "model", "model_config", "policy_config", "shapes", "dtypes",
                              "num_embodiments", "embodiment_required", "max_message_bytes", "metrics", ...}
    {"type": "reset", "text": [B, text_len, text_dim], "clip": [B, clip_tokens, clip_dim],
     "first_latent": [B, Z, 1, H, W], optional "negative_text" (as text), "cond": [B, cond_channels,
     local_attn_size, H, W], "embodiment": int or int array [B] (required when the model has several embodiment
     slots)}              -> {"type": "reset", "ok": True, "batch": B}
    {"type": "step", "observation": [B, Z, frames_per_chunk, H, W] latents (absent or nil on the first step after
     a reset: the first frame came with the reset), "state": [B, states_per_chunk, state_dim]}
                          -> {"type": "actions", "actions": [B, actions_per_chunk, action_dim], "chunk", "dit_steps",
                              "timings_ms" (the policy's), "latency_ms" (server side: receipt to reply),
                              "video" (predicted latents, only when the policy returns video)}
    any failure           -> {"type": "error", "error": "<what was wrong>", "request_type", "id"}

Features are float16/32/64 and finite, with magnitudes at most the metadata's "max_abs" (`value_limit`: values the
model's dtype cannot carry through its norms and the sampler are refused); the exact shapes are in the metadata
reply ("shapes"). Requests are validated before the policy is touched; unknown fields are refused (a typo must not
be silently ignored). Replies are bounded whatever the request: an error's text holds at most MAX_ERROR_CHARS
characters (`bounded`), values are quoted in short (`short_repr`), and an "id" is a 64-bit int or a str of at most
MAX_ID_CHARS characters.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

PROTOCOL_VERSION = 1
DEFAULT_PORT = 8765
DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20
DEFAULT_MAX_PENDING = 4
MESSAGE_TYPES = ("health", "metadata", "reset", "step")
RESET_FIELDS = ("text", "clip", "first_latent", "negative_text", "cond", "embodiment")
STEP_FIELDS = ("observation", "state")
# raw inputs a server with an encoder accepts in place of features (see dreamzero.serve.server)
RAW_FIELDS = {"reset": ("instruction", "negative_instruction", "image"), "step": ("frames",)}
ENVELOPE = ("type", "id")
MAX_ERROR_CHARS = 1024          # the text of an error reply, whatever the request
MAX_ID_CHARS = 256              # a str "id" (echoed in the reply)
_MAX_NDIM = 16


# ============================================================================================== codec
class ProtocolError(ValueError):
    """A message that cannot be decoded or does not follow the protocol."""


_DTYPE_RE = re.compile(r"^[<>|=]?[biuf][1248]$")


def short_repr(x, limit: int = 80) -> str:
    """repr(x) cut to about `limit` characters: how a reply quotes a value from a request (never in full). Large
    containers and strings are cut before repr runs, so quoting a huge value costs no time either."""
    if isinstance(x, (str, bytes)) and len(x) > limit:
        return repr(x[:limit]) + f"... ({len(x)} in all)"
    if isinstance(x, (list, tuple, dict, set)) and len(x) > 16:
        return f"<{type(x).__name__} of {len(x)} items>"
    r = repr(x)
    return r if len(r) <= limit else r[:limit] + "..."


def bounded(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`text` cut to at most `limit` characters (an error reply's detail), saying how much was cut."""
    if len(text) <= limit:
        return text
    keep = max(0, limit - 48)
    return text[:keep] + f" ... [{len(text) - keep} more characters cut]"


def _encode_default(obj):
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf" or obj.dtype.fields is not None:
            raise TypeError(f"cannot send an array of dtype {obj.dtype}: only bool, integer and float arrays")
        arr = obj if obj.flags.c_contiguous else obj.copy(order="C")      # (ascontiguousarray makes 0-d 1-d)
        return {"__nd__": True, "dtype": arr.dtype.str, "shape": list(arr.shape), "data": arr.tobytes()}
    if isinstance(obj, np.generic):
        return obj.item()
    if is_tensor(obj):
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
                            f"{short_repr(sorted(d, key=str))}")
    dt, shape, data = d["dtype"], d["shape"], d["data"]
    if not isinstance(dt, str) or not _DTYPE_RE.match(dt):
        raise ProtocolError(f"array dtype {short_repr(dt)} refused: only plain numeric dtypes (e.g. '<f4', '<i8', "
                            "'|u1', '|b1') are accepted")
    try:
        dtype = np.dtype(dt)
    except TypeError as e:
        raise ProtocolError(f"array dtype {dt!r} is not a numpy dtype") from e
    if dtype.kind not in "biuf" or dtype.fields is not None or dtype.hasobject:
        raise ProtocolError(f"array dtype {dt!r} refused: only plain numeric dtypes are accepted")
    if (not isinstance(shape, list) or len(shape) > _MAX_NDIM
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise ProtocolError(f"array shape must be a list of at most {_MAX_NDIM} non-negative ints, got "
                            f"{short_repr(shape)}")
    if not isinstance(data, bytes):
        raise ProtocolError(f"array data must be msgpack bin (bytes), got {type(data).__name__}")
    n = 1
    for s in shape:
        n *= s
    if n * dtype.itemsize != len(data):
        raise ProtocolError(f"array data holds {len(data)} bytes; dtype {dt} and shape {shape} need "
                            f"{n * dtype.itemsize}")
    try:
        arr = np.frombuffer(data, dtype=dtype).reshape(tuple(shape))
    except (ValueError, OverflowError) as e:     # e.g. an empty array whose dimensions overflow numpy's index type
        raise ProtocolError(f"array of shape {short_repr(shape)} cannot be built ({type(e).__name__})") from None
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
        raise ProtocolError(f"not valid msgpack ({type(e).__name__}: {bounded(str(e), 200)})") from e


# ============================================================================================== validation
class RequestError(ValueError):
    """A request the server refuses before the policy is touched; its message is the error reply."""


def is_tensor(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "is_floating_point")


def fmt_shape(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def value_limit(dtype) -> float:
    """The largest feature magnitude a request may carry for a model computing in `dtype` (a torch or numpy dtype,
    or its name: 'float32', 'torch.bfloat16', ...): the square root of the dtype's largest finite value (1.8e19 for
    float32 and bfloat16, 256 for float16). The model squares its inputs (layer and RMS norms, attention logits)
    and the sampler mixes them with the noise, so a larger value -- even one the dtype holds, such as 3e38 in
    float32 -- turns into Inf/NaN inside the episode; it is refused before anything of the episode changes."""
    name = str(dtype).rsplit(".", 1)[-1]
    if name == "bfloat16":
        top = float.fromhex("0x1.fep127")                       # bfloat16's largest finite value
    elif name in ("float16", "float32", "float64"):
        top = float(np.finfo(np.dtype(name)).max)
    else:
        raise ValueError(f"no value limit for dtype {dtype!r}: expected float16, bfloat16, float32 or float64")
    return top ** 0.5


def _check_array(name: str, x, shape: tuple, kind: str, batch: int | None, max_abs: float | None = None) -> int:
    """Check `x` (numpy array or torch tensor) against `shape` ("B" = the batch, fixed by the first array checked)
    and kind ('float' or 'int'; float values finite and, with `max_abs`, at most that in magnitude); returns the
    batch."""
    if not isinstance(x, np.ndarray) and not is_tensor(x):
        raise RequestError(f"{name} must be an array, got {type(x).__name__}")
    got = tuple(int(s) for s in x.shape)
    want = tuple(batch if s == "B" and batch is not None else s for s in shape)
    if len(got) != len(want) or any(w != "B" and w != g for w, g in zip(want, got)):
        raise RequestError(f"{name} has shape {fmt_shape(got)}, expected {fmt_shape(want)}"
                           + (" (B = the batch of the reset)" if "B" in shape and batch is not None else ""))
    if "B" in shape:
        b = got[shape.index("B")]
        if b < 1:
            raise RequestError(f"{name} has an empty batch")
        batch = b
    if is_tensor(x):
        is_float = x.is_floating_point()
        is_int = not is_float and not x.is_complex() and str(x.dtype) != "torch.bool"
        dtype_name = str(x.dtype)
    else:
        is_float, is_int, dtype_name = x.dtype.kind == "f", x.dtype.kind in "iu", str(x.dtype)
    if kind == "float":
        if not is_float:
            raise RequestError(f"{name} must be a float array (float16/32/64), got {dtype_name}")
        finite = bool(x.isfinite().all()) if is_tensor(x) else bool(np.isfinite(x).all())
        if not finite:
            raise RequestError(f"{name} holds NaN or Inf values")
        if max_abs is not None and (x.numel() if is_tensor(x) else x.size):
            amax = float(x.abs().max()) if is_tensor(x) else float(np.abs(x).max())
            if amax > max_abs:
                raise RequestError(f"{name} holds a value of magnitude {amax:.3g}, beyond the {max_abs:.3g} this "
                                   "model's dtype can carry through its norms and the sampler (the metadata's "
                                   "'max_abs')")
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
    unknown = [k for k in msg if k not in allowed and k not in ENVELOPE]
    if unknown:
        shown = ", ".join(short_repr(k, 40) for k in unknown[:8]) + (f" and {len(unknown) - 8} more"
                                                                     if len(unknown) > 8 else "")
        raise RequestError(f"{kind}: unknown field(s) [{shown}]; allowed: {list(allowed)}")


def validate_reset(msg: dict, cfg, max_abs: float | None = None) -> dict:
    """Check a reset request against the model config; returns {"batch", field: array} for the present fields.
    max_abs: the largest feature magnitude accepted (`value_limit` of the model's dtype; None: any finite value)."""
    _check_fields("reset", msg, RESET_FIELDS)
    shapes = request_shapes(cfg)
    for name in ("text", "clip", "first_latent"):
        if msg.get(name) is None:
            raise RequestError(f"reset: missing field {name!r} (shape {fmt_shape(shapes[name])})")
    out, batch = {}, None
    for name in ("text", "clip", "first_latent", "negative_text", "cond"):
        if msg.get(name) is not None:
            batch = _check_array(f"reset: {name}", msg[name], tuple(shapes[name]), "float", batch, max_abs)
            out[name] = msg[name]
    emb = msg.get("embodiment")
    if emb is None:
        if cfg.num_embodiments != 1:
            raise RequestError(f"reset: the model has {cfg.num_embodiments} embodiment slots: send 'embodiment' "
                               f"(an int or an int array [B])")
    else:
        if isinstance(emb, bool) or not isinstance(emb, (int, np.ndarray)) and not is_tensor(emb):
            raise RequestError(f"reset: embodiment must be an int or an int array [B], got {type(emb).__name__}")
        if isinstance(emb, int):
            if not 0 <= emb < cfg.num_embodiments:       # checked before np.full: any int must get this reply
                raise RequestError(f"reset: embodiment ids must be in [0, {cfg.num_embodiments}), got "
                                   f"{short_repr(emb)}")
            emb = np.full((batch,), emb, dtype=np.int64)
        _check_array("reset: embodiment", emb, ("B",), "int", batch)
        lo, hi = int(emb.min()), int(emb.max())
        if lo < 0 or hi >= cfg.num_embodiments:
            raise RequestError(f"reset: embodiment ids must be in [0, {cfg.num_embodiments}), got "
                               f"{short_repr(emb.tolist())}")
        out["embodiment"] = emb
    out["batch"] = batch
    return out


def validate_step(msg: dict, cfg, max_abs: float | None = None) -> dict:
    """Check a step request against the model config (the batch against the reset is checked on the worker);
    max_abs as in `validate_reset`."""
    _check_fields("step", msg, STEP_FIELDS)
    shapes = request_shapes(cfg)
    if msg.get("state") is None:
        raise RequestError(f"step: missing field 'state' (shape {fmt_shape(shapes['state'])})")
    batch = _check_array("step: state", msg["state"], tuple(shapes["state"]), "float", None, max_abs)
    out = {"state": msg["state"], "observation": None, "batch": batch}
    if msg.get("observation") is not None:
        _check_array("step: observation", msg["observation"], tuple(shapes["observation"]), "float", batch,
                     max_abs)
        out["observation"] = msg["observation"]
    return out

