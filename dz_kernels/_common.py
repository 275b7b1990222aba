"""What every op family of dz_kernels shares: the interpreter check, output allocation (with the tests' NaN-poisoning
hook), the custom-op registration and its eager call (`custom_op`, `call`), the FP8 E4M3 convention, and the Triton
device functions that round to a storage format.

Rounding: one code path on the GPU and in the Triton CPU interpreter
    The interpreter's float casts do not round like the GPU (triton 3.9, the CPU machine's): float32 -> bfloat16
    truncates (and mangles float32 subnormals), float32 -> float16 in registers does not round, float32 ->
    float8e4nv mis-rounds (125.6 -> 64) and turns NaN into 384, and float8e4nv -> float32 reads the NaN byte as 480. A kernel that rounds only under the interpreter tests on the CPU a path the GPU never runs.
    So every kernel here rounds by hand, on both: `round_bf16` / `round_fp16` give the nearest value of the format
    (ties to even) as float32, whose cast is then exact on both; `e4m3_bits` builds the E4M3 byte itself (the
    hardware conversion is not used at all) and `e4m3_value` decodes one (the interpreter reads the NaN byte as a
    number). tests/test_common.py holds these against torch's own conversions.

FP8 E4M3 (torch.float8_e4m3fn): max 448, no infinities, NaN = 0x7F. A quantized group (a row, a block, a head) is
(q, scale) with x ~= q * scale:
    scale = max(amax, FP8_AMAX_FLOOR) / 448        IEEE division (div_rn), float32; NaN when the group holds a NaN
    q     = e4m3(clamp(x / scale, -448, 448))      IEEE division, round to nearest even, the sign of zero kept
The floor keeps an all-zero group finite (it quantizes to zeros). A NaN anywhere in a group makes its scale and
all its values NaN, as the plain-PyTorch formula does (torch.amax propagates NaN); `tl.max`/`tl.maximum` drop NaN
on the GPU, so the kernels take the group's amax with `nan_amax`. `fp8_scale` is the PyTorch form of the scale:
PyTorch on CUDA computes `t / 448.0` (a Python-scalar divisor) as `t * (1 / 448)`, which differs from the division
in the last bit for some amax, so the references divide by a device tensor, an IEEE division on every device.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

import triton
import triton.language as tl

__all__ = [
    "FP8_DTYPE", "E4M3_MAX", "FP8_AMAX_FLOOR", "kernels_interpreted", "triton_runs_on", "empty", "poisoned",
    "fp8_scale", "quantize_e4m3", "nan_amax", "fp8_scale_tl", "e4m3_bits", "e4m3_round", "e4m3_value",
    "round_bf16", "round_fp16", "round_to", "cast_rne", "custom_op", "call", "plain_eager", "cdiv", "next_pow2",
]

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = 448.0
FP8_AMAX_FLOOR = 1e-12


# ------------------------------------------------------------------------------------------------ where kernels run
def kernels_interpreted() -> bool:
    """True when this package's Triton kernels are interpreter functions (TRITON_INTERPRET=1 was set when triton
    decorated them, i.e. before dz_kernels was imported): they then run on CPU tensors. Decided by the kernels
    themselves, not by the variable's value now."""
    return type(e4m3_bits).__name__ == "InterpretedFunction"


def triton_runs_on(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can take tensor `t`: a CUDA tensor, or a CPU tensor under the interpreter."""
    return t.device.type == "cuda" or (t.device.type == "cpu" and kernels_interpreted())


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of host integers, as triton.cdiv, which is a ConstexprFunction: about 2.5 us a call from Python
    (a launcher makes several per launch), against 0.03 us for this."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n of a host integer (0 for 0), as triton.next_power_of_2 (about 2.5 us a call
    from Python, a ConstexprFunction)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


# ----------------------------------------------------------------------------------------- output allocation hook
_POISON_OUTPUTS = [False]


def poisoned(shape, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """A buffer filled with NaN (integers: -1, or the maximum when unsigned), so memory a kernel forgets to write
    fails the comparison. float8_e4m3fn buffers hold the E4M3 NaN byte 0x7F."""
    t = torch.empty(tuple(shape), dtype=dtype, device=device)
    if dtype == FP8_DTYPE:
        t.view(torch.uint8).fill_(0x7F)
    elif t.is_floating_point():
        t.fill_(float("nan"))
    else:
        t.fill_(-1 if t.dtype.is_signed else torch.iinfo(t.dtype).max)
    return t


def empty(shape: Sequence[int], dtype: torch.dtype, device) -> torch.Tensor:
    """Every output buffer of the kernel launchers comes from here: torch.empty, or a NaN-filled buffer while
    dz_kernels.testing.poison_outputs() is active (the tests' hook)."""
    if _POISON_OUTPUTS[0]:
        return poisoned(shape, dtype, device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


# ------------------------------------------------------------------------------- custom ops and their eager calls
_OP_FUNCTIONS: dict = {}


def custom_op(name: str, mutates_args=()):
    """Decorator: torch.library.custom_op(name, mutates_args=...) of the function (every kernel op of this package
    is one, with a fake implementation, for torch.compile and CUDA graphs), remembering the function for `call`."""
    def register(fn):
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        _OP_FUNCTIONS[op] = fn
        return op
    return register


def call(op, *args):
    """op(*args) for an op made by `custom_op`; in plain eager use the op's own function on args instead: when
    torch.compile (or export) is not tracing, no dispatch mode is active (fake tensors, flop counters, ...), every
    tensor argument is a plain tensor (or Parameter) off the meta device, and autograd has nothing to record (grad
    mode off, or no argument requiring grad). That function is what the op runs, so the results are the same; the
    call skips the dispatcher's Python layers (autograd wrapper, redispatch, dynamo guard), which took about 50 us
    of host time per call on the project's 2-core CPU machine (bench/NOTES.md, "Host time of the ops"): on the GPU,
    as long as a fused-norm kernel runs at the control step's 1,785 tokens."""
    if plain_eager(args):
        return _OP_FUNCTIONS[op](*args)
    return op(*args)


def plain_eager(args) -> bool:
    """Whether `call` would run an op with these arguments as its plain function (see there)."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, torch.Tensor) and ((type(a) is not torch.Tensor and type(a) is not torch.nn.Parameter)
                                            or a.is_meta or (grad and a.requires_grad)):
            return False
    return True


# ----------------------------------------------------------------------------------------- FP8, plain PyTorch form
def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """max(amax, FP8_AMAX_FLOOR) / 448 in float32 with an IEEE division on any device (NaN stays NaN)."""
    a = torch.clamp(amax.float(), min=FP8_AMAX_FLOOR)
    return a / torch.full((), E4M3_MAX, dtype=torch.float32, device=a.device)


def quantize_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3(clamp(x / scale, -448, 448)) with torch's conversion (round to nearest even; NaN stays NaN). x float32,
    scale broadcastable to it."""
    return torch.clamp(x.float() / scale, -E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


# ------------------------------------------------------------------------------------- Triton device functions
@triton.jit
def nan_amax(x, axis: tl.constexpr):
    """max |x| along `axis`, NaN when any element there is NaN (tl.max alone drops NaN on the GPU)."""
    a = tl.max(tl.abs(x), axis=axis)
    bad = tl.max((x != x).to(tl.int32), axis=axis)
    return tl.where(bad != 0, float("nan"), a)


@triton.jit
def fp8_scale_tl(amax, amax_floor):
    """max(amax, floor) / 448, IEEE division; a NaN amax gives a NaN scale."""
    return tl.math.div_rn(tl.where(amax < amax_floor, amax_floor, amax), 448.0)


@triton.jit
def _e4m3_round(a):
    """|v| (float32, NaN allowed) saturated at 448 and rounded to the nearest E4M3 magnitude, ties to even.

    Adding c = 1.5 * 2^(e + 20), e = max(exponent(a), -6), gives a float32 whose ulp is 2^(e - 3), the E4M3 quantum
    of a's binade (2^-9 for the subnormals), so the float32 addition rounds; subtracting c back is exact."""
    a = tl.where(a > 448.0, 448.0, a)                      # saturate (a NaN compares false and stays NaN)
    e = (a.to(tl.int32, bitcast=True) >> 23) - 127
    e = tl.minimum(tl.maximum(e, -6), 8)
    c = (((e + 147) << 23) | (1 << 22)).to(tl.float32, bitcast=True)
    return (a + c) - c


@triton.jit
def e4m3_bits(v):
    """float32 v -> the float8_e4m3fn byte of clamp(v, -448, 448) rounded to nearest even (sign of zero kept; NaN ->
    0x7F). Pure integer and float32 arithmetic, the same on the GPU and in the interpreter: the rounding is
    _e4m3_round, then the byte is r * 512 for the subnormals (r < 2^-6), else (exponent + 7) << 3 | the top three
    mantissa bits."""
    bits = v.to(tl.int32, bitcast=True)
    a = tl.abs(v)
    r = _e4m3_round(a)
    r = tl.where(a != a, 0.0, r)                           # (the NaN code is set below)
    rb = r.to(tl.int32, bitcast=True)
    normal = (((rb >> 23) - 120) << 3) | ((rb >> 20) & 7)
    sub = (r * 512.0).to(tl.int32)
    code = tl.where(r < 0.015625, sub, normal)
    code = tl.where(a != a, 0x7F, code | ((bits >> 24) & 0x80))
    return code.to(tl.uint8)


@triton.jit
def e4m3_round(v):
    """float32 v -> clamp(v, -448, 448) rounded to the nearest E4M3 value, as float32 (the value of e4m3_bits(v);
    sign of zero kept, NaN stays NaN)."""
    bits = v.to(tl.int32, bitcast=True)
    r = _e4m3_round(tl.abs(v))
    out = (r.to(tl.int32, bitcast=True) | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)
    return tl.where(v != v, v, out)


@triton.jit
def e4m3_value(q):
    """float8_e4m3fn values (as loaded) -> float32, decoded from the byte by hand (the interpreter's conversion
    turns the NaN byte into a number): 0x7F / 0xFF are NaN, exponent 0 the subnormals m * 2^-9."""
    b = q.to(tl.uint8, bitcast=True).to(tl.int32)
    e = (b >> 3) & 15
    m = b & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    v = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    v = (v.to(tl.int32, bitcast=True) | ((b & 0x80) << 24)).to(tl.float32, bitcast=True)
    return tl.where((b & 0x7F) == 0x7F, float("nan"), v)


@triton.jit
def round_bf16(x):
    """float32 -> the nearest bfloat16 value (ties to even) as float32; NaN and infinities pass through."""
    b = x.to(tl.int32, bitcast=True)
    r = ((b + (0x7FFF + ((b >> 16) & 1))) & -65536).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, r)


@triton.jit
def round_fp16(x):
    """float32 -> the nearest float16 value (ties to even) as float32: quantum 2^(e - 10), 2^-24 below 2^-14; beyond
    65504 it rounds to a multiple of 32 >= 65536, which the cast then makes infinite (as a float16 conversion does).
    Same trick as e4m3_bits (c = 1.5 * 2^(e + 13)); the sign is put back as a bit, so -0 stays -0."""
    bits = x.to(tl.int32, bitcast=True)
    a = tl.abs(x)
    e = (a.to(tl.int32, bitcast=True) >> 23) - 127
    e = tl.minimum(tl.maximum(e, -14), 15)
    c = (((e + 140) << 23) | (1 << 22)).to(tl.float32, bitcast=True)
    r = (((a + c) - c).to(tl.int32, bitcast=True) | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, r)


@triton.jit
def round_to(x, DT: tl.constexpr):
    """float32 x rounded to DT (bfloat16, float16 or float32), returned as float32."""
    if DT == tl.bfloat16:
        return round_bf16(x)
    elif DT == tl.float16:
        return round_fp16(x)
    else:
        return x


@triton.jit
def cast_rne(x, DT: tl.constexpr):
    """float32 x converted to DT (bfloat16, float16, float32, or float8e4nv with saturation) rounding to nearest
    even, the same bits on the GPU and in the interpreter."""
    if DT == tl.float8e4nv:
        return e4m3_bits(x).to(tl.float8e4nv, bitcast=True)
    elif DT == tl.bfloat16:   # the top half of the rounded bits (the interpreter's cast mangles float32 subnormals)
        return (round_bf16(x).to(tl.int32, bitcast=True) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return round_to(x, DT).to(DT)
