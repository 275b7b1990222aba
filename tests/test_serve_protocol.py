"""The policy server's wire protocol (dreamzero.serve.protocol): the array codec, and a client that imports and runs
an episode where torch cannot be imported."""
import subprocess
import sys

import numpy as np
import pytest
import torch

msgpack = pytest.importorskip("msgpack", reason="the server needs the 'serve' extra: pip install 'dz-kernels[serve]'")
pytest.importorskip("websockets", reason="the server needs the 'serve' extra: pip install 'dz-kernels[serve]'")

from dreamzero.engine import Policy, PolicyConfig  # noqa: E402
from dreamzero.serve import PolicyServer, ProtocolError, pack, unpack  # noqa: E402
from tiny import tiny_model  # noqa: E402

F32 = np.float32


# ---------------------------------------------------------------------------------------------- codec
def test_codec_round_trip():
    rng = np.random.default_rng(1)
    arrays = [np.arange(7, dtype=np.float32), np.zeros((0, 3), np.int64), np.array(3.5),
              rng.standard_normal((3, 4, 5))[:, ::2].astype(np.float16),          # not contiguous
              np.array([True, False]), np.arange(6, dtype=">i4").reshape(2, 3),     # big-endian in
              np.arange(5, dtype=np.uint8), rng.standard_normal((2, 3))]
    msg = {"type": "x", "a": arrays, "n": {"t": torch.arange(3.0), "bf": torch.ones(2, dtype=torch.bfloat16)},
           "s": np.float32(2.5), "i": np.int64(7), "tup": (1, 2), "none": None, "b": b"\x00\x01"}
    out = unpack(pack(msg))
    for a, b in zip(arrays, out["a"], strict=True):
        assert b.dtype == a.dtype.newbyteorder("=") and b.shape == a.shape and np.array_equal(a, b)
        assert b.flags.writeable and b.dtype.isnative
    assert out["n"]["t"].dtype == np.float32 and out["n"]["t"].tolist() == [0.0, 1.0, 2.0]
    assert out["n"]["bf"].dtype == np.float32 and out["n"]["bf"].tolist() == [1.0, 1.0]       # bfloat16 -> float32
    assert (out["s"], out["i"], out["tup"], out["none"], out["b"]) == (2.5, 7, [1, 2], None, b"\x00\x01")


@pytest.mark.parametrize("dtype,shape,data,expect", [
    ("|O", [1], b"\x00" * 8, "refused"),             # object arrays would mean pickle: never
    ("O", [1], b"\x00" * 8, "refused"),
    ("<c8", [1], b"\x00" * 8, "refused"),
    ("<U2", [1], b"\x00" * 8, "refused"),
    ("V8", [1], b"\x00" * 8, "refused"),
    ("<f1", [1], b"\x00", "not a numpy dtype"),
    ("<f4", [2], b"\x00" * 4, "need 8"),
    ("<f4", [-1], b"", "non-negative"),
    ("<f4", "2", b"\x00" * 8, "list"),
    ("<f4", [2], "text", "bin"),
])
def test_codec_rejects_bad_arrays(dtype, shape, data, expect):
    raw = msgpack.packb({"x": {"__nd__": True, "dtype": dtype, "shape": shape, "data": data}}, use_bin_type=True)
    with pytest.raises(ProtocolError, match=expect):
        unpack(raw)


def test_codec_rejects_malformed_msgpack():
    good = pack({"type": "health", "a": np.zeros(4, F32)})
    for raw, expect in [(b"\xc1", "not valid msgpack"), (good[:-3], "not valid msgpack"),
                        (good + b"\x00", "not valid msgpack"),
                        (msgpack.packb(msgpack.ExtType(5, b"x")), "extension type"),
                        (msgpack.packb({"__nd__": True, "dtype": "<f4", "shape": [0], "data": b"", "x": 1}),
                         "exactly")]:
        with pytest.raises(ProtocolError, match=expect):
            unpack(raw)
    for bad in (np.array([object()], dtype=object), np.zeros(2, np.complex64), object()):
        with pytest.raises(TypeError):
            pack({"x": bad})


_NO_TORCH_CLIENT = r'''
import sys, types


class NoTorch:
    """Makes `import torch` fail, as on a robot computer without it."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is blocked in this test")
        return None


sys.meta_path.insert(0, NoTorch())
import numpy as np

import dreamzero.serve                                   # the whole package imports without torch
from dreamzero.serve.client import PolicyClient
from dreamzero.serve.demo import run_demo
from dreamzero.serve.protocol import RequestError, pack, request_shapes, unpack, validate_step

a = np.arange(6, dtype=np.float32).reshape(2, 3)
assert np.array_equal(unpack(pack({"a": a}))["a"], a)
cfg = types.SimpleNamespace(**{k: 2 for k in ("latent_height", "latent_width", "text_len", "text_dim", "clip_tokens",
                                             "clip_dim", "latent_channels", "cond_channels", "local_attn_size",
                                             "frames_per_chunk", "states_per_chunk", "state_dim", "actions_per_chunk",
                                             "action_dim")})
assert request_shapes(cfg)["state"] == ["B", 2, 2]
try:
    validate_step({"state": np.zeros((1, 2, 3), np.float32)}, cfg)
    raise AssertionError("a wrong shape passed")
except RequestError as e:
    assert "expected [B, 2, 2]" in str(e), e
with PolicyClient(sys.argv[1], timeout=120) as client:
    replies = run_demo(client, chunks=2, batch=1, out=lambda s: None)
assert [r["chunk"] for r in replies] == [1, 2] and replies[1]["actions"].dtype == np.float32
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
print("client ok without torch")
'''


def test_the_client_needs_no_torch():
    """The protocol, client and demo import and run an episode in a process where `import torch` fails."""
    policy = Policy(tiny_model(std=None).eval(), PolicyConfig(num_steps=1, negative_prompt=None))
    with PolicyServer(policy, port=0) as srv:
        proc = subprocess.run([sys.executable, "-c", _NO_TORCH_CLIENT, srv.url], capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "client ok without torch" in proc.stdout
